"""Supervised fine-tuning records -> token ids with per-token "is a response token" weights.

Accepted JSONL records:
    {"prompt": "...", "response": "..."}                    (optional "system": "...")
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

A record becomes one document whose weights are 1.0 on response (assistant) tokens, including the
EOS closing a response, and 0.0 elsewhere; packing turns that into `loss_mask[i] = weights[i+1]`,
i.e. exactly the targets that are response tokens are scored. Rendering is in `chat_templates`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llamax.data import chat_templates
from llamax.errors import DataError


def parse_record(record: Any) -> list[dict]:
    """Validates one SFT record and returns its messages `[{"role", "content"}, ...]`.

    Raises ValueError (re-raised by the JSONL reader with file and line) describing the problem.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        if "system" in record:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ValueError("an SFT record needs 'prompt' and 'response' or 'messages' fields, got "
                         f"fields {sorted(record)[:8]}")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in chat_templates.ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of "
                             f"{list(chat_templates.ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError("the conversation has no assistant message, so nothing would be trained")
    return clean


def encode_conversation(messages: Sequence[dict], tokenizer, template: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the rendered conversation and their weights (1.0 = response token).

    Returns:
        tokens [n] int32 and weights [n] float32.
    """
    ids: list[int] = []
    weights: list[float] = []
    for span in chat_templates.render(messages, template):
        if span.special == "bos":
            piece = [tokenizer.bos_id]
        elif span.special == "eos":
            piece = [tokenizer.eos_id]
        elif span.special is None:
            piece = tokenizer.encode(span.text, bos=False, eos=False) if span.text else []
        else:
            raise DataError(f"unknown special span {span.special!r}")
        ids += piece
        weights += [1.0 if span.trained else 0.0] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)
