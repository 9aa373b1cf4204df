"""Where a run's numbers go: its metrics file (JSON lines), TensorBoard events and a progress bar.

Only process 0 writes; other processes get a logger that does nothing, so callers need no checks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax

from llamax.files import atomic_write_text
from llamax.run_dir import RunDir
from llamax.train.tensorboard import ScalarWriter


def read_metrics(run_dir: str | Path | RunDir) -> list[dict[str, Any]]:
    """All records of a run's metrics file, in order."""
    path = _run(run_dir).metrics_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path | RunDir, last_step: int) -> None:
    """Drops records after `last_step`: a resumed run re-logs the steps it replays, and the
    metrics file must hold each step once."""
    run = _run(run_dir)
    if not run.metrics_file.exists() or jax.process_index() != 0:
        return
    kept = [r for r in read_metrics(run) if r.get("step", 0) <= last_step]
    atomic_write_text(run.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))


def _run(run_dir: str | Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


class MetricsLogger:
    """Appends one JSON object per logged step, mirrors scalars to TensorBoard, drives a bar."""

    def __init__(self, run_dir: str | Path | RunDir, total_steps: int, start_step: int,
                 progress_bar: bool = True, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.run = _run(run_dir)
        self._file = None
        self._writer = None
        self._bar = None
        if not self.enabled:
            return
        self._file = open(self.run.metrics_file, "a", encoding="utf-8")
        if tensorboard:
            self._writer = ScalarWriter(self.run.tensorboard)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train")
        self._start = time.time()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Writes `metrics` (plain Python numbers) for `step`."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._writer.add_scalars(step, {key: value for key, value in record.items()
                                            if key != "step" and isinstance(value, (int, float))
                                            and math.isfinite(value)})
        if self._bar is not None:
            shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step`."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the record parseable
    return value
