"""Meta's Llama-3 tokenizer: a tiktoken BPE table plus Llama-3's split pattern and special tokens.

Meta ships Llama-3.x's `tokenizer.model` as text lines `<base64 token bytes> <rank>`; the ranks are
the ids of the base vocabulary (128000 for Llama-3). The 256 special tokens are not in the file:
Meta's `tokenizer.py` numbers them after the base vocabulary in a fixed order, which
`LLAMA3_SPECIAL_TOKENS` (Llama 3, meta-llama/llama3) and `LLAMA3_1_SPECIAL_TOKENS` (Llama 3.1 and
later, meta-llama/llama-models) copy. They agree on every token a text model uses
(`<|begin_of_text|>` 128000, `<|end_of_text|>` 128001, `<|start_header_id|>` 128006,
`<|end_header_id|>` 128007, `<|eot_id|>` 128009); 3.1 names `<|eom_id|>` 128008,
`<|python_tag|>` 128010 and `<|finetune_right_pad_id|>` 128004.

Encoding follows Meta's `Tokenizer.encode`: text is cut into pieces of at most 400k characters and
runs of at most 25k whitespace or non-whitespace characters (tiktoken's regex engine overflows on
longer runs), and special tokens spelled in text are ordinary text unless `allow_special`.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import tiktoken

from llamax.errors import DataError
from llamax.tokenizer.base import ChatMixin, check_stop_ids, check_text, checked_ids, unique_ids

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5)))

_LLAMA3_1_NAMED = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>")
LLAMA3_1_SPECIAL_TOKENS = (
    *_LLAMA3_1_NAMED,
    *(f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_LLAMA3_1_NAMED))))

END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>")
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?$", re.M)


def looks_like_tiktoken(data: bytes) -> bool:
    """Whether a file starts like a tiktoken BPE table: ASCII text with `<base64> <rank>` lines.

    A SentencePiece model is a binary protobuf. A table with a corrupt line still counts, so its
    reader can say which line is wrong.
    """
    head = data[:512]
    is_text = all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head)
    return bool(head) and is_text and _TIKTOKEN_LINE.search(head) is not None


def read_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """The `{token bytes: rank}` table of a tiktoken file, checked line by line.

    Raises:
        DataError: a line is not `<base64> <rank>`, a token or rank repeats, the ranks are not
            0..n-1, or a single byte has no rank (then some text could not be encoded).
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2 or not fields[1].isdigit():
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if not token:
                    raise ValueError("empty token")
            except (ValueError, binascii.Error) as error:
                raise DataError(f"{path}:{line_number}: not a tiktoken BPE line ({error}); expected "
                                f"'<base64 token> <rank>', got {line[:60]!r}") from error
            if token in ranks or rank in seen_ranks:
                what = f"token {token!r}" if token in ranks else f"rank {rank}"
                raise DataError(f"{path}:{line_number}: {what} appears twice; a tiktoken table maps "
                                "each token to one unique rank")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise DataError(f"{path} is empty; expected a tiktoken BPE table ('<base64 token> <rank>' lines)")
    if max(seen_ranks) != len(ranks) - 1:
        raise DataError(f"{path}: the ranks are not 0..{len(ranks) - 1} (largest is {max(seen_ranks)}); "
                        "special tokens are numbered after the base vocabulary, so it must be dense")
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise DataError(f"{path}: {len(missing)} single bytes (e.g. {bytes([missing[0]])!r}) have no "
                        "rank, so some text could not be encoded; not a byte-level BPE table")
    return ranks


_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")


def _split_long_runs(text: str) -> Iterator[str]:
    """Meta's cut: pieces of <= 400k chars, each with runs of <= 25k (non-)whitespace chars."""
    for begin in range(0, len(text), MAX_ENCODE_CHARS):
        piece = text[begin:begin + MAX_ENCODE_CHARS]
        if not _LONG_RUN.search(piece):  # the common case, without a Python loop per character
            yield piece
            continue
        run_length, run_is_space, start = 0, piece[:1].isspace(), 0
        for index, char in enumerate(piece):
            is_space = char.isspace()
            if is_space != run_is_space:
                run_length, run_is_space = 1, is_space
            else:
                run_length += 1
                if run_length > MAX_RUN_CHARS:
                    yield piece[start:index]
                    start, run_length = index, 1
        yield piece[start:]


