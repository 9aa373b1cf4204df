"""Writing files so that a crash or a bad input never leaves a half-written result.

  cache_dir           the user's cache folder for things built once (never the working directory)
  atomic_write_text   a small file (JSON, config) written to a sibling and renamed into place
  atomic_output_dir   a whole output folder staged beside its destination, renamed at the end
  atomic_output_file  the same for a one-file output (a .gguf)
  contiguous_bytes    the C-order bytes of an array (fast for transposed views)
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from llamax.errors import CheckpointError

logger = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """A folder in the user's cache for things llamax builds once and reuses (tokenizers trained
    on the bundled corpus, compiled programs): `$LLAMAX_CACHE_DIR`, else `$XDG_CACHE_HOME/llamax`,
    else `~/.cache/llamax`; never relative to the working directory."""
    root = os.environ.get("LLAMAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llamax")
    folder = Path(root, *parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _staging_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _remove_stale_staging(path: Path) -> None:
    """Deletes staging folders of `path` left by writers that died (kill -9, OOM): they are named
    `.<name>.tmp-<host>-<pid>-*`; one of this host whose process is gone is removed. Staging of
    another host (a shared filesystem) or of a live process is left alone and reported."""
    host = socket.gethostname()
    for candidate in path.parent.glob(_staging_prefix(path) + "*"):
        owner = candidate.name[len(_staging_prefix(path)):].rsplit("-", 2)
        if len(owner) != 3 or not owner[1].isdigit():
            continue
        owner_host, pid = owner[0], int(owner[1])
        if owner_host == host and not _process_alive(pid):
            logger.warning("removing %s, the staging folder of a writer (pid %d) that died", candidate, pid)
            shutil.rmtree(candidate, ignore_errors=True) if candidate.is_dir() else candidate.unlink(missing_ok=True)
        else:
            logger.warning("%s is the staging folder of another writer (%s, pid %d) still at work or on "
                           "another host; remove it by hand if that writer is gone", candidate, owner_host, pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder of `path`; on success it replaces `path`, on any error
    it is deleted, so a failed conversion never leaves partial output behind. A writer killed
    outright (kill -9) cannot delete its staging folder: the next writer of the same `path`
    does. The output gets the permissions of any folder the user makes (their umask)."""
    path = check_destination(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(path)}{socket.gethostname()}-{os.getpid()}-",
                                    dir=path.parent))
    # mkdtemp makes 0700 folders: colleagues on a shared cluster could not read the checkpoint.
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_output_dir` for a one-file output (a .gguf): yields a temporary sibling file that
    replaces `path` on success and is deleted on any error (or by the next writer, if killed)."""
    path = check_destination(path, overwrite).absolute()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a file name for the output (e.g. model.gguf)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    handle, name = tempfile.mkstemp(prefix=f"{_staging_prefix(path)}{socket.gethostname()}-{os.getpid()}-",
                                    dir=path.parent)
    os.close(handle)
    staging = Path(name)
    staging.chmod(0o666 & ~_umask())  # mkstemp makes 0600 files; the output follows the umask
    try:
        yield staging
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
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
