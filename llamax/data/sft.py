"""Supervised fine-tuning records -> token ids with per-token "is a response token" weights.

Accepted JSONL records:
    {"prompt": "...", "response": "..."}                    (optional "system": "...")
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

A record becomes one document whose weights are 1.0 on response (assistant) tokens, including the
EOS closing a response, and 0.0 elsewhere; packing turns that into `loss_mask[i] = weights[i+1]`,
i.e. exactly the targets that are response tokens are scored. Rendering is in `chat_templates`.

Template 'checkpoint' (`CHECKPOINT_TEMPLATE`) renders with the tokenizer's own Jinja chat template
(its built-in Llama-2/3 one when it has none), exactly as transformers' `apply_chat_template`, and
encodes the text once. The trained tokens are the assistant turns: the template's
`{% generation %}` blocks if it has them, else each turn found by rendering turn by turn, cut after
its first stop token (`<|eot_id|>`, `<|im_end|>`, `</s>`: the turn's end, not the separator after
it). A token that straddles a span boundary counts as inside, as in transformers'
`return_assistant_tokens_mask`.

Rendered conversations are encoded with `allow_special=True` (as transformers does), so content
that spells a special token (`<|eot_id|>`) becomes that token.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from llamax.data import chat_templates
from llamax.data.chat_templates import CHECKPOINT_TEMPLATE
from llamax.errors import DataError
from llamax.tokenizer import chat


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
    if template == CHECKPOINT_TEMPLATE:
        return encode_with_chat_template(messages, tokenizer)
    ids: list[int] = []
    weights: list[float] = []
    for span in chat_templates.render(messages, template):
        if span.special == "bos":
            piece = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        elif span.special == "eos":
            piece = [tokenizer.eos_id]
        elif span.special is None:
            piece = (tokenizer.encode(span.text, bos=False, eos=False, allow_special=True)
                     if span.text else [])
        else:
            raise DataError(f"unknown special span {span.special!r}")
        ids += piece
        weights += [1.0 if span.trained else 0.0] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def encode_with_chat_template(messages: Sequence[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the conversation rendered with the tokenizer's chat template, and their weights
    (1.0 on the assistant turns; see the module doc).

    Returns:
        tokens [n] int32 and weights [n] float32.
    """
    template = tokenizer.effective_chat_template()
    text, spans = chat.assistant_spans(template, messages, tokenizer.template_variables())
    ids = tokenizer.encode(text, bos=False, allow_special=True)
    weights = np.zeros((len(ids),), np.float32)
    cut_at_stop = not chat.has_generation_blocks(template)
    stop_ids = set(tokenizer.stop_ids)
    for start, end in spans:
        first, _ = _token_boundary(tokenizer, text, start, ids)
        common, straddles = _token_boundary(tokenizer, text, end, ids)
        last = common + straddles
        if cut_at_stop:
            stops = [i for i in range(first, last) if ids[i] in stop_ids]
            last = stops[0] + 1 if stops else last
        weights[first:last] = 1.0
    return np.asarray(ids, np.int32), weights


def _token_boundary(tokenizer, text: str, char: int, ids: list[int]) -> tuple[int, bool]:
    """How many leading tokens of `ids` (the tokens of `text`) lie before character `char`, and
    whether the next token straddles `char` (encoding `text[:char]` yields more tokens after the
    common prefix, so the whole-text token there crosses the boundary)."""
    if char <= 0:
        return 0, False
    prefix = tokenizer.encode(text[:char], bos=False, allow_special=True)
    common = 0
    for a, b in zip(prefix, ids):
        if a != b:
            break
        common += 1
    return common, len(prefix) > common and common < len(ids)
