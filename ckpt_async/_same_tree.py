"""Whether the processes of a multi-process save all save the same tree.

Each process writes the shards of its own tree while the primary writes the documents of its
own: if the trees differ (a leaf more on one process, another shape or dtype), the result is
a checkpoint that does not restore, or restores other values. So every process describes its
tree (:func:`describe`: each leaf's item and path, and the shape and dtype of ``jax.Array``
leaves), brings the description's digest to the save's first barrier, and the save is refused
on every process if they differ (:func:`agree`), before anything is written. (Other leaves,
NumPy arrays and scalars, are written by the primary alone: their values, shapes and dtypes
may differ between processes, as in Orbax, and the primary's are saved.)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax

from . import _tree
from .args import ArraySave, CheckpointArgs, Composite, JaxRandomKeySave, PyTreeSave, StandardSave
from .errors import StructureMismatchError

#: The args whose item is a tree of arrays each process writes its shards of (the other
#: items are documents the primary alone writes: only their names and kinds are compared)
_ARRAY_ITEMS = (StandardSave, PyTreeSave, ArraySave, JaxRandomKeySave)

_dtype_names: dict[Any, str] = {}  # (str() of a dtype costs ~8 us, once a leaf otherwise)


def _kind(value: Any) -> str:
    """A ``jax.Array``'s dtype and shape (``float32[4, 2]``), which every process writes
    shards of; nothing for other leaves (the primary's are written, whatever the others
    hold)."""
    if not isinstance(value, jax.Array):
        return ""
    dtype = value.dtype
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names.setdefault(dtype, str(dtype))
    return f"{name}{list(value.shape)}"


def describe(args: CheckpointArgs) -> list[str]:
    """One line for each leaf of the arrays' items (``item/path: float32[4, 2]``, ``item/path:``
    for a leaf other than a ``jax.Array``) and each other item (``item: JsonSave``), sorted."""
    items = args.items() if isinstance(args, Composite) else [("", args)]
    lines = []
    for name, item_args in items:
        prefix = f"{name}/" if name else ""
        if not isinstance(item_args, _ARRAY_ITEMS):
            lines.append(f"{name or '.'}: {type(item_args).__name__}")
            continue
        leaves, _ = _tree.flatten(item_args.item)
        for leaf in leaves:
            lines.append(f"{prefix}{'/'.join(map(str, leaf.keys))}: {_kind(leaf.value)}")
    return sorted(lines)  # (a dict's order is not compared: its leaves are saved by key)


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def first_difference(a: list[str], b: list[str], who_a: str, who_b: str) -> str:
    """Where description ``a`` (of process ``who_a``) first differs from ``b``."""
    def split(lines: list[str]) -> dict[str, str]:
        return dict(line.rsplit(": ", 1) for line in lines)  # (every line has one)

    da, db = split(a), split(b)
    for path in sorted(da.keys() | db.keys()):
        if path not in db:
            return f"{path!r} is saved by {who_a} only"
        if path not in da:
            return f"{path!r} is saved by {who_b} only"
        if da[path] != db[path]:
            return (f"{path!r} is {da[path] or 'no jax.Array'} on {who_a}, "
                    f"{db[path] or 'no jax.Array'} on {who_b}")
    return "none: the same leaves"  # (descriptions whose digests differ always differ)


async def agree(sync: Any, lines: list[str], digests: dict[int, str]) -> None:
    """Raises StructureMismatchError on every process unless every process's ``digests``
    entry is the primary's. Then the primary and the first process that differs share their
    descriptions (only then: they may be long), so every process names the first leaf
    where they differ."""
    primary = sync.roles.primary
    differ = sorted(i for i, d in digests.items() if d != digests[primary])
    if not differ:
        return
    other = differ[0]
    shared = {}
    for source in (primary, other):
        mine = json.dumps(lines) if sync.roles.index == source else None
        shared[source] = json.loads(await sync.broadcast("tree", mine, source=source))
    where = first_difference(shared[primary], shared[other], f"process {primary}",
                             f"process {other}")
    who = ", ".join(map(str, differ))
    many = len(differ) > 1
    raise StructureMismatchError(
        f"{sync.what}: process{'es' if many else ''} {who} {'save' if many else 'saves'} "
        f"another tree than process {primary}, the primary (first difference: {where}); every "
        "process must save the same tree (paths, shapes and dtypes); nothing was written")

