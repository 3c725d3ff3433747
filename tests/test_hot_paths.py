"""The per-array fast paths of save(): same results as the general code, no cyclic GC pass.

``_tree.flatten`` skips jax's registry lookup for known leaf types and builds names as it
walks; ``save()``'s blocking part runs with the cyclic collector paused (a full collection
there traverses every object in the process), and the collector's state is restored after.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async import _stage, _tree
from ckpt_async._runtime import INTERPRETER_FROZEN, gc_paused
from ckpt_async.handlers import pytree

Point = collections.namedtuple("Point", ["x", "y"])


@jax.tree_util.register_pytree_with_keys_class
class Custom:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("a"), self.a), (jax.tree_util.GetAttrKey("b"), self.b)), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_flatten_names_match_the_key_paths() -> None:
    tree = {"params": {"w": jnp.ones(3), 0: np.zeros(2), "n": None, "e": {}},
            "opt": [Point(np.float32(1), 2.5), (True, "s")], "c": Custom(jnp.zeros(1), 3)}
    leaves, skeleton = _tree.flatten(tree)
    assert [leaf.name for leaf in leaves] == [".".join(str(k) for k in leaf.keys) for leaf in leaves]
    assert {leaf.name for leaf in leaves} >= {"params.w", "params.0", "params.n", "params.e",
                                              "opt.0.x", "opt.0.y", "opt.1.0", "opt.1.1", "c.a", "c.b"}
    rebuilt = _tree.unflatten(skeleton, lambda i: leaves[i].value)
    assert isinstance(rebuilt["opt"][0], Point) and rebuilt["opt"][1][1] == "s"
    # A leaf at the root has the empty name.
    (root,), _ = _tree.flatten(np.ones(2))
    assert root.name == "" and root.keys == ()


def test_gc_pause_nests_and_restores_the_collector_state() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # the caller had it off: it stays off
    finally:
        gc.enable()


def test_staging_runs_with_the_collector_paused(tmp_path, monkeypatch) -> None:
    seen: list[bool] = []
    real = _stage.stage_sync

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(_stage, "stage_sync", spy)
    state = {f"p{i}": jnp.full((4,), i, jnp.float32) for i in range(50)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "x", args=ocp.args.StandardSave(state))
    assert seen == [False]
    assert gc.isenabled()
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "x")
    assert all(np.array_equal(out[k], v) for k, v in state.items())


@pytest.mark.parametrize("value,dtype,expected", [
    (jnp.ones((3, 5), jnp.bfloat16), None, 30),
    (np.ones((2, 2), np.float64), np.dtype(np.float32), 16),
    (np.float16(1), None, 2),
    (7, np.dtype(np.int64), 8),
])
def test_staged_byte_counts(value, dtype, expected) -> None:
    assert _stage.total_bytes([(value, "x", dtype)]) == expected


def _owner(a):
    """What finally holds an array's memory: an mmap, or None (NumPy's own allocation)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


@pytest.mark.parametrize("dtype", [None, np.dtype(np.float16)])
def test_an_own_copy_is_a_c_order_snapshot_in_a_mapping_of_its_own(dtype) -> None:
    import mmap

    source = (np.arange(2 << 18) % 2048).astype(np.float32).reshape(1024, 512).T  # 2 MiB, F-order
    staged = _stage.host_copy(source, "a", dtype, own_memory=True)
    (_index, host), = staged.shards
    assert isinstance(_owner(host), mmap.mmap) and host.flags.c_contiguous
    want = source.astype(dtype or source.dtype)
    assert host.dtype == want.dtype and np.array_equal(host, want)
    source[0, 0] = -1.0  # the caller's later changes do not reach the snapshot
    assert host[0, 0] == 0


def test_only_large_leaves_staged_under_a_budget_get_memory_of_their_own() -> None:
    import mmap

    leaves = [(np.ones(1 << 18, np.float32), "big", None), (np.ones(16, np.float32), "small", None)]
    for limit, owners in ((None, [None, None]), (8 << 20, [mmap.mmap, None])):
        batches: list = []
        _stage.stage_sync(leaves, _stage.ByteBudget(limit), lambda b, n: batches.append(b),
                          transfer=False)
        got = [_owner(a.shards[0][1]) for b in batches for a in b]
        assert [type(o) if o is not None else None for o in got] == owners, limit


