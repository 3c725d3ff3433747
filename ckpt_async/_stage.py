"""Stage: copy every array into host memory, handing each to its writer as soon as it lands.

The device-to-host copies of all arrays are started at once (into pinned host memory on a GPU,
:data:`PINNED_HOST_TRANSFER`; else ``copy_to_host_async``); one
worker thread then materialises them in order and hands each host copy to the engine loop,
which schedules its TensorStore write immediately, so transfers overlap writes. The staging
call returns when every array is on the host: from then on the caller may mutate, donate or
delete its arrays. An optional :class:`ByteBudget` bounds the bytes staged but not yet written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import jax
import numpy as np

from ._ocdbt import anonymous_memory
from ._runtime import caller_back, get_runtime, mark_background
from ._serialize import StoredArray, cast, full_index

log = logging.getLogger("ckpt_async")


class ByteBudget:
    """Bytes staged but not yet written, bounded; ``acquire`` blocks the staging thread."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        """Takes ``n`` bytes, waiting until they fit; one array larger than the whole budget
        still goes through, alone."""
        if self.limit is None:
            return
        with self._cond:
            while self._used > 0 and self._used + n > self.limit:
                self._cond.wait()
            self._used += n

    def try_acquire(self, n: int) -> bool:
        """Takes ``n`` bytes if they fit under the limit now; never waits."""
        if self.limit is None:
            return True
        with self._cond:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    def would_block(self, n: int) -> bool:
        if self.limit is None:
            return False
        with self._cond:
            return self._used > 0 and self._used + n > self.limit

    def release(self, n: int) -> None:
        if self.limit is None:
            return
        with self._cond:
            self._used -= n
            self._cond.notify_all()


#: Under a host-memory budget, a NumPy leaf of at least this many bytes is copied into memory
#: of its own (:func:`own_copy`). Copies from malloc, freed as their writes land, stay in the
#: heap as holes that later arrays of other sizes do not fit: a save of 276 MiB in arrays of
#: 1-24 MiB under a 48 MiB budget peaked at 73 MiB above its baseline, full `mixed` (1.46 GiB
#: in arrays of 0.003-96 MiB, budget 374 MiB) at 478-490 MiB. From 1 MiB only, quick `mixed`
#: (178 MiB, a hundred arrays of 0.5-2 MiB) still peaked at 54-58 MiB under 44.6 in most
#: runs: 128 KiB is where glibc starts handing out memory of its own mapping anyway (until
#: its threshold grows to the sizes it has seen freed), and below it the holes are small.
OWN_MEMORY_MIN_BYTES = 128 << 10


def own_copy(value: Any, dtype: np.dtype | None) -> np.ndarray | None:
    """A C-order copy of ``value`` cast to ``dtype``, in an anonymous mapping of its own: the
    system gets the memory back as soon as the last view of the copy goes. None when no
    mapping can be made (e.g. the process is at ``vm.max_map_count``)."""
    src = np.asarray(value)
    dt = src.dtype if dtype is None else np.dtype(dtype)
    nbytes = src.size * dt.itemsize
    try:
        m = anonymous_memory(nbytes)
    except OSError:
        return None
    out = np.frombuffer(m, dt, count=src.size).reshape(src.shape)
    return cast(src, dt, out)


_NATIVE = np.dtype(np.float32)


def host_copy(value: Any, name: str, dtype: np.dtype | None, *,
              own_memory: bool = False) -> StoredArray:
    """A host snapshot of one leaf (jax.Array, np.ndarray or scalar), cast to ``dtype``.

    NumPy leaves are copied (the caller may mutate them in place); with ``own_memory``, into
    memory of their own where it can be had (:func:`own_copy`). A jax.Array is immutable:
    its host view is the snapshot. On CPU that view aliases the device buffer, and holding it
    keeps the buffer alive: jax neither frees it on ``delete()`` nor reuses it for donation
    while an external reference exists (``tests/test_checkpointer.py`` checks both).
    """
    if type(value) is PinnedShards:
        array = value.array
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(array.dtype)
        shards = []
        try:
            for index, pinned in value.shards:
                host = np.asarray(pinned)
                shards.append((index, cast(host, out_dtype)))
        except Exception as exc:  # noqa: BLE001 - e.g. pinned memory ran out: the plain path
            log.warning("leaf %r did not reach pinned host memory (%s); copying it "
                        "to pageable memory instead", name, exc)
            return host_copy(array, name, dtype)
        chunks = tuple(array.sharding.shard_shape(array.shape))
        return StoredArray(name, tuple(array.shape), out_dtype, chunks, tuple(shards))
    if isinstance(value, jax.Array):
        if len(value.sharding.device_set) == 1:  # the common case, without Shard objects
            host = np.asarray(value)
            if dtype is not None:
                host = cast(host, dtype)
            shape = host.shape
            return StoredArray(name, shape, host.dtype, shape, ((full_index(len(shape)), host),))
        shards = []
        for shard in value.addressable_shards:
            if shard.replica_id != 0:
                continue
            host = np.asarray(shard.data)
            if dtype is not None:
                host = cast(host, dtype)
            shards.append((shard.index, host))
        # One chunk per shard (Orbax's layout), the same on every process, even one that owns
        # no replica-0 shard of this array.
        chunks = tuple(value.sharding.shard_shape(value.shape))
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)
        return StoredArray(name, tuple(value.shape), out_dtype, tuple(chunks), tuple(shards))
    if dtype is None:
        if not getattr(value, "dtype", _NATIVE).isnative:
            dtype = value.dtype.newbyteorder("=")  # ('>f4': stored as Orbax stores it, '<f4')
    elif not np.dtype(dtype).isnative:
        dtype = np.dtype(dtype).newbyteorder("=")
    own = own_copy(value, dtype) if own_memory else None
    if own is not None:
        host = own
    else:
        src = np.asarray(value)
        host = (np.array(src, copy=True, order="C") if dtype is None or src.dtype == dtype
                else cast(src, dtype))  # (a new C-order array)
    shape = host.shape
    return StoredArray(name, shape, host.dtype, shape, ((full_index(len(shape)), host),))


#: Staged arrays are handed to the engine loop in batches of about this many bytes (or
#: BATCH_MAX_ARRAYS arrays): one wake-up and one write task per batch, not per array, keeps
#: per-array Python cost off the blocking path. A larger array is handed over alone, at once.
#: Small arrays of one batch share one OCDBT commit: 16 MiB rather than 4 made the durable
#: commit of 4,096 arrays of 64 KiB about 20% faster (median of 6 interleaved, 0.38 s against
#: 0.48 s), with no change in interference beyond the noise.
BATCH_BYTES = 16 << 20
BATCH_MAX_ARRAYS = 512
#: Seconds a write waits at most before it starts (see ``stage``'s ``write_batch``).
HANDOFF_DELAY = 0.001


#: sharding -> (whether all its devices are CPUs, how many devices it spans).
_CPU_SHARDINGS: dict[Any, tuple[bool, int]] = {}


def cpu_sharding(sharding: Any) -> tuple[bool, int]:
    """Whether all of ``sharding``'s devices are CPUs, and how many devices it spans; cached,
    as shardings are shared by many arrays (a single device's is asked of the device itself:
    each array has a sharding object of its own, whose ``__eq__`` is Python)."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        devices: Any = sharding.device_set
        (device,) = devices
        return device.platform == "cpu", 1
    try:
        return _CPU_SHARDINGS[sharding]
    except (KeyError, TypeError):  # TypeError: an unhashable sharding
        devices = sharding.device_set
        found = (all(d.platform == "cpu" for d in devices), len(devices))
    if len(_CPU_SHARDINGS) < 256:
        with contextlib.suppress(TypeError):
            _CPU_SHARDINGS[sharding] = found
    return found


