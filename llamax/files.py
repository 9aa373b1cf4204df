"""Writing files so that a crash or a bad input never leaves a half-written result.

  atomic_write_text   a small file (JSON, config) written to a sibling and renamed into place
  atomic_output_dir   a whole output folder staged beside its destination, renamed at the end
  contiguous_bytes    the C-order bytes of an array (fast for transposed views)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from llamax.errors import CheckpointError


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a sibling temp file and a rename: readers (other processes
    of a multi-host run, a resumed run) see the old content or the new, never a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
