"""Preference data for DPO: records -> (chosen, rejected) token pairs -> packed preference rows.

Accepted records (JSONL lines, Parquet / Arrow rows):
    {"prompt": "...", "chosen": "...", "rejected": "..."}                     standard (TRL)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}      conversational (TRL)
    {"messages": [messages], "chosen": "..." | {message} | [messages], "rejected": ...}
    {"chosen": [messages], "rejected": [messages]}                            implicit prompt: the
                                                                              common leading turns
Optional "ref_chosen_logps" / "ref_rejected_logps" (floats) carry precomputed reference log-probs
(`precompute_reference_logps`; read with `DPO(reference='precomputed')`).

Encoding. With no chat template (sft_template None) a standard record is text, as TRL encodes it:
the completion is what `BOS prompt+chosen EOS` adds after the longest common prefix with the
tokens of `BOS prompt`. With a template ('plain', 'llama2', 'llama3', 'checkpoint') the prompt
(a string becomes one user turn) and each completion (a string becomes one assistant turn) are
rendered as one conversation (`llamax.data.sft`), and only the completion's assistant turns are
scored (assistant turns inside the prompt are context).

Packing. A pair is the chosen and the rejected sequence as two consecutive segments of one row
(segment 2j-1 = pair j's chosen, 2j = its rejected; never split across rows), so a preference
batch has the usual keys (`llamax.data`) with `loss_mask` on completion tokens, plus
`ref_logps` [batch, seq] float32 when the records carry reference log-probs: each sequence's
value on its first token. A pair longer than seq_len is cut from the end (the longer sequence
first, neither below seq_len // 2); a pair left without a completion token in either sequence is
skipped with a warning.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from llamax.data import packing, sft
from llamax.errors import DataError

log = logging.getLogger(__name__)

REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


# ---- records --------------------------------------------------------------------------------

def _messages(value: Any, what: str) -> list[dict]:
    """A list of validated messages (`sft.parse_record` rules, assistant turns not required)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a string or a non-empty list of {{role, content}} messages")
    try:
        return sft.parse_record({"messages": [*value, {"role": "assistant", "content": ""}]})[:-1]
    except ValueError as e:
        raise ValueError(f"'{what}': {e}") from None


def _completion(value: Any, what: str) -> str | list[dict]:
    if isinstance(value, str):
        return value
    messages = _messages(value, what)
    if any(m["role"] != "assistant" for m in messages):
        raise ValueError(f"'{what}' must hold assistant messages only (the prompt holds the rest)")
    return messages


