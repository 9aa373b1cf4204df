"""Hyperparameter sweeps: one `experiments.train` run per point of a spec, then a results table.

    python -m experiments.sweep configs/sweeps/tiny_lr.py --root runs/sweeps/tiny_lr \
        [--dry_run] [--parallel K] [--launcher local|tpu|slurm] [--execute] [--aggregate_only]

A spec (see `experiments.sweep_spec`) names gin files and the axes of bindings; each point runs

    python -m experiments.train --gin_file=... --gin.X=V ... --gin.MODEL_DIR="'ROOT/<point name>'"

Before anything launches, every point's gin files and bindings are parsed with gin (nothing runs):
an unknown configurable/parameter, a macro no gin file defines, an empty axis or two points with
one name is an error naming it.

Launchers:
  local  (default) runs the points here, K at a time (`--parallel`), each point's output going to
         ROOT/<point>/sweep.log. A point whose run completed gets ROOT/<point>/DONE and is skipped
         next time; an unfinished or failed point is simply run again (train resumes from its
         newest checkpoint). A crash is recorded (ROOT/<point>/FAILED) and the sweep goes on.
         With K > 1 the first pending point runs alone, so caches the runs share (the
         auto-trained tokenizer, a prepared dataset) are built once instead of raced.
         Afterwards ROOT/results.{md,csv,png} summarise every point.
  tpu    prints one `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."` per point
         (every host of the pod runs the same command with --distributed); `--execute` runs them
         one after another. ROOT must be a path every host can write, mounted locally (e.g. a
         gcsfuse mount of a bucket): run directories are written with local file APIs.
  slurm  writes ROOT/slurm/<point>.sbatch (one task per node, LLAMAX_* variables set for
         jax.distributed) and ROOT/slurm/submit_all.sh; `--execute` submits them with sbatch.
`--aggregate_only` (re)writes the results files from whatever the runs under ROOT hold, e.g. after
a Slurm sweep on a shared filesystem.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import runpy
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.sweep_spec import GIN_FILE_KEY, SweepSpecError, gin_literal, name_points

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_MODULE = "experiments.train"
REQUIRED_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "CHECKPOINT_EVERY", "LOG_EVERY")
DONE_FILE, FAILED_FILE, LOG_FILE, ATTEMPTS_FILE = "DONE", "FAILED", "sweep.log", "attempts.jsonl"
RESULT_COLUMNS = ("status", "step", "train_loss", "eval_loss", "eval_perplexity", "tokens_per_s",
                  "wall_s")


class SweepError(ValueError):
    """The sweep cannot run as specified (bad binding, missing gin file, bad launcher options)."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    name: str
    bindings: dict[str, Any]  # the swept values, in spec order (without gin_file)
    gin_files: tuple[str, ...]  # GIN_FILES plus the point's own gin_file, if any
    train_steps: int | None = None  # %TRAIN_STEPS, known after `validate`


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A loaded spec: the fixed bindings and the named points."""

    spec: str
    bindings: dict[str, Any]  # BINDINGS: the same for every point
    points: tuple[Point, ...]

    @property
    def swept_keys(self) -> list[str]:
        """Every binding name some point sets, in first-seen order."""
        return list(dict.fromkeys(key for point in self.points for key in point.bindings))


def make_sweep(gin_files: Sequence[str], points: Sequence[dict[str, Any]],
               bindings: dict[str, Any] | None = None, names: dict[str, str] | None = None,
               spec: str = "<inline>") -> Sweep:
    """A Sweep from the parts of a spec (what `load_sweep` reads from a spec file)."""
    if isinstance(gin_files, str) or not gin_files:
        raise SweepSpecError(f"GIN_FILES must be a non-empty list of gin files, got {gin_files!r}")
    labels = name_points(points, names)
    built = []
    for label, point in zip(labels, points):
        extra = point.get(GIN_FILE_KEY)
        if extra is not None and not isinstance(extra, str):
            raise SweepSpecError(f"{GIN_FILE_KEY} must be one gin file path, got {extra!r}")
        built.append(Point(name=label, bindings={k: v for k, v in point.items() if k != GIN_FILE_KEY},
                           gin_files=tuple(gin_files) + ((extra,) if extra else ())))
    return Sweep(spec=spec, bindings=dict(bindings or {}), points=tuple(built))


def load_sweep(spec_path: str | os.PathLike) -> Sweep:
    """Reads a spec file (GIN_FILES, SWEEP, optional BINDINGS and NAMES)."""
    path = Path(spec_path)
    if not path.exists():
        raise SweepError(f"sweep spec {path} not found")
    namespace = runpy.run_path(str(path))
    missing = [name for name in ("GIN_FILES", "SWEEP") if name not in namespace]
    if missing:
        raise SweepSpecError(f"{path} does not define {' and '.join(missing)}; a spec needs "
                             "GIN_FILES = [...] and SWEEP = grid(...) (see experiments/sweep_spec.py)")
    sweep = namespace["SWEEP"]
    points = sweep() if callable(sweep) else sweep
    return make_sweep(namespace["GIN_FILES"], list(points), namespace.get("BINDINGS"),
                      namespace.get("NAMES"), spec=str(spec_path))


# ---- commands -------------------------------------------------------------------------------

_SAFE = re.compile(r"[\w@%+=:,./-]*")  # never expanded or split by bash


def shell_quote(text: str) -> str:
    """`text` as one bash word: bare when safe, else in double quotes (readable around gin's
    single-quoted strings: `"'runs/x'"`), else shlex's single quotes."""
    if text and _SAFE.fullmatch(text):
        return text
    if not re.search(r"[\"$`\\!]", text):
        return f'"{text}"'
    return shlex.quote(text)


