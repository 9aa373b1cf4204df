"""How far llamax's fine-tuning is from its references: DPO loss, TRL metrics and gradients vs
TRL's `DPOTrainer` on the same model and tokens, and LoRA logits vs `peft` both ways; the figures
of benchmarks/RESULTS.md ("Fine-tuning: DPO, PEFT adapters").

    python -m benchmarks.finetune_parity [--json benchmarks/finetune_parity.json]

The computations are the tests' own, on 8 CPU devices as in the tests (the tests assert the
bounds, 1e-5 for DPO and 1e-4 for logits; this records the measured distances):
tests/test_dpo.py's `trl_parity` (a random tiny HF Llama with every weight nudged from the
reference, 12 pairs of token ids, beta 0.3), and tests/test_peft.py's adapters (an llamax
export loaded by `PeftModel.from_pretrained`, scanned or not; a `peft`-made adapter, random A
and B, loaded by llamax).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import cpu_model

TESTS = Path(__file__).resolve().parent.parent / "tests"


def peft_parity(hf_dir: Path, work: Path) -> dict:
    import numpy as np
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from hf_models import hf_logits
    from llamax.convert.hf import load_hf
    from llamax.convert.peft import load_peft, save_peft
    from llamax.model.lora import LoraConfig
    from test_peft import TARGETS, TOKENS, llamax_logits, peft_made_adapter, random_adapters

    figures = {}
    for scan_layers in (True, False):  # llamax export -> peft
        config, params = load_hf(hf_dir, scan_layers=scan_layers)
        lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
        adapters = random_adapters(config, lora)
        folder = save_peft(config, lora, adapters, work / f"adapter_{scan_layers}", base_model=hf_dir)
        theirs = hf_logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir), folder), TOKENS)
        figures[f"peft/llamax_export_scan_{scan_layers}"] = {
            "logits_max_abs_diff": float(np.abs(llamax_logits(config, params, adapters, lora) - theirs).max()),
            "logits_max_abs": float(np.abs(theirs).max())}
    model = peft_made_adapter(hf_dir, work / "peft_made")  # peft -> llamax
    config, params = load_hf(hf_dir)
    lora, adapters = load_peft(work / "peft_made", config)
    theirs = hf_logits(model, TOKENS)
    figures["peft/peft_made_adapter"] = {
        "logits_max_abs_diff": float(np.abs(llamax_logits(config, params, adapters, lora) - theirs).max()),
        "logits_max_abs": float(np.abs(theirs).max())}
    return figures


def measure() -> dict:
    sys.path.insert(0, str(TESTS))  # the test's own helpers: one computation, asserted and recorded
    from finetune_fixtures import save_hf_model
    from test_dpo import trl_parity

    figures = {}
    with tempfile.TemporaryDirectory() as work:
        hf_dir = save_hf_model(Path(work) / "tiny_hf")
        figures.update(peft_parity(hf_dir, Path(work)))
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
    record = {"figures": figures, "cpu": cpu_model(), "load_average": os.getloadavg()}
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
