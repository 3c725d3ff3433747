"""The process-wide runtime: the engine's event loop, the blocking-work limiter, the sync bridge.

This is the only module that creates threads or event loops (``tests/test_runtime.py``
enforces it). One :class:`Runtime` exists per process, created lazily by :func:`get_runtime`:

- a daemon thread runs the engine's asyncio loop (an anyio blocking portal); background
  commits live on it, so they progress while the caller's thread or loop runs a training step;
- blocking work (file system calls, host copies) leaves the loop through :meth:`Runtime.to_thread`,
  bounded by one capacity limiter;
- the sync face reaches the async face through :meth:`Runtime.call`; a sync call from the engine
  loop itself raises :class:`~ckpt_async.errors.RuntimeUsageError` instead of deadlocking;
- at interpreter exit, pending commits are finished and the loop is stopped (before Python joins
  worker threads); after ``fork`` the child starts with no runtime and builds its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

from .errors import RuntimeUsageError

T = TypeVar("T")

log = logging.getLogger("ckpt_async")

#: Worker threads for blocking work (file system calls, staging copies, restores).
DEFAULT_THREADS = max(4, min(32, (os.cpu_count() or 2) * 2))


def _unwrap(exc: BaseException) -> BaseException:
    """Single-member exception groups (from task groups) become their only member."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class CommitFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A thread-safe future that is also awaitable from any asyncio loop.

    ``.result(timeout)``, ``.done()`` and ``.add_done_callback`` work from sync code;
    ``await fut`` works from any event loop (the engine's or the caller's).
    """

    def __await__(self):  # type: ignore[no-untyped-def]
        return asyncio.wrap_future(self).__await__()


class Runtime:
    """Owns the engine loop thread and the limiter for blocking work."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal(
            backend="asyncio", name="ckpt_async-engine"
        )
        self._portal = self._portal_cm.__enter__()
        self.loop: asyncio.AbstractEventLoop = self._portal.call(asyncio.get_running_loop)
        self._thread_ident = self._portal.call(threading.get_ident)
        self._limiter = self._portal.call(anyio.CapacityLimiter, threads)
        self._pending: weakref.WeakSet[concurrent.futures.Future[Any]] = weakref.WeakSet()
        # The loop holds tasks weakly only: keep every task we start until it is done, so a
        # background commit cannot be garbage-collected mid-flight.
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- where are we ---------------------------------------------------------------------------
    def on_engine_thread(self) -> bool:
        return threading.get_ident() == self._thread_ident

    # -- bridge ---------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Runs ``fn(*args, **kwargs)`` on the engine loop and blocks until it returns."""
        if self.on_engine_thread():
            raise RuntimeUsageError(
                f"sync call {getattr(fn, '__qualname__', fn)!r} made from the ckpt_async engine "
                "loop would deadlock; use the async face (ckpt_async.aio) there"
            )
        # submit() unwraps single-member groups, so the caller sees the original exception.
        return self.submit(fn, *args, **kwargs).result()

    def submit(
        self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Starts ``fn`` on the engine loop; returns a thread-safe future for its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def runner() -> None:
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                if not fut.cancelled():
                    fut.set_exception(_unwrap(exc))
            else:
                if not fut.cancelled():
                    fut.set_result(result)

        self.loop.call_soon_threadsafe(self._start_task, runner())
        return fut

    def _start_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Creates a task on the engine loop and holds it until it is done (engine loop only)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Awaits ``fn`` on the engine loop from any loop (directly when already on it)."""
        if not self.on_engine_thread():
            return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))
        try:
            return await fn(*args, **kwargs)
        except BaseExceptionGroup as group:
            exc = _unwrap(group)
            if exc is group:
                raise
        # Raised outside the handler, so the member is not chained to its group (as submit does).
        raise exc

    def spawn(self, coro: Awaitable[T]) -> CommitFuture:
        """Starts a background task on the engine loop (call from the engine loop)."""
        fut = CommitFuture()
        fut.set_running_or_notify_cancel()

        async def runner() -> None:
            try:
                result = await coro
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                fut.set_exception(_unwrap(exc))
            else:
                fut.set_result(result)

        self._start_task(runner())
        self._pending.add(fut)
        return fut

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking ``fn`` in a worker thread, bounded by the runtime's limiter."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- lifecycle ------------------------------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Finishes pending commits (``wait``) and stops the loop."""
        if self._closed:
            return
        self._closed = True
        if wait and not self.on_engine_thread():
            for fut in [f for f in self._pending if not f.done()]:
                try:
                    fut.result()
                except BaseException as exc:  # noqa: BLE001 - nobody is left to raise it to
                    log.error("a background commit failed at exit: %s", exc)
        with contextlib.suppress(BaseException):
            self._portal_cm.__exit__(None, None, None)


_runtime: Runtime | None = None
_lock = threading.Lock()


def on_engine(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Coroutine[Any, Any, T]]:
    """Decorates a coroutine method of the async face so it always runs on the engine loop,
    whichever loop awaits it (background tasks it starts must live on the engine loop)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        return await get_runtime().run(fn, *args, **kwargs)

    return wrapper


def get_runtime() -> Runtime:
    """The process's runtime, created on first use."""
    global _runtime
    rt = _runtime
    if rt is None:
        with _lock:
            if _runtime is None:
                _runtime = Runtime()
                _register_exit_hook()
            rt = _runtime
    return rt


def _shutdown_at_exit() -> None:
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        rt.shutdown(wait=True)


def _reset_after_fork() -> None:
    # The engine thread does not exist in the child: forget the parent's runtime.
    global _runtime, _lock
    _runtime = None
    _lock = threading.Lock()


def _register_exit_hook() -> None:
    """Registers :func:`_shutdown_at_exit` with threading (not atexit), so it runs before
    Python joins non-daemon worker threads (an idle worker of the running loop would otherwise
    block interpreter exit).

    Threading's exit hooks run last registered, first. ``concurrent.futures.thread`` registers
    one that refuses new work in every thread pool, the event loop's default executor included
    (aiofiles runs there); a commit still in flight would then fail at exit. Importing it first
    and registering at runtime creation puts our hook after it, so commits finish first.
    """
    import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours

    with contextlib.suppress(RuntimeError):  # "can't register atexit after shutdown"
        threading._register_atexit(_shutdown_at_exit)  # type: ignore[attr-defined]


os.register_at_fork(after_in_child=_reset_after_fork)
