"""The local launcher: points run here, K at a time, each in its own process.

What each attempt did is kept in the point's directory: `sweep.log` (its output), one line per
attempt in `attempts.jsonl`, and a `DONE` or `FAILED` marker. Whether an attempt completed is what
the run itself recorded (`llamax.run_dir.RunDir.outcome`), never a line matched in its output.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from experiments.sweep.points import Point, Sweep, SweepError, format_command, run_dir, train_args
from llamax.run_dir import RunDir

DONE_FILE, FAILED_FILE, LOG_FILE, ATTEMPTS_FILE = "DONE", "FAILED", "sweep.log", "attempts.jsonl"


def is_done(root: str, point: Point) -> bool:
    """The point's run completed (as the run recorded it, or as a DONE marker says)."""
    directory = Path(run_dir(root, point))
    outcome = RunDir(directory).outcome() if directory.is_dir() else None
    return (directory / DONE_FILE).exists() or bool(outcome and outcome.get("status") == "completed")


def attempts(directory: Path) -> list[dict]:
    """Every recorded attempt of the point in `directory`, oldest first."""
    path = directory / ATTEMPTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _outcome(directory: Path, returncode: int, output: str) -> tuple[str, str]:
    """(status, detail) of one finished attempt: what the run recorded, else a failure."""
    recorded = RunDir(directory).outcome() if returncode == 0 else None
    if recorded and recorded.get("status") == "completed":
        return "completed", f"step {recorded.get('step')}"
    if recorded and recorded.get("status") == "preempted":
        return "preempted", "saved; run the sweep again to resume"
    lines = output.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    last = errors[-1] if errors else next((line for line in reversed(lines) if line.strip()), "")
    if returncode == 0:
        last = f"the run recorded no outcome ({last.strip()})"
    return "failed", f"exit {returncode}: {last.strip()[:300]}"


@dataclasses.dataclass
class _Running:
    point: Point
    process: subprocess.Popen
    log: Any
    log_offset: int
    start: float


def _start(sweep: Sweep, point: Point, root: str, python: str) -> _Running:
    directory = Path(run_dir(root, point))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FAILED_FILE).unlink(missing_ok=True)
    RunDir(directory).clear_outcome()  # this attempt's outcome is what it records from now on
    args = train_args(sweep, point, root, python)
    log = open(directory / LOG_FILE, "a", encoding="utf-8")
    log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} {format_command(args)}\n")
    log.flush()
    offset = log.tell()
    # start_new_session: Ctrl-C reaches the sweep only; it then SIGTERMs each run to save.
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    return _Running(point, process, log, offset, time.time())


def _finish(running: _Running, root: str) -> str:
    running.log.close()
    directory = Path(run_dir(root, running.point))
    with open(directory / LOG_FILE, encoding="utf-8", errors="replace") as log:
        log.seek(running.log_offset)
        output = log.read()
    returncode = running.process.returncode
    status, detail = _outcome(directory, returncode, output)
    wall_s = time.time() - running.start
    record = dict(start=datetime.datetime.fromtimestamp(running.start).isoformat(timespec="seconds"),
                  wall_s=round(wall_s, 2), returncode=returncode, status=status, detail=detail)
    with open(directory / ATTEMPTS_FILE, "a", encoding="utf-8") as attempts_file:
        attempts_file.write(json.dumps(record) + "\n")
    if status == "completed":
        (directory / DONE_FILE).write_text(json.dumps(record) + "\n")
    elif status == "failed":
        (directory / FAILED_FILE).write_text(json.dumps(record) + "\n")
    return f"{status} ({detail}, {wall_s:.0f}s)"


def run_local(sweep: Sweep, root: str, parallel: int = 1, python: str | None = None,
              echo: Callable[[str], None] = print) -> None:
    """Runs every unfinished point, `parallel` at a time from the start (what the runs share,
    the auto-trained tokenizer and the compilation cache, is written atomically)."""
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    python = python or sys.executable
    pending = []
    for point in sweep.points:
        if is_done(root, point):
            echo(f"[sweep] {point.name}: done, skipping")
        else:
            pending.append(point)
    running: list[_Running] = []
    total, started = len(pending), 0
    try:
        while pending or running:
            while pending and len(running) < parallel:
                point = pending.pop(0)
                started += 1
                echo(f"[sweep] {point.name}: started ({started}/{total}), log "
                     f"{run_dir(root, point)}/{LOG_FILE}")
                running.append(_start(sweep, point, root, python))
            time.sleep(0.2)
            for item in [r for r in running if r.process.poll() is not None]:
                running.remove(item)
                echo(f"[sweep] {item.point.name}: {_finish(item, root)}")
    except KeyboardInterrupt:
        echo("[sweep] interrupted: asking running points to save (SIGTERM) ...")
        for item in running:
            item.process.send_signal(signal.SIGTERM)
        for item in running:
            item.process.wait()
            echo(f"[sweep] {item.point.name}: {_finish(item, root)}")
        raise