def format_command(args: Sequence[str]) -> str:
    """A command line for bash; `--flag=value` arguments quote only the value."""
    words = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if eq and arg.startswith("--") and _SAFE.fullmatch(flag):
            words.append(flag + "=" + shell_quote(value))
        else:
            words.append(shell_quote(arg))
    return " ".join(words)


def run_dir(root: str, point: Point) -> str:
    """ROOT/<point name>, joined as text (the root may name another host's mount)."""
    return root.rstrip("/") + "/" + point.name


def train_args(sweep: Sweep, point: Point, root: str, python: str = "python",
               extra: Sequence[str] = ()) -> list[str]:
    """The argv that trains `point`: gin files, BINDINGS, the point's bindings, MODEL_DIR."""
    args = [python, "-m", TRAIN_MODULE]
    args += [f"--gin_file={gin_file}" for gin_file in point.gin_files]
    for name, value in {**sweep.bindings, **point.bindings}.items():
        args.append(f"--gin.{name}={gin_literal(value)}")
    args.append(f"--gin.MODEL_DIR={gin_literal(run_dir(root, point))}")
    return args + list(extra)


# ---- validation -----------------------------------------------------------------------------

def _resolve_gin_file(gin_file: str) -> str:
    """Where experiments.train will find `gin_file` (same search order)."""
    for candidate in (Path(gin_file), REPO_ROOT / gin_file, REPO_ROOT / "configs" / gin_file):
        if candidate.exists():
            return str(candidate)
    raise SweepError(f"gin file {gin_file!r} not found (looked in ., {REPO_ROOT}, "
                     f"{REPO_ROOT / 'configs'})")


def _macros(gin_module) -> tuple[set[str], set[str]]:
    """(defined, referenced) macro names of the parsed gin config."""
    config = gin_module.config._CONFIG  # noqa: SLF001 - gin has no public listing
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    referenced, stack = set(), [value for params in config.values() for value in params.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, gin_module.config.ConfigurableReference):
            scope, _, selector = value.scoped_selector.rpartition("/")
            if selector == "gin.macro":
                referenced.add(scope)
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return defined, referenced


