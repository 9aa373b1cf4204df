"""Small pieces every converter shares: all-or-nothing output folders and dtype names."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from llamax.errors import CheckpointError, ConfigError

DTYPE_NAMES = {
    "bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16,
    "fp32": np.float32, "float32": np.float32, "f32": np.float32,
    "fp16": np.float16, "float16": np.float16, "f16": np.float16,
}


def parse_dtype(dtype: str | np.dtype | type | None) -> np.dtype | None:
    """'bf16' / 'bfloat16' / 'fp32' / np.float32 ... -> numpy dtype; None stays None (keep as is)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_NAMES)}")
        return np.dtype(DTYPE_NAMES[dtype.lower()])
    return np.dtype(dtype)


def dtype_name(dtype: np.dtype) -> str:
    """The canonical name of a weight dtype ('bfloat16', 'float32', 'float16')."""
    return "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """Raises CheckpointError if `path` exists (and is not an empty folder) unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} already exists; choose another destination or pass "
                              "overwrite=True (--overwrite) to replace it")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder of `path`; on success it replaces `path`, on any error
    it is deleted, so a failed conversion never leaves partial output behind."""
    path = check_destination(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def contiguous_bytes(array: np.ndarray) -> memoryview:
    """The bytes of `array` in C order. Transposed views (every HF <-> llamax matrix) are copied
    with torch when available: its copy kernel is ~5x faster than numpy's strided copy."""
    array = np.asarray(array)
    if not array.flags.c_contiguous and array.ndim and all(s > 0 for s in array.strides):
        try:
            import torch
        except ImportError:
            torch = None
        ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}.get(array.dtype.itemsize)
        if torch is not None and ints is not None:
            with warnings.catch_warnings():  # read-only memory maps: torch only reads them here
                warnings.simplefilter("ignore", UserWarning)
                array = torch.from_numpy(array.view(ints)).contiguous().numpy()
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