#: On a GPU, arrays reach the host through pinned host memory (one batched ``jax.device_put``
#: of every array, or of its replica-0 shards, to the ``pinned_host`` memory kind), not through
#: ``copy_to_host_async`` into pageable memory. On an H200 (jax 0.11, ``benchmarks/
#: device_overlap.py``) the pageable copies of 4 GiB ran at 1.2-1.6 GB/s, slower than the disk,
#: and ``np.asarray`` held the GIL while it waited for them (another Python thread ran at 7% of
#: its speed), so no write started before the last array was on the host: a durable save took
#: the D2H time plus the write time. The pinned copies ran at 54 GB/s once jax's pinned pool
#: held the memory (its first allocation in a process, at about 2 GB/s, is the first save's):
#: save() returned after 0.09 s rather than 2.8, and the durable commit took 2.5 s rather than
#: 5.2. ``np.asarray`` of a pinned-host array is a view of it, and the staged buffers are the
#: save's own, freed as their writes land (the jax-cached host copy of ``copy_to_host_async``
#: lives as long as the caller's array). Orbax does the same on GPUs
#: (``enable_pinned_host_transfer``).
PINNED_HOST_TRANSFER = True

#: Device platforms whose arrays take the pinned-host path (as Orbax's default: GPUs).
PINNED_HOST_PLATFORMS = frozenset({"gpu"})

