"""Train a tokenizer on text files: LLaMA-1/2-style SentencePiece, or Llama-3's format.

    python -m experiments.tokenizer --input data/train.txt --output out/tok --vocab_size 2048
    python -m experiments.tokenizer --shakespeare --output out/tok --vocab_size 2048
    python -m experiments.tokenizer --format llama3 --shakespeare --output out/llama3_tok --vocab_size 1024

sentencepiece (default): BPE with byte fallback; writes DIR/tokenizer.model and DIR/tokenizer.vocab.
llama3: byte-level BPE with Llama-3's split pattern; `--vocab_size` is the base vocabulary and
Llama-3's 256 special tokens follow it. Writes a Hugging Face folder (DIR/tokenizer.json,
tokenizer_config.json with a Llama-3 chat template, special_tokens_map.json, generation_config.json)
and Meta's tiktoken file DIR/original/tokenizer.model, the layout of a hub Llama-3.1 repository.
Load either with `llamax.tokenizer.load_tokenizer(DIR)` / `load_tokenizer(DIR/original/tokenizer.model)`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from llamax.data import corpus
from llamax.errors import DataError
from llamax.tokenizer import load_tokenizer, train_tokenizer
from llamax.tokenizer.train_llama3 import train_llama3_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=[], help="plain-text training files")
    parser.add_argument("--shakespeare", action="store_true",
                        help="also train on the bundled Shakespeare train split")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--format", choices=["sentencepiece", "llama3"], default="sentencepiece",
                        help="sentencepiece (LLaMA-1/2 style) or llama3 (tiktoken + HF folder)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="pieces (sentencepiece, default 2048) or base tokens before the 256 "
                             "special ones (llama3, default 1024)")
    parser.add_argument("--max_sentences", type=int, default=200_000,
                        help="lines sampled for training (keeps it fast)")
    parser.add_argument("--user_defined_symbols", nargs="*", default=[],
                        help="strings that always become one piece, e.g. '<|eot_id|>'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.input and not args.shakespeare:
        parser.error("give --input FILES... and/or --shakespeare")
    out = Path(args.output) / "tokenizer.model"
    if args.format == "llama3" and args.user_defined_symbols:
        parser.error("--user_defined_symbols is for --format sentencepiece; llama3 has its special tokens")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = list(args.input)
            if args.shakespeare:
                files.append(str(corpus.write_corpus(tmp, fmt="txt")["train"]))
            start = time.perf_counter()
            if args.format == "llama3":
                out = train_llama3_tokenizer(files, args.output, args.vocab_size or 1024)
                tokenizer = load_tokenizer(out)
            else:
                tokenizer = train_tokenizer(files, out, args.vocab_size or 2048,
                                            max_sentences=args.max_sentences,
                                            user_defined_symbols=args.user_defined_symbols, seed=args.seed)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({tokenizer.vocab_size} pieces) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
