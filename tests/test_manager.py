"""CheckpointManager (sync face) and AsyncCheckpointManager (async face): futures, in-flight
saves, failures, retention after commit, items and handlers, options, metadata."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import jax
import numpy as np
import pytest
from _checks import fail_host_copy
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp
import ckpt_async._commit as ca_commit
import ckpt_async.aio
from ckpt_async import _format as fmt
from ckpt_async import _storage
from ckpt_async._runtime import CommitFuture
from ckpt_async.errors import (
    ClosedError,
    CommitError,
    CommitTimeoutError,
    CorruptCheckpointError,
    HandlerError,
    InvalidArgumentError,
    ItemNotFoundError,
    StepAlreadyExistsError,
    StepNotFoundError,
    UnsupportedLeafError,
)

LIMIT_S = 10


def tree(step: int) -> dict:
    return {"a": np.arange(6, dtype=np.float32).reshape(2, 3) + step, "b": np.int64(step)}


def steps_on_disk(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p != fmt.ROOT_METADATA_DIR)


def assert_tree_equal(actual, expected):
    assert set(actual) == set(expected)
    for k, v in expected.items():
        a, e = np.asarray(actual[k]), np.asarray(v)
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), e.reshape(-1).view(np.uint8))


class CommitGate:
    """Holds the commit of chosen steps until released; records the order commits land in."""

    def __init__(self, monkeypatch):
        self.gates: dict[str, threading.Event] = {}
        self.order: list[str] = []
        real = ca_commit.commit

        async def gated(tmp, path, *args, **kwargs):
            gate = self.gates.get(path.name)
            deadline = time.monotonic() + LIMIT_S
            while gate is not None and not gate.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110, E501 - a threading.Event
                await asyncio.sleep(0.005)
            out = await real(tmp, path, *args, **kwargs)
            self.order.append(path.name)
            return out

        monkeypatch.setattr(ca_commit, "commit", gated)

    def hold(self, name: str) -> threading.Event:
        self.gates[name] = threading.Event()
        return self.gates[name]


@pytest.fixture
def gate(monkeypatch):
    return CommitGate(monkeypatch)


class StartGate:
    """Holds the save of chosen steps right after its temporary directory is made (the save
    under way, its step not listed yet) until released."""

    def __init__(self, monkeypatch):
        self.started: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}
        real = ca_commit.create_tmp

        async def create_tmp(final, clear=True, **kw):
            tmp = await real(final, clear, **kw)
            if final.name in self.release:
                self.started[final.name].set()
                await asyncio.to_thread(self.release[final.name].wait, LIMIT_S)
            return tmp

        monkeypatch.setattr(ca_commit, "create_tmp", create_tmp)

    def hold(self, name: str) -> tuple[threading.Event, threading.Event]:
        """(set once the save of ``name`` is held, set it to let the save go on)"""
        self.started[name], self.release[name] = threading.Event(), threading.Event()
        return self.started[name], self.release[name]


@pytest.fixture
def start_gate(monkeypatch):
    return StartGate(monkeypatch)


def test_a_step_deleted_while_a_later_save_is_under_way_stays_deleted(tmp_path, start_gate):
    # (the save listed its steps as they were before it staged: step 1 came back, gone from
    # the disk, and restore(1) of a listed step raised StepNotFoundError)
    started, release = start_gate.hold("2")

    async def main():
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path) as mngr:
            await (await mngr.save(1, args=ocp.args.StandardSave(tree(1))))
            save = asyncio.create_task(mngr.save(2, args=ocp.args.StandardSave(tree(2))))
            assert await asyncio.to_thread(started.wait, LIMIT_S)
            await mngr.delete(1)
            release.set()
            await (await save)
            assert mngr.all_steps() == [2]
            return await mngr.restore(2)

    assert_tree_equal(asyncio.run(main()), tree(2))
    assert steps_on_disk(tmp_path) == ["2"]


def test_a_commit_failing_while_the_next_save_is_under_way_leaves_the_listing(
        tmp_path, monkeypatch, start_gate):
    fail_commit_of(monkeypatch, "1")
    started, release = start_gate.hold("2")

    async def main():
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path) as mngr:
            first = await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
            save = asyncio.create_task(mngr.save(2, args=ocp.args.StandardSave(tree(2))))
            assert await asyncio.to_thread(started.wait, LIMIT_S)
            with pytest.raises(CommitError):
                await first
            release.set()
            await (await save)
            assert mngr.all_steps() == [2] and mngr.latest_step() == 2
            with pytest.raises(CommitError):
                await mngr.wait_until_finished()  # (step 1's failure, reported once)

    asyncio.run(main())
    assert steps_on_disk(tmp_path) == ["2"]


def _fail_commits_of_0_and_1(monkeypatch) -> threading.Event:
    """Makes the commits of steps 0 and 1 fail (I/O error), step 0's once the returned event
    is set."""
    real = ca_commit.commit
    release = threading.Event()

    async def commit(tmp, path, *args, **kwargs):
        if path.name == "0":
            await asyncio.to_thread(release.wait, LIMIT_S)
        if path.name in ("0", "1"):
            raise OSError(5, "I/O error")
        return await real(tmp, path, *args, **kwargs)

    monkeypatch.setattr(ca_commit, "commit", commit)
    return release


def test_a_failed_step_stays_unlisted_when_the_save_retiring_it_fails_too(tmp_path,
                                                                          monkeypatch):
    # max_to_keep=1: the save of step 1 retires step 0. Step 0's commit fails, then step 1's:
    # step 1's failure gave back the steps it had retired, step 0 among them, so all_steps()
    # listed a step that was never committed (nothing on disk; its restore failed). Orbax
    # lists no step there.
    release = _fail_commits_of_0_and_1(monkeypatch)
    options = ocp.CheckpointManagerOptions(max_to_keep=1)
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        assert mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        assert mngr.save(1, args=ocp.args.StandardSave(tree(1)))  # (step 0 still in flight)
        assert mngr.all_steps() == [1]
        release.set()
        with pytest.raises(CommitError):
            mngr.wait_until_finished()
        assert mngr.commit_future(1).exception(LIMIT_S) is not None
        assert mngr.all_steps() == [] and mngr.latest_step() is None
        assert mngr.all_steps(read=True) == []
        assert mngr.save(2, args=ocp.args.StandardSave(tree(2)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2]
    assert steps_on_disk(tmp_path) == ["2"]


def test_a_step_failing_while_the_save_retiring_it_stages_stays_unlisted(tmp_path,
                                                                          monkeypatch):
    # max_to_keep=1: the save of step 1 retires step 0, whose commit fails while step 1 is
    # still staging (no commit in flight then), and step 1's commit fails too: step 1's
    # failure gave back step 0 (its list of retired steps was made before step 0 failed), so
    # all_steps() named a step that was never committed.
    release = _fail_commits_of_0_and_1(monkeypatch)
    options = ocp.CheckpointManagerOptions(max_to_keep=1)
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        assert mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        ckptr = mngr.async_manager._checkpointer
        staged = ckptr._save_staged

        async def save_staged(path, *args, **kwargs):
            if path.name == "1":  # (step 0's commit fails, and is done, before step 1 stages)
                release.set()
                await asyncio.to_thread(mngr.commit_future(0).exception, LIMIT_S)
            return await staged(path, *args, **kwargs)

        monkeypatch.setattr(ckptr, "_save_staged", save_staged)
        assert mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        assert mngr.commit_future(1).exception(LIMIT_S) is not None
        with pytest.raises(CommitError):
            mngr.wait_until_finished()
        assert mngr.all_steps() == [] and mngr.latest_step() is None
        assert mngr.all_steps(read=True) == []
    assert steps_on_disk(tmp_path) == []


def test_close_waits_for_a_save_under_way(tmp_path, start_gate):
    # (close() returned while the save staged; its commit then ran on the closed manager,
    # where no one would hear of its failure)
    started, release = start_gate.hold("1")

    async def main():
        mngr = ckpt_async.aio.AsyncCheckpointManager(tmp_path)
        save = asyncio.create_task(mngr.save(1, args=ocp.args.StandardSave(tree(1))))
        assert await asyncio.to_thread(started.wait, LIMIT_S)
        closing = asyncio.create_task(mngr.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        release.set()
        await asyncio.wait_for(closing, LIMIT_S)
        assert save.done() and save.result().done()
        assert steps_on_disk(tmp_path) == ["1"]
        with pytest.raises(ClosedError):
            await mngr.save(2, args=ocp.args.StandardSave(tree(2)))

    asyncio.run(main())
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert_tree_equal(mngr.restore(1), tree(1))



def fail_commit_of(monkeypatch, step_name: str):
    """Makes the commit of one step fail (an I/O error in the background)."""
    real = ca_commit.commit

    async def commit(tmp, path, *args, **kwargs):
        if path.name == step_name:
            raise OSError(5, "I/O error")
        return await real(tmp, path, *args, **kwargs)

    monkeypatch.setattr(ca_commit, "commit", commit)


# --- futures, both faces -------------------------------------------------------------------------
def test_async_save_returns_commit_future_awaitable_from_caller_loop(tmp_path, gate):
    release = gate.hold("1")
    seen = []

    async def main():
        mngr = ckpt_async.aio.AsyncCheckpointManager(tmp_path)
        fut = await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        assert not fut.done()
        fut.add_done_callback(lambda f: seen.append(f.exception()))
        assert mngr.commit_future(1) is fut
        assert mngr.all_steps() == [1]  # listed as soon as the save starts (Orbax)
        assert not (tmp_path / "1").exists()
        release.set()
        path = await asyncio.wait_for(fut, LIMIT_S)
        assert path == tmp_path / "1" and fut.done() and fut.result(0) == path
        assert (tmp_path / "1" / fmt.CHECKPOINT_METADATA).is_file()
        skipped = await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        assert skipped is None  # not after the latest step: the policy skips it
        out = await mngr.restore(1)
        await mngr.close()
        return out

    assert_tree_equal(asyncio.run(main()), tree(1))
    assert seen == [None]


def test_sync_save_returns_bool_and_commit_future_is_reachable(tmp_path, gate):
    release = gate.hold("0")
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.save(0, args=ocp.args.StandardSave(tree(0))) is True
        fut = mngr.commit_future(0)
        assert fut is mngr.async_manager.commit_future(0)
        assert not fut.done() and mngr.is_saving_in_progress()
        release.set()
        assert fut.result(LIMIT_S) == tmp_path / "0"
        assert mngr.save(0, args=ocp.args.StandardSave(tree(0))) is False
        with pytest.raises(StepAlreadyExistsError):
            mngr.save(0, args=ocp.args.StandardSave(tree(0)), force=True)
        with pytest.raises(StepNotFoundError):
            mngr.commit_future(7)
        assert_tree_equal(mngr.restore(0), tree(0))


def test_commit_futures_of_retired_steps_are_let_go(tmp_path):
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        first = weakref.ref(mngr.commit_future(0))
        for step in range(1, 6):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))
            mngr.wait_until_finished()
        assert mngr.all_steps() == [4, 5]
        assert mngr.commit_future(4).done() and mngr.commit_future(5).result(0) == tmp_path / "5"
        for step in range(4):
            with pytest.raises(StepNotFoundError, match=f"step {step} "):
                mngr.commit_future(step)
        gc.collect()
        assert first() is None  # nothing holds the retired step's future any more


def test_a_manager_keeping_every_step_walks_only_its_commits_in_flight(tmp_path, monkeypatch,
                                                                       gate):
    """max_to_keep=None: every step stays listed, with its commit future. A save, a wait,
    ``hurry`` and ``is_saving_in_progress`` ask only the commits in flight whether they ended
    (before, every listed step's, several times: a save slowed as steps accumulated), and
    ``wait_until_finished`` still waits for those and raises their failures."""
    asked: list[CommitFuture] = []
    done = CommitFuture.done

    def counted(self):
        asked.append(self)
        return done(self)

    monkeypatch.setattr(CommitFuture, "done", counted)
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(max_to_keep=None)) as mngr:
        inner = mngr.async_manager
        for step in range(20):
            asked.clear()
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))
            mngr.wait_until_finished()
            inner.hurry()
            assert not mngr.is_saving_in_progress()
            assert set(asked) <= {mngr.commit_future(step)}, step  # none of the earlier steps'
        assert not inner._in_flight_steps and not inner._checkpointer._in_flight
        release = gate.hold("20")
        mngr.save(20, args=ocp.args.StandardSave(tree(20)))
        assert mngr.is_saving_in_progress() and set(inner._in_flight_steps) == {20}
        threading.Timer(0.2, release.set).start()
        mngr.wait_until_finished()  # waits for the commit held 0.2 s
        assert mngr.commit_future(20).result(0) == tmp_path / "20"
        fail_commit_of(monkeypatch, "21")
        mngr.save(21, args=ocp.args.StandardSave(tree(21)))
        with pytest.raises(CommitError, match="I/O error"):
            mngr.wait_until_finished()
        assert not inner._in_flight_steps and not inner._checkpointer._in_flight
        assert mngr.all_steps() == list(range(21)) and mngr.commit_future(0).done()
        assert_tree_equal(mngr.restore(20), tree(20))


def test_saves_in_flight_are_bounded_and_commit_in_step_order(tmp_path, gate):
    releases = {s: gate.hold(str(s)) for s in (1, 2)}

    async def main():
        mngr = ckpt_async.aio.AsyncCheckpointManager(
            tmp_path, ocp.CheckpointManagerOptions(max_concurrent_saves=2))
        f1 = await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        f2 = await mngr.save(2, args=ocp.args.StandardSave(tree(2)))
        third = asyncio.ensure_future(mngr.save(3, args=ocp.args.StandardSave(tree(3))))
        await asyncio.sleep(0.2)
        assert not third.done()  # two commits in flight: the third save waits
        releases[2].set()  # step 2 is ready first, yet lands after step 1
        await asyncio.sleep(0.1)
        assert not f2.done() and not third.done()
        releases[1].set()
        f3 = await asyncio.wait_for(third, LIMIT_S)
        await asyncio.wait_for(mngr.wait_until_finished(), LIMIT_S)
        assert f1.done() and f2.done() and f3.done()
        await mngr.close()

    asyncio.run(main())
    assert gate.order == ["1", "2", "3"]
    assert steps_on_disk(tmp_path) == ["1", "2", "3"]


def test_enable_async_checkpointing_false_returns_after_commit(tmp_path):
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        assert mngr.commit_future(0).done()
        assert (tmp_path / "0").is_dir()


# --- failures -------------------------------------------------------------------------------------
@pytest.mark.parametrize("raised_by", ["future", "next_save", "wait", "close", "check"])
def test_failed_commit_is_raised_and_leaves_no_step(tmp_path, monkeypatch, raised_by):
    fail_commit_of(monkeypatch, "2")
    mngr = ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(max_to_keep=1))
    mngr.save(1, args=ocp.args.StandardSave(tree(1)))
    mngr.save(2, args=ocp.args.StandardSave(tree(2)))
    fut = mngr.commit_future(2)
    with pytest.raises(CommitError) as ei:
        if raised_by == "future":
            fut.result(LIMIT_S)
        elif raised_by == "next_save":
            with pytest.raises(BaseException):
                fut.result(LIMIT_S)
            mngr.save(3, args=ocp.args.StandardSave(tree(3)))
        elif raised_by == "wait":
            mngr.wait_until_finished()
        elif raised_by == "check":
            with pytest.raises(BaseException):
                fut.result(LIMIT_S)
            mngr.check_for_errors()
        else:
            mngr.close()
    assert isinstance(ei.value.__cause__, OSError)
    if raised_by == "future":  # seen by the future only: the manager still reports it once
        with pytest.raises(CommitError):
            mngr.close()
    else:
        mngr.close()  # already reported: not raised twice
    # The failed step is gone, and the step it would have retired is back (never deleted).
    assert mngr.all_steps() == [1] and mngr.latest_step() == 1
    assert steps_on_disk(tmp_path) == ["1"]
    with ocp.CheckpointManager(tmp_path) as reopened:
        assert_tree_equal(reopened.restore(1), tree(1))


def test_a_failure_the_future_shows_is_already_in_the_manager(tmp_path, monkeypatch):
    """Done callbacks run after ``result()`` has returned to its waiters. The manager records
    a failed commit before: a caller that has just seen the future fail finds the step gone
    from the listing and the failure in ``check_for_errors()``, however late the callbacks
    run (here each future's 0.3 s late)."""
    invoke = CommitFuture._invoke_callbacks

    def late(self):
        time.sleep(0.3)
        invoke(self)

    monkeypatch.setattr(CommitFuture, "_invoke_callbacks", late)
    fail_commit_of(monkeypatch, "2")
    mngr = ocp.CheckpointManager(tmp_path)
    mngr.save(1, args=ocp.args.StandardSave(tree(1)))
    mngr.wait_until_finished()
    mngr.save(2, args=ocp.args.StandardSave(tree(2)))
    with pytest.raises(CommitError):
        mngr.commit_future(2).result(LIMIT_S)
    assert mngr.all_steps() == [1]
    with pytest.raises(CommitError):
        mngr.check_for_errors()
    mngr.close()


def test_a_failure_recorded_while_check_for_errors_takes_them_is_reported(tmp_path):
    """check_for_errors() in a caller's thread takes the failures while the thread ending
    another commit records its own (held here between reading the list and appending to it):
    that failure is reported with the others (their first raised, each future told), never
    left behind in a list nobody reads, to be logged as unretrieved."""
    mngr = ocp.CheckpointManager(tmp_path)
    manager = mngr.async_manager
    entered, go = threading.Event(), threading.Event()
    told = []

    class Future:
        def __init__(self, step):
            self.step = step

        def retrieved(self):
            told.append(self.step)

    class Held(list):
        def append(self, item):
            entered.set()
            assert go.wait(LIMIT_S)
            super().append(item)

    earlier = CommitError(f"saving {tmp_path / '2'} failed")
    manager._failures = Held([(earlier, Future(2))])
    recorder = threading.Thread(target=manager._on_done, args=(
        3, Future(3), CommitError(f"saving {tmp_path / '3'} failed"), []))
    recorder.start()
    assert entered.wait(LIMIT_S)
    raised = []

    def check():
        try:
            manager.check_for_errors()
        except CommitError as exc:
            raised.append(exc)

    checker = threading.Thread(target=check)
    checker.start()
    checker.join(0.5)  # (let it take the failures, if it can before the append ends)
    go.set()
    recorder.join(LIMIT_S)
    checker.join(LIMIT_S)
    check()  # (the next call: nothing left)
    assert raised == [earlier] and told == [2, 3]
    mngr.close()


def test_failed_commit_raised_by_async_face(tmp_path, monkeypatch):
    fail_commit_of(monkeypatch, "0")

    async def main():
        mngr = ckpt_async.aio.AsyncCheckpointManager(tmp_path)
        fut = await mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        with pytest.raises(CommitError):
            await asyncio.wait_for(fut, LIMIT_S)
        with pytest.raises(CommitError):
            await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        monkeypatch.undo()
        await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        await mngr.close()
        return mngr.all_steps()

    assert asyncio.run(main()) == [1]
    assert steps_on_disk(tmp_path) == ["1"]


def test_saves_awaited_at_once_run_one_after_the_other(tmp_path):
    # Each used to read the step list before the other wrote it back: a committed step went
    # missing from all_steps(), and the same step saved twice was accepted twice.
    async def main():
        opts = ocp.CheckpointManagerOptions(max_to_keep=10)
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path, opts) as mngr:
            futs = await asyncio.gather(*(mngr.save(s, args=ocp.args.StandardSave(tree(s)))
                                          for s in (1, 2)))
            await asyncio.wait_for(asyncio.gather(*futs), LIMIT_S)
            assert mngr.all_steps() == [1, 2]
            again = await asyncio.gather(*(mngr.save(3, args=ocp.args.StandardSave(tree(3)))
                                           for _ in range(2)))
            assert again[1] is None  # (not after the latest step: skipped, as in Orbax)
            await mngr.wait_until_finished()
            return mngr.all_steps()

    assert asyncio.run(main()) == [1, 2, 3]
    assert steps_on_disk(tmp_path) == ["1", "2", "3"]


def test_a_restore_gathered_with_a_save_of_its_step_reads_that_save(tmp_path):
    # The save is called first: the restore (and metadata) of its step wait for it to stage,
    # then for its commit, as the calls' order says. (Both raised StepNotFoundError: the
    # save had not staged yet.) A restore of another step does not wait for it.
    async def main():
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path) as mngr:
            await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
            return await asyncio.wait_for(asyncio.gather(
                mngr.save(2, args=ocp.args.StandardSave(tree(2))), mngr.restore(2),
                mngr.metadata(2), mngr.restore(1)), LIMIT_S)

    _, two, meta, one = asyncio.run(main())
    assert_tree_equal(two, tree(2))
    assert_tree_equal(one, tree(1))
    assert meta.commit_timestamp_nsecs and steps_on_disk(tmp_path) == ["1", "2"]


