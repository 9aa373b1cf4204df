"""Sampling with settings that differ per row: one decode step serves requests that each chose
their own temperature, top-k, top-p and seed.

The filters follow `llamax.infer.generate.filter_logits` (transformers' TopK/TopP warpers) but
find their thresholds by bisection instead of sorting the vocabulary: XLA:CPU sorts a
[16, 8192] array in ~85 ms, several times a whole decode step, while 32 rounds of
compare-and-sum cost a few milliseconds on any backend.

  top-k: keep logits >= the k-th largest. Bisection over the float bit patterns finds that value
         exactly, so the kept set is exactly `filter_logits`'.
  top-p: keep the smallest set of most likely tokens whose probability reaches top_p (ties at
         the edge kept). The same set as `filter_logits` up to float rounding of the mass at its
         edge (sums run in a different order).

A row draws its step-s token with `fold_in(fold_in(key(seed), s), 0)`, the key `generate` gives a
single prompt, so a seeded request with temperature and top-k samples exactly what `generate`
samples alone.
"""
from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TOP_LOGPROBS = 5  # alternatives returned per token (OpenAI's completions allow up to 5)


@flax.struct.dataclass
class SlotSampling:
    """Per-row sampling settings; each field is [rows] (or [rows, *key_shape])."""

    greedy: Array  # bool: argmax, the other fields unused
    temperature: Array  # float32 (1 for greedy rows)
    top_k: Array  # int32; 0 = no top-k filter
    top_p: Array  # float32; 1 = no nucleus filter
    key_data: Array  # uint32 [rows, *key_shape]: jax.random.key_data(key(seed))


class StepOutput(NamedTuple):
    """What the host reads after a step: one sampled token per row, with log-probabilities
    under the model's distribution (before temperature and filters)."""

    tokens: Array  # [rows] int32
    logprobs: Array  # [rows] float32: log p(token)
    top_ids: Array  # [rows, TOP_LOGPROBS] int32: the most likely tokens
    top_logprobs: Array  # [rows, TOP_LOGPROBS] float32


def make_sampling(temperature: float, top_k: int, top_p: float, seed: int) -> SlotSampling:
    """Settings of one request as a 1-row SlotSampling (host arrays)."""
    greedy = temperature == 0
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    return SlotSampling(greedy=np.array([greedy]),
                        temperature=np.array([1.0 if greedy else temperature], np.float32),
                        top_k=np.array([top_k], np.int32), top_p=np.array([top_p], np.float32),
                        key_data=key_data[None])


def _ordered(x: Array) -> Array:
    """float32 -> int32 with the same order (negative floats' magnitude bits flipped; -0.0 is
    made +0.0 first, since the two compare equal)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _largest_threshold(keys: Array, enough) -> Array:
    """Per row, the largest int32 t with enough(keys >= t) true ([rows, 1]); `enough` must hold
    at the row minimum and fail above the row maximum (it is monotone in t)."""
    low = jnp.min(keys, axis=-1, keepdims=True)  # enough(low) holds
    high = jnp.max(keys, axis=-1, keepdims=True) + 1  # enough(high) fails (+1: max < int32 max)

    def halve(_, bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # no int32 overflow
        middle = jnp.maximum(middle, low + 1)
        ok = enough(keys >= middle) & (middle < high)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return low


def filter_rows(logits: Array, sampling: SlotSampling) -> Array:
    """Logits [rows, vocab] with tokens outside each row's top-k set and top-p nucleus at -inf."""
    vocab = logits.shape[-1]

    def top_k(logits):
        k = jnp.where(sampling.top_k > 0, sampling.top_k, vocab)[:, None]  # [rows, 1]
        keys = _ordered(logits)
        kth = _largest_threshold(keys, lambda kept: jnp.sum(kept, axis=-1, keepdims=True) >= k)
        return jnp.where(keys < kth, -jnp.inf, logits)

    def top_p(logits):
        probs = jax.nn.softmax(logits, axis=-1)  # [rows, vocab]
        keys = _ordered(probs)
        top_p = sampling.top_p[:, None]
        edge = _largest_threshold(
            keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1, keepdims=True) >= top_p)
        nucleus = jnp.where(keys < edge, -jnp.inf, logits)
        return jnp.where(top_p < 1, nucleus, logits)

    logits = jax.lax.cond(jnp.any(sampling.top_k > 0), top_k, lambda x: x, logits)
    return jax.lax.cond(jnp.any(sampling.top_p < 1), top_p, lambda x: x, logits)


def sample_rows(logits: Array, sampling: SlotSampling, steps: Array) -> StepOutput:
    """Next token of each row (logits [rows, vocab], steps [rows]) and its log-probabilities."""

    def draw(logits):
        scaled = filter_rows(logits / sampling.temperature[:, None], sampling)

        def one_row(key_data, step, row_logits):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), step), 0)
            return jax.random.categorical(key, row_logits)

        sampled = jax.vmap(one_row)(sampling.key_data, steps, scaled)
        return jnp.where(sampling.greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)

    # Greedy-only batches (the common serving case) skip filtering and drawing.
    tokens = jax.lax.cond(jnp.all(sampling.greedy),
                          lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), draw, logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [rows, vocab]
    top_logprobs, top_ids = jax.lax.top_k(log_probs, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    return StepOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
