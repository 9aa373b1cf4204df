"""The train setup: everything a run derives from its configs, derived once.

    setup = make_train_setup(model_config, optim_config, mesh, lora_config=None)
    state = setup.init(jax.random.key(seed))            # born sharded (jit with out_shardings)
    state, metrics = setup.train_step(state, batch)      # state donated
    sums = setup.eval_step(state.params, batch)

Data flow: configs -> mesh -> abstract params (one `jax.eval_shape`) -> param shardings ->
what is trained (`Trainable`) -> abstract TrainState + its shardings -> jitted init and steps.

What is trained is decided here, in one branch (`make_trainable`): full training trains the
model params; with a `LoraConfig` it trains LoRA adapters, so the optimizer state, checkpoints
and donation cover only them, and every step takes the frozen base params as one more,
non-donated argument: `train_step(state, batch, base_params)`.

What is differentiated is the `objective` (`llamax.train.objectives`): cross-entropy by default,
or DPO. DPO with a reference model reads it through the same frozen argument: under LoRA the base
with adapters off (no second copy), in full fine-tuning a frozen copy of the starting params,
held sharded like the params and never donated: `train_step(state, batch, reference_params)`.

The `make_*` functions at the bottom are the same pieces one at a time, for tests, benchmarks
and ahead-of-time inspection; a run builds one `TrainSetup` and passes it down.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llamax.config import ModelConfig
from llamax.errors import ConfigError
from llamax.model import lora, quantize
from llamax.model.llama import Llama, abstract_params
from llamax.model.cpu_attention import attention_kernel
from llamax.model.matmul import flat_matmuls_for, runs_on_one_cpu_device
from llamax.sharding import (LOGICAL_AXIS_RULES, Rules, batch_sharding, check_heads_divisible,
                             replicated, tree_shardings)
from llamax.train import step as steps
from llamax.train.objectives import DPO, CrossEntropy, Objective, check_objective
from llamax.train.optim import OptimConfig, cpu_adamw_update, learning_rate_schedule, make_optimizer
from llamax.train.step import TrainState

Array = jax.Array
Mesh = jax.sharding.Mesh


@dataclasses.dataclass(frozen=True)
class Trainable:
    """What the optimizer updates, and how a forward pass sees it.

    init: key -> fresh trained values (the model params, or LoRA adapters with B = 0).
    shardings: NamedSharding of every trained leaf.
    variables: (trained, frozen) -> the flax variables of a forward pass.
    frozen_shardings: shardings of the frozen params (the LoRA base, or a full fine-tuning run's
        DPO reference, or the int8 scales of a quantized evaluation); None when nothing is frozen.
    trains_model_params: the trained values are the model params (full training), so a run
        that starts from a checkpoint starts them from it; False: LoRA adapters.
    """

    init: Callable[[Array], Any]
    shardings: Any
    variables: steps.Variables
    frozen_shardings: Any = None
    trains_model_params: bool = True


def _full_variables(params: Any, frozen: Any) -> dict:
    return {"params": params}


def _model_params(model_config: ModelConfig, key: Array) -> Any:
    return nn.meta.unbox(Llama(model_config).init(key, jnp.zeros((1, 1), jnp.int32))["params"])


def make_trainable(model_config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES,
                   lora_config: lora.LoraConfig | None = None, reference: bool = False,
                   quantized: bool = False) -> Trainable:
    """The one branch between full training and LoRA. `reference`: the objective reads a frozen
    reference model (DPO); full training then holds one, LoRA uses its base. `quantized`: the
    params are int8 kernels (`llamax.model.quantize`) and the frozen argument is their scales,
    replicated (a few KB per layer); for evaluation only."""
    check_heads_divisible(model_config, mesh, rules)
    param_shardings = tree_shardings(*abstract_params(model_config), mesh, rules)
    if quantized:
        if lora_config is not None or reference:
            raise ConfigError("an int8 (quantized) evaluation takes neither LoRA adapters nor a DPO reference")
        return Trainable(init=functools.partial(_model_params, model_config), shardings=param_shardings,
                         variables=quantize.model_variables, frozen_shardings=replicated(mesh))
    if lora_config is None:
        return Trainable(init=functools.partial(_model_params, model_config),
                         shardings=param_shardings, variables=_full_variables,
                         frozen_shardings=param_shardings if reference else None)
    adapter_shardings = tree_shardings(lora.abstract_adapters(model_config, lora_config),
                                       lora.adapter_logical_axes(model_config, lora_config), mesh, rules)
    return Trainable(init=functools.partial(lora.init_adapters, model_config, lora_config),
                     shardings=adapter_shardings,
                     variables=functools.partial(lora.model_variables, lora=lora_config),
                     frozen_shardings=param_shardings, trains_model_params=False)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """A run's derived pieces: built once by `make_train_setup`, then passed down."""

    model_config: ModelConfig
    optim_config: OptimConfig
    mesh: Mesh
    rules: Rules
    trainable: Trainable
    objective: Objective
    optimizer: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (a restore target)
    state_shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    init: Callable[[Array], TrainState]  # jitted key -> TrainState, born sharded
    train_step: Callable  # (state, batch[, frozen]) -> (state, metrics); state donated
    eval_step: Callable  # (trained params, batch[, frozen]) -> the objective's eval sums
    loss_and_grads: Callable  # (trained params, batch[, frozen]) -> (metrics, grads)
    lora_config: lora.LoraConfig | None = None  # the run's adapters (trainable = them), or None

    @property
    def frozen_shardings(self) -> Any:
        """Shardings of the frozen params (LoRA base or DPO reference), else None."""
        return self.trainable.frozen_shardings


