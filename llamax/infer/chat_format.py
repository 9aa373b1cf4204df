"""Text in and out of a served model: which tokenizer, how a conversation becomes a prompt.

`load_serving_tokenizer(checkpoint, tokenizer)` reads the checkpoint's identity
(`llamax.convert.identity`: its tokenizer unless one is named, and its special ids) and returns a
`ChatFormat`: encode/decode, the ids and strings that end a reply, and `prompt_ids(messages)`, the
token ids of a conversation followed by the assistant's turn. A reply ends at every EOS id the
checkpoint declares (Llama-3-Instruct: `<|eot_id|>` and `<|end_of_text|>`), as transformers'
`generate` stops at generation_config.json's `eos_token_id` list.

Two sources of a chat format:
  * the tokenizer's own (`apply_chat_template`: the checkpoint's Jinja template, else the built-in
    Llama-2/3 one `llamax.tokenizer` picks): its text is encoded with special tokens allowed;
  * a built-in template of `llamax.data.chat_templates` (plain, llama2, llama3), rendered span by
    span exactly as SFT encodes training conversations, so a model fine-tuned with llamax sees the
    same tokens when served. `--chat_template` picks one and overrides the tokenizer's own.
"""
from __future__ import annotations

import os
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
      special_ids: the checkpoint's `SpecialIds`; its EOS ids end a reply besides the tokenizer's.
    """

    def __init__(self, tokenizer: Any, template: str | None = None, special_ids: Any = None):
        if template is not None and template not in chat_templates.TEMPLATES:
            raise DataError(f"unknown chat template {template!r}; choose one of {list(BUILTIN_TEMPLATES)}")
        own = getattr(tokenizer, "apply_chat_template", None)
        self.tokenizer = tokenizer
        self.template = template or (None if callable(own) else "plain")
        stop_ids = set(getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))
        stop_ids.update(special_ids.eos_ids if special_ids is not None else ())
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


def load_serving_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                           template: str | None = None, model_vocab_size: int | None = None) -> ChatFormat:
    """The ChatFormat of a served checkpoint (HF/Meta folder, GGUF file, params checkpoint or run).

    The tokenizer is `tokenizer` (a file, folder or another checkpoint) if given, else the
    checkpoint's own (`llamax.convert.identity.checkpoint_tokenizer`: a run's recorded copy, else
    its INIT_FROM's). Replies stop at the tokenizer's stop ids and at every EOS id the identity
    declares (generation_config.json / config.json, a run's special_ids.json).

    Raises:
        DataError: no tokenizer (naming --tokenizer), one larger than the model, or special ids
            outside the model's vocabulary.
        CheckpointError: `checkpoint` does not exist.
    """
    from llamax.convert.identity import checkpoint_tokenizer, identity_of, read_identity

    loaded = checkpoint_tokenizer(checkpoint, tokenizer, vocab_size=model_vocab_size)
    identity = identity_of(tokenizer) if tokenizer is not None else read_identity(checkpoint)
    special_ids = identity.special_ids
    if special_ids is not None and model_vocab_size is not None:
        special_ids.check_vocab(model_vocab_size, str(tokenizer or checkpoint))
    return ChatFormat(loaded, template, special_ids)
