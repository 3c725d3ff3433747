"""Background commits are paced while the process's other threads keep the CPU busy (Linux).

The runtime measures the CPU time the process uses beyond ckpt_async's and TensorStore's own
threads (``Runtime.observe_cpu``); while that is high, a commit's batches go one at a time, no
faster than ``set_background_pace`` bytes per second, and at full speed again as soon as the
other threads rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async import _ocdbt as ocdbt
from ckpt_async import _runtime, _stage
from ckpt_async import _serialize as ser
from ckpt_async._runtime import get_runtime
from ckpt_async.handlers import pytree

linux_only = pytest.mark.skipif(not _runtime._CAN_SET_PRIORITY, reason="Linux thread clocks")


def _spin(seconds: float, own: bool = False, rt: _runtime.Runtime | None = None) -> float:
    """Keeps a core busy in a new thread (one of ckpt_async's own, with ``own``), then
    observes the CPU (of ``rt``, default the process's runtime) while that thread exists;
    returns the CPU time the thread had (on a loaded machine, less than ``seconds``)."""
    rt = rt or get_runtime()
    spun, leave = threading.Event(), threading.Event()
    used: list[float] = []

    def run() -> None:
        if own:
            rt._own_tids.add(threading.get_native_id())
        begin, end = time.thread_time(), time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        used.append(time.thread_time() - begin)
        spun.set()
        leave.wait()

    t = threading.Thread(target=run)
    t.start()
    spun.wait()
    rt.observe_cpu()
    leave.set()
    t.join()
    return used[0]


@pytest.fixture
def pace():
    before = _runtime.background_pace()
    yield ocp.set_background_pace
    ocp.set_background_pace(before)


def test_the_pace_comes_from_the_environment_or_the_cpus(monkeypatch, pace) -> None:
    default = 32 * 2**20 * _runtime._usable_cpus()
    monkeypatch.delenv(_runtime.PACE_ENV, raising=False)
    assert _runtime._pace_from_env() == default
    for value, expected in [("268435456", 268435456.0), ("0", None), ("fast", default)]:
        monkeypatch.setenv(_runtime.PACE_ENV, value)
        assert _runtime._pace_from_env() == expected
    pace(0)
    assert _runtime.background_pace() is None
    with pytest.raises(ValueError, match="background pace"):
        pace(-1)


@linux_only
def test_the_other_threads_cpu_is_measured_and_ours_is_not() -> None:
    rt = get_runtime()
    rt.observe_cpu()  # (the window starts here, not at whatever ran before this test)
    time.sleep(0.6)  # an idle window
    rt.observe_cpu()
    assert rt.foreground_cores < 0.2
    start = time.monotonic()
    used = _spin(0.3)
    # About the core the thread had (one on an idle machine, less beside other processes),
    # averaged with the idle past.
    assert rt.foreground_cores > 0.5 * used / (time.monotonic() - start) > 0.1
    _spin(0.3, own=True)
    assert rt.foreground_cores < 0.3  # ckpt_async's own work does not count


@linux_only
def test_a_commits_jobs_started_at_once_count_as_ours() -> None:
    # start_background (a commit's B+tree and documents) runs in threads that live on: one
    # that ended between two observations would have its CPU time counted as the foreground's.
    rt = get_runtime()
    rt.observe_cpu()
    time.sleep(0.6)  # an idle window
    rt.observe_cpu()

    def job() -> int:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        return threading.get_native_id()

    tid = rt.start_background(job).result()
    rt.observe_cpu()
    assert rt.foreground_cores < 0.3
    assert tid in rt._own_tids
    assert any(t.native_id == tid and t.is_alive() for t in threading.enumerate())


def _run_batches(count: int, nbytes: int) -> list[tuple[float, float]]:
    """Runs ``count`` concurrent batches through the pacer; their (start, end) times."""
    rt = get_runtime()
    times: list[tuple[float, float]] = []

    async def batch() -> None:
        async with rt.paced(nbytes):
            start = time.monotonic()
            await asyncio.sleep(0.01)
            times.append((start, time.monotonic()))

    async def main() -> None:
        await asyncio.gather(*(batch() for _ in range(count)))

    rt.call(main)
    return sorted(times)


def test_paced_batches_go_one_at_a_time_at_the_pace(monkeypatch, pace) -> None:
    monkeypatch.setattr(get_runtime(), "_can_pace", True)
    monkeypatch.setattr(get_runtime(), "_busy", True)
    pace(1_000_000)
    times = _run_batches(4, 50_000)  # 50 ms each at the pace
    for (s0, e0), (s1, _e1) in zip(times, times[1:]):
        assert s1 >= e0  # one at a time
        assert s1 - s0 >= 0.05 * 0.95  # (the pacer's clock starts a moment before ours)


def test_unpaced_batches_run_together(monkeypatch, pace) -> None:
    monkeypatch.setattr(get_runtime(), "_busy", False)
    pace(1_000_000)
    times = _run_batches(4, 50_000)
    assert max(s for s, _ in times) < min(e for _, e in times)  # all in flight at once
    monkeypatch.setattr(get_runtime(), "_busy", True)
    pace(None)  # no pace set: busy or not, nothing waits
    times = _run_batches(4, 50_000)
    assert max(s for s, _ in times) < min(e for _, e in times)


@linux_only
@pytest.mark.parametrize("waited", [False, "by another thread", True])
def test_a_commit_beside_a_busy_thread_is_paced_unless_its_saver_waits(
        tmp_path, monkeypatch, pace, waited) -> None:
    # Not waited for (the caller polls) or waited for by another thread, its batches go one at
    # a time at the pace; waited for by the thread that saved, with wait_until_finished, the
    # commit is hurried: every batch goes at once, though the other thread still trains, and
    # the next commit is paced again.
    monkeypatch.setattr(_runtime, "PACE_BUSY_SHARE", 0.1)
    monkeypatch.setattr(_runtime, "PACE_IDLE_SHARE", 0.05)
    monkeypatch.setattr(_stage, "BATCH_BYTES", 1)  # one array per batch
    nbytes, count = 64 << 10, 6
    pace(nbytes / 0.05)  # a batch every 50 ms at most
    writes: list[tuple[float, float]] = []
    write = ser.ItemWriter.write

    async def logged(self, batch):
        start = time.monotonic()
        await write(self, batch)
        writes.append((start, time.monotonic()))

    monkeypatch.setattr(ser.ItemWriter, "write", logged)
    state = {f"a{i}": np.full(nbytes // 4, i, np.float32) for i in range(count)}
    stop = threading.Event()

    def train() -> None:  # a training loop's CPU time
        while not stop.is_set():
            pass

    with ocp.StandardCheckpointer() as other:  # (another checkpointer: no save interval)
        other.save(tmp_path / "warm", args=ocp.args.StandardSave({"x": np.ones(3)}))
    # the next commit looks back from the end of that one
    writes.clear()
    with contextlib.ExitStack() as stack:
        ckptr = stack.enter_context(ocp.StandardCheckpointer())
        trainer = threading.Thread(target=train)
        trainer.start()
        try:
            time.sleep(0.3)
            ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(state))
            if waited == "by another thread":
                waiter = threading.Thread(target=ckptr.wait_until_finished)
                waiter.start()
                waiter.join()
            elif waited:
                ckptr.wait_until_finished()
                hurried = list(writes)
                writes.clear()
                # The process's next commit beside the training is paced again. (Another
                # checkpointer's, whose first commit may be paced for half its timeout: this
                # one's next commit only for half the time since its last save, which a loaded
                # machine's slow batches could outlast.)
                ckptr = stack.enter_context(ocp.StandardCheckpointer())
                ckptr.save(tmp_path / "d", args=ocp.args.StandardSave(state))
            while ckptr.async_checkpointer.is_saving_in_progress():
                time.sleep(0.01)
        finally:
            stop.set()
            trainer.join()
        restored = ckptr.restore(tmp_path / "c")
    writes.sort()
    assert len(writes) == count
    for (s0, e0), (s1, _e1) in zip(writes, writes[1:]):
        assert s1 >= e0  # one batch at a time
    assert writes[-1][0] - writes[0][0] >= (count - 1) * 0.05 * 0.9
    if waited is True:  # hurried: the held batches went together, not one at a time
        hurried.sort()
        assert len(hurried) == count
        assert any(s1 < e0 for (_s0, e0), (s1, _e1) in zip(hurried, hurried[1:]))
    for name, arr in state.items():
        np.testing.assert_array_equal(restored[name], arr)


def test_a_paced_batchs_writer_holds_each_piece_to_the_pace(monkeypatch, pace) -> None:
    rt = get_runtime()
    monkeypatch.setattr(rt, "_can_pace", True)
    monkeypatch.setattr(rt, "_busy", True)
    pace(1_000_000)
    held: list[float] = []

    def writer(batch: _runtime.BatchPace) -> None:  # a batch's thread, after each piece
        for done in (100_000, 200_000, 300_000):
            batch.hold(done)
            held.append(time.monotonic())

    async def main() -> tuple[float, float]:
        assert _runtime.batch_pace.get() is None  # (only around a paced batch)
        window = _runtime.PaceWindow(None)
        token = _runtime.pace_window.set(window)
        try:
            async with rt.paced(300_000):
                start = time.monotonic()
                batch = _runtime.batch_pace.get()
                assert batch is not None
                await asyncio.to_thread(writer, batch)
                window.close()  # (the next save, or a waiting saver): no more holding
                closed = time.monotonic()
                batch.hold(10**9)
                return start, time.monotonic() - closed
        finally:
            _runtime.pace_window.reset(token)

    start, after_close = rt.call(main)
    for due, at in zip((0.1, 0.2, 0.3), held, strict=True):
        assert due * 0.95 <= at - start < due + 0.2  # (not held for more than its due)
    assert after_close < 0.05


@pytest.fixture
def direct_opens(monkeypatch) -> list[str]:
    """The files _ocdbt opens with O_DIRECT (whether the file system then takes it or not);
    a save's are under its temporary directory."""
    opened: list[str] = []
    real_open = ocdbt.os.open

    def opening(path, flags, *a):
        if flags & getattr(ocdbt.os, "O_DIRECT", 0):
            opened.append(str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(ocdbt.os, "open", opening)
    return opened


@linux_only
@pytest.mark.parametrize("where", ["page cache", "past it"])
def test_a_paced_commit_writes_its_pieces_at_the_pace(tmp_path, monkeypatch, pace, where,
                                                      direct_opens) -> None:
    # One 2 MiB array is one batch: at 4 MiB/s its two 1 MiB pieces go a quarter second
    # apart, rather than together followed by a pause. Where the file system takes O_DIRECT
    # a paced batch is written past the page cache (the kernel's work for a write through it
    # would run at the caller's priority); elsewhere through it, at the same pace.
    rt = get_runtime()
    monkeypatch.setattr(rt, "_can_pace", True)
    monkeypatch.setattr(rt, "_busy", True)
    monkeypatch.setattr(rt, "observe_cpu", lambda: None)  # (busy, whatever the CPU does)
    monkeypatch.setattr(ser, "DIRECT_IO_FILE_SYSTEMS", frozenset(
        {ser.storage.file_system_type(tmp_path)} if where == "past it" else ()))
    monkeypatch.setattr(ocdbt, "DIRECT_PIECE_BYTES", ocdbt.WRITE_PIECE_BYTES)
    pace(4 << 20)
    pieces: list[float] = []
    starts: list[float] = []  # (each paced batch's clock: its pieces are due from there)
    write_all = ocdbt._write_all

    class Clocked(_runtime.BatchPace):
        def __init__(self, rt, window, start) -> None:
            starts.append(start)
            super().__init__(rt, window, start)

    def logged(fd, group):
        n = write_all(fd, group)
        if n == ocdbt.WRITE_PIECE_BYTES:
            pieces.append(time.monotonic())
        return n

    monkeypatch.setattr(ocdbt, "_write_all", logged)
    monkeypatch.setattr(_runtime, "BatchPace", Clocked)
    state = {"w": np.arange(2 << 18, dtype=np.float32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(state))
        while ckptr.async_checkpointer.is_saving_in_progress():  # (waiting would hurry it)
            time.sleep(0.01)
        restored = ckptr.restore(tmp_path / "c")
    assert len(pieces) == 2 and len(starts) == 1
    # the second piece is due a quarter second after the batch's clock started (the first
    # may be late on a loaded machine, the second then follows sooner: the pace is kept)
    assert pieces[1] - starts[0] >= 0.25 * 0.99
    np.testing.assert_array_equal(restored["w"], state["w"])
    written = [p for p in direct_opens if ".orbax-checkpoint-tmp-" in p]  # (not the restore's)
    assert len(written) == (where == "past it")


@linux_only
def test_an_unpaced_commit_goes_through_the_page_cache(tmp_path, monkeypatch, direct_opens
                                                       ) -> None:
    rt = get_runtime()
    monkeypatch.setattr(rt, "_busy", False)
    monkeypatch.setattr(rt, "observe_cpu", lambda: None)  # (idle, whatever the CPU does)
    monkeypatch.setattr(ser, "DIRECT_IO_FILE_SYSTEMS",
                        frozenset({ser.storage.file_system_type(tmp_path)}))
    state = {"w": np.arange(2 << 18, dtype=np.float32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(state))
        ckptr.wait_until_finished()
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "c")["w"], state["w"])
    assert [p for p in direct_opens if ".orbax-checkpoint-tmp-" in p] == []


@pytest.mark.parametrize("release", ["the other threads rest", "its window closed in time",
                                     "the next save closed its window"])
def test_a_held_batch_goes_as_soon_as(monkeypatch, pace, release) -> None:
    rt = get_runtime()
    monkeypatch.setattr(rt, "_can_pace", True)
    monkeypatch.setattr(rt, "_busy", True)
    pace(1.0)  # one byte per second: the second batch would wait a day
    order: list[str] = []

    async def main() -> None:
        async def batch(name: str) -> None:
            async with rt.paced(86_400):
                order.append(name)

        # (set as the checkpointer sets it: the write tasks copy it with the context)
        window = _runtime.PaceWindow(
            time.monotonic() + 0.2 if release == "its window closed in time" else None)
        token = _runtime.pace_window.set(window)
        try:
            tasks = [asyncio.ensure_future(batch(n)) for n in ("first", "second")]
        finally:
            _runtime.pace_window.reset(token)
        await asyncio.sleep(0.05)
        assert order == ["first"] and not any(t.done() for t in tasks)
        if release == "the other threads rest":
            rt._busy = False  # what observe_cpu decides when they go quiet
        elif release == "the next save closed its window":
            window.close()
        ticks = asyncio.ensure_future(tick())  # the scan tick's wake-ups, without a commit
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        ticks.cancel()

    async def tick() -> None:
        while True:
            await asyncio.sleep(_runtime._SCAN_INTERVAL)
            rt.wake_paced()

    rt.call(main)
    assert order == ["first", "second"]


def test_a_commit_is_paced_for_half_its_timeout_or_half_the_time_since_the_last_save(
        tmp_path, monkeypatch) -> None:
    # (time, window, its end when the save staged: closing the checkpointer waits for the
    # commit, and that closes its window)
    seen: list[tuple[float, _runtime.PaceWindow, float | None]] = []
    stage = pytree.stage

    async def spy(*args, **kwargs):
        window = _runtime.pace_window.get()
        seen.append((time.monotonic(), window, window.until))
        return await stage(*args, **kwargs)

    monkeypatch.setattr(pytree, "stage", spy)
    for timeout in (40.0, None):
        with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                   async_options=ocp.AsyncOptions(timeout_secs=timeout)) as ck:
            for i in range(2):
                if i:
                    time.sleep(0.4)
                ck.save(tmp_path / f"{timeout}-{i}", args=ocp.args.StandardSave({"x": np.ones(3)}))
        (t0, first, _), (t1, _second, until) = seen[-2:]
        assert first.until == 0.0  # the second save closed the first one's window
        gap = t1 - t0  # between the two saves: 0.4 s and the first's staging
        assert until is not None and gap >= 0.4
        # Paced for half of it at most (measured here between the stagings, there between the
        # save() calls: on a loaded machine those differ by tens of ms; a whole gap or half
        # the timeout would be 0.2 s or 20 s off).
        assert abs((until - t1) - gap / 2) < 0.1
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                               async_options=ocp.AsyncOptions(timeout_secs=40.0)) as ck:
        ck.save(tmp_path / "once", args=ocp.args.StandardSave({"x": np.ones(3)}))
    t, _window, until = seen[-1]
    assert until is not None and 19 <= until - t <= 20  # half the timeout
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                               async_options=ocp.AsyncOptions(timeout_secs=None)) as ck:
        ck.save(tmp_path / "unbounded", args=ocp.args.StandardSave({"x": np.ones(3)}))
    assert seen[-1][2] is None  # nothing bounds a first save without a timeout


