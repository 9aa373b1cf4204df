"""Block shuffle: a random order that reads storage blocks one after another.

A global shuffle of a Parquet or Arrow source would decode a whole row group for every document
it reads. `BlockShuffleMapDataset` instead cuts the documents into blocks of `window` consecutive
ones, visits the blocks of each epoch in a random order and the documents of a block in a random
order, so a reader decodes each row group about once per epoch. The order depends only on the
number of documents, the window, the seed and the epoch: the same rows in JSONL, Parquet or
Arrow come out in the same order.
"""
from __future__ import annotations

import functools

import grain
import numpy as np


class BlockShuffleMapDataset(grain.MapDataset):
    """grain MapDataset: parent[i] in block-shuffled order; index // len is the epoch (each epoch
    reshuffles, as grain's global shuffle does)."""

    def __init__(self, parent: grain.MapDataset, *, window: int, seed: int):
        super().__init__(parent)
        self._window, self._seed = int(window), int(seed)
        self._length = len(parent)
        self._num_blocks = -(-self._length // self._window)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"BlockShuffleMapDataset(window={self._window})"

    def _block_size(self, block: int) -> int:
        return min(self._window, self._length - block * self._window)

    @functools.lru_cache(maxsize=2)
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block visit order [blocks], where each visited block starts [blocks + 1])."""
        order = np.random.default_rng([self._seed, epoch]).permutation(self._num_blocks)
        sizes = np.minimum(self._window, self._length - order * self._window)
        return order, np.concatenate([[0], np.cumsum(sizes)])

    @functools.lru_cache(maxsize=16)
    def _block_order(self, epoch: int, block: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch, block]).permutation(self._block_size(block))

    def _shuffled_index(self, index: int) -> int:
        epoch, position = divmod(int(index), self._length)
        order, starts = self._epoch_order(epoch)
        slot = int(np.searchsorted(starts, position, side="right")) - 1
        block = int(order[slot])
        within = int(self._block_order(epoch, block)[position - starts[slot]])
        return epoch * self._length + block * self._window + within

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._shuffled_index(index)]
