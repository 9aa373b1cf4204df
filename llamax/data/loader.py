"""The grain input pipeline: documents -> shuffled, tokenized, packed `[batch, seq_len]` batches.

    source (random access) -> this process's slice [process_index::process_count]
      -> shuffle(seed), reshuffled every epoch -> repeat(num_epochs)
      -> tokenize in grain threads (BOS ... EOS, or an SFT template)
      -> pack into rows and batch (`PackedBatchIterator`, numpy, see `packing`)

Each process reads a disjoint set of documents and yields its local batch of
`global_batch_size // process_count` rows; `llamax.sharding.to_global_batch` assembles the local batches of all
processes into one global `jax.Array` (the global batch is their concatenation, in process order).

The iterator state is a small JSON-serialisable dict: the grain index of the document that starts
the next row plus how many of its tokens earlier rows already hold. Restoring it re-reads that one
document and yields exactly the batches the original iterator would have yielded next, across
epoch boundaries too. Training loaders repeat forever (`num_epochs=None`, `loader.epoch` counts);
evaluation loaders (`num_epochs=1`) stop, padding the last batch with all-padding rows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from llamax.data import chat_templates, packing, preference, sft
from llamax.data.shuffle import BlockShuffleMapDataset
from llamax.errors import ConfigError, DataError, check_field_types

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How documents become batches.

    Attributes:
        seq_len: tokens per row.
        global_batch_size: rows per step summed over all processes.
        seed: shuffle seed (epoch e uses seed + e).
        shuffle: shuffle documents (off for evaluation if order matters).
        num_epochs: None = repeat forever (training); N = stop after N passes (evaluation).
        sft_template: None for pretraining text; for SFT data 'checkpoint' (the tokenizer's own
            chat template, see `llamax.data.sft`) or a built-in 'llama2', 'llama3', 'plain'.
            For preference data: the chat template pairs are rendered with (None: text pairs).
        preference: documents are preference records (`llamax.data.preference`); each batch
            row holds whole (chosen, rejected) pairs for DPO.
        fill_rows: split documents at row boundaries so rows have no padding (pretraining);
            off: a document that fits in a row is never split (see `packing`).
        shuffle_window: None: a global shuffle of in-memory documents, and blocks of
            `tables.DEFAULT_SHUFFLE_WINDOW` documents for Parquet/Arrow sources; N: blocks of N
            consecutive documents visited in a random order, shuffled within (`shuffle`).
        process_index, process_count: this process's place; default jax.process_index/count().
        num_threads: grain threads that tokenize ahead of the packer.
        prefetch: documents tokenized ahead.
    """

    seq_len: int
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    sft_template: str | None = None
    preference: bool = False
    fill_rows: bool = False
    shuffle_window: int | None = None
    process_index: int | None = None
    process_count: int | None = None
    num_threads: int = 2
    prefetch: int = 256

    def __post_init__(self):
        check_field_types(self)


class _Encode:
    """grain map: (index, document) -> (epoch, tokens [n] int32, weights [n] float32), for
    preference pairs (epoch, tokens, weights, chosen length, reference), or None (skipped)."""

    def __init__(self, tokenizer, sft_template: str | None, docs_per_epoch: int,
                 preference_seq_len: int | None = None):
        self.tokenizer = tokenizer
        self.sft_template = sft_template
        self.docs_per_epoch = docs_per_epoch
        self.preference_seq_len = preference_seq_len
        self.skipped_pairs = 0

    def __call__(self, index: int, document: Any):
        epoch = index // self.docs_per_epoch
        if self.preference_seq_len is not None:
            if not isinstance(document, dict) or "chosen" not in document:
                raise DataError("preference documents must be parsed preference records; read them "
                                "with open_documents(..., record_format='preference')")
            pair = preference.encode_pair(document, self.tokenizer, self.sft_template,
                                          self.preference_seq_len)
            if pair is None:
                self.skipped_pairs += 1
                if self.skipped_pairs in (1, 10, 100, 1000, 10000):  # a growing count, not a flood
                    log.warning("skipped %d preference pair(s): cut to seq_len=%d they keep no "
                                "completion token on one side (raise seq_len or shorten prompts)",
                                self.skipped_pairs, self.preference_seq_len)
                return None
            return (epoch, *pair)
        if self.sft_template is None:
            if not isinstance(document, str):
                raise DataError(f"pretraining documents must be str, got {type(document).__name__}"
                                "; for SFT records pass sft_template='checkpoint'|'llama2'|'llama3'|"
                                "'plain'")
            if not document.strip():
                return None  # empty documents are skipped (grain drops None)
            ids = self.tokenizer.encode(document, bos=True, eos=True)
            return epoch, np.asarray(ids, np.int32), np.ones((len(ids),), np.float32)
        if not isinstance(document, dict) or "messages" not in document:
            raise DataError("SFT documents must be {'messages': [...]}; read them with "
                            "open_documents(..., sft_format=True)")
        tokens, weights = sft.encode_conversation(document["messages"], self.tokenizer,
                                                  self.sft_template)
        return epoch, tokens, weights


