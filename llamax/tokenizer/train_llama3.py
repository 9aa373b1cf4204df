"""Train a small tokenizer in Llama-3's format and write it as Meta and Hugging Face ship it.

`train_llama3_tokenizer(files, out_dir, base_vocab_size)` trains a byte-level BPE with Llama-3's
split pattern (the `tokenizers` library), then writes the hub layout of a Llama-3.1-Instruct
repository:

    out_dir/original/tokenizer.model   Meta's format: tiktoken `<base64 bytes> <rank>` lines
    out_dir/tokenizer.json             HF fast tokenizer: the same ranks, Llama-3's pre-tokenizer,
                                       a BOS post-processor, the 256 special tokens
    out_dir/tokenizer_config.json      bos `<|begin_of_text|>`, eos `<|eot_id|>`, Llama-3 chat template
    out_dir/special_tokens_map.json
    out_dir/generation_config.json     eos_token_id [`<|end_of_text|>`, `<|eot_id|>`]

Special tokens are numbered after the base vocabulary in Meta's Llama-3.1 order, so with
`base_vocab_size=1024` `<|begin_of_text|>` is 1024 and `<|eot_id|>` 1033 (128000 and 128009 in
Llama-3). The HF merges are derived from the ranks as transformers' TikTokenConverter derives
them for Meta's file (every split of a token into two tokens, ordered by the token's rank), with
`ignore_merges` (a whole pre-token in the vocabulary is one token, as in tiktoken), so the two
files encode every text identically.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llamax.errors import DataError
from llamax.tokenizer.chat import LLAMA3_TEMPLATE
from llamax.tokenizer.tiktoken_bpe import LLAMA3_1_SPECIAL_TOKENS, LLAMA3_PATTERN

log = logging.getLogger(__name__)

BOS, END_OF_TEXT, END_OF_TURN = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
FILES = ("original/tokenizer.model", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "generation_config.json")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges reproducing tiktoken on `ranks`: every split (left, right) of each token into two
    tokens, ordered by the rank of the token, then of left and right (TikTokenConverter's order)."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(left, right, rank) for left, right in splits]
    merges.sort(key=lambda merge: merge[2])
    return [(left, right) for left, right, _ in merges]


def llama3_hf_tokenizer(ranks: dict[bytes, int], special_tokens: Sequence[str] = LLAMA3_1_SPECIAL_TOKENS
                        ) -> Tokenizer:
    """The HF fast tokenizer of a tiktoken table with Llama-3's pattern and special tokens."""
    to_unicode = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_unicode[byte] for byte in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(left), spell(right)) for left, right in merges_from_ranks(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    bos_id = len(ranks) + list(special_tokens).index(BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


def train_llama3_tokenizer(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                           base_vocab_size: int = 1024, *,
                           special_tokens: Sequence[str] = LLAMA3_1_SPECIAL_TOKENS) -> Path:
    """Trains a byte-level BPE on text files and writes a Llama-3-format folder (module doc).

    Args:
        files: plain-text training files.
        out_dir: the output folder (its tokenizer files are overwritten).
        base_vocab_size: tokens before the special ones (256 bytes + merges); the full vocabulary
            is `base_vocab_size + len(special_tokens)`.
        special_tokens: names numbered after the base vocabulary (Meta's Llama-3.1 list).

    Returns:
        `out_dir`; load it with `llamax.tokenizer.load_tokenizer` (HF) or load
        `out_dir/original/tokenizer.model` (Meta).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("train_llama3_tokenizer got no input files; pass at least one text file")
    for path in paths:
        if not path.is_file() or path.stat().st_size == 0:
            raise DataError(f"tokenizer training input {str(path)!r} is missing or empty")
    if base_vocab_size <= 256:
        raise DataError(f"base_vocab_size={base_vocab_size} leaves no room for merges: the 256 bytes "
                        "come first; use 1024 or more")
    start = time.perf_counter()
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    try:
        model.train([str(p) for p in paths], trainers.BpeTrainer(
            vocab_size=base_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
    except Exception as error:  # tokenizers raises bare Exceptions (e.g. a file that is not UTF-8)
        raise DataError(f"tokenizers could not train on {[str(p) for p in paths]}: {error}") from error
    from_unicode = {char: byte for byte, char in byte_to_unicode().items()}
    ranks = {bytes(from_unicode[c] for c in token): rank for token, rank in model.get_vocab().items()}
    ranks = dict(sorted(ranks.items(), key=lambda item: item[1]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write everything next to `out` first and move it in at the end: a failure leaves no mix of
    # old and new files.
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as partial:
        staged = Path(partial)
        (staged / "original").mkdir()
        lines = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
        (staged / "original" / "tokenizer.model").write_text(lines)
        llama3_hf_tokenizer(ranks, special_tokens).save(str(staged / "tokenizer.json"))
        write_llama3_hf_metadata(staged, len(ranks), special_tokens)
        (out / "original").mkdir(exist_ok=True)
        for name in FILES:
            os.replace(staged / name, out / name)
    log.info("trained a %d+%d token Llama-3-format tokenizer in %.1fs -> %s", len(ranks),
             len(special_tokens), time.perf_counter() - start, out)
    return out


def write_llama3_hf_metadata(out: Path, num_base_tokens: int,
                             special_tokens: Sequence[str] = LLAMA3_1_SPECIAL_TOKENS) -> None:
    """tokenizer_config.json, special_tokens_map.json, generation_config.json of a Llama-3.1-Instruct
    folder whose special tokens start at id `num_base_tokens`."""
    ids = {token: num_base_tokens + i for i, token in enumerate(special_tokens)}
    added = {str(token_id): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for token, token_id in ids.items()}
    config = {"added_tokens_decoder": added, "bos_token": BOS, "chat_template": LLAMA3_TEMPLATE,
              "clean_up_tokenization_spaces": True, "eos_token": END_OF_TURN,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"bos_token": {"content": BOS, **entry}, "eos_token": {"content": END_OF_TURN, **entry}}
    generation = {"bos_token_id": ids[BOS], "eos_token_id": [ids[END_OF_TEXT], ids[END_OF_TURN]]}
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map),
                        ("generation_config.json", generation)):
        (out / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
