"""What ``metadata()`` and ``item_metadata()`` return: shapes, dtypes, shardings, no arrays.

The reprs follow Orbax's, so printed results read the same in both libraries.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from .. import _format as fmt
from .._integrity import read_step_metadata
from .._paths import AnyPath, as_path
from .._runtime import get_runtime
from .._serialize import axis_types_from_json, device_named, mesh_ids, mesh_of, sharding_to_json
from ..errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class StorageMetadata:
    chunk_shape: tuple[int, ...] | None = None
    write_shape: tuple[int, ...] | None = None


class ShardingMetadata(abc.ABC):
    """How a saved ``jax.Array`` was placed, as ``_sharding`` records it (Orbax's base of
    :class:`NamedShardingMetadata` and :class:`SingleDeviceShardingMetadata`)."""

    @classmethod
    def from_jax_sharding(cls, jax_sharding: jax.sharding.Sharding) -> ShardingMetadata:
        """The metadata of a ``NamedSharding`` or ``SingleDeviceSharding`` (on a subclass,
        of its kind only); ``ValueError`` for another."""
        text = sharding_to_json(jax_sharding)
        meta = sharding_metadata_from_json(json.loads(text)) if text is not None else None
        if meta is None or not isinstance(meta, cls):
            raise InvalidArgumentError(f"{cls.__name__} cannot describe {jax_sharding!r}")
        return meta

    @classmethod
    def from_deserialized_dict(cls, deserialized_dict: Mapping[str, Any]) -> ShardingMetadata:
        """The metadata of a decoded ``_sharding`` entry; ``ValueError`` for another kind."""
        meta = sharding_metadata_from_json(deserialized_dict)
        if meta is None or not isinstance(meta, cls):
            raise InvalidArgumentError(f"{cls.__name__} cannot read {dict(deserialized_dict)!r}")
        return meta

    @abc.abstractmethod
    def to_jax_sharding(self) -> jax.sharding.Sharding:
        """The sharding, on this process's devices."""

    @abc.abstractmethod
    def to_serialized_string(self) -> str:
        """The ``_sharding`` entry (JSON) of this metadata."""


@dataclasses.dataclass(frozen=True)
class SingleDeviceShardingMetadata(ShardingMetadata):
    device_str: str

    def to_jax_sharding(self) -> jax.sharding.SingleDeviceSharding:
        """The sharding on this process's device of that name (``ValueError`` if none)."""
        device = device_named(self.device_str)
        if device is None:
            raise InvalidArgumentError(f"no device {self.device_str} in this process: "
                                       f"{jax.devices()}")
        return jax.sharding.SingleDeviceSharding(device)

    def to_serialized_string(self) -> str:
        return json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": self.device_str})

    def _device(self) -> str:
        return self.device_str.replace("TFRT_CPU_", "cpu:")  # (jax's older name of a CPU)

    def __eq__(self, other: object) -> bool:
        """The same device, by its name now or jax's older one (``TFRT_CPU_0`` is ``cpu:0``,
        as in Orbax)."""
        if not isinstance(other, SingleDeviceShardingMetadata):
            return NotImplemented
        return self._device() == other._device()

    def __hash__(self) -> int:
        return hash(self._device())

    def __repr__(self) -> str:
        return f"SingleDeviceShardingMetadata(device_str={self.device_str})"


@dataclasses.dataclass(frozen=True)
class NamedShardingMetadata(ShardingMetadata):
    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    partition_spec: tuple[Any, ...]
    axis_types: tuple[jax.sharding.AxisType, ...] | None = None
    #: The mesh's device ids, nested as the mesh (None: ``jax.devices()`` in order).
    device_mesh: Any = None

    def __post_init__(self) -> None:
        # (made by hand as Orbax's are: the shape a NumPy array, the axis names a list)
        set_ = object.__setattr__
        set_(self, "shape", tuple(int(n) for n in np.asarray(self.shape).reshape(-1)))
        set_(self, "axis_names", tuple(str(a) for a in self.axis_names))
        set_(self, "partition_spec", tuple(tuple(p) if isinstance(p, list) else p
                                           for p in self.partition_spec))
        if self.axis_types is not None:
            set_(self, "axis_types", tuple(self.axis_types))
        if isinstance(self.device_mesh, np.ndarray):
            set_(self, "device_mesh", self.device_mesh.tolist())

    def to_jax_sharding(self) -> jax.sharding.NamedSharding:
        """The sharding rebuilt on this process's devices (as Orbax's ``to_jax_sharding``)."""
        mesh = mesh_of(self.device_mesh, self.shape, self.axis_names, self.axis_types)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*self.partition_spec))

    def to_serialized_string(self) -> str:
        # (Orbax's text: its keys in its order)
        doc: dict[str, Any] = {"sharding_type": "NamedSharding", "shape": list(self.shape),
                               "axis_names": list(self.axis_names)}
        if self.axis_types is not None:
            doc["axis_types"] = [str(t) for t in self.axis_types]
        doc["partition_spec"] = [list(p) if isinstance(p, tuple) else p
                                 for p in self.partition_spec]
        if self.device_mesh is not None:
            doc["device_mesh"] = {"mesh": jax.tree.map(lambda i: {"id": int(i)}, self.device_mesh)}
        return json.dumps(doc)

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
    """A stored Python or NumPy scalar: ``ScalarMetadata(name=..., directory=...,
    dtype=...)``, its shape ``()`` and no sharding unless given, as Orbax's."""

    shape: tuple[int, ...] = ()
    sharding: Any = None
    dtype: np.dtype = None  # type: ignore[assignment]

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


def step_metadata_of(doc: fmt.StepMetadata | None, ext: fmt.StepExtension | None,
                     item_metadata: Any = None) -> StepMetadata:
    """The :class:`StepMetadata` of a step's decoded ``_CHECKPOINT_METADATA`` (None: absent)
    and ``_CKPT_ASYNC`` (its save's statistics join the performance metrics)."""
    doc = doc or fmt.StepMetadata()
    statistics = (ext.statistics if ext is not None else None) or {}
    return StepMetadata(
        item_handlers=doc.item_handlers,
        item_metadata=item_metadata,
        metrics=doc.metrics,
        performance_metrics={**doc.performance_metrics, **statistics},
        init_timestamp_nsecs=doc.init_timestamp_nsecs,
        commit_timestamp_nsecs=doc.commit_timestamp_nsecs,
        custom_metadata=doc.custom_metadata,
    )


def get_step_metadata(path: Any) -> StepMetadata:
    """The metadata ``_CHECKPOINT_METADATA`` records for the step directory ``path``, without
    its items' (Orbax's ``get_step_metadata``); ``ValueError`` where there is none."""
    step = as_path(path)
    doc, ext = get_runtime().call(read_step_metadata, step)
    if doc is None:
        raise InvalidArgumentError(f"Step metadata not found at {step / fmt.CHECKPOINT_METADATA}")
    return step_metadata_of(doc, ext)


@dataclasses.dataclass
class RootMetadata:
    """A manager directory's metadata (``CheckpointManager(metadata=...)``; ``{}`` for
    none, as Orbax's)."""

    custom_metadata: dict[str, Any] | None = dataclasses.field(default_factory=dict)


# Orbax's submodules (imported last: they take their names from this module).
from . import tree as tree  # noqa: E402, F811
from . import value as value  # noqa: E402
