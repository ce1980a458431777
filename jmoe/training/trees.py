"""Pytrees as flat ``{"key/path": leaf}`` dicts (the form checkpoints hold, and how optimizer-state leaves are
matched to their parameters), and abstract (shape, dtype, sharding) copies of trees."""

from __future__ import annotations

from typing import Any

import jax


def flatten(tree) -> dict[str, Any]:
    """A pytree -> ``{"key/path": leaf}`` (the form checkpoints hold)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): x for path, x in flat}


def unflatten_like(tree, flat: dict[str, Any]):
    """Inverse of :func:`flatten` given a tree of the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [flat[jax.tree_util.keystr(p, simple=True, separator="/")] for p, _ in paths]
    )


def abstract(tree, shardings=None):
    """ShapeDtypeStructs carrying the target shardings (from ``shardings`` or the arrays' own)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
