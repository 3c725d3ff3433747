"""Crash safety: SIGKILL at any moment of a save leaves only complete, restorable steps.

A child process saves a real state (48 arrays, about 3 MB, values derived from the step) in a
loop under ``max_to_keep=2`` retention; the parent kills it with SIGKILL at seeded random
moments spread over the whole save window (staging, array writes, metadata, commit, retention),
in the first milliseconds after a commit's rename (where retention runs), and in the middle of
deleting an old step. After each kill the parent opens the directory with a new manager (with
and without ``cleanup_tmp_directories``) and checks that every listed step restores bit-exact,
that no committed step was lost beyond retention, and the next child goes on saving, the
interrupted step number included. ``CKPT_CRASH_SEED`` picks another seed. A lighter variant
does the same in Orbax's other layouts (``use_ocdbt=False``, ``use_zarr3=True``, both; raw and
compressed) with a small state and five kills, two of them with a whole save written but not
renamed, whose temporary directory ``cleanup_tmp_directories`` must remove.

Durability order (what a power loss needs): a child saves one step in each layout (the default
one and Orbax's other ones, raw and compressed) under ``strace -f -y`` (``-y`` prints the path
behind each file descriptor); every file and directory of a step must be fsynced before the
rename that makes it visible, and the parent directory after it. Skipped when strace is absent
or may not trace.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _checks import LAYOUTS

import ckpt_async as ocp
from ckpt_async.manager import _steps

SEED = int(os.environ.get("CKPT_CRASH_SEED", "20261128"))
WINDOW_KILLS = 16  # at a uniformly random moment of the save loop
POST_COMMIT_KILLS = 6  # 0-4 ms after a commit's rename: retention of the older steps runs here
MID_DELETE_KILLS = 2  # while an old step is half deleted
LINE_TIMEOUT = 30  # seconds a child may take to print its next line
CHILD_TIMEOUT = 60
STRACE_TIMEOUT = 120

STATE = textwrap.dedent("""
    def state(step, count=48):
        rng = np.random.default_rng(step)
        out = {}
        for i in range(count):
            kind = i % 4
            if kind == 0:
                out[f"w{i:02d}"] = rng.standard_normal((64, 256)).astype(np.float32)
            elif kind == 1:
                out[f"w{i:02d}"] = rng.standard_normal((32, 256))
            elif kind == 2:
                out[f"w{i:02d}"] = rng.integers(-128, 127, (128, 128), dtype=np.int8)
            else:
                out[f"w{i:02d}"] = rng.integers(0, 65535, (256, 64), dtype=np.uint16)
        out["step"] = np.int64(step)
        return out
""")

CHILD = textwrap.dedent(r"""
    import os, sys, time
    import numpy as np
    import ckpt_async as ocp
    from ckpt_async import _commit, _storage
    from ckpt_async._format import TMP_SUFFIX
    from ckpt_async.manager import _steps
