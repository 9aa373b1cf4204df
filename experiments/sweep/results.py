"""Sweep results: each point's status and final numbers, as markdown, CSV and a loss plot."""
from __future__ import annotations

import csv
import datetime
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from experiments.sweep.local import FAILED_FILE, attempts, is_done
from experiments.sweep.points import Point, Sweep, run_dir
from llamax.run_dir import RunDir

RESULT_COLUMNS = ("status", "step", "train_loss", "eval_loss", "eval_perplexity", "tokens_per_s",
                  "wall_s")


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def point_result(root: str, point: Point) -> dict[str, Any]:
    """Status and final numbers of one point, from its run directory."""
    from llamax.train.metrics import read_metrics

    directory = Path(run_dir(root, point))
    records = read_metrics(directory) if directory.exists() else []
    tried = attempts(directory) if directory.exists() else []
    recorded = RunDir(directory).outcome() if directory.is_dir() else None
    last_step = max((r.get("step", 0) for r in records), default=None)
    if is_done(root, point):
        status = "completed"
    elif (directory / FAILED_FILE).exists():
        status = "failed"
    elif recorded:  # ran outside the local launcher (TPU, Slurm): what the run recorded
        status = recorded.get("status", "incomplete")
    elif tried:
        status = tried[-1]["status"]
    else:
        status = "incomplete" if records else "pending"
    speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    wall = sum(a.get("wall_s", 0.0) for a in tried)
    return dict(point=point.name, **{k: point.bindings.get(k) for k in point.bindings},
                status=status, step=last_step, train_loss=_last(records, "loss"),
                eval_loss=_last(records, "eval_loss"), eval_perplexity=_last(records, "eval_perplexity"),
                tokens_per_s=statistics.median(speeds) if speeds else None,
                wall_s=round(wall, 1) if tried else None)


def collect_results(sweep: Sweep, root: str) -> list[dict[str, Any]]:
    return [point_result(root, point) for point in sweep.points]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(getattr(value, "label", None) or getattr(value, "expression", value))


def _csv_cell(value: Any) -> Any:
    """Full precision for numbers; labels for gin expressions."""
    if value is None:
        return ""
    if isinstance(value, (int, float, str)):
        return value
    return _cell(value) if hasattr(value, "expression") else repr(value)


def results_columns(sweep: Sweep) -> list[str]:
    return ["point", *sweep.swept_keys, *RESULT_COLUMNS]


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts) restricted to `columns`."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_losses(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    """Train loss (line) and eval loss (dashed, markers) per run, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for index, (label, records) in enumerate(curves.items()):
        color = f"C{index % 10}"
        train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
        evals = [(r["step"], r["eval_loss"]) for r in records
                 if isinstance(r.get("eval_loss"), (int, float))]
        if train:
            axis.plot(*zip(*train), color=color, label=label)
        if evals:
            axis.plot(*zip(*evals), color=color, linestyle="--", marker="o", markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (solid: train, dashed: eval)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(sweep: Sweep, root: str, command: str = "") -> list[dict[str, Any]]:
    """Writes ROOT/results.md, results.csv and results.png; returns the rows."""
    from llamax.train.metrics import read_metrics

    rows = collect_results(sweep, root)
    columns = results_columns(sweep)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(column)) for column in columns])
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    header = [f"# Sweep {sweep.spec}", "", f"Written {stamp} on {os.uname().nodename}."]
    if command:
        header += ["", "```", command, "```"]
    header += ["", "train_loss: last logged; eval_loss / eval_perplexity: last evaluation (over the "
               "first `TrainConfig.eval_batches` validation batches, 0 = the whole split; see "
               "eval_tokens in metrics.jsonl); tokens_per_s: median over logged windows; wall_s: "
               "summed over attempts.", "", ""]
    (out / "results.md").write_text("\n".join(header) + markdown_table(rows, columns) +
                                    "\n![loss curves](results.png)\n")
    plot_losses({p.name: read_metrics(run_dir(root, p)) for p in sweep.points
                 if Path(run_dir(root, p)).exists()}, out / "results.png", Path(sweep.spec).stem)
    return rows
