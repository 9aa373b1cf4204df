"""HF weight files read tensor by tensor: safetensors and torch `.bin`, both memory-mapped.

Reading is lazy: `WeightFolder(path)` is a mapping whose values are read only when asked for,
so converters hold one tensor (or one layer) at a time, whatever the model size. Paths named by
index files are confined to the checkpoint folder (`safe_member`). Writing is `HFWriter`'s job
(`llamax.convert.hf`); `safetensors_header` is the one header layout both use.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from llamax.convert.pth import PthFile
from llamax.errors import CheckpointError, is_int

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_CODES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def _allowed_roots(folder: Path) -> list[Path]:
    """Where files of `folder` may live: the folder itself and, for a Hugging Face hub cache
    snapshot (`<repo>/snapshots/<revision>/...`, whose files are symlinks to `<repo>/blobs/`),
    that repository's blob store."""
    folder = folder.absolute()
    roots = [folder.resolve()]
    for ancestor in folder.parents:
        if ancestor.name == "snapshots" and (ancestor.parent / "blobs").is_dir():
            roots.append((ancestor.parent / "blobs").resolve())
            break
    return roots


def safe_member(folder: Path, name: str) -> Path:
    """`name` (from an index file, or a fixed weight file name) as a file inside `folder`.

    Refuses absolute paths, `..` components and symlinks that resolve outside the folder (a
    downloaded checkpoint must not make us read, say, /etc/shadow or another model's files);
    the one exception is a hub cache snapshot's own blob store, see `_allowed_roots`.
    """
    if (not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name)
            or ".." in Path(name).parts):
        raise CheckpointError(f"{folder}: weight file {name!r} (named by an index file or the folder) "
                              "is not a plain file name inside the checkpoint folder")
    path = (folder / name).resolve()
    if not any(root in path.parents for root in _allowed_roots(folder)):
        raise CheckpointError(f"{folder}: weight file {name!r} escapes the checkpoint folder "
                              f"(it resolves to {path}, e.g. through a symlink); refusing to read it")
    return path


class SafetensorsFile:
    """One `.safetensors` file: header parsed eagerly, tensors memory-mapped on access."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                if header_size > os.path.getsize(self.path):
                    raise ValueError(f"header size {header_size} exceeds the file size")
                header = json.loads(f.read(header_size))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {exc}") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: the safetensors header is a {type(header).__name__}, "
                                  "expected a JSON object of tensor entries")
        self.metadata = header.pop("__metadata__", {}) or {}
        for name, entry in header.items():
            _check_entry(self.path, name, entry)
        self.entries = header
        self.data_start = 8 + header_size
        self.file_size = os.path.getsize(self.path)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{self.path}: the header gives tensor {name!r} bytes {begin}..{end} ({end - begin} "
                f"bytes), but its shape {shape} and dtype {entry.get('dtype')} need {expected}: the "
                "header is corrupt")
        available = self.file_size - self.data_start
        if end > available:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} needs bytes {begin}..{end} of the data section, but the "
                f"file holds only {max(available, 0)} bytes of data: it is truncated (copy or download "
                "it again)")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)


def _check_entry(path: Path, name: str, entry: object) -> None:
    """Raises CheckpointError unless `entry` is a well-formed safetensors header entry."""
    def is_count(value: object) -> bool:
        return is_int(value) and value >= 0

    ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
          and all(is_count(d) for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(is_count(o) for o in entry["data_offsets"]))
    if not ok:
        raise CheckpointError(f"{path}: header entry for tensor {name!r} is malformed ({entry!r:.200}); "
                              "expected {\"dtype\", \"shape\": [ints], \"data_offsets\": [begin, end]}")


class WeightFolder(Mapping):
    """Lazy name -> np.ndarray view over an HF checkpoint folder (single or sharded)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[Path, SafetensorsFile | PthFile] = {}
        self._where: dict[str, Path] = {}
        self.format = ""
        self.format = self._discover()

    def _discover(self) -> str:
        # Safetensors first: it cannot run code, whereas a torch pickle is only as safe as
        # `weights_only=True`. A folder holding both formats never opens its .bin files.
        for index_name, single_name, fmt in (
                ("model.safetensors.index.json", "model.safetensors", "safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin", "torch")):
            index_path = self.folder / index_name
            if index_path.exists():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{index_path} is not a valid weight index: {exc!r}") from exc
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index_path}: weight_map must be a non-empty object "
                                          "mapping tensor names to file names")
                for name, file_name in weight_map.items():
                    path = safe_member(self.folder, file_name)
                    if not path.is_file():
                        raise CheckpointError(f"{index_path} maps {name!r} to {file_name}, which is missing")
                    self._where[name] = path
                return fmt
            if (self.folder / single_name).exists():
                single = safe_member(self.folder, single_name)
                self.format = fmt
                for name in self._file(single).keys():
                    self._where[name] = single
                return fmt
        raise CheckpointError(
            f"no weights found in {self.folder}: expected model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")

    def _file(self, path: Path) -> SafetensorsFile | PthFile:
        # Both kinds map one tensor at a time: a `.bin` shard is read like Meta's `.pth` shards
        # (`PthFile`: torch unpickles the table of contents with weights_only=True, then each
        # tensor is memory-mapped), so memory stays at one tensor whatever the shard size.
        if path not in self._files:
            self._files[path] = SafetensorsFile(path) if self.format == "safetensors" else PthFile(path)
        return self._files[path]

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._where[name]
        file = self._file(path)
        if name not in file.entries:
            raise CheckpointError(f"index says {name!r} is in {path.name}, but that file lacks it")
        return file.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self._where[name]).shape(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def safetensors_header(entries: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
                       ) -> tuple[bytes, dict[str, int], int]:
    """The header of a safetensors file holding `entries` ({name: (dtype, shape)}, in file order).

    Returns (the header bytes: 8-byte length + JSON, padded so tensor data is 8-byte aligned as
    the reference writer does; each tensor's offset from the end of the header; the data size).
    The `format: pt` metadata is what transformers requires.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offsets, offset = {}, 0
    for name, (dtype, shape) in entries.items():
        code = _DTYPE_CODES.get(np.dtype(dtype))
        if code is None:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {np.dtype(dtype)} to safetensors")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets, offset


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes tensors (numpy, bf16 via ml_dtypes) as one safetensors file, whole (tests and
    benchmarks build fixtures with it; checkpoints are written by `llamax.convert.hf.HFWriter`)."""
    header, _, _ = safetensors_header({name: (a.dtype, a.shape) for name, a in tensors.items()})
    with open(path, "wb") as f:
        f.write(header)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
