"""How far llamax's DPO loss, TRL metrics and gradients are from TRL's `DPOTrainer` on the same
model and tokens; the figures of benchmarks/RESULTS.md ("Fine-tuning: DPO, PEFT adapters").

    python -m benchmarks.dpo_trl_parity [--json benchmarks/dpo_trl_parity.json]

The computation is tests/test_dpo.py's `trl_parity` (a random tiny HF Llama with every weight
nudged from the reference, 12 pairs of token ids, beta 0.3), on 8 CPU devices as in the tests;
the test asserts the bounds (1e-5), this records the measured distances.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def measure() -> dict:
    sys.path.insert(0, str(TESTS))  # the test's own helpers: one computation, asserted and recorded
    from finetune_fixtures import save_hf_model
    from test_dpo import trl_parity

    figures = {}
    with tempfile.TemporaryDirectory() as work:
        hf_dir = save_hf_model(Path(work) / "tiny_hf")
        for loss in ("sigmoid", "ipo"):
            for accumulation, result in trl_parity(hf_dir, Path(work) / loss, loss, (1, 2)).items():
                diffs = result["grad_max_abs_diff"]
                figures[f"{loss}/grad_accum_{accumulation}"] = {
                    "loss": result["loss"], "loss_abs_diff": abs(result["loss"] - result["trl_loss"]),
                    "metric_max_abs_diff": max(abs(result["metrics"][name] - result["trl_metrics"][name])
                                               for name in result["metrics"]),
                    "grad_max_abs_diff": max(diffs.values()), "grad_max_abs": result["grad_max_abs"]}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    figures = measure()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    record = {"figures": figures, "cpu": next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                                                if line.startswith("Model name")), platform.processor()),
              "load_average": os.getloadavg()}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
