"""Pytrees addressed by key paths of plain strings: ('layers', 'self_attn', 'q_proj', 'kernel').

jax names a leaf's path with key objects (DictKey, GetAttrKey for dataclass fields, SequenceKey,
...); `path_names` turns one into the strings used everywhere else (checkpoint leaf names, the
weight-decay mask, LoRA targets), the same strings orbax stores.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

KeyPath = tuple[str, ...]


def key_name(entry: Any) -> str:
    """The plain name of one jax key-path entry: a dict key, field name or sequence index."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def path_names(path: Sequence[Any]) -> KeyPath:
    """A jax key path (from `jax.tree_util.tree_flatten_with_path`) as plain strings."""
    return tuple(key_name(entry) for entry in path)


def set_path(tree: dict, path: KeyPath, value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: KeyPath) -> Any:
    """tree[path[0]][path[1]]...; KeyError/TypeError if the path is absent."""
    for key in path:
        tree = tree[key]
    return tree


def flatten(tree: Mapping, prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    """{key path: leaf} of a nested dict (keys as strings)."""
    flat: dict[KeyPath, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


def nest(flat: Mapping[KeyPath, Any]) -> dict:
    """Inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        set_path(tree, path, value)
    return tree
