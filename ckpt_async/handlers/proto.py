"""ProtoCheckpointHandler: a protocol buffer message per item, in its text format
(``<item>/proto.pbtxt``, as Orbax writes it).

``protobuf`` is not a dependency of ckpt_async: whoever saves a message has it installed.
"""

from __future__ import annotations

import functools
from typing import Any

from .. import _format as fmt
from .._paths import AnyPath, coerce
from ..args import ProtoRestore, ProtoSave, register_with_handler
from ..errors import CorruptCheckpointError, InvalidArgumentError, UnsupportedLeafError
from .base import AsyncCheckpointHandler, Writer, engine_method
from .json_handler import document_writer, read_document

_DEFAULT_FILENAME = "proto.pbtxt"


def _text_format() -> Any:
    try:
        from google.protobuf import text_format
    except ImportError as exc:  # pragma: no cover - a message cannot exist without it
        raise ImportError("ProtoCheckpointHandler needs the protobuf package "
                          "(pip install protobuf)") from exc
    return text_format


@functools.cache
def _corrupt_proto_error() -> type[CorruptCheckpointError]:
    """A damaged text message's error: ckpt_async's ``CorruptCheckpointError`` and protobuf's
    ``text_format.ParseError`` (what Orbax's restore raises) at once."""
    return type("CorruptProtoError", (CorruptCheckpointError, _text_format().ParseError),
                {"__module__": __name__})


class ProtoCheckpointHandler(AsyncCheckpointHandler):
    """Saves a protocol buffer message (``ProtoSave``) in its text format, and restores it
    into a new message of the class ``ProtoRestore`` names."""

    typestr = fmt.PROTO_TYPESTR

    def __init__(self, filename: str = _DEFAULT_FILENAME, *,
                 multiprocessing_options: Any = None) -> None:
        # (multiprocessing_options: Orbax's; the primary process writes the file here)
        self._filename = filename

    async def stage(self, directory: AnyPath, args: ProtoSave) -> Writer:
        message = args.item
        try:
            # Encoding now is the snapshot: later changes to the message are not saved.
            data = _text_format().MessageToString(message).encode()
        except (AttributeError, TypeError) as exc:
            raise UnsupportedLeafError(
                f"{directory}: ProtoSave takes a protocol buffer message, not "
                f"{type(message).__name__}: {exc}") from exc

        return document_writer(directory, self._filename, data)

    @engine_method
    async def restore(self, directory: AnyPath, args: ProtoRestore | None = None) -> Any:
        if args is None or args.item is None:
            raise InvalidArgumentError(f"{directory}: restoring a protocol buffer needs its "
                                       "message class: ProtoRestore(MessageClass)")
        directory = coerce(directory)
        data = await read_document(directory, self._filename, "proto")
        path = directory / self._filename
        text_format = _text_format()
        try:
            return text_format.Parse(data.decode(), args.item())
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise _corrupt_proto_error()(
                f"{path} is not a {args.item.__name__} in text format: {exc}") from exc

    @engine_method
    async def metadata(self, directory: AnyPath) -> None:
        return None


register_with_handler(ProtoCheckpointHandler, for_save=True)(ProtoSave)
register_with_handler(ProtoCheckpointHandler, for_restore=True)(ProtoRestore)
