"""Generate text from a checkpoint: one prompt streams to stdout token by token, several batch.

    python -m experiments.sample --checkpoint PATH --tokenizer PATH/tokenizer.model \\
        --prompt "To be, or not to be" [--prompt "..."] [--max_new_tokens 64] \\
        [--temperature 0.8 --top_k 50 --top_p 0.95 --seed 0]

`--checkpoint` may be an HF or Meta folder, a llamax params checkpoint or a training run
directory (its newest checkpoint; a LoRA run is merged with its base), read by
`llamax.convert.load_any` like every other CLI. Console script: `llamax-sample = experiments.sample:main`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from llamax.config import ModelConfig
from llamax.errors import CheckpointError, LlamaxError
from llamax.infer.generate import generate, generate_stream


def load_model(path: str | Path) -> tuple[ModelConfig, Any]:
    """(config, params) of any checkpoint: HF, Meta, orbax params or a training run (LoRA merged)."""
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass an HF or Meta folder, a "
                              "llamax params checkpoint or a training run directory")
    from llamax.convert.hub import load_any

    return load_any(path)


def _load_tokenizer(path: str, vocab_size: int):
    from llamax.tokenizer import Tokenizer, check_vocab

    tokenizer = Tokenizer(path)
    check_vocab(tokenizer, vocab_size)
    return tokenizer


def stream_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Iterable[int], out: TextIO) -> list[int]:
    """Writes the prompt's text, then the text of each new token as it arrives.

    SentencePiece spells spaces as part of the next piece, so each step decodes the whole sequence
    and writes the new suffix; an unfinished UTF-8 byte sequence waits for its remaining bytes.
    Ids past the tokenizer's pieces (a model vocabulary padded to a multiple of 64/128) print
    nothing.
    """
    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])

    ids = list(prompt_ids)
    printed = decode(ids)
    out.write(printed)
    out.flush()
    for token in new_ids:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd") or not text.startswith(printed):
            continue
        out.write(text[len(printed):])
        out.flush()
        printed = text
    out.write("\n")
    return ids[len(prompt_ids):]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="HF folder, llamax params checkpoint or training run directory")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to continue; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = parse_args(argv)
    out = out or sys.stdout
    try:
        config, params = load_model(args.checkpoint)
        tokenizer = _load_tokenizer(args.tokenizer, config.vocab_size)
        prompts = [tokenizer.encode(text, bos=True) for text in args.prompt]
        settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, eos_id=tokenizer.eos_id)
        if len(prompts) == 1:
            stream_text(tokenizer, prompts[0], generate_stream(
                config, params, prompts[0], args.max_new_tokens, **settings), out)
            return 0
        for index, (prompt, new_ids) in enumerate(zip(prompts, generate(
                config, params, prompts, args.max_new_tokens, **settings))):
            out.write(f"[{index}] ")
            stream_text(tokenizer, prompt, new_ids, out)
        return 0
    except LlamaxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
