"""Two writers (two processes, two managers) saving the same steps into one directory.

The step directory is created once: the commit's final rename is ``renameat2(...,
RENAME_NOREPLACE)``, so when both writers reach it the kernel lets exactly one win and the
other gets StepAlreadyExistsError (its tmp directory is removed). The writers meet at a file
barrier before every step so that both pass the manager's early "step exists" check and race
at the rename. Checked: every step is committed by exactly one writer, which was told it
succeeded; the other was refused with a named error; each step on disk holds, bit-exact, the
data of the writer told it succeeded; neither writer's retention corrupts the other's steps.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async import _storage
from ckpt_async.manager import _steps

STEPS = 20
CHILD_TIMEOUT = 90

STATE = textwrap.dedent("""
    def state(step, writer):
        rng = np.random.default_rng(1000 * writer + step)
        out = {f"w{i}": rng.standard_normal((128, 64)).astype(np.float32) for i in range(8)}
        out["writer"] = np.int32(writer)
        return out
""")

WRITER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import ckpt_async as ocp
    from ckpt_async.errors import StepAlreadyExistsError
""") + STATE + textwrap.dedent("""
    directory, barrier, writer, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    keep = None if sys.argv[5] == "none" else int(sys.argv[5])
    mngr = ocp.CheckpointManager(directory, ocp.CheckpointManagerOptions(max_to_keep=keep))

    def meet(step):  # both writers arrive before either saves the step
        open(os.path.join(barrier, f"{step}-{writer}"), "w").close()
        other = os.path.join(barrier, f"{step}-{1 - writer}")
        deadline = time.monotonic() + 30
        while not os.path.exists(other):
            if time.monotonic() > deadline:
                raise SystemExit(f"writer {1 - writer} never reached step {step}")
            time.sleep(0.0005)

    outcomes = {}
    for step in range(1, steps + 1):
        meet(step)
        try:
            mngr.save(step, args=ocp.args.StandardSave(state(step, writer)))
        except StepAlreadyExistsError as exc:
            outcomes[step] = ["refused-at-save", str(exc)]
            continue
        try:
            mngr.wait_until_finished()
        except StepAlreadyExistsError as exc:
            outcomes[step] = ["refused-at-commit", str(exc)]
        else:
            outcomes[step] = ["ok", ""]
    mngr.close()
    print(json.dumps(outcomes))
""")


def expected_state(step: int, writer: int) -> dict:
    namespace: dict = {"np": np}
    exec(STATE, namespace)
    return namespace["state"](step, writer)


def same(restored: dict, expected: dict) -> bool:
    return set(restored) == set(expected) and all(
        np.asarray(restored[k]).dtype == np.asarray(v).dtype
        and np.asarray(restored[k]).tobytes() == np.asarray(v).tobytes()
        for k, v in expected.items())


