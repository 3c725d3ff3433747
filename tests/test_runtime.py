"""The runtime: the only code that makes threads or loops, one per process, the sync bridge.

Covers the rules of ``ckpt_async/_runtime.py``: no thread or event loop is created anywhere
else; the runtime is made lazily, once; a sync call from the engine loop raises instead of
deadlocking; exceptions cross the bridge unchanged; the async face works from any loop; commit
futures work from sync code and from any loop; a forked child gets a fresh runtime; and a
commit still in flight at interpreter exit is finished, not lost. Every subprocess has a
timeout, so a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _checks import NO_THREADS_AT_EXIT

import ckpt_async as ocp
from ckpt_async import _commit, _runtime
from ckpt_async._runtime import CommitFuture, Runtime, get_runtime
from ckpt_async.errors import RuntimeUsageError, StepNotFoundError

PACKAGE = Path(ocp.__file__).parent
SUBPROCESS_TIMEOUT = 60


def _run_python(source: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs ``source`` in a fresh interpreter (CPU-only JAX), failing on a hang."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env, cwd=cwd)


def _on_engine(fn):
    """Runs the coroutine function ``fn`` on the engine loop and returns its result."""
    return get_runtime().call(fn)


# -- (a) the runtime is the only code that creates threads or event loops ----------------------
FORBIDDEN = ("threading.Thread(", "asyncio.run(", "new_event_loop(", "start_blocking_portal(",
             "ThreadPoolExecutor(")


def _forbidden_uses(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        for pattern in FORBIDDEN:
            for m in re.finditer(re.escape(pattern), text):
                line = text.count("\n", 0, m.start()) + 1
                found.setdefault(path.relative_to(root).as_posix(), []).append(
                    f"{pattern} (line {line})")
    return found


def test_only_the_runtime_creates_threads_or_event_loops() -> None:
    found = _forbidden_uses(PACKAGE)
    assert set(found) <= {"_runtime.py"}, {k: v for k, v in found.items() if k != "_runtime.py"}
    # The scan itself must see the one legitimate use, or it scans nothing.
    assert any("start_blocking_portal(" in hit for hit in found.get("_runtime.py", []))


def test_the_source_scan_catches_a_thread_made_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "_runtime.py").write_text("threading.Thread(target=f)\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rogue.py").write_text("x = 1\nloop = asyncio.new_event_loop()\n")
    found = _forbidden_uses(tmp_path)
    assert found == {"_runtime.py": ["threading.Thread( (line 1)"],
                     "sub/rogue.py": ["new_event_loop( (line 2)"]}


# -- (b) one runtime per process, created lazily ------------------------------------------------
def test_importing_creates_no_thread_and_first_use_creates_one() -> None:
    out = _run_python("""
        import threading
        before = threading.active_count()
        import ckpt_async, ckpt_async.aio
        from ckpt_async import _runtime
        assert threading.active_count() == before, threading.enumerate()
        assert _runtime._runtime is None
        ckpt_async.aio.AsyncCheckpointManager('unused-dir')  # the async face alone: still lazy
        assert threading.active_count() == before, threading.enumerate()
        rt = _runtime.get_runtime()
        names = [t.name for t in threading.enumerate()]
        assert 'ckpt_async-engine' in names, names
        assert threading.active_count() == before + 1, names
        assert _runtime.get_runtime() is rt
        print('ok')
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_one_runtime_per_process_across_threads_and_facades(tmp_path: Path) -> None:
    seen: list[Runtime] = []
    threads = [threading.Thread(target=lambda: seen.append(get_runtime())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8 and all(rt is seen[0] for rt in seen)
    with ocp.CheckpointManager(tmp_path / "m"), ocp.StandardCheckpointer():
        assert get_runtime() is seen[0]
    engines = [t for t in threading.enumerate() if t.name == "ckpt_async-engine"]
    assert len(engines) == 1 and engines[0].daemon


# -- (c) a sync call from the engine loop raises instead of deadlocking -------------------------
def test_runtime_call_from_the_engine_loop_raises() -> None:
    rt = get_runtime()

    async def inner() -> int:
        return 1

    async def outer() -> int:
        return rt.call(inner)

    with pytest.raises(RuntimeUsageError, match="deadlock") as ei:
        rt.call(outer)
    assert "ckpt_async.aio" in str(ei.value)
    assert isinstance(ei.value, RuntimeError)  # the builtin mix-in


def test_sync_facade_save_from_the_engine_loop_raises(tmp_path: Path) -> None:
    ckptr = ocp.StandardCheckpointer()

    async def save_from_engine() -> None:
        ckptr.save(tmp_path / "c", {"a": np.zeros(3)})

    with pytest.raises(RuntimeUsageError, match="AsyncCheckpointer.save"):
        _on_engine(save_from_engine)
    assert not (tmp_path / "c").exists()
    ckptr.save(tmp_path / "c", {"a": np.zeros(3)})  # the same object still works off the loop
    ckptr.wait_until_finished()
    assert (tmp_path / "c" / "commit_success.txt").exists()


def test_sync_call_in_a_commit_callback_raises_instead_of_deadlocking(tmp_path: Path) -> None:
    # Done callbacks of commit futures run on the engine thread: the classic deadlock.
    errors: list[BaseException] = []
    done = threading.Event()
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        mngr.save(0, args=ocp.args.StandardSave({"a": np.arange(4)}))

        def callback(_f: CommitFuture) -> None:
            try:
                mngr.restore(0)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
            finally:
                done.set()

        mngr.commit_future(0).add_done_callback(callback)
        assert done.wait(30), "the callback never ran (deadlock?)"
    assert len(errors) == 1 and isinstance(errors[0], RuntimeUsageError)


# -- (d) exceptions cross the bridge unchanged ----------------------------------------------------
class _Custom(Exception):
    pass


def test_exception_crosses_the_bridge_as_the_same_object() -> None:
    err = _Custom("boom")

    async def fail() -> None:
        raise err

    with pytest.raises(_Custom) as ei:
        get_runtime().call(fail)
    assert ei.value is err

    async def from_user_loop() -> BaseException:
        try:
            await get_runtime().run(fail)
        except _Custom as exc:
            return exc
        raise AssertionError("not raised")

    assert asyncio.run(from_user_loop()) is err


@pytest.mark.parametrize("depth", [1, 2])
def test_single_member_exception_groups_are_unwrapped(depth: int) -> None:
    err = KeyError("inner")

    async def fail() -> None:
        exc: BaseException = err
        for i in range(depth):
            exc = ExceptionGroup(f"level {i}", [exc])
        raise exc

    with pytest.raises(KeyError) as ei:
        get_runtime().call(fail)
    assert ei.value is err

    async def on_engine_via_run() -> BaseException:  # run() on the engine loop itself
        try:
            await get_runtime().run(fail)
        except KeyError as exc:
            return exc
        raise AssertionError("not raised")

    assert _on_engine(on_engine_via_run) is err

    async def spawn_it() -> CommitFuture:
        return get_runtime().spawn(fail())

    fut = _on_engine(spawn_it)
    assert fut.exception(timeout=10) is err


def test_a_task_group_failure_arrives_as_its_member() -> None:
    err = OSError(28, "No space left on device")

    async def fail_in_task_group() -> None:
        async def boom() -> None:
            raise err

        async with asyncio.TaskGroup() as tg:
            tg.create_task(boom())
            tg.create_task(asyncio.sleep(10))

    with pytest.raises(OSError) as ei:
        get_runtime().call(fail_in_task_group)
    assert ei.value is err


def test_multi_member_exception_groups_are_kept() -> None:
    async def fail() -> None:
        raise ExceptionGroup("two", [ValueError("a"), KeyError("b")])

    with pytest.raises(ExceptionGroup) as ei:
        get_runtime().call(fail)
    assert len(ei.value.exceptions) == 2


def test_library_errors_cross_the_sync_facade_with_their_type(tmp_path: Path) -> None:
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        with pytest.raises(StepNotFoundError) as ei:
            mngr.restore(7)
    assert isinstance(ei.value, FileNotFoundError)
    assert str(tmp_path / "m") in str(ei.value)


# -- (e) the async face from the user's loop and from the engine loop ---------------------------
def _state(n: int = 1000) -> dict[str, np.ndarray]:
    return {"w": np.arange(n, dtype=np.float32), "b": np.ones((3, 4))}


async def _save_and_restore(root: Path) -> tuple[dict, list[int], asyncio.AbstractEventLoop]:
    mngr = ocp.aio.AsyncCheckpointManager(root, ocp.CheckpointManagerOptions(max_to_keep=2))
    futs = []
    for step in range(3):
        fut = await mngr.save(step, args=ocp.args.StandardSave(_state()))
        assert isinstance(fut, CommitFuture)
        futs.append(fut)
    results = [await f for f in futs]
    assert all(Path(r).name == str(s) for s, r in enumerate(results))
    restored = await mngr.restore(2)
    await mngr.close()
    return restored, mngr.all_steps(), asyncio.get_running_loop()


def test_async_face_from_the_users_own_loop(tmp_path: Path) -> None:
    restored, steps, loop = asyncio.run(_save_and_restore(tmp_path / "m"))
    assert loop is not get_runtime().loop
    assert steps == [1, 2]
    np.testing.assert_array_equal(restored["w"], _state()["w"])
    assert sorted(os.listdir(tmp_path / "m")) == ["1", "2"]


def test_async_face_from_a_uvloop_loop(tmp_path: Path) -> None:
    # (the docs say "any asyncio event loop, uvloop included")
    import uvloop  # (a test dependency)
    restored, steps, loop = uvloop.run(_save_and_restore(tmp_path / "m"))
    assert isinstance(loop, uvloop.Loop)
    assert steps == [1, 2]
    np.testing.assert_array_equal(restored["w"], _state()["w"])
    assert sorted(os.listdir(tmp_path / "m")) == ["1", "2"]


def test_async_face_from_the_engine_loop(tmp_path: Path) -> None:
    async def on_engine():
        return await _save_and_restore(tmp_path / "m")

    restored, steps, loop = _on_engine(on_engine)
    assert loop is get_runtime().loop
    assert steps == [1, 2]
    np.testing.assert_array_equal(restored["b"], np.ones((3, 4)))


def test_writes_start_once_the_sync_caller_has_its_result(tmp_path: Path, monkeypatch) -> None:
    # A sync save()'s writes wait for its caller's thread to run again (so the woken caller
    # gets the GIL first), not for a fixed delay; an async caller's wait the whole delay.
    from ckpt_async import _stage

    waits: list[tuple[bool, bool]] = []  # (a sync caller's future, set when the wait ended)
    wait = _stage.caller_back

    async def recorded(at_most: float) -> None:
        back = _runtime._caller_back.get()
        await wait(at_most)
        waits.append((back is not None, back is not None and back.done()))

    monkeypatch.setattr(_stage, "caller_back", recorded)
    monkeypatch.setattr(_stage, "HANDOFF_DELAY", 600.0)  # (a wait for it would hang the test)
    with ocp.CheckpointManager(tmp_path / "sync") as mngr:
        mngr.save(1, args=ocp.args.StandardSave(_state()))
        mngr.wait_until_finished()
    assert waits and all(w == (True, True) for w in waits)

    waits.clear()
    monkeypatch.setattr(_stage, "HANDOFF_DELAY", 0.001)
    asyncio.run(_save_and_restore(tmp_path / "async"))
    assert waits and all(w == (False, False) for w in waits)


def test_user_loop_keeps_running_while_the_commit_runs(tmp_path: Path) -> None:
    # The commit lives on the engine loop: the user's loop is free to tick meanwhile.
    async def main() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        ckptr = ocp.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        fut = await ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(_state(1 << 20)))
        await fut
        stop.set()
        await task
        await ckptr.close()
        return ticks

    assert asyncio.run(main()) > 0
    assert (tmp_path / "c" / "commit_success.txt").exists()


def test_commit_future_awaited_from_another_loop_than_the_one_that_saved(tmp_path: Path) -> None:
    ckptr = ocp.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())

    async def save() -> CommitFuture:
        return await ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(_state()))

    fut = asyncio.run(save())          # that loop is closed now
    path = asyncio.run(_await(fut))    # a second, unrelated loop
    assert Path(path) == tmp_path / "c"
    assert fut.result(timeout=0) == path


