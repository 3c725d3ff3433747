"""Orbax's first pytree format, as versions before 0.5 wrote it: a msgpack ``checkpoint`` file
beside (or instead of) ``_METADATA``.

- Orbax before 0.3 wrote no ``_METADATA``: the ``checkpoint`` file holds the whole tree, each
  leaf either its value ("aggregated": flax's ``save_args_from_target`` asked for every leaf
  so) or ``PLACEHOLDER://<name>`` for an array TensorStore wrote (one zarr array per
  directory, or an OCDBT database).
- Orbax 0.3 and 0.4 wrote ``_METADATA`` too; there an aggregated leaf is one marked
  ``skip_deserialize`` whose value type is not an empty one, and its value is in the
  ``checkpoint`` file. Their ``_METADATA`` does not say whether the arrays are in an OCDBT
  database (Orbax's ``manifest.ocdbt`` tells).

Both are read as Orbax 0.12 reads them: a leaf without ``_METADATA`` whose type is unknown
comes back as a NumPy array (a scalar as a 0-d one).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _format as fmt
from .. import _storage as storage
from .. import _tree
from .._ocdbt import MANIFEST
from .._paths import AnyPath
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
)
from ..msgpack_utils import read_tree

#: Prefixes of the strings that stood in the msgpack tree of Orbax's first format for values
#: saved elsewhere (by TensorStore, or aggregated into that file).
PLACEHOLDER_PREFIX = "PLACEHOLDER://"
_AGGREGATED_PREFIX = "AGGREGATED://"


def leaf_placeholder(name: str) -> str:
    """The placeholder string of the value saved as ``name``."""
    return PLACEHOLDER_PREFIX + name


def leaf_is_placeholder(leaf: Any) -> bool:
    """Whether ``leaf`` is such a placeholder string."""
    return isinstance(leaf, str) and leaf.startswith((PLACEHOLDER_PREFIX, _AGGREGATED_PREFIX))


def name_from_leaf_placeholder(placeholder: str) -> str:
    """The name in a placeholder string; ``ValueError`` for anything else."""
    for prefix in (_AGGREGATED_PREFIX, PLACEHOLDER_PREFIX):
        if isinstance(placeholder, str) and placeholder.startswith(prefix):
            return placeholder[len(prefix):]
    raise InvalidArgumentError(f"{placeholder!r} is not a placeholder (no "
                               f"{PLACEHOLDER_PREFIX!r} or {_AGGREGATED_PREFIX!r} prefix)")


#: The aggregate file's name unless a handler's ``aggregate_filename`` says another.
AGGREGATE_FILE = "checkpoint"

_DICT_KEY, _SEQUENCE_KEY = 2, 1


def _leaves(node: Any, path: tuple[fmt.KeyEntry, ...] = ()) -> Iterator[
        tuple[tuple[fmt.KeyEntry, ...], Any]]:
    """The msgpack tree's leaves with their keys; empty containers and None are leaves."""
    if type(node) is dict and node:
        for k, v in node.items():
            yield from _leaves(v, (*path, fmt.KeyEntry(str(k), _DICT_KEY)))
    elif type(node) in (list, tuple) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, fmt.KeyEntry(str(i), _SEQUENCE_KEY)))
    else:
        yield path, node


def _name(path: tuple[fmt.KeyEntry, ...]) -> str:
    return ".".join(k.key for k in path)


def _as_read(value: Any) -> Any:
    """An aggregated value as the restore handles it: numbers as (writable) arrays, anything
    else as it is."""
    if isinstance(value, (np.ndarray, np.generic, bool, int, float, complex)):
        return np.array(value)
    return value


def _value_type(value: Any) -> str:
    for name, kind in _tree.EMPTY_TYPES.items():
        if type(value) is kind and not value:
            return name
    if isinstance(value, (str, bytes)):  # (bytes too: msgpack holds them, and so they return)
        return "string"
    if isinstance(value, (np.generic, bool, int, float, complex)):
        return "scalar"
    return "np.ndarray"


def _scalar_tag(value: Any) -> str | None:
    """The tag by which the restore gives a scalar its type back."""
    if isinstance(value, np.generic):
        return f"np:{value.dtype.name}"
    if type(value) in (bool, int, float, complex):
        return type(value).__name__
    return None


