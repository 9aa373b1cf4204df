"""The step functions, as pure functions of (what is trained, a batch): loss, gradients, update.

A batch is a dict of global [batch, seq] arrays: `tokens`, `targets` (int32), `loss_mask`
(float32, 1 where the target is scored) and optionally `positions`, `segment_ids` (int32,
0 = padding). Numpy arrays work on one host; with several processes build global arrays first
with `llamax.sharding.to_global_batch`.
What is differentiated is an objective's batch mean (`llamax.train.objectives`): token
cross-entropy weighted by `loss_mask` over the scored tokens (pretraining, SFT: `loss_mask`
already covers padding, document ends and prompt tokens), or DPO over preference pairs.

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
from llamax.train.objectives import Objective, cross_entropy_sums

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


# ---- loss (the objectives live in `llamax.train.objectives`) -------------------------------

def forward_sums(model: Llama, variables: dict, batch: Batch) -> tuple[Array, Array]:
    """`cross_entropy_sums` of the model's logits on `batch`."""
    logits = model.apply(variables, batch["tokens"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"))  # [batch, seq, vocab] float32
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])


def reference_variables(frozen: Any) -> dict | None:
    """The flax variables of the reference model: the frozen params alone (the base with its
    adapters off under LoRA; the starting checkpoint in full fine-tuning)."""
    return None if frozen is None else {"params": frozen}


def check_batch(batch: Batch, mesh: jax.sharding.Mesh, rules: Rules, micro_batches: int,
                required: tuple[str, ...] = REQUIRED_BATCH_KEYS) -> None:
    """ConfigError unless `batch` has the `required` keys and a size the mesh and accumulation
    can split; runs on the host before jit's own sharding check, so the message says the fix."""
    missing = [key for key in required if key not in batch]
    if missing:
        optional = [key for key in ("positions", "segment_ids") if key not in required]
        raise ConfigError(f"batch is missing {missing}; expected keys {required}"
                          + (f" (+ optional {', '.join(optional)})" if optional else "")
                          + ("; preference batches come from a loader built with preference=True"
                             if "segment_ids" in required else ""))
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

def loss_and_grads(model: Llama, variables: Variables, objective: Objective, trainable: Any, frozen: Any,
                   batch: Batch, micro_batches: int, mesh: jax.sharding.Mesh,
                   rules: Rules) -> tuple[dict, Any]:
    """(metrics, grads w.r.t. `trainable`) of the objective's batch mean, accumulating over
    micro-batches; `frozen` (LoRA base or DPO reference) gets no gradient. metrics: the
    objective's (`metrics(sums, count)`), e.g. loss, z_loss, scored_tokens for cross-entropy."""
    reference = reference_variables(frozen) if objective.needs_reference_model else None

    def loss_fn(trainable, batch, normalizer):
        sums = objective.sums(model, variables(trainable, frozen), reference, batch)
        return sums["loss"] / normalizer, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    count = objective.count(batch)
    # Every micro-batch divides by the count (tokens, pairs) of the *whole* batch, so the summed
    # gradients equal the gradient of the whole-batch mean exactly.
    normalizer = jnp.maximum(count, 1.0)
    if micro_batches == 1:
        (_, sums), grads = grad_fn(trainable, batch, normalizer)
    else:
        def accumulate(carry, micro_batch):
            (_, sums), grads = grad_fn(trainable, micro_batch, normalizer)
            return jax.tree.map(jnp.add, carry, (sums, grads)), None

        micro = _split_micro_batches(batch, micro_batches, mesh, rules)
        first = jax.tree.map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda: grad_fn(trainable, first, normalizer)[0][1])
        zeros = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
                 jax.tree.map(jnp.zeros_like, trainable))
        (sums, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    return objective.metrics(sums, count), grads


def train_step(model: Llama, variables: Variables, objective: Objective,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, micro_batches: int,
               mesh: jax.sharding.Mesh, rules: Rules,
               state: TrainState, batch: Batch, frozen: Any, *,
               fused_update: Callable | None = None) -> tuple[TrainState, dict]:
    """One optimizer update. Metrics (replicated scalars): the objective's (cross-entropy: loss,
    z_loss, scored_tokens), grad_norm (before clipping), learning_rate (of this update), finite. When the loss or
    gradients are not finite the state is returned unchanged (step included) and finite is
    False, so no NaN ever reaches params or a checkpoint; the host loop decides what to do.
    `fused_update` (`llamax.train.optim.cpu_adamw_update`), where given and applicable, replaces
    `optimizer.update` + `optax.apply_updates` with the same update in one pass."""
    metrics, grads = loss_and_grads(model, variables, objective, state.params, frozen, batch,
                                    micro_batches, mesh, rules)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    for value in metrics.values():
        finite = finite & jnp.all(jnp.isfinite(value))

    def update(state: TrainState) -> TrainState:
        fused = fused_update(grads, state.opt_state, state.params, grad_norm) if fused_update else None
        if fused is None:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        else:
            params, opt_state = fused
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=next_rng(state.rng))

    # A branch, not a select of new and old: XLA fuses the update into fewer passes over the
    # params and moments without the select (bench preset on CPU: 125 -> 75 ms per update,
    # 62 MiB less temp memory), and the skipped branch returns the donated state as it is.
    new_state = jax.lax.cond(finite, update, lambda state: state, state)
    metrics.update(grad_norm=grad_norm, finite=finite,
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
    return new_state, metrics


def eval_step(model: Llama, variables: Variables, objective: Objective, trainable: Any, batch: Batch,
              frozen: Any) -> dict:
    """The objective's evaluation sums of one batch (cross-entropy: {'loss_sum', 'scored_tokens'};
    perplexity = exp(sum loss_sum / sum tokens) over batches, see `llamax.infer.evaluate`)."""
    reference = reference_variables(frozen) if objective.needs_reference_model else None
    return objective.eval_sums(model, variables(trainable, frozen), reference, batch)


def next_rng(rng: Array) -> Array:
    """Advances the state's key data; a future dropout would draw from the pre-advance key."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), 0))
