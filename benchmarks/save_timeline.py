"""Where one save's time goes: a timeline of ckpt_async's save of a benchmark workload, and the
same bytes written by a bare writer, each measurement in a fresh process.

    python benchmarks/save_timeline.py --workload many_small --quick --repeats 10
    python benchmarks/save_timeline.py --workload many_small --quick --bare
    python benchmarks/save_timeline.py --workload mixed --quick --repeats 1 --threads
    python benchmarks/save_timeline.py --workload many_small --quick --repeats 1 --phases

A save (the benchmark's: ``CheckpointManager`` + ``StandardSave`` of the workload as jax
arrays, after its warm-up): when ``save()`` returned, when the first and the last data ``writev`` ran
(the copies into the page cache), and when ``wait_until_finished()`` returned; ``--threads``
also prints each thread's ``writev`` and ``fsync`` calls; ``--phases`` the steps of the save
(:data:`PHASES`: the plan, the staging, each batch's keys and writes, the B+tree, the
documents, the small files, the fsync pass, the rename), by thread: first start, last end,
calls and time in them. ``cpu_ms`` is the process's CPU time from ``save()`` to the durable
commit (beside ``done_ms``: how many cores the save kept busy). The bare writer (``--bare``): two
threads, each taking the crc32 of half of the arrays' buffers and writing them in 1 MiB
``writev`` calls, starting the writeback every 2 MiB, into ranges of one new file (or a file
each with ``--separate``), then an fsync of the file(s) and of the folder: the disk and the
copies, without anything else a checkpoint does. Medians of the repeats are printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker import build_tree, fsync_path, make_impl, warm_up  # noqa: E402

#: The steps of a save ``--phases`` times: (module, function or ``Class.method``).
PHASES = [
    ("ckpt_async._commit", "create_tmp"),
    ("ckpt_async.handlers.pytree", "PyTreeCheckpointHandler.plan"),
    ("ckpt_async.handlers.pytree", "PyTreeCheckpointHandler.stage"),
    ("ckpt_async._stage", "stage_sync"),
    ("ckpt_async._serialize", "ItemWriter.write"),
    ("ckpt_async._serialize", "ItemWriter._raw_values"),
    ("ckpt_async._ocdbt", "DatabaseWriter.add"),
    ("ckpt_async._ocdbt", "DatabaseWriter.write"),
    ("ckpt_async._ocdbt", "DatabaseWriter.finish"),
    ("ckpt_async.handlers.pytree", "PyTreeCheckpointHandler._documents"),
    ("ckpt_async._serialize", "ItemWriter.finish"),
    ("ckpt_async._integrity", "checksums_document"),
    ("ckpt_async._storage", "_write_files_sync"),
    ("ckpt_async._storage", "fsync_tree_sync"),
    ("ckpt_async._storage", "rename_durable"),
]

#: Bytes per ``writev`` and between two writeback starts of the bare writer (as the
#: database writer's WRITE_PIECE_BYTES and WRITEBACK_STEP_BYTES).
PIECE = 1 << 20
WRITEBACK_STEP = 2 << 20


class _Calls:
    """Wraps ``os.writev`` and ``os.fsync`` (and with :meth:`time_phases` the steps of a
    save): each call's start and end (ms from ``t0``), thread and bytes."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.calls: list[tuple[str, str, float, float, int]] = []
        for name in ("writev", "fsync"):
            setattr(os, name, self._timed(name, getattr(os, name), counts_bytes=name == "writev"))

    def time_phases(self) -> None:
        """Wraps each of :data:`PHASES` so that its calls are recorded as the ``writev`` and
        ``fsync`` calls are (0 bytes)."""
        for module, attr in PHASES:
            owner: Any = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, self._timed(attr, getattr(owner, name)))

    def _timed(self, label: str, fn: Any, counts_bytes: bool = False) -> Any:
        """``fn`` (a function or a coroutine function), each call recorded under ``label``
        (with ``counts_bytes``, its result as the bytes)."""
        def record(start: float, result: Any) -> None:
            self.calls.append((threading.current_thread().name, label,
                               (start - self.t0) * 1e3, (time.perf_counter() - self.t0) * 1e3,
                               result if counts_bytes and isinstance(result, int) else 0))

        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                start, result = time.perf_counter(), None
                try:
                    result = await fn(*args, **kwargs)
                    return result
                finally:
                    record(start, result)
            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, result = time.perf_counter(), None
            try:
                result = fn(*args, **kwargs)
                return result
            finally:
                record(start, result)
        return timed

    def summary(self, threads: bool, done_ms: float, cpu_ms: float | None = None,
                **marks: float) -> dict[str, Any]:
        """``marks``, when the first and the last ``writev`` of a data file's piece (not a
        small file's) ran, ``done_ms``, ``cpu_ms`` if given; with ``threads``,
        :meth:`by_thread` too."""
        writes = [(s, e) for _t, name, s, e, n in self.calls if name == "writev" and n >= PIECE // 2]
        out: dict[str, Any] = {**marks, "first_write_ms": min(s for s, _ in writes),
                               "last_write_ms": max(e for _, e in writes), "done_ms": done_ms}
        if cpu_ms is not None:
            out["cpu_ms"] = cpu_ms
        if threads:
            out["threads"] = self.by_thread()
        return out

    def by_thread(self) -> list[str]:
        rows: dict[tuple[str, str], list[float]] = {}
        for thread, name, s, e, n in self.calls:
            row = rows.setdefault((thread, name), [s, e, 0, 0, 0.0])
            row[1] = e
            row[2] += 1
            row[3] += n
            row[4] += e - s
        return [f"  {t:24s} {name:34s} {s:8.2f} .. {e:8.2f} ms  {c:4d} calls  "
                f"{n / 2**20:7.2f} MiB  {busy:7.2f} ms in them"
                for (t, name), (s, e, c, n, busy) in sorted(rows.items(), key=lambda r: r[1][0])]


def one_save(workload: str, quick: bool, threads: bool, phases: bool = False) -> dict[str, Any]:
    tree, _expected, _nbytes, _count = build_tree(workload, quick)
    root = Path(tempfile.mkdtemp(prefix="ckpt_async_timeline_", dir=os.environ.get("TMPDIR")))
    try:
        warm_up("ckpt_async", root)
        impl = make_impl("ckpt_async", root / "run")  # (the benchmark's save, as it makes it)
        calls = _Calls()
        if phases:
            calls.time_phases()
        cpu = time.process_time()
        impl.save(tree)
        returned = (time.perf_counter() - calls.t0) * 1e3
        impl.wait()
        done = (time.perf_counter() - calls.t0) * 1e3
        cpu = (time.process_time() - cpu) * 1e3
        impl.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return calls.summary(threads or phases, returned_ms=returned, done_ms=done, cpu_ms=cpu)


def _groups(views: list[memoryview]) -> list[list[memoryview]]:
    """``views`` cut into ``writev`` groups of about PIECE bytes (a larger view in slices)."""
    groups: list[list[memoryview]] = [[]]
    size = 0
    for view in views:
        for start in range(0, len(view), PIECE):
            part = view[start:start + PIECE]
            groups[-1].append(part)
            size += len(part)
            if size >= PIECE:
                groups.append([])
                size = 0
    return [g for g in groups if g]


def _write_range(path: Path, views: list[memoryview], at: int, crc32: Any,
                 start_writeback: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.lseek(fd, at, os.SEEK_SET)
        written = started = at
        for group in _groups(views):
            for view in group:
                crc32(view)
            written += os.writev(fd, group)
            if written - started >= WRITEBACK_STEP:
                start_writeback(fd, started, written - started)
                started = written
        start_writeback(fd, started, written - started)
    finally:
        os.close(fd)


def one_bare(workload: str, quick: bool, separate: bool, threads: bool) -> dict[str, Any]:
    import numpy as np

    from ckpt_async._crc import crc32
    from ckpt_async._storage import start_writeback

    _tree, expected, _nbytes, _count = build_tree(workload, quick)
    views = [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data  # (bfloat16 too)
             for a in expected.values()]
    half = len(views) // 2
    parts = [views[:half], views[half:]]
    root = Path(tempfile.mkdtemp(prefix="ckpt_async_bare_", dir=os.environ.get("TMPDIR")))
    try:
        offsets = [0, 0] if separate else [0, sum(map(len, parts[0]))]
        paths = [root / "a", root / "b"] if separate else [root / "a", root / "a"]
        workers = [threading.Thread(target=_write_range, name=f"bare-{i}",
                                    args=(paths[i], parts[i], offsets[i], crc32, start_writeback))
                   for i in range(2)]
        calls = _Calls()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for path in sorted(set(paths)) + [root]:
            fsync_path(path)
        done = (time.perf_counter() - calls.t0) * 1e3
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return calls.summary(threads, done_ms=done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="many_small",
                        choices=["large", "large_bf16", "many_small", "mixed"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bare", action="store_true", help="the bare writer, not a save")
    parser.add_argument("--separate", action="store_true",
                        help="the bare writer's threads write a file each")
    parser.add_argument("--threads", action="store_true", help="each thread's calls too")
    parser.add_argument("--phases", action="store_true",
                        help="each thread's calls and the steps of the save (PHASES) too")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = (one_bare(args.workload, args.quick, args.separate, args.threads) if args.bare
                  else one_save(args.workload, args.quick, args.threads, args.phases))
        print(json.dumps(result))
        return
    command = [sys.executable, __file__, "--one", "--workload", args.workload,
               *(["--quick"] if args.quick else []), *(["--bare"] if args.bare else []),
               *(["--separate"] if args.separate else []),
               *(["--threads"] if args.threads else []),
               *(["--phases"] if args.phases else [])]
    runs = []
    for _ in range(args.repeats):
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        for row in run.pop("threads", []):
            print(row)
        runs.append(run)
        print("  ".join(f"{k} {v:7.2f}" for k, v in run.items()), flush=True)
    print("median  " + "  ".join(f"{k} {statistics.median(r[k] for r in runs):7.2f}"
                                 for k in runs[0]))


if __name__ == "__main__":
    main()