def test_no_pacing_where_other_threads_cpu_clocks_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(_runtime, "_thread_cpu", lambda tid: None)  # (a sandbox's answer)
    rt = _runtime.Runtime()
    try:
        rt._busy = True
        assert not rt._can_pace and not rt.pacing() and rt._cpu_seen is None
    finally:
        rt.shutdown()


@linux_only
def test_the_first_commit_looks_back_to_the_runtimes_start() -> None:
    start = time.monotonic()
    rt = _runtime.Runtime()
    try:
        assert rt._can_pace and rt._cpu_seen is not None
        used = _spin(0.3, rt=rt)  # (a training loop before the first save)
        assert rt.foreground_cores > 0.5 * used / (time.monotonic() - start) > 0.1
    finally:
        rt.shutdown()


@pytest.mark.parametrize("how", ["wait_until_finished", "close", "restore", "synchronous save",
                                 "wait_until_finished in another thread"])
def test_a_manager_hurries_the_commit_its_saver_waits_for(tmp_path, monkeypatch, how) -> None:
    # The thread that saved waiting for the commit in flight closes its pace window; another
    # thread waiting does not; once the commit is done its window is closed, and a hurry
    # (the close below) finds nothing to do.
    from ckpt_async._checkpointer import AsyncCheckpointer

    hurried: list[tuple[bool, bool]] = []  # (window open before, after) each hurry
    hurry = AsyncCheckpointer.hurry

    def spy(self) -> None:
        before = self._window.open()
        hurry(self)
        hurried.append((before, self._window.open()))

    monkeypatch.setattr(AsyncCheckpointer, "hurry", spy)
    gate = threading.Event()  # holds the commit in flight until the caller waits
    write = ser.ItemWriter.write

    async def held(self, batch):
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
        await write(self, batch)

    monkeypatch.setattr(ser.ItemWriter, "write", held)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=how != "synchronous save")
    state = {"x": np.arange(4.0)}
    mngr = ocp.CheckpointManager(tmp_path, options=options)
    threading.Timer(0.2, gate.set).start()
    mngr.save(0, args=ocp.args.StandardSave(state))
    if how == "wait_until_finished":
        mngr.wait_until_finished()
    elif how == "wait_until_finished in another thread":
        waiter = threading.Thread(target=mngr.wait_until_finished)
        waiter.start()
        waiter.join()
    elif how == "close":
        mngr.close()
    elif how == "restore":
        np.testing.assert_array_equal(mngr.restore(0)["x"], state["x"])
    mngr.close()  # (again, or the first time: the commit is done either way)
    if how == "wait_until_finished in another thread":
        assert hurried == [(False, False)]  # only the close, after the commit
    else:
        assert hurried == [(True, False), (False, False)]  # closed while the commit ran
    np.testing.assert_array_equal(
        ocp.CheckpointManager(tmp_path).restore(0, args=ocp.args.StandardRestore())["x"],
        state["x"])