def test_cancelling_an_awaited_save_while_it_stages_abandons_it(tmp_path, monkeypatch):
    # The save stops staging and removes its files before the caller hears CancelledError;
    # a retry of the step then saves it. (It used to go on invisibly and commit, and the
    # retry failed as "another writer committed it".)
    import ckpt_async._stage as _stage

    real = _stage.host_copy
    monkeypatch.setattr(_stage, "host_copy", lambda *a, **k: (time.sleep(0.02), real(*a, **k))[1])
    handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=1 << 20)
    state = {f"x{i:02d}": np.full(4096, i, np.float32) for i in range(60)}  # ~1.2 s to stage

    async def main():
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path, item_handlers=handler) as mngr:
            task = asyncio.create_task(mngr.save(4, args=ocp.args.StandardSave(state)))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert mngr.all_steps() == [] and not mngr.is_saving_in_progress()
            assert [n for n in os.listdir(tmp_path) if n.startswith("4")] == []
            assert handler._budget._used == 0
            monkeypatch.undo()
            await asyncio.wait_for(await mngr.save(4, args=ocp.args.StandardSave(state)), LIMIT_S)
            return await mngr.restore(4)

    out = asyncio.run(main())
    assert all(np.array_equal(out[k], v) for k, v in state.items())
    assert steps_on_disk(tmp_path) == ["4"]


