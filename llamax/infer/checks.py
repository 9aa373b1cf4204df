"""What generation accepts, checked before anything compiles: settings, prompts, stop ids.

`check_sampling_args` needs no model and `check_generate_args` only a `ModelConfig`, so a CLI
checks its arguments before reading any weights (`experiments.sample`). `generate` and
`generate_stream` call them on every request. Bad prompts raise DataError, bad settings
ConfigError (both ValueErrors), each naming the value and the allowed range.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from llamax.config import ModelConfig
from llamax.errors import ConfigError, DataError


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                        vocab_size: int | None = None) -> None:
    """ConfigError for a bad generation setting; needs no model (a CLI checks these first).
    `top_k` is also checked against `vocab_size` when given."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k <= 0
                              or (vocab_size is not None and top_k > vocab_size)):
        raise ConfigError(f"top_k must be in [1, vocab_size={vocab_size}] or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_generate_args(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        temperature: float, top_k: int | None, top_p: float | None,
                        eos_id: int | None, stop_ids: Sequence[int] = ()) -> list[np.ndarray]:
    """Validates generation inputs; returns the prompts as int32 arrays.

    Raises DataError for bad prompts and ConfigError for bad settings (both ValueErrors).
    """
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:  # [batch, seq]: equal lengths
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise DataError("prompts must be a non-empty list of token-id lists, e.g. [[1, 15, 27]]; "
                        f"got {prompts!r:.80}")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, config.vocab_size)
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ConfigError(f"eos_id={eos_id} is outside the model vocabulary [0, {config.vocab_size})")
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (Sequence, np.ndarray)):
        raise ConfigError(f"stop_ids must be a sequence of token ids (e.g. tokenizer.stop_ids), got "
                          f"{stop_ids!r:.80}")
    for stop_id in stop_ids:
        if (isinstance(stop_id, bool) or not isinstance(stop_id, (int, np.integer))
                or not 0 <= stop_id < config.vocab_size):
            raise ConfigError(f"stop id {stop_id!r} of stop_ids is not a token id of the model "
                              f"vocabulary [0, {config.vocab_size}); were they taken from another "
                              "tokenizer?")
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


def all_stop_ids(eos_id: int | None, stop_ids: Sequence[int]) -> tuple[int, ...]:
    """`eos_id` and `stop_ids` (checked ids) as one tuple, first-seen order, without repeats."""
    ids = ([] if eos_id is None else [eos_id]) + list(stop_ids)
    return tuple(dict.fromkeys(int(i) for i in ids))
