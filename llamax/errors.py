"""Error types llamax raises for bad input (each a ValueError, so callers can catch broadly), and
the checks every config runs on its fields: types (from the dataclass annotations) and integers.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any


class LlamaxError(ValueError):
    """Base class: something given to llamax was wrong; the message says what and how to fix it."""


class ConfigError(LlamaxError):
    """A configuration (ModelConfig, config.json, params.json, gin binding) is invalid."""


class CheckpointError(LlamaxError):
    """Weights on disk are missing, unexpected, mis-shaped or corrupt."""


class DataError(LlamaxError):
    """Input data (text, JSONL, tokenizer) is empty, malformed or inconsistent."""


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON and gin give `true` where a count was meant)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: Any, what: str, minimum: int, hint: str = "") -> None:
    """ConfigError unless `value` is an integer >= `minimum`: '<what> must be an integer >= 1,
    got True; <hint>'."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}" + (f"; {hint}" if hint else ""))


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether `value` fits a type annotation: int (not bool), float (an int too), str, bool,
    None, `X | Y`, `tuple[X, ...]`, `Mapping`/`dict`, classes; anything else (Any, callables,
    unresolved names) is accepted, so the check never refuses what it does not understand."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is int:
        return is_int(value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_matches(item, args[0]) for item in value)
        return len(args) == len(value) and all(map(type_matches, value, args))
    if origin is not None:
        return isinstance(value, origin) if isinstance(origin, type) else True
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def describe_type(annotation: Any) -> str:
    """'a float', 'a str or None', ... for error messages."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args)
    if annotation is type(None):
        return "None"
    if typing.get_origin(annotation) is tuple:
        return f"a tuple of {describe_type(args[0])}" if args else "a tuple"
    name = getattr(annotation, "__name__", str(annotation))
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field_types(config: Any) -> None:
    """ConfigError naming the first field of a dataclass `config` whose value does not fit its
    annotation, e.g. "OptimConfig.learning_rate must be a float, got 'abc' (str)" (a gin binding
    of the wrong type would otherwise fail later, deep inside a comparison)."""
    hints = _field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        annotation = hints.get(field.name, Any)
        if not type_matches(value, annotation):
            raise ConfigError(f"{type(config).__name__}.{field.name} must be {describe_type(annotation)}, "
                              f"got {value!r} ({type(value).__name__})")