def test_a_save_cancelled_while_its_directory_is_made_leaves_none(tmp_path, monkeypatch):
    """The temporary directory is made in a worker thread, which a cancelled caller does not
    stop: the save waits for it and removes it before the caller hears CancelledError. (It
    was left behind: 0-3 of 4 managers saving concurrently, some saves cancelled, kept one.)"""
    real = ca_commit.create_tmp
    made = threading.Event()  # (set on the engine loop, read on this test's own)

    async def create_tmp(final, clear=True, **kw):
        tmp = await real(final, clear, **kw)
        made.set()
        await asyncio.sleep(0.5)  # (the caller is cancelled here, the directory made)
        return tmp

    monkeypatch.setattr(ca_commit, "create_tmp", create_tmp)

    async def main():
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path) as mngr:
            task = asyncio.create_task(mngr.save(3, args=ocp.args.StandardSave(tree(3))))
            assert await asyncio.to_thread(made.wait, LIMIT_S)
            assert [n for n in os.listdir(tmp_path) if "tmp" in n]  # (it is there now)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert os.listdir(tmp_path) == []
            assert mngr.all_steps() == [] and not mngr.is_saving_in_progress()
            monkeypatch.undo()
            await asyncio.wait_for(await mngr.save(3, args=ocp.args.StandardSave(tree(3))),
                                   LIMIT_S)
            return await mngr.restore(3)

    assert_tree_equal(asyncio.run(main()), tree(3))
    assert steps_on_disk(tmp_path) == ["3"]


def test_a_save_waiting_for_an_earlier_commit_is_abandoned_when_cancelled(tmp_path, gate):
    # max_concurrent_saves=1: save(2) waits for step 1's commit; cancelled there (a user's
    # timeout), the caller hears of it at once and step 2 is never written.
    release = gate.hold("1")

    async def main():
        opts = ocp.CheckpointManagerOptions(max_concurrent_saves=1)
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path, opts) as mngr:
            await mngr.save(1, args=ocp.args.StandardSave(tree(1)))
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(mngr.save(2, args=ocp.args.StandardSave(tree(2))), 0.2)
            waited = time.monotonic() - started
            release.set()
            await mngr.wait_until_finished()
            return waited, mngr.all_steps()

    waited, steps = asyncio.run(main())
    assert waited < LIMIT_S / 2  # (not held until step 1's commit, which is never released)
    assert steps == [1] and steps_on_disk(tmp_path) == ["1"]


def test_a_cancelled_wait_until_finished_leaves_the_commits_to_a_later_wait(tmp_path, gate):
    release = gate.hold("1")
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())

    async def main():
        async_ckptr = ckptr.async_checkpointer
        await async_ckptr.save(tmp_path / "1", args=ocp.args.StandardSave(tree(1)))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(async_ckptr.wait_until_finished(), 0.2)
        release.set()
        await async_ckptr.wait_until_finished()  # (still waits for step 1's commit)
        assert (tmp_path / "1").is_dir()

    asyncio.run(main())
    ckptr.close()


def test_a_fresh_async_manager_lists_the_steps_on_disk(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        for step in (10, 20):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))

    async def main():
        # Nothing awaited yet: the listing reads the directory first, as Orbax's constructor.
        fresh = ckpt_async.aio.AsyncCheckpointManager(tmp_path)
        listed = (fresh.latest_step(), fresh.all_steps())
        # Calls made at once share one setup: each sees both steps.
        other = ckpt_async.aio.AsyncCheckpointManager(tmp_path)
        results = await asyncio.gather(other.restore(), other.restore(10),
                                       other.save(5, args=ocp.args.StandardSave(tree(5))))
        return listed, results

    listed, (latest, ten, saved) = asyncio.run(main())
    assert listed == (20, [10, 20])
    assert_tree_equal(latest, tree(20))
    assert_tree_equal(ten, tree(10))
    assert saved is None and steps_on_disk(tmp_path) == ["10", "20"]


def test_a_closed_manager_refuses_every_call(tmp_path):
    mngr = ocp.CheckpointManager(tmp_path)
    mngr.save(0, args=ocp.args.StandardSave(tree(0)))
    mngr.close()
    for call in (lambda: mngr.save(1, args=ocp.args.StandardSave(tree(1))),
                 lambda: mngr.restore(0), lambda: mngr.metadata(0), lambda: mngr.metadata(),
                 lambda: mngr.item_metadata(0), lambda: mngr.metrics(0), lambda: mngr.reload(),
                 lambda: mngr.delete(0)):
        with pytest.raises(ClosedError, match=str(tmp_path)):
            call()
    mngr.close()  # (again: nothing to do)
    assert steps_on_disk(tmp_path) == ["0"]