def test_an_own_copy_falls_back_to_malloc_when_no_mapping_is_left(monkeypatch) -> None:
    import mmap

    def refuse(*_a, **_k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    source = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
    assert _stage.own_copy(source, None) is None
    (_index, host), = _stage.host_copy(source, "a", np.dtype(np.float64), own_memory=True).shards
    assert host.dtype == np.float64 and np.array_equal(host, source) and _owner(host) is None


def test_host_arrays_are_staged_without_a_transfer_hint(monkeypatch) -> None:
    calls = []
    arr = jnp.arange(8.0)
    monkeypatch.setattr(type(arr), "copy_to_host_async", lambda self: calls.append(1),
                        raising=True)
    batches: list = []
    _stage.stage_sync([(arr, "a", None)], _stage.ByteBudget(None),
                      lambda b, n: batches.append(b))
    assert calls == []  # on CPU the bytes are already on the host
    assert [a.name for b in batches for a in b] == ["a"]


def test_restore_runs_with_the_collector_paused(tmp_path, monkeypatch) -> None:
    from ckpt_async.handlers import pytree

    seen: list[bool] = []
    real = pytree._Reader.restore_as_saved

    async def spy(self):
        seen.append(gc.isenabled())
        return await real(self)

    monkeypatch.setattr(pytree._Reader, "restore_as_saved", spy)
    state = {"a": jnp.arange(4.0), "b": [np.ones(2), 3]}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "x", args=ocp.args.StandardSave(state))
        out = ckptr.restore(tmp_path / "x")
    assert seen == [False] and gc.isenabled()
    assert np.array_equal(out["a"], state["a"]) and out["b"][1] == 3


def test_heap_freeze_nests_and_leaves_a_callers_freeze_alone() -> None:
    from ckpt_async._runtime import heap_frozen

    assert gc.get_freeze_count() <= INTERPRETER_FROZEN  # (3.12's own, else none)
    with heap_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with heap_frozen():
            assert gc.get_freeze_count() <= frozen  # nested: nothing frozen twice
        assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own freeze (say, before forking workers)
    try:
        theirs = gc.get_freeze_count()
        with heap_frozen():
            pass
        # neither added to nor undone (frozen objects that die leave the count meanwhile)
        assert 0.9 * theirs < gc.get_freeze_count() <= theirs
    finally:
        gc.unfreeze()


def test_a_background_commit_runs_with_the_heap_frozen(tmp_path, monkeypatch) -> None:
    """While a commit runs, a collection (triggered in any thread, the training loop's
    included) skips the objects that existed when it began: measured on the quick `mixed`
    state, the longest collection during a commit fell from 54-60 ms to 1.4-1.7 ms."""
    from ckpt_async import _commit

    seen: list[int] = []
    real = _commit.commit

    async def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return await real(*args, **kwargs)

    monkeypatch.setattr(_commit, "commit", spy)
    state = {f"p{i}": jnp.full((4,), i, jnp.float32) for i in range(20)}
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "x", args=ocp.args.StandardSave(state))
        ckptr.wait_until_finished()
    assert len(seen) == 1 and seen[0] > 0
    assert gc.get_freeze_count() == 0  # thawed once the commit ended


def test_save_leaves_no_collection_for_the_end_of_its_blocking_part(tmp_path) -> None:
    """The commit's heap freeze begins before the collector resumes, so the thousands of
    objects the blocking part allocated are frozen rather than collected at once (a
    generation-0 pass over them took 4-10 ms of every 4,096-array save())."""
    import threading

    state = {f"p{i}": jnp.full((4,), i, jnp.float32) for i in range(3000)}
    collections_in_save: list[str] = []
    saving = threading.Event()

    def record(phase: str, info: dict) -> None:
        # (a collection over a frozen heap is the commit's own, cheap, and may run in its
        # threads before this thread is back from save() on a loaded machine)
        if phase == "start" and saving.is_set() and \
                gc.get_freeze_count() <= INTERPRETER_FROZEN:
            collections_in_save.append(threading.current_thread().name)

    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "warm", args=ocp.args.StandardSave(state))
        ckptr.wait_until_finished()
        gc.callbacks.append(record)
        try:
            saving.set()
            ckptr.save(tmp_path / "x", args=ocp.args.StandardSave(state))
            saving.clear()
        finally:
            gc.callbacks.remove(record)
        ckptr.wait_until_finished()
    assert collections_in_save == []
    assert gc.get_freeze_count() == 0
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "x")
    assert all(np.array_equal(out[k], v) for k, v in state.items())


def test_deferred_placement_matches_one_put_per_array() -> None:
    from ckpt_async.handlers.pytree import _Deferred, _put_deferred

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = [np.arange(3.0), np.ones((2, 2), np.int8), np.float32(2)]
    values = ["kept", _Deferred(arrays[0], None), _Deferred(arrays[1], sharding),
              _Deferred(np.asarray(arrays[2]), None)]
    out = _put_deferred(values)
    assert out[0] == "kept"
    for got, want, committed in zip(out[1:], arrays, (False, True, False), strict=True):
        assert isinstance(got, jax.Array)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.committed is committed  # as jax.device_put(arr[, sharding]) leaves it


def _four_devices() -> jax.sharding.Sharding:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.array(jax.devices()[:4]), ("x",)), PartitionSpec("x"))


