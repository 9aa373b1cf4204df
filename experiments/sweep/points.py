"""A sweep: its points (named runs of `experiments.train` with their bindings), loaded from a
spec file, and the command line that trains each point."""
from __future__ import annotations

import dataclasses
import os
import re
import runpy
import shlex
from pathlib import Path
from typing import Any, Sequence

from experiments.sweep_spec import GIN_FILE_KEY, SweepSpecError, gin_literal, name_points

TRAIN_MODULE = "experiments.train"


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
