"""Weighted mixtures of sources: rows drawn from several loaders at fixed token shares.

    DataConfig(train=[("shakespeare", 0.7), ("/data/web/*.parquet", 0.3)], ...)

Each source has its own endless `Loader` (its own shuffle seed, epochs and exact state) that
yields one packed row at a time. Every row of a batch comes from the source furthest below its
share of the tokens so far (deficit round-robin): after n tokens each source has had
weight * n tokens, give or take one row, so the realized shares track the weights from the first
steps on, not only on average. A seeded head start per source (less than one row) makes the
interleave depend on the seed, and nothing else: the same seed gives the same batches.

The state (`get_state`) holds every source's loader state and token count, so a resume continues
the interleave exactly, also past the end of a small source's epoch (that source simply starts
its next, reshuffled epoch). `metrics()` gives the realized token count of each source, logged
as `tokens/<name>`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llamax.errors import ConfigError, DataError

STATE_KIND = "mixture"


def parse_mixture(value: Any, what: str = "DataConfig.train") -> tuple[tuple[str, float], ...] | None:
    """`value` as ((source, weight), ...) with weights summing to 1; None for a single source
    (a string). ConfigError for anything else, naming the entry."""
    if isinstance(value, str):
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{what} must be a source (a string) or a non-empty list of (source, weight) "
                          f"pairs, got {value!r}")
    entries = []
    for i, entry in enumerate(value):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ConfigError(f"{what}[{i}] must be a (source, weight) pair such as "
                              f"('shakespeare', 0.5), got {entry!r}")
        source, weight = entry
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ConfigError(f"{what}[{i}] ({source!r}) has weight {weight!r}; weights are finite "
                              "numbers >= 0")
        entries.append((source, float(weight)))
    total = sum(weight for _, weight in entries)
    if not total > 0:
        raise ConfigError(f"{what} mixture weights sum to {total}, not a positive number: give at "
                          "least one source a weight > 0 (weights are relative; they need not sum to 1)")
    sources = [source for source, _ in entries]
    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:
        raise ConfigError(f"{what} lists {repeated} more than once; give each source one weight")
    return tuple((source, weight / total) for source, weight in entries)


def source_names(sources: Sequence[str]) -> list[str]:
    """Short metric names: the file stem (or the source), made unique."""
    names = []
    for source in sources:
        stem = Path(source.rstrip("/*")).stem or source
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "source"
        while name in names:
            name += "_"
        names.append(name)
    return names


class MixtureLoader:
    """Batches whose rows come from several row loaders at fixed token shares (module doc).

    loaders: one `Loader` per source, each yielding [1, seq_len] batches (one row).
    """

    def __init__(self, loaders: Sequence[Any], sources: Sequence[str], weights: Sequence[float],
                 local_batch_size: int, seed: int):
        if len(loaders) != len(weights) or not loaders:
            raise DataError("a mixture needs one loader per weight")
        self.loaders = list(loaders)
        self.sources = list(sources)
        self.names = source_names(self.sources)
        self.weights = np.asarray(weights, np.float64)
        self.local_batch_size = local_batch_size
        self.seq_len = self.loaders[0].config.seq_len
        # Less than a row of head start per source, drawn from the seed: ties and the first
        # rows' order depend on the seed; the long-run shares do not.
        self._head_start = np.random.default_rng([seed, 1]).uniform(0, self.seq_len, len(self.loaders))
        self.tokens = np.zeros(len(self.loaders), np.int64)  # realized, per source
        self.rows = np.zeros(len(self.loaders), np.int64)

    def __iter__(self) -> "MixtureLoader":
        return self

    def _pick(self) -> int:
        total = self.tokens.sum()
        deficit = self.weights * (total + self.seq_len) - self.tokens + self.weights * self._head_start
        deficit[self.weights == 0] = -np.inf
        return int(np.argmax(deficit))

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.local_batch_size):
            source = self._pick()
            row = next(self.loaders[source])  # [1, seq_len] each
            self.tokens[source] += int(np.count_nonzero(row["segment_ids"]))
            self.rows[source] += 1
            rows.append(row)
        return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}  # [batch, seq_len]

    @property
    def epoch(self) -> int:
        """The most epochs any source has started (its 0-based epoch)."""
        return max(loader.epoch for loader in self.loaders)

    def metrics(self) -> dict[str, float]:
        """Realized tokens per source: {'tokens/<name>': count}."""
        return {f"tokens/{name}": float(count) for name, count in zip(self.names, self.tokens)}

    def get_state(self) -> dict[str, Any]:
        return {"kind": STATE_KIND, "sources": self.sources, "weights": self.weights.tolist(),
                "tokens": self.tokens.tolist(), "rows": self.rows.tolist(),
                "loaders": [loader.get_state() for loader in self.loaders]}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != STATE_KIND:
            raise DataError("the saved data state is of a single source, but the run now reads a "
                            "mixture; resume with the original TRAIN_DATA or start a new MODEL_DIR")
        saved = list(zip(state["sources"], state["weights"]))
        now = list(zip(self.sources, self.weights.tolist()))
        if [s for s, _ in saved] != self.sources or not np.allclose(state["weights"], self.weights):
            raise DataError(f"the saved mixture is {saved}, now {now}; resume with the original "
                            "TRAIN_DATA weights or start a new MODEL_DIR")
        for loader, loader_state in zip(self.loaders, state["loaders"]):
            loader.set_state(loader_state)
        self.tokens = np.asarray(state["tokens"], np.int64)
        self.rows = np.asarray(state["rows"], np.int64)
