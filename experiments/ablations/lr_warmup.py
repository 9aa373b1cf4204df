"""Ablation 1: peak learning rate x linear warmup on the tiny model.

    python -m experiments.ablations.lr_warmup [--root runs/ablations/lr_warmup] [--parallel 2]

Runs configs/sweeps/ablation_lr_warmup.py (4 learning rates x warmup 0/40 steps, 120 steps of
8 x 128 tokens, cosine decay) and writes experiments/results/lr_warmup/: README.md (tables),
results.csv and lr_warmup.png (final eval loss vs learning rate; loss curves).
"""
from __future__ import annotations

import argparse
import csv

from experiments import sweep as sweeps
from experiments.ablations.common import RESULTS_DIR, run_spec, sweep_timing, write_report
from llamax.run_dir import read_model_config
from llamax.train.metrics import read_metrics

NAME = "lr_warmup"
SPEC = "configs/sweeps/ablation_lr_warmup.py"


def plot(sweep: sweeps.Sweep, rows: list[dict], root: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    warmups = sorted({row["WARMUP_STEPS"] for row in rows})
    for warmup in warmups:
        points = sorted((row["LEARNING_RATE"], row["eval_loss"]) for row in rows
                        if row["WARMUP_STEPS"] == warmup)
        left.plot(*zip(*points), marker="o", label=f"warmup {warmup}")
    left.set_xscale("log")
    left.set_xlabel("peak learning rate")
    left.set_ylabel("final eval loss")
    left.set_title("final eval loss (step 120)")
    left.grid(alpha=0.3)
    left.legend()
    for index, point in enumerate(sweep.points):
        records = [r for r in read_metrics(sweeps.run_dir(root, point)) if "loss" in r]
        style = "-" if point.bindings["WARMUP_STEPS"] else ":"
        right.plot([r["step"] for r in records], [r["loss"] for r in records], style,
                   color=f"C{index // 2}", label=point.name)
    right.set_xlabel("step")
    right.set_ylabel("train loss")
    right.set_title("train loss (dotted: no warmup)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=f"runs/ablations/{NAME}")
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args(argv)
    sweep, rows, wall_s = run_spec(SPEC, args.root, args.parallel)

    out = RESULTS_DIR / NAME
    out.mkdir(parents=True, exist_ok=True)
    plot(sweep, rows, args.root, out / f"{NAME}.png")
    columns = sweeps.results_columns(sweep)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    lrs = sorted({row["LEARNING_RATE"] for row in rows})
    warmups = sorted({row["WARMUP_STEPS"] for row in rows})
    by_key = {(row["LEARNING_RATE"], row["WARMUP_STEPS"]): row for row in rows}
    pivot = [{"lr": f"{lr:g}", **{f"warmup {w}": by_key[lr, w]["eval_loss"] for w in warmups},
              "change": by_key[lr, warmups[-1]]["eval_loss"] - by_key[lr, warmups[0]]["eval_loss"]}
             for lr in lrs]
    best = min(rows, key=lambda row: row["eval_loss"])
    params = read_model_config(sweeps.run_dir(args.root, sweep.points[0])).num_params()
    body = "\n".join([
        f"Tiny LLaMA (2 layers, hidden 64, 4 heads / 2 kv heads, vocab 1024, {params / 1e6:.2f}M "
        "params) on the bundled Shakespeare corpus; 120 AdamW steps of 8 x 128 tokens, cosine "
        "decay to 10% after a linear warmup, weight decay 0.1, clip 1.0, seed 0. One seed per "
        "cell: for the seed-to-seed spread at a similar setting see ../gqa (two seeds).",
        "",
        "## Final eval loss (8 validation batches)",
        "",
        sweeps.markdown_table(pivot, ["lr", *[f"warmup {w}" for w in warmups], "change"],
                              ["lr", *[f"warmup {w}" for w in warmups],
                               f"warmup {warmups[-1]} minus warmup {warmups[0]}"]),
        f"Best: `{best['point']}` (eval loss {best['eval_loss']:.4f}).",
        "",
        "## All points",
        "",
        sweeps.markdown_table(rows, columns),
        f"![eval loss vs learning rate, and loss curves]({NAME}.png)",
        "",
    ])
    report = write_report(NAME, "Learning rate x warmup (tiny model)", body, argv, sweep_timing(wall_s))
    print(report.read_text())


if __name__ == "__main__":
    main()