def test_documents_that_are_not_json_are_refused_before_anything_is_written(tmp_path):
    # As Orbax (TypeError), and a CheckpointError naming the step or item.
    with ocp.CheckpointManager(tmp_path) as mngr:
        for value in (object(), np.ones(2), {1, 2}):
            with pytest.raises(UnsupportedLeafError, match="not JSON serializable"):
                mngr.save(1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree(1)), extra=ocp.args.JsonSave({"x": value})))
            if not isinstance(value, np.ndarray):  # (metrics take arrays: written as lists)
                with pytest.raises(UnsupportedLeafError, match="step 1 of"):
                    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(1))),
                              metrics={"x": value})
            with pytest.raises(UnsupportedLeafError, match="step 1 of"):
                mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(1))),
                          custom_metadata={"x": value})
        assert mngr.all_steps() == []
    assert os.listdir(tmp_path) == []


def test_commit_timeout_fails_the_step(tmp_path, gate):
    gate.hold("0")  # never released within the timeout
    opts = ocp.CheckpointManagerOptions(async_options=ocp.AsyncOptions(timeout_secs=0.3))
    mngr = ocp.CheckpointManager(tmp_path, opts)
    mngr.save(0, args=ocp.args.StandardSave(tree(0)))
    with pytest.raises(CommitTimeoutError):
        mngr.wait_until_finished()
    mngr.close()
    assert mngr.all_steps() == [] and steps_on_disk(tmp_path) == []


def test_a_commit_timing_out_while_it_waits_for_the_one_before_it_fails(tmp_path, monkeypatch):
    # Step 1's commit times out and takes long to remove its directory; step 2's commit,
    # waiting for it, times out there. It used to swallow its own timeout, wait on, and
    # commit well past timeout_secs.
    real_commit, real_abort = ca_commit.commit, ca_commit.abort

    async def held(tmp, path, *args, **kwargs):
        if path.name == "1":
            await asyncio.sleep(LIMIT_S)  # (until its timeout cancels it)
        return await real_commit(tmp, path, *args, **kwargs)

    async def slow_abort(tmp):
        if tmp.name.startswith("1"):
            await asyncio.sleep(1.5)  # (step 2's timeout passes meanwhile)
        return await real_abort(tmp)

    monkeypatch.setattr(ca_commit, "commit", held)
    monkeypatch.setattr(ca_commit, "abort", slow_abort)
    opts = ocp.CheckpointManagerOptions(async_options=ocp.AsyncOptions(timeout_secs=0.3))

    async def main():
        mngr = ckpt_async.aio.AsyncCheckpointManager(tmp_path, opts)
        futs = [await mngr.save(s, args=ocp.args.StandardSave(tree(s))) for s in (1, 2)]
        for step, fut in zip((1, 2), futs, strict=True):
            with pytest.raises(CommitTimeoutError, match=f"/{step} did not finish"):
                await asyncio.wait_for(fut, LIMIT_S)
        with contextlib.suppress(CommitTimeoutError):
            await mngr.close()
        return mngr.all_steps()

    assert asyncio.run(main()) == []
    assert steps_on_disk(tmp_path) == []


# --- retention ------------------------------------------------------------------------------------
def test_retention_deletes_old_steps_only_after_the_new_step_is_committed(tmp_path, gate):
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(max_to_keep=1)) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        mngr.wait_until_finished()
        release = gate.hold("1")
        mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        assert mngr.all_steps() == [1]  # Orbax's listing: step 0 is already retired
        time.sleep(0.2)
        assert (tmp_path / "0").is_dir() and not (tmp_path / "1").exists()
        release.set()
        mngr.wait_until_finished()
        assert steps_on_disk(tmp_path) == ["1"]


def test_background_delete_a_slow_deletion_holds_up_no_save_or_commit(tmp_path, monkeypatch):
    held, entered = threading.Event(), threading.Event()
    deleting = ocp.aio.AsyncCheckpointManager._delete_steps

    async def slow_delete(self, steps):
        entered.set()
        await asyncio.to_thread(held.wait, 30)
        await deleting(self, steps)

    monkeypatch.setattr(ocp.aio.AsyncCheckpointManager, "_delete_steps", slow_delete)
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(
            max_to_keep=1, max_concurrent_saves=1, enable_background_delete=True)) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        mngr.commit_future(0).result(timeout=30)
        mngr.save(1, args=ocp.args.StandardSave(tree(1)))  # its commit retires step 0
        mngr.commit_future(1).result(timeout=30)
        assert entered.wait(30)
        # Step 0's deletion hangs; later steps save and commit all the same.
        for step in (2, 3):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))
            mngr.commit_future(step).result(timeout=30)
        assert mngr.all_steps() == [3]
        assert (tmp_path / "0").is_dir() and (tmp_path / "3").is_dir()
        held.set()
        mngr.wait_until_finished()  # waits for the queued deletions too
        assert steps_on_disk(tmp_path) == ["3"]


def test_best_n_retires_a_new_step_worse_than_the_kept_ones(tmp_path):
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["loss"],
                                        best_mode="min")
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)), metrics={"loss": 1.0})
        assert mngr.save(1, args=ocp.args.StandardSave(tree(1)), metrics={"loss": 2.0})
        assert mngr.all_steps() == [0] and mngr.best_step() == 0
        mngr.wait_until_finished()
        assert steps_on_disk(tmp_path) == ["0"]


def test_metrics_persist_for_best_n_policy_without_best_fn(tmp_path):
    """An improvement over Orbax: BestN ranks the same after a restart."""
    def opts():
        return ocp.CheckpointManagerOptions(preservation_policy=ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: m["acc"], reverse=False, n=2,
            keep_checkpoints_without_metrics=False))

    with ocp.CheckpointManager(tmp_path, opts()) as mngr:
        for step, acc in [(0, 0.5), (1, 0.9), (2, 0.7)]:
            mngr.save(step, args=ocp.args.StandardSave(tree(step)), metrics={"acc": acc})
        assert mngr.all_steps() == [1, 2]
    with ocp.CheckpointManager(tmp_path, opts()) as mngr:
        assert mngr.all_steps() == [1, 2]
        assert mngr.metadata(1).metrics == {"acc": 0.9}
        mngr.save(3, args=ocp.args.StandardSave(tree(3)), metrics={"acc": 0.8})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 3]  # 0.7 is the worst of 0.9, 0.7, 0.8
    assert steps_on_disk(tmp_path) == ["1", "3"]


def test_metrics_are_not_written_when_no_policy_uses_them_or_prevented(tmp_path):
    opts = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], prevent_write_metrics=True)
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)), metrics={"loss": 1.0})
    assert not (tmp_path / "0" / "metrics").exists()
    with ocp.CheckpointManager(tmp_path / "b") as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)), metrics={"loss": 1.0})
    assert not (tmp_path / "b" / "0" / "metrics").exists()


# --- items and handlers ---------------------------------------------------------------------------
def test_composite_items_restore_all_subset_and_with_target(tmp_path, mesh):
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    state = {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave({"lr": 0.1, "n": [1, 2]})))
        mngr.wait_until_finished()
    assert sorted(os.listdir(tmp_path / "5")) == sorted(
        ["_CHECKPOINT_METADATA", "_CKPT_ASYNC", "state", "meta"] + (
            ["commit_success.txt"] if (tmp_path / "5" / "commit_success.txt").exists() else []))
    with ocp.CheckpointManager(tmp_path) as mngr:  # a fresh manager: handlers from metadata
        out = mngr.restore(5)
        assert set(out.keys()) == {"state", "meta"}
        assert_tree_equal(out["state"], state)
        assert out["meta"] == {"lr": 0.1, "n": [1, 2]}
        sub = mngr.restore(5, args=ocp.args.Composite(meta=None))
        assert set(sub.keys()) == {"meta"} and sub["meta"]["lr"] == 0.1
        target = {"w": jax.ShapeDtypeStruct((4, 4), jax.numpy.bfloat16, sharding=sharding)}
        cast = mngr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        assert cast["state"]["w"].dtype == jax.numpy.bfloat16
        assert cast["state"]["w"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(cast["state"]["w"], np.float32), state["w"])
        meta = mngr.item_metadata(5)
        assert meta["state"]["w"].shape == (4, 4) and meta["state"]["w"].dtype == np.float32


def test_close_closes_each_item_handler_once(tmp_path):
    # As Orbax's CheckpointManager.close() (its checkpointer's close closes the composite
    # handler, which closes each registered handler); they were never closed.
    closed = []

    class Closing(ocp.StandardCheckpointHandler):
        def close(self):
            closed.append(self)

    state, other = Closing(), Closing()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("other", ocp.args.StandardSave, other)  # (two args types, one handler)
    registry.add("other", ocp.args.StandardRestore, other)
    mngr = ocp.CheckpointManager(tmp_path / "a", item_handlers={"state": state})
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(1))))
    mngr.close()
    mngr.close()
    with ocp.CheckpointManager(tmp_path / "b", handler_registry=registry):
        pass
    assert closed == [state, other]

    async def closed_twice_at_once():  # (both wait for the commit; one closes the handler)
        mngr = ckpt_async.aio.AsyncCheckpointManager(tmp_path / "c", item_handlers={"x": state})
        await mngr.save(1, args=ocp.args.Composite(x=ocp.args.StandardSave(tree(1))))
        await asyncio.gather(mngr.close(), mngr.close())

    asyncio.run(closed_twice_at_once())
    assert closed == [state, other, state]