def validate(sweep: Sweep) -> Sweep:
    """Parses every point's gin files + bindings with gin, running nothing.

    Returns the sweep with each point's `train_steps`; raises SweepError naming the point and the
    binding when a configurable, parameter or macro is unknown, or a value is not valid gin.
    """
    import gin

    from experiments.train import explain_gin_error

    gin.add_config_file_search_path(str(REPO_ROOT))
    gin.add_config_file_search_path(str(REPO_ROOT / "configs"))
    checked = []
    try:
        for point in sweep.points:
            gin_files = [_resolve_gin_file(f) for f in point.gin_files]
            gin.clear_config()
            try:
                gin.parse_config_files_and_bindings(gin_files, [], finalize_config=False)
            except (ValueError, KeyError, SyntaxError) as error:
                raise SweepError(f"gin files {list(point.gin_files)} do not parse: "
                                 f"{explain_gin_error(error)}") from error
            defined, referenced = _macros(gin)
            macros = sorted(defined | referenced)
            for name, value in {**sweep.bindings, **point.bindings}.items():
                where = "BINDINGS" if name not in point.bindings else f"point {point.name!r}"
                if "." not in name and name not in macros:
                    close = difflib.get_close_matches(name, macros, n=1)
                    hint = f"; did you mean {close[0]}?" if close else f"; known macros: {macros}"
                    raise SweepError(f"{where}: macro {name} is neither defined nor used by "
                                     f"{list(point.gin_files)}, so binding it would change "
                                     f"nothing{hint}")
                binding = f"{name} = {gin_literal(value)}"
                try:
                    gin.parse_config([binding])
                except (ValueError, KeyError, SyntaxError) as error:
                    raise SweepError(f"{where}: binding `{binding}` is invalid: "
                                     f"{explain_gin_error(error)}") from error
            defined, referenced = _macros(gin)
            missing = sorted((referenced | set(REQUIRED_MACROS)) - defined - {"MODEL_DIR"})
            if missing:
                raise SweepError(f"point {point.name!r}: macro(s) {missing} are needed but never "
                                 f"set by {list(point.gin_files)}; add them to BINDINGS")
            train_steps = gin.query_parameter("%TRAIN_STEPS")
            checked.append(dataclasses.replace(
                point, train_steps=train_steps if isinstance(train_steps, int) else None))
    finally:
        gin.clear_config()
    return dataclasses.replace(sweep, points=tuple(checked))


# ---- point state on disk ----------------------------------------------------------------------

def is_done(root: str, point: Point) -> bool:
    return (Path(run_dir(root, point)) / DONE_FILE).exists()


def _attempts(directory: Path) -> list[dict]:
    path = directory / ATTEMPTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _outcome(returncode: int, output: str) -> tuple[str, str]:
    """(status, detail) of one finished attempt from its exit code and output."""
    completed = re.findall(r"^completed at step (\d+)", output, re.M)
    if returncode == 0 and completed:
        return "completed", f"step {completed[-1]}"
    if returncode == 0 and re.search(r"^preempted at step", output, re.M):
        return "preempted", "saved; run the sweep again to resume"
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    last = errors[-1] if errors else next((l for l in reversed(output.splitlines()) if l.strip()), "")
    return "failed", f"exit {returncode}: {last.strip()[:300]}"


# ---- local launcher ---------------------------------------------------------------------------

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
    status, detail = _outcome(returncode, output)
    wall_s = time.time() - running.start
    record = dict(start=datetime.datetime.fromtimestamp(running.start).isoformat(timespec="seconds"),
                  wall_s=round(wall_s, 2), returncode=returncode, status=status, detail=detail)
    with open(directory / ATTEMPTS_FILE, "a", encoding="utf-8") as attempts:
        attempts.write(json.dumps(record) + "\n")
    if status == "completed":
        (directory / DONE_FILE).write_text(json.dumps(record) + "\n")
    elif status == "failed":
        (directory / FAILED_FILE).write_text(json.dumps(record) + "\n")
    return f"{status} ({detail}, {wall_s:.0f}s)"


def run_local(sweep: Sweep, root: str, parallel: int = 1, python: str | None = None,
              echo: Callable[[str], None] = print) -> None:
    """Runs every unfinished point, `parallel` at a time; see the module docstring."""
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
    first_alone = parallel > 1
    total, started = len(pending), 0
    try:
        while pending or running:
            limit = 1 if first_alone else parallel
            while pending and len(running) < limit:
                point = pending.pop(0)
                started += 1
                echo(f"[sweep] {point.name}: started ({started}/{total}), log "
                     f"{run_dir(root, point)}/{LOG_FILE}")
                running.append(_start(sweep, point, root, python))
            time.sleep(0.2)
            for item in [r for r in running if r.process.poll() is not None]:
                running.remove(item)
                echo(f"[sweep] {item.point.name}: {_finish(item, root)}")
                first_alone = False
    except KeyboardInterrupt:
        echo("[sweep] interrupted: asking running points to save (SIGTERM) ...")
        for item in running:
            item.process.send_signal(signal.SIGTERM)
        for item in running:
            item.process.wait()
            echo(f"[sweep] {item.point.name}: {_finish(item, root)}")
        raise


# ---- TPU and Slurm launchers ------------------------------------------------------------------

def _double_quoted(text: str) -> str:
    return '"' + re.sub(r'(["\\$`])', r"\\\1", text) + '"'


def tpu_command(sweep: Sweep, point: Point, root: str, tpu_name: str, zone: str,
                remote_dir: str = "~/llamax", project: str | None = None,
                python: str = "python3") -> list[str]:
    """The gcloud argv that runs `point` on every host of the TPU VM `tpu_name`."""
    remote = f"cd {remote_dir} && " + format_command(
        train_args(sweep, point, root, python, extra=["--distributed"]))
    args = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
    if project:
        args.append(f"--project={project}")
    return args + ["--worker=all", f"--command={remote}"]


