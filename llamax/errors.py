"""Error types llamax raises for bad input (each a ValueError, so callers can catch broadly), and
the one integer check every config uses."""
from __future__ import annotations

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