def test_first_args_lock_in_the_handler(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.Composite(x=ocp.args.JsonSave({"a": 1})))
        with pytest.raises(HandlerError) as ei:
            mngr.save(1, args=ocp.args.Composite(x=ocp.args.StandardSave(tree(1))))
        assert isinstance(ei.value, ValueError)
        assert mngr.all_steps() == [0]
    assert steps_on_disk(tmp_path) == ["0"]


@pytest.mark.parametrize("compress", [False, True], ids=["own_ocdbt", "tensorstore"])
def test_composite_item_failing_to_stage_stops_the_items_before_it(tmp_path, monkeypatch,
                                                                   compress):
    # Item "a" is staged (its writes start at once), then "b" cannot be: the save raises, and
    # a's writes are stopped before the temporary directory goes, not left to write into it
    # again (TensorStore's recreated `<tmp>/a/d/...` after the removal).
    fail_host_copy(monkeypatch, "x")
    big = {f"k{i}": np.random.default_rng(i).random(1 << 20) for i in range(8)}  # 64 MiB
    handler = ocp.CompositeCheckpointHandler(
        a=ocp.StandardCheckpointHandler(use_compression=compress),
        b=ocp.StandardCheckpointHandler())
    with ocp.Checkpointer(handler) as ckptr:
        with pytest.raises(RuntimeError, match="lost"):
            ckptr.save(tmp_path / "c", args=ocp.args.Composite(
                a=ocp.args.StandardSave(big), b=ocp.args.StandardSave({"x": np.ones(3)})))
        assert os.listdir(tmp_path) == []
        time.sleep(1.0)  # (long enough for a stray write of "a" to land)
        assert os.listdir(tmp_path) == []
        ckptr.save(tmp_path / "c", args=ocp.args.Composite(a=ocp.args.StandardSave(big)))
        out = ckptr.restore(tmp_path / "c", args=ocp.args.Composite(a=ocp.args.StandardRestore()))
    assert all(np.array_equal(out["a"][k], v) for k, v in big.items())


def test_single_item_mode_and_composite_do_not_mix(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        with pytest.raises(InvalidArgumentError):
            mngr.save(1, args=ocp.args.Composite(a=ocp.args.StandardSave(tree(1))))
        with pytest.raises(InvalidArgumentError):
            mngr.save(1)
    with ocp.CheckpointManager(tmp_path / "m", item_names=("a",)) as mngr:
        with pytest.raises(InvalidArgumentError):
            mngr.save(0, args=ocp.args.StandardSave(tree(0)))


def test_args_given_second_are_args(tmp_path):
    # (ckpt_async's older calls: save(step, args), restore(step, args); Orbax takes its older
    # items there and refuses CheckpointArgs with a ValueError. Args given twice are refused.)
    with ocp.CheckpointManager(tmp_path, item_names=("a",)) as mngr:
        assert mngr.save(0, ocp.args.Composite(a=ocp.args.StandardSave(tree(0))))
        mngr.wait_until_finished()
        assert_tree_equal(mngr.restore(0, ocp.args.Composite(a=ocp.args.StandardRestore())).a,
                          tree(0))
        with pytest.raises(InvalidArgumentError, match="args given twice"):
            mngr.save(1, ocp.args.Composite(a=ocp.args.StandardSave(tree(1))),
                      args=ocp.args.Composite(a=ocp.args.StandardSave(tree(1))))
        assert mngr.all_steps() == [0]


def test_registry_configures_items_eagerly(tmp_path):
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave)
    registry.add("state", ocp.args.StandardRestore)
    registry.add("cfg", ocp.args.JsonSave)
    registry.add("cfg", ocp.args.JsonRestore)
    assert registry.has("state", ocp.args.StandardSave)
    assert isinstance(registry.get("cfg", ocp.args.JsonRestore), ocp.JsonCheckpointHandler)
    assert not registry.has("other", ocp.args.StandardSave)
    with pytest.raises(HandlerError):
        registry.get("other", ocp.args.StandardSave)
    with ocp.CheckpointManager(tmp_path, handler_registry=registry) as mngr:
        with pytest.raises(HandlerError):
            mngr.save(0, args=ocp.args.Composite(cfg=ocp.args.StandardSave(tree(0))))
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0)),
                                             cfg=ocp.args.JsonSave({"k": "v"})))
    os.remove(tmp_path / "0" / fmt.CHECKPOINT_METADATA)  # no recorded handlers left
    with ocp.CheckpointManager(tmp_path, handler_registry=registry) as mngr:
        out = mngr.restore(0)
        assert_tree_equal(out["state"], tree(0))
        assert out["cfg"] == {"k": "v"}


def test_item_whose_handler_cannot_be_known(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0))))
    os.remove(tmp_path / "0" / fmt.CHECKPOINT_METADATA)
    with ocp.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(HandlerError, match="DefaultCheckpointHandlerRegistry|restore args"):
            mngr.restore(0)
        assert mngr.item_metadata(0)["state"] is None
        out = mngr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert_tree_equal(out["state"], tree(0))


def test_item_metadata_gives_none_for_an_item_whose_metadata_is_missing(tmp_path):
    # As Orbax: the item whose _METADATA is gone has metadata None, the others theirs. The
    # whole item_metadata was None, for every item.
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0)),
                                             other=ocp.args.StandardSave(tree(1)),
                                             cfg=ocp.args.JsonSave({"k": 1})))
    os.remove(tmp_path / "0" / "state" / fmt.PYTREE_METADATA)
    with ocp.CheckpointManager(tmp_path) as mngr:
        meta = mngr.item_metadata(0)
        assert set(meta) == {"state", "other", "cfg"}
        assert meta["state"] is None and meta["cfg"] is None
        assert meta["other"].tree["a"].shape == np.asarray(tree(1)["a"]).shape
        with pytest.raises(FileNotFoundError):
            mngr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore()))


def test_item_handlers_configure_items(tmp_path):
    handlers = {"state": ocp.StandardCheckpointHandler(), "cfg": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0)),
                                             cfg=ocp.args.JsonSave([1, 2])))
    os.remove(tmp_path / "0" / fmt.CHECKPOINT_METADATA)
    with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as mngr:
        out = mngr.restore(0)
        assert out["cfg"] == [1, 2]
        assert mngr.item_metadata(0)["state"]["a"].shape == (2, 3)
    with ocp.CheckpointManager(tmp_path / "single",
                               item_handlers=ocp.StandardCheckpointHandler()) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        assert_tree_equal(mngr.restore(0), tree(0))
        assert mngr.item_metadata(0)["b"].shape == ()


@pytest.mark.parametrize("items", [{"item_handlers": {}}, {"item_names": ()}])
def test_no_items_given_up_front_is_a_manager_of_no_items(tmp_path, items):
    # As in Orbax: item_handlers={} (say, built from an empty list) is item_names=(): a
    # manager of several named items, none of them this one (it took {} for None: any item)
    with ocp.CheckpointManager(tmp_path, **items) as mngr:
        with pytest.raises(ValueError, match="multiple checkpointable objects"):
            mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        with pytest.raises(ValueError):
            mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(1))))
        assert mngr.all_steps() == [] and os.listdir(tmp_path) == []


# --- listing, metadata, naming, options -----------------------------------------------------------
def test_step_metadata_and_root_metadata(tmp_path):
    before = time.time()
    with ocp.CheckpointManager(tmp_path, metadata={"run": "abc"}) as mngr:
        mngr.save(3, args=ocp.args.StandardSave(tree(3)), metrics={"loss": 0.5},
                  custom_metadata={"note": "x"})
        mngr.wait_until_finished()
        meta = mngr.metadata(3)
        assert meta.metrics == {"loss": 0.5}
        assert meta.custom_metadata == {"note": "x"}
        assert before <= meta.init_timestamp_nsecs / 1e9 <= meta.commit_timestamp_nsecs / 1e9
        assert meta.commit_timestamp_nsecs / 1e9 <= time.time()
        assert mngr.metadata().custom_metadata == {"run": "abc"}
        with pytest.raises(StepNotFoundError):
            mngr.metadata(4)
    doc = json.loads((tmp_path / "3" / fmt.CHECKPOINT_METADATA).read_text())
    assert doc["custom_metadata"] == {"note": "x"}
    with ocp.CheckpointManager(tmp_path, metadata={"run": "other"}) as mngr:
        assert mngr.metadata().custom_metadata == {"run": "abc"}  # written once


@pytest.mark.parametrize("value, message", [(object(), "Object of type builtins.object"),
                                            ({1, 2}, "Object of type set")])