def format_tpu_command(args: Sequence[str]) -> str:
    *head, command = args
    return format_command(head) + " --command=" + _double_quoted(command[len("--command="):])


def slurm_script(sweep: Sweep, point: Point, root: str, repo_dir: str, nodes: int = 1,
                 gpus_per_node: int = 8, partition: str | None = None, time_limit: str = "24:00:00",
                 port: int = 12345, python: str = "python3") -> str:
    """An sbatch script running `point` with one task per node (each sees its node's GPUs)."""
    directory = run_dir(root, point)
    options = [f"--job-name={point.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={gpus_per_node}", f"--time={time_limit}",
               f"--output={directory}/slurm-%j.log"]
    if partition:
        options.append(f"--partition={partition}")
    command = format_command(train_args(sweep, point, root, python))
    log = _double_quoted(directory)[:-1] + '/slurm-${SLURM_JOB_ID}.log"'
    return "\n".join([
        "#!/bin/bash",
        f"# Sweep point {point.name} of {sweep.spec}; written by experiments.sweep --launcher slurm.",
        *[f"#SBATCH {option}" for option in options],
        "set -euo pipefail",
        f"cd {shell_quote(repo_dir)}",
        "# jax.distributed: the first node hosts the coordinator; one process per node.",
        'export LLAMAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
        f'| head -n 1):{port}"',
        'export LLAMAX_NUM_PROCESSES="$SLURM_NTASKS"',
        f"CMD=({command})",
        "# LLAMAX_PROCESS_ID differs per task, so it is set inside srun.",
        "srun --kill-on-bad-exit=1 bash -c 'LLAMAX_PROCESS_ID=$SLURM_PROCID exec \"$@\"' bash \"${CMD[@]}\"",
        f"if grep -q '^completed at step' {log}; then",
        f"  echo '{{\"status\": \"completed\", \"launcher\": \"slurm\"}}' > {shell_quote(directory + '/' + DONE_FILE)}",
        "fi",
        "",
    ])


def write_slurm_scripts(sweep: Sweep, root: str, slurm_dir: str, **options: Any) -> list[Path]:
    """Writes <slurm_dir>/<point>.sbatch for each unfinished point, and submit_all.sh."""
    out = Path(slurm_dir)
    out.mkdir(parents=True, exist_ok=True)
    scripts = []
    for point in sweep.points:
        if is_done(root, point):
            continue
        Path(run_dir(root, point)).mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
        script = out / f"{point.name}.sbatch"
        script.write_text(slurm_script(sweep, point, root, **options))
        scripts.append(script)
    submit = out / "submit_all.sh"
    submit.write_text("#!/bin/bash\nset -euo pipefail\n" +
                      "".join(f"sbatch {shell_quote(str(s))}\n" for s in scripts))
    submit.chmod(0o755)
    return scripts


# ---- results ----------------------------------------------------------------------------------

def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def point_result(root: str, point: Point) -> dict[str, Any]:
    """Status and final numbers of one point, from its run directory."""
    from llamax.train.metrics import read_metrics

    directory = Path(run_dir(root, point))
    records = read_metrics(directory) if directory.exists() else []
    attempts = _attempts(directory) if directory.exists() else []
    last_step = max((r.get("step", 0) for r in records), default=None)
    if (directory / DONE_FILE).exists():
        status = "completed"
    elif (directory / FAILED_FILE).exists():
        status = "failed"
    elif point.train_steps is not None and last_step is not None and last_step >= point.train_steps:
        status = "completed"  # finished outside this launcher (no DONE marker)
    elif attempts:
        status = attempts[-1]["status"]
    else:
        status = "incomplete" if records else "pending"
    speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    wall = sum(a.get("wall_s", 0.0) for a in attempts)
    return dict(point=point.name, **{k: point.bindings.get(k) for k in point.bindings},
                status=status, step=last_step, train_loss=_last(records, "loss"),
                eval_loss=_last(records, "eval_loss"), eval_perplexity=_last(records, "eval_perplexity"),
                tokens_per_s=statistics.median(speeds) if speeds else None,
                wall_s=round(wall, 1) if attempts else None)


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
    header += ["", "train_loss: last logged; eval_loss / eval_perplexity: last evaluation; "
               "tokens_per_s: median over logged windows; wall_s: summed over attempts.", "", ""]
    (out / "results.md").write_text("\n".join(header) + markdown_table(rows, columns) +
                                    "\n![loss curves](results.png)\n")
    plot_losses({p.name: read_metrics(run_dir(root, p)) for p in sweep.points
                 if Path(run_dir(root, p)).exists()}, out / "results.png", Path(sweep.spec).stem)
    return rows


