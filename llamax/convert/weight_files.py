"""Reading and writing weight files tensor by tensor: safetensors (memory-mapped) and torch `.bin`.

Reading is lazy: `open_weight_folder` returns a mapping whose values are read only when asked
for, so converters can hold one tensor (or one layer) at a time, whatever the model size.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from llamax.errors import CheckpointError

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
        if end - begin != expected or self.data_start + end > self.file_size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} should span {expected} bytes at offset {begin}, but the "
                f"file holds bytes {begin}..{end} of {self.file_size - self.data_start}: truncated or corrupt")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)


def _check_entry(path: Path, name: str, entry: object) -> None:
    """Raises CheckpointError unless `entry` is a well-formed safetensors header entry."""
    def is_count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
          and all(is_count(d) for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(is_count(o) for o in entry["data_offsets"]))
    if not ok:
        raise CheckpointError(f"{path}: header entry for tensor {name!r} is malformed ({entry!r:.200}); "
                              "expected {\"dtype\", \"shape\": [ints], \"data_offsets\": [begin, end]}")


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def load_torch_file(path: Path) -> dict[str, np.ndarray]:
    """A `pytorch_model*.bin` / `.pth` state dict as numpy. Uses `weights_only=True`: a pickle that
    would run code is refused rather than executed."""
    try:
        import torch
    except ImportError as exc:
        raise CheckpointError(f"reading {path} needs torch: pip install -e '.[convert]'") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(
            f"refusing or unable to load {path} as plain tensors (torch.load weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__} that is not a flat dict of "
                              "tensors; expected a state_dict saved with torch.save")
    return {name: _torch_to_numpy(t) for name, t in state.items()}


class WeightFolder(Mapping):
    """Lazy name -> np.ndarray view over an HF checkpoint folder (single or sharded)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        self._torch_cache: dict[Path, dict[str, np.ndarray]] = {}
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
                names = self._file(single).keys() if fmt == "safetensors" else self._torch(single)
                for name in names:
                    self._where[name] = single
                return fmt
        raise CheckpointError(
            f"no weights found in {self.folder}: expected model.safetensors, "
            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def _torch(self, path: Path) -> dict[str, np.ndarray]:
        # One .bin shard is held at a time: shards are ~10 GB at most by HF convention.
        if path not in self._torch_cache:
            self._torch_cache.clear()
            self._torch_cache[path] = load_torch_file(path)
        return self._torch_cache[path]

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._where[name]
        if self.format == "safetensors":
            file = self._file(path)
            if name not in file.entries:
                raise CheckpointError(f"index says {name!r} is in {path.name}, but that file lacks it")
            return file.get(name)
        tensors = self._torch(path)
        if name not in tensors:
            raise CheckpointError(f"index says {name!r} is in {path.name}, but that file lacks it")
        return tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if self.format == "safetensors":
            return self._file(self._where[name]).shape(name)
        return tuple(self[name].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes tensors (numpy, bf16 via ml_dtypes) as one safetensors file with format=pt metadata,
    which transformers requires."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        code = _DTYPE_CODES.get(np.dtype(array.dtype))
        if code is None:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {array.dtype} to safetensors")
        size = array.size * array.dtype.itemsize
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
