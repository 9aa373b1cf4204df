"""PyTorch `.pth` files tensor by tensor: memory-mapped reads and streaming writes.

Meta's `consolidated.NN.pth` shards are torch zip archives: a pickle (`data.pkl`) naming each
tensor's shape, dtype and storage record, plus one uncompressed, 64-byte aligned record per
storage. `torch.load(weights_only=True, mmap=True)` maps the whole file, but keeps every page it
has touched resident until the last tensor is dropped, so converting a 16 GB shard tensor by
tensor would still end with 16 GB of resident pages. Instead:

* `PthFile` lets torch do the (safe, weights_only) unpickling once, records each tensor's file
  offset, shape and dtype, drops torch's mapping, and then maps one tensor at a time with
  `np.memmap`, exactly like `SafetensorsFile`.
* `PthWriter` lets `torch.save` write the archive with `torch.serialization.skip_data()` (the
  structure, with holes where the bytes go; the template tensors are never touched, so they cost
  no memory), then fills each tensor's bytes at its offset with `os.pwrite` as it arrives, in any
  order. Peak memory is one tensor, whatever the file size.

Offsets: torch maps the file once and hands out storages as views into that mapping, so the
difference between two storages' data pointers is the difference between their file offsets.
Anchoring the lowest pointer at the first data record (read from the zip directory) gives every
tensor's offset without reading a byte of tensor data or relying on torch's record naming.
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from llamax.files import contiguous_bytes
from llamax.errors import CheckpointError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise CheckpointError("reading or writing .pth files needs torch: pip install -e '.[convert]'") from exc
    return torch


def _numpy_dtype(torch_dtype) -> np.dtype:
    torch = _torch()
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
             torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
             torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
    if torch_dtype not in table:
        raise CheckpointError(f"unsupported tensor dtype {torch_dtype} in a .pth file")
    return np.dtype(table[torch_dtype])


def torch_dtype(dtype: np.dtype):
    """The torch dtype of a numpy dtype (bfloat16 via ml_dtypes)."""
    torch = _torch()
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _first_data_offset(path: Path) -> int:
    """File offset of the bytes of the first storage record (`<archive>/data/<key>`)."""
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist()
                   if info.filename.split("/")[-2:-1] == ["data"]]
    if not records:
        return -1
    first = min(records, key=lambda info: info.header_offset)
    if first.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: tensor data is compressed; expected a torch.save archive")
    with open(path, "rb") as f:
        f.seek(first.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    name_length, extra_length = fields[-2], fields[-1]
    return first.header_offset + _LOCAL_HEADER.size + name_length + extra_length


class PthFile:
    """One `.pth` state dict: names, shapes and dtypes read eagerly, tensors memory-mapped on access.

    Raises CheckpointError for anything torch refuses under `weights_only=True`, for archives
    that are not a flat dict of tensors, and for the legacy (pre-1.6, non-zip) format.
    """

    def __init__(self, path: str | os.PathLike):
        torch = _torch()
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            # Legacy pickles cannot be memory-mapped (and are never executed): refused like any
            # file torch's weights_only loader rejects.
            raise CheckpointError(f"refusing or unable to load {self.path} as plain tensors (torch.load "
                                  "weights_only=True): it is not a torch zip archive (the legacy format "
                                  "of torch < 1.6); re-save it with a current torch")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            raise CheckpointError(
                f"refusing or unable to load {self.path} as plain tensors (torch.load "
                f"weights_only=True): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{self.path} holds a {type(state).__name__} that is not a flat dict of "
                                  "tensors; expected a state_dict saved with torch.save")
        self.file_size = os.path.getsize(self.path)
        self.entries: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        pointers = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
        base_pointer, base_offset = (min(pointers), _first_data_offset(self.path)) if pointers else (0, 0)
        for name, tensor in state.items():
            dtype = _numpy_dtype(tensor.dtype)
            if not tensor.is_contiguous():
                raise CheckpointError(f"{self.path}: tensor {name!r} is not contiguous; re-save it "
                                      "with .contiguous() tensors")
            offset = (base_offset + tensor.untyped_storage().data_ptr() - base_pointer
                      + tensor.storage_offset() * dtype.itemsize) if tensor.numel() else 0
            self.entries[name] = (offset, tuple(tensor.shape), dtype)
        del state  # unmaps torch's view of the file

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no bytes are read until used)."""
        offset, shape, dtype = self.entries[name]
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size == 0:
            return np.empty(shape, dtype)
        if offset + size > self.file_size:
            raise CheckpointError(f"{self.path}: tensor {name!r} runs past the end of the file: truncated")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)


class PthWriter:
    """Writes a `.pth` state dict whose tensors arrive one at a time, in any order.

    `specs` maps each tensor name to (shape, numpy dtype); the archive is laid out on construction
    (a sparse file) and `write` fills one tensor. The file is complete once every tensor was written
    (`close` checks that). `torch.load` reads it like any `torch.save` output.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        torch = _torch()
        self.path = Path(path)
        # torch.empty only reserves address space: skip_data never touches the bytes.
        templates = {name: torch.empty(tuple(shape), dtype=torch_dtype(dtype)) for name, (shape, dtype) in specs.items()}
        with torch.serialization.skip_data():
            torch.save(templates, self.path)
        del templates
        self._layout = PthFile(self.path)
        self._pending = set(specs)
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes tensor `name`; `array` must have the declared shape and dtype."""
        offset, shape, dtype = self._layout.entries[name]
        if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
            raise CheckpointError(f"{self.path}: tensor {name!r} declared {shape} {dtype}, "
                                  f"got {tuple(array.shape)} {array.dtype}")
        data = contiguous_bytes(array)
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], offset + written)
        self._pending.discard(name)

    def close(self) -> None:
        """Closes the file; raises CheckpointError if a declared tensor was never written."""
        os.close(self._fd)
        if self._pending:
            raise CheckpointError(f"{self.path}: {len(self._pending)} tensor(s) were never written, "
                                  f"e.g. {sorted(self._pending)[:3]}")