def test_root_metadata_that_is_no_json_is_refused_naming_the_file(tmp_path, value, message):
    # (a bare TypeError, outside ckpt_async's errors, before; still a TypeError)
    path = tmp_path / fmt.ROOT_METADATA_DIR / fmt.ROOT_METADATA
    with pytest.raises(ocp.errors.UnsupportedLeafError,
                       match=f"^{path}: CheckpointManager\\(metadata=...\\) must be a JSON "
                             f"document: {message}") as err:
        ocp.CheckpointManager(tmp_path, metadata={"run": value})
    assert isinstance(err.value, TypeError) and not path.exists()


def test_root_metadata_cut_short_is_never_left_behind(tmp_path):
    # A process killed while it writes _ROOT_METADATA leaves no part of it: the next manager
    # writes it whole. (Written in place, as Orbax does, a cut-short file stayed for good.)
    child = textwrap.dedent("""
        import os, signal, sys
        import ckpt_async as ocp
        from ckpt_async import _storage
        def write_half(path, data, durable):
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        _storage._write_file = write_half
        ocp.CheckpointManager(sys.argv[1], metadata={"run": "abc"})
    """)
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / fmt.ROOT_METADATA_DIR / fmt.ROOT_METADATA).exists()
    with ocp.CheckpointManager(tmp_path, metadata={"run": "abc"}) as mngr:
        assert mngr.metadata().custom_metadata == {"run": "abc"}
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        assert mngr.metadata().custom_metadata == {"run": "abc"}


def test_root_metadata_left_damaged_is_written_again(tmp_path, caplog):
    # (as a write of Orbax's, in place, cut short leaves it)
    with ocp.CheckpointManager(tmp_path, metadata={"run": "abc"}):
        pass
    path = tmp_path / fmt.ROOT_METADATA_DIR / fmt.ROOT_METADATA
    path.write_bytes(path.read_bytes()[:10])
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        with pytest.raises(CorruptCheckpointError, match=re.escape(str(path))):
            mngr.metadata()
    assert len(path.read_bytes()) == 10  # (a read-only manager writes nothing)
    with caplog.at_level("WARNING", logger="ckpt_async"), \
            ocp.CheckpointManager(tmp_path, metadata={"run": "new"}) as mngr:
        assert mngr.metadata().custom_metadata == {"run": "new"}
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(path.parent)) == [fmt.ROOT_METADATA]


def test_step_prefix_fixed_length_delete_and_reload(tmp_path):
    opts = ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=4)
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        for s in (1, 2, 3):
            mngr.save(s, args=ocp.args.StandardSave(tree(s)))
        mngr.wait_until_finished()
        assert steps_on_disk(tmp_path) == ["ckpt_0001", "ckpt_0002", "ckpt_0003"]
        mngr.delete(2)
        assert mngr.all_steps() == [1, 3]
        assert steps_on_disk(tmp_path) == ["ckpt_0001", "ckpt_0003"]
        with pytest.raises(StepNotFoundError):
            mngr.delete(2)
        with pytest.raises(StepNotFoundError):
            mngr.restore(2)
        os.rename(tmp_path / "ckpt_0001", tmp_path / "ckpt_0007")
        assert mngr.all_steps() == [1, 3]
        mngr.reload()
        assert mngr.all_steps() == [3, 7] and mngr.latest_step() == 7
        assert_tree_equal(mngr.restore(7), tree(1))
        assert_tree_equal(mngr.restore(), tree(1))


def test_todelete_subdir_moves_retired_steps(tmp_path):
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, todelete_subdir="trash")
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        mngr.save(1, args=ocp.args.StandardSave(tree(1)))
    assert sorted(os.listdir(tmp_path / "trash")) == ["0"]
    assert "1" in os.listdir(tmp_path) and "0" not in os.listdir(tmp_path)


def test_cleanup_tmp_directories_and_leftovers_are_never_steps(tmp_path):
    (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "5.orbax-checkpoint-todelete-1").mkdir()
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == []
    assert (tmp_path / "4.orbax-checkpoint-tmp-123").exists()
    opts = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True)
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        assert mngr.all_steps() == []
    assert steps_on_disk(tmp_path) == []


def test_read_only_and_create_false(tmp_path, caplog):
    with ocp.CheckpointManager(tmp_path / "absent",
                               ocp.CheckpointManagerOptions(create=False)) as mngr:
        assert mngr.all_steps() == [] and mngr.latest_step() is None  # Orbax: no error
    assert not (tmp_path / "absent").exists()
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
    opts = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(tmp_path, opts) as mngr, \
            caplog.at_level("WARNING", logger="ckpt_async"):
        assert mngr.should_save(1) is False
        assert any(f"{tmp_path} is read only, save of step 1 will be skipped" in r.getMessage()
                   for r in caplog.records)
        assert mngr.save(1, args=ocp.args.StandardSave(tree(1))) is False
        assert mngr.save(1, args=ocp.args.StandardSave(tree(1)), force=True) is False
        mngr.delete(0)
        assert mngr.all_steps() == [0]
        assert_tree_equal(mngr.restore(0), tree(0))
    assert steps_on_disk(tmp_path) == ["0"]


def test_one_manager_called_from_several_threads_at_once(tmp_path):
    # (the guide: calls from several threads run on the engine loop, saves one at a time in
    # the order they arrive; a step arriving after a later one's is skipped, not an error)
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(max_to_keep=None)) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
        start, saved, restored = threading.Barrier(4), {}, []

        def saver(first: int) -> None:
            start.wait()
            for step in range(first, 13, 3):
                saved[step] = mngr.save(step, args=ocp.args.StandardSave(tree(step)))

        def reader() -> None:
            start.wait()
            for _ in range(4):
                restored.append(mngr.restore(0, args=ocp.args.StandardRestore(tree(0))))

        threads = [threading.Thread(target=saver, args=(k,)) for k in (1, 2, 3)]
        threads.append(threading.Thread(target=reader))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        mngr.wait_until_finished()
        kept = [0] + sorted(s for s, ok in saved.items() if ok)
        assert len(saved) == 12 and mngr.all_steps() == kept and 12 in kept
        for step in kept:
            assert_tree_equal(mngr.restore(step), tree(step))
        for r in restored:
            assert_tree_equal(r, tree(0))
    assert steps_on_disk(tmp_path) == sorted(str(s) for s in kept)


def test_a_restore_from_a_directory_that_does_not_exist_says_so(tmp_path):
    # (a mistyped path: "step 1 does not exist in ... (steps: [])" hid the cause)
    absent = tmp_path / "typo"
    with ocp.CheckpointManager(absent, ocp.CheckpointManagerOptions(create=False)) as mngr:
        for call in (lambda: mngr.restore(1), lambda: mngr.metadata(1), mngr.restore):
            with pytest.raises(StepNotFoundError) as ei:
                call()
            assert f"{absent}" in str(ei.value)
            assert "the directory does not exist" in str(ei.value)
        with pytest.raises(StepNotFoundError, match=r"step 1 does not exist"):
            mngr.restore(1)
    with ocp.CheckpointManager(tmp_path / "empty") as mngr:  # there, and empty
        with pytest.raises(StepNotFoundError, match=r"step 1 does not exist in .*empty "
                           r"\(no steps\)$"):
            mngr.restore(1)


@pytest.mark.parametrize(("fields", "names"), [
    ({"best_mode": "median"}, ["best_mode"]),
    ({"todelete_subdir": "a", "todelete_full_path": "b"}, ["todelete_subdir", "todelete_full_path"]),
    ({"enable_per_process_directory_creation": True},
     ["enable_per_process_directory_creation", "primary_host"]),
    ({"max_concurrent_saves": 0}, ["max_concurrent_saves"]),
])
def test_invalid_option_combinations_name_the_fields(fields, names):
    with pytest.raises(InvalidArgumentError) as ei:
        ocp.CheckpointManagerOptions(**fields)
    for name in names:
        assert name in str(ei.value)


def test_fields_a_policy_overrides_are_named_in_a_warning(caplog):
    # (what the policy then decides is compared with Orbax in test_manager_vs_orbax.py)
    with caplog.at_level(logging.WARNING, logger="ckpt_async"):
        ocp.CheckpointManagerOptions(
            save_interval_steps=3, save_on_steps=[4],
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(2))
        ocp.CheckpointManagerOptions(
            step_prefix="p", step_name_format=ocp.path.step.standard_name_format())
        ocp.CheckpointManagerOptions(save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(2))
    assert [r.getMessage() for r in caplog.records] == [
        "CheckpointManagerOptions: save_decision_policy is set, so save_on_steps, "
        "save_interval_steps are ignored",
        "CheckpointManagerOptions: step_name_format is set, so step_prefix is ignored"]