async def _read_aggregate(directory: AnyPath, filename: str) -> Any:
    path = directory / filename
    data = await storage.read_optional(path)
    if data is None:
        return None
    return read_tree(data, path)


class Aggregated:
    """The values of an item's aggregated leaves (name -> value, numbers as arrays) and the
    scalar tags of those that were scalars."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.scalars: dict[str, str] = {}

    def add(self, name: str, value: Any) -> None:
        self.values[name] = _as_read(value)
        if (tag := _scalar_tag(value)) is not None:
            self.scalars[name] = tag


async def _manager_hint(directory: AnyPath) -> str:
    """Where ``directory`` is a manager's step, or a manager's directory, rather than an item
    (a common slip): what it holds and what to pass instead; else ''."""
    async def with_file(parent: AnyPath, name: str) -> list[str]:
        return sorted([d for d in await storage.listdirs(parent)
                       if await storage.exists(parent / d / name)], key=lambda d: (len(d), d))

    try:
        if await storage.exists(directory / fmt.CHECKPOINT_METADATA):
            items = await with_file(directory, fmt.PYTREE_METADATA)
            if items:
                return (f"; it is a step of a CheckpointManager, holding the items {items}: "
                        f"restore an item's folder ({directory / items[0]}), or the step "
                        f"with a CheckpointManager")
        elif steps := await with_file(directory, fmt.CHECKPOINT_METADATA):
            return (f"; it is a CheckpointManager's directory (steps "
                    f"{', '.join(steps[-10:])}): restore a step with a CheckpointManager, or "
                    f"an item's folder in a step")
    except (OSError, CheckpointError):
        pass  # (a hint only: the error stands without it)
    return ""


async def tree_without_metadata(directory: AnyPath, filename: str) -> tuple[
        fmt.TreeMetadata, Aggregated]:
    """The item's tree from its aggregate file alone (Orbax before 0.3)."""
    tree = await _read_aggregate(directory, filename)
    if tree is None:
        raise CheckpointNotFoundError(
            f"{directory} holds no pytree checkpoint (neither {fmt.PYTREE_METADATA} nor the "
            f"{filename!r} file of Orbax's first format is there){await _manager_hint(directory)}")
    aggregated = Aggregated()
    entries: dict[str, fmt.TreeEntry] = {}
    for path, value in _leaves(tree):
        name = _name(path)
        if leaf_is_placeholder(value):
            if name_from_leaf_placeholder(value) != name:
                raise CorruptCheckpointError(
                    f"{directory / filename}: the leaf at {name!r} names the array "
                    f"{value!r}, not {PLACEHOLDER_PREFIX}{name}")
            meta = fmt.ValueMetadata("np.ndarray", skip_deserialize=False)
        else:
            meta = fmt.ValueMetadata(_value_type(value), skip_deserialize=True)
            aggregated.add(name, value)
        entries[_tree.tuple_key([k.key for k in path])] = fmt.TreeEntry(list(path), meta)
    use_ocdbt = await storage.exists(directory / MANIFEST)
    return fmt.TreeMetadata(entries, use_ocdbt=use_ocdbt, use_zarr3=False), aggregated


def aggregated_names(doc: fmt.TreeMetadata) -> list[str]:
    """The leaves ``_METADATA`` (of Orbax 0.3 or 0.4) says are in the aggregate file."""
    if doc.ckpt_async is not None:
        return []  # (ckpt_async writes every value where _METADATA says)
    return [".".join(k.key for k in e.key_metadata) for e in doc.tree_metadata.values()
            if e.value_metadata.skip_deserialize
            and e.value_metadata.value_type not in _tree.EMPTY_TYPES]


async def aggregated_values(directory: AnyPath, filename: str, names: list[str]) -> Aggregated:
    """The values of the leaves ``names`` from the item's aggregate file."""
    path = directory / filename
    tree = await _read_aggregate(directory, filename)
    if tree is None:
        raise CorruptCheckpointError(
            f"{path} is missing: {fmt.PYTREE_METADATA} says {len(names)} leaves "
            f"({', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''}) are in it")
    flat = {_name(p): v for p, v in _leaves(tree)}
    aggregated = Aggregated()
    for name in names:
        if name not in flat or leaf_is_placeholder(flat[name]):
            raise CorruptCheckpointError(f"{path}: the value of leaf {name!r} is not there")
        aggregated.add(name, flat[name])
    return aggregated
