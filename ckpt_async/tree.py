"""Tree helpers (Orbax's ``ocp.tree``)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def to_shape_dtype_struct(x: Any, dtype: Any = None, scalar_dtype: Any = None) -> Any:
    """The abstract version of a leaf: ``jax.ShapeDtypeStruct`` with its sharding, if any."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x if dtype is None else x.update(dtype=dtype)
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if scalar_dtype is not None:
            return jax.ShapeDtypeStruct((), scalar_dtype)
        return x
    return x


def serialize_tree(tree: Any, keep_empty_nodes: bool = False) -> Any:
    """A nested dict/list version of ``tree`` (Orbax's name)."""
    return jax.tree_util.tree_map(lambda v: v, tree)