def test_should_save_reached_preemption_and_interval(tmp_path):
    opts = ocp.CheckpointManagerOptions(save_interval_steps=5)
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        assert mngr.reached_preemption(3) is False
        assert [mngr.should_save(s) for s in (0, 1, 5)] == [True, True, True]  # initial save
        assert mngr.save(1, args=ocp.args.StandardSave(tree(1)))
        assert [mngr.should_save(s) for s in (1, 2, 5, 10)] == [False, False, True, True]
        assert mngr.save(3, args=ocp.args.StandardSave(tree(3))) is False
        assert mngr.save(3, args=ocp.args.StandardSave(tree(3)), force=True) is True
        assert mngr.all_steps() == [1, 3]


def test_step_must_be_a_non_negative_int(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(InvalidArgumentError):
            mngr.save(-1, args=ocp.args.StandardSave(tree(0)))
        for bad in (1.5, "3", True):
            with pytest.raises(TypeError):
                mngr.save(bad, args=ocp.args.StandardSave(tree(0)))
        assert mngr.save(np.int64(2), args=ocp.args.StandardSave(tree(2)))
        assert mngr.all_steps() == [2]


def test_a_step_not_after_the_latest_is_skipped_with_a_warning_unless_it_is_the_latest(
        tmp_path, caplog):
    # (a resumed loop saves the step it restored again: INFO, where until round 40 it warned
    # on every restart; an earlier step still warns)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, args=ocp.args.StandardSave(tree(3)))
        with caplog.at_level("INFO", logger="ckpt_async"):
            assert not mngr.save(3, args=ocp.args.StandardSave(tree(3)))
            assert not mngr.save(2, args=ocp.args.StandardSave(tree(2)))
    said = {r.getMessage(): r.levelname for r in caplog.records if "was not saved" in r.getMessage()}
    assert said == {
        f"step 3 of {tmp_path} was not saved: it is the latest step already": "INFO",
        f"step 2 of {tmp_path} was not saved: it is not after the latest step 3": "WARNING"}


def test_async_context_manager_and_keep_time_interval(tmp_path):
    async def main():
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=1, keep_time_interval=datetime.timedelta(hours=1))
        async with ckpt_async.aio.AsyncCheckpointManager(tmp_path, opts) as mngr:
            for s in range(3):
                await mngr.save(s, args=ocp.args.StandardSave(tree(s)))
            assert mngr.all_steps() == [0, 2]
        return mngr

    mngr = asyncio.run(main())
    assert not mngr.is_saving_in_progress()
    assert steps_on_disk(tmp_path) == ["0", "2"]


def test_metrics_item_is_where_orbax_reads_it(tmp_path):
    opts = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0))),
                  metrics={"loss": 0.25})
    assert json.loads((tmp_path / "0" / "metrics" / "metrics").read_text()) == {"loss": 0.25}
    with ocp.CheckpointManager(tmp_path, opts) as mngr:
        out = mngr.restore(0)  # Orbax 0.12.8 restores the metrics item too
        assert set(out.keys()) == {"metrics", "state"} and out["metrics"] == {"loss": 0.25}
        assert mngr.best_step() == 0


def test_non_finite_metrics_and_metadata_read_back_as_they_were(tmp_path):
    # NaN and infinities are written as Python's json writes them (as Orbax does), not as
    # null: a NaN loss must not come back as None, and best_fn must still rank after a reopen.
    opts = lambda: ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")  # noqa: E731
    custom = {"lr": float("inf"), "nested": [float("-inf"), 1]}
    with ocp.CheckpointManager(tmp_path, options=opts(), metadata=custom) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)), metrics={"loss": float("nan")},
                  custom_metadata=custom)
        mngr.save(1, args=ocp.args.StandardSave(tree(1)), metrics={"loss": 1.0})
    assert "NaN" in (tmp_path / "0" / "metrics" / "metrics").read_text()
    with ocp.CheckpointManager(tmp_path, options=opts()) as mngr:
        assert mngr.best_step() == 1
        assert math.isnan(mngr.metadata(0).metrics["loss"])
        assert mngr.metadata(0).custom_metadata == custom
        assert mngr.metadata().custom_metadata == custom


@pytest.mark.parametrize("best", [False, True])
def test_metrics_from_a_jitted_step_are_written_as_numbers(tmp_path, best):
    # A training loop passes its step's jax scalars (and NumPy values) as metrics: they are
    # written as the numbers they hold, and best_fn ranks them as passed and after a reopen.
    opts = lambda: ocp.CheckpointManagerOptions(  # noqa: E731
        best_fn=(lambda m: m["loss"]) if best else None, best_mode="min")
    loss = jax.jit(lambda x: (x * x).mean())
    with ocp.CheckpointManager(tmp_path, options=opts()) as mngr:
        for step, x in enumerate([3.0, 1.0, 2.0]):
            assert mngr.save(step, args=ocp.args.StandardSave(tree(step)), metrics={
                "loss": loss(jax.numpy.full(4, x)), "seen": np.int64(step), "hist": np.ones(2)})
        if best:
            assert mngr.best_step() == 1
    with ocp.CheckpointManager(tmp_path, options=opts()) as mngr:
        assert mngr.all_steps() == [0, 1, 2]
        metrics = mngr.metadata(1).metrics
        assert metrics == {"loss": 1.0, "seen": 1, "hist": [1.0, 1.0]}
        assert type(metrics["loss"]) is float and type(metrics["seen"]) is int
        if best:
            assert mngr.best_step() == 1
            assert mngr.metrics(1) == metrics


def test_stray_entries_named_like_steps_are_not_steps(tmp_path):
    # As in Orbax: a file or a dangling symlink named like a step is ignored, not listed (a
    # file became latest_step and failed restore(); a dangling symlink failed the listing).
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(tree(0)))
    (tmp_path / "100").write_text("notes")
    os.symlink(tmp_path / "nowhere", tmp_path / "5")
    os.symlink(tmp_path / "0", tmp_path / "7")  # (a symlink to a step is one)
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [0, 7] and mngr.latest_step() == 7
        assert_tree_equal(mngr.restore(7, args=ocp.args.StandardRestore()), tree(0))


def test_a_damaged_step_document_leaves_the_other_steps_usable(tmp_path, caplog):
    with ocp.CheckpointManager(tmp_path) as mngr:
        for step in range(3):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))
    doc = tmp_path / "0" / fmt.CHECKPOINT_METADATA
    doc.write_bytes(b"{" + doc.read_bytes()[1:-1] + b"x")  # bit rot: its checksum fails
    with caplog.at_level("ERROR", logger="ckpt_async"), ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [0, 1, 2]
        assert_tree_equal(mngr.restore(2), tree(2))
        with pytest.raises(CorruptCheckpointError, match="_CHECKPOINT_METADATA"):
            mngr.restore(0)
    assert any(str(doc) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", [fmt.CHECKPOINT_METADATA, fmt.STEP_EXTENSION, "metrics/metrics"])
def test_a_step_document_that_cannot_be_read_leaves_the_other_steps_usable(tmp_path, caplog,
                                                                          name):
    # (an I/O error or no permission takes the same path as this directory in its place)
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"])
    with ocp.CheckpointManager(tmp_path, options) as mngr:
        for step in range(3):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)), metrics={"loss": float(step)})
    doc = tmp_path / "0" / name
    doc.unlink()
    doc.mkdir()
    with caplog.at_level("ERROR", logger="ckpt_async"), \
            ocp.CheckpointManager(tmp_path, options) as mngr:
        assert mngr.all_steps() == [0, 1, 2] and mngr.best_step() == 2
        assert_tree_equal(mngr.restore(2), tree(2))
    assert any(f"cannot read {doc}" in r.getMessage() for r in caplog.records)


def test_registered_item_absent_from_the_checkpoint_is_left_out(tmp_path):
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("extra", ocp.args.JsonSave)
    registry.add("extra", ocp.args.JsonRestore)
    with ocp.CheckpointManager(tmp_path, handler_registry=registry) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0))))
        assert set(mngr.restore(0).keys()) == {"state"}  # as Orbax 0.12.8
        with pytest.raises(FileNotFoundError):
            mngr.restore(0, args=ocp.args.Composite(extra=None))
        with pytest.raises(KeyError, match="'extra' is not in the checkpoint"):  # (as Orbax)
            mngr.restore(0, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))


def test_restore_args_for_items_the_step_lacks_raise_and_lock_nothing_in(tmp_path):
    # Restore args name every item: the items start reading before the step's listing and
    # metadata are in. An item the step lacks, or damaged step metadata, still raises as
    # before, and the item missing was not locked to the handler its args asked for.
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0))))
        with pytest.raises(ItemNotFoundError, match=r"item 'other' is not in the checkpoint"):
            mngr.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                    other=ocp.args.JsonRestore()))
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(1)),
                                             other=ocp.args.StandardSave(tree(2))))
        mngr.wait_until_finished()
        out = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      other=ocp.args.StandardRestore()))
        assert_tree_equal(out.state, tree(1))
        assert_tree_equal(out.other, tree(2))
    doc = tmp_path / "1" / fmt.CHECKPOINT_METADATA
    doc.write_bytes(doc.read_bytes().replace(b'"metrics":{}', b'"metrics":{"x":1}'))
    with ocp.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(CorruptCheckpointError, match="_CHECKPOINT_METADATA"):
            mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))


