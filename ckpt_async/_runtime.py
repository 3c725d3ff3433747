"""The process-wide runtime: the engine's event loop, the blocking-work limiter, the sync bridge.

This is the only module that creates threads or event loops (``tests/test_runtime.py``
enforces it). One :class:`Runtime` exists per process, created lazily by :func:`get_runtime`:

- a daemon thread runs the engine's asyncio loop (an anyio blocking portal); background
  commits live on it, so they progress while the caller's thread or loop runs a training step;
- blocking work (file system calls, host copies) leaves the loop through :meth:`Runtime.to_thread`,
  bounded by one capacity limiter (a restore's reads of data files by one of their own,
  :meth:`Runtime.to_read_thread`); called from background work (a task that ran
  :func:`mark_background`, such as a commit), it runs in the background pool instead, whose
  threads run at the background CPU priority (:func:`set_background_priority`), as do
  TensorStore's I/O threads once a commit ran;
- the Python part of a commit's writes runs on a second loop, in its own thread at the
  background priority (:meth:`Runtime.in_background_loop`);
- the sync face reaches the async face through :meth:`Runtime.call`; a sync call from the engine
  loop itself raises :class:`~ckpt_async.errors.RuntimeUsageError` instead of deadlocking;
- at interpreter exit (once the main thread has finished), the calls in flight (from
  threads other than daemon threads) and the pending commits are finished and the loop is
  stopped, before Python joins worker threads; from then
  on a call from a thread still running is refused with a
  :class:`~ckpt_async.errors.RuntimeUsageError` (Python's thread pools refuse new work then
  too), rather than left waiting on a stopped loop; after ``fork`` the child starts with no
  runtime and builds its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import gc
import logging
import math
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

from .errors import ClosedError, InvalidArgumentError, RuntimeUsageError

T = TypeVar("T")

log = logging.getLogger("ckpt_async")

#: Worker threads for blocking work (file system calls, staging copies, restores).
DEFAULT_THREADS = max(4, min(32, (os.cpu_count() or 2) * 2))
#: Worker threads for a commit's blocking work: most of them wait on the disk (writes,
#: fsyncs) while others checksum or encode.
BACKGROUND_THREADS = min(32, 2 * DEFAULT_THREADS)

# -- CPU priority of background work ---------------------------------------------------------------
#: ``"idle"``: Linux SCHED_IDLE, background work runs only on CPU time nothing else in the
#: machine wants; ``"low"``: nice 19, a small share of a busy CPU; ``"normal"``: unchanged.
PRIORITIES = ("idle", "low", "normal")
PRIORITY_ENV = "CKPT_ASYNC_BACKGROUND_PRIORITY"
#: comm names (``/proc/self/task/<tid>/comm``) of TensorStore's I/O and copy threads.
TENSORSTORE_THREAD_NAMES = ("ts_pool_worker",)
#: TensorStore starts threads on demand: look for new ones at most this often (seconds).
_SCAN_INTERVAL = 0.05
_CAN_SET_PRIORITY = sys.platform.startswith("linux") and hasattr(os, "SCHED_IDLE")

# -- pacing of background commits ------------------------------------------------------------------
#: While the process's other threads (a training step: XLA's threads, the Python loop) keep at
#: least this share of its CPUs busy, a background commit writes one batch at a time, at most
#: at the pace set by :func:`set_background_pace`. A lowered priority alone does not keep a
#: commit off a training step's cores: on the 2-core benchmark machine a ``SCHED_IDLE`` thread
#: computing checksums slowed the jitted steps by 18-36%, and the kernel's work for a commit's
#: writes runs whatever the thread's priority.
PACE_BUSY_SHARE = 0.5
#: ... and until they use less than this share (a single quieter 50 ms does not let every
#: waiting batch go at once).
PACE_IDLE_SHARE = 0.25
#: Seconds over which the other threads' CPU use is averaged (exponentially).
PACE_AVERAGE_SECONDS = 0.15
PACE_ENV = "CKPT_ASYNC_BACKGROUND_PACE"
#: Default pace of a commit while other threads keep the CPU busy, in bytes per second per
#: CPU the process may use (the commit's CPU time grows with its bytes, the step's share of
#: it shrinks with the CPUs): 64 MiB/s on the 2-core benchmark machine. Its training loop's
#: steps beside a 2 GiB commit, against the steps right before and after it: +3.4% at
#: 64 MiB/s (a 32 s commit), +10.5% at 96 MiB/s (21.5 s; medians of 7 and 8 runs).
DEFAULT_PACE_PER_CPU = 32 << 20


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _pace_from_env() -> float | None:
    default = float(DEFAULT_PACE_PER_CPU * _usable_cpus())
    value = os.environ.get(PACE_ENV, "").strip()
    if not value:
        return default
    try:
        pace = float(value)
    except ValueError:
        log.warning("%s=%r is not a number of bytes per second; using %d", PACE_ENV, value,
                    default)
        return default
    return pace if pace > 0 else None


_pace = _pace_from_env()


def set_background_pace(bytes_per_second: float | None) -> None:
    """Sets how fast a background commit writes while the process's other threads keep at
    least half of its CPUs busy (a training step running), process-wide: ``None`` or ``0``
    for as fast as it can (also ``CKPT_ASYNC_BACKGROUND_PACE``; default 32 MiB/s per CPU the
    process may use).

    Checksums, copies and the kernel's work for file writes take CPU time whatever their
    priority; on a machine whose cores a training step keeps busy, a commit at full speed
    slowed the steps by 30-50% (2 GiB on 2 cores), at 128 MiB/s by 6-10%, for a commit that
    took 17 s instead of 3. The pace applies only while the other threads are busy (measured
    every 50 ms from the CPU time of the process and of ckpt_async's and TensorStore's own
    threads): a commit nobody trains beside, or that the thread that saved waits for (its
    sync face's ``wait_until_finished``, ``restore`` or ``close``), runs at full speed,
    and none is paced past half its ``timeout_secs`` or half the time since the previous save
    of its manager. Linux only, and not at the ``"normal"`` background priority.
    """
    global _pace
    if bytes_per_second is not None and bytes_per_second < 0:
        raise InvalidArgumentError(
            f"background pace must be positive or None, not {bytes_per_second!r}")
    _pace = bytes_per_second or None


def background_pace() -> float | None:
    """The pace of background commits while the CPU is busy (:func:`set_background_pace`)."""
    return _pace


class PaceWindow:
    """Until when (monotonic time) the batches of one commit may be paced; None: no limit.
    The checkpointer sets it (half the commit's timeout, or half the time since its previous
    save) and ends it early (:meth:`close`) when the next save starts, when somebody hurries
    the commit, and when the commit is done."""

    __slots__ = ("until",)

    def __init__(self, until: float | None) -> None:
        self.until = until

    def open(self) -> bool:
        return self.until is None or time.monotonic() < self.until

    def close(self) -> None:
        self.until = 0.0


#: The pace window of the commit being staged (the write tasks copy it with the context).
pace_window: contextvars.ContextVar[PaceWindow | None] = contextvars.ContextVar(
    "ckpt_async_pace_window", default=None)


class BatchPace:
    """The clock of one paced batch (:meth:`Runtime.paced`), for the thread that writes it:
    :meth:`hold` after each piece spreads the batch's writes at the pace, rather than writing
    it in one burst and then pausing. (A 128 MiB array is one batch: in one burst, its
    checksums, copies and writeback took a core from the training step for ~100 ms every 2 s,
    and full ``large`` slowed the steps by 12-23%.)"""

    __slots__ = ("_rt", "_window", "_start")

    def __init__(self, rt: Runtime, window: PaceWindow | None, start: float) -> None:
        self._rt, self._window, self._start = rt, window, start

    def active(self) -> bool:
        """Whether the batch is paced now (the process's other threads busy, the commit's
        window open)."""
        return self._rt.paced_now(self._window) and _pace is not None

    def hold(self, done: int) -> None:
        """Blocks the writing thread while the commit is paced, until ``done`` bytes of the
        batch are due at the pace (looking again every scan interval: a closed window, or
        the other threads going idle, lets it go at once)."""
        while self.active() and (pace := _pace) is not None:
            left = self._start + done / pace - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _SCAN_INTERVAL))


#: The pace of the batch being written, set around its writes by :meth:`Runtime.paced`.
batch_pace: contextvars.ContextVar[BatchPace | None] = contextvars.ContextVar(
    "ckpt_async_batch_pace", default=None)


def _thread_cpu(tid: int) -> float | None:
    """CPU seconds used by thread ``tid`` of this process (Linux per-thread CPU clock,
    ``MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)``); None once the thread has ended."""
    try:
        return time.clock_gettime((~tid << 3) | 6)
    except OSError:
        return None


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The environment variable ``name`` (stripped, in lower case) when it is one of
    ``choices``; ``default`` when it is unset or empty, and, with a warning, when it is
    anything else."""
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        log.warning("%s=%r is not one of %s; using %r", name, value, choices, default)
        return default
    return value