""") + STATE + textwrap.dedent(r"""
    seen = []
    def say(*words):
        seen.append(" ".join(str(w) for w in words))
        sys.stdout.write(seen[-1] + "\n")
        sys.stdout.flush()

    directory, cleanup, hook, last = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
    layout, count = sys.argv[5], int(sys.argv[6])  # layout: "-" (default) or "<ocdbt>:<zarr3>:<zstd>"

    real_commit = _commit.commit
    async def commit(tmp, final, *args, **kwargs):
        await real_commit(tmp, final, *args, **kwargs)
        say("renamed", final.name)
    _commit.commit = commit

    armed = False  # set once the manager is open (its cleanup of leftovers is not retention)
    if hook == "mid-delete":  # stop half-way through removing an old step, then wait for kill
        real_rmtree = _storage.rmtree
        async def rmtree(path):
            if armed and _steps.TODELETE_MARK in path.name:
                files = sorted(p for p in path.rglob("*") if p.is_file())
                for p in files[: len(files) // 2]:
                    p.unlink()
                say("mid-delete", path.name, len(files))
                time.sleep(60)
            await real_rmtree(path)
        _storage.rmtree = rmtree
    if hook == "pre-rename":  # commit one step; stop before the next one's rename, then wait
        real_rename = _storage.rename_durable
        async def rename_durable(tmp, final):
            if TMP_SUFFIX in tmp.name and any(x.startswith("renamed") for x in seen):
                say("pre-rename", tmp.name)
                time.sleep(60)
            await real_rename(tmp, final)
        _storage.rename_durable = rename_durable

    handler = None if layout == "-" else ocp.StandardCheckpointHandler(
        use_ocdbt=layout[0] == "1", use_zarr3=layout[2] == "1", use_compression=layout[4] == "1")
    mngr = ocp.CheckpointManager(directory, ocp.CheckpointManagerOptions(
        max_to_keep=2, cleanup_tmp_directories=cleanup), item_handlers=handler)
    say("ready", mngr.latest_step())
    armed = True
    step = (mngr.latest_step() or 0) + 1
    while last < 0 or step <= last:
        say("saving", step)
        mngr.save(step, args=ocp.args.StandardSave(state(step, count)))
        step += 1
    mngr.wait_until_finished()
    mngr.close()
    say("done")
""")


def expected_state(step: int, count: int = 48) -> dict:
    namespace: dict = {"np": np}
    exec(STATE, namespace)
    return namespace["state"](step, count)


class Child:
    """A child process saving in a loop; its stdout lines arrive on a queue."""

    def __init__(self, directory: Path, cleanup: bool, hook: str = "", last: int = -1,
                 layout: str = "-", count: int = 48):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.stderr = open(directory.parent / "child.stderr", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), "1" if cleanup else "0", hook or "-",
             str(last), layout, str(count)],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, prefix: str, count: int = 1) -> str:
        deadline = time.monotonic() + LINE_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"child printed no {prefix!r} line within {LINE_TIMEOUT} s: "
                                     f"{self.seen}\n{self.err()}")
            if line is None:
                raise AssertionError(f"child exited before {prefix!r}: {self.seen}\n{self.err()}")
            self.seen.append(line)
            if line.startswith(prefix):
                count -= 1
                if count == 0:
                    return line

    def ready(self, committed: int | None, where: str) -> None:
        """Waits for the child's start; its manager must see the last step known committed."""
        latest = self.wait_for("ready").split()[1]
        if committed is not None:
            assert latest != "None" and int(latest) >= committed, f"{where}: sees {latest}"

    def err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=CHILD_TIMEOUT)
        while True:  # collect what it printed before it died
            try:
                line = self.lines.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)


def assert_bit_exact(restored: dict, expected: dict, where: str) -> None:
    assert set(restored) == set(expected), where
    for k, e in expected.items():
        a, e = np.asarray(restored[k]), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, f"{where}: {k}"
        assert a.tobytes() == e.tobytes(), f"{where}: {k} differs"