#: sharding -> (PINNED_HOST_PLATFORMS when asked, its pinned-host twin or None where there is
#: none: not a GPU, no such memory).
_PINNED: dict[Any, tuple[frozenset[str], Any]] = {}


def pinned_host_sharding(sharding: Any) -> Any:
    """``sharding`` in pinned host memory, on GPUs that have it; None elsewhere."""
    platforms = PINNED_HOST_PLATFORMS
    try:
        cached_for, found = _PINNED[sharding]
        if cached_for is platforms:
            return found
    except (KeyError, TypeError):
        pass
    found = None
    try:
        if all(d.platform in platforms
               and any(m.kind == "pinned_host" for m in d.addressable_memories())
               for d in sharding.device_set):
            found = sharding.with_memory_kind("pinned_host")
    except Exception:  # noqa: BLE001 - a jax or sharding without memory kinds: no such path
        found = None
    if len(_PINNED) < 256:
        with contextlib.suppress(TypeError):
            _PINNED[sharding] = (platforms, found)
    return found


class PinnedShards:
    """A device-resident jax.Array on its way to pinned host memory: the replica-0 shards this
    process saves, each (its index, its pinned-host copy), as :func:`host_copy` reads them."""

    __slots__ = ("array", "shards")

    def __init__(self, array: jax.Array, shards: list[tuple[Any, Any]]) -> None:
        self.array = array
        self.shards = shards


def start_transfers(values: list[Any], pinned: bool | None = None) -> list[Any]:
    """Starts the device-to-host copy of every device-resident jax.Array of ``values``,
    returning ``values`` with those going through pinned host memory
    (:data:`PINNED_HOST_TRANSFER`) replaced by :class:`PinnedShards`; the others get
    ``copy_to_host_async``. Only the replica-0 shards are moved, as only they are written.
    ``pinned``: the save's own choice (Orbax's ``enable_pinned_host_transfer``), if any."""
    use_pinned = PINNED_HOST_TRANSFER if pinned is None else pinned
    out = list(values)
    sources: list[Any] = []
    targets: list[Any] = []
    owners: list[tuple[int, Any]] = []  # (leaf, shard index) of each source
    for i, value in enumerate(values):
        if not isinstance(value, jax.Array) or _host_resident(value):
            continue
        if use_pinned and not value.is_deleted():
            if len(value.sharding.device_set) == 1:
                target = pinned_host_sharding(value.sharding)
                if target is not None:
                    sources.append(value)
                    targets.append(target)
                    owners.append((i, full_index(value.ndim)))
                    continue
            else:
                shards = [sh for sh in value.addressable_shards if sh.replica_id == 0]
                found = [pinned_host_sharding(sh.data.sharding) for sh in shards]
                if all(t is not None for t in found):
                    for sh, target in zip(shards, found, strict=True):
                        sources.append(sh.data)
                        targets.append(target)
                        owners.append((i, sh.index))
                    if not shards:  # (no replica-0 shard here: nothing of it to write)
                        out[i] = PinnedShards(value, [])
                    continue
        try:
            value.copy_to_host_async()
        except Exception:  # noqa: BLE001 - a hint only; np.asarray copies anyway
            pass
    if not sources:
        return out
    try:
        moved = jax.device_put(sources, targets)
    except Exception as exc:  # noqa: BLE001 - then the plain path, which reports real errors
        log.warning("moving %d arrays to pinned host memory failed (%s); they "
                    "are copied to pageable memory instead", len(sources), exc)
        for i in {i for i, _ in owners}:
            with contextlib.suppress(Exception):
                values[i].copy_to_host_async()
        return out
    for (i, index), m in zip(owners, moved, strict=True):
        if type(out[i]) is not PinnedShards:
            out[i] = PinnedShards(values[i], [])
        out[i].shards.append((index, m))
    return out


