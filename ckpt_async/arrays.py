"""Orbax's ``ocp.arrays``: array helpers (the abstract array of a leaf, shape and index
aliases, and a sharding that splits each array over as many devices as its shape allows)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .tree import to_shape_dtype_struct

__all__ = ["Index", "Shape", "construct_maximal_shardings", "to_shape_dtype_struct"]

log = logging.getLogger("ckpt_async")

#: An array's shape, and an index into it (a slice per dimension), as Orbax types them.
Shape = tuple[int, ...]
Index = tuple[slice, ...]


def _maximal_sharding(abstract: Any, devices: Sequence[jax.Device]) -> jax.sharding.Sharding:
    """A sharding of ``abstract`` over ``devices``: its dimensions, largest first, each split
    over the largest factor of the devices left that divides it; the devices left over
    hold copies (an axis of the mesh no dimension is split over)."""
    shape = tuple(abstract.shape)
    if not shape or max(shape) < len(devices):  # (small: one copy on each device)
        return jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("a",)),
                                          jax.sharding.PartitionSpec())
    left = len(devices)
    spec: list[str | None] = [None] * len(shape)
    mesh_shape: list[int] = []
    names: list[str] = []
    for dim in np.argsort(shape)[::-1]:  # (the largest dimension first)
        if left == 1:
            break
        factor = math.gcd(shape[dim], left) if shape[dim] >= left else 1
        if factor == 1:
            continue
        left //= factor
        names.append(chr(ord("a") + len(names)))
        mesh_shape.append(factor)
        spec[dim] = names[-1]
    if left > 1:
        names.append(chr(ord("a") + len(names)))
        mesh_shape.append(left)
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(mesh_shape), tuple(names))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def construct_maximal_shardings(abstract_state: Any,
                                devices: Sequence[jax.Device] | None = None) -> Any:
    """A sharding for each array of ``abstract_state`` (``jax.ShapeDtypeStruct``s) that
    splits it over ``devices`` (default: all) as far as its shape allows, as Orbax's does:
    to restore a checkpoint onto devices it was not saved on, spread out."""
    devices = list(devices) if devices is not None else jax.devices()
    shardings = jax.tree.map(lambda x: _maximal_sharding(x, devices), abstract_state)
    per_device = sum(math.prod(sh.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                     for x, sh in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)))
    log.info("construct_maximal_shardings: about %d bytes a device", per_device)
    return shardings
