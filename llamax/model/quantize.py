"""Weight-only reduced precision for inference: bfloat16 or int8 projection kernels.

    params, quant = quantize_weights(config, params, "int8")
    logits = Llama(config).apply(model_variables(params, quant), tokens)
    generate(config, params, prompts, 64, quant=quant)

Only the weights change precision; activations, norms, softmax and logits stay in the model's
compute dtype (float32). What is quantized is every projection kernel (attention q/k/v/o, the
MLP's gate/up/down) and the output layer (`lm_head`, or the embedding table when the output layer
is tied to it): at batch 1 decoding reads every one of these weights once per token, so their
bytes set the memory-bandwidth roofline. The norms' weights are tiny and stay float32.

- "float32": params unchanged.
- "bfloat16": those kernels cast to bfloat16; the model converts them to the compute dtype as it
  uses them, so the result equals a float32 model whose kernels were rounded to bfloat16.
- "int8": symmetric absmax quantization per output column: scale = max|w| / 127 over the input
  axes of the kernel (float32, one per output: `[heads, head_dim]` for q_proj, `[embed]` for
  o_proj, `[vocab]` for lm_head), values = round(w / scale) in [-127, 127] (the same scales and
  values as torch's `PerChannelMinMaxObserver(qscheme=per_channel_symmetric, quant_min=-127,
  quant_max=127)` + `torch.quantize_per_channel`). The int8 kernels stay in `params` under their
  own names and shapes (flax checks shapes, not dtypes), and the scales go into the separate
  `quant` variable collection, shaped like params (`{'layers_0': {'self_attn': {'q_proj':
  {'scale': [heads, head_dim]}}}}`; stacked `[layers, ...]` under scanned layers), as the `lora`
  collection is. A Projection that finds a `scale` computes (x @ K_int8) * scale: the scale factors
  out of the contraction, so it multiplies the product and no float32 copy of the kernel is kept.

Tied embeddings: the table [vocab, embed] is both the input lookup and the output layer. The
output layer's output columns are the table's rows, so int8 gives one scale per row (per token),
which also dequantizes a looked-up row exactly: the table is stored once, in int8, and both uses
read it (the lookup multiplies each gathered row by its scale). An untied embedding table is
only gathered (a few rows per token), so it stays float32 in every mode.

LoRA adapters (the `lora` collection) combine with either mode: their low-rank term is added to
the quantized projection's output in the compute dtype.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llamax.config import ModelConfig
from llamax.errors import ConfigError
from llamax.model.llama import KERNEL_INPUT_AXES, QUANT_COLLECTION

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
INT8_MAX = 127  # symmetric range [-127, 127]: -128 unused, so negation never overflows


def check_weights(weights: str) -> str:
    """`weights` if it names a format in WEIGHT_FORMATS; a ConfigError naming them otherwise."""
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}; got {weights!r}")
    return weights


def quantize_int8(kernel: Any, input_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 values shaped like `kernel`, float32 scales over the remaining axes).

    scale = max |kernel| over `input_axes` / 127 (at least float32 eps, as torch's observers
    clamp it: an all-zero column quantizes to zeros); values = round-half-even(kernel / scale).
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    absmax = jnp.max(jnp.abs(kernel), axis=input_axes)  # [outputs...] (leading layers kept)
    scale = jnp.maximum(absmax / INT8_MAX, jnp.finfo(jnp.float32).eps)
    values = jnp.round(kernel / jnp.expand_dims(scale, input_axes))
    return jnp.clip(values, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize_int8(values: Any, scale: Any, input_axes: tuple[int, ...]) -> jax.Array:
    """The float32 kernel `values * scale` that an int8 kernel stands for."""
    return jnp.asarray(values, jnp.float32) * jnp.expand_dims(jnp.asarray(scale, jnp.float32), input_axes)


def _quantized_leaves(config: ModelConfig, params: dict) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(path to the weight, its input axes) of every weight the modes change, in params order.

    Raises ConfigError for a kernel of unknown role (its input axes would be a guess) and for
    params that are not float32 (already reduced: quantizing twice would compound the error).
    """
    found = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(str(getattr(key, "key", key)) for key in key_path)
        if path[-1] not in ("kernel", "embedding"):
            continue
        if path[-1] == "embedding" and not config.tie_word_embeddings:
            continue  # only gathered from: stays float32
        if jnp.dtype(leaf.dtype) != jnp.float32:
            raise ConfigError(f"param {'/'.join(path)} is {jnp.dtype(leaf.dtype).name}, not float32: "
                              "quantize_weights takes the float32 params (from load_any/init_params)")
        stacked = config.scan_layers and path[0] == "layers"  # [layers, ...]: one scale set per layer
        if path[-1] == "embedding":
            input_axes = (leaf.ndim - 1,)  # [vocab, embed]: the output layer contracts embed
        elif path[-2] in KERNEL_INPUT_AXES:
            input_axes = tuple(range(int(stacked), int(stacked) + KERNEL_INPUT_AXES[path[-2]]))
        else:
            raise ConfigError(f"param {'/'.join(path)}: no quantization rule for a projection named "
                              f"{path[-2]!r} (known: {', '.join(KERNEL_INPUT_AXES)})")
        found.append((path, input_axes))
    return found


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _with(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of nested dict `tree` with `path` set to `value` (unchanged subtrees are shared)."""
    tree = dict(tree)
    tree[path[0]] = value if len(path) == 1 else _with(tree.get(path[0], {}), path[1:], value)
    return tree


def quantize_weights(config: ModelConfig, params: Any, weights: str) -> tuple[Any, dict | None]:
    """(params with reduced-precision projection weights, the `quant` collection or None).

    Args:
      config: the model's config (says whether layers are scanned and the embedding is tied).
      params: float32 params pytree, as from `init_params` / `load_any`.
      weights: "float32" (unchanged), "bfloat16" or "int8" (see the module docstring).

    Returns:
      (params, quant): quant holds the int8 scales (`{'lm_head': {'scale': ...}, ...}`) and is
      None for float32 and bfloat16. Pass both to `model_variables`, `generate(..., quant=quant)`
      or `evaluate_perplexity(..., quant=quant)`.
    """
    check_weights(weights)
    if weights == "float32":
        return params, None
    quant: dict = {}
    for path, input_axes in _quantized_leaves(config, params):
        leaf = _get(params, path)
        if weights == "bfloat16":
            params = _with(params, path, jnp.asarray(leaf, jnp.bfloat16))
            continue
        values, scale = quantize_int8(leaf, input_axes)
        params = _with(params, path, values)
        quant = _with(quant, (*path[:-1], "scale"), scale)
    return params, (quant if weights == "int8" else None)


def dequantize_weights(config: ModelConfig, params: Any, quant: dict | None) -> Any:
    """Float32 params equal to what the reduced-precision `params` (+ `quant`) compute with: the
    reference a quantized model is checked against."""
    if quant is None:
        return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), params)
    result = params
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(str(getattr(key, "key", key)) for key in key_path)
        if jnp.dtype(leaf.dtype) != jnp.int8:
            continue
        stacked = config.scan_layers and path[0] == "layers"
        input_axes = ((leaf.ndim - 1,) if path[-1] == "embedding"
                      else tuple(range(int(stacked), int(stacked) + KERNEL_INPUT_AXES[path[-2]])))
        result = _with(result, path, dequantize_int8(leaf, _get(quant, (*path[:-1], "scale")), input_axes))
    return result


def model_variables(params: Any, quant: dict | None = None) -> dict:
    """The flax variables of a forward pass: {'params': params} (+ {'quant': quant} when int8)."""
    return {"params": params} if quant is None else {"params": params, QUANT_COLLECTION: quant}


def weight_bytes(params: Any, quant: dict | None = None) -> int:
    """Bytes of params + scales: what one batch-1 decode step reads, to first order."""
    leaves = jax.tree.leaves(params) + jax.tree.leaves(quant or {})
    return int(sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves))