def _host_resident(value: Any) -> bool:
    """Whether a leaf's bytes are already in host memory (NumPy, scalars, CPU jax arrays)."""
    if isinstance(value, jax.Array):
        return cpu_sharding(value.sharding)[0]
    return True


def _nbytes(value: Any, dtype: np.dtype | None) -> int:
    if dtype is None and isinstance(value, np.ndarray):
        return value.nbytes
    dt = dtype if dtype is not None else value.dtype
    if not isinstance(dt, np.dtype):
        dt = np.dtype(dt)
    shape = getattr(value, "shape", ())  # Python scalars have none
    return math.prod(shape) * dt.itemsize


def total_bytes(leaves: Sequence[tuple[Any, str, np.dtype | None]]) -> int:
    """Bytes the staged ``leaves`` will take on the host."""
    return sum(_nbytes(v, d) for v, _, d in leaves)


class StagingStopped(Exception):
    """Raised in the staging thread when the save it stages was cancelled or failed."""


def stage_sync(
    leaves: Sequence[tuple[Any, str, np.dtype | None]],
    budget: ByteBudget,
    hand_over: Callable[[list[StoredArray], int], None],
    *,
    transfer: bool = True,
    stop: threading.Event | None = None,
    pinned: bool | None = None,
) -> None:
    """Runs in a worker thread: copies each leaf to host and hands them over, in order, in
    batches (with the bytes reserved for them in ``budget``). ``transfer=False``: every leaf
    is host-resident, no device-to-host copy to start. ``stop`` set: raises
    :class:`StagingStopped` before the next leaf."""
    todo: list[Any] = list(leaves)
    if transfer and budget.limit is None:
        # (under a budget each array's transfer starts as its bytes are admitted, below)
        moved = start_transfers([v for v, _, _ in leaves], pinned)
        todo = [(m, name, dtype) for m, (_, name, dtype) in zip(moved, leaves, strict=True)]
        del moved
    batch: list[StoredArray] = []
    reserved = 0  # (bytes of ``batch``, and under a budget those of the leaf being staged)
    bounded = budget.limit is not None
    ahead: dict[int, Any] = {}  # under a budget: leaves whose transfer started early
    ahead_bytes = 0  # (their bytes, admitted)
    waited: concurrent.futures.Future[None] | None = None  # (boosted: see below)
    try:
        for i in range(len(todo)):
            # (taken out of the list: a pinned-host transfer is the save's own memory, freed
            # once its array is written, not when staging ends)
            value, name, dtype = todo[i]
            todo[i] = None
            if stop is not None and stop.is_set():
                raise StagingStopped
            if bounded:  # (its bytes reserved before they are staged)
                n = _nbytes(value, dtype)
                if i in ahead:
                    value = ahead.pop(i)
                    ahead_bytes -= n
                else:
                    if budget.would_block(n):
                        if waited is None:
                            # From the first wait for the budget until staging ends, the
                            # save's caller waits for the commit's own writes: they run at
                            # the normal priority (``Runtime.boost``). At the background one,
                            # behind two busy processes on 2 cores, a save of 256 MiB under a
                            # 32 MiB budget blocked its caller 18-25 s rather than 0.1-0.5 s.
                            waited = concurrent.futures.Future()
                            get_runtime().boost(waited)
                        if batch:
                            # The held batch must be written before its bytes come back: hand
                            # it over. (Nothing is ahead here: those are the leaves right after.)
                            hand_over(batch, reserved)
                            batch, reserved = [], 0
                    budget.acquire(n)
                    if transfer:
                        (value,) = start_transfers([value], pinned)
                reserved += n
                if transfer:
                    # The next device arrays' transfers start while this one comes over, as
                    # far as the budget has room for them now.
                    j = i + 1 + len(ahead)
                    while j < len(todo):
                        nxt, _, nxt_dtype = todo[j]
                        if not isinstance(nxt, jax.Array) or _host_resident(nxt):
                            break
                        m = _nbytes(nxt, nxt_dtype)
                        if not budget.try_acquire(m):
                            break
                        ahead_bytes += m
                        (ahead[j],) = start_transfers([nxt], pinned)
                        j += 1
            try:
                # (into the batch, not a local too: a local would hold the last array handed
                # over while the next one is copied, past its release from the budget)
                batch.append(host_copy(value, name, dtype,
                                       own_memory=bounded and n >= OWN_MEMORY_MIN_BYTES))
            except Exception as exc:
                exc.add_note(f"(while copying leaf {name!r} to host memory)")
                raise
            value = None
            if not bounded:
                reserved += batch[-1].nbytes
            if reserved >= BATCH_BYTES or len(batch) >= BATCH_MAX_ARRAYS:
                hand_over(batch, reserved)
                batch, reserved = [], 0
        if batch:
            hand_over(batch, reserved)
    except BaseException:
        budget.release(reserved + ahead_bytes)  # (a batch not handed over is never written)
        raise
    finally:
        if waited is not None:
            waited.set_result(None)  # (the rest of the commit at the background priority)


