"""Batching token sequences for the model: input checks, shape buckets and padding.

Compiled shapes are bucketed so that requests of similar length share one executable: lengths
round up to a power of two (>= 16) up to 256, then to a multiple of 256; batch sizes to a power
of two (and a multiple of the data-parallel size). Used by generation (`llamax.infer.generate`,
left-padded prompts) and scoring (`llamax.infer.scoring`, right-padded sequences).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from llamax.config import ModelConfig
from llamax.errors import ConfigError, DataError

EosIds = int | Sequence[int] | None


def check_generate_args(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        temperature: float, top_k: int | None, top_p: float | None,
                        eos_id: EosIds) -> list[np.ndarray]:
    """Validates generation inputs; returns the prompts as int32 arrays.

    Raises DataError for bad prompts and ConfigError for bad settings (both ValueErrors).
    """
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:  # [batch, seq]: equal lengths
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise DataError("prompts must be a non-empty list of token-id lists, e.g. [[1, 15, 27]]; "
                        f"got {prompts!r:.80}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer))
                              or not 0 < top_k <= config.vocab_size):
        raise ConfigError(f"top_k must be in [1, vocab_size={config.vocab_size}] or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    for one_eos in eos_ids(eos_id):
        if not 0 <= one_eos < config.vocab_size:
            raise ConfigError(f"eos_id={one_eos} is outside the model vocabulary [0, {config.vocab_size})")
    arrays = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"prompt {i} must be a non-empty 1-D list of int token ids, got "
                            f"{prompt!r:.80}; encode text with a tokenizer first (and add <s>)")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            bad = int(ids.max() if ids.max() >= config.vocab_size else ids.min())
            raise DataError(
                f"prompt {i} holds token id {bad}, outside the model vocabulary "
                f"[0, {config.vocab_size}); the tokenizer does not match the model (check that "
                "tokenizer.vocab_size <= ModelConfig.vocab_size)")
        if ids.size + max_new_tokens > config.max_position_embeddings:
            raise DataError(
                f"prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{ids.size + max_new_tokens} > max_position_embeddings="
                f"{config.max_position_embeddings}. Shorten the prompt or ask for fewer tokens")
        arrays.append(ids.astype(np.int32))
    return arrays


def eos_ids(eos_id: EosIds) -> tuple[int, ...]:
    """`eos_id` (None, one id or several) as a tuple of ints."""
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(i) for i in eos_id)


def bucket_length(length: int) -> int:
    """Padded prompt length: next power of two >= 16 up to 256, then the next multiple of 256."""
    if length <= 256:
        return max(16, 1 << (length - 1).bit_length())
    return -(-length // 256) * 256


def bucket_batch(batch: int, multiple_of: int = 1) -> int:
    """Padded batch size: next power of two, rounded up to a multiple of `multiple_of`."""
    size = 1 << (batch - 1).bit_length()
    return -(-size // multiple_of) * multiple_of


def left_pad(prompts: Sequence[np.ndarray], length: int, batch: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-aligns prompts in a [batch, length] grid.

    Returns (tokens, positions, segment_ids), each [batch, length] int32: padding has token 0,
    position 0 and segment 0; real tokens have positions 0..len-1 and segment 1. Rows past
    len(prompts) (batch padding) hold a single token 0.
    """
    batch = batch or len(prompts)
    tokens = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        prompt = prompts[row] if row < len(prompts) else np.zeros(1, np.int32)
        tokens[row, length - len(prompt):] = prompt
        segment_ids[row, length - len(prompt):] = 1
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, segment_ids
