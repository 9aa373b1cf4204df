"""Sharded, async, atomic training checkpoints on orbax-checkpoint.

One checkpoint per saved step, written by `orbax.checkpoint.CheckpointManager`:

    <directory>/                      # the `directory` given to `Checkpointer` (a run's: RunDir.checkpoints)
      <step>/                         # e.g. 1000/ -- appears only once the save has committed
        _CHECKPOINT_METADATA          # orbax step metadata (time, item handlers)
        state/                        # item "state": the pytree of jax.Arrays (TrainState)
          _METADATA, _sharding, manifest.ocdbt, ocdbt.process_<i>/d/...   # OCDBT + zarr
        extras/metadata               # item "extras": one JSON object
      <step>.orbax-checkpoint-tmp/    # a save in flight (or a crashed one): never restored

What is saved:
  * ``state``: any pytree of jax.Arrays, typically the `TrainState` {step, params, opt_state, rng}.
    Each process writes only its own shards (OCDBT), so saving never gathers to one host, and the
    saved mesh does not constrain the restoring mesh: restore onto any sharding via
    `abstract_state` (a pytree of `jax.ShapeDtypeStruct` carrying `sharding=`).
  * ``extras``: a JSON object for everything that is not an array: the data-iterator state
    (`loader.get_state()`), the config hash, wall-clock, etc. Written through orbax's JSON
    handler, so on multi-host runs only the primary process writes it, as part of the same
    commit as the arrays.

Atomicity: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` once every
process has finished (on GCS: ``commit_success.txt``); only committed steps are ever restored.

Typical loop:

    checkpointer = Checkpointer(RunDir(run).checkpoints, keep=3, save_interval_steps=1000)
    if checkpointer.latest_step() is not None:
        state, extras = checkpointer.restore(abstract_state=abstract_state)
        loader.set_state(extras["data"])
    for step in range(int(state.step), num_steps):
        state, metrics = train_step(state, next(loader))
        checkpointer.save(step + 1, state, {"data": loader.get_state()})
    checkpointer.close()   # waits for the last async save
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llamax.errors import CheckpointError
from llamax.train.checkpoint_tree import (as_abstract, check_compatible, host_abstract,
                                           tree_restore_args)

logger = logging.getLogger(__name__)


class _QuietReadOnlyNote(logging.Filter):
    """Drops orbax's note that a reader's directory is read only: every evaluation, export and
    resume check opens one, and the note reads like a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnlyNote())

PyTree = Any
STATE_ITEM = "state"
EXTRAS_ITEM = "extras"


