"""The async checkpointer: one checkpoint at one path, staged then committed in the background.

``await save(path, args)`` plans (raises on bad input before anything is written), stages the
item into host memory, starts the background write and commit on the engine loop, and returns
its :class:`~ckpt_async._runtime.CommitFuture`. The sync faces in ``checkpointers.py`` hold one
of these and forward every call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from . import _commit, _integrity, _same_tree, multihost
from . import _format as fmt
from . import _storage as storage
from ._paths import AnyPath, StorePath, as_path
from ._runtime import (
    CommitFuture,
    PaceWindow,
    gc_paused,
    get_runtime,
    heap_frozen,
    on_engine,
    pace_window,
)
from .args import (
    CheckpointArgs,
    Composite,
    args_classes_for,
    handler_class_for,
    refuse_non_args,
    register_with_handler,
)
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    ClosedError,
    CommitError,
    CommitTimeoutError,
    HandlerError,
    InvalidArgumentError,
    NotWritableError,
    PathNotADirectoryError,
    ProcessFailedError,
    StepAlreadyExistsError,
    describe,
)
from .handlers.base import (
    CheckpointHandler,
    adapt,
    call_handler,
    is_native,
    overrides_async_save,
    typestr_of,
)
from .handlers.composite import CompositeCheckpointHandler
from .metadata import StepMetadata, step_metadata_of

log = logging.getLogger("ckpt_async")


@dataclasses.dataclass(frozen=True)
class AsyncOptions:
    """Options of background commits: ``timeout_secs`` fails a commit that takes longer."""

    timeout_secs: float | None = 1200  # (Orbax's)
    barrier_sync_fn: Any = None
    post_finalization_callback: Any = None
    create_directories_asynchronously: bool = True

    def __post_init__(self) -> None:
        # (Orbax takes them, and every commit then times out)
        if self.timeout_secs is not None and self.timeout_secs <= 0:
            raise InvalidArgumentError(
                f"AsyncOptions.timeout_secs must be a positive number of seconds or None (no "
                f"timeout), got {self.timeout_secs!r}")


def check_writable(path: AnyPath) -> None:
    """Raises before anything is written when ``path`` cannot become a checkpoint directory."""
    if isinstance(path, StorePath):
        return  # no directories to check; a denied write fails the commit, naming the key
    if path.exists() and not path.is_dir():
        raise PathNotADirectoryError(f"{path} exists and is not a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PathNotADirectoryError(
            f"cannot save to {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NotWritableError(f"cannot save to {path}: {parent} is not writable")


async def _create_tmp(path: AnyPath, clear_leftovers: bool, mode: int | None = None,
                      marker: bool = False) -> AnyPath:
    """``_commit.create_tmp``, except that an object-store prefix with objects but no commit
    marker (an unfinished save, a manager's directory, other data) is refused unless
    ``clear_leftovers``: a save writes in place there, clearing first the objects it found
    there (the prefix is listed once, here, for both). With several
    processes the primary alone decides, before any process writes there. ``mode``
    (``FileOptions.path_permission_mode``): the permissions of a local checkpoint's
    directory (0o750: not readable by others), kept by the commit's rename. ``marker``
    (Orbax's commit-file mode): a local directory at ``path`` without its commit marker is an
    unfinished save, removed first when ``clear_leftovers``."""
    clear: bool | list[str] = clear_leftovers
    if not storage.has_rename(path):
        found = await storage.listfiles(path)
        if found and not clear_leftovers:
            raise StepAlreadyExistsError(
                f"{path} holds objects but no committed checkpoint (an unfinished save, a "
                "manager's directory, other data); pass force=True to replace them")
        # Only what was found is cleared (nothing where the prefix was empty): objects there
        # now besides are another save's of this path, begun since, which a removal would cut
        # from under it, even once committed (a forced save replaces the checkpoint it found,
        # not one made during it); the race for the item decides between them.
        clear = found if clear_leftovers else False
    tmp = await _commit.create_tmp(path, clear=clear, marker=marker)
    if mode is not None and isinstance(tmp, Path):  # (masked by the umask, as mkdir's mode)
        await get_runtime().to_thread(os.chmod, tmp, mode & ~_umask())
    return tmp


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it, for every
    thread, while it reads it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def make_args(handler: CheckpointHandler, kind: str, item: Any, kwargs: dict,
              where: Any = None) -> CheckpointArgs:
    """Orbax's legacy call style ``save(path, item, save_args=...)`` as args for ``handler``;
    ``where``: the checkpoint's path, named in errors."""
    if isinstance(item, type) and issubclass(item, CheckpointArgs):  # (args=StandardSave)
        refuse_non_args(item, kind, str(where) if where is not None else
                        f"{type(handler).__name__}.{kind}()")
    cls = args_classes_for(type(handler)).get(kind)
    if cls is None:
        raise InvalidArgumentError(f"{type(handler).__name__} needs explicit args= for {kind}")
    if kind == "save":
        return cls(item, **kwargs)
    if "target" in kwargs:
        kwargs["item"] = kwargs.pop("target")
    return cls(item, **kwargs) if item is not None else cls(**kwargs)


class LegacyArgs(CheckpointArgs):
    """The arguments of a checkpointer's ``save`` or ``restore`` for a handler with no args
    registered (:class:`LegacyHandlerWrapper`), handed to its methods as they were given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


class LegacyHandlerWrapper(CheckpointHandler):
    """A handler written to Orbax's older interface, with no args registered for it
    (``save(directory, item, extra_args)``, ``restore(directory, item=None, ...)``), as a
    checkpointer holds it, as Orbax's does: ``ckptr.save(path, item, extra)`` calls the
    handler's ``save(directory, item, extra)``, ``ckptr.restore(path)`` its
    ``restore(directory)``. The step records Orbax's type string of its wrapper. A
    CheckpointHandler of Orbax's interface (synchronous methods, driven through
    :func:`~.handlers.base.adapt`), so that a manager takes the checkpointer's handler as an
    item's (Orbax's older ``CheckpointManager(directory, checkpointers)``)."""

    typestr: ClassVar[str] = ("orbax.checkpoint._src.handlers.composite_checkpoint_handler."
                              "_LegacyCheckpointHandlerWrapper")

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    @staticmethod
    def of(handler: Any) -> LegacyHandlerWrapper:
        """The wrapper of ``handler``: one with ``async_save`` if it has one of its own."""
        cls = AsyncLegacyHandlerWrapper if overrides_async_save(type(handler)) else \
            LegacyHandlerWrapper
        return cls(handler)

    @staticmethod
    def _split(args: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args is None:
            return (), {}
        return (args.args, args.kwargs) if isinstance(args, LegacyArgs) else ((args,), {})

    def save(self, directory: Any, args: Any = None) -> Any:  # type: ignore[override]
        a, kw = self._split(args)
        return self.handler.save(directory, *a, **kw)

    def restore(self, directory: Any, args: Any = None) -> Any:  # type: ignore[override]
        a, kw = self._split(args)
        return self.handler.restore(directory, *a, **kw)

    def metadata(self, directory: Any) -> Any:  # type: ignore[override]
        method = getattr(self.handler, "metadata", None)
        return method(directory) if callable(method) else None

    def finalize(self, directory: Any) -> None:
        method = getattr(self.handler, "finalize", None)
        if callable(method):
            method(directory)

    def close(self) -> None:
        method = getattr(self.handler, "close", None)
        if callable(method):
            method()


class AsyncLegacyHandlerWrapper(LegacyHandlerWrapper):
    """:class:`LegacyHandlerWrapper` of a handler with an ``async_save``, which it calls."""

    typestr: ClassVar[str] = ("orbax.checkpoint._src.handlers.composite_checkpoint_handler."
                              "_AsyncLegacyCheckpointHandlerWrapper")

    async def async_save(self, directory: Any, args: Any = None) -> Any:
        a, kw = self._split(args)
        return await self.handler.async_save(directory, *a, **kw)


register_with_handler(LegacyHandlerWrapper, for_save=True, for_restore=True)(LegacyArgs)


def _needs_legacy_wrapper(handler: Any) -> bool:
    """Whether ``handler`` is one of Orbax's interface with no save and restore args
    registered for it (Orbax's checkpointers then wrap it, passing arguments through)."""
    pair = args_classes_for(type(handler))
    return not is_native(handler) and not isinstance(handler, (
        CompositeCheckpointHandler, LegacyHandlerWrapper)) and not (
        "save" in pair and "restore" in pair)


def _record_statistics(meta: fmt.StepMetadata, stats: dict[str, Any], t_write: float,
                       t_wait: float) -> dict[str, Any]:
    """Puts Orbax's fields into the step metadata; returns our figures (for ``_CKPT_ASYNC``)."""
    now = time.perf_counter()
    meta.performance_metrics = {  # the fields Orbax knows, so it reads them back
        "checkpointer_blocking_duration_secs": float(stats["blocking_secs"]),
        "wait_for_prev_duration_secs": float(now - t_wait),
    }
    write = t_wait - t_write
    return {
        "bytes": stats["bytes"], "arrays": stats["arrays"],
        "blocking_secs": stats["blocking_secs"], "write_secs": write,
        "wait_for_previous_secs": now - t_wait,
        "staged_to_written_secs": t_wait - stats["started"],
        "write_bytes_per_sec": stats["bytes"] / write if write > 0 else None,
    }


async def _committed(directory: Any, marker: bool = False) -> AnyPath:
    """``directory`` as a path, once it is known to hold a committed checkpoint: not there
    raises CheckpointNotFoundError; the temporary directory of a save that did not finish (or
    has not yet), or with ``marker`` (Orbax's commit-file mode) a local directory without its
    commit marker, InvalidArgumentError (Orbax: "Found incomplete checkpoint")."""
    path = as_path(directory)
    if _commit.is_tmp_name(path.name):
        raise InvalidArgumentError(
            f"{path} is the temporary directory of a save that has not finished (or never "
            "will): not a checkpoint to restore")
    if marker and await _commit.is_visible(path) and not await _commit.is_visible(path, marker):
        raise InvalidArgumentError(
            f"{path} is an incomplete checkpoint: it has no {fmt.COMMIT_SUCCESS} (a save that "
            "did not finish, in the commit-file mode its options name)")
    if not await _commit.is_visible(path):
        if await storage.is_file(path):  # (it said the checkpoint did not exist)
            raise InvalidArgumentError(f"{path} is a file, not a checkpoint directory")
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    return path


@contextlib.asynccontextmanager
async def reading(path: AnyPath, what: str,
                  error: type[CheckpointNotFoundError] = CheckpointNotFoundError) -> Any:
    """Around a read of the checkpoint at ``path`` (``what`` names it): a read that fails
    because the checkpoint was deleted meanwhile (by another manager's retention or
    ``delete``: an evaluator reading the steps a trainer retires) raises ``error`` saying so,
    rather than the missing file, or the damaged-looking checkpoint, that it met; one that
    fails because the checkpoint was replaced meanwhile (a forced save of the same path)
    raises :class:`CheckpointReplacedError`."""
    before = _identity(path)
    try:
        yield
    except Exception as exc:
        if getattr(exc, "deleted_while_read", False):  # (an inner read said so already)
            if isinstance(exc, error):
                raise
            cause = exc.__cause__ or exc
        elif not await _gone(path):
            if isinstance(exc, CheckpointReplacedError) or before is None or (
                    _identity(path) in (None, before)):
                raise
            raise CheckpointReplacedError(
                f"{what} was replaced (by a forced save) while it was being read; read it "
                f"again for the new one: {exc}") from exc
        else:
            cause = exc
        deleted = error(f"{what} was deleted while it was being read (by another manager's "
                        f"retention or delete, or another process): {cause}")
        deleted.deleted_while_read = True  # type: ignore[attr-defined]
        raise deleted from cause


def _save_failed(exc: CheckpointError, path: AnyPath) -> CheckpointError:
    """A commit's failure that the storage reported about its temporary directory (removed by
    now: the error names the checkpoint the save was for first), or as a plain
    CheckpointError (an object store's listing or read: the commit failed, CommitError)."""
    cls = CommitError if type(exc) is CheckpointError else type(exc)
    return cls(f"saving {path} failed: {exc}")


def _identity(path: AnyPath) -> tuple[int, int] | None:
    """Which directory a local ``path`` names now (a replacing save renames another one in
    its place); None on an object store or when it cannot be told."""
    if not storage.has_rename(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def _gone(path: AnyPath) -> bool:
    """Whether the checkpoint at ``path`` is no longer there (False when that cannot be told:
    the read's own error then stands)."""
    try:
        return not await _commit.is_visible(path)
    except Exception:  # noqa: BLE001 - the caller raises the read's error instead
        return False


#: How long a commit that failed or timed out waits for its writer's abort (the writes it
#: started, a handler's futures, asked to stop), and then for the removal of its temporary
#: directory, at most (and at most its ``timeout_secs``, or ABORT_GRACE_MIN_SECS if that is
#: more): a disk or store that stopped answering must not hold the failure there. (Writes
#: that were only cancelled end within a second or so: stopped any sooner, TensorStore's
#: writes of a commit timed out after 0.05 s recreated its directory after its removal.)
ABORT_GRACE_SECS = 30.0
ABORT_GRACE_MIN_SECS = 5.0


class AsyncCheckpointer:
    """Saves and restores one checkpoint at one path with ``handler``; coroutines throughout.

    >>> ckptr = AsyncCheckpointer(StandardCheckpointHandler())       # doctest: +SKIP
    >>> fut = await ckptr.save('/tmp/ckpt', args=StandardSave(state)) # staged; commit runs on
    >>> await fut                                                     # durable and visible
    """

    def __init__(self, handler: CheckpointHandler, *, async_options: AsyncOptions | None = None,
                 multiprocessing_options: Any = None, **_orbax_options: Any) -> None:
        if not isinstance(handler, CheckpointHandler) and not all(
                callable(getattr(handler, m, None)) for m in ("save", "restore")):
            raise InvalidArgumentError(
                f"{handler!r} is not a CheckpointHandler: neither ckpt_async's nor one with "
                "Orbax's save and restore methods")
        if _needs_legacy_wrapper(handler):  # (duck-typed, as any handler of Orbax's interface)
            handler = LegacyHandlerWrapper.of(handler)
        self.handler = handler
        self._dir_mode: int | None = getattr(_orbax_options.get("file_options"),
                                             "path_permission_mode", None)
        #: Orbax's commit-file mode (``temporary_path_class=CommitFileTemporaryPath`` or
        #: ``atomicity_options``): a local checkpoint counts once its ``commit_success.txt``
        #: is there (this library's saves still rename, and write it).
        self._marker = _commit.requires_marker(_orbax_options.get("temporary_path_class"),
                                               _orbax_options.get("atomicity_options"))
        self.async_options = async_options or AsyncOptions()
        self.multiprocessing_options = multiprocessing_options
        self._pending: list[CommitFuture] = []
        #: Each commit's cancel request, which it checks where nothing it started is running
        #: (once set by :meth:`cancel`, its CancelledError is not a failure to report).
        self._cancel_requests: weakref.WeakKeyDictionary[CommitFuture, threading.Event] = (
            weakref.WeakKeyDictionary())
        #: Every commit of ours in flight, the manager's untracked ones too, each let go as it
        #: ends (:meth:`hurry` walks these, not every commit a manager still holds).
        self._in_flight: set[CommitFuture] = set()
        #: Where each commit in flight writes (a later save there waits for it).
        self._pending_paths: weakref.WeakKeyDictionary[CommitFuture, AnyPath] = (
            weakref.WeakKeyDictionary())
        #: Each path a save of ours is under way to, until its commit is among ``_pending``:
        #: [a lock the saves there take in turn, how many hold it or wait for it].
        self._saving_to: dict[AnyPath, list[Any]] = {}
        self._closed = False  # (refuses new saves and restores; set once close() begins)
        self._close_done = False  # (close() has waited for every commit)
        self._last_save: float | None = None  # (monotonic) when _save_staged last started
        self._window: PaceWindow | None = None  # how long its commit may be paced

    # -- save -----------------------------------------------------------------------------------
    def _check_args(self, args: CheckpointArgs, directory: AnyPath) -> None:
        cls = handler_class_for(args)
        if cls is None or not isinstance(self.handler, cls):
            raise HandlerError(
                f"{directory}: {type(args).__name__} cannot be saved by "
                f"{type(self.handler).__name__}")

    @on_engine
    async def save(self, directory: Any, args: CheckpointArgs | None = None, *items: Any,
                   force: bool = False, custom_metadata: dict | None = None,
                   **legacy: Any) -> CommitFuture:
        """Stages the item and starts its commit; returns the commit's future."""
        self._check_open("save to", directory)
        self.check_for_errors()
        path = as_path(directory)
        if isinstance(self.handler, LegacyHandlerWrapper) and not isinstance(
                args, CheckpointArgs):  # (the arguments go to the handler as they are)
            args = LegacyArgs(*(() if args is None else (args,)), *items, **legacy)
        for name in ("item", "state"):  # (Orbax's legacy keywords for the item itself)
            if args is None and not items and name in legacy:
                items = (legacy.pop(name),)
        if args is None or not isinstance(args, CheckpointArgs):
            args = make_args(self.handler, "save", args if args is not None else
                             (items[0] if items else None), legacy, path)
        self._check_args(args, path)
        if custom_metadata is not None:
            fmt.require_json(custom_metadata, f"saving {path}: custom_metadata")

        async def precheck() -> None:
            self.check_for_errors()
            await get_runtime().to_thread(check_writable, path)
            if await _commit.is_visible(path) and not force:
                raise StepAlreadyExistsError(
                    f"{path} already exists; pass force=True to overwrite it")

        # A save to where another of ours is under way waits for it, staging and commit (as
        # Orbax's waits for every previous save): otherwise a forced one cleared an
        # object-store prefix the other was writing, two forced ones committed in the order
        # their writes ended, and an unforced one failed only at its commit.
        entry = self._saving_to.setdefault(path, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                for fut in [f for f in self._pending if self._pending_paths.get(f) == path]:
                    await self._outcome(fut)  # (its failure: check_for_errors, in precheck)
                return await self._save_staged(
                    path, args, force=force, custom_metadata=custom_metadata,
                    clear_leftovers=force, precheck=precheck)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._saving_to[path]

    @on_engine
    async def _save_staged(self, path: AnyPath, args: CheckpointArgs, *, force: bool = False,
                          custom_metadata: dict | None = None,
                          step_metadata: fmt.StepMetadata | None = None,
                          on_commit: Any = None, after: Any = None,
                          track: bool = True, clear_leftovers: bool = True,
                          precheck: Callable[[], Awaitable[None]] | None = None,
                          what: str | None = None) -> CommitFuture:
        """The save pipeline (used by the manager too): tmp dir, stage, background commit.

        ``after`` (an earlier commit's future) is waited for before the commit, so commits
        land in order;
        ``on_commit(path, meta)`` runs once the checkpoint is visible. ``track=False`` leaves
        the future to the caller (the manager tracks its own) instead of ``wait_until_finished``.
        ``clear_leftovers=False``: an object-store prefix holding objects but no committed
        checkpoint is refused rather than cleared (the manager clears its unfinished steps).
        ``precheck``: what must hold before anything is written (an earlier commit's failure
        to raise, a writable directory, no such checkpoint yet); with several processes, what
        fails on one fails the save on every one, at once (:meth:`_start`). ``what``: the
        commit, as its failure is logged if nobody retrieves it (default: its path).
        """
        init_ns = time.time_ns()
        t0 = time.perf_counter()
        roles = multihost.roles_for(self.multiprocessing_options)
        sync = multihost.Sync(f"save:{path}", roles, self.async_options.timeout_secs,
                              getattr(self.multiprocessing_options, "barrier_sync_key_prefix",
                                      None), label=f"saving {path}") if roles.multi else None
        token = multihost.use_roles(roles)  # the handlers read it; tasks spawned here copy it
        window = self._pace_window()
        pace_token = pace_window.set(window)
        # Objects kept out of collections while the commit runs (``heap_frozen``): frozen
        # before the collector resumes, so that what the blocking part allocated is frozen
        # with the rest, not traversed by a collection at once (4-10 ms for 4,096 arrays).
        frozen = contextlib.ExitStack()
        fut: CommitFuture | None = None

        async def abandon(tmp: AnyPath, exc: BaseException) -> None:
            """Gives the save up once its directory exists: the others told, it removed."""
            if sync is not None:  # the others must not wait for this process's part
                await sync.arrive("written", exc)
            if sync is None or roles.is_primary:
                await _commit.abort(tmp)

        try:
            starting = asyncio.ensure_future(self._start(path, args, sync, clear_leftovers,
                                                         precheck))
            try:
                tmp = await asyncio.shield(starting)
            except asyncio.CancelledError as exc:
                # The directory is made in a thread, which a cancelled caller does not stop:
                # once the start has ended, what it made is removed (else a cancelled save
                # could leave its temporary directory behind until the next manager opened).
                started = (await asyncio.gather(starting, return_exceptions=True))[0]
                if not isinstance(started, BaseException):
                    await abandon(started, exc)
                raise
            try:
                with gc_paused():  # no full collection in the middle of the blocking part
                    writer = await adapt(self.handler).stage(tmp, args)
                    frozen.enter_context(heap_frozen())
            except BaseException as exc:
                if isinstance(exc, CheckpointError) and exc.args and isinstance(exc.args[0], str):
                    # (named as the caller, and the other processes, know it: the temporary
                    # directory is gone)
                    exc.args = (exc.args[0].replace(str(tmp), str(path)), *exc.args[1:])
                await abandon(tmp, exc)
                raise
            meta = step_metadata or fmt.StepMetadata()
            meta.init_timestamp_nsecs = meta.init_timestamp_nsecs or init_ns
            meta.item_handlers = self._item_handlers()
            if custom_metadata is not None:
                meta.custom_metadata = custom_metadata
            item_dirs = ([tmp / n for n, a in args.items() if a is not None]
                         if isinstance(args, Composite) else [])
            stats = {"bytes": writer.nbytes, "arrays": writer.arrays,
                     "blocking_secs": time.perf_counter() - t0, "started": t0}
            cancel_request = threading.Event()
            fut = get_runtime().spawn(self._finish(
                writer, tmp, path, meta, item_dirs, force, on_commit, after, stats, sync,
                cancel_request), what or f"the commit of {path}")
            self._cancel_requests[fut] = cancel_request
            self._in_flight.add(fut)
            fut.on_settle(functools.partial(self._let_go, fut))
            if (timeout := self.async_options.timeout_secs) is not None:
                # Half its time gone: raised to the normal priority for the rest, so that
                # processes keeping every core busy cannot make it time out.
                get_runtime().boost_after(fut, timeout / 2)
            fut.add_done_callback(lambda _: frozen.close())
            fut.add_done_callback(lambda _: window.close())  # (nothing left to pace or hurry)
        finally:
            if fut is None:
                frozen.close()
                if sync is not None:  # (the save ended here: this process is done with it)
                    await sync.leave()
            pace_window.reset(pace_token)
            multihost.reset_roles(token)
        if track:
            self._pending.append(fut)
            self._pending_paths[fut] = path
        return fut

    def _let_go(self, fut: CommitFuture, _exc: BaseException | None) -> None:
        """A commit has ended (engine loop, before anyone waiting learns it): no longer in
        flight."""
        self._in_flight.discard(fut)

    def hurry(self) -> None:
        """Writes this checkpointer's commit in flight at full speed from now on: its pace
        window closes, as the next save would close it, and its held batches go at once (any
        thread). The sync faces call it when the thread that saved waits for the commit
        (``wait_until_finished``, ``restore``, ``close``, a synchronous save): that thread is
        not training then. (Another thread waiting proves nothing: the benchmark's training
        loop runs while a helper thread waits.) Left to the CPU measure, a paced commit went
        back to full speed only once its average had decayed, ~0.2 s after the caller
        stopped: the first save of a process that had just built its state stalled that long
        after its first batch (quick ``mixed``, 1 process in 2: 240 against 95 ms). Its
        threads run at the normal priority until it is done (``Runtime.boost``)."""
        rt = get_runtime()
        if self._window is not None and self._window.open():  # (closed once it is done)
            self._window.close()
            rt.loop.call_soon_threadsafe(rt.wake_paced)
        # (and at the normal CPU priority until done; a copy: the engine loop lets them go)
        for fut in list(self._in_flight):
            rt.boost(fut)

    def _pace_window(self) -> PaceWindow:
        """How long this save's commit may be paced (``_runtime.pace_window``): half its
        timeout, so that pacing never times it out, and half the time since the previous
        save, so that it is done before the next save, likely as far off. That next save
        ends the window of the commit before it at once."""
        now = time.monotonic()
        spans = [t / 2 for t in (self.async_options.timeout_secs,
                                 None if self._last_save is None else now - self._last_save)
                 if t is not None]
        if self._window is not None:
            self._window.close()
        self._last_save = now
        self._window = PaceWindow(now + min(spans) if spans else None)
        return self._window

    async def _start(self, path: AnyPath, args: CheckpointArgs, sync: multihost.Sync | None,
                     clear_leftovers: bool,
                     precheck: Callable[[], Awaitable[None]] | None) -> AnyPath:
        """Where this save writes: the temporary directory, created by the primary process
        and announced to the others. With several processes, every one first says whether
        its ``precheck`` passed: one that failed raises its error, the others a
        ProcessFailedError naming it, before anything is written (and the operations of each
        path stay in step across processes for the next save). They bring their tree's
        digest too: trees that differ are refused on every process (StructureMismatchError,
        naming the first leaf that differs), before anything is written."""
        failed: BaseException | None = None
        tree: list[str] = []
        try:
            if precheck is not None:
                await precheck()
            if sync is not None:
                tree = _same_tree.describe(args)
        except Exception as exc:  # noqa: BLE001 - raised below, once the others know
            failed = exc
        if sync is not None:
            digests = await sync.arrive("ready", failed, note=_same_tree.digest(tree))
            if failed is None:
                await _same_tree.agree(sync, tree, digests)
        if failed is not None:
            raise failed
        if sync is None:
            return await _create_tmp(path, clear_leftovers, self._dir_mode, self._marker)
        if sync.roles.is_primary:
            try:
                tmp = await _create_tmp(path, clear_leftovers, self._dir_mode, self._marker)
            except BaseException as exc:
                await sync.broadcast("tmp", f"error:{exc}")
                raise
            await sync.broadcast("tmp", f"ok:{tmp}")
            return tmp
        answer = await sync.broadcast("tmp")
        if answer.startswith("error:"):
            raise ProcessFailedError(f"{path}: primary process {sync.roles.primary} could not "
                                     f"start the save: {answer[6:]}")
        return as_path(answer[3:])

    def _item_handlers(self) -> Any:
        if isinstance(self.handler, CompositeCheckpointHandler):
            return dict(getattr(self.handler, "last_item_handlers", {}))
        return typestr_of(self.handler)

    async def _finish(self, writer: Any, tmp: AnyPath, path: AnyPath, meta: fmt.StepMetadata,
                      item_dirs: list[AnyPath], force: bool, on_commit: Any, after: Any,
                      stats: dict[str, Any], sync: multihost.Sync | None = None,
                      cancel_request: threading.Event | None = None) -> AnyPath:
        primary = sync is None or sync.roles.is_primary

        def check_cancel() -> None:
            """:meth:`cancel`: dropped here, where nothing this commit started is running."""
            if cancel_request is not None and cancel_request.is_set():
                raise concurrent.futures.CancelledError(
                    f"the save of {path} was cancelled; nothing was committed")

        # Orbax's AsyncOptions.post_finalization_callback: called on every process once its
        # part is written (the primary's finalized), before the step is committed; raising
        # fails the save, and nothing is committed.
        callback = self.async_options.post_finalization_callback
        callback_failure: list[BaseException] = []

        async def call_back() -> None:
            try:
                await get_runtime().to_own_thread(callback)
            except BaseException as exc:
                exc.add_note(f"(raised by the post_finalization_callback of the save of {path}; "
                             "nothing was committed)")
                callback_failure.append(exc)
                raise

        async def run() -> None:
            t_write = time.perf_counter()
            if sync is None:
                await writer.write()
                check_cancel()
            else:  # every process writes its part, then they meet; any failure stops them all
                try:
                    await writer.write()
                    check_cancel()
                    if callback is not None and not primary:
                        await call_back()
                except BaseException as exc:
                    await sync.arrive("written", exc)
                    raise
                await sync.arrive("written")
            t_wait = time.perf_counter()
            if after is not None:
                # (its failure is its owner's to report: ended() does not raise it; this
                # commit's timeout, landing here, does stop this commit)
                await after.ended()
            if primary:
                try:
                    check_cancel()
                    await writer.finalize()
                    if callback is not None:
                        await call_back()
                    figures = _record_statistics(meta, stats, t_write, t_wait)
                    check_cancel()
                    await _commit.commit(tmp, path, meta, item_dirs, replace=force,
                                         statistics=figures)
                except BaseException as exc:
                    if sync is not None:
                        await sync.arrive("committed", exc)
                    raise
            if sync is not None:  # nobody's save returns before the step is visible
                await sync.arrive("committed")

        timeout = self.async_options.timeout_secs
        try:
            # With several processes the barriers time out first, naming who is missing.
            await asyncio.wait_for(run(), None if timeout is None else
                                   timeout * (1 if sync is None else 1.5))
        except BaseException as exc:
            # (a commit that timed out was cancelled mid-write: what it started is waited
            # for, a while, before its directory goes; a failed or dropped one has ended. A
            # while: no longer than the commit's own timeout, or ABORT_GRACE_MIN_SECS)
            grace = ABORT_GRACE_SECS if timeout is None else min(
                ABORT_GRACE_SECS, max(timeout, ABORT_GRACE_MIN_SECS))
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer.abort(), grace)
            # In place, on an object store, a save that lost the race for an item's database
            # to another save of this path (on any process: the barriers say so on every one)
            # leaves that one's objects alone: each process removes only its own.
            lost = isinstance(exc, StepAlreadyExistsError) and tmp == path
            if lost:
                try:
                    await asyncio.wait_for(writer.discard(), grace)
                except Exception as failure:  # noqa: BLE001 - the lost race is the error
                    log.warning("saving %s: this process's own files were not all removed "
                                "after the lost race: %s", path, describe(failure))
            if primary and not lost:  # (shielded: a longer removal goes on in the background)
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(_commit.abort(tmp), grace)
            if isinstance(exc, concurrent.futures.CancelledError):
                raise  # (cancel(): nothing was committed, and what was written is gone)
            if callback_failure and exc is callback_failure[0]:
                raise  # (the caller's own exception, as Orbax raises it)
            if isinstance(exc, TimeoutError | asyncio.TimeoutError) and \
                    not isinstance(exc, CheckpointError):
                raise CommitTimeoutError(
                    f"commit of {path} did not finish within {timeout} s") from exc
            if isinstance(exc, CheckpointError):
                if type(exc) is CheckpointError or (tmp != path and str(tmp) in str(exc)):
                    raise _save_failed(exc, path) from exc
                raise
            if sync is not None and not primary and isinstance(exc, OSError) and \
                    not await storage.exists(tmp):
                raise ProcessFailedError(
                    f"saving {path}: primary process {sync.roles.primary} abandoned the save "
                    "while this process was still writing (its barrier timed out, or another "
                    f"process failed), and removed {tmp}: {exc}") from exc
            raise CommitError(f"saving {path} failed: {describe(exc)}") from exc
        finally:
            if sync is not None:  # (done with the save's keys, whatever its outcome)
                await sync.leave()
        if on_commit is not None:
            await on_commit(path, meta)
        total = time.perf_counter() - stats["started"]
        log.info("committed %s: %d arrays, %.1f MiB, save() blocked %.1f ms, durable after %.3f s "
                 "(%.0f MiB/s)", path, stats["arrays"], stats["bytes"] / 2**20,
                 stats["blocking_secs"] * 1e3, total, stats["bytes"] / 2**20 / max(total, 1e-9))
        return path

    # -- waiting --------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancels every commit of this checkpointer still in flight (Orbax's ``cancel``;
        any thread): each is dropped instead of committed, at the first point where nothing
        it started is still running (once the writes under way have ended; a commit already
        renaming its directory into place is past it, and commits). A dropped commit never
        becomes visible and its temporary directory is removed; its future ends cancelled
        (``cancelled()``; ``result()`` raises ``concurrent.futures.CancelledError``), and
        :meth:`wait_until_finished` waits for it and reports nothing of it. With several
        processes, call it on every process: a commit one process drops fails on the
        others."""
        for fut in list(self._pending):
            request = self._cancel_requests.get(fut)
            if request is not None and not fut.done():
                request.set()

    def _failure(self, fut: CommitFuture, exc: BaseException | None) -> BaseException | None:
        """A finished commit's error to report: none for one :meth:`cancel` cancelled."""
        request = self._cancel_requests.get(fut)
        if request is not None and request.is_set() and \
                isinstance(exc, concurrent.futures.CancelledError):
            return None
        return exc

    async def _outcome(self, fut: CommitFuture) -> BaseException | None:
        """Waits for a commit of ours; returns its error to report (:meth:`_failure`). The
        cancellation of the waiting task itself is raised (it leaves the commit running)."""
        try:
            await fut
        except asyncio.CancelledError:  # (asyncio's name for a cancelled commit's too)
            task = asyncio.current_task()
            if not fut.done() or (task is not None and task.cancelling()):
                raise
            return self._failure(fut, fut.cancelled_error())
        except Exception as exc:  # noqa: BLE001 - given to the caller
            return self._failure(fut, exc)
        return None

    async def _saved_before(self, directory: Any) -> None:
        """Waits for the saves to ``directory`` under way, called before this call (their
        commits are then pending): ``asyncio.gather(save(p), restore(p))`` reads what the
        save wrote, rather than finding nothing there yet. (Saves to a path take its lock in
        turn: those called later wait.)"""
        entry = self._saving_to.get(as_path(directory))
        if entry is not None:
            async with entry[0]:
                pass

    @on_engine
    async def wait_until_finished(self) -> None:
        """Waits for every pending commit; raises the first failure."""
        errors = []
        for fut in list(self._pending):
            if (failure := await self._outcome(fut)) is not None:
                errors.append(failure)
            with contextlib.suppress(ValueError):  # (or taken by check_for_errors meanwhile)
                self._pending.remove(fut)
        if errors:
            raise errors[0]

    def check_for_errors(self) -> None:
        """Raises the error of a finished, failed commit (once), without waiting."""
        for fut in list(self._pending):
            if fut.done():
                try:
                    self._pending.remove(fut)
                except ValueError:  # (wait_until_finished took it meanwhile, and reports it)
                    continue
                exc = self._failure(fut, fut.cancelled_error() if fut.cancelled() else
                                    fut.exception())
                if exc is not None:
                    raise exc

    def is_saving_in_progress(self) -> bool:
        """Whether any commit started by this checkpointer is still in flight."""
        return any(not f.done() for f in self._pending)

    # -- restore --------------------------------------------------------------------------------
    @on_engine
    async def restore(self, directory: Any, args: CheckpointArgs | None = None, *items: Any,
                      **legacy: Any) -> Any:
        """Restores the checkpoint at ``directory`` (after pending saves finish)."""
        self._check_open("restore", directory)
        await self._saved_before(directory)
        await self.wait_until_finished()  # a restore sees every save issued before it
        path = await _committed(directory, self._marker)
        if args is not None and not isinstance(args, CheckpointArgs):
            items, args = (args, *items), None
        if isinstance(self.handler, LegacyHandlerWrapper) and args is None:
            args = LegacyArgs(*items, **legacy)  # (the arguments go to the handler as they are)
        if args is None and (items or legacy):
            args = make_args(self.handler, "restore", items[0] if items else None, legacy,
                             path)
        async with reading(path, f"checkpoint {path}"):
            return await call_handler(adapt(self.handler).restore, path, args)

    @on_engine
    async def metadata(self, directory: Any) -> StepMetadata:
        """Step metadata of ``directory``, with its items' metadata (no arrays are read)."""
        await self._saved_before(directory)
        await self.wait_until_finished()
        path = await _committed(directory, self._marker)
        async with reading(path, f"checkpoint {path}"):
            found, ext = await _integrity.read_step_metadata(path)
            try:
                item_metadata = await self._item_metadata(path)
            except CheckpointNotFoundError:
                if found is None or await _gone(path):
                    raise
                # A checkpoint, but none of this handler's (a manager's step of several
                # items, each in its folder): no item metadata, as Orbax answers.
                item_metadata = None
        return step_metadata_of(found, ext, item_metadata)

    async def _item_metadata(self, path: AnyPath) -> Any:
        """The handler's item metadata: a composite handler's (whose ``metadata`` gives the
        whole step's, as Orbax's) is its items'."""
        if type(self.handler).metadata is CompositeCheckpointHandler.metadata:
            assert isinstance(self.handler, CompositeCheckpointHandler)
            return await call_handler(self.handler.items_metadata, path)
        found = await call_handler(adapt(self.handler).metadata, path)
        return found.item_metadata if isinstance(found, StepMetadata) else found

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_open(self, call: str, directory: Any) -> None:
        if self._closed:
            raise ClosedError(f"cannot {call} {directory}: this checkpointer is closed")

    @on_engine
    async def close(self) -> None:
        """Waits for pending commits, then closes; raises a commit's failure. Interrupted
        while it waits (its caller cancelled, Ctrl-C on the sync face), it refuses new saves
        already, and the next ``close()`` waits for the commits still in flight."""
        if self._close_done:
            return
        self._closed = True
        try:
            await self.wait_until_finished()
        except asyncio.CancelledError:
            raise  # (interrupted: not closed yet)
        except BaseException:
            self._close_handler()
            raise
        self._close_handler()

    def _close_handler(self) -> None:
        if self._close_done:  # (two close() calls at once: both waited; the handler closes once)
            return
        self._close_done = True
        self.handler.close()

    async def __aenter__(self) -> AsyncCheckpointer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
