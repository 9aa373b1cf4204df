"""A checkpoint's tokenizer -> GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

llama.cpp tokenizes with what the GGUF carries, so an export must hold the tokenizer the model
was trained with. The sources, in the order they are tried for a folder:

  tokenizer.json (byte-level BPE)   model 'gpt2': tokens, types, merges, and the pre-tokenizer's
                                    llama.cpp name, recognised from its splitting rules (gpt-2,
                                    smollm, llama-bpe, qwen2); anything else is refused by name
  tokenizer.model (SentencePiece)   model 'llama': pieces, scores, types, add_space_prefix
  tokenizer.json (SentencePiece-    model 'llama' with scores ordered by merge rank
    style BPE with byte fallback)
  a .gguf file                      its tokenizer metadata, copied as is

Special ids, add_bos/add_eos and the chat template come from tokenizer_config.json (and
config.json) through the `gguf` package's `SpecialVocab`, llama.cpp's own converter code; extra
stop ids from generation_config.json become `eot_token_id`. The vocabulary is padded to the
model's rows with `[PADn]` tokens as llama.cpp's converter does.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, SpecialVocab

from llamax.errors import DataError
from llamax.tokenizer.gguf import (BYTE, CONTROL, LLAMA3_SPLIT, NORMAL, QWEN2_SPLIT, UNKNOWN, UNUSED, USER_DEFINED,
                                   read_tokenizer_metadata)

V = GGUFValueType
# key -> (value type, array element type): how each tokenizer key is stored.
KEY_TYPES = {
    "tokenizer.ggml.model": (V.STRING, None), "tokenizer.ggml.pre": (V.STRING, None),
    "tokenizer.ggml.tokens": (V.ARRAY, V.STRING), "tokenizer.ggml.token_type": (V.ARRAY, V.INT32),
    "tokenizer.ggml.scores": (V.ARRAY, V.FLOAT32), "tokenizer.ggml.merges": (V.ARRAY, V.STRING),
    "tokenizer.ggml.add_bos_token": (V.BOOL, None), "tokenizer.ggml.add_eos_token": (V.BOOL, None),
    "tokenizer.ggml.add_space_prefix": (V.BOOL, None), "tokenizer.chat_template": (V.STRING, None),
}
# SpecialVocab's names -> llama.cpp's id keys ("seperator" is llama.cpp's spelling).
SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "sep": "seperator",
                "eot": "eot", "eom": "eom"}
for _name in SPECIAL_KEYS.values():
    KEY_TYPES[f"tokenizer.ggml.{_name}_token_id"] = (V.UINT32, None)

# What llama.cpp calls a byte-level tokenizer.json's splitting (its `tokenizer.ggml.pre`).
_SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
TokenizerValues = dict[str, tuple[Any, V, V | None]]


def tokenizer_metadata(source: str | os.PathLike, vocab_size: int) -> TokenizerValues:
    """GGUF tokenizer metadata {key: (value, type, element type)} for a model of `vocab_size` rows,
    from a tokenizer folder, tokenizer.json, tokenizer.model or .gguf file (see module doc)."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"tokenizer {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, vocab_size)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix == ".json" and path.name != "tokenizer.json":
        raise DataError(f"{path}: name the tokenizer file tokenizer.json (next to its tokenizer_config.json)")
    tokenizer_json = folder / "tokenizer.json" if path.is_dir() or path.suffix == ".json" else None
    spm_file = path if path.suffix == ".model" else folder / "tokenizer.model"
    data = _read_json(tokenizer_json) if tokenizer_json is not None and tokenizer_json.is_file() else None
    if data is not None and _is_byte_level(data):
        values = _byte_level(data, tokenizer_json)
    elif spm_file.is_file():
        values = _sentencepiece_model(spm_file, data)
    elif data is not None:
        values = _sentencepiece_json(data, tokenizer_json)
    else:
        raise DataError(f"no tokenizer in {path}: expected tokenizer.json, tokenizer.model or a .gguf file "
                        "(pass --tokenizer with the checkpoint's tokenizer)")
    values = _pad(values, vocab_size, str(path))
    _add_specials(values, folder, vocab_size)
    return {key: (value, *KEY_TYPES[key]) for key, value in values.items()}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None


def _from_gguf(path: Path, vocab_size: int) -> TokenizerValues:
    from llamax.convert.gguf import open_gguf
    reader = open_gguf(path)
    meta = read_tokenizer_metadata(reader)
    if len(meta.get("tokenizer.ggml.tokens") or ()) != vocab_size:
        raise DataError(f"{path} has a tokenizer of {len(meta.get('tokenizer.ggml.tokens') or ())} tokens; "
                        f"the model has {vocab_size} rows")
    out = {}
    for key, value in meta.items():
        types = reader.fields[key].types
        out[key] = (value, types[0], types[1] if len(types) > 1 else None)
    return out


def _is_byte_level(data: dict) -> bool:
    model = data.get("model") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback", False)
            and (data.get("decoder") or {}).get("type") == "ByteLevel")


def _pre_tokenizer_name(data: dict, where: Path) -> str:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_NAMES and steps[0].get("behavior") == "Isolated":
            return _SPLIT_NAMES[regex]
    raise DataError(f"{where}: its pre-tokenizer {json.dumps(pre)[:200]} is none llama.cpp names that llamax "
                    "knows (gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text differently")


def _merge_strings(merges: list, where: Path) -> list[str]:
    if merges and isinstance(merges[0], list):  # transformers >= 4.45 writes pairs; GGUF joins with a space
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    if not all(isinstance(m, str) for m in merges):
        raise DataError(f"{where}: model.merges is neither strings nor pairs of strings")
    return list(merges)


