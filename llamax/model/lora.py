"""LoRA (Hu et al. 2021): train a low-rank update `W + (alpha / rank) A B` of chosen kernels.

Adapters are a pytree shaped like the params but holding, for each targeted projection,
`lora_a` [(layers,) inputs..., rank] and `lora_b` [(layers,) rank, outputs...]:

    params['layers']['self_attn']['q_proj']['kernel']    [layers, embed, heads, head_dim]
    adapters['layers']['self_attn']['q_proj']['lora_a']  [layers, embed, rank]
    adapters['layers']['self_attn']['q_proj']['lora_b']  [layers, rank, heads, head_dim]

A keeps the kernel's input axes and B its output axes, with the same logical names, so adapters
shard like their kernel (the rank axis is never sharded). B starts at zero, so an untrained
adapter leaves the model unchanged. The model reads adapters from the `lora` variable collection
(`model_variables`); the train step differentiates only the adapters (`llamax.train.step`), and
`merge_lora` folds them into the kernels for export.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llamax.config import ModelConfig
from llamax.dtypes import float_dtype_name
from llamax.errors import CheckpointError, ConfigError, check_field_types, check_int
from llamax.model.llama import LORA_COLLECTION, abstract_params
from llamax.tree_paths import key_name, nest, path_names

Array = jax.Array
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LoraPath = tuple[str, ...]  # e.g. ('layers', 'self_attn', 'q_proj'): a targeted projection


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters and how big they are.

    rank: inner dimension r of A [in, r] and B [r, out].
    alpha: the update is scaled by alpha / rank (so changing rank keeps the learning rate sane).
    targets: projection names, any of LORA_TARGETS (attention q/k/v/o, MLP gate/up/down).
    dtype: dtype of the adapters (the trained master weights); the frozen base may be bf16.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "dtype", float_dtype_name(self.dtype, "LoraConfig.dtype"))
        check_field_types(self)
        check_int(self.rank, "LoraConfig.rank", 1, "typical values are 4 to 64")
        if not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha must be > 0, got {self.alpha!r} (often 2 * rank)")
        if not self.targets:
            raise ConfigError(f"LoraConfig.targets is empty; name some of {LORA_TARGETS}")
        for target in self.targets:
            if target not in LORA_TARGETS:
                close = difflib.get_close_matches(str(target), LORA_TARGETS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"LoraConfig.targets has {target!r}, which names no projection of "
                                  f"the model{hint}; valid targets: {', '.join(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"LoraConfig.targets lists a projection twice: {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "LoraConfig":
        return cls(**{**fields, "targets": tuple(fields["targets"])})


# ---- where the adapters go ----------------------------------------------------------------

def _target_kernels(config: ModelConfig, lora: LoraConfig) -> dict[LoraPath, tuple[tuple, tuple]]:
    """{projection path: (kernel shape, kernel logical axes)} of every targeted kernel, from
    abstract init (no arrays made). Scanned params keep a leading 'layers' axis."""
    abstract, axes = abstract_params(config)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    flat_axes, treedef = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_spec)
    kernels = {}
    for (path, spec), leaf in zip(flat_axes, treedef.flatten_up_to(abstract)):
        keys = path_names(path)
        if keys[-1] == "kernel" and keys[-2] in lora.targets and keys[0].startswith("layers"):
            kernels[keys[:-1]] = (tuple(leaf.shape), tuple(spec))
    return kernels


def _num_inputs(axes: tuple) -> int:
    """How many leading kernel axes are inputs. Every projection either reads the residual
    stream (q/k/v/gate/up: first axis 'embed') or writes it (o/down: last axis 'embed')."""
    return 1 if axes[0] == "embed" else len(axes) - 1


def _adapter_layout(config: ModelConfig, lora: LoraConfig) -> dict[LoraPath, dict[str, tuple]]:
    """{projection path: {'lora_a': (shape, axes), 'lora_b': (shape, axes)}}."""
    layout = {}
    for path, (shape, axes) in _target_kernels(config, lora).items():
        lead = 1 if path[0] == "layers" else 0  # scanned: [layers, ...]
        n_in = _num_inputs(axes[lead:])
        split = lead + n_in
        layout[path] = {
            "lora_a": (shape[:split] + (lora.rank,), axes[:split] + (None,)),
            "lora_b": (shape[:lead] + (lora.rank,) + shape[split:],
                       axes[:lead] + (None,) + axes[split:]),
        }
    return layout


def _flat_adapters(adapters: Mapping) -> dict[LoraPath, dict]:
    """{projection path: {'lora_a': A, 'lora_b': B}} of an adapters pytree."""
    flat = {}

    def walk(node: Mapping, path: tuple[str, ...]) -> None:
        if "lora_a" in node or "lora_b" in node:
            flat[path] = node
            return
        for key, child in node.items():
            walk(child, path + (key,))

    walk(adapters, ())
    return flat


def abstract_adapters(config: ModelConfig, lora: LoraConfig) -> dict:
    """Adapters as ShapeDtypeStructs (no arrays made)."""
    dtype = jnp.dtype(lora.dtype)
    return nest({path + (name,): jax.ShapeDtypeStruct(shape, dtype)
                  for path, pair in _adapter_layout(config, lora).items()
                  for name, (shape, _) in pair.items()})


def adapter_logical_axes(config: ModelConfig, lora: LoraConfig) -> dict:
    """PartitionSpecs of logical axis names, like `param_logical_axes` for the params."""
    return nest({path + (name,): PartitionSpec(*axes)
                  for path, pair in _adapter_layout(config, lora).items()
                  for name, (_, axes) in pair.items()})


def init_adapters(config: ModelConfig, lora: LoraConfig, rng: Array | int = 0) -> dict:
    """Fresh adapters: A uniform in +-1/sqrt(fan_in) (as PEFT's kaiming init), B zero, so the
    adapted model starts exactly equal to the base model."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    dtype = jnp.dtype(lora.dtype)
    flat = {}
    layout = _adapter_layout(config, lora)
    for index, (path, pair) in enumerate(sorted(layout.items())):
        (a_shape, _), (b_shape, _) = pair["lora_a"], pair["lora_b"]
        lead = 1 if path[0] == "layers" else 0
        fan_in = math.prod(a_shape[lead:-1])
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, index)
        flat[path + ("lora_a",)] = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        flat[path + ("lora_b",)] = jnp.zeros(b_shape, dtype)
    return nest(flat)


