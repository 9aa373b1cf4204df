"""The sweep spec API: what a `configs/sweeps/*.py` file is made of.

A sweep spec is a small Python file with module-level names:

    GIN_FILES = ["configs/runs/tiny.gin"]              # required: every point's --gin_file=s
    BINDINGS = {"TRAIN_STEPS": 200}                     # optional: --gin.X=V for every point
                                                        # (a point's own value overrides it)
    SWEEP = grid({"LEARNING_RATE": [1e-3, 3e-3]},       # required: the points
                 zip_({"WARMUP_STEPS": [0, 20], "fit.TrainConfig.seed": [0, 1]}))
    NAMES = {"LEARNING_RATE": "lr"}                     # optional: short keys for point names

A point is a dict {gin binding name: value}. Names are gin macros (`LEARNING_RATE`) or configurable
parameters (`config.ModelConfig.num_kv_heads`); values are Python literals (str, int, float, bool,
None, tuples) written as gin literals, or `Gin("@config.RopeScaling()")` for a raw gin expression.
The special key `gin_file` adds an extra gin file to a point (e.g. sweep over model files).

Combinators (each returns a list of points, so they nest and a plain list of dicts also works):
    grid(a, b, ...)   cartesian product; a dict {name: [values]} is the grid of its own keys
    zip_(a, b, ...)   elementwise: all parts must have the same number of points
    chain(a, b, ...)  concatenation (e.g. two grids that share no axis)

A point's name (its run directory under the sweep root) is `key=value` pairs joined by ',' in the
point's key order, with key = NAMES[name] or the binding's last dotted component, lower-cased:
    {"LEARNING_RATE": 0.003, "WARMUP_STEPS": 20}  ->  "learning_rate=0.003,warmup_steps=20"
Names are sanitized to [A-Za-z0-9._=,+-]; two points with the same name are an error.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

GIN_FILE_KEY = "gin_file"
RESERVED_KEYS = ("MODEL_DIR",)  # the sweep sets MODEL_DIR to ROOT/<point name>

Points = list[dict[str, Any]]


class SweepSpecError(ValueError):
    """A sweep spec is malformed: empty axis, mismatched zip, duplicate point names, ..."""


@dataclasses.dataclass(frozen=True)
class Gin:
    """A raw gin expression, passed through unquoted: `Gin("@config.RopeScaling()", "llama3")`.

    `label` is what the point name shows (default: the expression, sanitized)."""

    expression: str
    label: str | None = None


def _points(part: Mapping[str, Sequence[Any]] | Iterable[Mapping[str, Any]], combine: str) -> Points:
    """A part of a combinator as a list of points. A dict of axes expands with `combine`."""
    if isinstance(part, Mapping):
        axes = []
        for name, values in part.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise SweepSpecError(f"axis {name!r} must be a list of values, got {values!r}; "
                                     f"write {{{name!r}: [{values!r}]}} for a single value")
            values = list(values)
            if not values:
                raise SweepSpecError(f"axis {name!r} is empty; give it at least one value")
            axes.append([{name: value} for value in values])
        if not axes:
            raise SweepSpecError("an empty dict of axes sweeps nothing; give at least one axis")
        return grid(*axes) if combine == "grid" else zip_(*axes)
    points = [dict(point) for point in part]
    if not points:
        raise SweepSpecError("an empty list of points sweeps nothing")
    for point in points:
        if not isinstance(point, Mapping):
            raise SweepSpecError(f"a point must be a dict of bindings, got {point!r}")
    return points


def _merge(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for point in points:
        for name, value in point.items():
            if name in merged:
                raise SweepSpecError(f"binding {name!r} is set by two combined parts of the sweep "
                                     f"({merged[name]!r} and {value!r}); sweep each name in one axis")
            merged[name] = value
    return merged


def grid(*parts) -> Points:
    """Cartesian product of `parts` (dicts of axes or lists of points); the last varies fastest."""
    expanded = [_points(part, "grid") for part in parts]
    return [_merge(combo) for combo in itertools.product(*expanded)]


def zip_(*parts) -> Points:
    """Elementwise combination of `parts`, which must all have the same number of points."""
    expanded = [_points(part, "zip") for part in parts]
    lengths = {len(points) for points in expanded}
    if len(lengths) > 1:
        raise SweepSpecError(f"zip_ needs parts of equal length, got lengths "
                             f"{[len(points) for points in expanded]}")
    return [_merge(combo) for combo in zip(*expanded)]


def chain(*parts) -> Points:
    """The points of each part, one after another."""
    return [point for part in parts for point in _points(part, "grid")]


def gin_literal(value: Any) -> str:
    """`value` as gin source text for `--gin.NAME=<text>`."""
    if isinstance(value, Gin):
        return value.expression
    if isinstance(value, (bool, type(None), int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr(type(value)(value))
    raise SweepSpecError(f"cannot write {value!r} ({type(value).__name__}) as a gin literal; "
                         "use str/int/float/bool/None/tuple/list, or Gin('...') for an expression")


def _value_label(value: Any) -> str:
    if isinstance(value, Gin):
        return value.label or value.expression
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "-".join(_value_label(v) for v in value)
    if isinstance(value, str) and ("/" in value and value.endswith(".gin")):
        return value.rsplit("/", 1)[-1][: -len(".gin")]
    return str(value)


def sanitize(text: str) -> str:
    """Keeps [A-Za-z0-9._=,+-]; every other run of characters becomes one '-'."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", text).strip("-")


def short_key(name: str, names: Mapping[str, str] | None = None) -> str:
    """The key a point name shows for binding `name`."""
    if names and name in names:
        return names[name]
    return name.rsplit(".", 1)[-1].lower()


def point_name(point: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
    """The run-directory name of `point` (see the module docstring)."""
    if not point:
        raise SweepSpecError("a point has no bindings, so it has no name; every point needs one")
    return sanitize(",".join(f"{short_key(k, names)}={_value_label(v)}" for k, v in point.items()))


def name_points(points: Sequence[Mapping[str, Any]], names: Mapping[str, str] | None = None) -> list[str]:
    """Names of `points`; raises SweepSpecError if two points share a name or use a reserved key."""
    if not points:
        raise SweepSpecError("the sweep has no points")
    for point in points:
        for key in point:
            if key in RESERVED_KEYS:
                raise SweepSpecError(f"{key} is set by the sweep (ROOT/<point name>); do not sweep it")
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
                raise SweepSpecError(f"{key!r} is not a gin binding name (MACRO or scope.param)")
    labels = [point_name(point, names) for point in points]
    seen: dict[str, int] = {}
    duplicates = []
    for index, label in enumerate(labels):
        if label in seen:
            duplicates.append(f"{label!r} (points {seen[label]} and {index}: "
                              f"{dict(points[seen[label]])} / {dict(points[index])})")
        seen.setdefault(label, index)
    if duplicates:
        raise SweepSpecError("duplicate point names: " + "; ".join(duplicates) +
                             ". Values that print the same must differ, or map names with NAMES")
    return labels
