"""The keys of ``multihost.Sync`` in the distributed key-value store, against a store kept in
this process (``tests/test_multihost.py`` runs real ``jax.distributed`` processes)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ckpt_async import multihost
from ckpt_async._runtime import get_runtime


class Store:
    """The distributed client's key-value calls that ``Sync`` makes; ``key_value_increment``
    waits for ``gate`` once ``entered`` is set (a store slow to answer)."""

    def __init__(self) -> None:
        self.keys: dict[str, str | int] = {}
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            assert allow_overwrite or key not in self.keys, key
            self.keys[key] = value

    def key_value_dir_get(self, directory: str) -> list[tuple[str, str | int]]:
        with self.lock:
            return [(k, v) for k, v in self.keys.items() if k.startswith(directory)]

    def key_value_increment(self, key: str, n: int) -> int:
        self.entered.set()
        assert self.gate.wait(30)
        with self.lock:
            value = int(self.keys.get(key, 0)) + n
            self.keys[key] = value
            return value

    def key_value_delete(self, directory: str) -> None:
        with self.lock:
            for key in [k for k in self.keys if k == directory or k.startswith(directory + "/")]:
                del self.keys[key]


@pytest.fixture
def store(monkeypatch):
    kv = Store()
    monkeypatch.setattr(multihost, "_client", lambda: kv)
    return kv


def test_a_cancel_while_leaving_still_deletes_the_operations_keys(store):
    """The last process to leave is cancelled again (twice) while it counts itself out: the
    operation's keys are deleted all the same, and the cancel is raised after."""
    sync = multihost.Sync("save:/ckpt/7", multihost.Roles(1, 2, 0), 5)
    store.keys.update({f"{sync.root}/written/0": "ok:", f"{sync.root}/written/1": "ok:",
                       f"{sync.root}/left": 1})  # (process 0 has left already)
    store.gate.clear()

    async def scenario() -> BaseException | None:
        async def save() -> None:
            try:
                await asyncio.Event().wait()  # (the save, until its caller cancels it)
            finally:
                await sync.leave()

        task = asyncio.ensure_future(save())
        await asyncio.sleep(0)
        task.cancel()
        await get_runtime().to_thread(store.entered.wait)
        for _ in range(2):  # (cancelled again while leave() waits for the store)
            task.cancel()
            await asyncio.sleep(0)
        store.gate.set()
        return (await asyncio.gather(task, return_exceptions=True))[0]

    assert isinstance(get_runtime().call(scenario), asyncio.CancelledError)
    assert store.keys == {}
