"""Error types llamax raises for bad input. Each is a ValueError so callers can catch broadly."""


class LlamaxError(ValueError):
    """Base class: something given to llamax was wrong; the message says what and how to fix it."""


class ConfigError(LlamaxError):
    """A configuration (ModelConfig, config.json, params.json, gin binding) is invalid."""


class CheckpointError(LlamaxError):
    """Weights on disk are missing, unexpected, mis-shaped or corrupt."""


class DataError(LlamaxError):
    """Input data (text, JSONL, tokenizer) is empty, malformed or inconsistent."""