def _initial_state(init: Callable[[Array], Any], optimizer: optax.GradientTransformation,
                   key: Array) -> TrainState:
    # The trained values come from `key` itself, so they equal `init_params(config, key)` (or
    # `init_adapters(config, lora_config, key)`).
    params = init(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))


def make_train_setup(model_config: ModelConfig, optim_config: OptimConfig, mesh: Mesh,
                     rules: Rules = LOGICAL_AXIS_RULES,
                     lora_config: lora.LoraConfig | None = None,
                     objective: Objective | None = None, quantized: bool = False) -> TrainSetup:
    """Derives the abstract state, every sharding and the jitted init and steps of a run once.

    `objective`: what the steps differentiate (default: `CrossEntropy` with the optim config's
    z_loss_weight; `objectives.DPO()` for preference data). `quantized`: int8 params with their
    scales as the frozen argument (`make_trainable`); only `eval_step` applies."""
    rules = tuple(tuple(rule) for rule in rules)
    objective = _objective(objective, optim_config)
    trainable = make_trainable(model_config, mesh, rules, lora_config, objective.needs_reference_model,
                               quantized)
    optimizer = make_optimizer(optim_config)
    abstract = jax.eval_shape(functools.partial(_initial_state, trainable.init, optimizer), jax.random.key(0))
    is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)  # noqa: E731
    opt_shardings = optax.tree_map_params(  # Adam moments follow their param; counts replicated
        optimizer, lambda _, sharding: sharding, abstract.opt_state, trainable.shardings,
        transform_non_params=lambda _: replicated(mesh), is_leaf=is_sharding)
    shardings = TrainState(step=replicated(mesh), params=trainable.shardings, opt_state=opt_shardings,
                           rng=replicated(mesh))
    abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                        sharding=sharding),
                            abstract, shardings)
    model = Llama(model_config)
    micro = optim_config.grad_accum_steps
    data = batch_sharding(mesh, rules)

    one_cpu_device = runs_on_one_cpu_device(mesh)  # where the C++ CPU kernels may run

    def in_context(fn: Callable) -> Callable:
        """`fn` traced under the mesh and the logical-axis rules (its constraints resolve), with
        projections in the form the mesh's devices run best (`llamax.model.matmul`)."""
        def traced(*args):
            with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules),
                  flat_matmuls_for(mesh),  # the mesh's devices, not jax's default: AOT builds for a TPU
                  attention_kernel(one_cpu_device)):
                return fn(*args)
        return traced

    train_fn = in_context(functools.partial(
        steps.train_step, model, trainable.variables, objective, optimizer,
        learning_rate_schedule(optim_config), micro, mesh, rules,
        fused_update=cpu_adamw_update(optim_config) if one_cpu_device else None))
    eval_fn = in_context(functools.partial(steps.eval_step, model, trainable.variables, objective))
    grads_fn = in_context(lambda trained, batch, frozen: steps.loss_and_grads(
        model, trainable.variables, objective, trained, frozen, batch, micro, mesh, rules))
    jit = functools.partial(_jit_step, mesh=mesh, rules=rules, frozen_shardings=trainable.frozen_shardings,
                            batch_keys=objective.batch_keys)
    return TrainSetup(
        model_config=model_config, optim_config=optim_config, mesh=mesh, rules=rules,
        trainable=trainable, objective=objective, optimizer=optimizer, abstract_state=abstract, state_shardings=shardings,
        batch_sharding=data,
        init=jax.jit(functools.partial(_initial_state, trainable.init, optimizer), out_shardings=shardings),
        train_step=jit("train_step", train_fn, (shardings, data), (shardings, replicated(mesh)), micro,
                       donate=(0,)),
        eval_step=jit("eval_step", eval_fn, (trainable.shardings, data), replicated(mesh), 1),
        loss_and_grads=jit("loss_and_grads", grads_fn, (trainable.shardings, data),
                           (replicated(mesh), trainable.shardings), micro),
        lora_config=lora_config)