def verify(directory: Path, cleanup: bool, committed: int | None, where: str,
           stats: dict[str, int] | None = None, count: int = 48) -> list[int]:
    """Opens ``directory`` with a new manager; every listed step restores bit-exact."""
    mngr = ocp.CheckpointManager(directory, ocp.CheckpointManagerOptions(
        max_to_keep=2, cleanup_tmp_directories=cleanup))
    try:
        steps = mngr.all_steps()
        names = os.listdir(directory)
        assert {str(step) for step in steps} <= set(names), f"{where}: {steps}, {names}"
        if cleanup:
            assert not [n for n in names if _steps.is_leftover(n)], f"{where}: {names}"
        if committed is not None:  # nothing committed is lost, beyond what retention deletes
            assert steps and steps[-1] >= committed, f"{where}: committed {committed}, {steps}"
        for step in steps:
            expected = expected_state(step, count)
            assert_bit_exact(mngr.restore(step), expected, f"{where}: step {step}")
            if stats is not None:
                stats["restores"] = stats.get("restores", 0) + 1
                stats["bytes"] = stats.get("bytes", 0) + sum(
                    np.asarray(v).nbytes for v in expected.values())
    finally:
        mngr.close()
    return steps


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_only_restorable_steps(tmp_path):
    rng = random.Random(SEED)
    directory = tmp_path / "run"
    plan = (["window"] * WINDOW_KILLS + ["post-commit"] * POST_COMMIT_KILLS
            + ["mid-delete"] * MID_DELETE_KILLS)
    rng.shuffle(plan)
    committed: int | None = None
    interrupted: int | None = None  # a step whose save was cut short: the next child redoes it
    seen_steps: list[int] = []  # the steps the last verify listed
    resaved = 0
    phases: dict[str, int] = {}
    stats: dict[str, int] = {}
    t0 = time.monotonic()
    for i, mode in enumerate(plan):
        cleanup = i % 2 == 0
        where = f"seed {SEED}, kill {i} ({mode})"
        child = Child(directory, cleanup, hook="mid-delete" if mode == "mid-delete" else "")
        try:
            child.ready(committed, where)
            first = int(child.wait_for("saving").split()[1])
            if interrupted is not None and first == interrupted:
                resaved += 1
            if mode == "window":
                time.sleep(rng.uniform(0.0, 0.25))
            elif mode == "post-commit":
                child.wait_for("renamed", rng.randint(1, 3))
                time.sleep(rng.uniform(0.0, 0.004))
            else:
                child.wait_for("mid-delete")
        finally:
            child.kill()
        renamed = [int(x.split()[1]) for x in child.seen if x.startswith("renamed")]
        started = [int(x.split()[1]) for x in child.seen if x.startswith("saving")]
        if renamed:
            committed = max(renamed)
        cut = [s for s in started if committed is None or s > committed]
        interrupted = min(cut) if cut else None
        last = child.seen[-1].split()[0]
        phases[last] = phases.get(last, 0) + 1
        steps = verify(directory, cleanup=i % 3 == 0, committed=committed, where=where,
                       stats=stats)
        # At most max_to_keep + 1 steps once this child's retention ran (a commit waits for
        # the one before it and its retention: two renames mean the first one's ran); before
        # that, one more than the last child left (killed between a rename and its retention,
        # twice in a row, the child before and this one each leave one extra).
        bound = 3 if len(renamed) >= 2 else max(len(seen_steps), 2) + 1
        assert len(steps) <= bound, f"{where}: retention lost track: {steps} after {seen_steps}"
        seen_steps = steps
    # After all the kills: a child that saves to the end, through its own retention.
    target = (committed or 0) + 3
    child = Child(directory, cleanup=False, last=target)
    try:
        child.wait_for("done")
        assert child.proc.wait(timeout=CHILD_TIMEOUT) == 0
    finally:
        if child.proc.poll() is None:
            child.kill()
    steps = verify(directory, cleanup=True, committed=target, where=f"seed {SEED}, final")
    assert steps == [target - 1, target]
    elapsed = time.monotonic() - t0
    print(f"\ncrash test: {len(plan)} kills survived, seed {SEED}, last phases {phases}, "
          f"interrupted steps saved again {resaved}, {stats['restores']} step restores "
          f"({stats['bytes'] / 2**20:.0f} MiB) bit-exact, 0 bytes lost, {elapsed:.1f} s")
    assert resaved > 0, "no kill interrupted a save whose step was then saved again"


#: Orbax's other layouts under SIGKILL (use_ocdbt=False, use_zarr3=True, both; raw and
#: compressed), a few kills of a small state: (layout, compressed, where the kill lands).
#: ``pre-rename``: after one commit, the next step's whole tree written and fsynced, its
#: rename not done. Each layout commits at least one step (raw or compressed).
LAYOUT_KILLS = [("plain-zarr2", True, "window"), ("ocdbt-zarr3", True, "pre-rename"),
                ("plain-zarr3", True, "post-commit"), ("plain-zarr2", False, "pre-rename"),
                ("plain-zarr3", False, "window")]
LAYOUT_ARRAYS = 8  # 2 of each dtype, 0.3 MiB a step


