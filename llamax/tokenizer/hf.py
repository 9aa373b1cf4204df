"""Hugging Face `tokenizer.json` tokenizers (Llama-3 on the hub, SmolLM2, ...) via `tokenizers`.

`HFTokenizer.from_pretrained(path)` reads a folder (or a tokenizer.json and the files beside it,
see `llamax.tokenizer.files`); `HFTokenizer(tokenizers.Tokenizer, bos_id=..., eos_id=...)` wraps a
tokenizer built in memory (e.g. from GGUF metadata).

Encoding matches transformers' fast tokenizer: `encode(text)` equals `tokenizer(text)["input_ids"]`
with `split_special_tokens=True` (special tokens spelled in text stay text), and
`encode(text, bos=False, allow_special=True)` equals `tokenizer(text, add_special_tokens=False)`.
BOS is added only when the tokenizer's own encoding adds it (`add_bos`): Llama-3 does,
SmolLM2/ChatML-style tokenizers do not. Only BPE models are read (every LLaMA-family tokenizer).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import tokenizers

from llamax.errors import DataError
from llamax.tokenizer import chat
from llamax.tokenizer.base import ChatMixin, check_text, checked_ids, unique_ids
from llamax.tokenizer.files import TOKENIZER_JSON, read_folder_metadata

END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>")


def _copy(tokenizer: tokenizers.Tokenizer, encode_special_tokens: bool) -> tokenizers.Tokenizer:
    # Two copies instead of toggling one flag per call: grain tokenizes in several threads.
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()  # a tokenizer.json may carry truncation/padding meant for another use
    copy.no_padding()
    copy.encode_special_tokens = encode_special_tokens
    return copy


class HFTokenizer(ChatMixin):
    """A `tokenizers.Tokenizer` with llamax's tokenizer interface.

    Args:
        tokenizer: the tokenizer (a BPE model).
        bos_id: id of the BOS token, or None if the model has none.
        eos_id: id that ends a document (tokenizer_config's `eos_token`).
        pad_id: id of the pad token, or None.
        stop_ids: ids besides `eos_id` that end a generation (generation_config's eos ids);
            `<|eot_id|>` and `<|eom_id|>` are added when the vocabulary has them.
        chat_template: the Jinja chat template, or None (built-in Llama-3 template if the
            vocabulary has `<|start_header_id|>`, else Llama-2's).
        add_bos: whether `encode(text, bos=True)` starts with BOS; None: as the tokenizer's own
            post-processor does.
        template_variables: special-token strings for the chat template (default: the tokens of
            bos_id/eos_id/pad_id).
        path: the file or folder it was read from (for messages).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int,
                 pad_id: int | None = None, stop_ids: Sequence[int] = (), chat_template: str | None = None,
                 add_bos: bool | None = None, template_variables: Mapping[str, str] | None = None,
                 path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        where = f"tokenizer {self.path}" if self.path else "the tokenizer"
        model_type = type(tokenizer.model).__name__
        if model_type != "BPE":
            raise DataError(f"{where} is a {model_type} model; llamax reads BPE tokenizers "
                            "(LLaMA-family tokenizer.json files are byte-level or byte-fallback BPE)")
        self._plain = _copy(tokenizer, encode_special_tokens=True)
        self._special = _copy(tokenizer, encode_special_tokens=False)
        vocabulary = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocabulary.values()) + 1
        for name, token_id in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id),
                               *(("stop_ids", i) for i in stop_ids)):
            if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < self._vocab_size):
                raise DataError(f"{where}: {name} {token_id!r} is not an id in [0, {self._vocab_size})")
        if eos_id is None:
            raise DataError(f"{where} names no EOS token; set eos_token in tokenizer_config.json "
                            "or eos_token_id in generation_config.json")
        self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
        if add_bos is None:
            with_specials = self._special.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_specials[:1] == [bos_id]
        self.add_bos = bool(add_bos) and bos_id is not None
        self._extra_stop_ids = unique_ids([*stop_ids, *(vocabulary.get(t) for t in END_OF_TURN_TOKENS)])
        self._chat_template = chat_template
        self._builtin_template = "llama3" if "<|start_header_id|>" in vocabulary else "llama2"
        defaults = {name: tokenizer.id_to_token(token_id) for name, token_id in
                    (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id))
                    if token_id is not None}
        self._template_variables = {**defaults, **(template_variables or {})}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HFTokenizer":
        """Reads an HF folder, or a `tokenizer.json` plus the metadata files beside it."""
        path = Path(path)
        file = path / TOKENIZER_JSON if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"{file} does not exist; expected a Hugging Face tokenizer.json")
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
            model_type = spec["model"]["type"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{file} is not a Hugging Face tokenizer.json ({type(error).__name__}: "
                            f"{error})") from error
        if model_type != "BPE":
            raise DataError(f"{file} holds a {model_type} tokenizer; llamax reads BPE tokenizers "
                            "(LLaMA-family tokenizer.json files are byte-level or byte-fallback BPE)")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as error:  # tokenizers raises a bare Exception on malformed specs
            raise DataError(f"tokenizers could not load {file}: {error}") from error
        meta = read_folder_metadata(file.parent)

        def token_id(name: str) -> int | None:
            token = meta.tokens.get(name)
            if token is None:
                return meta.token_ids.get(f"{name}_id")
            found = tokenizer.token_to_id(token)
            if found is None:
                raise DataError(f"{file.parent}: {name} {token!r} is not in {file.name}'s vocabulary")
            return found

        eos_id = token_id("eos_token")
        if eos_id is None and meta.eos_ids:
            eos_id = meta.eos_ids[0]
        if meta.chat_template is not None:
            try:
                chat.compile_template(meta.chat_template)
            except DataError as error:
                raise DataError(f"{file.parent}: {error}") from error
        return cls(tokenizer, bos_id=token_id("bos_token"), eos_id=eos_id, pad_id=token_id("pad_token"),
                   stop_ids=meta.eos_ids, chat_template=meta.chat_template, add_bos=meta.add_bos,
                   template_variables=meta.tokens, path=file.parent if path.is_dir() else file)

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (special tokens in text are split out)."""
        return self._special

    def template_variables(self) -> dict[str, str]:
        return dict(self._template_variables)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self._bos_id] if bos and self.add_bos else []) + ids + ([self._eos_id] if eos else [])

    def encode(self, text: str, bos: bool = True, eos: bool = False, *,
               allow_special: bool = False) -> list[int]:
        """Token ids of `text`; BOS first if `bos` and the tokenizer uses one, EOS last if `eos`.

        Text that spells a special token is encoded as ordinary text unless `allow_special`.
        """
        check_text(text, "HFTokenizer")
        backend = self._special if allow_special else self._plain
        return self._wrap(backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False, *,
                     allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts, in parallel in `tokenizers`' thread pool."""
        texts = list(texts)
        for index, text in enumerate(texts):
            check_text(text, "HFTokenizer", index)
        backend = self._special if allow_special else self._plain
        return [self._wrap(e.ids, bos, eos) for e in backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (special tokens spelled out unless `skip_special`), as transformers decodes."""
        checked = checked_ids(ids, self._vocab_size, "HFTokenizer")
        return self._special.decode(checked, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._special.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._special.id_to_token(token_id)

    def __repr__(self) -> str:
        where = f"{str(self.path)!r}, " if self.path else ""
        return f"HFTokenizer({where}vocab_size={self._vocab_size})"
