"""The training core as pure functions: TrainState, sharded init, train step, eval step, FLOPs.

Data flow: config -> mesh -> `abstract_train_state` (jax.eval_shape) -> `state_shardings` ->
`init_train_state` (jit with out_shardings: params are born sharded) -> `make_train_step`.

A batch is a dict of global [batch, seq] arrays: `tokens`, `targets` (int32), `loss_mask`
(float32, 1 where the target is scored) and optionally `positions`, `segment_ids` (int32,
0 = padding). Numpy arrays work on one host; with several processes build global arrays first
with `llamax.sharding.to_global_batch`.
The loss is token cross-entropy weighted by `loss_mask`, divided by the number of scored tokens;
`loss_mask` already covers padding, document ends and SFT prompt tokens.

What is trained: every function takes an optional `lora_config`. Without it (full training) the
state's params are the model params. With it, the state's params are the LoRA adapters (so the
optimizer state, checkpoints and donation cover only them) and the steps take the frozen base
params as one more, non-donated argument: `train_step(state, batch, base_params)`. One step
function serves both: it differentiates `trainable` and builds the forward's variables with
`llamax.model.lora.model_variables(trainable, frozen, lora_config)`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llamax.config import ModelConfig
from llamax.errors import ConfigError
from llamax.model.lora import LoraConfig, adapter_shardings, init_adapters, model_variables
from llamax.model.llama import Llama
from llamax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from llamax.sharding import (LOGICAL_AXIS_RULES, Rules, batch_sharding, check_batch_size,
                             data_parallel_size, param_shardings, replicated)

Array = jax.Array
Batch = dict[str, Array]
REQUIRED_BATCH_KEYS = ("tokens", "targets", "loss_mask")


@flax.struct.dataclass
class TrainState:
    """Everything a training run checkpoints. All leaves are plain arrays."""

    step: Array  # [] int32: number of updates applied so far
    params: Any  # the trained params: like `init_params` (fp32 master weights), or LoRA adapters
    opt_state: Any  # optax state; moments shaped and sharded like params
    rng: Array  # [2] uint32 (threefry) key data (jax.random.key_data); wrap with jax.random.wrap_key_data


def _init_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                key: Array, lora_config: LoraConfig | None = None) -> TrainState:
    # Params come from `key` itself, so they equal `init_params(config, key)` (or
    # `init_adapters(config, lora_config, key)`).
    if lora_config is None:
        variables = Llama(model_config).init(key, jnp.zeros((1, 1), jnp.int32))
        params = nn.meta.unbox(variables["params"])
    else:
        params = init_adapters(model_config, lora_config, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))


def _as_key(rng: Array | int) -> Array:
    if isinstance(rng, int):
        return jax.random.key(rng)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(rng)
    return rng


def abstract_train_state(model_config: ModelConfig, optim_config: OptimConfig,
                         lora_config: LoraConfig | None = None) -> TrainState:
    """TrainState of ShapeDtypeStructs (no arrays made); e.g. the target of a checkpoint restore."""
    optimizer = make_optimizer(optim_config)
    return jax.eval_shape(lambda key: _init_state(model_config, optimizer, key, lora_config),
                          jax.random.key(0))


def trainable_shardings(model_config: ModelConfig, mesh: jax.sharding.Mesh,
                        rules: Rules = LOGICAL_AXIS_RULES,
                        lora_config: LoraConfig | None = None) -> Any:
    """Shardings of the trained pytree: the params, or the LoRA adapters."""
    if lora_config is None:
        return param_shardings(model_config, mesh, rules)
    return adapter_shardings(model_config, lora_config, mesh, rules)


def state_shardings(model_config: ModelConfig, optim_config: OptimConfig, mesh: jax.sharding.Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES,
                    lora_config: LoraConfig | None = None) -> TrainState:
    """NamedSharding of every TrainState leaf: Adam moments follow their param, scalars
    (step, counts, rng) are replicated."""
    abstract = abstract_train_state(model_config, optim_config, lora_config)
    params = trainable_shardings(model_config, mesh, rules, lora_config)
    is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)  # noqa: E731
    opt_state = optax.tree_map_params(
        make_optimizer(optim_config), lambda _, sharding: sharding, abstract.opt_state, params,
        transform_non_params=lambda _: replicated(mesh), is_leaf=is_sharding)
    return TrainState(step=replicated(mesh), params=params, opt_state=opt_state,
                      rng=replicated(mesh))


def init_train_state(model_config: ModelConfig, optim_config: OptimConfig, mesh: jax.sharding.Mesh,
                     rules: Rules = LOGICAL_AXIS_RULES, rng: Array | int = 0,
                     lora_config: LoraConfig | None = None) -> TrainState:
    """A fresh TrainState created directly in its sharded layout (the full params never exist on
    one device). `rng`: int seed, typed PRNG key, or uint32 key data. With `lora_config` the
    state trains fresh adapters (B = 0); the base params are passed to each step instead."""
    return make_init(model_config, optim_config, mesh, rules, lora_config)(_as_key(rng))


def make_init(model_config: ModelConfig, optim_config: OptimConfig, mesh: jax.sharding.Mesh,
              rules: Rules = LOGICAL_AXIS_RULES, lora_config: LoraConfig | None = None) -> Callable:
    """The jitted `init(key) -> TrainState` behind `init_train_state`, for ahead-of-time
    inspection (`make_init(...).lower(key).compile().memory_analysis()`)."""
    optimizer = make_optimizer(optim_config)
    shardings = state_shardings(model_config, optim_config, mesh, rules, lora_config)
    return jax.jit(lambda key: _init_state(model_config, optimizer, key, lora_config),
                   out_shardings=shardings)


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


def _forward_sums(model: Llama, variables: dict, batch: Batch) -> tuple[Array, Array]:
    logits = model.apply(variables, batch["tokens"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"))  # [batch, seq, vocab] float32
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])


def _check_batch(batch: Batch, mesh: jax.sharding.Mesh, rules: Rules, micro_batches: int) -> None:
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


# ---- train / eval steps -------------------------------------------------------------------

def _loss_and_grads(model: Llama, params: Any, frozen: Any, lora_config: LoraConfig | None,
                    batch: Batch, micro_batches: int, z_weight: float,
                    mesh: jax.sharding.Mesh, rules: Rules) -> tuple[dict, Any]:
    """(metrics, grads w.r.t. the trained `params`) of the batch-mean loss, accumulating over
    micro-batches; `frozen` (LoRA base params) gets no gradient. Traced under the mesh and rules
    contexts."""

    def objective(params, batch, num_scored):
        variables = model_variables(params, frozen, lora_config)
        cross_entropy_sum, z_sum = _forward_sums(model, variables, batch)
        return (cross_entropy_sum + z_weight * z_sum) / num_scored, (cross_entropy_sum, z_sum)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    scored_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    # Every micro-batch divides by the token count of the *whole* batch, so the summed
    # gradients equal the gradient of the whole-batch mean exactly.
    num_scored = jnp.maximum(scored_tokens, 1.0)
    if micro_batches == 1:
        (_, (cross_entropy_sum, z_sum)), grads = grad_fn(params, batch, num_scored)
    else:
        def accumulate(carry, micro_batch):
            (_, sums), grads = grad_fn(params, micro_batch, num_scored)
            return jax.tree.map(jnp.add, carry, (sums, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(())), jax.tree.map(jnp.zeros_like, params)
        micro = _split_micro_batches(batch, micro_batches, mesh, rules)
        ((cross_entropy_sum, z_sum), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    metrics = dict(loss=cross_entropy_sum / num_scored, z_loss=z_sum / num_scored,
                   scored_tokens=scored_tokens)
    return metrics, grads


def _jit(fn: Callable, in_shardings: tuple, out_shardings: Any, frozen_shardings: Any,
         donate_argnums: tuple[int, ...] = ()) -> Callable:
    """jit of `fn(x, batch, frozen)`. Full training compiles `(x, batch)` with frozen=None (so
    `.lower(state, batch)` keeps working); LoRA adds the frozen base params as a third,
    non-donated argument."""
    if frozen_shardings is None:
        return jax.jit(lambda x, batch: fn(x, batch, None), in_shardings=in_shardings,
                       out_shardings=out_shardings, donate_argnums=donate_argnums)
    return jax.jit(fn, in_shardings=(*in_shardings, frozen_shardings),
                   out_shardings=out_shardings, donate_argnums=donate_argnums)


def _checked(jitted: Callable, mesh: jax.sharding.Mesh, rules: Rules, micro_batches: int,
             lora_config: LoraConfig | None = None) -> Callable:
    """Wraps a jitted (x, batch[, frozen]) function with host-side checks, which must run before
    jit's own sharding check so a bad batch size gets a ConfigError that says how to fix it."""

    def call(first: Any, batch: Batch, frozen: Any = None):
        _check_batch(batch, mesh, rules, micro_batches)
        if lora_config is None:
            if frozen is not None:
                raise ConfigError("frozen params were passed to a step built without lora_config; "
                                  "full training trains every param, so pass only (state, batch)")
            return jitted(first, batch)
        if frozen is None:
            raise ConfigError("a LoRA step needs the frozen base params: call "
                              "step(state_or_adapters, batch, base_params)")
        return jitted(first, batch, frozen)

    call.jitted = jitted  # for .lower(...) / ahead-of-time compilation
    call.__doc__ = jitted.__doc__
    return call


