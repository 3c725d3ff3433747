"""Scaling of ckpt_async: time per array from 1,000 to 100,000 arrays, and throughput as
the state grows. Each point runs in a fresh subprocess; prints a Markdown table.

    python benchmarks/scaling.py [--arrays 1000,10000,100000] [--sizes-mib 64,256,1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

WORKER = r"""
import json, shutil, sys, time
import jax, jax.numpy as jnp, numpy as np
import ckpt_async as ocp
n, elems, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
state = {f"p{i}": jnp.asarray(rng.normal(size=elems).astype(np.float32) * 0.02) for i in range(n)}
jax.block_until_ready(state)
with ocp.CheckpointManager(root) as mngr:
    t0 = time.perf_counter(); mngr.save(0, args=ocp.args.StandardSave(state))
    t1 = time.perf_counter(); mngr.wait_until_finished(); t2 = time.perf_counter()
    restored = mngr.restore(0); t3 = time.perf_counter()
assert all(np.asarray(restored[k]).tobytes() == np.asarray(v).tobytes() for k, v in state.items())
print(json.dumps({"arrays": n, "bytes": n * elems * 4, "blocking": t1 - t0, "durable": t2 - t0,
                  "restore": t3 - t2}))
"""


def run(n: int, elems: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ckpt_scaling_") as root:
        out = subprocess.run([sys.executable, "-c", WORKER, str(n), str(elems), root + "/run"],
                             capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arrays", default="1000,10000,100000")
    ap.add_argument("--sizes-mib", default="64,256,1024")
    opts = ap.parse_args()
    print("| arrays | state | blocking per array | durable per array | restore per array |")
    print("|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in opts.arrays.split(",")]:
        r = run(n, 256)  # 1 KiB arrays
        print(f"| {n:,} | {r['bytes'] / 2**20:.0f} MiB | {r['blocking'] / n * 1e6:.1f} us | "
              f"{r['durable'] / n * 1e6:.1f} us | {r['restore'] / n * 1e6:.1f} us |", flush=True)
    print()
    print("| state | arrays | blocking | durable GB/s | restore GB/s |")
    print("|---:|---:|---:|---:|---:|")
    for mib in [int(x) for x in opts.sizes_mib.split(",")]:
        r = run(16, mib * 2**20 // 16 // 4)
        print(f"| {mib} MiB | 16 | {r['blocking'] * 1e3:.1f} ms | "
              f"{r['bytes'] / r['durable'] / 1e9:.2f} | {r['bytes'] / r['restore'] / 1e9:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
