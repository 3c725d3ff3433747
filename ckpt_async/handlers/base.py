"""The handler interface: how one item is staged, written, restored and described.

Call order for a save, all on the engine loop: ``await handler.stage(directory, args)`` copies
the item into host memory (the only phase the caller waits for) and returns a :class:`Writer`;
``await writer.write()`` then writes every file of the item into ``directory`` in the
background, and ``await writer.finalize()`` completes it: with several processes every one of
them writes its part, and the primary alone finalizes once all have written (merging what the
processes wrote). The checkpointer makes the files durable and commits; a handler never renames.
``restore`` and ``metadata`` read a committed item.

Called from anywhere but the engine loop, the built-in handlers' ``save``, ``restore`` and
``metadata`` are Orbax's synchronous methods (:func:`engine_method`):
``ocp.PyTreeCheckpointHandler().metadata(path).tree`` works as it does with Orbax, and so does
a subclass overriding ``restore`` with a synchronous method that calls ``super().restore``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .. import _storage as storage
from .._paths import AnyPath, as_path, coerce
from .._runtime import get_runtime
from ..errors import InvalidTypeError, RuntimeUsageError, StepAlreadyExistsError

_Method = TypeVar("_Method", bound=Callable[..., Any])

#: Set while ckpt_async awaits a handler's method (:func:`call_handler`): the built-in
#: methods then give coroutines (to it, and to a subclass's ``await super().restore(...)``).
_driving: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ckpt_async_driving_handler", default=False)


async def call_handler(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Awaits a handler's ``restore`` / ``metadata`` / ``save`` on the engine loop."""
    token = _driving.set(True)
    try:
        return await method(*args, **kwargs)
    finally:
        _driving.reset(token)


def engine_method(fn: _Method) -> _Method:
    """Makes a handler's coroutine method (``fn(self, directory, ...)``) Orbax's synchronous
    method too: in a task of the engine loop, where the checkpointers (and a native
    subclass's ``await super().restore(...)``) call it, it gives the coroutine; from any
    other thread it runs there, with ``directory`` as a path (a string, a ``pathlib`` or
    ``etils`` path, an ``s3://`` URL), and returns the result. The caller's own event loop,
    if any, waits meanwhile, as for Orbax's method. Orbax-style handlers' methods never run
    on the engine loop (:class:`_OrbaxStyle`), so their calls to these get results."""

    @functools.wraps(fn)
    def method(self: Any, directory: Any, *args: Any, **kwargs: Any) -> Any:
        rt = get_runtime()
        if rt.on_engine_thread():
            if not _driving.get():  # (a done callback: nothing would await a coroutine)
                raise RuntimeUsageError(
                    f"{type(self).__name__}.{fn.__name__}() called on the ckpt_async engine "
                    "loop (a done callback) would deadlock; call it from another thread")
            return fn(self, directory, *args, **kwargs)
        if fn.__name__ in ("save", "restore"):
            args, kwargs = _as_args(self, fn.__name__, args, kwargs)
        return rt.call(call_handler, functools.partial(fn, self), as_path(directory), *args,
                       **kwargs)

    method.__engine_coroutine__ = fn  # type: ignore[attr-defined]
    return method  # type: ignore[return-value]


#: Orbax's legacy positional parameters of a handler's save and restore, after ``directory``.
_LEGACY_POSITIONALS = {"save": ("item", "save_args"),
                       "restore": ("item", "restore_args", "transforms",
                                   "transforms_default_to_original", "legacy_transform_fn")}


