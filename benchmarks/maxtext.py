"""MaxText's train step on `benchmarks.run`'s train shapes: the JAX peer, run from its own install.

    python -m benchmarks.maxtext --python PATH/TO/maxtext-venv/bin/python [--config bench]
        [--batch 4] [--seq_len 512] [--steps 12] [--remat_policy full] [--json PATH]

`benchmarks.run --maxtext_python PATH` adds the same measurement as a row of its table, right
after its own train section. MaxText is not a dependency of llamax: it needs Python >= 3.12 and
pins of its own, so it lives in its own virtualenv (pyenv's 3.12 on these machines:
/root/.pyenv/versions/3.12.1/bin/python3.12; `python3.12` where one is on PATH):

    python3.12 -m venv ~/maxtext-venv && P=~/maxtext-venv/bin/pip
    $P install jax==0.10.2 jaxlib==0.10.2
    $P install --no-deps maxtext==0.2.5          # its dependencies are all in extras
    $P install -c <(printf 'jax==0.10.2\\njaxlib==0.10.2\\n') flax optax orbax-checkpoint absl-py \\
        omegaconf pydantic tensorboardx ml-collections pathwaysutils jinja2 aqtp qwix tokamax \\
        huggingface-hub transformers grain drjax pillow tiktoken sentencepiece sympy

(`aqtp`, not `aqt`, which is an unrelated GUI package.) MaxText 0.2.5 asks for jax >= 0.11.1;
with 0.10.2 its one missing name is `jax.experimental.xla_metadata.must_fuse_call`, used only by
a GPU flash-attention kernel, so the launcher below gives it an identity stand-in. Nothing is
downloaded at run time (synthetic data, `DECOUPLE_GCLOUD=TRUE`).

The run: `maxtext.trainers.pre_train.train` with its own `configs/base.yml`, `hardware=cpu`,
synthetic data, MaxText's llama2 decoder block at the preset's sizes, float32 params and compute,
AdamW with MaxText's defaults (b2 0.95, weight decay 0.1, clipping at 1.0: `benchmarks.run`'s
recipe), no warmup, scanned layers, `attention=dot_product`. MaxText prints one line per step
("completed step: N, seconds: S, ..."); steps 0 and 1 hold compilation and dispatch, so the
result is the median of the later ones: tokens/s = batch * seq_len / median seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
from typing import Any

from llamax.config import get_preset

# Runs inside MaxText's interpreter: the stand-in for the jax >= 0.11 name, then its train module.
LAUNCHER = """
import runpy, sys
import jax.experimental.xla_metadata as metadata
if not hasattr(metadata, "must_fuse_call"):
    metadata.must_fuse_call = lambda *args, **kwargs: (lambda fn: fn)
sys.argv[0] = "train"
runpy.run_module("maxtext.trainers.pre_train.train", run_name="__main__", alter_sys=True)
"""
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([\d.]+)")
WARMUP_STEPS = 2  # compilation and dispatch


def maxtext_overrides(config, batch: int, seq_len: int, steps: int, remat_policy: str,
                      output_dir: str) -> list[str]:
    """MaxText `key=value` overrides for llamax's `config` at this batch and length."""
    return [
        "run_name=llamax_bench", f"base_output_directory={output_dir}", "hardware=cpu",
        "skip_jax_distributed_system=true", "dataset_type=synthetic", "decoder_block=llama2",
        f"base_emb_dim={config.hidden_size}", f"base_mlp_dim={config.intermediate_size}",
        f"base_num_decoder_layers={config.num_layers}", f"base_num_query_heads={config.num_heads}",
        f"base_num_kv_heads={config.num_kv_heads}", f"head_dim={config.head_dim}",
        f"vocab_size={config.vocab_size}", f"max_target_length={seq_len}",
        f"per_device_batch_size={batch}", f"steps={steps}", f"dtype={config.dtype}",
        f"weight_dtype={config.param_dtype}",
        "matmul_precision=default", "opt_type=adamw", "learning_rate=1e-4", "warmup_steps_fraction=0",
        "scan_layers=true", f"remat_policy={remat_policy}", "attention=dot_product",
        "enable_checkpointing=false", "enable_tensorboard=false",
    ]


def parse_steps(log: str) -> dict[int, float]:
    """{step: seconds} from MaxText's per-step log lines."""
    return {int(step): float(seconds) for step, seconds in STEP_LINE.findall(log)}


def bench_maxtext(python: str, config, batch: int, seq_len: int, steps: int = 12,
                  remat_policy: str = "full") -> dict[str, Any]:
    """Runs MaxText's trainer with `python` (its virtualenv's interpreter); tokens/s and the
    per-step seconds. Raises RuntimeError with the log's tail if it fails or logs no step."""
    with tempfile.TemporaryDirectory() as output_dir:
        spec = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                              capture_output=True, text=True)
        if spec.returncode:
            last = (spec.stderr.strip().splitlines() or ["no error output"])[-1]
            raise RuntimeError(f"{python} cannot import maxtext: {last}")
        base_yml = os.path.join(spec.stdout.strip(), "configs", "base.yml")
        env = {**os.environ, "DECOUPLE_GCLOUD": "TRUE", "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([python, "-c", LAUNCHER, base_yml,
                              *maxtext_overrides(config, batch, seq_len, steps, remat_policy, output_dir)],
                             capture_output=True, text=True, env=env)
    log = run.stdout + run.stderr
    times = parse_steps(log)
    timed = [seconds for step, seconds in sorted(times.items()) if step >= WARMUP_STEPS]
    if run.returncode or not timed:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise RuntimeError(f"MaxText exited with {run.returncode} after {len(times)} logged steps:\n{tail}")
    median = statistics.median(timed)
    return dict(batch=batch, seq_len=seq_len, remat_policy=remat_policy, steps=len(timed),
                step_s=round(median, 4), tok_s=round(batch * seq_len / median, 1),
                step_seconds=[round(s, 3) for s in timed])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="the interpreter of MaxText's virtualenv")
    parser.add_argument("--config", default="bench", help="llamax model preset")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12, help="steps run (the first 2 are not timed)")
    parser.add_argument("--remat_policy", default="full", help="MaxText's remat_policy (full, minimal, ...)")
    parser.add_argument("--json", help="write the result to this JSON file")
    args = parser.parse_args(argv)
    result = bench_maxtext(args.python, get_preset(args.config), args.batch, args.seq_len, args.steps,
                           args.remat_policy)
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