class PackedBatchIterator(grain.DatasetIterator):
    """Packs the parent's (epoch, tokens, weights) documents into `[batch, seq_len]` batches."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, batch_size: int,
                 fill_rows: bool = False, make_packer: Callable[[], Any] | None = None):
        super().__init__(parent)
        self.batch_size = batch_size
        self.epoch = 0
        self._make_packer = make_packer or (lambda: packing.DocumentPacker(seq_len, fill_rows))
        self._packer = self._make_packer()
        self._document_parent_state: dict | None = None  # parent state before the current doc

    def _read_document(self) -> bool:
        state = self._parent.get_state()
        try:
            epoch, *document = next(self._parent)
        except StopIteration:
            return False
        self.epoch = epoch
        self._packer.set_document(*document)
        self._document_parent_state = state
        return True

    def _next_row(self) -> dict[str, np.ndarray] | None:
        while True:
            if self._packer.needs_document and not self._read_document():
                break
            if not self._packer.place():
                break
        return self._packer.finish_row()

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size:
            row = self._next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        return packing.stack_rows(rows, self.batch_size)  # [batch, seq_len] each

    def get_state(self) -> dict[str, Any]:
        # Between batches the row under construction is empty, so the only carried-over data is
        # the rest of the current document: resume by re-reading it and skipping `offset` tokens.
        if self._packer.needs_document:
            parent, skip = self._parent.get_state(), 0
        else:
            parent, skip = self._document_parent_state, self._packer.offset
        return {"parent": _plain(parent), "skip_tokens": int(skip), "epoch": int(self.epoch)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._packer = self._make_packer()
        self.epoch = state["epoch"]
        if state["skip_tokens"]:
            if not self._read_document():
                raise DataError("loader state points past the end of the data")
            document = self._packer.document
            if state["skip_tokens"] > len(document[0]):
                raise DataError("loader state does not match the data (document shorter than the "
                                "saved offset); was it saved with other data or tokenizer?")
            self._packer.set_document(*document, offset=state["skip_tokens"])


class _PackedBatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, seq_len: int, batch_size: int, fill_rows: bool,
                 make_packer: Callable[[], Any] | None = None):
        super().__init__(parent)
        self.seq_len, self.batch_size, self.fill_rows = seq_len, batch_size, fill_rows
        self.make_packer = make_packer

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self.seq_len, self.batch_size,
                                   self.fill_rows, self.make_packer)


class Loader:
    """Iterator over local batches with exact, JSON-serialisable state.

    Use `make_loader`. `get_state()` after k batches, then `set_state(state)` on a fresh Loader
    built with the same config and data, yields batch k+1, k+2, ... of the original.
    """

    def __init__(self, documents: Sequence[Any], tokenizer, config: LoaderConfig):
        process_index = jax.process_index() if config.process_index is None else config.process_index
        process_count = jax.process_count() if config.process_count is None else config.process_count
        _validate(config, process_index, process_count, len(documents))
        if isinstance(documents, list) and not any(
                not isinstance(d, str) or d.strip() for d in documents):
            # Empty documents are skipped, so an all-empty list would make `next` spin forever.
            raise DataError(f"all {len(documents)} documents are empty")
        self.config = config
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = config.global_batch_size // process_count
        dataset = grain.MapDataset.source(documents)[process_index::process_count]
        docs_per_epoch = len(dataset)
        if docs_per_epoch == 0:
            raise DataError(f"process {process_index} of {process_count} gets no documents: there "
                            f"are only {len(documents)}; use more data or fewer processes")
        window = config.shuffle_window or getattr(documents, "shuffle_window", None)
        if config.shuffle and window:
            dataset = BlockShuffleMapDataset(dataset, window=window, seed=config.seed)
        elif config.shuffle:
            dataset = dataset.shuffle(seed=config.seed)
        dataset = dataset.repeat(config.num_epochs)
        make_packer = None
        if config.preference:
            with_reference = preference.reference_kind(documents)
            make_packer = lambda: preference.PairPacker(config.seq_len, with_reference)  # noqa: E731
        dataset = dataset.map_with_index(_Encode(tokenizer, config.sft_template, docs_per_epoch,
                                                 config.seq_len if config.preference else None))
        read_options = grain.ReadOptions(num_threads=config.num_threads,
                                         prefetch_buffer_size=config.prefetch)
        packed = _PackedBatchDataset(dataset.to_iter_dataset(read_options), config.seq_len,
                                     self.local_batch_size, config.fill_rows, make_packer)
        self._fingerprint = {"seq_len": config.seq_len, "global_batch_size": config.global_batch_size,
                             "seed": config.seed, "shuffle": config.shuffle,
                             "process_index": process_index, "process_count": process_count,
                             "num_documents": len(documents), "sft_template": config.sft_template,
                             "fill_rows": config.fill_rows}
        # Absent unless set, so loader states saved before these options existed still fit.
        if config.preference:
            self._fingerprint["preference"] = True
        if config.shuffle and window:
            self._fingerprint["shuffle_window"] = window
        self._iterator: PackedBatchIterator = iter(packed)

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    @property
    def epoch(self) -> int:
        """Epoch (0-based) of the most recently read document."""
        return self._iterator.epoch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: `json.dumps(loader.get_state())` works."""
        return {"version": STATE_VERSION, "config": dict(self._fingerprint),
                "iterator": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        """Restores a state from `get_state` (or its JSON); checks it fits this loader."""
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("kind") == "mixture":
            raise DataError("the saved data state is of a weighted mixture, but this run reads one "
                            "source; resume with the original TRAIN_DATA mixture or start a new MODEL_DIR")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not supported "
                            f"(expected {STATE_VERSION})")
        saved = state["config"]
        diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if diff:
            raise DataError(
                "loader state was saved with a different setup: "
                + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + ". Restore with the same data and LoaderConfig, or start a fresh loader")
        self._iterator.set_state(state["iterator"])


