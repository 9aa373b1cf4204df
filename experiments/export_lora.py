"""Merge a LoRA run's adapters into its base weights and write HF, Meta, orbax or GGUF weights, or
write the adapters alone in PEFT's format.

    python -m experiments.export_lora --run RUN_DIR --out DIR --format {hf,meta,orbax,gguf,peft} \
        [--base PATH] [--step STEP] [--tokenizer PATH] [--dtype bf16|fp32|fp16|q8_0] \
        [--num_shards N] [--overwrite]

--format peft writes `adapter_config.json` + `adapter_model.safetensors` (`llamax.convert.peft`),
which `peft.PeftModel.from_pretrained` loads onto the HF export of the base (--base, default the
run's INIT_FROM, is recorded as base_model_name_or_path).

The adapters come from the run's newest checkpoint (or --step), their shape and the base weights
from what the run recorded (`llamax.run_dir`; --base overrides the base). A full fine-tuning run
is exported as is, so this works for any run; `experiments.convert` also converts those. The
loading and writing are `llamax.convert.load_any` / `save_any`. The export carries the run's
tokenizer and special ids (bos/eos/pad, `llamax.convert.identity`; --tokenizer ships another), so an
HF export generates in transformers exactly as the run does in llamax. Errors print one line and
exit with status 1.
Installed as the `llamax-export-lora` console script.
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.cli import fail
from llamax.errors import LlamaxError

FORMATS = ("hf", "meta", "orbax", "gguf", "peft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-export-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (LoRA or full)")
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--base", default=None, help="base weights (default: the run's INIT_FROM)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to ship with the export (default: the one the run recorded)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16", "q8_0"],
                        help="output dtype (default: the params' dtype)")
    parser.add_argument("--num_shards", type=int, default=1, help="model-parallel shards (meta)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # merging is host work
    try:
        from llamax.convert.hub import load_any, save_any
        from llamax.convert.identity import identity_of, read_identity
        from llamax.files import check_destination
        from llamax.run_dir import checkpoint_step

        check_destination(args.out, args.overwrite)
        step = checkpoint_step(args.run, args.step)
        if args.format == "peft":
            from llamax.convert.peft import save_run_peft

            if args.tokenizer:
                raise LlamaxError("--tokenizer does not apply to --format peft: an adapter folder holds "
                                  "no tokenizer (the HF export of the base carries it)")
            path = save_run_peft(args.run, args.out, step=step, base_model=args.base, dtype=args.dtype,
                                 overwrite=args.overwrite)
        else:
            identity = identity_of(args.tokenizer) if args.tokenizer else read_identity(args.run)
            config, params = load_any(args.run, step=step, base=args.base)
            path = save_any(config, params, args.out, args.format, dtype=args.dtype,
                            num_shards=args.num_shards, overwrite=args.overwrite, identity=identity)
    except (LlamaxError, OSError) as error:
        return fail(error, program="llamax-export-lora")
    print(f"wrote {args.format} checkpoint of {args.run} step {step} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