def _added_type(token: dict) -> int:
    content = token["content"]
    looks_special = content.startswith("<|") and content.endswith("|>")  # llama.cpp's heuristic
    return CONTROL if token.get("special") or looks_special else USER_DEFINED


def _vocabulary(data: dict, where: Path) -> tuple[list[str | None], list[int]]:
    vocab = data["model"].get("vocab") or {}
    added = data.get("added_tokens") or []
    size = max([*vocab.values(), *(t["id"] for t in added)], default=-1) + 1
    tokens: list[str | None] = [None] * size
    types = [UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, NORMAL
    for token in added:
        tokens[token["id"]], types[token["id"]] = token["content"], _added_type(token)
    if not vocab:
        raise DataError(f"{where} has an empty model.vocab")
    return tokens, types


def _byte_level(data: dict, where: Path) -> dict[str, Any]:
    merges = data["model"].get("merges")
    if not merges:
        raise DataError(f"{where} is a byte-level BPE tokenizer without merges (model.merges is empty); "
                        "llama.cpp cannot tokenize with it")
    tokens, types = _vocabulary(data, where)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(data, where),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": _merge_strings(merges, where)}


def _sentencepiece_model(path: Path, data: dict | None) -> dict[str, Any]:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError; a tiktoken table lands here too
        raise DataError(f"{path} is not a SentencePiece model ({error}); Llama-3's tokenizer.model is a "
                        "tiktoken table: export with its HF tokenizer.json instead") from None
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise DataError(f"{path} is a SentencePiece {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} "
                        "model; llama.cpp's 'llama' vocabulary runs BPE SentencePiece models")
    tokens = [piece.piece for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [piece.type or NORMAL for piece in proto.pieces]
    for token in sorted((data or {}).get("added_tokens") or [], key=lambda t: t["id"]):
        if token["id"] == len(tokens):  # added in tokenizer.json beyond the .model (e.g. a pad token)
            tokens.append(token["content"])
            scores.append(-1000.0)
            types.append(_added_type(token))
    values = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
              "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
              "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    spec = proto.trainer_spec
    for name, index in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unknown", spec.unk_id), ("padding", spec.pad_id)):
        if 0 <= index < len(tokens):
            values[f"tokenizer.ggml.{name}_token_id"] = index
    return values


def _sentencepiece_json(data: dict, where: Path) -> dict[str, Any]:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise DataError(f"{where} is a {model.get('type')} tokenizer that is neither byte-level BPE nor "
                        "SentencePiece-style BPE; llamax exports those two")
    tokens, types = _vocabulary(data, where)
    unk = model.get("unk_token")
    rank = {}
    for index, merge in enumerate(_merge_strings(model.get("merges") or [], where)):
        rank.setdefault(merge.replace(" ", "", 1), index)
    scores = []
    for index, token in enumerate(tokens):
        if types[index] == NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token or ""):
            types[index] = BYTE
        elif token == unk:
            types[index] = UNKNOWN
        # SentencePiece merges the pair whose merged piece scores best: score = -merge rank.
        scores.append(-float(rank[token]) if token in rank else (0.0 if types[index] == NORMAL else -1000.0))
    prepend = json.dumps(data.get("normalizer")) + json.dumps(data.get("pre_tokenizer"))
    prefix = '"Prepend"' in prepend or ('"Metaspace"' in prepend and '"prepend_scheme": "never"' not in prepend)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": prefix,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}


def _pad(values: dict[str, Any], vocab_size: int, where: str) -> dict[str, Any]:
    tokens = values["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise DataError(f"tokenizer {where} has {len(tokens)} tokens but the model only {vocab_size} embedding "
                        "rows; this tokenizer does not belong to this checkpoint")
    extra = vocab_size - len(tokens)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)] + \
        [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    values["tokenizer.ggml.tokens"] = tokens
    values["tokenizer.ggml.token_type"] = [int(t) for t in values["tokenizer.ggml.token_type"]] + [UNUSED] * extra
    if "tokenizer.ggml.scores" in values:
        values["tokenizer.ggml.scores"] = [float(s) for s in values["tokenizer.ggml.scores"]] + [-1000.0] * extra
    return values


def _add_specials(values: dict[str, Any], folder: Path, vocab_size: int) -> None:
    """Special ids, add_bos/add_eos and the chat template from the folder's HF files (if any)."""
    gguf_logger = logging.getLogger("gguf.vocab")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)  # its notes about optional files are noise here
    try:
        special = SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    except ValueError as error:
        raise DataError(f"{folder}: {error}") from None
    finally:
        gguf_logger.setLevel(level)
    for name, index in special.special_token_ids.items():
        if name in SPECIAL_KEYS:
            values[f"tokenizer.ggml.{SPECIAL_KEYS[name]}_token_id"] = int(index)
    for name in ("bos", "eos"):
        if name in special.add_special_token:
            values[f"tokenizer.ggml.add_{name}_token"] = bool(special.add_special_token[name])
    if isinstance(special.chat_template, str):
        values["tokenizer.chat_template"] = special.chat_template
    generation = folder / "generation_config.json"
    if generation.is_file():
        stops = _read_json(generation).get("eos_token_id")
        stops = stops if isinstance(stops, list) else [stops]
        eos = values.get("tokenizer.ggml.eos_token_id")
        extra = [s for s in stops if isinstance(s, int) and s != eos and 0 <= s < vocab_size]
        if eos is None and extra:
            values["tokenizer.ggml.eos_token_id"] = extra.pop(0)
        if extra:
            values["tokenizer.ggml.eot_token_id"] = extra[0]