def make_loader(documents: Sequence[Any], tokenizer, config: LoaderConfig | None = None,
                **config_kwargs) -> Loader:
    """A Loader over `documents` (see `llamax.data.sources.open_documents`).

    Example:
        docs = open_documents(shakespeare_files("train"), text_split="paragraph")
        loader = make_loader(docs, Tokenizer(path), seq_len=256, global_batch_size=8)
        batch = next(loader)  # dict of [8, 256] arrays, see `llamax.data`
    """
    if config is None:
        config = LoaderConfig(**config_kwargs)
    elif config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    return Loader(documents, tokenizer, config)


def _validate(config: LoaderConfig, process_index: int, process_count: int, num_docs: int) -> None:
    """A bad knob is a ConfigError, as everywhere; missing data is a DataError."""
    if config.seq_len < 2:
        raise ConfigError(f"LoaderConfig.seq_len must be >= 2, got {config.seq_len}")
    if config.global_batch_size <= 0 or config.global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={config.global_batch_size} must be a positive multiple "
                          f"of process_count={process_count} (each process loads an equal slice)")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} not in [0, {process_count})")
    if config.num_epochs is not None and config.num_epochs <= 0:
        raise ConfigError(f"num_epochs must be None (forever) or positive, got {config.num_epochs}")
    if config.shuffle_window is not None and (not isinstance(config.shuffle_window, int)
                                              or config.shuffle_window < 1):
        raise ConfigError(f"shuffle_window must be None or a positive integer, got {config.shuffle_window!r}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
    if config.sft_template is not None and config.sft_template not in chat_templates.SFT_TEMPLATES:
        raise ConfigError(f"unknown sft_template {config.sft_template!r}; choose one of "
                          f"{list(chat_templates.SFT_TEMPLATES)} or None for pretraining text")
    if num_docs == 0:
        raise DataError("no documents to load")


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so states are JSON-serialisable."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