async def _await(fut: CommitFuture):
    return await fut


def _blocked_future() -> tuple[CommitFuture, threading.Event]:
    """A background task on the engine loop that finishes once the returned event is set."""
    release = threading.Event()

    async def work() -> str:
        await get_runtime().to_thread(release.wait, 30)
        return "committed"

    async def spawn_it() -> CommitFuture:
        return get_runtime().spawn(work())

    return _on_engine(spawn_it), release


def test_commit_future_from_sync_code() -> None:
    fut, release = _blocked_future()
    assert isinstance(fut, CommitFuture) and not fut.done()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    calls: list[tuple[str, bool]] = []
    fut.add_done_callback(lambda f: calls.append((f.result(), threading.current_thread().name
                                                  == "ckpt_async-engine")))
    release.set()
    assert fut.result(timeout=10) == "committed"
    assert fut.done() and fut.exception() is None
    assert calls == [("committed", True)]  # callbacks run on the engine thread
    late: list[str] = []
    fut.add_done_callback(lambda f: late.append(f.result()))  # already done: runs at once
    assert late == ["committed"]


def test_waiting_for_a_commit_on_the_engine_thread_raises_instead_of_deadlocking() -> None:
    # A done callback runs on the engine thread, where every commit runs: one that waited
    # there for a commit not done yet hung the engine, every save of the process, for good.
    blocked, release = _blocked_future()
    first, release_first = _blocked_future()
    seen: list[object] = []
    called = threading.Event()

    def callback(_: CommitFuture) -> None:
        try:
            try:  # (without the check: a 2 s stall, then TimeoutError)
                blocked.result(timeout=2)
            except BaseException as exc:  # noqa: BLE001 - recorded
                seen.append(type(exc))
            if seen == [RuntimeUsageError]:  # (else these would wait forever)
                for wait in (blocked.result, blocked.exception):
                    with pytest.raises(RuntimeUsageError, match="engine thread.*deadlock"):
                        wait()
                    seen.append("refused")
            with pytest.raises(TimeoutError):  # (a look without waiting stays allowed)
                blocked.result(timeout=0)
            seen.append("looked")
        finally:
            called.set()

    first.add_done_callback(callback)
    release_first.set()
    assert called.wait(30)
    assert seen == [RuntimeUsageError, "refused", "refused", "looked"]
    release.set()
    assert blocked.result(timeout=30) == "committed"


