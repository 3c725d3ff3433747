"""Stage: copy every array into host memory, handing each to its writer as soon as it lands.

The device-to-host copies of all arrays are started at once (``copy_to_host_async``); one
worker thread then materialises them in order and hands each host copy to the engine loop,
which schedules its TensorStore write immediately, so transfers overlap writes. The staging
call returns when every array is on the host: from then on the caller may mutate, donate or
delete its arrays. An optional :class:`ByteBudget` bounds the bytes staged but not yet written.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ._runtime import get_runtime
from ._serialize import StoredArray


class ByteBudget:
    """Bytes staged but not yet written, bounded; ``acquire`` blocks the staging thread."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        if self.limit is None:
            return
        with self._cond:
            # One array larger than the whole budget still goes through, alone.
            while self._used > 0 and self._used + n > self.limit:
                self._cond.wait()
            self._used += n

    def release(self, n: int) -> None:
        if self.limit is None:
            return
        with self._cond:
            self._used -= n
            self._cond.notify_all()


def host_copy(value: Any, name: str, dtype: np.dtype | None) -> StoredArray:
    """A host snapshot of one leaf (jax.Array, np.ndarray or scalar), cast to ``dtype``.

    NumPy leaves are copied (the caller may mutate them in place). A jax.Array is immutable:
    its host view is the snapshot. On CPU that view aliases the device buffer, and holding it
    keeps the buffer alive: jax neither frees it on ``delete()`` nor reuses it for donation
    while an external reference exists (``tests/test_checkpointer.py`` checks both).
    """
    if isinstance(value, jax.Array):
        shards = []
        for shard in value.addressable_shards:
            if shard.replica_id != 0:
                continue
            host = np.asarray(shard.data)
            if dtype is not None and host.dtype != dtype:
                host = host.astype(dtype)
            shards.append((shard.index, host))
        chunks = shards[0][1].shape if shards else value.shape
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)
        return StoredArray(name, tuple(value.shape), out_dtype, tuple(chunks), tuple(shards))
    host = np.array(value, dtype=dtype, copy=True, order="C")
    full = tuple(slice(None) for _ in host.shape)
    return StoredArray(name, host.shape, host.dtype, host.shape, ((full, host),))


def stage_sync(
    leaves: Sequence[tuple[Any, str, np.dtype | None]],
    budget: ByteBudget,
    hand_over: Callable[[StoredArray], None],
) -> None:
    """Runs in a worker thread: copies each leaf to host and hands it over in order."""
    for value, _, _ in leaves:
        if isinstance(value, jax.Array):
            try:
                value.copy_to_host_async()
            except Exception:  # noqa: BLE001 - a hint only; np.asarray copies anyway
                pass
    for value, name, dtype in leaves:
        itemsize = np.dtype(dtype).itemsize if dtype is not None else np.dtype(value.dtype).itemsize
        budget.acquire(int(np.prod(np.shape(value), dtype=np.int64)) * itemsize)
        hand_over(host_copy(value, name, dtype))


async def stage(
    leaves: Sequence[tuple[Any, str, np.dtype | None]],
    budget: ByteBudget,
    write: Callable[[StoredArray], Any],
) -> list[asyncio.Task[None]]:
    """Stages ``leaves``; returns the write tasks, started as each array reached the host."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    async def write_then_release(arr: StoredArray) -> None:
        try:
            await write(arr)
        finally:
            budget.release(arr.nbytes)

    def hand_over(arr: StoredArray) -> None:
        loop.call_soon_threadsafe(lambda: tasks.append(loop.create_task(write_then_release(arr))))

    try:
        await get_runtime().to_thread(stage_sync, leaves, budget, hand_over)
    except BaseException:
        await asyncio.sleep(0)  # let pending hand-overs land so they are cancelled too
        for t in tasks:
            t.cancel()
        raise
    await asyncio.sleep(0)  # the last call_soon_threadsafe callbacks run before we return
    return tasks