def _put_many_cases() -> tuple[list[np.ndarray], list]:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    arrays = [np.arange(3.0, dtype=np.float32), np.ones((2, 3, 4), jnp.bfloat16),
              np.asarray(np.int8(7)), np.zeros(0, np.int32), np.array([True, False]),
              np.arange(4.0),  # float64 without x64: jax makes it float32 (a copy)
              np.arange(8, dtype=np.uint16), np.arange(12, dtype=np.float32)[::2]]
    shardings = [None, one, one, None, one, one, _four_devices(), None]
    return arrays, shardings


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "jax.device_put"])
def test_device_put_many_matches_jax_device_put(monkeypatch, direct: bool) -> None:
    if not direct:
        monkeypatch.setattr(pytree, "_batched_device_put", None)
    arrays, shardings = _put_many_cases()
    got = pytree.device_put_many(arrays, shardings)
    for arr, sharding, g in zip(arrays, shardings, got, strict=True):
        want = jax.device_put(arr) if sharding is None else jax.device_put(arr, sharding)
        assert isinstance(g, jax.Array)
        assert (g.aval, g.sharding, g.committed) == (want.aval, want.sharding, want.committed)
        assert g.aval.weak_type is False
        assert np.asarray(g).tobytes() == np.asarray(want).tobytes()
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x * 2)(g)),
                                      np.asarray(want) * 2)


def test_device_put_many_adopts_aligned_cpu_buffers_directly(monkeypatch) -> None:
    from ckpt_async import _serialize

    bufs = _serialize.host_buffers([((256,), np.dtype(np.float32))] * 3)
    for i, b in enumerate(bufs):
        b[:] = i
    calls: list[int] = []
    real = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: calls.append(1) or real(x, *a, **k))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = pytree.device_put_many(bufs, [one] * 3)
    assert calls == []  # no array went through jax.device_put
    for b, g in zip(bufs, got, strict=True):
        assert g.unsafe_buffer_pointer() == b.ctypes.data  # adopted, not copied
        np.testing.assert_array_equal(np.asarray(g), b)


def test_device_put_many_falls_back_when_the_direct_placement_fails(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise TypeError("incompatible internals")

    monkeypatch.setattr(pytree, "_batched_device_put", broken)
    arrays, shardings = _put_many_cases()
    for arr, g in zip(arrays, pytree.device_put_many(arrays, shardings), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.device_put(arr)))


def test_restore_defers_small_arrays_and_ones_bound_for_one_cpu_device() -> None:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from ckpt_async import _serialize
    from ckpt_async.handlers.pytree import _Deferred, _put

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    four = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("x",)), PartitionSpec("x"))
    big = np.zeros(_serialize.DIRECT_READ_MAX_BYTES // 4 + 4, np.float32)
    small = np.zeros(8, np.float32)
    assert type(_put(big, one)) is _Deferred  # adopted: waiting costs no memory
    assert type(_put(small, four)) is _Deferred and type(_put(small, None)) is _Deferred
    # copied into several devices' buffers (or placed by default): placed at once, so the
    # host copy can go before more is read
    assert isinstance(_put(big, four), jax.Array) and isinstance(_put(big, None), jax.Array)


# -- the restore window: FIFO, each waiter woken once, cancellation gives bytes back ------------
def test_read_window_admits_in_order_within_its_limit() -> None:
    from ckpt_async.handlers.pytree import _ByteWindow

    async def main() -> tuple[list[int], int]:
        window = _ByteWindow(10)
        order: list[int] = []
        peak = 0

        async def read(i: int, n: int) -> None:
            nonlocal peak
            async with window.hold(n):
                order.append(i)
                # over the limit only when held alone
                assert window.used <= window.limit or window.used == n
                peak = max(peak, window.used)
                await asyncio.sleep(0.001 * (5 - i % 3))

        await asyncio.gather(*(read(i, n) for i, n in enumerate([6, 6, 3, 20, 1, 4, 5])))
        assert window.used == 0 and not window._waiting
        return order, peak

    order, peak = asyncio.run(main())
    assert order == list(range(7))
    assert peak == 20  # the large one, alone


def test_read_window_cancellation_gives_bytes_back_and_lets_others_in() -> None:
    from ckpt_async.handlers.pytree import _ByteWindow

    async def main() -> list[str]:
        window = _ByteWindow(10)
        seen: list[str] = []

        async def read(name: str, n: int, wait: asyncio.Event) -> None:
            async with window.hold(n):
                seen.append(name)
                await wait.wait()

        go = asyncio.Event()
        first = asyncio.create_task(read("first", 8, go))
        await asyncio.sleep(0)
        blocked = asyncio.create_task(read("blocked", 8, go))  # waits behind "first"
        behind = asyncio.create_task(read("behind", 2, go))  # FIFO: waits behind "blocked"
        await asyncio.sleep(0.01)
        assert seen == ["first"]
        blocked.cancel()  # cancelled while waiting: "behind" now fits next to "first"
        await asyncio.sleep(0.01)
        assert seen == ["first", "behind"] and window.used == 10
        first.cancel()  # cancelled while holding: its bytes come back
        go.set()
        await asyncio.gather(first, blocked, behind, return_exceptions=True)
        assert window.used == 0 and not window._waiting
        return seen

    assert asyncio.run(main()) == ["first", "behind"]


def test_restore_through_a_window_smaller_than_any_array_is_exact(tmp_path, monkeypatch) -> None:
    from ckpt_async.handlers import pytree

    monkeypatch.setattr(pytree, "READ_WINDOW_BYTES", 1)
    monkeypatch.setattr(pytree.ser, "DIRECT_READ_MAX_BYTES", 0)  # every array through the window
    state = {f"a{i}": np.arange(1000 * (i + 1), dtype=np.float32) * i for i in range(6)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
        out = ckptr.restore(tmp_path / "c")
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(out[k]), v)


def test_arrays_restored_onto_one_cpu_device_are_placed_in_one_batch(tmp_path,
                                                                     monkeypatch) -> None:
    state = {f"w{i}": jnp.arange((1 << 18) + i, dtype=jnp.float32) * i for i in range(5)}
    state["small"] = jnp.ones(3)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
        calls: list[int] = []
        put = pytree.device_put_many

        def counting_put(arrays, shardings):
            calls.append(len(arrays))
            return put(arrays, shardings)

        monkeypatch.setattr(pytree, "device_put_many", counting_put)
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        out = ckptr.restore(tmp_path / "c", target)
    assert calls == [6]  # every array, large ones (read one by one) included, in one batch
    for k, v in state.items():
        assert out[k].sharding == v.sharding and out[k].committed
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(v))