@pytest.mark.slow
def test_sigkill_in_the_other_layouts_leaves_only_restorable_steps(tmp_path):
    rng = random.Random(SEED)
    directory = tmp_path / "run"
    flags = {p.id: p.values for p in LAYOUTS}
    committed: int | None = None
    leftovers = 0
    stats: dict[str, int] = {}
    restored = set()  # (use_ocdbt, use_zarr3) of the steps restored
    for i, (layout, compress, mode) in enumerate(LAYOUT_KILLS):
        use_ocdbt, use_zarr3 = flags[layout]
        where = f"seed {SEED}, kill {i} ({layout}, {mode})"
        child = Child(directory, cleanup=False, hook=mode, layout=f"{use_ocdbt:d}:{use_zarr3:d}:"
                      f"{compress:d}", count=LAYOUT_ARRAYS)
        try:
            child.ready(committed, where)
            child.wait_for("saving")
            if mode == "window":
                time.sleep(rng.uniform(0.0, 0.15))
            elif mode == "post-commit":
                child.wait_for("renamed", rng.randint(1, 2))
                time.sleep(rng.uniform(0.0, 0.004))
            else:
                tmp = directory / child.wait_for("pre-rename").split()[1]
        finally:
            child.kill()
        renamed = [int(x.split()[1]) for x in child.seen if x.startswith("renamed")]
        if renamed:
            committed = max(renamed)
        if mode == "pre-rename":  # the killed save's tree is there, unlisted; cleanup removes it
            array = tmp / "default" / ("w00" if not use_ocdbt else "ocdbt.process_0")
            assert array.is_dir() and any(array.iterdir()), f"{where}: {tmp}"
            leftovers += 1
        steps = verify(directory, cleanup=mode == "pre-rename", committed=committed,
                       where=where, stats=stats, count=LAYOUT_ARRAYS)
        assert not (mode == "pre-rename" and tmp.exists()), f"{where}: {tmp} left"
        assert len(steps) <= 3, f"{where}: retention lost track: {steps}"
        for step in steps:
            doc = json.loads((directory / str(step) / "default" / "_METADATA").read_text())
            restored.add((doc["use_ocdbt"], doc["use_zarr3"]))
    assert restored >= set(flags.values()), restored  # each layout's steps were restored
    print(f"\nother layouts: {len(LAYOUT_KILLS)} kills survived, seed {SEED}, "
          f"{stats['restores']} step restores bit-exact, {leftovers} killed saves' "
          "temporary directories removed by cleanup_tmp_directories")


# -- durability order, observed with strace ---------------------------------------------------


def layout_files(use_ocdbt: bool, use_zarr3: bool) -> list[str]:
    """Files one of Orbax's other layouts puts in a step (``*``: any name): an array's folder
    with its zarr document and chunk (v3: its shard, ``c/0``), or the process database that
    zarr v3 in OCDBT writes, merged into the item's."""
    if use_ocdbt:
        return ["default/d/*", "default/ocdbt.process_0/manifest.ocdbt",
                "default/ocdbt.process_0/d/*"]
    return ["default/w0/zarr.json", "default/w0/c/0"] if use_zarr3 else [
        "default/w0/.zarray", "default/w0/0"]


#: The layouts the strace child saves, each in a directory of its own: name, use_ocdbt,
#: use_zarr3, use_compression, and files of that layout the step must hold. (The default
#: layout's data files are in ocdbt.process_0/d/, its B+tree in d/; compressed, TensorStore
#: writes both in d/.)
FSYNC_LAYOUTS = [
    ("default", True, False, False, ["default/d/*", "default/ocdbt.process_0/d/*"]),
    ("default-zstd", True, False, True, ["default/d/*"]),
    *((f"{p.id}-{kind}", *p.values, kind == "zstd", layout_files(*p.values))
      for p in LAYOUTS for kind in ("raw", "zstd")),
]

