"""Sequence packing in pure numpy: documents in, fixed `[seq_len]` rows out.

A document is `(tokens, weights)`: int token ids (already with BOS/EOS) and, per token, whether it
is a *scored target* (1.0 for every token of pretraining text; only response tokens for SFT).

Packing is greedy and order preserving:
  1. A document longer than `seq_len` is cut into `seq_len`-sized chunks (the last one shorter).
     Each chunk is its own segment with positions restarting at 0, so the transition from the
     last token of one chunk to the first token of the next is not scored. Nothing is dropped.
  2. Chunks are placed in order; a chunk that does not fit in the rest of the current row starts
     a new row (the rest is padding). Documents that fit in a row are never split.
  With `fill_rows=True` (best for pretraining: no padding) a chunk that does not fit is instead
  split at the row boundary, its rest continuing as a new segment of the next row; as with long
  documents, the one transition across the cut is not scored.

Each row is a dict of `[seq_len]` arrays (the batch contract, see `llamax.data`):
  tokens, targets, segment_ids (1, 2, ... per segment, 0 = padding), positions, loss_mask, where
  `targets[i] = tokens[i + 1]` within a segment and `loss_mask[i] = weights[i + 1]`; the last token
  of a segment and padding get target 0 and loss_mask 0.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from llamax.errors import ConfigError, DataError

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32,
                "positions": np.int32, "loss_mask": np.float32}

Document = tuple[np.ndarray, np.ndarray]  # (tokens [n] int32, weights [n] float32)


def as_document(tokens, weights=None) -> Document:
    """Normalises token ids (and optional per-token target weights, default all ones)."""
    tokens = np.asarray(tokens, dtype=np.int32)  # [n]
    if weights is None:
        weights = np.ones(tokens.shape, np.float32)
    weights = np.asarray(weights, dtype=np.float32)  # [n]
    if tokens.ndim != 1 or weights.shape != tokens.shape:
        raise DataError(f"a document needs 1-D tokens and weights of equal length, got shapes "
                         f"{tokens.shape} and {weights.shape}")
    return tokens, weights


class RowBuilder:
    """Fills one `[seq_len]` row segment by segment."""

    def __init__(self, seq_len: int):
        if seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (one input and one target), got {seq_len}")
        self.seq_len = seq_len
        self._row = empty_row(seq_len)
        self.used = 0
        self.num_segments = 0

    def fits(self, length: int) -> bool:
        return self.used + length <= self.seq_len

    def add(self, tokens: np.ndarray, weights: np.ndarray) -> None:
        """Appends one segment (at most seq_len tokens) that `fits`."""
        n = len(tokens)
        if n == 0 or not self.fits(n):
            raise DataError(f"segment of {n} tokens does not fit: {self.used}/{self.seq_len} used")
        start, end = self.used, self.used + n
        self.num_segments += 1
        row = self._row
        row["tokens"][start:end] = tokens
        row["targets"][start:end - 1] = tokens[1:]
        row["segment_ids"][start:end] = self.num_segments
        row["positions"][start:end] = np.arange(n, dtype=np.int32)
        row["loss_mask"][start:end - 1] = weights[1:]
        self.used = end

    def finish(self) -> dict[str, np.ndarray]:
        """Returns the row and resets the builder."""
        row = self._row
        self._row, self.used, self.num_segments = empty_row(self.seq_len), 0, 0
        return row


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row: zeros everywhere."""
    return {key: np.zeros((seq_len,), BATCH_DTYPES[key]) for key in BATCH_KEYS}


class DocumentPacker:
    """Pull-based greedy packer: holds one row being built and the document being placed.

    Feed a document with `set_document`, call `place` until it returns True (document fully
    placed) and take a full row with `finish_row` whenever `place` returns False (row full).
    `offset` (tokens of the current document already placed) is all the state needed to resume.
    """

    def __init__(self, seq_len: int, fill_rows: bool = False):
        self.seq_len = seq_len
        self.fill_rows = fill_rows
        self.builder = RowBuilder(seq_len)
        self.document: Document | None = None
        self.offset = 0

    @property
    def needs_document(self) -> bool:
        return self.document is None or self.offset >= len(self.document[0])

    def set_document(self, tokens: np.ndarray, weights: np.ndarray, offset: int = 0) -> None:
        if offset > len(tokens):
            raise DataError(f"offset {offset} is past the end of a {len(tokens)}-token document")
        self.document, self.offset = (tokens, weights), offset

    def place(self) -> bool:
        """Places pieces of the current document; False if the row filled up first."""
        tokens, weights = self.document
        while self.offset < len(tokens):
            piece = min(len(tokens) - self.offset, self.seq_len)
            space = self.seq_len - self.builder.used
            if piece > space:
                if not (self.fill_rows and space >= 2):
                    return False
                piece = space
            end = self.offset + piece
            self.builder.add(tokens[self.offset:end], weights[self.offset:end])
            self.offset = end
        return True

    def finish_row(self) -> dict[str, np.ndarray] | None:
        """The row built so far (None if empty); starts a new one."""
        return self.builder.finish() if self.builder.used else None


def pack_documents(documents: Iterable[Document], seq_len: int,
                   fill_rows: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Greedily packs documents, in order, into rows (see the module docstring)."""
    packer = DocumentPacker(seq_len, fill_rows)
    for tokens, weights in documents:
        packer.set_document(tokens, weights)
        while not packer.place():
            yield packer.finish_row()
    row = packer.finish_row()
    if row is not None:
        yield row


def stack_rows(rows: list[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks rows into a `[batch_size, seq_len]` batch, appending all-padding rows if short."""
    if not rows or len(rows) > batch_size:
        raise DataError(f"need 1..{batch_size} rows, got {len(rows)}")
    seq_len = len(rows[0]["tokens"])
    keys = list(rows[0])  # BATCH_KEYS, + `ref_logps` in preference rows that carry it
    padding = {key: np.zeros((seq_len,), rows[0][key].dtype) for key in keys}
    rows = rows + [padding] * (batch_size - len(rows))
    return {key: np.stack([row[key] for row in rows]) for key in keys}  # [batch, seq_len]
