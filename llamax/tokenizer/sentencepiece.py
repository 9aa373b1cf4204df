"""SentencePiece tokenizer: load a `tokenizer.model` (ours or Meta's LLaMA-1/2), train a new one.

A tokenizer trained by `train_tokenizer` uses LLaMA's conventions, so code written against one
works with the other: BPE with byte fallback (any UTF-8 text round-trips; characters outside the
vocabulary become `<0xNN>` byte pieces), identity normalisation, digits split, whitespace kept,
ids `<unk>`=0, `<s>`=1, `</s>`=2 and no pad piece.

Llama-3's `tokenizer.model` is a tiktoken BPE table, not a SentencePiece model; `Tokenizer` raises
a DataError that says so (`llamax.tokenizer.load_tokenizer` reads either).
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from llamax.errors import DataError
from llamax.tokenizer.base import ChatMixin, check_stop_ids, check_text, checked_ids
from llamax.tokenizer.tiktoken_bpe import looks_like_tiktoken

log = logging.getLogger(__name__)


class Tokenizer(ChatMixin):
    """Thin, typed wrapper over `sentencepiece.SentencePieceProcessor`.

    Args:
        model_path: path to a SentencePiece `tokenizer.model` file.
        chat_template: a Jinja chat template (e.g. from an HF folder's tokenizer_config.json);
            None: the built-in Llama-2 template, or Llama-3's if the model has its header pieces.
        extra_stop_ids: ids besides EOS that end a generation (generation_config's eos ids).
    """

    def __init__(self, model_path: str | os.PathLike, *, chat_template: str | None = None,
                 extra_stop_ids: Sequence[int] = ()):
        path = Path(model_path)
        if not path.is_file():
            raise DataError(
                f"tokenizer file {str(path)!r} does not exist. Pass the path of a SentencePiece "
                "`tokenizer.model` (e.g. from a LLaMA-2 checkpoint) or train one with "
                "`python -m experiments.tokenizer --input FILES... --output DIR --vocab_size 2048`")
        data = path.read_bytes()
        if looks_like_tiktoken(data):
            raise DataError(
                f"{str(path)!r} is a tiktoken BPE table (Llama-3 format), not a SentencePiece model; "
                "load it with llamax.tokenizer.load_tokenizer (or TiktokenTokenizer)")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise DataError(
                f"could not load {str(path)!r} as a SentencePiece model ({e}); expected a "
                "`tokenizer.model` written by sentencepiece") from e
        self.path = path
        self._chat_template = chat_template
        self._extra_stop_ids = check_stop_ids(extra_stop_ids, self.vocab_size, path)
        header = self._sp.PieceToId("<|start_header_id|>")
        self._builtin_template = "llama3" if header != self._sp.unk_id() else "llama2"
        controls = [self._sp.IdToPiece(i) for i in range(self.vocab_size) if self._sp.IsControl(i)]
        self._control_ids = {piece: self._sp.PieceToId(piece) for piece in controls}
        self._control_pattern = (re.compile("(" + "|".join(map(re.escape, controls)) + ")")
                                 if controls else None)

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is in `[0, vocab_size)`."""
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Id used to fill padding. LLaMA models define no pad piece, so this is then 0 (`<unk>`),
        which is harmless: padding has `segment_ids == 0` and `loss_mask == 0`."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else 0

    @property
    def declared_pad_id(self) -> int | None:
        """The model's own pad piece, or None (what an exported checkpoint records as pad_token_id)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """EOS (`</s>`) and any `extra_stop_ids`."""
        return super().stop_ids

    def template_variables(self) -> dict[str, str]:
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self._sp.unk_id()}
        return {name: self._sp.IdToPiece(i) for name, i in ids.items() if i >= 0}

    def encode(self, text: str, bos: bool = True, eos: bool = False, *,
               allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with `<s>` first if `bos` and `</s>` last if `eos`.

        sentencepiece never makes control pieces (`<s>`, `</s>`) from text; with `allow_special`
        the control pieces spelled in `text` (e.g. by a chat template) become their ids, and the
        text between them is encoded piece by piece, as transformers' LlamaTokenizer does.
        (`user_defined_symbols` are ordinary pieces: they come from text either way.)
        """
        check_text(text, "Tokenizer")
        if allow_special and self._control_pattern is not None:
            ids = []
            for part in self._control_pattern.split(text):
                if part in self._control_ids:
                    ids.append(self._control_ids[part])
                elif part:
                    ids += self._sp.EncodeAsIds(part)
        else:
            ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False, *,
                     allow_special: bool = False, num_threads: int = 0) -> list[list[int]]:
        """`encode` for many texts; sentencepiece spreads the work over `num_threads` (0 = all)."""
        texts = list(texts)
        if allow_special:
            return [self.encode(text, bos, eos, allow_special=True) for text in texts]
        try:
            ids = self._sp.Encode(texts, add_bos=bos, add_eos=eos, num_threads=num_threads)
        except (RuntimeError, TypeError):
            for index, text in enumerate(texts):
                check_text(text, "Tokenizer", index)
            raise
        return [list(x) for x in ids]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; sentencepiece always drops `<s>`, `</s>` and other control pieces.

        Raises:
            DataError: an id is not an integer in `[0, vocab_size)` (sentencepiece would raise
                an IndexError, or silently truncate a float).
        """
        return self._sp.DecodeIds(checked_ids(ids, self.vocab_size, "Tokenizer"))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.PieceToId(piece)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    vocab_size: int = 2048,
    *,
    max_sentences: int = 200_000,
    character_coverage: float = 0.9999,
    user_defined_symbols: Sequence[str] = (),
    num_threads: int | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Trains a LLaMA-style BPE SentencePiece model on text files and writes `out_path`.

    Args:
        files: plain-text files; each line is one training sentence.
        out_path: where to write the model (e.g. `out/tokenizer.model`); a `.vocab` file with the
            pieces and scores is written next to it.
        vocab_size: number of pieces, including the 3 control pieces and 256 byte pieces.
        max_sentences: at most this many lines (sampled with `seed`) are used; keeps training fast.
        character_coverage: fraction of characters that get their own piece; the rare rest is
            spelled with byte pieces.
        user_defined_symbols: strings that always become one piece (e.g. chat-template markers
            such as `<|eot_id|>`).
        num_threads: training threads (default: all CPUs).
        seed: sampling seed (sentencepiece's own trainer is otherwise deterministic).

    Returns:
        The trained Tokenizer.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("train_tokenizer got no input files; pass at least one text file")
    for path in paths:
        if not path.is_file():
            raise DataError(f"tokenizer training input {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise DataError(f"tokenizer training input {str(path)!r} is empty")
    min_vocab = 3 + 256 + len(user_defined_symbols) + 1
    if vocab_size < min_vocab:
        raise DataError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 3 control + 256 byte "
            f"pieces; use vocab_size >= {min_vocab} (2048 or more is typical)")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    start = time.perf_counter()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.Train(
            input=[str(p) for p in paths],
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=True,
            max_sentence_length=1 << 14,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            user_defined_symbols=list(user_defined_symbols),
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece could not train on {[str(p) for p in paths]}: {e}") from e
    out.write_bytes(model.getvalue())
    tokenizer = Tokenizer(out)
    with open(out.with_suffix(".vocab"), "w", encoding="utf-8") as f:
        for i in range(tokenizer.vocab_size):
            f.write(f"{tokenizer.id_to_piece(i)}\t{tokenizer._sp.GetScore(i)}\n")
    log.info("trained %d-piece tokenizer on %d files in %.1fs -> %s", vocab_size, len(paths),
             time.perf_counter() - start, out)
    return tokenizer
