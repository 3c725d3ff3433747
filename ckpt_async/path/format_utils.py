"""Telling a checkpoint's directory by its files (Orbax's ``ocp.path.format_utils``).

:func:`is_orbax_checkpoint` answers, as Orbax's does, whether a directory is LIKELY a
checkpoint: a step (it holds ``_CHECKPOINT_METADATA``) or an item (a pytree's ``_METADATA``
or older msgpack ``checkpoint`` file beside its arrays), or the step holding such an item. A
directory of several steps is not one. Orbax's heuristic, kept as it is: it rarely says yes
wrongly, and may say no of a checkpoint of an unusual layout.
"""

from __future__ import annotations

from typing import Any

from .. import _format as fmt
from .. import _storage as storage
from .._integrity import read_step_metadata
from .._paths import AnyPath, as_given
from .._runtime import get_runtime
from ..errors import CheckpointError, CheckpointNotFoundError, PathNotADirectoryError

OCDBT_MANIFEST_FILE = "manifest.ocdbt"
PYTREE_METADATA_FILE = fmt.PYTREE_METADATA
_CHECKPOINT_FILE = "checkpoint"  # (the msgpack file of Orbax before 0.5)


async def _has_zarray_dirs(path: AnyPath) -> list[bool]:
    return [await storage.exists(path / name / ".zarray")
            for name in await storage.listdirs(path)]


async def _is_pytree(path: AnyPath) -> bool:
    msgpack = await storage.exists(path / _CHECKPOINT_FILE)
    if msgpack or await storage.exists(path / PYTREE_METADATA_FILE):
        if await storage.exists(path / OCDBT_MANIFEST_FILE) or any(
                await _has_zarray_dirs(path)):
            return True
    return msgpack and not any(await _has_zarray_dirs(path))


async def _is_orbax_checkpoint(path: AnyPath) -> bool:
    if not await storage.exists(path) and not await storage.is_dir(path):
        raise CheckpointNotFoundError(f"Checkpoint path {path} does not exist.")
    if not await storage.is_dir(path):
        raise PathNotADirectoryError(f"Checkpoint path {path} is not a directory.")
    try:
        doc, _ext = await read_step_metadata(path)
    except CheckpointError:  # (a damaged document: not taken for one, as in Orbax)
        doc = None
    if doc is not None or await _is_pytree(path):
        return True
    for name in await storage.listdirs(path):
        if await _is_pytree(path / name):
            return True
    return False


def is_ocdbt_checkpoint(path: Any) -> bool:
    """Whether ``path`` holds an item saved as OCDBT (its ``manifest.ocdbt``)."""
    return bool(get_runtime().call(storage.exists, as_given(path) / OCDBT_MANIFEST_FILE))


def is_pytree_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a pytree item: its ``_METADATA`` (or msgpack ``checkpoint``) file
    beside its arrays (an OCDBT database, or folders of zarr arrays), or a msgpack
    ``checkpoint`` file alone."""
    return bool(get_runtime().call(_is_pytree, as_given(path)))


def is_orbax_checkpoint(path: Any) -> bool:
    """Whether ``path`` is LIKELY a checkpoint: a step directory (a manager's or a
    checkpointer's) or a pytree item's, not a directory of steps. ``FileNotFoundError`` when
    there is nothing at ``path``, ``NotADirectoryError`` when it is a file."""
    return bool(get_runtime().call(_is_orbax_checkpoint, as_given(path)))


__all__ = ["OCDBT_MANIFEST_FILE", "PYTREE_METADATA_FILE", "is_ocdbt_checkpoint",
           "is_orbax_checkpoint", "is_pytree_checkpoint"]