def _objective(objective: Objective | None, optim_config: OptimConfig) -> Objective:
    """The objective a setup differentiates; z_loss_weight belongs to cross-entropy alone."""
    if objective is None:
        return CrossEntropy(optim_config.z_loss_weight)
    check_objective(objective)
    if isinstance(objective, DPO) and optim_config.z_loss_weight:
        raise ConfigError(f"OptimConfig.z_loss_weight={optim_config.z_loss_weight} applies to the "
                          "cross-entropy objective; DPO has no z-loss: set it to 0")
    return objective


def _jit_step(name: str, fn: Callable, in_shardings: tuple, out_shardings: Any, micro_batches: int, *,
              mesh: Mesh, rules: Rules, frozen_shardings: Any, batch_keys: tuple[str, ...],
              donate: tuple[int, ...] = ()) -> Callable:
    """jit of `fn(x, batch, frozen)` behind host-side checks, which run before jit's own sharding
    check so a bad batch gets a ConfigError that says how to fix it.

    Full training compiles `(x, batch)` with frozen=None (so `.jitted.lower(state, batch)` works);
    LoRA adds the frozen base params as a third, non-donated argument. `.jitted` is the jitted
    function, for ahead-of-time lowering and compilation. `name` names the program in profiles
    and HLO dumps (`jit_train_step`).
    """
    def step(*args):
        return fn(*args) if frozen_shardings is not None else fn(*args, None)

    step.__name__ = step.__qualname__ = name
    step_shardings = in_shardings if frozen_shardings is None else (*in_shardings, frozen_shardings)
    jitted = jax.jit(step, in_shardings=step_shardings, out_shardings=out_shardings, donate_argnums=donate)

    def call(first: Any, batch: steps.Batch, frozen: Any = None):
        steps.check_batch(batch, mesh, rules, micro_batches, batch_keys)
        if frozen_shardings is None:
            if frozen is not None:
                raise ConfigError("frozen params were passed to a step built without lora_config "
                                  "or a DPO reference model; full training trains every param, so "
                                  "pass only (state, batch)")
            return jitted(first, batch)
        if frozen is None:
            raise ConfigError("this step needs the frozen base params (LoRA) or reference params "
                              "(DPO): call step(state_or_adapters, batch, frozen_params)")
        return jitted(first, batch, frozen)

    call.jitted = jitted
    return call