class TiktokenTokenizer(ChatMixin):
    """A Llama-3 `tokenizer.model` (tiktoken BPE), encoded with the `tiktoken` library.

    Args:
        path: the tiktoken BPE file.
        special_tokens: names of the special tokens, numbered after the base vocabulary;
            `LLAMA3_1_SPECIAL_TOKENS` (default, Meta's current code) or `LLAMA3_SPECIAL_TOKENS`.
        pattern: the pre-tokenizer split regex (Llama-3's by default).
        chat_template: a Jinja chat template; None: the built-in Llama-3 one.
        extra_stop_ids: ids besides `<|end_of_text|>`, `<|eot_id|>`, `<|eom_id|>` that end a
            generation.
    """

    def __init__(self, path: str | os.PathLike, *, special_tokens: Sequence[str] = LLAMA3_1_SPECIAL_TOKENS,
                 pattern: str = LLAMA3_PATTERN, chat_template: str | None = None,
                 extra_stop_ids: Sequence[int] = ()):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer file {str(self.path)!r} does not exist; expected Meta's Llama-3 "
                            "tokenizer.model (a tiktoken BPE table)")
        ranks = read_tiktoken_bpe(self.path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = {token: self.num_base_tokens + i for i, token in enumerate(special_tokens)}
        for required in ("<|begin_of_text|>", "<|end_of_text|>"):
            if required not in self.special_tokens:
                raise DataError(f"special_tokens lacks {required}; pass LLAMA3_1_SPECIAL_TOKENS or "
                                "LLAMA3_SPECIAL_TOKENS")
        self._encoding = tiktoken.Encoding(name=self.path.name, pat_str=pattern, mergeable_ranks=ranks,
                                           special_tokens=self.special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        self._chat_template = chat_template
        self._builtin_template = "llama3"
        self._extra_stop_ids = unique_ids(
            [*(self.special_tokens.get(token) for token in END_OF_TURN_TOKENS),
             *check_stop_ids(extra_stop_ids, self.vocab_size, self.path)])

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus special tokens (128256 for Llama-3)."""
        return self.num_base_tokens + len(self.special_tokens)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        """`<|end_of_text|>`, as in Meta's tokenizer; `stop_ids` adds `<|eot_id|>` and `<|eom_id|>`."""
        return self.special_tokens["<|end_of_text|>"]

    @property
    def pad_id(self) -> int | None:
        """`<|finetune_right_pad_id|>` (Llama 3.1+), else None: Llama 3 defines no pad token."""
        return self.special_tokens.get("<|finetune_right_pad_id|>")

    def template_variables(self) -> dict[str, str]:
        return {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}

    def encode(self, text: str, bos: bool = True, eos: bool = False, *,
               allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with `<|begin_of_text|>` first if `bos`, `<|end_of_text|>` last if `eos`.

        Text that spells a special token is encoded as ordinary text unless `allow_special`.
        """
        check_text(text, "TiktokenTokenizer")
        ids = [self.bos_id] if bos else []
        for piece in _split_long_runs(text):
            if allow_special:
                ids += self._encoding.encode(piece, allowed_special="all")
            else:
                ids += self._encoding.encode_ordinary(piece)
        return ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False, *,
                     allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts (tiktoken's thread pool when none needs Meta's long-run cut)."""
        texts = list(texts)
        for index, text in enumerate(texts):
            check_text(text, "TiktokenTokenizer", index)
        if allow_special or any(len(text) > MAX_RUN_CHARS for text in texts):
            return [self.encode(text, bos, eos, allow_special=allow_special) for text in texts]
        prefix, suffix = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [prefix + ids + suffix for ids in self._encoding.encode_ordinary_batch(texts)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (special tokens spelled out unless `skip_special`); bytes that do not
        form whole UTF-8 characters become U+FFFD, as in tiktoken."""
        checked = checked_ids(ids, self.vocab_size, "TiktokenTokenizer")
        if skip_special:
            checked = [token_id for token_id in checked if token_id not in self._special_ids]
        return self._encoding.decode(checked)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's name for special ids)."""
        return self._encoding.decode_single_token_bytes(checked_ids([token_id], self.vocab_size,
                                                                    "TiktokenTokenizer")[0])

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