def test_a_listed_step_is_restored_without_listing_the_directory(tmp_path, monkeypatch):
    with ocp.CheckpointManager(tmp_path) as mngr:
        for step in range(3):
            mngr.save(step, args=ocp.args.StandardSave(tree(step)))
        mngr.wait_until_finished()
        listed = []
        real = _storage.listdirs

        async def listdirs(path):
            listed.append(path)
            return await real(path)

        monkeypatch.setattr(_storage, "listdirs", listdirs)
        assert_tree_equal(mngr.restore(1), tree(1))
        assert tmp_path not in listed  # (the step's own listing is its items)
        shutil.rmtree(tmp_path / "1")  # gone behind the manager's back: found out by listing
        with pytest.raises(StepNotFoundError, match=r"step 1 does not exist"):
            mngr.restore(1)
        assert tmp_path in listed


def test_item_saved_as_none_restores_as_none_also_after_reopen(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(0)),
                                             x=ocp.args.JsonSave([1])))
        # (x is locked to the JSON handler: it writes null, as Orbax 0.12.8's does)
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(1)), x=None))
        out = mngr.restore(1)
        assert set(out.keys()) == {"state", "x"} and out["x"] is None
    assert json.loads((tmp_path / "1" / "x" / "metadata").read_bytes()) is None
    with ocp.CheckpointManager(tmp_path) as mngr:  # as Orbax 0.12.8: x is None, not missing
        out = mngr.restore(1)
        assert out["x"] is None and mngr.restore(0)["x"] == [1]
    # (ckpt_async before round 36 recorded such an item without a folder: it is None too)
    shutil.rmtree(tmp_path / "1" / "x")
    with ocp.CheckpointManager(tmp_path) as mngr:
        out = mngr.restore(1)
        assert set(out.keys()) == {"state", "x"} and out["x"] is None
        with pytest.raises(HandlerError, match="item 'y' is None and no handler is configured"):
            mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(2)), y=None))
        assert mngr.all_steps() == [0, 1] and steps_on_disk(tmp_path) == ["0", "1"]


def test_save_of_earlier_step_returns_false_with_a_warning(tmp_path, caplog):
    import logging

    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.save(5, args=ocp.args.StandardSave({"a": np.ones(2)})) is True
        with caplog.at_level(logging.WARNING, logger="ckpt_async"):
            assert mngr.save(3, args=ocp.args.StandardSave({"a": np.ones(2)})) is False
            assert mngr.save(5, args=ocp.args.StandardSave({"a": np.ones(2)})) is False
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("step 3" in w and "latest step 5" in w for w in warnings)
        assert mngr.all_steps() == [5]
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(read_only=True)
                               ) as mngr, caplog.at_level(logging.WARNING, logger="ckpt_async"):
        caplog.clear()
        assert mngr.save(9, args=ocp.args.StandardSave({"a": np.ones(2)})) is False
        assert any("read only" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == ["5"]


def test_closed_manager_refuses_to_save(tmp_path):
    mngr = ocp.CheckpointManager(tmp_path)
    mngr.close()
    with pytest.raises(ClosedError):
        mngr.save(1, args=ocp.args.StandardSave({"a": np.ones(2)}))


def test_an_evaluator_waits_for_the_steps_a_trainer_commits(tmp_path):
    cu = ocp.checkpoint_utils
    with cu.wait_for_new_checkpoint(tmp_path / "run", timeout=0.2, seconds_to_sleep=0.05) as s:
        assert s == -1  # (no directory yet)
    def trainer():
        with ocp.CheckpointManager(tmp_path / "run") as mngr:
            for step in (1, 2, 3):
                time.sleep(0.3)
                mngr.save(step, args=ocp.args.StandardSave(tree(step)))
                mngr.wait_until_finished()

    thread = threading.Thread(target=trainer)
    thread.start()
    seen = []
    # (more may come while the trainer runs: timeout_fn says when none will)
    for step in cu.checkpoints_iterator(tmp_path / "run", seconds_to_sleep=0.02, timeout=0.5,
                                        timeout_fn=lambda: not thread.is_alive()):
        # (yielded once committed, never before: its directory has its final name)
        assert ocp.utils.is_checkpoint_finalized(tmp_path / "run" / str(step))
        with ocp.CheckpointManager(tmp_path / "run", ocp.CheckpointManagerOptions(
                read_only=True)) as reader:
            assert_tree_equal(reader.restore(step), tree(step))
        seen.append(step)
    thread.join()
    # Each new latest step, in order (one committed while the last was evaluated is skipped).
    assert seen == sorted(set(seen)) and seen[-1] == 3
    with cu.wait_for_new_checkpoint(tmp_path / "run", until_step=2, timeout=1) as s:
        assert s == 3
    with cu.wait_for_new_checkpoint(tmp_path / "run", until_step=4, timeout=0.2,
                                    seconds_to_sleep=0.05) as s:
        assert s == -1
    with pytest.raises(InvalidArgumentError, match="snapshot"):
        next(cu.checkpoints_iterator(tmp_path / "run", snapshot_dir=tmp_path / "snap"))


def test_a_step_deleted_while_the_manager_opens_is_left_out(tmp_path, monkeypatch):
    # Another manager's retention removes a step between this one listing the directory and
    # reading the step's time (its _CHECKPOINT_METADATA goes first): it is not there, and
    # opening the manager does not fail with FileNotFoundError (the evaluator of
    # docs/examples/data_iterator_and_evaluator.py hit this once).
    from ckpt_async.manager import _steps

    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.StandardSave(tree(1)))
    real = _steps.committed_steps

    async def listed_with_a_vanished_step(directory, name_format, **kw):
        return {**await real(directory, name_format, **kw), 2: "2"}  # ("2" is gone from disk)

    monkeypatch.setattr(_steps, "committed_steps", listed_with_a_vanished_step)
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
            read_only=True)) as reader:
        assert reader.all_steps() == [1]
        assert_tree_equal(reader.restore(1), tree(1))


@pytest.mark.parametrize("read", ["restore", "item_metadata"])
def test_a_step_deleted_while_it_is_read_raises_step_not_found(tmp_path, monkeypatch, read):
    # An evaluator reads a step the trainer's retention removes meanwhile: the read fails
    # with StepNotFoundError saying so (a FileNotFoundError), not with the
    # CorruptCheckpointError of the data file it no longer found (the evaluator of
    # docs/examples/data_iterator_and_evaluator.py met that once in ~90 runs).
    from ckpt_async.handlers import pytree

    with ocp.CheckpointManager(tmp_path) as trainer:
        trainer.save(1, args=ocp.args.StandardSave(tree(1)))
        trainer.wait_until_finished()
        real = pytree.PyTreeCheckpointHandler.read_documents

        async def retired_meanwhile(self, directory):
            documents = await real(self, directory)  # (read before the retention came)
            await trainer.async_manager.delete(1)
            return documents

        with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(
                read_only=True)) as reader:
            monkeypatch.setattr(pytree.PyTreeCheckpointHandler, "read_documents",
                                retired_meanwhile)
            with pytest.raises(StepNotFoundError,
                               match=r"step 1 of .* was deleted while it was being read") as info:
                getattr(reader, read)(1)
            assert isinstance(info.value, FileNotFoundError)
            assert str(info.value).count("deleted while") == 1  # (said once, of the step)
    assert os.listdir(tmp_path) == []


def test_a_step_retired_while_its_metrics_are_listed_leaves_the_listing_usable(tmp_path,
                                                                              monkeypatch):
    # An evaluator with best_fn (re)lists while the trainer's retention takes a step away
    # between the look for its metrics item and the read of it: until round 39 the listing
    # (the constructor, reload()) raised CheckpointNotFoundError naming the metrics file.
    opts = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(tmp_path, opts) as trainer:
        for step in (1, 2):
            trainer.save(step, args=ocp.args.StandardSave(tree(step)),
                         metrics={"loss": 1.0 / step})
    real = _storage.read_bytes
    metrics = tmp_path / "1" / "metrics" / "metrics"

    async def retired_meanwhile(path):
        if path == metrics and (tmp_path / "1").exists():  # (as a retention renames it)
            os.rename(tmp_path / "1", tmp_path / "1.orbax-checkpoint-todelete-1")
        return await real(path)

    monkeypatch.setattr(_storage, "read_bytes", retired_meanwhile)
    with ocp.CheckpointManager(tmp_path, opts) as evaluator:
        assert evaluator.best_step() == 2
        with pytest.raises(StepNotFoundError):
            evaluator.restore(1)
        assert_tree_equal(evaluator.restore(2), tree(2))


def test_a_damaged_step_still_present_is_reported_as_damaged(tmp_path):
    # (the step is still there: its read's own error stands)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.StandardSave(tree(1)))
    item = tmp_path / "1" / "default"
    data = next(p for p in (item / "d").iterdir())
    data.write_bytes(b"\0" * data.stat().st_size)
    with ocp.CheckpointManager(tmp_path) as mngr, pytest.raises(CorruptCheckpointError):
        mngr.restore(1)
