"""What every ablation script shares: run its sweep spec, then write results with provenance."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

from experiments import sweep as sweeps

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def run_spec(spec: str, root: str, parallel: int = 1) -> tuple[sweeps.Sweep, list[dict], float]:
    """Validates and runs (or resumes: finished points are skipped) the sweep `spec` under
    `root`; returns the validated sweep, its result rows and the summed wall time of the
    points' runs in seconds (the same on a re-run that skips them)."""
    sweep = sweeps.validate(sweeps.load_sweep(spec))
    sweeps.run_local(sweep, root, parallel=parallel)
    rows = sweeps.collect_results(sweep, root)
    failed = [row["point"] for row in rows if row["status"] != "completed"]
    if failed:
        raise SystemExit(f"points did not complete: {failed}; see {root}/<point>/sweep.log")
    return sweep, rows, sum(row["wall_s"] or 0.0 for row in rows)


def machine() -> str:
    """One line naming the machine and its load, for the results file."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs; 1-min load "
            f"average {load:.1f} when the write-up was made), {platform.system()}, "
            f"Python {platform.python_version()}")


def sweep_timing(wall_s: float) -> str:
    return (f"Training runs took {wall_s / 60:.1f} min summed over points (each including ~10-20 s "
            "of start-up and compilation).")


def write_report(name: str, title: str, body: str, argv: list[str] | None = None,
                 timing: str | None = None) -> Path:
    """Writes experiments/results/<name>/README.md: title, the command, machine, date, body."""
    out = RESULTS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", f"experiments.ablations.{name}", *argv])
    lines = [f"# {title}", "", "Reproduce (from the repository root):", "", "```", command, "```", "",
             f"Produced {datetime.date.today().isoformat()} on: {machine()}."]
    if timing:
        lines.append(timing)
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n\n" + body)
    return path
