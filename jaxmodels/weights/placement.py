"""Writing imported checkpoint arrays into `Decoder` parameter trees (shared by every importer).

An importer turns a checkpoint's tensors into our parameter names (nested dicts of numpy
arrays); these helpers put them in place: at a layer's module path, at the layer's index of a
scanned stack (leading `[L]` axis), in the dtype and, for `jax.Array`s, the sharding of the
leaf they replace, with a clear error for a missing leaf or a shape mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.config import ModelConfig


def copy_dicts(tree: Any) -> Any:
    """A copy of the nested dicts of `tree` (leaves shared), so writes leave the input intact."""
    if isinstance(tree, Mapping):
        return {k: copy_dicts(v) for k, v in tree.items()}
    return tree


def layer_path(config: ModelConfig, layer: int) -> tuple[tuple[str, ...], int | None]:
    """(path of decoder layer `layer` under "params", its scan index or None)."""
    from jaxmodels.model import group_sizes

    pattern = len(config.layer_pattern)
    num_groups, _ = group_sizes(config)
    group, position = divmod(layer, pattern)
    if group >= num_groups:
        return ("tail", f"layer_{position}"), None
    if config.scan_layers:
        return ("layers", f"layer_{position}"), group
    return (f"group_{group}", f"layer_{position}"), None


def set_leaf(root: dict, path: tuple[str, ...], index: int | None, value: np.ndarray) -> None:
    """Replaces the leaf at `path` of `root` (in place) by `value`, or its slice `[index]` for a
    scanned stack, keeping the leaf's dtype and sharding.

    Raises:
      KeyError: `path` is not in `root` ("parameters have no a/b/c").
      ValueError: shapes differ ("a/b/c: checkpoint shape (..) != parameter shape (..)").
    """
    where = "/".join(path)
    node = root
    for key in path[:-1]:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"parameters have no {where}")
        node = node[key]
    if not isinstance(node, Mapping) or path[-1] not in node:
        raise KeyError(f"parameters have no {where}")
    old = node[path[-1]]
    target_shape = tuple(old.shape) if index is None else tuple(old.shape[1:])
    value = np.asarray(value)
    if target_shape != value.shape:
        raise ValueError(
            f"{where}: checkpoint shape {value.shape} != parameter shape {target_shape}"
        )
    new = jnp.asarray(value, old.dtype)
    if index is not None:
        new = jnp.asarray(old).at[index].set(new)
    if isinstance(old, jax.Array):
        new = jax.device_put(new, old.sharding)
    node[path[-1]] = new


def place_tree(
    root: dict, path: tuple[str, ...], index: int | None, imported: Mapping[str, Any]
) -> None:
    """`set_leaf` for every leaf of the nested dict `imported`, under `path` of `root`."""
    for key, value in imported.items():
        if isinstance(value, Mapping):
            place_tree(root, path + (key,), index, value)
        else:
            set_leaf(root, path + (key,), index, value)
