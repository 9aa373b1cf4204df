"""Chat templates: a conversation -> spans of text, each marked as trained (response) or not.

`render(messages, template)` returns `Span`s; `llamax.data.sft` encodes each span separately, so
the boundary between prompt and response tokens is exact. `<s>`/`</s>` are the tokenizer's BOS and
EOS *ids* (`Span(special="bos")`), never the text "<s>".

llama2 (Meta's `chat_completion` format; a system message is folded into the first user turn):
    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant}</s><s>[INST] {user} ...
  Trained: each `{assistant}` and the `</s>` that closes it.

llama3 (header format):
    <s><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...</s>
  Trained: each assistant `{content}<|eot_id|>`, and the final `</s>` if the last turn is the
  assistant's. A SentencePiece tokenizer has no `<|start_header_id|>` etc. pieces, so these are
  encoded as ordinary text (several tokens each) unless the tokenizer was trained with them as
  `user_defined_symbols`, in which case each is one piece. `<|begin_of_text|>` is BOS.

plain (for tiny tokenizers and demos): turns joined by "\\n\\n" without role markers:
    <s>{system}\\n\\n{user}\\n\\n{assistant}</s>
  Trained: each `{assistant}` and the final `</s>` if the last turn is the assistant's.

Contents are stripped of surrounding whitespace in every template.

`CHECKPOINT_TEMPLATE` ('checkpoint') is not rendered here: it selects the tokenizer's own Jinja
chat template (`llamax.tokenizer.chat`; see `llamax.data.sft`). `SFT_TEMPLATES` lists every value
`sft_template` accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from llamax.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Span:
    """A piece of a rendered conversation: text, or a special id ('bos' / 'eos')."""

    text: str = ""
    special: str | None = None
    trained: bool = False


def render_llama2(messages: Sequence[dict]) -> list[Span]:
    """Llama-2 chat format; turns must alternate user, assistant (after an optional system)."""
    messages = list(messages)
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise DataError("llama2 template: a system message must be followed by a user message")
        system = messages[0]["content"].strip()
        merged = f"<<SYS>>\n{system}\n<</SYS>>\n\n{messages[1]['content'].strip()}"
        messages = [{"role": "user", "content": merged}] + messages[2:]
    spans = []
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(f"llama2 template: message {i} has role {message['role']!r}, expected "
                            f"{expected!r} (turns must alternate user/assistant)")
        if expected == "user":
            spans += [Span(special="bos"), Span(f"[INST] {message['content'].strip()} [/INST]")]
        else:
            spans += [Span(message["content"].strip(), trained=True),
                      Span(special="eos", trained=True)]
    return spans


def render_llama3(messages: Sequence[dict]) -> list[Span]:
    """Llama-3 header format; any order of roles is accepted."""
    spans = [Span(special="bos")]
    for message in messages:
        is_assistant = message["role"] == "assistant"
        spans.append(Span(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"))
        spans.append(Span(message["content"].strip() + "<|eot_id|>", trained=is_assistant))
    spans.append(Span(special="eos", trained=messages[-1]["role"] == "assistant"))
    return spans


def render_plain(messages: Sequence[dict]) -> list[Span]:
    """Contents joined by blank lines; only assistant contents (and the final EOS) are trained."""
    spans = [Span(special="bos")]
    for i, message in enumerate(messages):
        separator = "\n\n" if i + 1 < len(messages) else ""
        is_assistant = message["role"] == "assistant"
        spans.append(Span(message["content"].strip(), trained=is_assistant))
        if separator:
            spans.append(Span(separator))
    spans.append(Span(special="eos", trained=messages[-1]["role"] == "assistant"))
    return spans


TEMPLATES: dict[str, Callable[[Sequence[dict]], list[Span]]] = {
    "llama2": render_llama2,
    "llama3": render_llama3,
    "plain": render_plain,
}
CHECKPOINT_TEMPLATE = "checkpoint"
SFT_TEMPLATES = (*sorted(TEMPLATES), CHECKPOINT_TEMPLATE)


def render(messages: Sequence[dict], template: str) -> list[Span]:
    """Spans of a validated conversation (see `llamax.data.sft.parse_record`)."""
    if template not in TEMPLATES:
        raise DataError(f"unknown chat template {template!r}; choose one of {list(SFT_TEMPLATES)}")
    if not messages:
        raise DataError("cannot render an empty conversation")
    return TEMPLATES[template](messages)


def to_text(spans: Sequence[Span], bos: str = "<s>", eos: str = "</s>") -> str:
    """Human-readable rendering (for docs and debugging); specials shown as `bos`/`eos`.

    Spans are tokenized separately and SentencePiece starts each with a space piece, so in tokens
    "[/INST]" and the answer that follows are separated by a space even though this text is not.
    """
    return "".join(bos if s.special == "bos" else eos if s.special == "eos" else s.text
                   for s in spans)