def test_commit_future_is_awaitable_on_the_users_loop() -> None:
    fut, release = _blocked_future()

    async def main() -> str:
        asyncio.get_running_loop().call_later(0.05, release.set)
        return await asyncio.wait_for(fut, 10)

    assert asyncio.run(main()) == "committed"


def test_the_async_face_outside_an_asyncio_loop_refuses_before_it_starts(tmp_path: Path) -> None:
    # What trio (or anyio's trio backend) does with a coroutine: send(None), with no asyncio
    # loop running. The call raises RuntimeUsageError and starts nothing. (It started the save
    # on the engine loop and handed trio an asyncio future: trio raised its TypeError, and the
    # save went on and committed.)
    mngr = ocp.aio.AsyncCheckpointManager(tmp_path / "m")
    call = mngr.save(1, args=ocp.args.StandardSave(_state()))
    with pytest.raises(RuntimeUsageError, match="outside an asyncio event loop.*nothing was "
                                                "started"):
        call.send(None)
    fut, release = _blocked_future()
    with pytest.raises(RuntimeUsageError, match="outside an asyncio event loop.*commit goes on"):
        fut.__await__()
    release.set()
    assert fut.result(timeout=30) == "committed"
    assert not (tmp_path / "m").exists()


def test_commit_futures_of_the_sync_faces(tmp_path: Path) -> None:
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        assert mngr.save(0, args=ocp.args.StandardSave(_state()))
        fut = mngr.commit_future(0)
        assert isinstance(fut, CommitFuture)
        assert Path(fut.result(timeout=30)).name == "0"
        assert fut.done()
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(_state()))
    assert isinstance(ckptr.last_commit, CommitFuture)
    assert Path(ckptr.last_commit.result(timeout=30)) == tmp_path / "c"
    ckptr.close()