def parse_preference_record(record: Any) -> dict:
    """Validates one preference record (see the module docstring) and normalizes it to
    `{"prompt": str | [messages], "chosen": str | [messages], "rejected": ..., "reference": (c, r)
    or None}`. Raises ValueError (re-raised by the readers with file and line) naming the problem.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(f"a preference record needs 'chosen' and 'rejected' completions; this one "
                         f"has no {' or '.join(repr(m) for m in missing)} (fields {sorted(record)[:8]})")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt = record[key] if isinstance(record[key], str) else _messages(record[key], key)
        chosen, rejected = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    else:  # implicit prompt: chosen and rejected are whole conversations sharing their start
        chosen_turns, rejected_turns = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        shared = 0
        while (shared < min(len(chosen_turns), len(rejected_turns)) - 1
               and chosen_turns[shared] == rejected_turns[shared]):
            shared += 1
        if shared == 0:
            raise ValueError("a preference record needs a 'prompt' (or 'messages'), or chosen and "
                             "rejected conversations that share their leading turns")
        prompt = chosen_turns[:shared]
        chosen = _completion(chosen_turns[shared:], "chosen")
        rejected = _completion(rejected_turns[shared:], "rejected")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical, so the pair states no preference; "
                         "remove the record or fix one of the completions")
    reference = None
    if any(field in record for field in REFERENCE_FIELDS):
        try:
            reference = tuple(float(record[field]) for field in REFERENCE_FIELDS)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"precomputed reference log-probs need both {REFERENCE_FIELDS} as "
                             "numbers") from None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "reference": reference}


# ---- encoding -------------------------------------------------------------------------------

def _as_turns(value: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _keep_last_runs(weights: np.ndarray, keep: int, where: str) -> np.ndarray:
    """Weights of the last `keep` runs of ones (the completion's assistant turns) only."""
    starts = np.flatnonzero(np.diff(np.concatenate([[0.0], (weights > 0).astype(np.float64)])) > 0)
    ends = np.flatnonzero(np.diff(np.concatenate([(weights > 0).astype(np.float64), [0.0]])) < 0) + 1
    if len(starts) < keep:
        raise DataError(f"{where}: the chat template scored {len(starts)} assistant span(s) but the "
                        f"completion has {keep} turn(s); use a template that marks each assistant turn")
    kept = np.zeros_like(weights)
    for start, end in zip(starts[len(starts) - keep:], ends[len(ends) - keep:]):
        kept[start:end] = weights[start:end]
    return kept


def encode_completion(prompt: str | list[dict], completion: str | list[dict], tokenizer,
                      template: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of prompt + completion and weights (1.0 on completion tokens), both [n]."""
    if template is None:
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise DataError("chat-form preference records (message lists) need a chat template: set "
                            "DataConfig.sft_template ('checkpoint', 'llama3', 'llama2' or 'plain')")
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        ids = tokenizer.encode(prompt + completion, bos=True, eos=True)
        shared = 0
        for a, b in zip(prompt_ids, ids):
            if a != b:
                break
            shared += 1
        weights = np.zeros((len(ids),), np.float32)
        weights[shared:] = 1.0
        return np.asarray(ids, np.int32), weights
    turns = _as_turns(completion, "assistant")
    tokens, weights = sft.encode_conversation(_as_turns(prompt, "user") + turns, tokenizer, template)
    return tokens, _keep_last_runs(weights, len(turns), f"template {template!r}")


def _truncate(chosen: int, rejected: int, seq_len: int) -> tuple[int, int]:
    """Lengths that fit one row: the longer sequence is cut first, neither below seq_len // 2."""
    if chosen + rejected <= seq_len:
        return chosen, rejected
    half = seq_len // 2
    if chosen <= half:
        return chosen, seq_len - chosen
    if rejected <= half:
        return seq_len - rejected, rejected
    return half, seq_len - half


def encode_pair(pair: dict, tokenizer, template: str | None, seq_len: int):
    """A parsed preference record -> (tokens [n], weights [n], chosen length, reference (c, r) or
    None), chosen first; None when truncation to seq_len leaves a side without completion."""
    chosen_tokens, chosen_weights = encode_completion(pair["prompt"], pair["chosen"], tokenizer, template)
    rejected_tokens, rejected_weights = encode_completion(pair["prompt"], pair["rejected"], tokenizer,
                                                          template)
    keep_chosen, keep_rejected = _truncate(len(chosen_tokens), len(rejected_tokens), seq_len)
    # Position 0 is never a target, so a side needs a weighted token after its first.
    if not (chosen_weights[1:keep_chosen].any() and rejected_weights[1:keep_rejected].any()):
        return None
    tokens = np.concatenate([chosen_tokens[:keep_chosen], rejected_tokens[:keep_rejected]])
    weights = np.concatenate([chosen_weights[:keep_chosen], rejected_weights[:keep_rejected]])
    return tokens, weights, keep_chosen, pair["reference"]


# ---- packing --------------------------------------------------------------------------------

class PairPacker:
    """Greedy packer of pairs with `packing.DocumentPacker`'s interface: a pair goes whole into
    the current row (two segments) or starts the next one. `offset` is 0 until a pair is placed."""

    def __init__(self, seq_len: int, with_reference: bool = False):
        self.seq_len = seq_len
        self.fill_rows = False
        self.with_reference = with_reference
        self.builder = packing.RowBuilder(seq_len)
        self._reference = np.zeros((seq_len,), np.float32)
        self.document = None
        self.offset = 0

    @property
    def needs_document(self) -> bool:
        return self.document is None or self.offset >= len(self.document[0])

    def set_document(self, tokens: np.ndarray, weights: np.ndarray, split: int,
                     reference: tuple[float, float] | None = None, offset: int = 0) -> None:
        if offset not in (0, len(tokens)):
            raise DataError(f"a preference pair is never split, but the state resumes it at token "
                            f"{offset} of {len(tokens)}")
        if self.with_reference and reference is None:
            raise DataError("this preference data mixes records with and without precomputed "
                            f"reference log-probs {REFERENCE_FIELDS}; precompute them for every record")
        self.document, self.offset = (tokens, weights, split, reference), offset

    def place(self) -> bool:
        tokens, weights, split, reference = self.document
        if self.offset >= len(tokens):
            return True
        if not self.builder.fits(len(tokens)):
            return False
        start = self.builder.used
        self.builder.add(tokens[:split], weights[:split])
        self.builder.add(tokens[split:], weights[split:])
        if self.with_reference:
            self._reference[start] = reference[0]
            self._reference[start + split] = reference[1]
        self.offset = len(tokens)
        return True

    def finish_row(self) -> dict[str, np.ndarray] | None:
        if not self.builder.used:
            return None
        row = self.builder.finish()
        if self.with_reference:
            row["ref_logps"], self._reference = self._reference, np.zeros((self.seq_len,), np.float32)
        return row


def reference_kind(documents: Sequence[Any]) -> bool:
    """Whether the records carry precomputed reference log-probs (judged by the first)."""
    first = documents[0]
    return isinstance(first, dict) and first.get("reference") is not None
