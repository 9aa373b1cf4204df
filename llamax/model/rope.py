"""Rotary position embeddings in HF's half-split layout, with Llama-3.1 ("llama3") scaling.

Half-split means a head vector [x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1}] rotates pairs
(x_i, x_{i+d/2}). HF checkpoints store q/k projections for this layout, so they load with no
permutation; only Meta's interleaved checkpoints need one, and only in the converter.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llamax.config import RopeScaling
from llamax.model.matmul import builds_for_cpu


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Per-pair rotation frequencies, float32 like HF: [head_dim // 2]."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama-3.1 scaling: slow (long-wavelength) frequencies are divided by `factor`, fast ones
    are kept, and the band between is interpolated smoothly."""
    factor = np.float32(scaling.factor)
    old_context = np.float32(scaling.original_max_position_embeddings)
    low_freq_wavelen = old_context / np.float32(scaling.low_freq_factor)
    high_freq_wavelen = old_context / np.float32(scaling.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - np.float32(scaling.low_freq_factor)) / (
        np.float32(scaling.high_freq_factor) - np.float32(scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables for integer `positions` [batch, seq] -> two [batch, seq, head_dim] (f32)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, seq, head_dim]
    tables = jnp.stack([jnp.cos(angles), jnp.sin(angles)])  # [2, batch, seq, head_dim]
    if builds_for_cpu():
        # XLA:CPU fuses cos and sin into every op that reads them, so each layer's rotation of q
        # and k (and their gradients) recomputed both per element, once per head: 109 ms of
        # thread time per bench train step (Intel Xeon). It never fuses a reduction into the ops
        # that read it, so a sum with zeros along a new axis (x + 0 = x) makes it write the
        # tables once (docs/performance.md, change 12).
        tables = jnp.sum(jnp.stack([tables, jnp.zeros_like(tables)]), axis=0)
    return tables[0], tables[1]


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [batch, seq, heads, head_dim] by the angles in cos/sin [batch, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated_half = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)  # broadcast over heads
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated_half * sin
