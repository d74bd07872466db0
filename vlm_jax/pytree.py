"""Naming the leaves of parameter trees by '/'-joined paths."""

from __future__ import annotations

from typing import Any, Callable

import jax


def key_to_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: tuple) -> str:
    """('image_encoder', 'posemb') key path -> 'image_encoder/posemb'."""
    return "/".join(key_to_str(k) for k in path)


def map_with_path_str(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """tree_map where `fn` receives the leaf's '/'-joined path and the leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_to_str(p), x), tree)


def leaves_with_path_str(tree: Any) -> list[tuple[str, Any]]:
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