def _frozen_shardings(model_config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules,
                      lora_config: LoraConfig | None) -> Any:
    return None if lora_config is None else param_shardings(model_config, mesh, rules)


def make_loss_and_grads(model_config: ModelConfig, optim_config: OptimConfig,
                        mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_AXIS_RULES,
                        lora_config: LoraConfig | None = None
                        ) -> Callable[..., tuple[dict, Any]]:
    """Returns jitted `loss_and_grads(params, batch) -> (metrics, grads)`: the gradient half of
    the train step (same accumulation and loss), for tests, gradient checks and debugging.
    metrics: loss, z_loss, scored_tokens; grads are sharded like params. With `lora_config`:
    `loss_and_grads(adapters, batch, base_params)`, grads w.r.t. the adapters."""
    model = Llama(model_config)

    def loss_and_grads(params: Any, batch: Batch, frozen: Any) -> tuple[dict, Any]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return _loss_and_grads(model, params, frozen, lora_config, batch,
                                   optim_config.grad_accum_steps, optim_config.z_loss_weight,
                                   mesh, rules)

    shardings = trainable_shardings(model_config, mesh, rules, lora_config)
    jitted = _jit(loss_and_grads, (shardings, batch_sharding(mesh, rules)),
                  (replicated(mesh), shardings),
                  _frozen_shardings(model_config, mesh, rules, lora_config))
    return _checked(jitted, mesh, rules, optim_config.grad_accum_steps, lora_config)


