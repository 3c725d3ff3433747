"""ArrayCheckpointHandler: one array or scalar per item, as Orbax stores it.

The item is the pytree ``{checkpoint_name: value}`` (``checkpoint_name`` ``"checkpoint"`` by
default) written by the pytree handler into the item's folder, so its files are those of any
pytree item (``_METADATA`` and the array data); Orbax reads them with its own
``ArrayCheckpointHandler``, and ckpt_async reads Orbax's (zarr folders, as Orbax writes this
handler's items, or OCDBT). Items of Orbax versions older than ``_METADATA`` are read through
the type handlers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import jax
import numpy as np

from .. import _format as fmt
from .. import _storage as storage
from .. import type_handlers
from .._ocdbt import MANIFEST
from .._paths import AnyPath, coerce
from ..args import ArrayRestore, ArraySave, PyTreeRestore, PyTreeSave, register_with_handler
from ..errors import CheckpointNotFoundError, StructureMismatchError, UnsupportedLeafError
from .base import AsyncCheckpointHandler, Writer, engine_method
from .pytree import PyTreeCheckpointHandler

_DEFAULT_NAME = "checkpoint"


def _is_supported(item: Any) -> bool:
    return isinstance(item, np.ndarray | jax.Array | np.number | int | float)  # (Orbax's)


class ArrayCheckpointHandler(AsyncCheckpointHandler):
    """Saves and restores one array or scalar (``ArraySave`` / ``ArrayRestore``): a
    ``jax.Array`` restores as a ``jax.Array``, a NumPy array as a NumPy array, a Python
    number as one and a NumPy scalar with its type (Orbax gives a Python number), unless
    the restore args say otherwise."""

    typestr = fmt.ARRAY_TYPESTR

    def __init__(self, checkpoint_name: str | None = None) -> None:
        self._name = checkpoint_name or _DEFAULT_NAME
        self._pytree = PyTreeCheckpointHandler()

    async def stage(self, directory: AnyPath, args: ArraySave) -> Writer:
        item = args.item
        if not _is_supported(item):
            raise UnsupportedLeafError(
                f"{directory}: ArraySave takes an array or a scalar, not {type(item).__name__}")
        save_args = None if args.save_args is None else {self._name: args.save_args}
        return await self._pytree.stage(directory, PyTreeSave({self._name: item},
                                                              save_args=save_args))

    async def existing_item(self, directory: AnyPath, args: Any) -> AnyPath | None:
        return await self._pytree.existing_item(directory, None)

    @engine_method
    async def restore(self, directory: AnyPath, args: ArrayRestore | None = None) -> Any:
        directory = coerce(directory)
        args = args if args is not None else ArrayRestore()
        raw = await storage.read_optional(directory / fmt.PYTREE_METADATA)
        if raw is None:
            # (an item of Orbax before _METADATA: its array in the folder of its name, or in
            # the item's OCDBT database)
            if not any(await asyncio.gather(storage.exists(directory / self._name),
                                            storage.exists(directory / MANIFEST))):
                raise CheckpointNotFoundError(
                    f"{directory} holds no array item (neither {fmt.PYTREE_METADATA} nor "
                    f"{self._name!r} is there)")
            return await self._restore_legacy(directory, args.restore_args)
        self._check_holds_array(directory, fmt.decode(
            raw, fmt.TreeMetadata, where=str(directory / fmt.PYTREE_METADATA)))
        restored = await self._pytree.restore(directory, PyTreeRestore(
            None if args.item is None else {self._name: args.item},
            restore_args=None if args.restore_args is None else {self._name: args.restore_args}))
        return restored[self._name]

    def _check_holds_array(self, directory: AnyPath, doc: fmt.TreeMetadata) -> None:
        """``StructureMismatchError`` unless the item holds this handler's one value (an item
        saved as a tree, by the pytree or standard handler, gave a bare ``KeyError``)."""
        keys = [[k.key for k in e.key_metadata] for e in doc.tree_metadata.values()]
        if keys != [[self._name]]:
            shown = (", ".join("/".join(k) for k in keys[:5]) or "none") + (
                ", ..." if len(keys) > 5 else "")
            raise StructureMismatchError(
                f"{directory}: the item is a tree (leaves: {shown}), not one "
                f"array saved by ArrayCheckpointHandler (as {self._name!r}); restore it with "
                "ocp.args.StandardRestore or ocp.args.PyTreeRestore")

    async def _restore_legacy(self, directory: AnyPath, restore_args: Any) -> Any:
        """An item written before Orbax wrote ``_METADATA``: its array read by the type
        handler of its restore type (``jax.Array`` for ``ArrayRestoreArgs``, else NumPy)."""
        restore_args = restore_args if restore_args is not None else type_handlers.RestoreArgs()
        restore_type = restore_args.restore_type or (
            jax.Array if isinstance(restore_args, type_handlers.ArrayRestoreArgs)
            else np.ndarray)
        info = type_handlers.ParamInfo(
            name=self._name, parent_dir=directory, skip_deserialize=False,
            is_ocdbt_checkpoint=await storage.exists(directory / MANIFEST))
        handler = type_handlers.get_type_handler(restore_type)
        (value,) = await handler.deserialize([info], args=[restore_args])
        return value

    @engine_method
    async def metadata(self, directory: AnyPath) -> Any:
        """The value's metadata (an ``ArrayMetadata`` or ``ScalarMetadata``); Orbax's handler
        gives None."""
        tree = (await self._pytree.metadata(coerce(directory))).tree
        return tree.get(self._name) if isinstance(tree, dict) else None


register_with_handler(ArrayCheckpointHandler, for_save=True)(ArraySave)
register_with_handler(ArrayCheckpointHandler, for_restore=True)(ArrayRestore)
