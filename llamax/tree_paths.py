"""Nested-dict pytrees addressed by key paths: ('layers', 'self_attn', 'q_proj', 'kernel')."""
from __future__ import annotations

from typing import Any, Mapping

KeyPath = tuple[str, ...]


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
