"""The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`), as a `tokenizers.Tokenizer`.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, token types, merges (byte-level
BPE) or scores (SentencePiece), special ids, a pre-tokenizer *name* and the chat template as
metadata. This module rebuilds the tokenizer llama.cpp runs from them:

  tokenizer.ggml.model  | rebuilt as
  gpt2                  | byte-level BPE from tokens + merges; text split by the named
                        | pre-tokenizer (`PRE_TOKENIZERS`: gpt-2, smollm, llama-bpe, qwen2)
  llama                 | SentencePiece-style BPE with byte fallback; merges ordered by the
                        | merged piece's score (what SentencePiece's BPE does), "▁" for spaces

Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
tokens, so `<|im_start|>` in a chat prompt stays one token. `tokenizer_from_gguf(path)` returns
the tokenizer with its special ids and chat template (`GGUFTokenizer`); `llamax.tokenizer.hf.
HFTokenizer` wraps it for training and sampling. The other direction (a tokenizer.json or
tokenizer.model into GGUF metadata) is `llamax.convert.gguf_vocab`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from llamax.errors import DataError
from llamax.tokenizer.train_llama3 import byte_to_unicode

# gguf.TokenType values (llama.cpp's llama_token_type), also SentencePiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level vocabulary splits text before BPE, as llama.cpp's `tokenizer.ggml.pre` names it."""

    split_regex: str | None = None  # None: GPT-2's regex inside ByteLevel
    split_digits: bool = False  # every digit its own piece first (StarCoder, SmolLM)
    ignore_merges: bool = False  # a piece that is a whole token skips BPE (llama.cpp: LLAMA3)

    def build(self) -> pre_tokenizers.PreTokenizer:
        if self.split_regex is not None:
            return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(self.split_regex), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self.split_digits:
            return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        return byte_level


PRE_TOKENIZERS = {
    "gpt-2": PreTokenizer(),
    "smollm": PreTokenizer(split_digits=True),
    "llama-bpe": PreTokenizer(LLAMA3_SPLIT, ignore_merges=True),
    "qwen2": PreTokenizer(QWEN2_SPLIT),
}
# Other names llama.cpp gives the same splitting (llama-vocab.cpp).
PRE_TOKENIZER_ALIASES = {"default": "gpt-2", "starcoder": "smollm", "refact": "smollm", "llama3": "llama-bpe",
                         "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2"}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """A GGUF's tokenizer: the `tokenizers.Tokenizer` plus what llama.cpp keeps beside it."""

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    stop_ids: tuple[int, ...]  # eos, end-of-turn and end-of-message ids: generation stops at any
    chat_template: str | None
    add_bos: bool  # llama.cpp prepends bos when tokenizing a prompt
    add_eos: bool


