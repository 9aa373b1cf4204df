"""Train a LLaMA-style SentencePiece tokenizer (BPE, byte fallback) on text files.

    python -m experiments.tokenizer --input data/train.txt --output out/tok --vocab_size 2048
    python -m experiments.tokenizer --shakespeare --output out/tok --vocab_size 2048

Writes DIR/tokenizer.model (load with `llamax.tokenizer.Tokenizer`) and DIR/tokenizer.vocab.
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
from llamax.tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=[], help="plain-text training files")
    parser.add_argument("--shakespeare", action="store_true",
                        help="also train on the bundled Shakespeare train split")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--vocab_size", type=int, default=2048)
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
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = list(args.input)
            if args.shakespeare:
                files.append(str(corpus.write_corpus(tmp, fmt="txt")["train"]))
            start = time.perf_counter()
            tokenizer = train_tokenizer(files, out, args.vocab_size, max_sentences=args.max_sentences,
                                        user_defined_symbols=args.user_defined_symbols, seed=args.seed)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({tokenizer.vocab_size} pieces) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
