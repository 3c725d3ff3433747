"""The handler interface: how one item is staged, written, restored and described.

Call order for a save, all on the engine loop: ``await handler.stage(directory, args)`` copies
the item into host memory (the only phase the caller waits for) and returns a :class:`Writer`;
``await writer.write()`` then writes every file of the item into ``directory`` in the
background, and ``await writer.finalize()`` completes it: with several processes every one of
them writes its part, and the primary alone finalizes once all have written (merging what the
processes wrote). The checkpointer makes the files durable and commits; a handler never renames.
``restore`` and ``metadata`` read a committed item.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from .._paths import AnyPath


class Writer:
    """The background half of a save: ``await write()`` writes this process's part of the
    staged item; ``await finalize()`` (primary process only, after every process wrote)
    completes the item. When the save fails before ``write()`` is called (another item of a
    composite failed to stage), ``await abort()`` stops and waits for whatever ``stage``
    already started writing, so that nothing writes into the directory about to go."""

    def __init__(self, write: Callable[[], Awaitable[None]], nbytes: int = 0,
                 arrays: int = 0, finalize: Callable[[], Awaitable[None]] | None = None,
                 abort: Callable[[], Awaitable[None]] | None = None) -> None:
        self._write = write
        self._finalize = finalize
        self._abort = abort
        self.nbytes = nbytes
        self.arrays = arrays

    async def write(self) -> None:
        await self._write()

    async def finalize(self) -> None:
        if self._finalize is not None:
            await self._finalize()

    async def abort(self) -> None:
        if self._abort is not None:
            await self._abort()


class CheckpointHandler:
    """Base of every handler. Subclasses implement the coroutines below."""

    #: The type string written into ``_CHECKPOINT_METADATA`` (Orbax's, for compatibility).
    typestr: ClassVar[str] = ""

    async def stage(self, directory: AnyPath, args: Any) -> Writer:
        raise NotImplementedError

    async def restore(self, directory: AnyPath, args: Any = None) -> Any:
        raise NotImplementedError

    async def metadata(self, directory: AnyPath) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Releases resources; the handler is not used afterwards."""


# Orbax's name for a handler that may save asynchronously; every handler here does.
AsyncCheckpointHandler = CheckpointHandler