def _priority_from_env() -> str:
    return env_choice(PRIORITY_ENV, PRIORITIES, "idle")


_priority = _priority_from_env()


def set_background_priority(level: str) -> None:
    """Sets the CPU priority of background commit work, process-wide: ``"idle"`` (default),
    ``"low"`` or ``"normal"`` (also ``CKPT_ASYNC_BACKGROUND_PRIORITY``).

    Background work is everything a commit does after ``save()`` returned: checksums, raw
    chunk copies, file writes and fsyncs, in ckpt_async's background threads and in
    TensorStore's I/O threads. At ``"idle"`` (Linux ``SCHED_IDLE``) it runs only on CPU time
    that nothing else wants, so it slows a training loop as little as it can, and commits take
    longer while the machine keeps every core busy; ``"low"`` (nice 19) still takes a small
    share of a busy core. The caller's threads, the engine loop (which runs ``save()`` and
    ``restore()``) and XLA's threads are never touched. TensorStore's threads serve every
    TensorStore user in the process (restores included); at ``"idle"`` they return to the normal
    priority when no commit is in flight, at ``"low"`` they stay at the lower priority after
    the commit. While the thread that saved waits for a commit (the sync faces'
    ``wait_until_finished``, ``restore``, ``close``, a synchronous save, a save waiting for
    ``max_concurrent_saves``; the interpreter's exit), and once half its timeout has passed,
    that commit's work runs at the normal priority until it is done (:meth:`Runtime.boost`).
    Raising a thread's priority again needs a privilege (:func:`may_raise_priority`: root,
    ``CAP_SYS_NICE``, or ``RLIMIT_NICE`` of 20 or more); without it such a commit's work moves
    to threads that were never lowered instead, and TensorStore's threads stay lowered after
    the first commit, so later restores in the process run at the background priority too
    (which costs time only while other work keeps the CPU busy), and going back to
    ``"normal"`` leaves lowered threads where they are. Linux only; elsewhere it does
    nothing.
    """
    global _priority
    if level not in PRIORITIES:
        raise InvalidArgumentError(
            f"background priority must be one of {PRIORITIES}, not {level!r}")
    _priority = level
    rt = _runtime
    if rt is not None:
        rt.apply_tensorstore_priority()


def background_priority() -> str:
    """The CPU priority background commit work runs at (:func:`set_background_priority`)."""
    return _priority


def set_thread_priority(tid: int, level: str) -> bool:
    """Puts the Linux thread ``tid`` at ``level``; False when not permitted or not Linux."""
    if not _CAN_SET_PRIORITY:
        return False
    try:
        if level == "idle":
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        else:
            if os.sched_getscheduler(tid) != os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 19 if level == "low" else 0)
    except OSError as exc:  # not permitted (raising needs CAP_SYS_NICE), or the thread ended
        log.debug("cannot put thread %d at %s CPU priority: %s", tid, level, exc)
        return False
    return True