def read_tokenizer_metadata(reader: Any) -> dict[str, Any]:
    """Every `tokenizer.*` metadata value of an open `gguf.GGUFReader`, as Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def tokenizer_from_gguf(path_or_metadata: str | os.PathLike | Mapping[str, Any]) -> GGUFTokenizer:
    """The tokenizer of a GGUF file (or of its `read_tokenizer_metadata`). DataError naming
    what is missing or unsupported (no merges, an unknown pre-tokenizer or tokenizer model)."""
    if isinstance(path_or_metadata, Mapping):
        meta, where = path_or_metadata, "GGUF metadata"
    else:
        from llamax.convert.gguf import open_gguf
        meta, where = read_tokenizer_metadata(open_gguf(path_or_metadata)), str(path_or_metadata)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise DataError(f"{where} carries no tokenizer (tokenizer.ggml.model / tokens); pass a tokenizer "
                        "separately (a tokenizer.json or tokenizer.model)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise DataError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        tokenizer = _byte_level(meta, tokens, types, where)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece(meta, tokens, types, where)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise DataError(f"{where}: tokenizer.ggml.model={kind!r} is not supported; llamax rebuilds 'gpt2' "
                        "(byte-level BPE) and 'llama' (SentencePiece) tokenizers")

    def special(name: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    tokenizer = _with_post_processor(tokenizer, tokens, bos if add_bos else None, eos if add_eos else None)
    stops = tuple(dict.fromkeys(i for i in (eos, special("eot"), special("eom")) if i is not None))
    template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(tokenizer, bos, eos, special("padding"), special("unknown"), stops,
                         template if isinstance(template, str) else None, add_bos, add_eos)


def _added_tokens(tokenizer: Tokenizer, vocab: Mapping[str, int], tokens: list[str], types: list[int]) -> None:
    """Control tokens -> special added tokens, user-defined -> added tokens: matched whole in text."""
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
               if kind == CONTROL and t in vocab]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and t in vocab]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


def _byte_level(meta: Mapping[str, Any], tokens: list[str], types: list[int], where: str) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise DataError(f"{where} has a byte-level BPE tokenizer (tokenizer.ggml.model='gpt2') without "
                        "tokenizer.ggml.merges; it cannot be rebuilt without its merges")
    name = meta.get("tokenizer.ggml.pre", "default")
    name = PRE_TOKENIZER_ALIASES.get(name, name)
    if name not in PRE_TOKENIZERS:
        raise DataError(f"{where}: pre-tokenizer tokenizer.ggml.pre={name!r} is not one llamax implements "
                        f"({sorted(PRE_TOKENIZERS)} and aliases {sorted(PRE_TOKENIZER_ALIASES)})")
    pre = PRE_TOKENIZERS[name]
    # Every real token is spelled in the byte alphabet; a token stored as raw text (a mislabeled
    # added token) is respelled, as transformers' and llama.cpp's loaders do.
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {token: index for index, token in reversed(list(enumerate(spelled)))}  # first id wins
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise DataError(f"{where}: merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre.build()
    tokenizer.decoder = decoders.ByteLevel()
    _added_tokens(tokenizer, vocab, spelled, types)
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: every split of a piece into two pieces,
    best merged-piece score first (ties: longer left part), like transformers' converter."""
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, index in mergeable.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in mergeable and piece[k:] in mergeable]
        local.sort(key=lambda pair: (mergeable[pair[0]], mergeable[pair[1]]))
        merges.extend((left, right, scores[index]) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], types: list[int], where: str) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise DataError(f"{where} has a SentencePiece tokenizer (tokenizer.ggml.model='llama') without one "
                        "tokenizer.ggml.scores value per token; its merges cannot be recovered")
    vocab = {token: index for index, token in reversed(list(enumerate(tokens)))}
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unknown)] if unknown is not None and 0 <= int(unknown) < len(tokens) else None
    merges = meta.get("tokenizer.ggml.merges")
    pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges
             else sentencepiece_merges(list(tokens), list(scores), types))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk_token, fuse_unk=True,
                                     byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not Metaspace: SentencePiece and llama.cpp add the "▁" prefix even before a
    # leading space (" a" -> "▁▁a") and after every special token; Metaspace skips the former.
    spaces = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _added_tokens(tokenizer, vocab, list(tokens), types)
    return tokenizer


def _with_post_processor(tokenizer: Tokenizer, tokens: list[str], bos: int | None, eos: int | None) -> Tokenizer:
    if bos is None and eos is None:
        return tokenizer
    first = [f"{tokens[bos]}:0"] if bos is not None else []
    last = [f"{tokens[eos]}:0"] if eos is not None else []
    specials = [(tokens[i], i) for i in dict.fromkeys(i for i in (bos, eos) if i is not None)]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(first + ["$A:0"] + last), pair=" ".join(first + ["$A:0"] + last + first + ["$B:1"] + last),
        special_tokens=specials)
    return tokenizer


def write_hf_tokenizer(gguf_tokenizer: GGUFTokenizer, folder: str | os.PathLike) -> None:
    """Writes tokenizer.json + tokenizer_config.json into `folder`, so an HF or orbax folder
    converted from a GGUF keeps its tokenizer (transformers' AutoTokenizer reads them, and
    `llamax.convert.gguf_vocab` turns them back into GGUF metadata)."""
    folder = Path(folder)
    gguf_tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    vocab_size = gguf_tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)

    def token(index: int | None) -> str | None:
        return gguf_tokenizer.tokenizer.id_to_token(index) if index is not None and index < vocab_size else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(gguf_tokenizer.bos_id),
              "eos_token": token(gguf_tokenizer.eos_id), "pad_token": token(gguf_tokenizer.pad_id),
              "unk_token": token(gguf_tokenizer.unk_id), "add_bos_token": gguf_tokenizer.add_bos,
              "clean_up_tokenization_spaces": False}
    if gguf_tokenizer.add_eos:
        config["add_eos_token"] = True
    if gguf_tokenizer.chat_template:
        config["chat_template"] = gguf_tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    extra_stops = [i for i in gguf_tokenizer.stop_ids if i != gguf_tokenizer.eos_id]
    if extra_stops:  # generation stops at these too (transformers reads generation_config.json)
        ids = [gguf_tokenizer.eos_id, *extra_stops] if gguf_tokenizer.eos_id is not None else extra_stops
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}, indent=2))