# ---- the same pieces one at a time --------------------------------------------------------

def _as_key(rng: Array | int) -> Array:
    if isinstance(rng, int):
        return jax.random.key(rng)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(rng)
    return rng


def abstract_train_state(model_config: ModelConfig, optim_config: OptimConfig,
                         lora_config: lora.LoraConfig | None = None) -> TrainState:
    """TrainState of ShapeDtypeStructs without shardings (no arrays made, no mesh needed)."""
    optimizer = make_optimizer(optim_config)
    init = (functools.partial(_model_params, model_config) if lora_config is None
            else functools.partial(lora.init_adapters, model_config, lora_config))
    return jax.eval_shape(functools.partial(_initial_state, init, optimizer), jax.random.key(0))


def state_shardings(model_config: ModelConfig, optim_config: OptimConfig, mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES, lora_config: lora.LoraConfig | None = None) -> TrainState:
    """NamedSharding of every TrainState leaf: Adam moments follow their param, scalars
    (step, counts, rng) are replicated."""
    return make_train_setup(model_config, optim_config, mesh, rules, lora_config).state_shardings


def trainable_shardings(model_config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES,
                        lora_config: lora.LoraConfig | None = None) -> Any:
    """Shardings of the trained pytree: the params, or the LoRA adapters."""
    return make_trainable(model_config, mesh, rules, lora_config).shardings


def make_init(model_config: ModelConfig, optim_config: OptimConfig, mesh: Mesh,
              rules: Rules = LOGICAL_AXIS_RULES, lora_config: lora.LoraConfig | None = None) -> Callable:
    """The jitted `init(key) -> TrainState` (for `make_init(...).lower(key).compile()`)."""
    return make_train_setup(model_config, optim_config, mesh, rules, lora_config).init


def init_train_state(model_config: ModelConfig, optim_config: OptimConfig, mesh: Mesh,
                     rules: Rules = LOGICAL_AXIS_RULES, rng: Array | int = 0,
                     lora_config: lora.LoraConfig | None = None) -> TrainState:
    """A fresh TrainState created directly in its sharded layout (the full params never exist on
    one device). `rng`: int seed, typed PRNG key, or uint32 key data. With `lora_config` the
    state trains fresh adapters (B = 0); the base params are passed to each step instead."""
    return make_init(model_config, optim_config, mesh, rules, lora_config)(_as_key(rng))


def make_train_step(model_config: ModelConfig, optim_config: OptimConfig, mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES, lora_config: lora.LoraConfig | None = None) -> Callable:
    """Jitted `train_step(state, batch) -> (state, metrics)` (LoRA: `(state, batch, base_params)`);
    see `llamax.train.step.train_step` for the metrics. The batch size must be a multiple of
    grad_accum_steps * data-parallel size (ConfigError). `.jitted` for `.lower(...)`."""
    return make_train_setup(model_config, optim_config, mesh, rules, lora_config).train_step


def make_eval_step(model_config: ModelConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES,
                   lora_config: lora.LoraConfig | None = None, quantized: bool = False) -> Callable:
    """Jitted `eval_step(params, batch) -> {'loss_sum', 'scored_tokens'}` (LoRA:
    `(adapters, batch, base_params)`; quantized: `(int8 params, batch, scales)`); sum both over
    batches for perplexity."""
    return make_train_setup(model_config, OptimConfig(), mesh, rules, lora_config, quantized=quantized).eval_step


def make_loss_and_grads(model_config: ModelConfig, optim_config: OptimConfig, mesh: Mesh,
                        rules: Rules = LOGICAL_AXIS_RULES,
                        lora_config: lora.LoraConfig | None = None) -> Callable:
    """Jitted `loss_and_grads(params, batch) -> (metrics, grads)`: the gradient half of the train
    step (same accumulation and loss), for tests and gradient checks. LoRA:
    `(adapters, batch, base_params)`, grads w.r.t. the adapters."""
    return make_train_setup(model_config, optim_config, mesh, rules, lora_config).loss_and_grads