def may_raise_priority() -> bool:
    """Whether this process may raise a thread's CPU priority again (leave ``SCHED_IDLE``,
    lower a nice value to 0): root or ``CAP_SYS_NICE``, or an ``RLIMIT_NICE`` of 20 or more."""
    if not _CAN_SET_PRIORITY:
        return False
    import resource

    if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return os.geteuid() == 0
    return bool(int(caps.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE


_background: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ckpt_async_background", default=False)


def mark_background() -> None:
    """Marks the running task (and the tasks it starts from now on) as background work: its
    :meth:`Runtime.to_thread` calls run in the low-priority background pool, and while it runs
    TensorStore's threads are put at the background priority as they appear. Each asyncio
    task has its own copy of the context, so this does not leak into the caller's task."""
    if _background.get():
        return
    _background.set(True)
    rt, task = _runtime, asyncio.current_task()
    if rt is not None and task is not None and rt.on_engine_thread():
        rt._track_background(task)


def in_background() -> bool:
    return _background.get()


#: Set in the tasks of calls (:meth:`Runtime.call`, ...) and what they start: a call made on
#: behalf of one in flight (a handler's thread calling back in) is taken at shutdown too.
_in_call: contextvars.ContextVar[bool] = contextvars.ContextVar("ckpt_async_in_call",
                                                                default=False)

#: Done (on the engine loop) once the thread blocked in the sync call that started this task
#: has its result back; unset for async callers. See :func:`caller_back`.
_caller_back: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar(
    "ckpt_async_caller_back", default=None)


async def caller_back(at_most: float) -> None:
    """Waits until the thread of the sync call this task runs for (``save()``) has its result
    and runs again, for at most ``at_most`` seconds (all of it for an async caller,
    whose loop this one cannot see). Work started after that takes the GIL from a thread that
    already has it, rather than making the woken caller wait the interpreter's switch interval
    (5 ms) for it."""
    back = _caller_back.get()
    if back is None:
        await asyncio.sleep(at_most)
    elif not back.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(back), at_most)


def require_asyncio(what: str, then: str) -> None:
    """Raises :class:`RuntimeUsageError` unless an asyncio event loop runs in this thread
    (``what`` was awaited; ``then``: what became of it, and what to do instead). The async
    face awaits asyncio futures, which another event loop (trio, anyio's trio backend) cannot
    wait for: it raised its own error only once the call had started on the engine loop,
    where a save then went on and committed."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeUsageError(
            f"{what} was awaited outside an asyncio event loop (trio, or anyio's trio "
            "backend?): the async face (ckpt_async.aio, CommitFuture) needs asyncio, uvloop "
            f"or anyio's asyncio backend; {then}") from None


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _settle(fut: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    """Copies a finished task's outcome into a thread-safe future."""
    if task.cancelled():
        fut.cancel()
    elif (exc := task.exception()) is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(task.result())


def _unwrap(exc: BaseException) -> BaseException:
    """Single-member exception groups (from task groups) become their only member."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class CommitFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A thread-safe future that is also awaitable from any asyncio loop.

    ``.result(timeout)``, ``.done()`` and ``.add_done_callback`` work from sync code;
    ``await fut`` works from any asyncio event loop, uvloop included (the engine's or the
    caller's); awaited under trio, it raises :class:`~ckpt_async.errors.RuntimeUsageError`.

    A commit's failure that nobody retrieves (``result()``, ``exception()`` or ``await`` on
    the future, or the checkpointer's or manager's ``wait_until_finished()``, ``close()``,
    ``check_for_errors()`` or next ``save()`` raising it) is logged, once, on the
    ``ckpt_async`` logger: at interpreter exit, or when the future is garbage-collected
    before that (as asyncio logs a task's exception that was never retrieved).

    A commit dropped by its checkpointer's ``cancel()`` (or whose task was cancelled) ends
    the future cancelled, as ``concurrent.futures`` has it: ``cancelled()`` and ``done()``
    are True, and ``result()`` and ``exception()`` raise ``CancelledError`` (saying which
    save). Its own ``cancel()`` refuses, as for any running future (False).
    """

    def __init__(self, what: str | None = None) -> None:
        super().__init__()
        self._settle_lock = threading.Lock()
        self._settling: list[Callable[[BaseException | None], None]] | None = []
        self._outcome: BaseException | None = None
        #: What the commit is (``the commit of step 3 of /run``), for the log of a failure
        #: nobody retrieved; None: not logged (work that logs its own failures).
        self.what = what
        self._unretrieved = False
        self._pid = os.getpid()  # (a forked child's copy is the parent's to log)

    def _refuse_engine_wait(self, timeout: float | None) -> None:
        """A wait for this commit on the engine thread (a done callback, a progress callback,
        a coroutine run there), which the commit needs to end, raises RuntimeUsageError: it
        hung the engine, and every save and restore of the process, for good (or, with a
        timeout, stalled them all that long and then timed out). A look without waiting
        (``timeout=0``) is let through."""
        rt = _runtime
        if (timeout is None or timeout > 0) and not self.done() and rt is not None and \
                rt.on_engine_thread():
            raise RuntimeUsageError(
                f"waiting for {self.what or 'a commit'} on the ckpt_async engine thread (in a "
                "done callback?) would deadlock: the commit runs there. Hand the wait to your "
                "own loop or thread (loop.call_soon_threadsafe, then await the future there)")

    def result(self, timeout: float | None = None) -> Any:
        self._refuse_engine_wait(timeout)
        try:
            return super().result(timeout)
        except concurrent.futures.CancelledError:
            raise self.cancelled_error() from None
        except BaseException as exc:
            if exc is self._outcome:  # (not a timeout of this wait)
                self.retrieved()
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._refuse_engine_wait(timeout)
        try:
            exc = super().exception(timeout)
        except concurrent.futures.CancelledError:
            raise self.cancelled_error() from None
        if exc is not None:
            self.retrieved()
        return exc

    def cancelled_error(self) -> concurrent.futures.CancelledError:
        """The ``CancelledError`` that ``result()`` raises once the commit was cancelled,
        with its message (which save)."""
        return concurrent.futures.CancelledError(*getattr(self._outcome, "args", ()))

    def retrieved(self) -> None:
        """Its failure was told to somebody (its owner raised it): not logged."""
        self._unretrieved = False

    async def ended(self) -> None:
        """Waits until the commit has ended, however, without retrieving its failure (an
        earlier commit awaited by a later one: its failure stays its own to report)."""
        if self.done():
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # (the loop closed: nobody waits)
                loop.call_soon_threadsafe(_set_done, waiter)

        self.add_done_callback(wake)
        await waiter

    def log_unretrieved(self) -> None:
        """Logs its failure if nobody retrieved it (once)."""
        if not self._unretrieved or self._pid != os.getpid():
            return
        self._unretrieved = False
        exc = self._outcome
        log.error("%s failed, and nobody retrieved the error (wait_until_finished(), close(), "
                  "check_for_errors() or the commit's future): %s", self.what, exc,
                  exc_info=exc)

    def __del__(self) -> None:
        self.log_unretrieved()

    def __await__(self):  # type: ignore[no-untyped-def]
        require_asyncio(f"the completion future of {self.what or 'a commit'}", (
            "the commit goes on. Elsewhere, wait for it with result() in a worker thread "
            "(trio.to_thread.run_sync)"))
        return asyncio.wrap_future(self).__await__()

    def on_settle(self, fn: Callable[[BaseException | None], None]) -> None:
        """ckpt_async's own bookkeeping of the commit: ``fn(exception or None)`` runs in the
        thread that ends the commit, before any waiter or done callback learns of its end
        (at once if it has ended). A done callback runs after ``result()`` has returned to
        the waiters: a caller seeing a commit fail could ask its manager and not find the
        failure recorded yet (1 in 8 runs of ``check_for_errors`` right after ``result()``
        raised)."""
        with self._settle_lock:
            if self._settling is not None:
                self._settling.append(fn)
                return
        fn(self._outcome)

    def _settle(self, exc: BaseException | None) -> None:
        with self._settle_lock:
            hooks, self._settling, self._outcome = self._settling or [], None, exc
        for fn in hooks:
            try:
                fn(exc)
            except Exception:  # the commit's outcome stands whatever its bookkeeping does
                log.exception("a commit's bookkeeping failed")

    def set_result(self, result: Any) -> None:
        self._settle(None)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        # (a commit dropped by cancel(), or cancelled, failed nobody)
        cancelled = isinstance(exception,
                               asyncio.CancelledError | concurrent.futures.CancelledError)
        self._unretrieved = self.what is not None and not cancelled
        self._settle(exception)
        if not cancelled:
            super().set_exception(exception)
            return
        # Ended cancelled, as Future.cancel() ends a pending future (which it refuses for a
        # running one) and as an executor then tells those waiting in wait() or as_completed().
        with self._condition:
            if self._state != concurrent.futures._base.RUNNING:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._state = concurrent.futures._base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]


