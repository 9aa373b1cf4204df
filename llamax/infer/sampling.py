"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

`Sampler` holds the static settings (part of a compile key); `sample_tokens` is traced inside the
decode loop of `llamax.infer.generate`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Sampler(NamedTuple):
    """Static sampling settings (part of the compile key). Greedy ignores top_k/top_p."""

    greedy: bool
    top_k: int | None
    top_p: float | None


def filter_logits(logits: Array, top_k: int | None = None, top_p: float | None = None) -> Array:
    """Sets logits outside the top-k set and outside the top-p nucleus to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`
    (the most likely token is always kept), as in transformers' TopPLogitsWarper; top-k is
    applied first. logits: [..., vocab] float32.
    """
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)  # [..., vocab] ascending
        # Tail mass (this token and every less likely one), summed from the small end: a sum from
        # the top rounds to 1.0 in float32 before the last tokens when top_p is close to 1.
        tail_mass = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        dropped = tail_mass <= 1.0 - top_p  # the least likely tokens outside the nucleus
        num_dropped = jnp.minimum(jnp.sum(dropped, axis=-1, keepdims=True), logits.shape[-1] - 1)
        threshold = jnp.take_along_axis(sorted_logits, num_dropped, axis=-1)  # [..., 1]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits: Array, key: Array, temperature: Array, sampler: Sampler) -> Array:
    """Next tokens [batch] from logits [batch, vocab]; row r draws with fold_in(key, r), so a
    row's sample does not depend on what else is in the batch."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, sampler.top_k, sampler.top_p)
    row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(row_keys, logits).astype(jnp.int32)
