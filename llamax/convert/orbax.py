"""Params-only orbax checkpoints: what a fine-tuning run starts from, and what export reads.

A params checkpoint folder (layout: `llamax.run_dir`; written all-or-nothing) holds the
ModelConfig and an orbax PyTree checkpoint of {'params': <llamax params>} (OCDBT).

`load_params` also reads a training run, taking the params of one step's checkpoint written by
`llamax.train.checkpoint.Checkpointer` (from its `state` item; the optimizer state is never
read). It accepts the run folder, its checkpoints folder or one step folder.

Streaming (used by the converters, bounded memory):
  * `LeafReader` restores one params leaf at a time (orbax partial restore), so reading a
    checkpoint needs memory for the largest leaf (a scanned stack of one projection), not the model.
  * `LeafWriter` assembles leaves in memory-mapped scratch files, one layer slice at a time, then
    hands orbax the memory maps with host-array deep copies and compression disabled, so
    orbax streams them to disk without buffering them.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import type_handlers

from llamax.config import ModelConfig
from llamax.dtypes import dtype_name
from llamax.files import atomic_output_dir, contiguous_bytes
from llamax import run_dir
from llamax.errors import CheckpointError
from llamax.tree_paths import flatten, nest

PARAMS_ITEM = "params"  # the key of the params in a params checkpoint's tree
PyTree = Any
LeafPath = tuple[str, ...]


# ---- locating params in a folder ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamsLocation:
    """Where a folder keeps its params: an orbax PyTree directory and the key of the params in it."""

    config_folder: Path  # holds the ModelConfig (`llamax.run_dir.read_model_config`)
    tree_dir: Path  # an orbax PyTree checkpoint directory
    params_key: str  # top-level key of the params in that tree
    step: int | None  # training step, for run checkpoints


def locate_params(path: str | os.PathLike, step: int | None = None) -> ParamsLocation:
    """Finds the params in a params checkpoint, a run folder, its `checkpoints/`, or a step folder."""
    from llamax.train.checkpoint import STATE_ITEM, Checkpointer  # the training checkpoint format

    path = Path(path).absolute()
    if run_dir.is_params_checkpoint(path):
        return ParamsLocation(path, path / run_dir.PARAMS_DIR, PARAMS_ITEM, None)
    if (path / STATE_ITEM).is_dir() and run_dir.is_run_dir(path.parent.parent):  # one step folder
        if step is not None and str(step) != path.name:
            raise CheckpointError(f"{path} is step {path.name}, but step={step} was asked for")
        return ParamsLocation(path.parent.parent, path / STATE_ITEM, "params", int(path.name))
    run = run_dir.RunDir(path if run_dir.is_run_dir(path) else path.parent)
    checkpoints = run.checkpoints
    if not run.exists() or not (path == run.path or path == checkpoints):
        hint = ""
        if (path / "config.json").exists():
            hint = " (it looks like an HF checkpoint: use --src_format hf)"
        elif (path / "params.json").exists():
            hint = " (it looks like a Meta checkpoint: use --src_format meta)"
        raise CheckpointError(f"{path} is neither a llamax params checkpoint (a model config + params) "
                              f"nor a training run (a model config + checkpoints/<step>/){hint}")
    with Checkpointer(checkpoints, read_only=True) as checkpointer:
        steps = checkpointer.all_steps()
    if not steps or (step is not None and step not in steps):
        raise CheckpointError(f"no committed checkpoint {'for step ' + str(step) if step is not None else ''} "
                              f"in {checkpoints}; available steps: {steps or 'none'}")
    chosen = steps[-1] if step is None else step
    return ParamsLocation(checkpoints.parent, checkpoints / str(chosen) / STATE_ITEM, "params", chosen)


def _saved_tree(tree_dir: Path) -> PyTree:
    metadata = ocp.PyTreeCheckpointHandler().metadata(tree_dir)
    return getattr(metadata, "tree", metadata)


def _restore(tree_dir: Path, target: PyTree) -> PyTree:
    """orbax partial restore of `target` (ShapeDtypeStructs; with sharding -> jax.Array)."""
    from llamax.train.checkpoint_tree import tree_restore_args  # the one builder of restore args

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(tree_dir, args=tree_restore_args(target, partial=True))


# ---- whole-tree save / load ---------------------------------------------------------------

def _numpy_registry():
    # Deep copies of host arrays guard against concurrent mutation; ours are not mutated, and a
    # copy of every leaf would double peak memory (or turn memory maps into resident copies).
    return ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))


def _save_tree(tree_dir: Path, params: PyTree) -> None:
    # Uncompressed: zstd buffers every chunk of every leaf in flight (measured: ~0.9x the model in
    # extra memory for a 1B model) and triples the save time; bf16 weights shrink only ~10% anyway.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_numpy_registry(), save_concurrent_gb=1,
                                          use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(tree_dir, args=ocp.args.PyTreeSave({PARAMS_ITEM: params}))


def save_params(path: str | os.PathLike, config: ModelConfig, params: PyTree, *,
                overwrite: bool = False) -> Path:
    """Writes a params checkpoint folder (a ModelConfig + orbax params) all-or-nothing.

    `params` may hold numpy or jax arrays (sharded jax.Arrays are written shard by shard).
    """
    with atomic_output_dir(path, overwrite=overwrite) as staging:
        run_dir.write_model_config(staging, config)
        _save_tree(staging / run_dir.PARAMS_DIR, params)
    return Path(path)


def load_params(path: str | os.PathLike, abstract_params: PyTree = None, *,
                step: int | None = None) -> tuple[ModelConfig, PyTree]:
    """(ModelConfig, params) from a params checkpoint or a training run (see module docstring).

    Args:
      path: params checkpoint folder, run folder, `<run>/checkpoints`, or one step folder.
      abstract_params: pytree of `jax.ShapeDtypeStruct`; leaves with a `sharding` are restored as
        jax.Arrays laid out that way (directly sharded), others as numpy. Dtypes may differ from the
        saved ones (orbax casts: bf16 weights into fp32 master params). None: numpy, as saved.
      step: for training runs, the step to read (None: the newest committed one).
    """
    location = locate_params(path, step)
    config = run_dir.read_model_config(location.config_folder)
    if location.params_key == PARAMS_ITEM and location.step is None:
        saved = flatten(_saved_tree(location.tree_dir).get(PARAMS_ITEM, {}))
        if abstract_params is None:
            wanted = {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for p, m in saved.items()}
        else:
            wanted = flatten(abstract_params)
            if set(wanted) != set(saved):
                raise CheckpointError(
                    f"abstract_params do not match the checkpoint in {path}: requested but not saved "
                    f"{sorted('/'.join(p) for p in set(wanted) - set(saved))[:5]}, saved but not requested "
                    f"{sorted('/'.join(p) for p in set(saved) - set(wanted))[:5]}; was scan_layers changed?")
            for leaf, struct in wanted.items():
                if tuple(struct.shape) != tuple(saved[leaf].shape):
                    raise CheckpointError(f"params leaf {'/'.join(leaf)}: checkpoint shape {tuple(saved[leaf].shape)}"
                                          f", requested {tuple(struct.shape)}; the model config differs")
        return config, _restore(location.tree_dir, {PARAMS_ITEM: nest(wanted)})[PARAMS_ITEM]
    from llamax.train.checkpoint import restore_params

    return config, restore_params(location.tree_dir.parent.parent, location.step, abstract_params)


# ---- streaming, one leaf (reading) or one layer slice (writing) at a time ----------------

class LeafReader:
    """Reads a params checkpoint or training run one params leaf at a time.

    `leaves` maps each leaf path (e.g. ('layers', 'mlp', 'up_proj', 'kernel')) to its saved
    (shape, dtype); `read(leaf)` restores just that leaf as a numpy array.
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None):
        self.location = locate_params(path, step)
        self.config = run_dir.read_model_config(self.location.config_folder)
        saved = _saved_tree(self.location.tree_dir)
        if not isinstance(saved, Mapping) or self.location.params_key not in saved:
            raise CheckpointError(f"{self.location.tree_dir} holds no '{self.location.params_key}' subtree")
        self.leaves = {leaf: (tuple(meta.shape), np.dtype(meta.dtype))
                       for leaf, meta in flatten(saved[self.location.params_key]).items()}
        self.config = self.config.replace(scan_layers=any(leaf[0] == "layers" for leaf in self.leaves))

    def read(self, leaf: LeafPath) -> np.ndarray:
        shape, dtype = self.leaves[leaf]
        key = self.location.params_key
        restored = _restore(self.location.tree_dir, {key: nest({leaf: jax.ShapeDtypeStruct(shape, dtype)})})
        for name in (key, *leaf):
            restored = restored[name]
        return np.asarray(restored)


