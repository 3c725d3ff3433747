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


def document_writer(directory: AnyPath, filename: str, data: bytes) -> Writer:
    """The writer of an item that is one document, ``data`` at ``directory/filename``, with
    its checksum: the primary process writes it (made durable by the commit's fsync of the
    whole checkpoint)."""

    async def write() -> None:
        if current_roles().is_primary:
            await storage.write_files([
                (directory / filename, data),
                (directory / _integrity.CHECKSUMS,
                 _integrity.checksums_document({filename: data}, {}, {}))])

    return Writer(write, len(data))


async def read_document(directory: AnyPath, filename: str, kind: str) -> bytes:
    """The document of such an item, checked against its checksum where there is one;
    ``kind`` names the item in the error when it is missing."""
    path = directory / filename
    try:
        data = await storage.read_bytes(path)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{path} does not exist: no {kind} item here") from None
    _integrity.check_document(directory, filename, data,
                              await _integrity.read_checksums(directory))
    return data


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

        return document_writer(directory, self._filename, data)

    @engine_method
    async def restore(self, directory: AnyPath, args: JsonRestore | None = None) -> Any:
        data = await read_document(directory, self._filename, "JSON")
        return fmt.decode(data, Any, where=str(directory / self._filename))

    @engine_method
    async def metadata(self, directory: AnyPath) -> None:
        return None


register_with_handler(JsonCheckpointHandler, for_save=True)(JsonSave)
register_with_handler(JsonCheckpointHandler, for_restore=True)(JsonRestore)