def test_a_failure_while_staging_leaves_no_file_behind(tmp_path, monkeypatch):
    """The write tasks of the batches staged before a leaf failed never run: nothing is
    written into the directory the failed save removes."""
    import os

    monkeypatch.setattr(_stage, "BATCH_BYTES", 64 << 10)
    real = _stage.host_copy
    calls = []

    def failing(value, name, dtype, **kwargs):
        calls.append(name)
        if len(calls) == 7:
            raise MemoryError("no room for the copy")
        return real(value, name, dtype, **kwargs)

    monkeypatch.setattr(_stage, "host_copy", failing)
    from ckpt_async import _ocdbt
    written = []
    monkeypatch.setattr(_ocdbt.DatabaseWriter, "write", lambda self, f, **_: written.append(f))
    state = {f"p{i}": np.full((8192,), i, np.float32) for i in range(8)}
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        with pytest.raises(MemoryError, match="no room"):
            ckptr.save(tmp_path / "x", args=ocp.args.StandardSave(state))
        time.sleep(0.2)  # (time enough for a stray write task to run)
    assert written == []
    assert os.listdir(tmp_path) == []


def test_local_saves_and_restores_of_own_checkpoints_make_no_tensorstore_context(
        tmp_path, monkeypatch) -> None:
    """A local save, and a restore of what ckpt_async wrote, read and write without
    TensorStore: no context is made (the first one in a cold process pages in its code), the
    index comes from the B+tree nodes, and the documents are read concurrently."""
    from ckpt_async import _ocdbt
    from ckpt_async import _serialize as ser

    state = {"w": np.arange(4096, dtype=np.float32), "b": {"x": np.ones((8, 8), np.int32)},
             "j": jnp.arange(100, dtype=jnp.bfloat16)}
    made: list[int] = []
    real = ser.new_context
    monkeypatch.setattr(ser, "new_context", lambda: made.append(1) or real())
    monkeypatch.setattr(_ocdbt.ts.ocdbt, "dump", None)  # (any call would raise)
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        out = mngr.restore(1, args=ocp.args.StandardRestore(abstract))
        as_saved = mngr.restore(1)
    assert made == []
    for tree in (out, as_saved):
        for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(state)):
            assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))


def test_a_freeze_made_before_import_is_the_callers_and_left_alone() -> None:
    # (the interpreter's own frozen objects, 375 static tuples on CPython 3.12.1, are not)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import gc
        gc.freeze()  # the caller's, before ckpt_async is imported
        theirs = gc.get_freeze_count()
        from ckpt_async import _runtime
        assert _runtime.INTERPRETER_FROZEN == 0, _runtime.INTERPRETER_FROZEN
        with _runtime.heap_frozen():
            pass
        assert gc.get_freeze_count() > 0.9 * theirs, (gc.get_freeze_count(), theirs)
        print('ok')
    """)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
