"""The training recipe: AdamW, warmup + decay schedule, global-norm clipping, decay mask.

`OptimConfig` also carries the two knobs the train step reads (`grad_accum_steps`,
`z_loss_weight`) so one frozen dataclass describes the whole optimisation recipe.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llamax.dtypes import float_dtype_name
from llamax.errors import ConfigError, check_field_types, check_int
from llamax.model import cpu_kernels
from llamax.tree_paths import path_names

DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine/linear/constant decay.

    learning_rate: peak learning rate, reached at `warmup_steps`.
    warmup_steps: linear warmup from 0 (step 0 has learning rate 0, as in optax).
    decay: after warmup, 'cosine' or 'linear' to `min_lr_ratio * learning_rate` at `total_steps`
        (and held there afterwards), or 'constant' at the peak.
    b1, b2, eps: Adam moments. b2=0.95 is the LLaMA recipe.
    weight_decay: decoupled weight decay, scaled by the learning rate (optax/PyTorch AdamW). Norm
        weights are never decayed (common practice).
    no_decay_on_embeddings: also exclude the token embedding table from weight decay (the untied
        `lm_head` is always decayed).
    clip_norm: clip gradients to this global L2 norm; 0 or None disables clipping.
    grad_accum_steps: the train step splits each batch into this many micro-batches and sums
        their gradients; the update equals one step on the whole batch (up to float rounding).
    z_loss_weight: weight of the PaLM z-loss `logsumexp(logits)^2` added to the training loss.
    opt_state_dtype: dtype of Adam's first moment (optax `mu_dtype`); the second moment stays in
        the param dtype, since bf16 squares of small gradients lose too much precision.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    total_steps: int = 10_000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay_on_embeddings: bool = False
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    z_loss_weight: float = 0.0
    opt_state_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "opt_state_dtype",
                           float_dtype_name(self.opt_state_dtype, "OptimConfig.opt_state_dtype"))
        check_field_types(self)
        if not self.learning_rate >= 0:
            raise ConfigError(f"OptimConfig.learning_rate must be >= 0, got {self.learning_rate}")
        if self.decay not in DECAYS:
            raise ConfigError(f"OptimConfig.decay={self.decay!r}; expected one of {DECAYS}")
        for name in ("warmup_steps", "total_steps"):
            check_int(getattr(self, name), f"OptimConfig.{name}", 0)
        if self.decay != "constant" and self.total_steps <= self.warmup_steps:
            raise ConfigError(
                f"OptimConfig.total_steps={self.total_steps} must exceed warmup_steps="
                f"{self.warmup_steps} for decay={self.decay!r}; raise total_steps or use "
                "decay='constant'")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ConfigError(f"OptimConfig b1={self.b1}, b2={self.b2} must lie in [0, 1)")
        if self.weight_decay < 0 or self.eps < 0 or self.z_loss_weight < 0:
            raise ConfigError(
                f"weight_decay={self.weight_decay}, eps={self.eps} and z_loss_weight="
                f"{self.z_loss_weight} must all be >= 0")
        if self.clip_norm is not None and self.clip_norm < 0:
            raise ConfigError(f"OptimConfig.clip_norm must be > 0, or 0/None to disable; got {self.clip_norm}")
        check_int(self.grad_accum_steps, "OptimConfig.grad_accum_steps", 1)

    def replace(self, **changes: Any) -> "OptimConfig":
        return dataclasses.replace(self, **changes)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step -> learning rate; the train step logs `schedule(state.step)`, the rate of that update."""
    peak = cfg.learning_rate
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _is_norm(path: tuple[str, ...]) -> bool:
    return any("norm" in key for key in path)  # input_layernorm, post_attention_layernorm, norm


def _is_embedding(path: tuple[str, ...]) -> bool:
    return "embed_tokens" in path


def weight_decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """Pytree of bools like `params`: True where weight decay applies (see OptimConfig)."""

    def decays(path, _) -> bool:
        keys = path_names(path)
        if _is_norm(keys):
            return False
        return not (cfg.no_decay_on_embeddings and _is_embedding(keys))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (unless disabled) followed by masked AdamW on the schedule."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        mu_dtype=jnp.dtype(cfg.opt_state_dtype), weight_decay=cfg.weight_decay,
        mask=lambda params: weight_decay_mask(params, cfg))
    # Always a 2-chain, so the optimizer state has one structure whether or not clipping is on.
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    return optax.chain(clip, adamw)


ADAMW_KERNEL = "llamax_adamw"  # the FFI target (llamax/model/adamw.cc)


def cpu_adamw_update(cfg: OptimConfig) -> Callable[..., tuple[Any, Any] | None]:
    """`make_optimizer(cfg)`'s update followed by `optax.apply_updates`, one pass per parameter
    array by a C++ custom call that updates params and moments in place (`adamw.cc`), for
    programs on one CPU device. The returned function maps (grads, opt_state, params[, the grads'
    global norm, if the caller has it]) to (params, opt_state) of the same structure as optax's,
    or to None where it does not apply (params, gradients or moments not float32, the kernels
    unavailable or `LLAMAX_TRAIN_KERNELS=0`): the caller then runs optax. Bench preset on an Intel Xeon: 70 -> 42 ms per update."""
    schedule = learning_rate_schedule(cfg)

    def update(grads: Any, opt_state: Any, params: Any, grad_norm: Any = None) -> tuple[Any, Any] | None:
        adam, masked, scheduled = opt_state[1]
        arrays = jax.tree.leaves((grads, adam.mu, adam.nu, params))
        if any(leaf.dtype != jnp.float32 for leaf in arrays) or not cpu_kernels.train_kernels_available():
            return None
        count = optax.safe_increment(adam.count)
        # optax's scalars: bias corrections of the incremented count, the schedule's step at the
        # old one, the global norm that clipping compares
        norm = optax.global_norm(grads) if grad_norm is None else grad_norm
        scalars = jnp.stack([-schedule(scheduled.count), 1 - cfg.b1 ** count, 1 - cfg.b2 ** count,
                             norm]).astype(jnp.float32)

        def one(param, grad, mu, nu, decays):
            shape = jax.ShapeDtypeStruct(param.shape, jnp.float32)
            return jax.ffi.ffi_call(ADAMW_KERNEL, (shape, shape, shape), input_output_aliases={0: 0, 2: 1, 3: 2})(
                param, grad, mu, nu, scalars, b1=np.float32(cfg.b1), b2=np.float32(cfg.b2), eps=np.float32(cfg.eps),
                decay=np.float32(cfg.weight_decay if decays else 0.0), clip=np.float32(cfg.clip_norm or 0.0))

        treedef = jax.tree.structure(params)
        results = [one(*leaves) for leaves in zip(jax.tree.leaves(params), treedef.flatten_up_to(grads),
                                                  treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu),
                                                  jax.tree.leaves(weight_decay_mask(params, cfg)))]
        new_params, mu, nu = (treedef.unflatten(parts) for parts in zip(*results)) if results else (params,) * 3
        adam = adam._replace(count=count, mu=mu, nu=nu)
        return new_params, (opt_state[0], (adam, masked, scheduled._replace(count=optax.safe_increment(scheduled.count))))

    return update
