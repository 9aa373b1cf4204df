"""Text in and out of a served model: which tokenizer, how a conversation becomes a prompt.

`load_serving_tokenizer(checkpoint, tokenizer)` finds the tokenizer (the checkpoint's own unless
one is named; a training run's recorded copy) and returns a `ChatFormat`: encode/decode, the ids and strings that end a reply,
and `prompt_ids(messages)`, the token ids of a conversation followed by the assistant's turn.

Two sources of a chat format:
  * the tokenizer's own (`apply_chat_template`: the checkpoint's Jinja template, else the built-in
    Llama-2/3 one `llamax.tokenizer` picks): its text is encoded with special tokens allowed;
  * a built-in template of `llamax.data.chat_templates` (plain, llama2, llama3), rendered span by
    span exactly as SFT encodes training conversations, so a model fine-tuned with llamax sees the
    same tokens when served. `--chat_template` picks one and overrides the tokenizer's own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from llamax.data import chat_templates
from llamax.errors import DataError

BUILTIN_TEMPLATES = tuple(sorted(chat_templates.TEMPLATES))
# Reply ends a template spells as text: a tokenizer without the marker as one piece produces it as
# several tokens, so it is matched as a stop string as well as a stop id.
_TEMPLATE_STOPS = {"llama3": ("<|eot_id|>",), "llama2": ("[INST]",), "plain": ()}


class ChatFormat:
    """A tokenizer plus the conversation format of a served model.

    Args:
      tokenizer: anything with encode(text, bos=, eos=), decode(ids), bos_id, eos_id, vocab_size;
        optional stop_ids and apply_chat_template(messages, add_generation_prompt).
      template: a built-in template name; None uses the tokenizer's own (else 'plain').
    """

    def __init__(self, tokenizer: Any, template: str | None = None):
        if template is not None and template not in chat_templates.TEMPLATES:
            raise DataError(f"unknown chat template {template!r}; choose one of {list(BUILTIN_TEMPLATES)}")
        own = getattr(tokenizer, "apply_chat_template", None)
        self.tokenizer = tokenizer
        self.template = template or (None if callable(own) else "plain")
        stop_ids = set(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))
        stop_strings = _TEMPLATE_STOPS.get(self.template, ())
        for marker in stop_strings:  # the marker as one piece of this tokenizer, if it is one
            piece_id = _single_piece_id(tokenizer, marker)
            if piece_id is not None:
                stop_ids.add(piece_id)
        self.stop_ids = tuple(sorted(i for i in stop_ids if i is not None and i >= 0))
        self.stop_strings = stop_strings

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, bos=bos, eos=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids the tokenizer lacks (a model vocabulary padded past it) print nothing."""
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.tokenizer.vocab_size])

    def token_text(self, token: int) -> str:
        """One token as text for logprobs: SentencePiece's '▁' shown as a space, a byte piece
        `<0xNN>` as its character (ASCII) or as OpenAI spells a lone byte, `bytes:\\xNN`."""
        if 0 <= token < self.tokenizer.vocab_size and hasattr(self.tokenizer, "id_to_piece"):
            piece = self.tokenizer.id_to_piece(token)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                value = int(piece[3:5], 16)
                return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
            return piece.replace("\u2581", " ")
        return self.decode([token])

    def completion_ids(self, prompt: str) -> list[int]:
        """A raw completion prompt: BOS + the text."""
        return self.encode(prompt, bos=True)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of the conversation followed by the opening of the assistant's reply.

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] (checked by the
        caller); a template that cannot render them raises DataError.
        """
        if not messages:
            raise DataError("messages is empty; send at least one message")
        if self.template is None:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            try:  # the template writes BOS and turn markers as text: let them become their ids
                ids = list(self.tokenizer.encode(text, bos=False, eos=False, allow_special=True))
            except TypeError:  # a tokenizer without special-token parsing
                ids = self.encode(text)
            return ids  # as transformers tokenizes a rendered template: BOS only if it writes one
        # Render with an empty assistant turn and cut before its content: what remains is exactly
        # the prompt that SFT trained the reply to follow (llamax.data.sft encodes the same spans).
        spans = chat_templates.render([*messages, {"role": "assistant", "content": ""}], self.template)
        reply = max(i for i, span in enumerate(spans) if span.trained)
        while spans[reply - 1].trained:  # back to the start of the reply (content, end markers)
            reply -= 1
        ids: list[int] = []
        for span in spans[:reply]:
            if span.special == "bos":
                ids.append(self.tokenizer.bos_id)
            elif span.special == "eos":
                ids.append(self.tokenizer.eos_id)
            elif span.text:
                ids += self.encode(span.text)
        return ids


def _single_piece_id(tokenizer: Any, text: str) -> int | None:
    """The id of the piece spelled exactly `text` (e.g. a user-defined `<|eot_id|>`), or None."""
    if not hasattr(tokenizer, "piece_to_id"):
        return None
    piece_id = tokenizer.piece_to_id(text)
    return piece_id if tokenizer.id_to_piece(piece_id) == text else None


def checkpoint_tokenizer_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's own tokenizer is: a training run's copy (`<run>/tokenizer/`, else the
    run's INIT_FROM), or the checkpoint itself (an HF/Meta folder or a GGUF file holds one)."""
    from llamax import run_dir

    path = Path(checkpoint)
    if run_dir.is_run_dir(path):
        run = run_dir.RunDir(path)
        for candidate in (run.tokenizer(), run.init_from()):
            if candidate is not None and Path(candidate).exists():
                return Path(candidate)
    return path


def load_serving_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                           template: str | None = None, model_vocab_size: int | None = None) -> ChatFormat:
    """The ChatFormat of a served checkpoint: `tokenizer` (a file or folder) if given, else the
    checkpoint's own (`checkpoint_tokenizer_path`), read by `llamax.tokenizer.load_tokenizer`
    (SentencePiece, tiktoken, HF tokenizer.json or GGUF, with the folder's chat template and
    stop ids). DataError naming what to pass when there is none or it is larger than the model.
    """
    from llamax.tokenizer import load_tokenizer

    source = Path(tokenizer) if tokenizer is not None else checkpoint_tokenizer_path(checkpoint)
    try:
        loaded = load_tokenizer(source)
    except DataError as error:
        if tokenizer is not None:
            raise
        raise DataError(f"no tokenizer found for the checkpoint {str(checkpoint)!r} ({error}); pass "
                        "--tokenizer with a tokenizer.model / tokenizer.json file or a folder "
                        "holding one") from error
    if model_vocab_size is not None and loaded.vocab_size > model_vocab_size:
        raise DataError(f"tokenizer {str(source)!r} has {loaded.vocab_size} pieces but the model's "
                        f"vocabulary has {model_vocab_size}: it belongs to another model; pass the "
                        "tokenizer this checkpoint was trained with")
    return ChatFormat(loaded, template)
