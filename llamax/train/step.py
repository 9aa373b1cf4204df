"""The step functions, as pure functions of (what is trained, a batch): loss, gradients, update.

A batch is a dict of global [batch, seq] arrays: `tokens`, `targets` (int32), `loss_mask`
(float32, 1 where the target is scored) and optionally `positions`, `segment_ids` (int32,
0 = padding). Numpy arrays work on one host; with several processes build global arrays first
with `llamax.sharding.to_global_batch`.
The loss is token cross-entropy weighted by `loss_mask`, divided by the number of scored tokens;
`loss_mask` already covers padding, document ends and SFT prompt tokens.

Every step differentiates `trainable` and reads `frozen` (None in full training; the LoRA base
params otherwise) through one function, `Trainable.variables(trainable, frozen)`, which builds
the forward's flax variables. Which of the two a run trains is decided once, in
`llamax.train.setup.make_train_setup`; nothing here knows about LoRA.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llamax.errors import ConfigError
from llamax.model.llama import Llama
from llamax.sharding import Rules, check_batch_size, data_parallel_size

Array = jax.Array
Batch = dict[str, Array]
Variables = Callable[[Any, Any], dict]  # (trainable, frozen) -> flax variables of a forward pass
REQUIRED_BATCH_KEYS = ("tokens", "targets", "loss_mask")


@flax.struct.dataclass
class TrainState:
    """Everything a training run checkpoints. All leaves are plain arrays."""

    step: Array  # [] int32: number of updates applied so far
    params: Any  # the trained params: like `init_params` (fp32 master weights), or LoRA adapters
    opt_state: Any  # optax state; moments shaped and sharded like params
    rng: Array  # [2] uint32 (threefry) key data (jax.random.key_data); wrap with jax.random.wrap_key_data


# ---- loss ---------------------------------------------------------------------------------

def cross_entropy_sums(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of masked cross-entropy, sum of masked logsumexp^2) over all tokens.

    logits [batch, seq, vocab] float32; targets [batch, seq] int; loss_mask [batch, seq].
    Masked positions contribute exactly 0 even when their target is out of range (padding).
    """
    scored = loss_mask > 0
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    weight = loss_mask.astype(jnp.float32)
    cross_entropy = jnp.where(scored, log_normalizer - target_logit, 0.0) * weight
    z_term = jnp.where(scored, jnp.square(log_normalizer), 0.0) * weight
    return jnp.sum(cross_entropy), jnp.sum(z_term)


def forward_sums(model: Llama, variables: dict, batch: Batch) -> tuple[Array, Array]:
    """`cross_entropy_sums` of the model's logits on `batch`."""
    logits = model.apply(variables, batch["tokens"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"))  # [batch, seq, vocab] float32
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])


def check_batch(batch: Batch, mesh: jax.sharding.Mesh, rules: Rules, micro_batches: int) -> None:
    """ConfigError unless `batch` has the required keys and a size the mesh and accumulation
    can split; runs on the host before jit's own sharding check, so the message says the fix."""
    missing = [key for key in REQUIRED_BATCH_KEYS if key not in batch]
    if missing:
        raise ConfigError(f"batch is missing {missing}; expected keys {REQUIRED_BATCH_KEYS} "
                          "(+ optional positions, segment_ids)")
    batch_size = batch["tokens"].shape[0]
    check_batch_size(batch_size, mesh, rules)
    dp = data_parallel_size(mesh, rules)
    if batch_size % (micro_batches * dp):
        raise ConfigError(
            f"batch size {batch_size} cannot be split into grad_accum_steps={micro_batches} "
            f"micro-batches that are each a multiple of the data-parallel size {dp}; use a batch "
            f"size that is a multiple of {micro_batches * dp}")


def _split_micro_batches(batch: Batch, micro_batches: int, mesh: jax.sharding.Mesh,
                         rules: Rules) -> Batch:
    """[batch, seq] -> [micro_batches, batch / micro_batches, seq].

    Row r goes to micro-batch r % micro_batches, so every device splits only its own rows and no
    data moves between devices.
    """
    spec = nn.logical_to_mesh_axes((None, "batch", "length"), rules)

    def split(x: Array) -> Array:
        x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


# ---- the steps (traced under the mesh and rules contexts by `llamax.train.setup`) ---------

def loss_and_grads(model: Llama, variables: Variables, trainable: Any, frozen: Any, batch: Batch,
                   micro_batches: int, z_weight: float, mesh: jax.sharding.Mesh,
                   rules: Rules) -> tuple[dict, Any]:
    """(metrics, grads w.r.t. `trainable`) of the batch-mean loss, accumulating over
    micro-batches; `frozen` gets no gradient. metrics: loss, z_loss, scored_tokens."""

    def objective(trainable, batch, num_scored):
        cross_entropy_sum, z_sum = forward_sums(model, variables(trainable, frozen), batch)
        return (cross_entropy_sum + z_weight * z_sum) / num_scored, (cross_entropy_sum, z_sum)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    scored_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    # Every micro-batch divides by the token count of the *whole* batch, so the summed
    # gradients equal the gradient of the whole-batch mean exactly.
    num_scored = jnp.maximum(scored_tokens, 1.0)
    if micro_batches == 1:
        (_, (cross_entropy_sum, z_sum)), grads = grad_fn(trainable, batch, num_scored)
    else:
        def accumulate(carry, micro_batch):
            (_, sums), grads = grad_fn(trainable, micro_batch, num_scored)
            return jax.tree.map(jnp.add, carry, (sums, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(())), jax.tree.map(jnp.zeros_like, trainable)
        micro = _split_micro_batches(batch, micro_batches, mesh, rules)
        ((cross_entropy_sum, z_sum), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    metrics = dict(loss=cross_entropy_sum / num_scored, z_loss=z_sum / num_scored,
                   scored_tokens=scored_tokens)
    return metrics, grads


def train_step(model: Llama, variables: Variables, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, micro_batches: int, z_weight: float,
               mesh: jax.sharding.Mesh, rules: Rules,
               state: TrainState, batch: Batch, frozen: Any) -> tuple[TrainState, dict]:
    """One optimizer update. Metrics (replicated scalars): loss, z_loss, grad_norm (before
    clipping), learning_rate (of this update), scored_tokens, finite (bool). When the loss or
    gradients are not finite the state is returned unchanged (step included) and finite is
    False, so no NaN ever reaches params or a checkpoint; the host loop decides what to do."""
    metrics, grads = loss_and_grads(model, variables, state.params, frozen, batch, micro_batches,
                                    z_weight, mesh, rules)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["z_loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updated = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, rng=next_rng(state.rng))
    # Select, not lax.cond: both branches are cheap next to the step, and select keeps
    # donation and sharding simple.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics.update(grad_norm=grad_norm, finite=finite,
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
    return new_state, metrics


def eval_step(model: Llama, variables: Variables, trainable: Any, batch: Batch, frozen: Any) -> dict:
    """{'loss_sum', 'scored_tokens'} of one batch; perplexity = exp(sum loss_sum / sum tokens)
    over batches (`llamax.infer.evaluate` does the sums)."""
    cross_entropy_sum, _ = forward_sums(model, variables(trainable, frozen), batch)
    return dict(loss_sum=cross_entropy_sum, scored_tokens=jnp.sum(batch["loss_mask"].astype(jnp.float32)))


def next_rng(rng: Array) -> Array:
    """Advances the state's key data; a future dropout would draw from the pre-advance key."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), 0))