async def cancel_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancels ``tasks`` and waits for them to end, however they end."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def stage(
    leaves: Sequence[tuple[Any, str, np.dtype | None]],
    budget: ByteBudget,
    write: Callable[[list[StoredArray]], Coroutine[Any, Any, None]],
    *,
    pinned: bool | None = None,
) -> list[asyncio.Task[None]]:
    """Stages ``leaves``; returns the write tasks, started as each batch reached the host."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    staged = False

    async def write_batch(batch: list[StoredArray], reserved: int) -> None:
        mark_background()  # the writes outlive save(): they run at the background priority
        # Let the engine loop go idle first, so that the caller's thread, woken by save()'s
        # result, takes the GIL at once instead of after the interpreter's switch interval
        # (5 ms) of our writes' Python work: until the caller's thread runs again, as a sync
        # save() says, rather than a fixed HANDOFF_DELAY (the durable commit of a 64-byte
        # save: 7.1 against 8.4 ms, in-process medians of 20). A batch handed over while
        # staging goes on waits the whole delay, as before: its caller is not back yet.
        await caller_back(HANDOFF_DELAY)
        rt = get_runtime()
        # Paced while other threads keep the CPU busy, once save() has returned (a batch
        # written while it stages may be what its memory budget waits for).
        async with rt.paced(reserved) if staged else contextlib.nullcontext():
            # Off the engine loop: the writes' Python work (tens of microseconds per small
            # array) runs at the background priority too, not at the caller's.
            await rt.in_background_loop(write, batch)

    def start_write(batch: list[StoredArray], reserved: int) -> None:
        task = loop.create_task(write_batch(batch, reserved))
        # (released when the task ends, however: also when it is cancelled before it ran)
        task.add_done_callback(lambda _: budget.release(reserved))
        tasks.append(task)

    def hand_over(batch: list[StoredArray], reserved: int) -> None:
        loop.call_soon_threadsafe(start_write, batch, reserved)

    if budget.limit is None and all(_host_resident(v) for v, _, _ in leaves):
        # Nothing to transfer: staging is a few microseconds per array, so it runs right here.
        # A worker thread would only fight the engine loop for the GIL (and lose by the
        # interpreter's 5 ms switch interval, again and again).
        try:
            stage_sync(leaves, budget, start_write, transfer=False)
            # A cancel that came while the loop was busy here (a KeyboardInterrupt in a sync
            # save(), a wait_for that timed out: its timer runs after this task's next step)
            # lands now, and abandons the save, as one during a threaded staging does.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        except BaseException:
            await cancel_all(tasks)  # (none has written yet)
            raise
        staged = True
        return tasks
    stop = threading.Event()
    job = asyncio.ensure_future(get_runtime().to_thread(
        functools.partial(stage_sync, leaves, budget, hand_over, stop=stop, pinned=pinned)))
    try:
        await asyncio.shield(job)
    except BaseException:
        # A cancelled save (or a failed leaf): the thread stops before its next leaf, and
        # nothing it handed over is left writing into the directory about to be removed.
        stop.set()
        await asyncio.gather(job, return_exceptions=True)
        await asyncio.sleep(0)  # let pending hand-overs land so they are cancelled too
        await cancel_all(tasks)
        raise
    await asyncio.sleep(0)  # the last call_soon_threadsafe callbacks run before we return
    staged = True
    return tasks
