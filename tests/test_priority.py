"""Background commit work runs at a lower CPU priority than the caller (Linux).

A commit's worker threads and TensorStore's I/O threads are put at the background priority
(``SCHED_IDLE`` by default, nice 19 for ``"low"``); the caller's thread, the engine loop and
every other thread (XLA's) keep theirs. Priorities are checked in a fresh interpreter so that
this test process's threads are left as they were.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from _checks import NO_THREADS_AT_EXIT

import ckpt_async as ocp
from ckpt_async import _runtime
from ckpt_async._runtime import get_runtime

linux_only = pytest.mark.skipif(not _runtime._CAN_SET_PRIORITY, reason="Linux thread priorities")

PROBE = textwrap.dedent("""
    import json, os, sys, threading
    import numpy as np
    import jax.numpy as jnp
    import ckpt_async as ocp
    from ckpt_async import _runtime
    if sys.argv[2] != "env":
        ocp.set_background_priority(sys.argv[2])

    def threads():
        out = {}
        for t in os.listdir("/proc/self/task"):
            tid = int(t)
            try:
                with open(f"/proc/self/task/{t}/comm") as f:
                    comm = f.read().strip()
                out[tid] = (comm, os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
            except OSError:
                pass
        return out

    import ml_dtypes
    # Large arrays and small ones (ckpt_async's own OCDBT writer, in background threads), and
    # int4 ones, which only TensorStore's zarr driver writes (in TensorStore's threads).
    state = {"big": jnp.arange(1 << 21, dtype=jnp.float32), "small": np.arange(100.0),
             "j": jnp.ones((64, 64)), "i4": np.arange(1 << 20).astype(ml_dtypes.int4)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(sys.argv[1] + "/a", args=ocp.args.StandardSave(state))
    ckptr.wait_until_finished()
    before = threads()  # TensorStore's threads now exist; the second save finds them at once
    # Seen from inside the second commit (the background work is in flight there).
    from ckpt_async import _commit
    during = {}
    commit = _commit.commit

    async def spy(*args, **kwargs):
        during.update(threads())
        return await commit(*args, **kwargs)

    _commit.commit = spy
    ckptr.save(sys.argv[1] + "/b", args=ocp.args.StandardSave(state))
    # (waited for by another thread: the thread that saved would have it hurried, and its
    # threads raised to the normal priority: test_a_waiting_caller_raises_the_commit)
    waiter = threading.Thread(target=ckptr.wait_until_finished)
    waiter.start()
    waiter.join()
    after = during
    idle_again = threads()
    rt = _runtime.get_runtime()
    engine = rt._portal.call(threading.get_native_id)
    py = {t.native_id: t.name for t in threading.enumerate()}
    print(json.dumps({
        "main": threading.get_native_id(), "engine": engine, "python_names": py,
        "threads": {tid: v for tid, v in after.items() if tid in before or py.get(tid)},
        "ts_before": [tid for tid, v in before.items() if v[0] == "ts_pool_worker"],
        "ts_after_commit": sorted({tuple(v[1:]) for tid, v in idle_again.items()
                                   if v[0] == "ts_pool_worker" and tid in before}),
    }))
""")


def _run_probe(script: str, *args: str, env: dict | None = None) -> dict:
    """Runs a probe script in a fresh process; returns the JSON of its last output line."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True,
        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(tmp_path, level: str, env: dict | None = None) -> dict:
    out = _run_probe(PROBE, str(tmp_path), level, env=env)
    out["threads"] = {int(k): v for k, v in out["threads"].items()}
    out["python_names"] = {int(k): v for k, v in out["python_names"].items()}
    return out


def _classify(out: dict) -> dict[str, list[tuple[int, int]]]:
    groups: dict[str, list[tuple[int, int]]] = {"main": [], "engine": [], "bg": [], "ts": [],
                                                 "other": []}
    for tid, (comm, policy, nice) in out["threads"].items():
        name = out["python_names"].get(tid, "")
        if tid == out["main"]:
            key = "main"
        elif tid == out["engine"]:
            key = "engine"
        elif name.startswith("ckpt_async-bg"):
            key = "bg"
        elif comm == "ts_pool_worker":
            key = "ts" if tid in out["ts_before"] else "other"  # a new one may be unscanned
        else:
            key = "other"  # XLA's threads, anyio's (foreground) workers, ...
        groups[key].append((policy, nice))
    return groups


NORMAL = (os.SCHED_OTHER, 0) if hasattr(os, "SCHED_OTHER") else None


@linux_only
@pytest.mark.parametrize("level,env,expected", [
    ("env", {}, "idle"),  # the default
    ("idle", {}, "idle"),
    ("low", {}, "low"),
    ("env", {"CKPT_ASYNC_BACKGROUND_PRIORITY": "low"}, "low"),
    ("normal", {}, "normal"),
])
def test_commit_threads_run_at_the_background_priority(tmp_path, level, env, expected) -> None:
    out = _probe(tmp_path, level, env)
    groups = _classify(out)
    # Once no commit runs, restores get TensorStore's threads back at the normal priority,
    # where the process may raise a thread's priority; from nice 19 ("low") they stay.
    back = NORMAL if _runtime.may_raise_priority() else (os.SCHED_IDLE, 0)
    after = {"idle": back, "low": (os.SCHED_OTHER, 19), "normal": NORMAL}[expected]
    assert {tuple(v) for v in out["ts_after_commit"]} == {after}
    want = {"idle": (os.SCHED_IDLE, 0), "low": (os.SCHED_OTHER, 19), "normal": NORMAL}[expected]
    assert groups["bg"] and groups["ts"], groups  # the probe saw both kinds of thread
    # The background loop (the Python part of the writes) is among the lowered threads.
    loop = [tid for tid, name in out["python_names"].items() if name == "ckpt_async-bg-loop"]
    assert len(loop) == 1 and tuple(out["threads"][loop[0]][1:]) == want, out
    assert set(map(tuple, groups["bg"])) == {want}, groups
    assert set(map(tuple, groups["ts"])) == {want}, groups
    # The caller, the engine loop (save() and restore() run there) and XLA keep theirs.
    for key in ("main", "engine", "other"):
        if key == "other" and expected != "normal":
            # A TensorStore thread started after the last scan may not be lowered yet.
            continue
        assert set(map(tuple, groups[key])) == {NORMAL}, (key, groups)
    assert set(map(tuple, groups["main"] + groups["engine"])) == {NORMAL}


def test_background_priority_option_is_validated() -> None:
    with pytest.raises(ValueError, match="background priority"):
        ocp.set_background_priority("realtime")
    assert _runtime.background_priority() in _runtime.PRIORITIES


def test_a_bad_environment_value_falls_back_to_idle(monkeypatch) -> None:
    monkeypatch.setenv(_runtime.PRIORITY_ENV, "fastest")
    assert _runtime._priority_from_env() == "idle"
    monkeypatch.setenv(_runtime.PRIORITY_ENV, " LOW ")
    assert _runtime._priority_from_env() == "low"


def test_background_tasks_use_the_background_pool_and_do_not_mark_the_caller() -> None:
    rt = get_runtime()

    def name() -> str:
        return threading.current_thread().name

    async def probe() -> tuple[str, str, bool, bool]:
        foreground = await rt.to_thread(name)

        async def background() -> str:
            _runtime.mark_background()
            return await rt.to_thread(name)

        in_bg = await asyncio.get_running_loop().create_task(background())
        return foreground, in_bg, _runtime.in_background(), rt.on_engine_thread()

    fg, bg, caller_marked, on_engine = rt.call(probe)
    assert on_engine
    assert bg.startswith("ckpt_async-bg"), bg
    assert not fg.startswith("ckpt_async-bg"), fg
    assert not caller_marked  # marking a task leaves its parent's context alone


def test_save_leaves_the_callers_task_in_the_foreground(tmp_path) -> None:
    # On the engine loop, save() runs in the caller's own task: its writes, started there,
    # are background work, the task itself is not.
    async def save_then_look() -> bool:
        ckptr = ocp.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        fut = await ckptr.save(tmp_path / "x", args=ocp.args.StandardSave({"a": [1.0, 2.0]}))
        marked = _runtime.in_background()
        await fut
        await ckptr.close()
        return marked

    assert get_runtime().call(save_then_look) is False


@linux_only
def test_may_raise_priority_says_whether_a_thread_can_leave_sched_idle() -> None:
    # Asked of a fresh interpreter that actually tries (and so is left lowered itself).
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os
        from ckpt_async import _runtime
        said = _runtime.may_raise_priority()
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            could = True
        except PermissionError:
            could = False
        print(said, could)
    """)], capture_output=True, text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    said, could = proc.stdout.split()
    assert said == could


def test_a_commits_writes_run_on_the_background_loop(tmp_path, monkeypatch) -> None:
    from ckpt_async import _serialize

    seen: list[str] = []
    write = _serialize.ItemWriter.write

    async def spy(self, batch):
        seen.append(threading.current_thread().name)
        return await write(self, batch)

    monkeypatch.setattr(_serialize.ItemWriter, "write", spy)
    state = {"big": np.arange(1 << 18, dtype=np.float32), "small": np.arange(10.0)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        # (waited for by another thread: where no thread can be raised, a commit the thread
        # that saved waits for runs in the caller's task instead, see below)
        waiter = threading.Thread(target=ckptr.wait_until_finished)
        waiter.start()
        waiter.join()
        out = ckptr.restore(tmp_path / "c")
    np.testing.assert_array_equal(out["big"], state["big"])
    assert seen and set(seen) == {"ckpt_async-bg-loop"}


BOOST_PROBE = textwrap.dedent("""
    import asyncio, json, os, sys, threading, time
    import numpy as np
    import ckpt_async as ocp
    from ckpt_async import _commit, _runtime
    ocp.set_background_priority(sys.argv[3])
    rt = _runtime.get_runtime()
    mode = sys.argv[2]

    def levels():  # (policy, nice) of ckpt_async's background threads
        out = set()
        for tid in list(rt._bg_levels):
            try:
                out.add((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))
            except OSError:  # (ended)
                pass
        return sorted(out)

    seen = []
    commit = _commit.commit

    async def spy(*args, **kwargs):
        # The first commit's last step waits for its caller to wait for it (a second in
        # the mode where no one who counts does).
        if not seen:
            # (where the process may not raise priorities, nothing is boosted: look at once)
            wait = (1 if mode == "other_thread" else 30) if rt._may_boost else 0
            deadline = time.monotonic() + wait
            while not rt._boosted and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            seen.append(levels())
            if mode == "exit":
                print(json.dumps({"during": seen[0]}), flush=True)
        return await commit(*args, **kwargs)

    _commit.commit = spy
    state = {"a": np.arange(1 << 16, dtype=np.float32), "b": np.arange(10.0)}
    options = ocp.CheckpointManagerOptions(max_concurrent_saves=1, async_options=(
        ocp.AsyncOptions(timeout_secs=6) if mode == "half_timeout" else None))
    mngr = ocp.CheckpointManager(sys.argv[1], options=options)
    mngr.save(0, args=ocp.args.StandardSave(state))
    if mode == "exit":  # (the interpreter's exit finishes the commit)
        sys.exit(0)
    if mode == "wait":
        mngr.wait_until_finished()
    elif mode == "next_save":  # (waits in save() for the commit in flight)
        mngr.save(1, args=ocp.args.StandardSave(state))
    elif mode in ("other_thread", "half_timeout"):
        waiter = threading.Thread(target=mngr.wait_until_finished)
        waiter.start()
        waiter.join()
    mngr.wait_until_finished()
    time.sleep(0.05)  # (the done callbacks have run)
    print(json.dumps({"during": seen[0], "after": levels(), "boosted": len(rt._boosted),
                      "steps": mngr.all_steps()}))
    mngr.close()
""")


@linux_only
@pytest.mark.parametrize("mode", ["wait", "next_save", "other_thread", "half_timeout",
                                  pytest.param("exit", marks=NO_THREADS_AT_EXIT)])
@pytest.mark.parametrize("level", ["idle", "low"])
def test_a_waiting_caller_raises_the_commit(tmp_path, mode, level) -> None:
    """The thread that saved, waiting for the commit (in ``wait_until_finished``, or in a
    save that waits for ``max_concurrent_saves``), is not training: until the commit is done
    its background threads run at the normal priority, where the process may raise them.
    Another thread waiting changes nothing (a training loop may run beside it), until half the
    commit's timeout has passed (here 3 s of 6). A commit finished at the interpreter's exit
    is raised too."""
    if not _runtime.may_raise_priority():
        pytest.skip("this process may not raise a thread's priority: where it may not, the "
                    "boosted work moves instead (test_work_moves_to_unlowered_threads_...)")
    out = _run_probe(BOOST_PROBE, str(tmp_path / "m"), mode, level)
    lowered = [[os.SCHED_IDLE, 0]] if level == "idle" else [[os.SCHED_OTHER, 19]]
    raised = mode != "other_thread" and _runtime.may_raise_priority()
    assert out["during"] == ([[os.SCHED_OTHER, 0]] if raised else lowered), out
    if mode == "exit":
        assert (tmp_path / "m" / "0" / "_CHECKPOINT_METADATA").is_file()  # committed at exit
        return
    assert out["after"] == lowered, out  # back at the background level once it is done
    assert out["boosted"] == 0
    assert out["steps"] == ([0, 1] if mode == "next_save" else [0])


UNRAISABLE_PROBE = textwrap.dedent("""
    import asyncio, concurrent.futures, json, os, sys, threading, time
    import numpy as np
    import ckpt_async as ocp
    from ckpt_async import _ocdbt, _runtime
    rt = _runtime.get_runtime()
    rt._may_boost = False  # as in a process without the privilege to raise a thread again
    mode = sys.argv[2]

    def policy():
        return os.sched_getscheduler(0)

    out = {}
    if mode == "runtime":
        out["before"] = rt.submit_background(policy).result()
        started, go = threading.Event(), threading.Event()

        def job():  # on a lowered thread when the boost comes
            here = policy()
            started.set()
            go.wait()
            rest = []
            moved = rt.run_raised(lambda: rest.append(policy()))
            return here, moved, rest

        running = rt.submit_background(job)
        started.wait()
        commit = concurrent.futures.Future()
        rt.boost(commit)
        out["boosted_submit"] = rt.submit_background(policy).result()
        out["boosted_start"] = rt.start_background(policy).result()

        async def loop_thread():
            return threading.current_thread().name

        async def on_background_loop():
            return await rt.in_background_loop(loop_thread)

        out["boosted_loop"] = rt.call(on_background_loop)
        go.set()
        out["running"] = running.result()
        commit.set_result(None)  # done: unboosted
        out["after_submit"] = rt.submit_background(policy).result()
        out["after_relocate"] = rt.submit_background(rt.run_raised, lambda: None).result()
    else:  # a save whose data file is being written on a lowered thread when the boost comes
        write, write_all = _ocdbt.DatabaseWriter.write, _ocdbt._write_all
        policies = []

        def held_write(self, *args, **kwargs):
            policies.append(("job", policy()))
            deadline = time.monotonic() + 30
            while not rt._boosted and time.monotonic() < deadline:
                time.sleep(0.005)
            return write(self, *args, **kwargs)

        def spied_write_all(fd, group):
            if sum(len(view) for view in group) > 4096:  # (the data file's, not the B+tree's)
                policies.append(("piece", policy()))
            return write_all(fd, group)

        pool_init = _runtime.UnloweredPool.__init__

        def slow_pool_init(self, *args):  # its threads start slowly, as behind busy processes
            time.sleep(0.5)
            pool_init(self, *args)

        _ocdbt.DatabaseWriter.write = held_write
        _ocdbt._write_all = spied_write_all
        _runtime.UnloweredPool.__init__ = slow_pool_init
        state = {"a": np.arange(1 << 20, dtype=np.float32)}  # 4 MiB: 4 pieces of 1 MiB
        # (boosted by its timeout, half of it gone, while another thread waits: the data
        # file's job started lowered before)
        options = ocp.CheckpointManagerOptions(async_options=ocp.AsyncOptions(timeout_secs=4))
        with ocp.CheckpointManager(sys.argv[1], options=options) as mngr:
            mngr.save(0, args=ocp.args.StandardSave(state))
            waiter = threading.Thread(target=mngr.wait_until_finished)
            waiter.start()
            waiter.join()
            restored = mngr.restore(0, args=ocp.args.StandardRestore(state))
        out["policies"] = policies
        out["exact"] = bool(np.array_equal(np.asarray(restored["a"]), state["a"]))
    print(json.dumps(out))
""")


@linux_only
@pytest.mark.parametrize("mode", ["runtime", "save"])
def test_work_moves_to_unlowered_threads_where_none_can_be_raised(tmp_path, mode) -> None:
    """Without the privilege to raise a thread again, a boosted commit's work runs in threads
    that were never lowered: new jobs go there, the background loop's part runs in the
    caller's task, and a data file being written on a lowered thread goes on there from its
    next piece. Once the commit is done, background work is lowered again."""
    out = _run_probe(UNRAISABLE_PROBE, str(tmp_path / "m"), mode)
    idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
    if mode == "runtime":
        assert out["before"] == idle
        assert out["boosted_submit"] == normal and out["boosted_start"] == normal
        assert out["boosted_loop"] == "ckpt_async-engine", out  # (not ckpt_async-bg-loop)
        assert out["running"] == [idle, True, [normal]]  # started lowered, went on raised
        assert out["after_submit"] == idle
        assert out["after_relocate"] is False
    else:
        assert out["exact"] is True
        kinds = [tuple(p) for p in out["policies"]]
        assert kinds[0] == ("job", idle), kinds  # the data file's job started lowered
        pieces = [p for k, p in kinds if k == "piece"]
        assert pieces[0] == idle and set(pieces[1:]) == {normal}, kinds  # then moved


BUDGET_PROBE = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import ckpt_async as ocp
    from ckpt_async import _ocdbt, _runtime
    ocp.set_background_priority("idle")
    rt = _runtime.get_runtime()
    if sys.argv[2] == "may_not":
        rt._may_boost = False  # as in a process without the privilege to raise a thread again
    write, write_all = _ocdbt.DatabaseWriter.write, _ocdbt._write_all
    pieces, jobs, saving = [], [], [True]

    def held_write(self, *args, **kwargs):
        # The budget is full until the first batch is written: save() waits for it. The
        # writes that start first are held until the commit is boosted, or for 10 s.
        jobs.append(os.sched_getscheduler(0))
        if not pieces:
            deadline = time.monotonic() + 10
            while not rt._boosted and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.02)  # (the boost's raise is through)
        return write(self, *args, **kwargs)

    def spied_write_all(fd, group):  # (while save() has not returned)
        if saving[0]:
            pieces.append((os.sched_getscheduler(0), bool(rt._boosted)))  # (in this order)
        return write_all(fd, group)

    _ocdbt.DatabaseWriter.write = held_write
    _ocdbt._write_all = spied_write_all
    state = {f"a{i}": np.full((1 << 20,), i, np.float32) for i in range(6)}  # 6 x 4 MiB
    handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=8 << 20)
    with ocp.CheckpointManager(sys.argv[1], item_handlers=handler) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(state))
        saving[0] = False
        boosted_after = len(rt._boosted)
        after = rt.submit_background(os.sched_getscheduler, 0).result()
        mngr.wait_until_finished()
        restored = mngr.restore(0, args=ocp.args.StandardRestore(state))
    exact = all(np.array_equal(np.asarray(restored[k]), v) for k, v in state.items())
    print(json.dumps({"pieces": pieces, "jobs": jobs, "boosted_after": boosted_after,
                      "after": after, "exact": exact}))
""")


@linux_only
@pytest.mark.parametrize("privilege", ["may", "may_not"])
def test_a_save_waiting_for_its_memory_budget_raises_its_writes(tmp_path, privilege) -> None:
    """Under a host-memory budget, ``save()`` waits for the commit's first writes to give
    bytes back: from that wait until staging ends, the commit is boosted (its writes at the
    normal priority, or moved to threads never lowered), and lowered again once ``save()``
    returns."""
    if privilege == "may" and not _runtime.may_raise_priority():
        pytest.skip("this process may not raise a thread's priority (the may_not case runs)")
    out = _run_probe(BUDGET_PROBE, str(tmp_path / "m"), privilege)
    idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
    assert out["exact"] is True and out["boosted_after"] == 0 and out["after"] == idle
    boosted = [policy for policy, was_boosted in out["pieces"] if was_boosted]
    assert normal in boosted, out
    # A job started lowered goes on raised (may), or moves after its first piece (may not).
    lowered = boosted.count(idle)
    assert lowered == 0 if privilege == "may" else lowered <= out["jobs"].count(idle), out


def test_an_unlowered_pool_runs_jobs_and_refuses_them_once_shut_down() -> None:
    pool = _runtime.UnloweredPool(1)
    assert pool.submit(lambda x: x + 1, 1).result(5) == 2
    assert isinstance(pool.submit(int, "not a number").exception(5), ValueError)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)  # (rather than a future no thread would ever finish)
