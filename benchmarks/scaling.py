"""Scaling of ckpt_async: time per array from 1,000 to 100,000 arrays, and throughput as the
state grows from 256 MiB to 8 GiB, each against the disk's limits measured in the same process.

    python benchmarks/scaling.py [--arrays 1000,10000,100000] [--array-kib 1,64]
        [--sizes-mib 256,1024,4096,8192] [--repeats 1] [--dir DIR]

Every point is a fresh subprocess (`--point N ELEMS`): it measures a sequential write+fsync
and a cold sequential read of the same byte count (into a reused 8 MiB buffer, and into fresh
memory, which is where a restore's arrays must land), builds N float32 jax arrays (seeded per
array, so the restore is checked bit-exact array by array without keeping a second copy of the
state), saves with `CheckpointManager` + `StandardSave`, waits for the durable commit, drops the
page cache and restores into the abstract tree. Then a new process (`--restore N ELEMS`)
restores the same checkpoint, cold, as a job restarting would: the first process has just
freed the state, which on some VMs makes fresh memory slow to come by. A tiny save and restore
first keeps one-time initialisation out of the figures. Prints Markdown tables (medians of
--repeats).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _array(i: int, elems: int):
    import numpy as np

    return (np.random.default_rng(i).standard_normal(elems, dtype=np.float32) * 0.02).astype(
        np.float32
    )


def point(n: int, elems: int, root: Path) -> dict:
    """One measurement, in this (fresh) process; returns its figures."""
    import jax
    import numpy as np
    from worker import drop_cache

    import ckpt_async as ocp

    nbytes = n * elems * 4
    root.mkdir(parents=True, exist_ok=True)
    blob = root / "blob"
    chunk = memoryview(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8))
    t0 = time.perf_counter()
    with open(blob, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[: min(len(chunk), left)])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    drop_cache(root)
    buf = memoryview(bytearray(8 << 20))
    t0 = time.perf_counter()
    with open(blob, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read_s = time.perf_counter() - t0
    drop_cache(root)  # the same read into fresh memory, as a restore's arrays are
    t0 = time.perf_counter()
    fresh = memoryview(np.empty(nbytes, np.uint8))
    with open(blob, "rb", buffering=0) as f:
        done = 0
        while done < nbytes:
            done += f.readinto(fresh[done:done + (8 << 20)])
    fresh_s = time.perf_counter() - t0
    blob.unlink()
    del buf, chunk, fresh

    with ocp.CheckpointManager(root / "warmup") as mngr:  # one-time initialisation, untimed
        mngr.save(0, args=ocp.args.StandardSave({"w": jax.device_put(_array(0, 1024))}))
        mngr.wait_until_finished()
        mngr.restore(0)
    state = {}
    for i in range(n):
        state[f"p{i}"] = jax.device_put(_array(i, elems))
    jax.block_until_ready(state)
    abstract = jax.tree.map(ocp.tree.to_shape_dtype_struct, state)
    with ocp.CheckpointManager(root / "ckpt") as mngr:
        t0 = time.perf_counter()
        mngr.save(0, args=ocp.args.StandardSave(state))
        t1 = time.perf_counter()
        mngr.wait_until_finished()
        t2 = time.perf_counter()
        del state
        drop_cache(root)
        t3 = time.perf_counter()
        restored = mngr.restore(0, args=ocp.args.StandardRestore(abstract))
        jax.block_until_ready(restored)
        t4 = time.perf_counter()
    _check(restored, n, elems)
    del restored
    gc.collect()  # (jax lets go of the host buffers it adopted at its next operation or this)
    # The same restore in a new process, as a job restarting would make it.
    out = subprocess.run(
        [sys.executable, __file__, "--restore", str(n), str(elems), "--dir", str(root)],
        capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"restore in a new process failed:\n{out.stderr[-4000:]}")
    return {"arrays": n, "bytes": nbytes, "blocking": t1 - t0, "durable": t2 - t0,
            "restore": t4 - t3, "write_limit": write_s, "read_limit": read_s,
            "fresh_read_limit": fresh_s,
            "restore_new_process": json.loads(out.stdout.strip().splitlines()[-1])}


def _check(restored: dict, n: int, elems: int) -> None:
    import numpy as np

    for i in range(n):
        got = np.asarray(restored[f"p{i}"])
        if got.dtype != np.float32 or got.tobytes() != _array(i, elems).tobytes():
            raise AssertionError(f"array p{i} of {n} was not restored bit-exact")


def restore_only(n: int, elems: int, root: Path) -> float:
    """The cold restore of :func:`point`'s checkpoint in this (new) process, after a warm-up
    restore of its tiny one; returns its time, the arrays checked bit-exact."""
    import jax
    import numpy as np
    from worker import drop_cache

    import ckpt_async as ocp

    with ocp.CheckpointManager(root / "warmup") as mngr:
        mngr.restore(0)
    abstract = {f"p{i}": jax.ShapeDtypeStruct((elems,), np.float32) for i in range(n)}
    drop_cache(root)
    with ocp.CheckpointManager(root / "ckpt") as mngr:
        t0 = time.perf_counter()
        restored = mngr.restore(0, args=ocp.args.StandardRestore(abstract))
        jax.block_until_ready(restored)
        elapsed = time.perf_counter() - t0
    _check(restored, n, elems)
    return elapsed


def run(n: int, elems: int, work: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        root = Path(tempfile.mkdtemp(prefix="scaling_", dir=work))
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--point", str(n), str(elems), "--dir", str(root)],
                capture_output=True, text=True, timeout=3600)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if out.returncode:
            raise SystemExit(f"point {n} x {elems * 4} B failed:\n{out.stderr[-4000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _gbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}"


def _ints(text: str) -> list[int]:
    """``"1,64"`` -> [1, 64]; an empty option -> [] (that part is skipped)."""
    return [int(x) for x in text.split(",") if x.strip()]


def _restore_gbps(r: dict) -> str:
    """The restore's throughput (in a new process; the read limit; into fresh memory)."""
    b = r["bytes"]
    return (f"{_gbps(b, r['restore'])} ({_gbps(b, r['restore_new_process'])}; "
            f"{_gbps(b, r['read_limit'])}; {_gbps(b, r['fresh_read_limit'])})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arrays", default="1000,10000,100000")
    ap.add_argument("--array-kib", default="1,64")
    ap.add_argument("--sizes-mib", default="256,1024,4096,8192")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a tempdir in /tmp)")
    ap.add_argument("--point", nargs=2, type=int, metavar=("N", "ELEMS"), help=argparse.SUPPRESS)
    ap.add_argument("--restore", nargs=2, type=int, metavar=("N", "ELEMS"), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.point:
        print(json.dumps(point(*opts.point, Path(opts.dir))))
        return 0
    if opts.restore:
        print(json.dumps(restore_only(*opts.restore, Path(opts.dir))))
        return 0
    work = Path(opts.dir or tempfile.mkdtemp(prefix="ckpt_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {opts.repeats} repeat(s) per point (medians)\n")
    try:
        for kib in _ints(opts.array_kib):
            print(f"Arrays of {kib} KiB:\n")
            print("| arrays | state | blocking per array | durable per array | "
                  "cold restore per array (in a new process) | durable GB/s (write limit) | "
                  "restore GB/s (in a new process; read limit; into fresh memory) |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for n in _ints(opts.arrays):
                r = run(n, kib * 256, work, opts.repeats)
                print(f"| {n:,} | {r['bytes'] / 2**20:,.0f} MiB | "
                      f"{r['blocking'] / n * 1e6:.1f} us | {r['durable'] / n * 1e6:.1f} us | "
                      f"{r['restore'] / n * 1e6:.1f} us "
                      f"({r['restore_new_process'] / n * 1e6:.1f} us) | "
                      f"{_gbps(r['bytes'], r['durable'])} ({_gbps(r['bytes'], r['write_limit'])}) | "
                      f"{_restore_gbps(r)} |", flush=True)
            print()
        sizes = _ints(opts.sizes_mib)
        if not sizes:
            return 0
        print("16 arrays:\n")
        print("| state | blocking | durable s | durable GB/s (write limit) | "
              "cold restore s (in a new process) | "
              "restore GB/s (in a new process; read limit; into fresh memory) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for mib in sizes:
            r = run(16, mib * 2**20 // 16 // 4, work, opts.repeats)
            print(f"| {mib:,} MiB | {r['blocking'] * 1e3:.1f} ms | {r['durable']:.2f} | "
                  f"{_gbps(r['bytes'], r['durable'])} ({_gbps(r['bytes'], r['write_limit'])}) | "
                  f"{r['restore']:.2f} ({r['restore_new_process']:.2f}) | "
                  f"{_restore_gbps(r)} |", flush=True)
    finally:
        if opts.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