@pytest.mark.slow
@pytest.mark.parametrize("keep", [None, 3], ids=["keep-all", "max_to_keep=3"])
def test_two_processes_race_for_the_same_steps(tmp_path, keep):
    directory, barrier = tmp_path / "run", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(barrier), str(w), str(STEPS),
         "none" if keep is None else str(keep)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for w in (0, 1)]
    outcomes = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=CHILD_TIMEOUT)
            assert proc.returncode == 0, err[-3000:]
            outcomes.append({int(k): v for k, v in json.loads(out.splitlines()[-1]).items()})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    at_commit = 0
    for step in range(1, STEPS + 1):
        kinds = sorted(o[step][0] for o in outcomes)
        assert kinds.count("ok") == 1, f"step {step}: {kinds}"
        loser = next(o[step] for o in outcomes if o[step][0] != "ok")
        assert str(step) in loser[1] and "already exists" in loser[1], loser
        at_commit += loser[0] == "refused-at-commit"
    # The barrier makes the writers race at the final rename, not only at the early check.
    assert at_commit >= 1, "no race reached the create-once rename"

    assert not [n for n in os.listdir(directory) if _steps.is_leftover(n)]
    mngr = ocp.CheckpointManager(directory, ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = mngr.all_steps()
        expected_steps = list(range(1, STEPS + 1)) if keep is None else steps
        assert steps == expected_steps and steps and steps[-1] == STEPS, steps
        for step in steps:
            winner = next(w for w in (0, 1) if outcomes[w][step][0] == "ok")
            restored = mngr.restore(step)
            assert same(restored, expected_state(step, winner)), \
                f"step {step} does not hold the data of writer {winner}, who was told it won"
    finally:
        mngr.close()
    print(f"\nconcurrent writers ({keep=}): {STEPS} steps, each won by one writer; "
          f"{at_commit} refused at the create-once rename, {STEPS - at_commit} at the early "
          f"check; 0 steps with the wrong writer's data")


# -- the create-once rename itself ---------------------------------------------------------------
@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(_storage, "renameat2", lambda src, dst, flags: False)
    elif _storage._renameat2_or_none() is None:
        pytest.skip("this platform has no renameat2")
    return request.param


@pytest.mark.parametrize("target", ["empty-dir", "full-dir", "file"])
def test_rename_refuses_an_existing_destination(tmp_path, rename_mode, target):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "mine").write_text("src")
    if target == "file":
        dst.write_text("theirs")
    else:
        dst.mkdir()
        if target == "full-dir":
            (dst / "theirs").write_text("dst")
    with pytest.raises(FileExistsError) as raised:
        _storage.rename_noreplace_sync(src, dst)
    assert raised.value.errno == errno.EEXIST
    assert (src / "mine").read_text() == "src"  # nothing moved, nothing replaced
    assert dst.is_file() if target == "file" else sorted(os.listdir(dst)) == (
        ["theirs"] if target == "full-dir" else [])


def test_rename_moves_when_the_destination_is_free(tmp_path, rename_mode):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "mine").write_text("src")
    _storage.rename_noreplace_sync(src, dst)
    assert not src.exists() and (dst / "mine").read_text() == "src"


@pytest.mark.parametrize("force", [False, True])
def test_commit_refuses_a_step_another_writer_committed(tmp_path, force):
    """One process, two managers: the one that committed second is told, by save() (also a
    forced one: force overrides the save decision, it replaces no step), and loses nothing
    of the first writer's step."""
    directory = tmp_path / "run"
    a = ocp.CheckpointManager(directory)
    b = ocp.CheckpointManager(directory)
    try:
        a.save(1, args=ocp.args.StandardSave({"x": np.arange(4)}))
        a.wait_until_finished()
        with pytest.raises(ocp.errors.StepAlreadyExistsError, match="already exists"):
            b.save(1, args=ocp.args.StandardSave({"x": np.arange(4) * 2}), force=force)
        b.reload()
        assert b.all_steps() == [1]
        np.testing.assert_array_equal(b.restore(1)["x"], np.arange(4))
    finally:
        a.close()
        b.close()


def test_force_replaces_a_step_atomically(tmp_path):
    """``force=True`` swaps the new step in (RENAME_EXCHANGE): the step name never disappears
    and no leftover stays behind."""
    directory = tmp_path / "run"
    path = directory / "ckpt"
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, {"x": np.arange(4)})
        ckptr.wait_until_finished()
        ckptr.save(path, {"x": np.arange(4) + 10}, force=True)
        ckptr.wait_until_finished()
        np.testing.assert_array_equal(ckptr.restore(path)["x"], np.arange(4) + 10)
        assert os.listdir(directory) == ["ckpt"]
    finally:
        ckptr.close()


def test_force_replace_fallback_keeps_the_old_step_when_the_rename_fails(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    path = directory / "ckpt"
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, {"x": np.arange(4)})
        ckptr.wait_until_finished()

        async def no_exchange(src: Path, dst: Path) -> bool:
            return False

        real = _storage.rename_noreplace_sync

        def failing(src, dst):
            if ".orbax-checkpoint-tmp" in Path(src).name:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            real(src, dst)

        monkeypatch.setattr(_storage, "exchange_durable", no_exchange)
        monkeypatch.setattr(_storage, "rename_noreplace_sync", failing)
        ckptr.save(path, {"x": np.arange(4) + 10}, force=True)
        with pytest.raises(ocp.errors.CommitError, match="Input/output error"):
            ckptr.wait_until_finished()
        monkeypatch.undo()
        np.testing.assert_array_equal(ckptr.restore(path)["x"], np.arange(4))
        assert os.listdir(directory) == ["ckpt"]
    finally:
        ckptr.close()