# -- (f) after fork, the child gets a fresh runtime ------------------------------------------------
FORK_SCRIPT = """
    import asyncio, os, signal, sys, numpy as np
    import ckpt_async as ocp
    from ckpt_async import _runtime
    root = sys.argv[1]
    # The parent uses its runtime (engine thread, worker threads) before forking. TensorStore
    # aborts a forked child once the parent has used it, so the parent writes JSON only.
    json_ckptr = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    json_ckptr.save(os.path.join(root, 'parent'), args=ocp.args.JsonSave({'x': 1}))
    json_mngr = ocp.CheckpointManager(os.path.join(root, 'json_mngr'),
                                      item_handlers=ocp.JsonCheckpointHandler())
    json_mngr.save(1, args=ocp.args.JsonSave({'x': 1}))
    json_mngr.wait_until_finished()
    async_mngr = ocp.aio.AsyncCheckpointManager(os.path.join(root, 'async_mngr'),
                                                item_handlers=ocp.JsonCheckpointHandler())

    async def save_two(*steps):  # (saves awaited at once: they meet at the manager's lock)
        futs = await asyncio.gather(*(async_mngr.save(s, args=ocp.args.JsonSave({'s': s}))
                                      for s in steps))
        await asyncio.gather(*futs)
        return async_mngr.all_steps()

    assert asyncio.run(save_two(1, 2)) == [1, 2]
    parent_rt = _runtime.get_runtime()
    pid = os.fork()
    if pid == 0:
        code = 1
        signal.alarm(30)  # (a child that hangs ends)
        try:
            assert _runtime._runtime is None, 'the child inherited the parent runtime'
            # The parent's sync objects work in the child, on the child's runtime.
            assert json_ckptr.restore(os.path.join(root, 'parent')) == {'x': 1}
            json_ckptr.save(os.path.join(root, 'child_json'), args=ocp.args.JsonSave({'c': 1}))
            json_mngr.save(2, args=ocp.args.JsonSave({'c': 2}))
            json_mngr.wait_until_finished()
            assert json_mngr.restore(1) == {'x': 1} and json_mngr.restore(2) == {'c': 2}
            assert json_mngr.all_steps() == [1, 2]
            json_mngr.close()
            # (a lock the parent's engine loop had used raised RuntimeError here)
            assert asyncio.run(save_two(3, 4)) == [1, 2, 3, 4]
            state = {'w': np.arange(100_000, dtype=np.float32)}
            with ocp.CheckpointManager(os.path.join(root, 'child')) as mngr:
                mngr.save(3, args=ocp.args.StandardSave(state))
                mngr.wait_until_finished()
                restored = mngr.restore(3)
            np.testing.assert_array_equal(restored['w'], state['w'])
            got = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
                os.path.join(root, 'parent'))
            assert got == {'x': 1}, got
            assert _runtime.get_runtime() is not parent_rt
            print('child ok', flush=True)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    # The parent's runtime survives the fork.
    assert _runtime.get_runtime() is parent_rt
    json_ckptr.save(os.path.join(root, 'parent2'), args=ocp.args.JsonSave({'y': 2}))
    print('parent ok', flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork semantics tested on Linux")
def test_forked_child_gets_a_fresh_runtime_and_can_save_and_restore(tmp_path: Path) -> None:
    out = _run_python(FORK_SCRIPT, str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["child", "ok", "parent", "ok"]
    assert sorted(os.listdir(tmp_path)) == ["async_mngr", "child", "child_json", "json_mngr",
                                            "parent", "parent2"]
    assert sorted(os.listdir(tmp_path / "child")) == ["3"]


FORK_DURING_SAVE = """
    import gc, os, signal, threading
    from ckpt_async import _runtime
    before = (gc.isenabled(), gc.get_freeze_count())
    inside, leave = threading.Event(), threading.Event()

    def saving():  # (as a save staging, then its commit: the collector paused, the heap frozen)
        with _runtime.gc_paused(), _runtime.heap_frozen():
            inside.set()
            leave.wait()

    thread = threading.Thread(target=saving)
    thread.start()
    inside.wait()
    assert (gc.isenabled(), gc.get_freeze_count() > before[1]) == (False, True)
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)  # (a child that hangs ends)
        got = [(gc.isenabled(), gc.get_freeze_count())]
        with _runtime.gc_paused(), _runtime.heap_frozen():  # (a save in the child)
            got.append((gc.isenabled(), gc.get_freeze_count() > before[1]))
        got.append((gc.isenabled(), gc.get_freeze_count()))
        print(got == [before, (False, True), before], got, before, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    leave.set()
    thread.join()
    assert (gc.isenabled(), gc.get_freeze_count()) == before
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork semantics tested on Linux")
def test_a_child_forked_during_a_save_has_the_collector_back(tmp_path: Path) -> None:
    # The threads that paused the collector or froze the heap do not exist in the child: it
    # starts with both undone. (Its collector stayed disabled for good, its heap frozen.)
    out = _run_python(FORK_DURING_SAVE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True "), out.stdout


# -- (g) at exit, an in-flight commit is finished, not lost, and exit does not hang --------------
EXIT_SCRIPT = """
    import asyncio, sys, numpy as np
    import ckpt_async as ocp
    from ckpt_async import _commit
    kind, path = sys.argv[1], sys.argv[2]
    # Hold each commit back a little, so it is surely still in flight when the script ends.
    real_commit = _commit.commit
    async def slow_commit(*args, **kwargs):
        await asyncio.sleep(0.5)
        await real_commit(*args, **kwargs)
    _commit.commit = slow_commit
    state = {'w': np.arange(1 << 20, dtype=np.float32), 'b': np.ones((256, 256))}  # ~4.5 MB
    if kind == 'checkpointer':
        ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        ckptr.save(path, args=ocp.args.StandardSave(state))
        fut = ckptr.last_commit
    else:
        mngr = ocp.CheckpointManager(path)
        mngr.save(5, args=ocp.args.StandardSave(state))
        fut = mngr.commit_future(5)
    print('in flight at exit:', not fut.done(), flush=True)
    # No wait_until_finished(), no close(): the interpreter exits here.
"""


@NO_THREADS_AT_EXIT
@pytest.mark.parametrize("kind", ["checkpointer", "manager"])
def test_in_flight_commit_is_finished_at_exit(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "ckpt"
    t0 = time.monotonic()
    out = _run_python(EXIT_SCRIPT, kind, str(target))
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "in flight at exit: True"
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    assert took < 30  # a clean exit, not a timeout
    step_dir = target if kind == "checkpointer" else target / "5"
    assert (step_dir / "commit_success.txt").exists()
    assert not [n for n in os.listdir(step_dir.parent) if ".orbax-checkpoint-tmp" in n]
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(step_dir / "default" if kind == "manager" else step_dir)
    np.testing.assert_array_equal(restored["w"], np.arange(1 << 20, dtype=np.float32))
    np.testing.assert_array_equal(restored["b"], np.ones((256, 256)))


THREAD_OUTLIVES_MAIN = """
    import dataclasses, sys, threading, time, numpy as np
    import ckpt_async as ocp
    path = sys.argv[1]
    in_flight = threading.Event()

    class SlowHandler:  # Orbax's interface: its save runs while save() is in flight
        def save(self, directory, args):
            in_flight.set()
            time.sleep(0.5)  # (the main thread ends meanwhile)
            (directory / 'note.txt').write_text(args.text)
        def restore(self, directory, args=None):
            return (directory / 'note.txt').read_text()
        def metadata(self, directory):
            return None

    @ocp.args.register_with_handler(SlowHandler, for_save=True)
    @dataclasses.dataclass
    class NoteSave(ocp.args.CheckpointArgs):
        text: str

    def train():
        with ocp.CheckpointManager(path) as mngr:
            saved = mngr.save(1, args=ocp.args.Composite(
                state=ocp.args.StandardSave({'w': np.arange(8.0)}), note=NoteSave('one')))
            print('first save returned', saved, flush=True)
            try:
                mngr.save(2, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({'w': np.zeros(8)}), note=NoteSave('two')))
            except ocp.errors.RuntimeUsageError as exc:
                print('second save refused:', 'interpreter is exiting' in str(exc), flush=True)

    threading.Thread(target=train).start()
    in_flight.wait()
    # The main thread ends here, with the thread's first save in flight.
"""


@NO_THREADS_AT_EXIT
def test_a_thread_outliving_the_main_thread_has_its_call_finished_then_refused(
        tmp_path: Path) -> None:
    # Exit begins when the main thread ends. The call in flight then is finished and its step
    # committed; the thread's next call is refused at once, where it used to wait forever on
    # the stopped loop (or, through a second runtime, fail mixing two loops).
    out = _run_python(THREAD_OUTLIVES_MAIN, str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["first save returned True",
                                           "second save refused: True"], out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["1"]  # no step 2, no temporary directory
    assert (tmp_path / "run" / "1" / "commit_success.txt").exists()
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        restored = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    np.testing.assert_array_equal(restored["state"]["w"], np.arange(8.0))
    assert (tmp_path / "run" / "1" / "note" / "note.txt").read_text() == "one"



def test_a_daemon_threads_call_in_flight_does_not_hold_up_exit(tmp_path: Path) -> None:
    # Python does not wait for daemon threads, and neither does exit for their calls (one
    # may be parked in a call for hours, waiting for another process): it is cancelled.
    script = THREAD_OUTLIVES_MAIN.replace("time.sleep(0.5)", "time.sleep(60)").replace(
        "threading.Thread(target=train)", "threading.Thread(target=train, daemon=True)")
    t0 = time.monotonic()
    out = _run_python(script, str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 30
    assert out.stdout == ""  # (the thread's save never returned)
    assert not (tmp_path / "run" / "1").exists()  # nothing committed

def test_a_daemon_threads_call_cancelled_at_exit_says_why() -> None:
    # What the daemon thread above meets, where it can be caught: not a bare CancelledError.
    out = _run_python("""
        import asyncio, threading
        from ckpt_async import _runtime
        from ckpt_async.errors import RuntimeUsageError
        rt = _runtime.get_runtime()
        started, done, caught = threading.Event(), threading.Event(), []

        async def parked():
            started.set()
            await asyncio.sleep(60)

        def daemon():
            try:
                rt.call(parked)
            except BaseException as exc:
                caught.append(exc)
            done.set()

        threading.Thread(target=daemon, daemon=True).start()
        started.wait()
        rt.shutdown()  # (what interpreter exit does)
        assert done.wait(10)
        print(type(caught[0]).__name__, caught[0])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "RuntimeUsageError 'parked' was cancelled: the interpreter is exiting"), out.stdout


INTERRUPTED_AT_EXIT = """
    import asyncio, signal, sys, threading, time, numpy as np
    import ckpt_async as ocp
    from ckpt_async import _commit
    how, root = sys.argv[1], sys.argv[2]
    real_commit = _commit.commit
    async def slow_commit(*args, **kwargs):  # (far longer than the test waits)
        await asyncio.sleep(600)
        await real_commit(*args, **kwargs)
    _commit.commit = slow_commit
    state = ocp.args.StandardSave({'a': np.zeros(4)})
    ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()).save(root + '/c', args=state)
    ocp.CheckpointManager(root + '/m').save(7, args=state)
    main = threading.main_thread().ident
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))  # (a handler's sys.exit)

    def interrupt():  # once exit waits for the commits
        while True:
            frame, names = sys._current_frames().get(main), []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            if 'shutdown' in names and names[0] in ('wait', 'acquire'):
                break
            time.sleep(0.01)
        signal.pthread_kill(main, getattr(signal, how))

    threading.Thread(target=interrupt, daemon=True).start()
"""


@NO_THREADS_AT_EXIT
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_exit_waits_abandons_the_commits_and_goes_on(
        tmp_path: Path, how: str) -> None:
    # Ctrl-C (or a signal handler's sys.exit) while exit waits for commits in flight: what is
    # abandoned is logged, naming each commit, and the interrupt goes on; the commits are not
    # made. It used to be swallowed, and exit went on waiting for them.
    out = _run_python(INTERRUPTED_AT_EXIT, how, str(tmp_path))
    assert out.returncode == 0, out.stderr  # (Python's: an exception at exit is printed)
    kind = "KeyboardInterrupt" if how == "SIGINT" else "SystemExit"
    abandoned = re.findall(rf"^{kind} at exit, while ckpt_async finished its work: "
                           r"abandoned (.*), not committed", out.stderr, re.M)
    assert len(abandoned) == 1, out.stderr
    assert sorted(abandoned[0].split(", ")) == [
        f"the commit of {tmp_path / 'c'}", f"the commit of step 7 of {tmp_path / 'm'}"]
    assert kind in out.stderr.split("Exception ignored in:")[1]  # (raised on)
    # Nothing committed; the temporary directories stay (readers ignore them).
    assert [re.sub(r"tmp-\d+$", "tmp-N", n) for n in sorted(os.listdir(tmp_path))] == [
        "c.orbax-checkpoint-tmp-N", "m"]
    assert [re.sub(r"tmp-\d+$", "tmp-N", n) for n in os.listdir(tmp_path / "m")] == [
        "7.orbax-checkpoint-tmp-N"]


def test_exit_without_any_save_is_quick() -> None:
    t0 = time.monotonic()
    out = _run_python("""
        import ckpt_async
        from ckpt_async import _runtime
        _runtime.get_runtime()
        print('bye')
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bye"
    assert time.monotonic() - t0 < 30


@NO_THREADS_AT_EXIT
def test_failed_commit_at_exit_is_logged_not_lost(tmp_path: Path) -> None:
    out = _run_python("""
        import logging, sys, numpy as np
        import ckpt_async as ocp
        from ckpt_async import _commit
        async def broken_commit(*args, **kwargs):
            raise OSError(28, 'No space left on device')
        _commit.commit = broken_commit
        ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        ckptr.save(sys.argv[1], args=ocp.args.StandardSave({'a': np.zeros(4)}))
    """, str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    assert f"the commit of {tmp_path / 'c'} failed, and nobody retrieved the error" in out.stderr
    assert "No space left on device" in out.stderr
    assert os.listdir(tmp_path) == []  # nothing visible, no tmp directory left behind


UNRETRIEVED_FAILURES = """
    import gc, logging, sys, time, numpy as np
    import ckpt_async as ocp
    from ckpt_async import _commit
    logging.basicConfig(stream=sys.stdout, format='LOG %(message)s')
    async def broken_commit(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    _commit.commit = broken_commit
    root, state = sys.argv[1], ocp.args.StandardSave({'a': np.zeros(4)})

    def failed(fut):
        while not fut.done():
            time.sleep(0.01)

    # Failed, and retrieved: never logged.
    told = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    told.save(root + '/told', args=state)
    failed(told.last_commit)
    try:
        told.wait_until_finished()
    except ocp.errors.CommitError:
        print('told raised', flush=True)
    told_mngr = ocp.CheckpointManager(root + '/told_mngr')
    told_mngr.save(1, args=state)
    told_mngr.save(2, args=state)  # (two failures, one raised: told with it)
    failed(told_mngr.commit_future(2))
    try:
        told_mngr.wait_until_finished()
    except ocp.errors.CommitError:
        print('told_mngr raised', flush=True)
    asked = ocp.CheckpointManager(root + '/asked')
    asked.save(1, args=state)
    print('asked', type(asked.commit_future(1).exception()).__name__, flush=True)
    # Failed, nobody told, then dropped: logged when collected.
    dropped = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    dropped.save(root + '/dropped', args=state)
    failed(dropped.last_commit)
    del dropped
    gc.collect()
    print('collected', flush=True)
    # Failed, nobody told, still held at exit: logged at exit.
    kept = ocp.CheckpointManager(root + '/kept')
    kept.save(3, args=state)
    failed(kept.commit_future(3))
    gc.collect()
    print('exiting', flush=True)
"""


@NO_THREADS_AT_EXIT
def test_a_failure_nobody_retrieved_is_logged_once(tmp_path: Path) -> None:
    # As asyncio logs a task's exception nobody retrieved: a commit that failed in the
    # background, its error never raised to anyone, is logged once, naming the commit, when
    # its future is collected or at exit. It used to leave no trace unless still in flight
    # at exit.
    out = _run_python(UNRETRIEVED_FAILURES, str(tmp_path))
    assert out.returncode == 0, out.stderr
    logged = [line for line in out.stdout.splitlines() if line.startswith("LOG ")]
    ends = "failed, and nobody retrieved the error (wait_until_finished(), close(), " \
           "check_for_errors() or the commit's future): saving {} failed: [Errno 28] No " \
           "space left on device"
    assert logged == [
        f"LOG the commit of {tmp_path / 'dropped'} " + ends.format(tmp_path / "dropped"),
        f"LOG the commit of step 3 of {tmp_path / 'kept'} " + ends.format(tmp_path / "kept" / "3"),
    ], out.stdout
    told = [line for line in out.stdout.splitlines()
            if not line.startswith(("LOG ", "  ", "Traceback", "OSError", "ckpt_async.errors",
                                    "The above exception"))]
    assert [line for line in told if line] == [
        "told raised", "told_mngr raised", "asked CommitError", "collected", "exiting"]
    assert out.stdout.index("LOG the commit of " + str(tmp_path / "dropped")) < \
        out.stdout.index("collected") < out.stdout.index("LOG the commit of step 3")
    assert "Traceback" in out.stdout  # (with the commit's traceback, as asyncio logs it)
    assert sorted(os.listdir(tmp_path)) == ["asked", "kept", "told_mngr"]  # no step in them
    assert not any(os.listdir(tmp_path / name) for name in os.listdir(tmp_path))


def test_runtime_module_state_is_a_single_global() -> None:
    # get_runtime() returns the module's runtime; nothing else caches a second one.
    assert _runtime._runtime is get_runtime()


# -- (f) the background loop: the Python part of a commit's writes --------------------------------
def test_background_loop_runs_off_the_engine_in_the_callers_context() -> None:
    rt = get_runtime()
    flag: contextvars.ContextVar[str] = contextvars.ContextVar("flag", default="unset")

    async def where() -> tuple[str, bool, str, str]:
        name = await rt.to_thread(lambda: threading.current_thread().name)
        return (threading.current_thread().name, rt.on_engine_thread(), flag.get(), name)

    async def probe() -> tuple[str, bool, str, str]:
        flag.set("caller")
        _runtime.mark_background()
        return await rt.in_background_loop(where)

    thread, on_engine, seen, worker = _on_engine(probe)
    assert thread == "ckpt_async-bg-loop" and not on_engine
    assert seen == "caller"  # the caller's context travels, so does the background flag:
    assert worker.startswith("ckpt_async-bg")  # its blocking calls go to the background pool


def test_background_loop_hands_back_errors() -> None:
    rt = get_runtime()

    async def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _on_engine(lambda: rt.in_background_loop(fail))


def _stops_slowly(events: list[str], started: threading.Event | None = None):
    """A coroutine function that runs until cancelled, then takes a while to stop (as a
    TensorStore write does) and records "stopped"; sets ``started`` once it runs."""
    async def slow() -> None:
        if started is not None:
            started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
            events.append("stopped")
            raise
    return slow


def test_cancelling_the_caller_stops_the_background_work_first() -> None:
    rt = get_runtime()
    events: list[str] = []
    started = threading.Event()
    slow = _stops_slowly(events, started)

    async def caller() -> None:
        task = asyncio.get_running_loop().create_task(rt.in_background_loop(slow))
        # (once it runs: the background loop's thread, at the background priority, may take
        # a while to start it on a loaded machine; cancelled before, nothing would stop)
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        events.append("caller saw the cancellation")

    _on_engine(caller)
    assert events == ["stopped", "caller saw the cancellation"]


def test_a_caller_in_an_anyio_cancel_scope_hears_of_it_once_the_call_stopped() -> None:
    # anyio's cancel scopes (asyncio backend) cancel the task again and again until it ends:
    # the caller still hears of it only once the engine's task has stopped. (The second
    # cancel ended the wait: an async save cancelled so returned while it still staged, its
    # temporary directory there.)
    import anyio

    rt = get_runtime()
    events: list[str] = []
    started = threading.Event()
    slow = _stops_slowly(events, started)

    async def main() -> None:
        scope = anyio.CancelScope()

        async def call() -> None:
            with scope:
                await rt.run(slow)
            events.append("caller saw the cancellation")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            assert await anyio.to_thread.run_sync(started.wait, 30)
            scope.cancel()

    anyio.run(main)
    assert events == ["stopped", "caller saw the cancellation"]


def test_reads_of_data_files_get_twice_the_threads_of_other_blocking_work() -> None:
    # A restore's reads mostly wait on the disk: to_read_thread admits 2x DEFAULT_THREADS at
    # once (all of them meet at the barrier), to_thread DEFAULT_THREADS (one more times out).
    rt = get_runtime()

    def meet(barrier: threading.Barrier) -> int:
        barrier.wait(timeout=2)
        return threading.get_ident()

    async def run(submit, count: int) -> list[int]:
        barrier = threading.Barrier(count)
        return await asyncio.gather(*(submit(meet, barrier) for _ in range(count)))

    threads = _on_engine(lambda: run(rt.to_read_thread, 2 * _runtime.DEFAULT_THREADS))
    assert len(set(threads)) == 2 * _runtime.DEFAULT_THREADS
    with pytest.raises(threading.BrokenBarrierError):
        _on_engine(lambda: run(rt.to_thread, _runtime.DEFAULT_THREADS + 1))


def test_a_caller_cancelled_before_its_call_starts_on_the_engine_hears_of_it() -> None:
    # The engine's task is cancelled before its first step (it never runs its body): the
    # caller's loop still gets CancelledError, rather than waiting forever.
    rt = get_runtime()

    async def slow() -> None:
        await asyncio.sleep(30)

    async def one() -> None:
        task = asyncio.create_task(rt.run(slow))
        await asyncio.sleep(0)  # (submitted; the engine may not have started it yet)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 10)

    async def main() -> None:
        for _ in range(30):
            await one()

    asyncio.run(main())


def test_an_interrupted_sync_call_cancels_its_engine_task_first() -> None:
    # Ctrl-C in the thread that waits: the call's task is cancelled, and has stopped (its
    # cleanup done) when the interrupt reaches the caller.
    rt = get_runtime()
    events: list[str] = []
    slow = _stops_slowly(events)
    # (SIGINT sent to the waiting thread itself: sent to the process, the kernel may hand it
    # to another thread, which does not wake the main thread's wait; it then waited out the
    # 30 s and raised nothing, twice in the suite's runs without CAP_SYS_NICE)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    # (Python's own handler, whatever this process inherited: started in the background of a
    # shell without job control, or under nohup, SIGINT is ignored and nothing is raised)
    before, start = signal.signal(signal.SIGINT, signal.default_int_handler), time.monotonic()
    try:
        threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        rt.call(slow)
    except KeyboardInterrupt:  # (the timer inside: the interrupt lands here)
        pass
    else:  # (what to look at, should it happen again)
        pytest.fail(f"no KeyboardInterrupt; the call returned after "
                    f"{time.monotonic() - start:.1f} s; SIGINT's handler before {before!r}; "
                    f"{threading.active_count()} threads")
    finally:
        signal.signal(signal.SIGINT, before)
    events.append("interrupt raised")
    assert events == ["stopped", "interrupt raised"]


@pytest.mark.parametrize("kind", ["checkpointer", "manager"])
def test_a_close_after_an_interrupted_close_waits_for_the_commit(
        tmp_path: Path, monkeypatch, kind: str) -> None:
    # Ctrl-C while close() waits for a commit: closed to new saves at once, and the next
    # close() waits for the commit. (It returned at once, the commit still in flight: the
    # first close had marked the object closed before its wait ended.)
    release, real_commit = threading.Event(), _commit.commit

    async def held_commit(*args, **kwargs):
        await get_runtime().to_thread(release.wait)
        await real_commit(*args, **kwargs)

    monkeypatch.setattr(_commit, "commit", held_commit)
    state = ocp.args.StandardSave({"a": np.arange(4.0)})
    if kind == "checkpointer":
        obj = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        obj.save(tmp_path / "c", args=state)
        fut, inner, step_dir = obj.last_commit, obj.async_checkpointer, tmp_path / "c"
    else:
        obj = ocp.CheckpointManager(tmp_path / "m")
        obj.save(1, args=state)
        fut, inner, step_dir = obj.commit_future(1), obj.async_manager, tmp_path / "m" / "1"
    main, waits, real_wait = threading.main_thread().ident, [], inner.wait_until_finished
    assert main is not None and threading.get_ident() == main

    async def wait() -> None:  # (close() waits here: the first time, Ctrl-C lands meanwhile)
        waits.append(len(waits))
        if len(waits) == 1:
            signal.pthread_kill(main, signal.SIGINT)
        else:
            release.set()
        await real_wait()

    monkeypatch.setattr(inner, "wait_until_finished", wait)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            obj.close()
        signal.signal(signal.SIGINT, before)
        assert not fut.done() and not step_dir.exists()
        with pytest.raises(ocp.errors.ClosedError):
            obj.save(tmp_path / "other" if kind == "checkpointer" else 2, args=state)
        obj.close()
        assert fut.done() and fut.result() == step_dir
        assert (step_dir / "commit_success.txt").exists()
        obj.close()  # (closed now: returns at once)
        assert waits == [0, 1]
    finally:
        signal.signal(signal.SIGINT, before)
        release.set()  # (a failure here leaves no commit held)


def test_a_finished_commit_leaves_no_timer_on_the_engine_loop(tmp_path: Path,
                                                               monkeypatch) -> None:
    """Each commit with a timeout sets a timer for half of it (its priority raised then). Once
    the commit is done the timer is cancelled: left to fire 10 minutes later (the default
    timeout's half), each save's timer and the context it ran in stayed alive until then."""
    rt = get_runtime()
    timers: list[asyncio.TimerHandle] = []
    call_later = rt.loop.call_later

    def recording(delay, callback, *args, context=None):
        timers.append(call_later(delay, callback, *args, context=context))
        return timers[-1]

    monkeypatch.setattr(rt.loop, "call_later", recording)
    state = {"a": np.arange(64, dtype=np.float32)}
    with ocp.CheckpointManager(tmp_path / "m") as mngr:  # (Orbax's default timeout, 1200 s)
        for step in range(5):
            mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    # (the half-timeout timers and any other of the commits' timeouts: minutes away)
    later = [t for t in timers if t.when() - rt.loop.time() > 300]
    assert len(later) >= 5
    deadline = time.monotonic() + 5  # (cancelled on the engine loop, soon after each commit)
    while not all(t.cancelled() for t in later) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(t.cancelled() for t in later)