class LeafWriter:
    """Builds a scanned params checkpoint in `folder` from per-layer tensors arriving in any order.

    Each leaf lives in a scratch file (sparse until written) that receives one layer slice per
    `write`; `close` saves the memory-mapped leaves with orbax and deletes the scratch files.
    `leaf_shapes` maps leaf path -> full (stacked) shape; `layered` leaves take a layer index.
    """

    def __init__(self, folder: str | os.PathLike, config: ModelConfig, leaf_shapes: Mapping[LeafPath, tuple],
                 dtype: np.dtype):
        self.folder, self.dtype = Path(folder), np.dtype(dtype)
        self.config = config.replace(scan_layers=True, param_dtype=dtype_name(self.dtype))
        self.scratch = self.folder / ".leaves"
        self.scratch.mkdir(parents=True)
        self.shapes = {leaf: tuple(shape) for leaf, shape in leaf_shapes.items()}
        self._files = {leaf: self.scratch / "_".join(leaf) for leaf in self.shapes}
        self._pending: dict[LeafPath, set[int | None]] = {}
        for leaf, shape in self.shapes.items():
            with open(self._files[leaf], "wb") as f:
                f.truncate(int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize)
            layered = leaf[0] == "layers"
            self._pending[leaf] = set(range(shape[0])) if layered else {None}

    def write(self, leaf: LeafPath, layer: int | None, array: np.ndarray) -> None:
        """Writes `array` as the whole leaf (layer None) or as slice `layer` of a stacked leaf."""
        shape = self.shapes[leaf]
        want = shape if layer is None else shape[1:]
        if tuple(array.shape) != want:
            raise CheckpointError(f"leaf {'/'.join(leaf)} layer {layer}: got shape {tuple(array.shape)}, "
                                  f"expected {want}")
        data = contiguous_bytes(np.asarray(array).astype(self.dtype, copy=False))
        offset = 0 if layer is None else layer * len(data)
        with open(self._files[leaf], "r+b") as f:
            f.seek(offset)
            f.write(data)
        self._pending[leaf].discard(layer)

    def close(self) -> None:
        """Saves the orbax checkpoint and the ModelConfig; CheckpointError if a slice is missing."""
        missing = [f"{'/'.join(leaf)}[{sorted(layers, key=str)[:3]}]" for leaf, layers in self._pending.items() if layers]
        if missing:
            raise CheckpointError(f"params leaves never written: {missing[:5]}")
        leaves = {leaf: np.memmap(self._files[leaf], self.dtype, "r", shape=shape)
                  for leaf, shape in self.shapes.items()}
        _save_tree(self.folder / run_dir.PARAMS_DIR, nest(leaves))
        del leaves
        run_dir.write_model_config(self.folder, self.config)
        shutil.rmtree(self.scratch)
