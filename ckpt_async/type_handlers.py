"""Per-leaf save and restore options (Orbax's ``type_handlers`` names)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass
class SaveArgs:
    """How to save one leaf: ``dtype`` casts before writing."""

    aggregate: bool = False
    dtype: Any = None
    chunk_byte_size: int | None = None
    shard_axes: tuple[int, ...] = ()
    write_chunk_shape: tuple[int, ...] | None = None
    read_chunk_shape: tuple[int, ...] | None = None


@dataclasses.dataclass
class RestoreArgs:
    """How to restore one leaf: as ``restore_type`` (np.ndarray, jax.Array, int, ...), cast to
    ``dtype``."""

    restore_type: Any = None
    dtype: Any = None


@dataclasses.dataclass
class ArrayRestoreArgs(RestoreArgs):
    """Restore one leaf as a ``jax.Array`` placed on ``sharding`` (or ``mesh`` + ``mesh_axes``).

    ``global_shape`` (or its alias ``shape``): the shape to restore into. With ``strict``
    (the default) it must be the stored shape; with ``strict=False`` the stored array is cut
    to it or padded with zeros, dimension by dimension (as Orbax does)."""

    restore_type: Any = jax.Array
    mesh: jax.sharding.Mesh | None = None
    mesh_axes: jax.sharding.PartitionSpec | None = None
    sharding: jax.sharding.Sharding | None = None
    global_shape: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if self.shape is not None and self.global_shape is not None and \
                tuple(self.shape) != tuple(self.global_shape):
            raise ValueError(f"ArrayRestoreArgs: shape {self.shape} and global_shape "
                             f"{self.global_shape} differ; give one, or the same")
        if self.global_shape is None:
            self.global_shape = self.shape
        self.shape = self.global_shape

    def resolved_sharding(self) -> jax.sharding.Sharding | None:
        if self.sharding is not None:
            return self.sharding
        if self.mesh is not None and self.mesh_axes is not None:
            return jax.sharding.NamedSharding(self.mesh, self.mesh_axes)
        return None


#: A leaf of a restore target (or ``item``) marked not to be restored: it comes back as
#: ``PLACEHOLDER`` and its data is not read (Orbax's, the ``Ellipsis`` object).
PLACEHOLDER = ...


def is_placeholder(value: Any) -> bool:
    """Whether ``value`` is :data:`PLACEHOLDER`."""
    return value is PLACEHOLDER


__all__ = ["PLACEHOLDER", "ArrayRestoreArgs", "RestoreArgs", "SaveArgs", "is_placeholder"]
