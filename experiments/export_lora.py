"""Merge a LoRA run's adapters into its base weights and write HF, Meta or orbax weights, or
write the adapters alone in PEFT's format.

    python -m experiments.export_lora --run RUN_DIR --out DIR --format {hf,meta,orbax,peft} \
        [--base PATH] [--step STEP] [--dtype bf16|fp32|fp16] [--num_shards N] [--overwrite]

--format peft writes `adapter_config.json` + `adapter_model.safetensors` (`llamax.convert.peft`),
which `peft.PeftModel.from_pretrained` loads onto the HF export of the base (--base, default the
run's INIT_FROM, is recorded as base_model_name_or_path).

The adapters come from the run's newest checkpoint (or --step), their shape and the base weights
from what the run recorded (`llamax.run_dir`; --base overrides the base). A full fine-tuning run
is exported as is, so this works for any run; `experiments.convert` also converts those. The
loading and writing are `llamax.convert.load_any` / `save_any`. Errors print one line and exit with status 1.
Installed as the `llamax-export-lora` console script.
"""
from __future__ import annotations

import argparse
import os
import sys

from llamax.errors import LlamaxError

FORMATS = ("hf", "meta", "orbax", "peft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamax-export-lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (LoRA or full)")
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--base", default=None, help="base weights (default: the run's INIT_FROM)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                        help="output dtype (default: the params' dtype)")
    parser.add_argument("--num_shards", type=int, default=1, help="model-parallel shards (meta)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # merging is host work
    try:
        from llamax.convert.hub import load_any, save_any
        from llamax.run_dir import checkpoint_step

        step = checkpoint_step(args.run, args.step)
        if args.format == "peft":
            from llamax.convert.peft import save_run_peft

            path = save_run_peft(args.run, args.out, step=step, base_model=args.base, dtype=args.dtype,
                                 overwrite=args.overwrite)
        else:
            config, params = load_any(args.run, step=step, base=args.base)
            path = save_any(config, params, args.out, args.format, dtype=args.dtype,
                            num_shards=args.num_shards, overwrite=args.overwrite)
    except (LlamaxError, OSError) as error:
        print(f"llamax-export-lora: error: {error}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"wrote {args.format} checkpoint of {args.run} step {step} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
