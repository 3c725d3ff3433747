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
        self.lock = threading.Condition()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            assert allow_overwrite or key not in self.keys, key
            self.keys[key] = value
            self.lock.notify_all()

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str | int:
        with self.lock:
            assert self.lock.wait_for(lambda: key in self.keys, timeout_ms / 1000), key
            return self.keys[key]

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


def held(module) -> dict[str, int]:
    """The sizes of ``module``'s containers."""
    return {name: len(value) for name, value in vars(module).items()
            if isinstance(value, dict | list | set)}


def test_operations_leave_nothing_behind_in_the_process_or_the_store(store):
    """A long run names a new operation at every step: neither this module nor the store
    keeps anything of the operations once every process has left them."""
    before = held(multihost)

    async def run() -> None:
        for step in range(500):
            sync = multihost.Sync(f"save:/ckpt/{step}", multihost.Roles(0, 1, 0), 5)
            assert await sync.arrive("written", note=str(step)) == {0: str(step)}
            await sync.leave()

    get_runtime().call(run)
    assert held(multihost) == before
    assert store.keys == {}


def test_a_name_used_again_has_the_same_keys_on_every_process_and_no_stale_ones(store):
    """The same operation called again (a step's decision taken twice) on two processes: the
    primary, which never waits for the other to read its decision, calls it again before
    the other has read the first; each process reads each use's own value, and the second
    use's keys are written only once both have left the first."""
    what = "decide:/run:7"

    async def primary() -> None:
        for decision in ("skip", "save"):
            sync = multihost.Sync(what, multihost.Roles(0, 2, 0), 5)
            assert await sync.broadcast("decision", decision) == decision
            await sync.leave()

    async def other(read: list[str]) -> None:
        await get_runtime().to_thread(store.blocking_key_value_get,
                                      f"ckpt_async/{what}:op/decision/0", 5000)
        await asyncio.sleep(0.05)  # (the primary meanwhile calls it again, and waits)
        for _ in range(2):
            sync = multihost.Sync(what, multihost.Roles(1, 2, 0), 5)
            read.append(await sync.broadcast("decision"))
            await sync.leave()

    async def run() -> list[str]:
        read: list[str] = []
        await asyncio.gather(primary(), other(read))
        return read

    assert get_runtime().call(run) == ["skip", "save"]
    assert store.keys == {}


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
