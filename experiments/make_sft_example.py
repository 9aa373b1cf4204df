"""Write the bundled SFT example (Shakespeare exchanges) as prompt/response JSONL.

    python -m experiments.make_sft_example --out DIR   # DIR/train.jsonl, DIR/validation.jsonl
    python -m experiments.make_sft_example --out DIR --preference   # prompt/chosen/rejected pairs

Deterministic and offline; the same records `DataConfig(train='shakespeare_sft')` reads directly
(see `llamax.data.shakespeare_sft`). Useful as a template for your own SFT data.
"""
from __future__ import annotations

import argparse
import sys

from llamax.data.shakespeare_sft import write_sft_example


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamax-make-sft-example", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preference", action="store_true",
                        help="write DPO preference pairs (the 'shakespeare_dpo' data) instead")
    args = parser.parse_args(argv)
    for split, path in write_sft_example(args.out, preference=args.preference).items():
        with open(path, encoding="utf-8") as f:
            print(f"{split}: {sum(1 for _ in f)} records -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