class Checkpointer:
    """Saves and restores (state pytree, JSON extras) per step under one directory.

    Args:
      directory: the checkpoints directory, usually `RunDir(run).checkpoints`; created if missing.
      keep: how many most-recent checkpoints to keep (orbax ``max_to_keep``); None keeps all.
      save_interval_steps: `save` without ``force`` writes only steps divisible by this.
      async_save: if True, `save` returns once arrays are copied off device and the write
        continues in a background thread; call `wait` (or `close`) before exiting.
      read_only: open an existing directory for restoring only (evaluation, export).
    """

    def __init__(
        self, directory: str | Path, *, keep: int | None = 3, save_interval_steps: int = 1,
        async_save: bool = True, read_only: bool = False,
    ) -> None:
        if (keep is not None and keep < 1) or save_interval_steps < 1:
            raise CheckpointError(
                f"keep={keep} and save_interval_steps={save_interval_steps} must be >= 1 "
                "(keep=None keeps every checkpoint)."
            )
        self._directory = Path(directory).absolute()
        self._read_only = read_only
        if read_only and not self._directory.is_dir():
            raise CheckpointError(
                f"Checkpoint directory {self._directory} does not exist; expected the "
                "`checkpoints` folder of a training run (it holds one sub-directory per step)."
            )
        # A reader keeps every step and saves none (what orbax would otherwise set, with a warning).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else save_interval_steps,
            enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            # Explicit handlers (not just item names) so a fresh manager can read item metadata.
            item_handlers={
                # The PyTree handler (which StandardCheckpointHandler wraps; same on-disk format)
                # because orbax 0.12.8's StandardRestore can neither restore a sub-tree
                # (params only) nor restore to host numpy without a materialized template.
                STATE_ITEM: ocp.PyTreeCheckpointHandler(),
                EXTRAS_ITEM: ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def directory(self) -> Path:
        """The checkpoints directory (holds one sub-directory per committed step)."""
        return self._directory

    def save(self, step: int, state: PyTree, extras: dict | None = None, *, force: bool = False) -> bool:
        """Saves `state` (pytree of jax.Arrays) and `extras` (JSON object) as checkpoint `step`.

        Must be called by every process with the same arguments. Without `force`, the save is
        skipped unless `step` is a multiple of `save_interval_steps`, a JAX preemption sync point
        was reached, or the directory has no checkpoint yet (orbax always writes the first one).
        A step already saved (or in flight) is skipped even with `force`, so a preemption save
        right after a periodic save of the same step is harmless.

        Returns:
          True if a save was started (it may still be running when async; see `wait`).
        """
        extras = {} if extras is None else extras
        if not isinstance(extras, dict):
            raise CheckpointError(
                f"extras must be a JSON object (dict), got {type(extras).__name__}; "
                "wrap it, e.g. extras={'data': loader.get_state()}."
            )
        try:
            json.dumps(extras)
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"extras for step {step} is not JSON-serializable ({error}); convert numpy or "
                "jax scalars with int()/float()/.tolist() before saving."
            ) from error
        if step in self._manager.all_steps():
            logger.info("Checkpoint for step %d already exists or is in flight; not saving again.", step)
            return False
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.PyTreeSave(state), EXTRAS_ITEM: ocp.args.JsonSave(extras)}
        )
        try:
            # orbax first waits for the previous async save, so its failure surfaces here too.
            return bool(self._manager.save(step, args=args, force=force))
        except Exception as error:  # noqa: BLE001 -- orbax/tensorstore raise bare ValueError etc.
            raise self._save_failed(error) from error

    def wait(self) -> None:
        """Blocks until the in-flight async save (if any) has committed.

        Raises:
          CheckpointError: the background write failed (disk full, I/O error); the message names
            the cause. The step was not committed: earlier committed steps are intact.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 -- orbax re-raises the writer thread's error
            raise self._save_failed(error) from error

    def close(self) -> None:
        """Waits for pending saves and releases orbax's background resources (even if the last
        save failed; that failure is then raised as in `wait`)."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def _save_failed(self, error: BaseException) -> CheckpointError:
        """A CheckpointError naming a failed save's cause and what is still safe on disk."""
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        text = text.split(" See full TensorStore details")[0]
        hint = ""
        if "No space left on device" in text or "os_error_code='28'" in text or (
                isinstance(error, OSError) and error.errno == errno.ENOSPC):
            hint = " The disk is full (ENOSPC): free space or point the run at a larger disk, then rerun."
        latest = self.latest_step()
        return CheckpointError(
            f"Saving a checkpoint in {self._directory} failed: {type(error).__name__}: {text[:1500]}."
            f"{hint} The failed step was not committed; the newest committed step is "
            f"{latest if latest is not None else 'none'}, and a rerun resumes from it."
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Committed steps, ascending. Saves still in flight are not included."""
        return sorted(step for step in self._manager.all_steps() if self._is_committed(step))

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _is_committed(self, step: int) -> bool:
        path = self._directory / str(step)
        try:
            return path.is_dir() and bool(ocp.utils.is_checkpoint_finalized(path))
        except Exception:  # noqa: BLE001 -- an unreadable step dir is simply not committed.
            return False

    def restore(self, step: int | None = None, abstract_state: PyTree = None) -> tuple[PyTree, dict]:
        """Restores (state, extras) from `step`, or from the newest readable step if None.

        Args:
          step: the step to restore. If None, tries the latest committed step and, if it cannot
            be read (truncated/deleted files, corrupt metadata), logs a warning and falls back to
            the previous one, and so on.
          abstract_state: pytree of `jax.ShapeDtypeStruct` (or arrays) with the structure, shapes
            and dtypes of the saved state; leaves with a `sharding` are restored as jax.Arrays laid
            out that way (any mesh, not necessarily the saving one), leaves without one as numpy
            arrays. If None, restores the saved structure as host numpy arrays (dict/list nodes).

        Returns:
          (state, extras): state has the structure of `abstract_state`; extras is the saved dict.

        Raises:
          CheckpointError: no committed checkpoint; `abstract_state` does not match the saved
            shapes/dtypes/structure (names the leaf); or no candidate step could be read.
        """
        self.wait()  # never read a step whose save is still in flight

        def restore_one(candidate: int) -> tuple[PyTree, dict]:
            saved = self._saved_metadata(candidate)
            if abstract_state is None:
                target = host_abstract(saved)
            else:
                target = as_abstract(abstract_state)
                check_compatible(saved, target, candidate)
            restored = self._manager.restore(
                candidate,
                args=ocp.args.Composite(
                    **{STATE_ITEM: tree_restore_args(target), EXTRAS_ITEM: ocp.args.JsonRestore()}
                ),
            )
            extras = restored[EXTRAS_ITEM]
            if not isinstance(extras, dict):
                raise ValueError(f"extras is {type(extras).__name__}, expected a JSON object")
            return restored[STATE_ITEM], extras

        return self._with_fallback(step, restore_one)

    def restore_params(
        self, step: int | None = None, abstract_params: PyTree = None, *, params_key: str = "params"
    ) -> PyTree:
        """Restores only the `params_key` subtree of the saved state (fine-tuning, export); the
        optimizer state is never read, so this needs memory for the parameters only.

        Args:
          step: as in `restore` (None: newest readable step, with fallback).
          abstract_params: pytree of `jax.ShapeDtypeStruct` (with `sharding` for jax.Arrays);
            None restores the saved params as host numpy arrays with their saved shapes.
          params_key: the field/key of the saved state holding the parameters.
        """
        self.wait()

        def restore_one(candidate: int) -> PyTree:
            saved = self._saved_metadata(candidate)
            if not isinstance(saved, dict) or params_key not in saved:
                keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
                raise CheckpointError(
                    f"Checkpoint step {candidate} in {self._directory} has no '{params_key}' "
                    f"subtree (top-level keys: {keys}); pass params_key= naming the params field."
                )
            if abstract_params is None:
                target = host_abstract(saved[params_key])
            else:
                target = as_abstract(abstract_params)
                check_compatible(saved[params_key], target, candidate, prefix=params_key)
            restored = self._manager.restore(
                candidate,
                args=ocp.args.Composite(
                    **{STATE_ITEM: tree_restore_args({params_key: target}, partial=True)}
                ),
            )
            return restored[STATE_ITEM][params_key]

        return self._with_fallback(step, restore_one)

    def _saved_metadata(self, step: int) -> PyTree:
        """The saved state's tree of orbax ArrayMetadata (nested dicts/lists, like the state)."""
        metadata = self._manager.item_metadata(step)[STATE_ITEM]
        if metadata is None:
            # Shapes cannot be checked without it; treat the step as damaged (caller falls back).
            raise ValueError("the state metadata (state/_METADATA) is missing or unreadable")
        return metadata.tree

    def _with_fallback(self, step: int | None, restore_one: Any) -> Any:
        """Runs `restore_one(step)`; with step=None walks committed steps newest-first."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"No committed checkpoint for step {step} in {self._directory}; "
                    f"available steps: {steps or 'none'}. Pass step=None for the latest."
                )
            candidates = [step]
        elif not steps:
            raise CheckpointError(
                f"No committed checkpoint in {self._directory} (expected sub-directories named by "
                "step, e.g. 1000/). Check the path, or start training from scratch."
            )
        else:
            candidates = steps[::-1]
        failures: list[str] = []
        for candidate in candidates:
            try:
                result = restore_one(candidate)
                error = None
            except CheckpointError:
                raise  # the caller's abstract tree is wrong; an older step will not fix that
            except Exception as caught:  # noqa: BLE001 -- orbax/tensorstore raise bare Exception
                result, error = None, caught
            # All processes must agree: if any host failed to read its shards, all fall back.
            if _all_processes_ok(error is None):
                if failures:
                    logger.warning("Restored step %d after skipping unreadable steps.", candidate)
                    self._quarantine([s for s in candidates if s > candidate])
                return result
            cause = _short(error) if error is not None else "another process failed to read it"
            failures.append(f"step {candidate}: {cause}")
            if step is None and candidate != candidates[-1]:
                logger.warning(
                    "Checkpoint step %d in %s could not be read (%s); falling back to the previous "
                    "checkpoint.", candidate, self._directory, cause,
                )
        raise CheckpointError(
            f"Could not restore any checkpoint from {self._directory}. Tried:\n  "
            + "\n  ".join(failures)
            + "\nThe files are corrupt or truncated; restore from a backup or delete the bad step dirs."
        )


    def _quarantine(self, bad_steps: list[int]) -> None:
        """Renames unreadable steps to `<step>.corrupt`: kept for inspection, but no longer a
        step to orbax, which would otherwise refuse to save that step number again after resume
        and count it towards keep-N."""
        if self._read_only or not bad_steps:
            return
        if jax.process_index() == 0:
            for bad in bad_steps:
                path = self._directory / str(bad)
                target = self._directory / f"{bad}.corrupt"
                if target.exists():
                    shutil.rmtree(target)
                path.rename(target)
                logger.warning("Moved unreadable checkpoint %s to %s.", path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("llamax_checkpoint_quarantine")
        self._manager.reload()


def restore_params(
    directory: str | Path, step: int | None = None, abstract_params: PyTree = None,
    *, params_key: str = "params",
) -> PyTree:
    """Reads only the params of a saved TrainState-like pytree; see `Checkpointer.restore_params`.

    Args:
      directory: the checkpoints directory (`RunDir(run).checkpoints`).
      step: step to read; None reads the newest readable one (falling back past corrupt ones).
      abstract_params: pytree of `jax.ShapeDtypeStruct` with shardings, or None for numpy arrays.
      params_key: the field/key of the saved state holding the parameters.
    """
    with Checkpointer(directory, read_only=True) as checkpointer:
        return checkpointer.restore_params(step, abstract_params, params_key=params_key)


def _all_processes_ok(ok: bool) -> bool:
    """True iff `ok` on every process (a host allgather; free on a single process)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _short(error: BaseException) -> str:
    """First line of an error, trimmed: tensorstore messages embed multi-kilobyte JSON specs."""
    text = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {text[:300]}"