class UnloweredPool:
    """Threads for the work of boosted commits where no thread can be raised again
    (:meth:`Runtime.run_raised`), all started at once by the thread that makes the pool: a
    thread starts at its creator's priority, and a pool thread started on demand by a lowered
    thread would be lowered too (``ThreadPoolExecutor`` starts them in the submitting
    thread)."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any],
                                            tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = threads
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._work, name=f"ckpt_async-raised_{i}",
                             daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        if self._closed:  # (its threads are gone: the future would never be done)
            raise ClosedError("cannot schedule new futures after shutdown")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the future
                    fut.set_exception(exc)
            del job, fut, fn, args  # (nothing of the last job kept while waiting)

    def shutdown(self) -> None:
        self._closed = True
        for _ in range(self._threads):
            self._jobs.put(None)


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
        # A restore's reads of data files (to_read_thread) mostly wait on the disk, and a cold
        # disk reads faster with more reads in flight than there are cores: a cold read of 16
        # files of 16 MiB, each thread reading files of its own in 1 MiB pieces into fresh
        # memory and checksumming them, 2.00 GB/s with 4 threads, 2.21 with 8, 1.87 with 16
        # (the 2-core benchmark VM).
        self._read_limiter = self._portal.call(anyio.CapacityLimiter, 2 * threads)
        # Background work (commits) runs in its own threads, each put at the background
        # priority when it starts; foreground work (save()'s blocking part, restores) keeps
        # anyio's threads at the caller's priority. Threads start on first use.
        #: ckpt_async's background threads (id -> the level each was put at), and the commits
        #: in flight whose caller waits for them (:meth:`boost`): while there are any, those
        #: threads and TensorStore's run at the normal priority.
        self._bg_levels: dict[int, str] = {}
        self._boosted: set[concurrent.futures.Future[Any]] = set()
        self._levels_lock = threading.Lock()
        self._may_boost = _CAN_SET_PRIORITY and may_raise_priority()
        #: Where the process may not raise a thread's priority (:meth:`run_raised`): threads
        #: never lowered, for the work of boosted commits (made by the first boost).
        self._raised_pool: UnloweredPool | None = None
        self._bg_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(threads, BACKGROUND_THREADS), thread_name_prefix="ckpt_async-bg",
            initializer=self._set_background_priority)
        # Short jobs a commit wants started at once, such as its B+tree and its documents
        # (``start_background``), beside the writes that fill the pool above.
        self._now_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="ckpt_async-bg-now",
            initializer=self._set_background_priority)
        # The loop the Python part of background writes runs on (``in_background_loop``):
        # its own thread, at the background priority, started on first use.
        self._bg_loop: asyncio.AbstractEventLoop | None = None
        self._bg_loop_lock = threading.Lock()
        self._ts_levels: dict[int, str] = {}  # TensorStore thread id -> the level it is at
        # Pacing: the native ids of ckpt_async's own threads, the last CPU observation (wall
        # time, process CPU time, thread id -> CPU time), the cores the process's other threads
        # used since the one before, and the batches in flight and waiting (engine loop only).
        engine_tid = self._portal.call(threading.get_native_id)
        self._own_tids = {engine_tid}
        self._cpu_seen: tuple[float, float, dict[int, float]] | None = None
        self.foreground_cores = 0.0
        self._busy = False
        self._cpus = _usable_cpus()
        # (a sandbox may refuse other threads' CPU clocks: their time would then count as the
        # foreground's, and a commit would pace itself)
        self._can_pace = _CAN_SET_PRIORITY and _thread_cpu(engine_tid) is not None
        self._paced_in_flight = 0
        self._paced_waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ts_other: set[int] = set()  # thread ids known not to be TensorStore's
        self._scan_lock = threading.Lock()
        self._bg_tasks = 0
        self._ticking = False
        self._pending: weakref.WeakSet[concurrent.futures.Future[Any]] = weakref.WeakSet()
        # The loop holds tasks weakly only: keep every task we start until it is done, so a
        # background commit cannot be garbage-collected mid-flight.
        self._tasks: set[asyncio.Task[Any]] = set()
        # Calls in flight from threads Python waits for at exit (not daemon threads: one may
        # be parked in a call for days, a multi-process barrier, and exit must not wait for
        # it), which :meth:`shutdown` lets finish; ``_closed`` is set and read under
        # ``_close_lock``, so no call slips in between shutdown's look at them and the stop.
        self._calls: weakref.WeakKeyDictionary[concurrent.futures.Future[Any], str] = (
            weakref.WeakKeyDictionary())  # (-> the name of the function called)
        self._close_lock = threading.Lock()
        self._closed = False
        self.observe_cpu()  # the first commit looks back from here (training since then)

    # -- where are we ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` has begun (at interpreter exit): new calls are refused."""
        return self._closed

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
        # _submit() unwraps single-member groups, so the caller sees the original exception.
        back: list[asyncio.Future[None]] = []
        fut, ended = self._submit(fn, args, kwargs, back)
        try:
            return fut.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            if not self._closed:
                raise
            # (a daemon thread's call in flight when exit began: Python does not wait for it)
            raise RuntimeUsageError(
                f"{getattr(fn, '__qualname__', fn)!r} was cancelled: the interpreter is exiting "
                "and this call came from a daemon thread, which Python does not wait for: it "
                "did not finish (a save it made is not committed)") from None
        except BaseException:
            # Interrupted (Ctrl-C): ``fn`` stops as a cancelled async call does (a save being
            # staged is abandoned, its files removed) before the interrupt goes on.
            if fut.cancel():
                ended.result()
            raise
        finally:
            # (none yet when the wait was interrupted before the runner ran; a task then
            # waits its whole timeout)
            if back:
                with contextlib.suppress(RuntimeError):  # (a loop closed meanwhile)
                    self.loop.call_soon_threadsafe(_set_done, back[0])

    def submit(
        self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Starts ``fn`` on the engine loop; returns a thread-safe future for its result.
        Cancelling the future cancels ``fn``'s task (an async caller cancelled while it
        awaits: a save then stops staging and removes what it wrote)."""
        return self._submit(fn, args, kwargs)[0]

    def _submit(self, fn: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...],
                kwargs: dict[str, Any], back: list[asyncio.Future[None]] | None = None
                ) -> tuple[concurrent.futures.Future[T], concurrent.futures.Future[None]]:
        """:meth:`submit`, and a future done once ``fn``'s task has ended, however. ``back``
        (a sync call's): given the future :func:`caller_back` waits for, which the caller
        sets once it has ``fn``'s result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        ended: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def runner() -> None:
            _in_call.set(True)  # (this task's context, and that of what it starts)
            if back is not None:
                back.append(self.loop.create_future())
                _caller_back.set(back[0])  # (this task's context, copied by those it starts)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                if not fut.cancelled():
                    fut.set_exception(_unwrap(exc))
            else:
                if not fut.cancelled():
                    fut.set_result(result)
            finally:
                _set_ended()

        def _set_ended(*_: object) -> None:
            if not ended.done():
                ended.set_result(None)

        task: list[asyncio.Task[None]] = []

        def start() -> None:
            task.append(self._start_task(runner()))
            # (a task cancelled before its first step never runs runner's ``finally``)
            task[0].add_done_callback(_set_ended)

        def cancelled(done: concurrent.futures.Future[T]) -> None:
            if done.cancelled():  # (queued after the start below: callbacks run in order)
                self.loop.call_soon_threadsafe(lambda: task[0].cancel())

        with self._close_lock:
            if self._closed and not _in_call.get():
                raise RuntimeUsageError(
                    f"{getattr(fn, '__qualname__', fn)!r} was not started: ckpt_async has shut "
                    "down because the interpreter is exiting (its main thread has finished; "
                    "Python's thread pools refuse new work from then on too). Join the threads "
                    "that save or restore checkpoints before the main thread ends.")
            if not threading.current_thread().daemon:
                self._calls[fut] = getattr(fn, "__qualname__", repr(fn))
            self.loop.call_soon_threadsafe(start)
        fut.add_done_callback(cancelled)
        return fut, ended

    def _start_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Creates a task on the engine loop and holds it until it is done (engine loop only)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Awaits ``fn`` on the engine loop from any asyncio loop (directly when already on
        it); awaited outside an asyncio loop (trio), raises before ``fn`` starts."""
        if not self.on_engine_thread():
            require_asyncio(f"{getattr(fn, '__qualname__', fn)!r}", (
                "nothing was started. Elsewhere, call the sync face from a worker thread "
                "(trio.to_thread.run_sync)"))
            fut, ended = self._submit(fn, args, kwargs)
            try:
                return await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                # (``fn`` is being cancelled too: the caller hears of it once it has stopped,
                # also when cancelled again meanwhile, as anyio's cancel scopes cancel a task
                # again and again until it ends)
                stopped = asyncio.wrap_future(ended)
                while not stopped.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(stopped)
                raise
        try:
            return await fn(*args, **kwargs)
        except BaseExceptionGroup as group:
            exc = _unwrap(group)
            if exc is group:
                raise
        # Raised outside the handler, so the member is not chained to its group (as submit does).
        raise exc

    def spawn(self, coro: Awaitable[T], what: str | None = None) -> CommitFuture:
        """Starts a background task on the engine loop (call from the engine loop); ``what``
        it is (a commit), to log its failure if nobody retrieves it (:class:`CommitFuture`)."""
        fut = CommitFuture(what)
        fut.set_running_or_notify_cancel()

        async def runner() -> None:
            mark_background()
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
        """Runs blocking ``fn`` in a worker thread, bounded by the runtime's limiter; from
        background work (:func:`mark_background`), in a background-priority thread."""
        return await self._in_thread(self._limiter, fn, args)

    async def to_own_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs blocking ``fn`` in a new thread of its own, in the caller's context: a
        handler's synchronous method, which may call back into the engine loop (a subclass's
        ``super().restore(...)``) and wait there. A thread of the bounded pools must not: with
        every one of them waiting so, what they wait for could never get a thread."""
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()

        def settle(exc: BaseException | None, result: Any) -> None:
            if not done.done():  # (else the awaiting task was cancelled)
                if exc is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(result)

        def run() -> None:
            try:
                result = context.run(fn, *args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(settle, exc, None)
            else:
                loop.call_soon_threadsafe(settle, None, result)

        threading.Thread(target=run, name="ckpt_async-handler", daemon=True).start()
        return await done

    async def to_own_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on an event loop of its own, in a thread of its own
        (:meth:`to_own_thread`): an Orbax-style handler's ``async_save``, which may call a
        built-in handler's synchronous methods, and they wait on the engine loop (or the
        background loop, which neither may then block)."""
        return await self.to_own_thread(asyncio.run, coro)

    def start_own_loop(self, coro: Coroutine[Any, Any, T], name: str | None = None
                       ) -> tuple[concurrent.futures.Future[T], Callable[[], None]]:
        """Starts ``coro`` at once, from any thread, on an event loop of its own in a thread
        of its own (Orbax's ``CommitFuture``); returns its future and a function that
        cancels the coroutine (the future raises ``CancelledError`` once it has ended)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        lock = threading.Lock()
        running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[T]]] = []
        cancelled: list[bool] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                with lock:
                    task = loop.create_task(coro)
                    running.append((loop, task))
                    if cancelled:
                        task.cancel()
                value = loop.run_until_complete(task)
            except asyncio.CancelledError:
                done.set_exception(concurrent.futures.CancelledError(f"{name} was cancelled"))
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                done.set_exception(exc)
            else:
                done.set_result(value)
            finally:  # (as asyncio.run ends its loop)
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        def cancel() -> None:
            with lock:
                cancelled.append(True)
                for loop, task in running:
                    with contextlib.suppress(RuntimeError):  # (its loop closed: it finished)
                        loop.call_soon_threadsafe(task.cancel)

        threading.Thread(target=run, name=name or "ckpt_async-handler", daemon=True).start()
        return done, cancel

    async def to_read_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`to_thread` for blocking reads of data files, bounded by a limiter of their own
        of twice as many threads, which mostly wait on the disk."""
        return await self._in_thread(self._read_limiter, fn, args)

    async def _in_thread(self, limiter: anyio.CapacityLimiter, fn: Callable[..., T],
                         args: tuple[Any, ...]) -> T:
        if _background.get():
            return await self.to_background_thread(fn, *args)
        return await anyio.to_thread.run_sync(self._as_own, fn, args, limiter=limiter)

    def _as_own(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """Runs in a worker thread, counted as ckpt_async's own (:meth:`observe_cpu`)."""
        self._own_tids.add(threading.get_native_id())
        return fn(*args)

    async def to_background_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking ``fn`` in a background-priority worker thread."""
        return await asyncio.wrap_future(self.submit_background(fn, *args))

    def submit_background(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Starts blocking ``fn`` in a background-priority worker thread; returns its future
        (which, unlike an awaited :meth:`to_thread`, can still be waited for once the task
        awaiting it was cancelled). While a commit is boosted where no thread can be raised,
        in a thread never lowered (:meth:`run_raised`)."""
        if (pool := self._unlowered()) is not None:
            return pool.submit(self._as_own, fn, args)
        return self._bg_pool.submit(self._in_background, fn, args)

    def start_background(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Runs blocking ``fn`` at the background priority in a pool of its own, so that it
        starts at once rather than queued behind the data writes; returns its future. (Its
        threads live on: a thread that ended between two CPU observations would have its time
        counted as the foreground's, and a commit paced for it.) As :meth:`submit_background`
        while a boosted commit's threads cannot be raised."""
        if (pool := self._unlowered()) is not None:
            return pool.submit(self._as_own, fn, args)
        return self._now_pool.submit(self._in_background, fn, args)

    def _unlowered(self) -> UnloweredPool | None:
        """Where a commit is boosted but this process may not raise a thread's priority, the
        threads never lowered that its work goes to; else None."""
        return self._raised_pool if self._boosted and not self._may_boost else None

    def run_raised(self, rest: Callable[[], None]) -> bool:
        """Called by a background thread between two pieces of a long job (a data file's
        writes): where a commit is boosted but this thread, lowered, cannot be raised (no
        privilege: :func:`may_raise_priority`), runs ``rest``, the job's remaining pieces, in
        a thread never lowered and waits for it, then returns True; otherwise returns False
        at once and the job goes on here. At ``SCHED_IDLE`` behind busy processes the rest of
        a 64 MiB batch could take minutes."""
        pool = self._unlowered()
        if pool is None or self._bg_levels.get(threading.get_native_id(), "normal") == "normal":
            return False
        pool.submit(self._as_own, rest, ()).result()
        return True

    def _in_background(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """Runs in a background thread: puts it at the background priority first (once per
        thread and level)."""
        self._set_background_priority()
        return fn(*args)

    async def in_background_loop(self, fn: Callable[..., Coroutine[Any, Any, T]],
                                 *args: Any) -> T:
        """Awaits ``fn(*args)`` run on the background loop, in the caller's context.

        The Python work of a commit's writes (raw chunk copies, checksums, kvstore calls: tens
        of microseconds per array) runs there, in a thread at the background priority, so that
        it takes CPU time from a training loop's threads only when they leave it idle; the
        engine loop, which serves ``save()`` and ``restore()``, keeps the caller's priority.
        Cancelling the caller cancels ``fn`` and returns only once it has stopped (nothing it
        started is left writing). While a commit is boosted where the background loop's
        thread cannot be raised, ``fn`` runs in the caller's task instead."""
        if self._unlowered() is not None:
            return await fn(*args)
        loop = self._background_loop()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        task: list[asyncio.Task[T]] = []

        def start() -> None:  # on the background loop, in the caller's copied context
            self._set_background_priority()  # again, should the level have changed
            t = loop.create_task(fn(*args))
            task.append(t)
            t.add_done_callback(functools.partial(_settle, done))

        loop.call_soon_threadsafe(start)  # (the handle carries a copy of our context)
        waiter = asyncio.wrap_future(done)
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if not done.done():
                loop.call_soon_threadsafe(lambda: task[0].cancel())  # start() ran first (FIFO)
                with contextlib.suppress(BaseException):
                    await waiter
            raise

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._bg_loop_lock:
            if self._bg_loop is None:
                ready: concurrent.futures.Future[asyncio.AbstractEventLoop] = \
                    concurrent.futures.Future()

                def main() -> None:
                    self._set_background_priority()
                    loop = asyncio.new_event_loop()
                    ready.set_result(loop)
                    try:
                        loop.run_forever()
                    finally:
                        loop.close()

                threading.Thread(target=main, name="ckpt_async-bg-loop", daemon=True).start()
                self._bg_loop = ready.result()
            return self._bg_loop

    def _set_background_priority(self) -> None:
        """Puts the calling background thread at the background priority (when it starts,
        and again after the level changed)."""
        tid = threading.get_native_id()
        self._own_tids.add(tid)
        with self._levels_lock:
            level = self.background_level()
            if self._bg_levels.setdefault(tid, "normal") != level:
                set_thread_priority(tid, level)
                self._bg_levels[tid] = level  # not retried: a refusal would repeat on every call

    def background_level(self) -> str:
        """The level background work runs at now: the background priority, or ``"normal"``
        while a commit is boosted where the process may raise threads (:meth:`boost`)."""
        return "normal" if self._boosted and self._may_boost else _priority

    def boost(self, commit: concurrent.futures.Future[Any]) -> None:
        """Until ``commit`` is done, every background thread, TensorStore's included, runs
        at the normal priority, where the process may raise them back
        (:func:`may_raise_priority`); elsewhere background work moves to threads never
        lowered (:meth:`run_raised`). Any thread. Called when the thread that saved waits for
        it (``AsyncCheckpointer.hurry``: that thread is not training), and once half the
        commit's timeout has passed. At ``SCHED_IDLE`` a commit gets next to no CPU time
        while other processes keep every core busy: with two busy processes on the 2-core
        benchmark machine, a save of 178 MiB and a wait for it took 17-29 s rather than
        0.16-0.18 s (``benchmarks/busy_machine.py``)."""
        if _priority == "normal" or not _CAN_SET_PRIORITY:
            return
        with self._levels_lock:
            if commit.done() or commit in self._boosted:
                return
            if not self._may_boost and self._raised_pool is None:
                # (started here: the thread that boosts is the caller's, the engine's or the
                # exiting main thread, none of them lowered; before the commit counts as
                # boosted, so that a thread which sees it boosted finds the pool there)
                with contextlib.suppress(RuntimeError):  # (no thread starts at exit: 3.12.0-2)
                    self._raised_pool = UnloweredPool(min(8, DEFAULT_THREADS))
            self._boosted.add(commit)
            if len(self._boosted) == 1 and self._may_boost:
                self._apply_levels()
        commit.add_done_callback(self._unboost)

    def boost_after(self, commit: concurrent.futures.Future[Any], seconds: float) -> None:
        """:meth:`boost` ``commit`` in ``seconds`` (engine loop), unless it is done (or gone)
        by then: the timer holds no reference to it, runs in an empty context (not the
        saving task's), and is cancelled once the commit is done. (Left to fire, each save's
        timer and its context stayed for half the commit timeout, 10 minutes by default: a
        process saving in a loop grew by 1.4 KB a save.)"""
        ref = weakref.ref(commit)

        def fire() -> None:
            if (alive := ref()) is not None:
                self.boost(alive)

        timer = self.loop.call_later(seconds, fire, context=contextvars.Context())

        def cancel(_: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # (the loop closed: nothing left to fire)
                self.loop.call_soon_threadsafe(timer.cancel)

        commit.add_done_callback(cancel)

    def _unboost(self, commit: concurrent.futures.Future[Any]) -> None:
        with self._levels_lock:
            if commit in self._boosted:
                self._boosted.discard(commit)
                if not self._boosted and self._may_boost:
                    self._apply_levels()

    def _apply_levels(self) -> None:
        """Puts every background thread at :meth:`background_level` (under the levels lock)."""
        level = self.background_level()
        for tid, was in list(self._bg_levels.items()):
            if was != level and set_thread_priority(tid, level):
                self._bg_levels[tid] = level
        self.apply_tensorstore_priority(level)

    def _track_background(self, task: asyncio.Task[Any]) -> None:
        """Counts background tasks in flight (engine loop only); while there are any,
        TensorStore's new threads are looked for every ``_SCAN_INTERVAL`` seconds."""
        self._bg_tasks += 1
        task.add_done_callback(self._background_done)
        if _priority == "normal" or not _CAN_SET_PRIORITY:
            return
        self.apply_tensorstore_priority()  # at once: the threads there are now, then each tick
        if self._bg_tasks == 1:
            self.observe_cpu()  # what the process did since the last commit ended
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(_SCAN_INTERVAL, self._scan_tick)

    def _background_done(self, _task: asyncio.Task[Any]) -> None:
        self._bg_tasks -= 1
        if self._bg_tasks == 0:
            self.observe_cpu()  # (the next commit looks back from here)
        if self._bg_tasks == 0 and _priority == "idle" and self._ts_levels and \
                may_raise_priority():
            # No commit in flight: restores and every other TensorStore user in the process
            # get TensorStore's threads back at the normal priority (from nice 19 a thread
            # could not come back without the same privilege, so "low" stays).
            self.apply_tensorstore_priority("normal")

    def _scan_tick(self) -> None:
        if self._bg_tasks <= 0 or _priority == "normal":
            self._ticking = False
            return
        self.apply_tensorstore_priority()
        self.observe_cpu()
        self.wake_paced()  # (the other threads may have left the CPU)
        self.loop.call_later(_SCAN_INTERVAL, self._scan_tick)

    # -- pacing ---------------------------------------------------------------------------------
    def observe_cpu(self) -> None:
        """Updates :attr:`foreground_cores`: the CPU time the process used since the last
        observation, less that of ckpt_async's and TensorStore's threads, per second. Called
        when the runtime starts, when a commit starts (looking back to the end of the last
        one, or to the start), every scan interval while commits run, and when they end."""
        if not self._can_pace:
            return
        now, process = time.monotonic(), time.process_time()
        cpu = {}
        for tid in [*self._own_tids, *self._ts_levels]:
            used = _thread_cpu(tid)
            if used is None:
                self._own_tids.discard(tid)  # ended (TensorStore's are forgotten by the scan)
            else:
                cpu[tid] = used
        seen = self._cpu_seen
        if seen is not None and now - seen[0] < _SCAN_INTERVAL / 2:
            return  # too short to tell
        self._cpu_seen = (now, process, cpu)
        if seen is None:
            return
        then, process_then, cpu_then = seen
        # (a thread first seen now counts whole: it started within the window)
        ours = sum(used - cpu_then.get(tid, 0.0) for tid, used in cpu.items())
        cores = max(0.0, process - process_then - ours) / (now - then)
        weight = 1.0 - math.exp(-(now - then) / PACE_AVERAGE_SECONDS)
        self.foreground_cores += weight * (cores - self.foreground_cores)
        if self.foreground_cores >= PACE_BUSY_SHARE * self._cpus:
            self._busy = True
        elif self.foreground_cores < PACE_IDLE_SHARE * self._cpus:
            self._busy = False

    def pacing(self) -> bool:
        """Whether background commits are paced now (:func:`set_background_pace`)."""
        return self._busy and _pace is not None and _priority != "normal" and self._can_pace

    def paced_now(self, window: PaceWindow | None) -> bool:
        """Whether a commit with pace window ``window`` is paced now (any thread)."""
        return self.pacing() and (window is None or window.open())

    def wake_paced(self) -> None:
        """Wakes the batches held by the pacer, to look again whether they may go (engine
        loop only): when a batch ends, at each scan tick, after a pace window closed."""
        while self._paced_waiting:
            fut = self._paced_waiting.popleft()
            if not fut.done():
                fut.set_result(None)

    async def _paced_wait(self, at_most: float | None = None) -> None:
        """Until the next batch ends or the next scan tick (or ``at_most`` seconds)."""
        fut = self.loop.create_future()
        self._paced_waiting.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, at_most)

    @contextlib.asynccontextmanager
    async def paced(self, nbytes: int) -> AsyncIterator[None]:
        """Around one batch of ``nbytes`` of a background commit's writes (engine loop):
        while :meth:`pacing`, batches go one at a time, the next starting no sooner than
        this one's bytes allow at the pace; at full speed again as soon as pacing stops, or
        once the commit's :data:`pace_window` has closed. Inside, :data:`batch_pace` holds
        the batch's clock, by which the threads writing it spread its pieces."""
        window = pace_window.get()
        while self._paced_in_flight and self.paced_now(window):
            await self._paced_wait()
        self._paced_in_flight += 1
        start = time.monotonic()
        token = batch_pace.set(BatchPace(self, window, start))
        try:
            yield
            while self.paced_now(window) and _pace is not None and (
                    left := start + nbytes / _pace - time.monotonic()) > 0:
                await self._paced_wait(left)  # (woken at every scan tick: a closed window is seen)
        finally:
            batch_pace.reset(token)
            self._paced_in_flight -= 1
            self.wake_paced()

    def apply_tensorstore_priority(self, level: str | None = None) -> list[int]:
        """Puts TensorStore's threads (found by name in ``/proc/self/task``) at ``level``
        (default: the background priority); returns the thread ids it changed."""
        level = level or self.background_level()
        changed: list[int] = []
        if not _CAN_SET_PRIORITY or (level == "normal" and not self._ts_levels):
            return changed
        with self._scan_lock:
            try:
                tids = {int(t) for t in os.listdir("/proc/self/task")}
            except OSError:
                return changed
            # Forget threads that ended (their ids may be reused).
            self._ts_other &= tids
            for tid in [t for t in self._ts_levels if t not in tids]:
                del self._ts_levels[tid]
            for tid in tids - self._ts_other:
                if tid not in self._ts_levels:
                    try:
                        with open(f"/proc/self/task/{tid}/comm", "rb") as f:
                            comm = f.read().strip().decode(errors="replace")
                    except OSError:
                        continue
                    if comm not in TENSORSTORE_THREAD_NAMES:
                        self._ts_other.add(tid)
                        continue
                    self._ts_levels[tid] = "normal"
                if self._ts_levels[tid] != level and set_thread_priority(tid, level):
                    self._ts_levels[tid] = level
                    changed.append(tid)
        return changed

    # -- lifecycle ------------------------------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Refuses new calls; finishes (``wait``) the calls in flight from threads that are
        not daemon threads, and what they start (a call made on behalf of one, such as an
        Orbax-style handler's call into a built-in one, is still taken), then every pending
        commit; stops the loop (a daemon thread's call still in flight is cancelled).
        Interrupted while it waits (Ctrl-C, or a signal handler's ``sys.exit``), it logs what
        it abandons, stops without waiting any more, and raises the interrupt."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        interrupted: KeyboardInterrupt | SystemExit | None = None
        if wait and not self.on_engine_thread():
            try:
                for commit in list(self._pending):  # (nothing trains any more: full priority)
                    self.boost(commit)
                while waiting := [f for f in (*self._calls, *self._pending) if not f.done()]:
                    concurrent.futures.wait(waiting)  # (a call's caller gets its own outcome)
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = exc
                self._log_abandoned(exc)
        for fut in list(self._pending):  # (nobody is left to retrieve a failure from now on)
            if isinstance(fut, CommitFuture):
                fut.log_unretrieved()
        if interrupted is None:  # (else not: the loop's exit waits for its tasks to stop)
            with contextlib.suppress(BaseException):
                self._portal_cm.__exit__(None, None, None)
        if self._bg_loop is not None:
            self._bg_loop.call_soon_threadsafe(self._bg_loop.stop)
        self._bg_pool.shutdown(wait=False)
        self._now_pool.shutdown(wait=False)
        if self._raised_pool is not None:
            self._raised_pool.shutdown()
        if interrupted is not None:
            raise interrupted

    def _log_abandoned(self, exc: BaseException) -> None:
        """Logs the commits and calls in flight that an interrupted :meth:`shutdown` leaves
        unfinished."""
        commits = [f.what or "a background task" for f in list(self._pending)
                   if not f.done() and isinstance(f, CommitFuture)]
        calls = [f"the call {name!r}" for f, name in list(self._calls.items()) if not f.done()]
        if commits or calls:
            log.error("%s at exit, while ckpt_async finished its work: abandoned %s, not "
                      "committed (a save leaves a temporary directory, which readers ignore "
                      "and `ckpt-async gc` removes)", type(exc).__name__,
                      ", ".join(commits + calls))


_runtime: Runtime | None = None
_lock = threading.Lock()
_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Any:
    """Suspends Python's cyclic garbage collector (process-wide) for a short, allocation-heavy
    stretch such as ``save()``'s blocking part: its per-array records are acyclic and freed by
    reference counting, and a full collection triggered there would traverse every object of
    the process (tens of ms for a few thousand arrays, growing with the heap). Nested and
    concurrent pauses are counted; the collector is enabled again when the last one ends, if
    it was enabled when the first began."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


_frozen = 0
_froze = False
#: What the interpreter itself keeps frozen: CPython 3.12.1 starts with 375 static tuples in
#: the permanent generation (3.11 and 3.13 with none). A count at most this is not the
#: caller's freeze. The count at import is the interpreter's when it is that small: a
#: caller's ``gc.freeze()``, even as a script's first line, freezes thousands of objects
#: (4,025-11,236 on 3.11-3.13 here), and is then told apart as before.
_FROZEN_AT_IMPORT = gc.get_freeze_count()
INTERPRETER_FROZEN = _FROZEN_AT_IMPORT if _FROZEN_AT_IMPORT < 1000 else 0


@contextlib.contextmanager
def heap_frozen() -> Any:
    """Keeps the objects that exist now out of Python's garbage collections (``gc.freeze``)
    while a background commit runs, so that a collection triggered meanwhile, in whichever
    thread allocates next (often the training loop's), traverses only what was allocated
    since: a full collection of a process that imported jax took up to 60 ms and stalled
    training steps by as much. Collections still run, so cyclic garbage made during the
    commit is still freed; what was garbage before waits until the last freeze ends. Left
    alone when the caller has frozen objects of its own (it may count on them staying so).
    Nested and concurrent uses are counted."""
    global _frozen, _froze
    with _gc_lock:
        if _frozen == 0:
            _froze = gc.get_freeze_count() <= INTERPRETER_FROZEN
            if _froze:
                gc.freeze()
        _frozen += 1
    try:
        yield
    finally:
        with _gc_lock:
            _frozen -= 1
            if _frozen == 0 and _froze:
                gc.unfreeze()
                _froze = False


class EngineLocal(Generic[T]):
    """What ``factory()`` makes for the engine loop of this process, made anew in a forked
    child on its first use there (engine loop only): an ``asyncio.Lock`` of a manager made
    before the fork. The child has an engine loop of its own: a lock bound to the parent's
    (as one is, once two calls have met at it) raised asyncio's ``RuntimeError`` ("bound to a
    different event loop") in the child when two of its calls met there, and one held at the
    fork, by a task the child does not have, was never released."""

    __slots__ = ("_factory", "_pid", "_value")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._pid = os.getpid()
        self._value = factory()

    def get(self) -> T:
        if self._pid != os.getpid():
            self._pid, self._value = os.getpid(), self._factory()
        return self._value


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
    # The runtime stays the process's, closed: a thread still running gets its refusal (a
    # runtime made anew would mix its loop with the tasks of this one, and its thread pools
    # would be refused by Python's own exit).
    rt = _runtime
    if rt is not None:
        rt.shutdown(wait=True)


def _reset_after_fork() -> None:
    # The engine thread does not exist in the child: forget the parent's runtime. Nor do the
    # threads that paused the collector or froze the heap (a save staging, a commit in flight,
    # which never ends in the child): undone, as it was before them.
    global _runtime, _lock, _gc_lock, _gc_pauses, _frozen, _froze
    _runtime = None
    _lock = threading.Lock()
    _gc_lock = threading.Lock()
    if _gc_pauses and _gc_was_enabled:
        gc.enable()
    if _froze:
        gc.unfreeze()
    _gc_pauses, _frozen, _froze = 0, 0, False


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
