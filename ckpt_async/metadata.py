"""What ``metadata()`` and ``item_metadata()`` return: shapes, dtypes, shardings, no arrays.

The reprs follow Orbax's, so printed results read the same in both libraries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from ._paths import AnyPath
from ._serialize import axis_types_from_json, device_named, mesh_ids, mesh_of


@dataclasses.dataclass(frozen=True)
class StorageMetadata:
    chunk_shape: tuple[int, ...] | None = None
    write_shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SingleDeviceShardingMetadata:
    device_str: str

    def to_jax_sharding(self) -> jax.sharding.SingleDeviceSharding:
        """The sharding on this process's device of that name (``ValueError`` if none)."""
        device = device_named(self.device_str)
        if device is None:
            raise ValueError(f"no device {self.device_str} in this process: {jax.devices()}")
        return jax.sharding.SingleDeviceSharding(device)

    def __repr__(self) -> str:
        return f"SingleDeviceShardingMetadata(device_str={self.device_str})"


@dataclasses.dataclass(frozen=True)
class NamedShardingMetadata:
    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    partition_spec: tuple[Any, ...]
    axis_types: tuple[jax.sharding.AxisType, ...] | None = None
    #: The mesh's device ids, nested as the mesh (None: ``jax.devices()`` in order).
    device_mesh: Any = None

    def to_jax_sharding(self) -> jax.sharding.NamedSharding:
        """The sharding rebuilt on this process's devices (as Orbax's ``to_jax_sharding``)."""
        mesh = mesh_of(self.device_mesh, self.shape, self.axis_names, self.axis_types)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*self.partition_spec))

    def __repr__(self) -> str:
        return (
            f"NamedShardingMetadata(shape={list(self.shape)}, axis_names={list(self.axis_names)},"
            f" axis_types={self.axis_types}, partition_spec={self.partition_spec},"
            f" device_mesh={self.device_mesh})"
        )


def sharding_metadata_from_json(data: Mapping[str, Any] | None) -> Any:
    if not data:
        return None
    if data.get("sharding_type") == "SingleDeviceSharding":
        return SingleDeviceShardingMetadata(str(data.get("device_str")))
    if data.get("sharding_type") == "NamedSharding":
        return NamedShardingMetadata(
            tuple(data.get("shape", ())),
            tuple(data.get("axis_names", ())),
            tuple(tuple(p) if isinstance(p, list) else p for p in data.get("partition_spec", ())),
            axis_types_from_json(data.get("axis_types")),
            mesh_ids(data),
        )
    return None


@dataclasses.dataclass(frozen=True)
class Metadata:
    """A stored value of a tree: its name and the item directory it is in (Orbax's base of
    every value metadata: ``isinstance(leaf, ocp.metadata.Metadata)`` tells a metadata tree's
    leaves from values)."""

    name: str
    directory: AnyPath | None


@dataclasses.dataclass(frozen=True)
class ArrayMetadata(Metadata):
    """A stored array: name, shape, dtype, sharding and chunking."""

    shape: tuple[int, ...]
    sharding: Any
    dtype: np.dtype
    storage: StorageMetadata | None = None

    def __repr__(self) -> str:
        return (
            f"ArrayMetadata :  name={self.name},  directory={self.directory},  shape={self.shape},"
            f"  sharding={self.sharding},  dtype={self.dtype},  storage={self.storage},"
        )


@dataclasses.dataclass(frozen=True)
class ScalarMetadata(ArrayMetadata):
    """A stored Python or NumPy scalar."""

    def __repr__(self) -> str:
        return (
            f"ScalarMetadata(name={self.name!r}, directory={self.directory!r}, shape={self.shape},"
            f" sharding={self.sharding}, dtype={self.dtype!r}, storage={self.storage})"
        )


@dataclasses.dataclass(frozen=True)
class StringMetadata(Metadata):
    """A stored string."""


class TreeMetadata(Mapping[str, Any]):
    """The metadata of a pytree item: ``tree`` mirrors the saved tree with metadata leaves."""

    def __init__(self, tree: Any, custom_metadata: Any = None, use_zarr3: bool = False) -> None:
        self.tree = tree
        self.custom_metadata = custom_metadata
        self.use_zarr3 = use_zarr3

    def __getitem__(self, key: Any) -> Any:
        return self.tree[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tree)

    def __len__(self) -> int:
        return len(self.tree)

    def __repr__(self) -> str:
        return (
            f"TreeMetadata(\n  custom_metadata={self.custom_metadata}\n  tree={self.tree}\n"
            f"  use_zarr3={self.use_zarr3}\n)"
        )


def _tree_metadata_children(m: TreeMetadata) -> tuple[list[tuple[Any, Any]], Any]:
    """The children of ``m.tree``'s root, with their keys: a TreeMetadata is its tree to
    ``jax.tree`` functions (key paths as in the tree, as Orbax's)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(m.tree, is_leaf=lambda x: x is not m.tree)
    keyed = [(path[0] if path else jax.tree_util.SequenceKey(0), child) for path, child in flat]
    return keyed, (treedef, m.custom_metadata, m.use_zarr3)


jax.tree_util.register_pytree_with_keys(
    TreeMetadata,
    _tree_metadata_children,
    lambda aux, children: TreeMetadata(jax.tree_util.tree_unflatten(aux[0], children), *aux[1:]),
)


@dataclasses.dataclass
class StepMetadata:
    """A step's metadata: its items' handlers and metadata, metrics, timestamps."""

    item_handlers: Any = None
    item_metadata: Any = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    performance_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_timestamp_nsecs: int | None = None
    commit_timestamp_nsecs: int | None = None
    custom_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RootMetadata:
    """A manager directory's metadata (``CheckpointManager(metadata=...)``)."""

    custom_metadata: dict[str, Any] | None = None
