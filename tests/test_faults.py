"""Faults injected while a checkpoint is being written: a full disk and a write cut off mid-file.

What must hold after each fault: the error names the cause (ENOSPC / "No space left on device")
as a CheckpointError, the step that failed is never listed or restored, the previous committed
checkpoint is restored bit for bit by a fresh process-like `Checkpointer`, and once the fault is
gone the same step can be saved again.

Disk full is real where the sandbox lets us mount a small tmpfs (root); elsewhere orbax's extras
writer is patched to write half a file and then fail with ENOSPC, as `write(2)` does on a full disk.
Kills during a save (SIGKILL of a training process mid-write) are in tests/test_chaos.py.
NaN/inf batches and params are covered at the train-step level by tests/test_train.py
(`test_non_finite_step_leaves_state_unchanged`) and in `fit` by tests/test_fit.py.
"""
import contextlib
import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llamax.train.checkpoint import Checkpointer
from llamax.errors import CheckpointError

# tensorstore abandons coroutines on a failed write, which orbax's loop later reports as
# "Exception ignored ... Event loop is closed"; the failure itself is handled and asserted.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LEAF_SIZE = 50_000  # 200 KB of float32: bigger than the space left on the "full" disk


def make_state(step: int) -> dict:
    return {"step": jnp.asarray(step, jnp.int32),
            "params": {"w": jnp.arange(LEAF_SIZE, dtype=jnp.float32) * step,
                       "b": jnp.full((7,), step, jnp.bfloat16)}}


def assert_is_state(restored: dict, step: int) -> None:
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(make_state(step))):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m"):
    """A real size-limited filesystem, or None where mounting is not permitted (non-root CI)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(root: Path, leave_bytes: int) -> Path:
    """Fills the filesystem of `root` until `leave_bytes` are free; returns the filler file."""
    stats = os.statvfs(root)
    filler = root / f"filler-{uuid.uuid4().hex}"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave_bytes))
    return filler


@contextlib.contextmanager
def extras_writer_hits_enospc():
    """Patches orbax's JSON item writer: half the file lands on disk, then ENOSPC, like write(2)
    on a full disk. The array writer (tensorstore, C++) cannot be patched from Python."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def half_then_enospc(self, item, directory):
        text = __import__("json").dumps(item)
        (directory / self._filename).write_text(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / self._filename))

    ocp.JsonCheckpointHandler._save_fn = half_then_enospc
    try:
        yield
    finally:
        ocp.JsonCheckpointHandler._save_fn = original


def check_disk_full_recovery(directory: Path, fail_save, make_room) -> None:
    """Saves step 1, makes step 2's save fail via `fail_save()`, then checks the guarantees."""
    with Checkpointer(directory, keep=3) as checkpointer:
        checkpointer.save(1, make_state(1), {"step": 1}, force=True)
        checkpointer.wait()
        with fail_save():
            checkpointer.save(2, make_state(2), {"step": 2}, force=True)
            with pytest.raises(CheckpointError) as caught:
                checkpointer.wait()
        message = str(caught.value)
        assert "No space left on device" in message and "ENOSPC" in message, message
        assert "newest committed step is 1" in message, message
        assert checkpointer.all_steps() == [1]  # the failed step is never reported as saved
    # A restarted run (fresh Checkpointer) sees and restores step 1 exactly.
    reopened = Checkpointer(directory)
    assert reopened.all_steps() == [1]
    state, extras = reopened.restore()
    assert extras == {"step": 1}
    assert_is_state(state, 1)
    # Once there is room again, step 2 saves and restores normally.
    make_room()
    reopened.save(2, make_state(2), {"step": 2}, force=True)
    reopened.close()
    state, extras = Checkpointer(directory, read_only=True).restore()
    assert extras == {"step": 2} and Checkpointer(directory, read_only=True).all_steps() == [1, 2]
    assert_is_state(state, 2)


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    with small_tmpfs(tmp_path / "fs") as root:
        if root is None:
            pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer test covers it")
        filler = []

        @contextlib.contextmanager
        def full_disk():
            filler.append(fill_disk(root, leave_bytes=LEAF_SIZE))  # < one 200 KB array
            yield

        check_disk_full_recovery(root / "checkpoints", full_disk, lambda: filler[0].unlink())


def test_disk_full_in_a_patched_writer_half_writes_then_fails(tmp_path):
    check_disk_full_recovery(tmp_path / "checkpoints", extras_writer_hits_enospc, lambda: None)


def test_disk_full_save_failure_surfaces_on_the_next_save_too(tmp_path):
    """A training loop that never calls wait() learns of the failure at its next save."""
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(1, make_state(1), {"step": 1}, force=True)
    with extras_writer_hits_enospc():
        checkpointer.save(2, make_state(2), {"step": 2}, force=True)
        with pytest.raises(CheckpointError, match="No space left on device"):
            checkpointer.save(3, make_state(3), {"step": 3}, force=True)
    assert checkpointer.all_steps() == [1]
    checkpointer.close()


@pytest.mark.parametrize("damage", ["truncate_array_file", "truncate_metadata", "empty_tmp_dir"])
def test_write_cut_off_mid_file_is_never_restored(tmp_path, damage):
    """What a crash mid-save leaves behind: `<step>.orbax-checkpoint-tmp` holding truncated files.
    It is not a step; the previous one is restored, and the step can be saved again."""
    directory = tmp_path / "checkpoints"
    with Checkpointer(directory) as checkpointer:
        checkpointer.save(1, make_state(1), {"step": 1}, force=True)
        checkpointer.save(2, make_state(2), {"step": 2}, force=True)
    in_flight = directory / "3.orbax-checkpoint-tmp-1234"
    if damage == "empty_tmp_dir":
        in_flight.mkdir()
    else:
        shutil.copytree(directory / "2", in_flight)
        pattern = "state/**/d/*" if damage == "truncate_array_file" else "state/_METADATA"
        victims = sorted(p for p in in_flight.glob(pattern) if p.is_file())
        assert victims, pattern
        for victim in victims:
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
    restarted = Checkpointer(directory)
    assert restarted.all_steps() == [1, 2] and restarted.latest_step() == 2
    state, extras = restarted.restore()
    assert extras == {"step": 2}
    assert_is_state(state, 2)
    restarted.save(3, make_state(3), {"step": 3}, force=True)
    restarted.close()
    state, _ = Checkpointer(directory, read_only=True).restore(3)
    assert_is_state(state, 3)