def check_adapters(config: ModelConfig, lora: LoraConfig, adapters: Mapping) -> None:
    """Raises CheckpointError unless `adapters` have exactly the shapes `lora` implies."""
    expected = {path: {name: shape for name, (shape, _) in pair.items()}
                for path, pair in _adapter_layout(config, lora).items()}
    actual = {path: {name: tuple(np.shape(value)) for name, value in pair.items()}
              for path, pair in _flat_adapters(adapters).items()}
    if actual != expected:
        missing = sorted("/".join(p) for p in set(expected) - set(actual))
        extra = sorted("/".join(p) for p in set(actual) - set(expected))
        wrong = sorted(f"{'/'.join(p)}: {actual[p]} vs {expected[p]}"
                       for p in set(actual) & set(expected) if actual[p] != expected[p])
        raise CheckpointError(
            f"adapters do not fit LoraConfig(rank={lora.rank}, targets={lora.targets}) on this "
            f"model: missing {missing[:4]}, unexpected {extra[:4]}, mis-shaped {wrong[:4]}; use "
            "the LoraConfig and model config the adapters were trained with")


# ---- forward and merge ----------------------------------------------------------------------

def model_variables(trainable: Any, frozen: Any, lora: LoraConfig | None) -> dict:
    """The flax variables of a forward pass from what is trained and what is frozen.

    Full fine-tuning (lora None): trainable are the params, frozen is None.
    LoRA: frozen are the base params, trainable the adapters; B is scaled here (inside the
    differentiated function) so the optimizer sees the unscaled B, as in the LoRA paper.
    """
    if lora is None:
        return {"params": trainable}
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, x: x * jnp.asarray(lora.scale, x.dtype) if key_name(path[-1]) == "lora_b" else x,
        trainable)
    return {"params": frozen, LORA_COLLECTION: scaled}


def lora_delta(a: Any, b: Any, kernel_shape: tuple[int, ...], scale: float) -> Array:
    """scale * A B reshaped to the kernel: A [(layers,) in..., r], B [(layers,) r, out...]."""
    lead = a.shape[:a.ndim + b.ndim - 2 - len(kernel_shape)]  # () or (layers,)
    rank = a.shape[-1]
    a2 = jnp.asarray(a, jnp.float32).reshape(*lead, -1, rank)  # [(layers,) in, rank]
    b2 = jnp.asarray(b, jnp.float32).reshape(*lead, rank, -1)  # [(layers,) rank, out]
    product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)  # [(layers,) in, out]
    return scale * product.reshape(kernel_shape)


def merge_lora(config: ModelConfig, params: Mapping, adapters: Mapping, lora: LoraConfig) -> dict:
    """Params with every adapter folded in: kernel + (alpha / rank) A B, in the kernel's dtype.

    The result is a plain params pytree (same structure as `params`): save it with
    `llamax.convert.hf.save_hf`, `llamax.convert.meta.save_meta` or `params_checkpoint.save_params`.
    """
    check_adapters(config, lora, adapters)
    merged = dict(params)  # containers on the adapters' paths are copied below; leaves shared
    for path, pair in _flat_adapters(adapters).items():
        node = merged
        for key in path:
            node[key] = dict(node[key])
            node = node[key]
        kernel = node["kernel"]
        delta = lora_delta(pair["lora_a"], pair["lora_b"], tuple(kernel.shape), lora.scale)
        summed = jnp.asarray(kernel, jnp.float32) + delta
        node["kernel"] = (np.asarray(summed).astype(np.asarray(kernel).dtype)
                          if isinstance(kernel, np.ndarray) else summed.astype(kernel.dtype))
    return merged


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree (e.g. trained adapters vs the frozen base)."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))
