"""What every llamax tokenizer shares: chat rendering, stop ids, id checks, `check_vocab`.

The three tokenizers (`Tokenizer` for SentencePiece, `TiktokenTokenizer`, `HFTokenizer`) subclass
`ChatMixin` and provide the same interface:

    encode(text, bos=True, eos=False, allow_special=False) -> list[int]
    encode_batch(texts, bos=True, eos=False, allow_special=False) -> list[list[int]]
    decode(ids, skip_special=False) -> str
    vocab_size, bos_id, eos_id, pad_id, stop_ids, chat_template
    apply_chat_template(messages, add_generation_prompt=False) -> str

`allow_special=False` (the default) encodes text that spells a special token (`<|eot_id|>`) as
ordinary text, like tiktoken's `disallowed_special=()`: user text can never inject control
tokens. Rendered chat templates are encoded with `allow_special=True`.
"""
from __future__ import annotations

import operator
from typing import Iterable, Mapping, Sequence

from llamax.errors import DataError
from llamax.tokenizer import chat


class ChatMixin:
    """`apply_chat_template` and `stop_ids` from a few attributes the subclass sets.

    Subclasses set `self._chat_template` (str or None), `self._builtin_template` ('llama2' or
    'llama3', used when there is no template) and `self._extra_stop_ids`, and implement
    `template_variables()` and `eos_id`.
    """

    _chat_template: str | None = None
    _builtin_template: str = "llama3"
    _extra_stop_ids: tuple[int, ...] = ()

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's Jinja chat template, or None (then a built-in one is used)."""
        return self._chat_template

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: EOS, end-of-turn markers, generation_config's EOS ids."""
        return unique_ids([self.eos_id, *self._extra_stop_ids])

    def template_variables(self) -> dict[str, str]:
        """Special-token strings a chat template may read (`bos_token`, `eos_token`, ...)."""
        raise NotImplementedError

    def effective_chat_template(self) -> str:
        """The Jinja source `apply_chat_template` renders with."""
        return self._chat_template or chat.BUILTIN_TEMPLATES[self._builtin_template]

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False
                            ) -> str:
        """The conversation as text, as transformers' `apply_chat_template(tokenize=False)` renders it.

        Encode the result with `encode(text, bos=False, allow_special=True)`: the template writes
        BOS and the turn markers itself.
        """
        return chat.render_chat(self.effective_chat_template(), messages,
                                add_generation_prompt=add_generation_prompt,
                                variables=self.template_variables())


def unique_ids(ids: Iterable[int | None]) -> tuple[int, ...]:
    """The ids in first-seen order without repeats or Nones."""
    seen: dict[int, None] = {}
    for token_id in ids:
        if token_id is not None:
            seen.setdefault(int(token_id), None)
    return tuple(seen)


def check_stop_ids(ids: Iterable[int], vocab_size: int, where) -> tuple[int, ...]:
    """`ids` as a tuple; DataError if one is not a token id of a `vocab_size` vocabulary."""
    ids = tuple(ids)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise DataError(f"{where}: stop id {token_id!r} (e.g. an eos_token_id of "
                            f"generation_config.json) is not a token id in [0, {vocab_size})")
    return ids


def checked_ids(ids: Iterable, vocab_size: int, owner: str) -> list[int]:
    """`ids` as Python ints; DataError naming the first one outside `[0, vocab_size)`.

    Integers of any kind pass (numpy/jax scalars); floats and bools do not.
    """
    checked = []
    for position, token_id in enumerate(ids):
        try:
            value = None if isinstance(token_id, bool) else operator.index(token_id)
        except TypeError:
            value = None
        if value is None or not 0 <= value < vocab_size:
            raise DataError(f"{owner}.decode: id {token_id!r} at position {position} is not an integer "
                            f"in [0, {vocab_size}); was it produced by another tokenizer or a model "
                            "with a larger vocab_size?")
        checked.append(value)
    return checked


def check_text(text, owner: str, index: int | None = None) -> None:
    """DataError unless `text` is a str of valid Unicode (no lone surrogates)."""
    where = "" if index is None else f" text {index}"
    if not isinstance(text, str):
        raise DataError(f"{owner}.encode{where}: expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(
            f"{owner}.encode{where}: character {error.start} ({text[error.start]!r}) is a lone "
            "surrogate, not valid Unicode. Decode input files with errors='replace' (or re-encode "
            "them as UTF-8) before tokenizing") from error


def describe(tokenizer) -> str:
    """A short name for messages: the tokenizer's file or folder, else its class."""
    path = getattr(tokenizer, "path", None)
    return str(path) if path is not None else type(tokenizer).__name__


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Raises DataError if the tokenizer can emit ids the model's embedding table lacks.

    A model vocabulary larger than the tokenizer's is fine (LLaMA pads tables to a multiple of 64
    or 128 for speed); a smaller one would index out of range, which JAX does silently.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {describe(tokenizer)} has {tokenizer.vocab_size} pieces but the model's "
            f"vocab_size is {model_vocab_size}; ids >= {model_vocab_size} would silently index out "
            f"of range. Set ModelConfig.vocab_size >= {tokenizer.vocab_size} (e.g. "
            f"{-(-tokenizer.vocab_size // 128) * 128}) or use the tokenizer the model was trained with")
