"""JsonCheckpointHandler: one JSON document per item (``<item>/metadata``)."""

from __future__ import annotations

from typing import Any

import msgspec

from .. import _format as fmt
from .. import _integrity
from .. import _storage as storage
from .._paths import AnyPath
from ..args import JsonRestore, JsonSave, register_with_handler
from ..errors import CheckpointNotFoundError, UnsupportedLeafError
from ..multihost import current_roles
from .base import AsyncCheckpointHandler, Writer, engine_method


class JsonCheckpointHandler(AsyncCheckpointHandler):
    """Saves and restores a JSON-serializable document (dicts, lists, numbers, strings)."""

    typestr = fmt.JSON_TYPESTR

    def __init__(self, filename: str | None = None, *,
                 multiprocessing_options: Any = None) -> None:
        # (multiprocessing_options: Orbax's; the primary process writes the document here)
        self._filename = filename or fmt.JSON_ITEM

    async def stage(self, directory: AnyPath, args: JsonSave) -> Writer:
        try:
            # Encoding now is the snapshot: later mutation of the caller's dict is not saved.
            data = fmt.encode(args.item, values=args.item)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise UnsupportedLeafError(
                f"{directory}: item is not JSON-serializable: {exc}") from exc

        async def write() -> None:
            if not current_roles().is_primary:
                return  # one document per item: the primary process writes it
            # (made durable by the commit's fsync of the whole checkpoint)
            await storage.write_files([
                (directory / self._filename, data),
                (directory / _integrity.CHECKSUMS,
                 _integrity.checksums_document({self._filename: data}, {}, {}))])

        return Writer(write, len(data))

    @engine_method
    async def restore(self, directory: AnyPath, args: JsonRestore | None = None) -> Any:
        path = directory / self._filename
        try:
            data = await storage.read_bytes(path)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"{path} does not exist: no JSON item here") from None
        _integrity.check_document(directory, self._filename, data,
                                  await _integrity.read_checksums(directory))
        return fmt.decode(data, Any, where=str(path))

    @engine_method
    async def metadata(self, directory: AnyPath) -> None:
        return None


register_with_handler(JsonCheckpointHandler, for_save=True)(JsonSave)
register_with_handler(JsonCheckpointHandler, for_restore=True)(JsonRestore)