def make_train_step(model_config: ModelConfig, optim_config: OptimConfig, mesh: jax.sharding.Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES, lora_config: LoraConfig | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """Returns jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

    With `lora_config`: `train_step(state, batch, base_params)`; the state holds the adapters
    and their optimizer state, `base_params` (any float dtype, e.g. bf16) are read, never
    updated and never donated.

    Metrics (replicated scalars): loss (mean cross-entropy over scored tokens), z_loss (mean
    logsumexp^2; the objective adds z_loss_weight * z_loss), grad_norm (before clipping),
    learning_rate (of this update), scored_tokens, finite (bool). When the loss or gradients are
    not finite the state is returned unchanged (step included) and finite is False, so no NaN
    ever reaches params or a checkpoint; the host loop decides whether to stop.
    The batch size must be a multiple of grad_accum_steps * data-parallel size (ConfigError).
    `train_step.jitted` is the underlying jitted function (for `.lower(...)`).
    """
    model = Llama(model_config)
    optimizer = make_optimizer(optim_config)
    schedule = learning_rate_schedule(optim_config)

    def train_step(state: TrainState, batch: Batch, frozen: Any) -> tuple[TrainState, dict]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            metrics, grads = _loss_and_grads(model, state.params, frozen, lora_config, batch,
                                             optim_config.grad_accum_steps,
                                             optim_config.z_loss_weight, mesh, rules)
            grad_norm = optax.global_norm(grads)
            finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["z_loss"])
                      & jnp.isfinite(grad_norm))
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            updated = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 opt_state=opt_state, rng=_next_rng(state.rng))
            # Select, not lax.cond: both branches are cheap next to the step, and select keeps
            # donation and sharding simple.
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        metrics.update(grad_norm=grad_norm, finite=finite,
                       learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
        return new_state, metrics

    shardings = state_shardings(model_config, optim_config, mesh, rules, lora_config)
    jitted = _jit(train_step, (shardings, batch_sharding(mesh, rules)),
                  (shardings, replicated(mesh)),
                  _frozen_shardings(model_config, mesh, rules, lora_config), donate_argnums=(0,))
    return _checked(jitted, mesh, rules, optim_config.grad_accum_steps, lora_config)


def _next_rng(rng: Array) -> Array:
    """Advances the state's key data; a future dropout would draw from the pre-advance key."""
    return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), 0))


def make_eval_step(model_config: ModelConfig, mesh: jax.sharding.Mesh,
                   rules: Rules = LOGICAL_AXIS_RULES, lora_config: LoraConfig | None = None
                   ) -> Callable[..., dict]:
    """Returns jitted `eval_step(params, batch) -> {'loss_sum', 'scored_tokens'}` (with
    `lora_config`: `eval_step(adapters, batch, base_params)`).

    Sum both over batches; perplexity = exp(total loss_sum / total scored_tokens)
    (`llamax.infer.evaluate` does this).
    """
    model = Llama(model_config)

    def eval_step(params: Any, batch: Batch, frozen: Any) -> dict:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            variables = model_variables(params, frozen, lora_config)
            cross_entropy_sum, _ = _forward_sums(model, variables, batch)
        return dict(loss_sum=cross_entropy_sum,
                    scored_tokens=jnp.sum(batch["loss_mask"].astype(jnp.float32)))

    jitted = _jit(eval_step, (trainable_shardings(model_config, mesh, rules, lora_config),
                              batch_sharding(mesh, rules)), replicated(mesh),
                  _frozen_shardings(model_config, mesh, rules, lora_config))
    return _checked(jitted, mesh, rules, 1, lora_config)