def _as_args(handler: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A direct ``save`` / ``restore`` call's arguments, Orbax's legacy keywords included
    (``restore(directory, item=..., restore_args=...)``, ``save(directory, item=...)``), as
    the handler's args."""
    from ..args import CheckpointArgs

    if len(args) > 1 or (args and not isinstance(args[0], CheckpointArgs)):
        names = _LEGACY_POSITIONALS[kind]  # (Orbax's parameters after ``directory``)
        if len(args) > len(names):
            raise InvalidTypeError(f"{type(handler).__name__}.{kind}() takes at most "
                                   f"{len(names) + 1} positional arguments after self "
                                   f"({len(args) + 1} given)")
        for name, value in zip(names, args, strict=False):
            if name in kwargs:
                raise InvalidTypeError(f"{type(handler).__name__}.{kind}() got multiple values for "
                                       f"argument {name!r}")
            kwargs[name] = value
        args = ()
    given = kwargs.pop("args", None) if "args" in kwargs else (args[0] if args else None)
    if isinstance(given, CheckpointArgs) or (given is None and not kwargs):
        return (given,), {}
    from .._checkpointer import make_args  # (the checkpointer imports this module)

    item = given if given is not None else kwargs.pop("item", None)
    if item is None:
        item = kwargs.pop("state", None)
    return (make_args(handler, kind, item, kwargs),), {}


def _check_place(directory: AnyPath) -> None:
    """Raises PathNotADirectoryError where ``directory`` is a file or lies under one (and
    NotWritableError where it cannot be made), as the checkpointers do for their paths."""
    if isinstance(directory, Path) and not directory.is_dir():
        from .._checkpointer import check_writable  # (the checkpointer imports this module)

        check_writable(directory)


async def _refuse_existing(handler: CheckpointHandler, directory: AnyPath, args: Any) -> None:
    """Raises, before anything is written, where a direct save of ``args`` into
    ``directory`` cannot be: PathNotADirectoryError where it is a file or lies under one,
    StepAlreadyExistsError where it would have to write over an item already there."""
    await get_runtime().to_thread(_check_place, directory)
    found = await handler.existing_item(directory, args)
    if found is not None:
        raise StepAlreadyExistsError(
            f"{directory} already holds a checkpoint item ({found} is there): "
            f"{type(handler).__name__} saves an item into a directory without one, never "
            "over one; save into another directory, or remove this one first")


def _awaitable(fn: Any) -> bool:
    """Whether calling ``fn`` on the engine loop gives an awaitable: a coroutine function, or
    an :func:`engine_method`."""
    return inspect.iscoroutinefunction(fn) or hasattr(fn, "__engine_coroutine__")


class Writer:
    """The background half of a save: ``await write()`` writes this process's part of the
    staged item; ``await finalize()`` (primary process only, after every process wrote)
    completes the item. When the save fails before ``write()`` is called (another item of a
    composite failed to stage), ``await abort()`` stops and waits for whatever ``stage``
    already started writing, so that nothing writes into the directory about to go. When
    the save lost a race to another save of the same path writing in place (an object store:
    the directory is the other's too, and stays), ``await discard()``, after ``abort()``,
    removes what is this save's own there and nothing else."""

    def __init__(self, write: Callable[[], Awaitable[None]], nbytes: int = 0,
                 arrays: int = 0, finalize: Callable[[], Awaitable[None]] | None = None,
                 abort: Callable[[], Awaitable[None]] | None = None,
                 discard: Callable[[], Awaitable[None]] | None = None) -> None:
        self._write = write
        self._finalize = finalize
        self._abort = abort
        self._discard = discard
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

    async def discard(self) -> None:
        if self._discard is not None:
            await self._discard()


class CheckpointHandler:
    """Base of every handler. Subclasses implement the coroutines below.

    A handler written to Orbax's interface instead (a subclass, or any object, with
    synchronous ``save(directory, args)`` / ``restore(directory, args)`` / ``metadata`` /
    ``finalize``, or a coroutine ``async_save`` returning futures) works too: it is driven
    through :func:`adapt` (its synchronous methods run in worker threads)."""

    #: The type string written into ``_CHECKPOINT_METADATA`` (Orbax's, for compatibility).
    typestr: ClassVar[str] = ""

    async def stage(self, directory: AnyPath, args: Any) -> Writer:
        raise NotImplementedError

    @engine_method
    async def save(self, directory: AnyPath, args: Any) -> None:
        """Orbax's ``save``: writes the item into ``directory`` (made if it is not there),
        staged, written and finalized at once. No commit: that is the checkpointer's. A
        directory already holding an item this handler would have to write over
        (:meth:`existing_item`) raises ``StepAlreadyExistsError`` before anything is written
        (Orbax's pytree handlers overwrite it in place)."""
        directory = coerce(directory)
        await _refuse_existing(self, directory, args)
        writer = await self.stage(directory, args)
        await writer.write()
        await writer.finalize()

    async def existing_item(self, directory: AnyPath, args: Any) -> AnyPath | None:
        """The file showing that ``directory`` already holds an item which a save of
        ``args`` there would have to write over, something this handler does not do; None
        where there is none (or the handler writes over it, as over a JSON document).
        :meth:`save` and :meth:`AsyncCheckpointHandler.async_save` refuse such a directory;
        the checkpointers save into new ones."""
        return None

    def finalize(self, directory: Any) -> None:
        """Orbax's ``finalize``: nothing left to do once :meth:`save` returned."""

    async def restore(self, directory: AnyPath, args: Any = None) -> Any:
        raise NotImplementedError

    async def metadata(self, directory: AnyPath) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Releases resources; the handler is not used afterwards."""


class AsyncCheckpointHandler(CheckpointHandler):
    """A handler that saves in the background (Orbax's name): every handler of ckpt_async is
    one. An Orbax-style subclass implements ``async_save(directory, args)``, a coroutine
    that starts the writes and returns futures (``.result()``) the commit waits for."""

    async def async_save(self, directory: Any, args: Any = None, **legacy: Any) -> list[Any]:
        """Orbax's ``async_save``, from any event loop: stages the item into ``directory``
        (made if it is not there) and returns one future, done once the item is written and
        finalized (no commit: that is the checkpointer's). A handler of Orbax's interface
        wrapping a built-in one awaits it so. A directory already holding an item raises
        ``StepAlreadyExistsError`` here, before anything is written, as :meth:`save` does."""
        (given,), _ = _as_args(self, "save", () if args is None else (args,), legacy)
        rt = get_runtime()

        async def start() -> Any:
            path = as_path(directory)
            await _refuse_existing(self, path, given)
            writer = await self.stage(path, given)

            async def finish() -> None:
                await writer.write()
                await writer.finalize()

            return rt.spawn(finish())

        return [await rt.run(start)]


def overrides_async_save(cls: type) -> bool:
    """Whether ``cls`` has an ``async_save`` of its own (Orbax's interface), not ours."""
    found = getattr(cls, "async_save", None)
    return found is not None and found is not AsyncCheckpointHandler.async_save


def is_native(handler: Any) -> bool:
    """Whether ``handler`` implements ckpt_async's coroutines (else Orbax's interface, or a
    subclass of ours overriding some of them with Orbax's synchronous methods)."""
    cls = type(handler)
    return (isinstance(handler, CheckpointHandler) and cls.stage is not CheckpointHandler.stage
            and all(_awaitable(getattr(cls, m)) for m in ("save", "restore", "metadata"))
            and cls.finalize is CheckpointHandler.finalize and not overrides_async_save(cls))


def class_typestr(cls: type) -> str:
    """The type string of a handler class: its ``typestr`` (a class attribute, or Orbax's
    classmethod), else its module and qualified name, as Orbax derives it."""
    given = getattr(cls, "typestr", None)
    if callable(given):
        try:
            given = given()
        except TypeError:  # (an instance method)
            given = None
    return given if isinstance(given, str) and given else f"{cls.__module__}.{cls.__qualname__}"


def typestr_of(handler: Any) -> str:
    """The type string ``_CHECKPOINT_METADATA`` records for ``handler``'s item."""
    given = getattr(handler, "typestr", None)
    if callable(given):  # (Orbax's handlers: a classmethod)
        given = given()
    return given if isinstance(given, str) and given else class_typestr(type(handler))


def adapt(handler: Any) -> CheckpointHandler:
    """``handler`` itself, or, for a handler written to Orbax's interface, one driving it."""
    return handler if is_native(handler) else _OrbaxStyle(handler)


class _OrbaxStyle(AsyncCheckpointHandler):
    """Drives a handler written to Orbax's interface: ``save`` runs while the item is staged
    (it writes then, as Orbax's synchronous handlers do), ``async_save``'s futures are
    waited for by the background write, ``finalize`` completes the item; its synchronous
    ``save``, ``restore`` and ``metadata`` run in threads of their own."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.typestr = typestr_of(inner)  # type: ignore[misc]

    async def stage(self, directory: AnyPath, args: Any) -> Writer:
        rt, inner = get_runtime(), self.inner
        finalize_override = callable(getattr(inner, "finalize", None)) and not (
            isinstance(inner, CheckpointHandler)
            and type(inner).finalize is CheckpointHandler.finalize)

        async def finalize() -> None:
            if finalize_override:
                await rt.to_own_thread(inner.finalize, directory)

        async_save = getattr(inner, "async_save", None) if overrides_async_save(type(inner)) \
            else None
        if isinstance(inner, CheckpointHandler) and type(inner).stage is not CheckpointHandler.stage \
                and _awaitable(type(inner).save) and async_save is None:
            # Ours, with some methods overridden: staged as ours, then its own finalize.
            writer = await inner.stage(directory, args)

            async def finalize_both() -> None:
                await writer.finalize()
                await finalize()

            return Writer(writer.write, writer.nbytes, writer.arrays, finalize_both, writer.abort,
                          writer.discard)
        await storage.makedirs(directory)  # (Orbax's handlers write into it)
        futures: Any = ()
        if async_save is not None and _awaitable(async_save):
            # On a loop of its own, off the engine loop: its calls to a built-in handler's
            # methods then get results, as under Orbax.
            futures = await rt.to_own_loop(async_save(directory, args=args)) or ()
        else:
            await rt.to_own_thread(inner.save, directory, args=args)

        async def write() -> None:
            for fut in futures:
                await rt.to_thread(fut.result)

        async def abort() -> None:
            # (the save failed or timed out: its futures are asked to stop, and waited for,
            # before the directory they write into is removed)
            for fut in futures:
                with contextlib.suppress(Exception):
                    if callable(getattr(fut, "cancel", None)):
                        fut.cancel()
            for fut in futures:
                with contextlib.suppress(BaseException):
                    await rt.to_thread(fut.result)

        return Writer(write, finalize=finalize, abort=abort)

    async def existing_item(self, directory: AnyPath, args: Any) -> AnyPath | None:
        if isinstance(self.inner, CheckpointHandler):  # (a subclass of ours)
            return await self.inner.existing_item(directory, args)
        return None

    async def restore(self, directory: AnyPath, args: Any = None) -> Any:
        if _awaitable(self.inner.restore):
            return await call_handler(self.inner.restore, directory, args)
        return await get_runtime().to_own_thread(self.inner.restore, directory, args=args)

    async def metadata(self, directory: AnyPath) -> Any:
        if not callable(getattr(self.inner, "metadata", None)):
            return None
        try:
            if _awaitable(self.inner.metadata):
                return await call_handler(self.inner.metadata, directory)
            return await get_runtime().to_own_thread(self.inner.metadata, directory)
        except NotImplementedError:
            return None

    def close(self) -> None:
        if callable(getattr(self.inner, "close", None)):
            self.inner.close()
