"""A training loop that checkpoints through a CheckpointManager every N steps, paced or not.

Where ``worker.py --mode interference`` times the steps during one commit, this times a whole
loop: the benchmark's jitted step (two 1024x1024 matmuls and some Python bookkeeping), a
``save()`` every ``--every`` steps, and reports the mean step time against a baseline
measured first, each ``save()``'s blocking time and the loop's total. Both runs are fresh
processes, one after the other (``--no-pace``: ``ckpt_async.set_background_pace(None)``).

    python benchmarks/training_loop.py [--workload mixed] [--every 150] [--saves 4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(args: argparse.Namespace, root: Path) -> str:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(HERE))
    import workloads

    import ckpt_async as ocp

    if args.no_pace:
        ocp.set_background_pace(None)
    state = jax.tree.map(jax.device_put, getattr(workloads, args.workload)(args.quick))
    jax.block_until_ready(state)
    n = 1024
    w = jnp.full((n, n), 0.001, jnp.float32)

    @jax.jit
    def train_step(x, w):
        for _ in range(2):
            x = jnp.tanh(x @ w)
        return x

    def step(x):
        x = train_step(x, w)
        metrics = {f"m{i}": float(i) * 0.5 for i in range(2000)}
        sum(metrics.values())
        return x.block_until_ready()

    x = jnp.ones((n, n), jnp.float32)
    for _ in range(5):
        x = step(x)
    base = []
    for _ in range(60):
        t = time.perf_counter()
        x = step(x)
        base.append(time.perf_counter() - t)
    steps, blocks = [], []
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(root, options=options) as mngr:
        t0 = time.perf_counter()
        for i in range(args.every * args.saves + 1):
            if i % args.every == 0:
                t = time.perf_counter()
                mngr.save(i, args=ocp.args.StandardSave(state))
                blocks.append(time.perf_counter() - t)
            t = time.perf_counter()
            x = step(x)
            steps.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
    b, mean = statistics.fmean(base), statistics.fmean(steps)
    return (f"{'unpaced' if args.no_pace else 'paced':8s} base {b * 1e3:.1f} ms, steps mean "
            f"{mean * 1e3:.1f} ms ({mean / b - 1:+.0%}), save() blocked "
            f"{', '.join(f'{v * 1e3:.0f}' for v in blocks)} ms, loop {total:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mixed", choices=["large", "many_small", "mixed"])
    p.add_argument("--every", type=int, default=150, help="steps between saves")
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="the scaled-down workload")
    p.add_argument("--no-pace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(run(args, Path(args.child)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="ckpt_loop_") as tmp:
        for pace in (True, False):
            root = Path(tmp) / ("paced" if pace else "unpaced")
            cmd = [sys.executable, __file__, "--workload", args.workload, "--every",
                   str(args.every), "--saves", str(args.saves), "--child", str(root)]
            cmd += ["--quick"] if args.quick else []
            cmd += [] if pace else ["--no-pace"]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
