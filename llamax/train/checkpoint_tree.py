"""The trees of a checkpoint: what was saved vs what a restore asks for.

A restore target is a pytree of `jax.ShapeDtypeStruct`s: leaves carrying a `sharding` are restored
as jax.Arrays laid out that way (any mesh), leaves without one as host numpy arrays. Leaves are
matched by their path as plain strings (`llamax.tree_paths.path_names`), as orbax stores them.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from llamax.errors import CheckpointError
from llamax.tree_paths import path_names

PyTree = Any


def check_compatible(saved: PyTree, abstract: PyTree, step: int, prefix: str = "") -> None:
    """Raises CheckpointError unless `abstract` has the leaves, shapes and dtypes of `saved`
    (an orbax metadata tree). `step` and `prefix` (the trees' path in the state) are for messages."""
    saved_leaves = _leaves_by_path(saved, prefix)
    wanted_leaves = _leaves_by_path(abstract, prefix)
    missing = sorted(set(wanted_leaves) - set(saved_leaves))
    unexpected = sorted(set(saved_leaves) - set(wanted_leaves))
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint step {step} does not match the requested state tree: leaves requested but "
            f"not saved: {missing[:10]}; saved but not requested: {unexpected[:10]}. Did the model "
            "or optimizer config change? Build abstract_state from the config the run was saved with."
        )
    for path, wanted in wanted_leaves.items():
        found = saved_leaves[path]
        if tuple(found.shape) != tuple(wanted.shape) or np.dtype(found.dtype) != np.dtype(wanted.dtype):
            raise CheckpointError(
                f"Checkpoint step {step} leaf '{path}': expected shape {tuple(wanted.shape)} dtype "
                f"{np.dtype(wanted.dtype)} (from abstract_state) but the checkpoint has shape "
                f"{tuple(found.shape)} dtype {np.dtype(found.dtype)}. The model config likely "
                "differs from the one the checkpoint was saved with; use the same config."
            )


def _leaves_by_path(tree: PyTree, prefix: str) -> dict[str, Any]:
    """Flattens `tree` to {'a/b/0': leaf}. Dataclass fields, dict keys, namedtuple fields and
    sequence indices all become plain strings, matching how orbax stores them (as nested dicts)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    head = [prefix] if prefix else []
    return {"/".join(head + list(path_names(path))): leaf for path, leaf in flat}


def as_abstract(tree: PyTree) -> PyTree:
    """Arrays or ShapeDtypeStructs → ShapeDtypeStructs, keeping any `sharding` they carry."""

    def to_struct(leaf: Any) -> jax.ShapeDtypeStruct:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise CheckpointError(
                f"abstract_state leaf {leaf!r} ({type(leaf).__name__}) is not an array or "
                "jax.ShapeDtypeStruct; build it with jax.eval_shape(...) plus shardings."
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))

    return jax.tree.map(to_struct, tree)


def host_abstract(saved: PyTree) -> PyTree:
    """Saved metadata → ShapeDtypeStructs without sharding, which orbax restores as numpy."""
    return jax.tree.map(lambda meta: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype), saved)


def tree_restore_args(target: PyTree, partial: bool = False) -> ocp.args.PyTreeRestore:
    """orbax args restoring `target`'s leaves: onto their sharding, or as numpy if they have none."""

    def leaf_args(leaf: jax.ShapeDtypeStruct) -> ocp.RestoreArgs:
        if leaf.sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
        return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)

    return ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(leaf_args, target), partial_restore=partial
    )
