"""Ablation 4: rematerialisation policy vs step time and activation memory.

    python -m experiments.ablations.remat

Compiles the real train step (`llamax.train.step.make_train_step`) of a small LLaMA (4 layers, hidden
128, batch 8 x 256 tokens) once per `ModelConfig.remat_policy`, reads XLA's buffer plan
(`compiled.memory_analysis()`: the temporary bytes are the activations kept for the backward
pass plus scratch) and times 20 steps of each, round-robin, on one device. No sweep: nothing is
trained, the data are random tokens. Writes experiments/results/remat/: README.md, results.csv,
remat.png. The memory ratios indicate what to expect on an accelerator; step times on a CPU say
little about GPU/TPU step times (measure there).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time

import jax
import numpy as np

from experiments import sweep as sweeps
from experiments.ablations.common import RESULTS_DIR, write_report
from llamax.config import REMAT_POLICIES, ModelConfig
from llamax.train.optim import OptimConfig
from llamax.sharding import MeshConfig, batch_sharding, make_mesh
from llamax.train import init_train_state, make_train_step

NAME = "remat"
CONFIG = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=4,
                     num_heads=4, num_kv_heads=2)
BATCH, SEQ_LEN, TIMED_STEPS, WARMUP_STEPS = 8, 256, 20, 3


def compile_step(policy: str) -> dict:
    """The train step compiled under `policy`, with XLA's memory plan and a fresh state."""
    config = CONFIG.replace(remat_policy=policy)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=100)
    state = init_train_state(config, optim, mesh, rng=0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (BATCH, SEQ_LEN + 1), np.int32)
    batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],  # [batch, seq]
                 segment_ids=np.ones((BATCH, SEQ_LEN), np.int32),
                 positions=np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)),
                 loss_mask=np.ones((BATCH, SEQ_LEN), np.float32))
    batch = jax.device_put(batch, batch_sharding(mesh))
    start = time.perf_counter()
    compiled = make_train_step(config, optim, mesh).jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return dict(policy=policy, compiled=compiled, state=state, batch=batch, times=[],
                temp_mb=memory.temp_size_in_bytes / 2**20,
                params_and_state_mb=memory.argument_size_in_bytes / 2**20, compile_s=compile_s)


def time_steps(runs: list[dict]) -> None:
    """Times the policies' steps round-robin, so load from other jobs hits all of them alike."""
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        for run in runs:
            start = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], run["batch"])
            jax.block_until_ready(metrics["loss"])
            if step >= WARMUP_STEPS:
                run["times"].append(time.perf_counter() - start)
            run["loss"] = float(metrics["loss"])


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [row["policy"] for row in rows]
    left.bar(names, [row["temp_mb"] for row in rows], color="C0")
    left.set_ylabel("XLA temporary buffers (MiB)")
    right.bar(names, [row["step_ms"] for row in rows], color="C1")
    right.set_ylabel(f"step time, min of {TIMED_STEPS} (ms)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"remat policy: 4 layers, hidden 128, batch {BATCH} x {SEQ_LEN}, 1 CPU device")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    start = time.time()
    runs = [compile_step(policy) for policy in REMAT_POLICIES]
    time_steps(runs)
    rows = [dict(policy=run["policy"], temp_mb=run["temp_mb"],
                 params_and_state_mb=run["params_and_state_mb"], compile_s=run["compile_s"],
                 step_ms=1e3 * min(run["times"]), step_ms_median=1e3 * statistics.median(run["times"]),
                 loss=run["loss"]) for run in runs]
    base = rows[0]
    for row in rows:
        row["memory_vs_none"] = row["temp_mb"] / base["temp_mb"]
        row["time_vs_none"] = row["step_ms"] / base["step_ms"]

    out = RESULTS_DIR / NAME
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / f"{NAME}.png")
    columns = ["policy", "temp_mb", "memory_vs_none", "step_ms", "time_vs_none", "step_ms_median",
               "params_and_state_mb", "compile_s", "loss"]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    body = "\n".join([
        f"Model: {CONFIG.num_params() / 1e6:.2f}M params (4 layers, hidden 128, 4 heads / 2 kv "
        f"heads, MLP 352, vocab 1024, float32), scanned layers; one train step on batch "
        f"{BATCH} x {SEQ_LEN} random tokens, AdamW. Memory is XLA's compile-time plan "
        f"(deterministic). Times: the policies' steps run round-robin, {TIMED_STEPS} timed rounds "
        "after 3 warm-up rounds; the minimum is the least disturbed by other jobs on this shared "
        "CPU, the median shows the noise. "
        "The loss column checks every policy computes the same step.",
        "",
        sweeps.markdown_table(rows, columns, [
            "policy", "temp buffers (MiB)", "vs none", "step (ms, min)", "vs none",
            "step (ms, median)", "arguments (MiB)", "compile (s)",
            f"loss after {WARMUP_STEPS + TIMED_STEPS} steps"]),
        f"![memory and step time per policy]({NAME}.png)",
        "",
    ])
    report = write_report(NAME, "Remat policy vs step time and memory", body, argv,
                          f"The script took {(time.time() - start) / 60:.1f} min.")
    print(report.read_text())


if __name__ == "__main__":
    main()