FSYNC_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import ckpt_async as ocp
    state = {f"w{i}": np.arange(20000, dtype=np.float32) * i for i in range(12)}
    state["small"] = np.int32(7)
    for layout in sys.argv[2:]:
        name, use_ocdbt, use_zarr3, compress = layout.split(":")
        handler = None if name == "default" else ocp.StandardCheckpointHandler(
            use_ocdbt=use_ocdbt == "1", use_zarr3=use_zarr3 == "1",
            use_compression=compress == "1")
        mngr = ocp.CheckpointManager(f"{sys.argv[1]}/{name}", item_handlers=handler)
        mngr.save(1, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        mngr.close()
""")

LINE = re.compile(r"^(\d+)\s+(.*)$")
CALL = re.compile(r"^(fsync|fdatasync|rename|renameat|renameat2)\((.*)$")
RESUMED = re.compile(r"^<\.\.\. (fsync|fdatasync|rename|renameat|renameat2) resumed>(.*)$")
FD_PATH = re.compile(r"^\d+<(.*?)>")
STRINGS = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_strace(trace: str) -> list[tuple[str, list[str]]]:
    """Completed, successful calls in completion order: (name, paths)."""
    pending: dict[str, tuple[str, str]] = {}
    done: list[tuple[str, list[str]]] = []
    for raw in trace.splitlines():
        m = LINE.match(raw)
        pid, rest = (m.group(1), m.group(2)) if m else ("0", raw)
        call = CALL.match(rest)
        if call:
            name, args = call.groups()
            if args.endswith("<unfinished ...>"):
                pending[pid] = (name, args)
                continue
            result = args
        else:
            resumed = RESUMED.match(rest)
            if not resumed or pid not in pending:
                continue
            name, args = pending.pop(pid)
            result = resumed.group(2)
        if not re.search(r"\)\s+=\s+0\b", result):
            continue  # failed or not a completion
        if name in ("fsync", "fdatasync"):
            fd = FD_PATH.match(args)
            if fd:
                done.append((name, [fd.group(1)]))
        else:
            done.append((name, STRINGS.findall(args)))
    return done


@pytest.mark.slow
def test_every_file_and_directory_is_fsynced_before_the_rename(tmp_path):
    """In every layout: the default one, Orbax's other ones, each raw and compressed."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace) - durability order "
                    "is not observed")
    log = tmp_path / "trace.txt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [strace, "-f", "-qq", "-y", "-s", "4096", "-o", str(log),
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", FSYNC_CHILD, str(tmp_path),
         *(f"{name}:{o:d}:{z:d}:{c:d}" for name, o, z, c, _ in FSYNC_LAYOUTS)],
        capture_output=True, text=True, timeout=STRACE_TIMEOUT, env=env)
    if proc.returncode != 0 and ("ptrace" in proc.stderr or "Operation not permitted"
                                 in proc.stderr):
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = parse_strace(log.read_text())
    counts, missing = [], {}
    for name, _, _, _, landmarks in FSYNC_LAYOUTS:
        entries, missing[name] = durability(calls, tmp_path / name, landmarks)
        counts.append(f"{name} {entries}")
    missing = {name: rels for name, rels in missing.items() if rels}
    assert not missing, f"not fsynced before the rename: {missing}"
    print(f"\ndurability: files and directories fsynced before the rename ({', '.join(counts)}), "
          f"parent fsynced after; {sum(n in ('fsync', 'fdatasync') for n, _ in calls)} fsyncs")


def durability(calls: list[tuple[str, list[str]]], directory: Path,
               landmarks: list[str]) -> tuple[int, list[str]]:
    """How many files and directories ``directory``'s step 1 holds (``landmarks`` among them),
    and those not fsynced before the one rename onto it; ``directory`` must be fsynced after
    it."""
    final = directory / "1"
    assert final.is_dir()
    renames = [i for i, (name, paths) in enumerate(calls)
               if name.startswith("rename") and len(paths) >= 2 and paths[1] == str(final)]
    assert len(renames) == 1, f"expected one rename onto {final}: {calls[-20:]}"
    at = renames[0]
    tmp = calls[at][1][0]
    assert ".orbax-checkpoint-tmp" in tmp, tmp
    assert calls[at][0] == "renameat2", "the commit rename is not create-once (renameat2)"

    fsynced_before = {p for name, paths in calls[:at] if name in ("fsync", "fdatasync")
                      for p in paths}
    entries = [os.path.relpath(os.path.join(root, n), final)
               for root, dirs, files in os.walk(final) for n in dirs + files]
    for landmark in landmarks:  # (the layout's own files: per-array folders, shards, ...)
        assert [e for e in entries if fnmatch.fnmatch(e, landmark)], f"{final}: no {landmark}"
    missing = [rel for rel in [".", *entries]
               if os.path.normpath(os.path.join(tmp, rel)) not in fsynced_before]
    assert len(entries) > 10, entries  # a real tree: data files, metadata, markers, dirs

    after = [p for name, paths in calls[at + 1:] if name in ("fsync", "fdatasync")
             for p in paths]
    assert str(directory) in after, f"{directory} was not fsynced after the rename"
    return len(entries) + 1, missing