# ---- command line -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="sweep spec file, e.g. configs/sweeps/tiny_lr.py")
    parser.add_argument("--root", help="where the point run directories go "
                        "(default runs/sweeps/<spec name>)")
    parser.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--parallel", type=int, default=1, help="local: points run at once")
    parser.add_argument("--execute", action="store_true",
                        help="tpu: run the gcloud commands; slurm: submit the scripts with sbatch")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="only (re)write ROOT/results.{md,csv,png}")
    parser.add_argument("--python", help="interpreter in the commands "
                        "(default: this one for local, python3 for tpu/slurm)")
    tpu = parser.add_argument_group("tpu")
    tpu.add_argument("--tpu_name")
    tpu.add_argument("--zone")
    tpu.add_argument("--project")
    tpu.add_argument("--remote_dir", default="~/llamax", help="the llamax checkout on the TPU VMs")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus_per_node", type=int, default=8)
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--repo_dir", help="the llamax checkout on the cluster (default: cwd)")
    slurm.add_argument("--slurm_dir", help="where the sbatch scripts go (default ROOT/slurm)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    root = args.root or f"runs/sweeps/{Path(args.spec).stem}"
    try:
        sweep = validate(load_sweep(args.spec))
        print(f"[sweep] {args.spec}: {len(sweep.points)} points, bindings valid", file=sys.stderr)
        if args.aggregate_only:
            write_results(sweep, root)
            print(f"[sweep] wrote {root}/results.md, results.csv, results.png")
            return 0
        if args.launcher == "local":
            return _main_local(sweep, root, args, argv)
        if args.launcher == "tpu":
            return _main_tpu(sweep, root, args)
        return _main_slurm(sweep, root, args)
    except (SweepError, SweepSpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main_local(sweep: Sweep, root: str, args: argparse.Namespace, argv: list[str]) -> int:
    python = args.python or sys.executable
    if args.dry_run:
        for index, point in enumerate(sweep.points, 1):
            state = "done, would skip" if is_done(root, point) else "would run"
            print(f"# {point.name} ({index}/{len(sweep.points)}, {state})")
            print(format_command(train_args(sweep, point, root, python)))
        return 0
    try:
        run_local(sweep, root, args.parallel, python)
    except KeyboardInterrupt:
        return 130
    rows = write_results(sweep, root, command=format_command(
        ["python", "-m", "experiments.sweep", *argv]))
    print(markdown_table(rows, results_columns(sweep)))
    print(f"[sweep] wrote {root}/results.md, results.csv, results.png")
    failed = [row["point"] for row in rows if row["status"] != "completed"]
    if failed:
        print(f"[sweep] not completed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _main_tpu(sweep: Sweep, root: str, args: argparse.Namespace) -> int:
    if not args.tpu_name or not args.zone:
        raise SweepError("--launcher tpu needs --tpu_name and --zone")
    if "://" in root:
        raise SweepError(f"--root {root} is a URL; run directories are written with local file APIs, "
                         "so mount the bucket on every host (gcsfuse) and pass the mounted path")
    for point in sweep.points:
        command = tpu_command(sweep, point, root, args.tpu_name, args.zone, args.remote_dir,
                              args.project, args.python or "python3")
        print(f"# {point.name}")
        print(format_tpu_command(command))
        if args.execute and not args.dry_run:
            returncode = subprocess.run(command).returncode
            print(f"[sweep] {point.name}: exit {returncode}", file=sys.stderr)
    return 0


def _main_slurm(sweep: Sweep, root: str, args: argparse.Namespace) -> int:
    options = dict(repo_dir=args.repo_dir or os.getcwd(), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, partition=args.partition,
                   time_limit=args.time, python=args.python or "python3")
    if args.dry_run:
        for point in sweep.points:
            print(f"# ---- {point.name}.sbatch")
            print(slurm_script(sweep, point, root, **options))
        return 0
    scripts = write_slurm_scripts(sweep, root, args.slurm_dir or f"{root}/slurm", **options)
    for script in scripts:
        print(f"sbatch {shell_quote(str(script))}")
        if args.execute:
            subprocess.run(["sbatch", str(script)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
