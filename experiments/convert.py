"""Convert LLaMA checkpoints between HF, Meta, llamax/orbax folders and GGUF files, tensor by tensor.

    python -m experiments.convert --src PATH --src_format {hf,meta,orbax,gguf} \
        --dst PATH --dst_format {hf,meta,orbax,gguf} [--dtype bf16|fp32|fp16|q8_0] [--num_shards N] \
        [--step STEP] [--tokenizer PATH] [--overwrite] [--no_progress]

orbax output is a params checkpoint a fine-tuning run starts from (`llamax.convert.orbax`);
orbax input is such a checkpoint or a training run folder (newest step unless --step).
gguf is one .gguf file (llama.cpp): read from F32/F16/BF16/Q8_0/Q4_x/Q5_x/Q2_K..Q6_K, written as
f32/f16/bf16/q8_0 with the tokenizer (--tokenizer, or found beside --src / its INIT_FROM).
The output carries the source's tokenizer files and special ids (bos/eos/pad in an HF config.json
and generation_config.json; `llamax.convert.identity`); --tokenizer ships another tokenizer.
Errors print one line on stderr and exit with status 1; nothing is left at --dst on failure.
Installed as the `llamax-convert` console script.
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.cli import fail
from llamax.convert.hub import FORMATS, convert
from llamax.errors import LlamaxError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="source checkpoint folder (or .gguf file)")
    parser.add_argument("--src_format", required=True, choices=FORMATS)
    parser.add_argument("--dst", required=True,
                        help="destination folder, or .gguf file (must not exist unless --overwrite)")
    parser.add_argument("--dst_format", required=True, choices=FORMATS)
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16", "q8_0"],
                        help="weight dtype of the output (default: the source's; q8_0: GGUF only)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer file/folder to ship with (or embed in a GGUF) the output; default: "
                             "the source's (beside --src, or a run's recorded one / its INIT_FROM)")
    parser.add_argument("--num_shards", type=int, default=1, help="model-parallel shards of a Meta output")
    parser.add_argument("--step", type=int, default=None, help="training step of an orbax run source")
    parser.add_argument("--max_shard_size", type=int, default=5 * 2**30, help="bytes per HF safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; never grab an accelerator
    try:
        path = convert(args.src, args.src_format, args.dst, args.dst_format, dtype=args.dtype,
                       num_shards=args.num_shards, overwrite=args.overwrite, step=args.step,
                       max_shard_size=args.max_shard_size, progress=not args.no_progress,
                       tokenizer=args.tokenizer)
    except (LlamaxError, OSError) as error:
        return fail(error, program="llamax-convert")
    print(f"wrote {args.dst_format} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
