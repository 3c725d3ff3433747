"""Saves issued faster than they commit stay within the host-memory budget plus one state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The scripts' peak-RSS sampler: a daemon thread polls /proc/self/statm every 2 ms.
RSS_SAMPLER = r"""
import time

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
"""

SCRIPT = r"""
import json, shutil, sys, threading, time
import numpy as np
import ckpt_async as ocp
from ckpt_async import _commit

original = _commit.commit
async def slow_commit(*args, **kwargs):  # commits slower than saves are issued
    import asyncio
    await asyncio.sleep(0.3)
    return await original(*args, **kwargs)
_commit.commit = slow_commit

RSS_SAMPLER

budget = 32 << 20
state = {f"a{i}": np.full((1 << 22,), i, np.float32) for i in range(8)}  # 128 MiB of NumPy
handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=budget)
options = ocp.CheckpointManagerOptions(max_concurrent_saves=2)
with ocp.CheckpointManager(sys.argv[1], options=options, item_handlers=handler) as mngr:
    mngr.save(0, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    base = rss()
    threading.Thread(target=sample, daemon=True).start()
    futures = []
    for step in range(1, 7):
        mngr.save(step, args=ocp.args.StandardSave(state))
        futures.append(mngr.commit_future(step))
    mngr.wait_until_finished()
    time.sleep(0.01)
    extra = peak[0] - base  # before the restore, which holds a tree of its own
    restored = mngr.restore(6)
    steps = mngr.all_steps()
ok = all(np.array_equal(restored[k], v) for k, v in state.items())
print(json.dumps({"extra": extra, "budget": budget, "state": 128 << 20,
                  "steps": steps, "committed": all(f.exception() is None for f in futures),
                  "bit_exact": ok}))
""".replace("RSS_SAMPLER", RSS_SAMPLER)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_burst_of_saves_stays_within_budget_plus_one_state(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["committed"] and r["bit_exact"] and r["steps"] == list(range(7))
    # The guarantee is budget + one state (128 MiB); what we hold to is far tighter: twice the
    # budget and one array (without the kvstore write path this measured 208-256 MiB).
    assert r["extra"] <= 2 * r["budget"] + (16 << 20) <= r["budget"] + r["state"], r


FIRST_SAVE_SCRIPT = r"""
import ctypes, json, sys, threading, time
import numpy as np
import ckpt_async as ocp

RSS_SAMPLER

sizes_mib, budget = json.loads(sys.argv[2]), int(sys.argv[3]) << 20
state = {f"a{i}": np.full((int(mib * (1 << 18)),), i, np.float32)
         for i, mib in enumerate(sizes_mib)}
handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=budget)
with ocp.CheckpointManager(sys.argv[1], item_handlers=handler) as mngr:
    mngr.save(0, args=ocp.args.StandardSave({"w": np.zeros(4, np.float32)}))  # one-time costs
    mngr.wait_until_finished()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss(); peak[0] = base
    threading.Thread(target=sample, daemon=True).start()
    mngr.save(1, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    time.sleep(0.01)
    extra = peak[0] - base
    restored = mngr.restore(1)
ok = all(np.array_equal(restored[k], v) for k, v in state.items())
print(json.dumps({"extra": extra, "budget": budget, "bit_exact": ok}))
""".replace("RSS_SAMPLER", RSS_SAMPLER)


#: Array sizes (MiB) of a small transformer's train state in key order: two optimizer moments,
#: then the weights (an embedding, 6 layers of biases, norms and 512-wide kernels, a position
#: embedding); the moments half the weights' size, as bfloat16 moments of float32 weights.
_LAYER_MIB = [1 / 1024, 0.5, *[1 / 1024] * 4, 4 / 1024, 2, 1 / 1024, 2,
              *[1 / 1024, 0.5] * 3]
_MOMENT_MIB = [8, 1 / 1024, 1 / 1024, *_LAYER_MIB * 6, 0.5]
TRANSFORMER_MIB = [*_MOMENT_MIB, *_MOMENT_MIB, *[2 * mib for mib in _MOMENT_MIB]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize(("sizes_mib", "budget_mib"), [
    # The staging thread used to hold the last array it handed over in a local while it
    # copied the next: 48 MiB, the budget and one array. Now 32.2 MiB.
    ([16] * 8, 32),
    # Copies of many sizes from malloc, freed as their writes landed, left holes in the heap
    # that later arrays did not fit: 73 MiB. In mappings of their own: 46 MiB.
    ([24, 3, 12, 6, 1] * 6, 48),
    # Arrays under 1 MiB came from malloc too, and the holes they left held a copy's worth
    # more: 57 MiB under 45 in 2 runs of 3 for a transformer's state, the benchmark's quick
    # `mixed` (two moments, then the weights: an embedding and 6 layers, in key order).
    (TRANSFORMER_MIB, 45),
])
@pytest.mark.parametrize("large", [False, True])
def test_a_save_under_a_budget_holds_at_most_the_budget_plus_10_percent(
        tmp_path, sizes_mib, budget_mib, large):
    # ``large``: as a save past the direct-I/O threshold (made 1 byte here), whose writer
    # threads would each stage O_DIRECT writes in 4 MiB of their own, outside the budget
    # (42 MiB under 32): under a budget this small such a save goes through the page cache.
    env = dict(os.environ, CKPT_ASYNC_DIRECT_IO_MIN_BYTES="1") if large else None
    out = subprocess.run([sys.executable, "-c", FIRST_SAVE_SCRIPT, str(tmp_path / "run"),
                          json.dumps(sizes_mib), str(budget_mib)],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bit_exact"], r
    assert r["extra"] <= 1.1 * r["budget"], r


JAX_SCRIPT = r"""
import json, sys, threading, time
import jax, jax.numpy as jnp
import numpy as np
import ckpt_async as ocp

RSS_SAMPLER

threading.Thread(target=sample, daemon=True).start()
state = {f"a{i}": jnp.arange(i, i + (1 << 22), dtype=jnp.float32) for i in range(8)}  # 128 MiB
jax.block_until_ready(state)
abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
with ocp.CheckpointManager(sys.argv[1]) as mngr:
    mngr.save(0, args=ocp.args.StandardSave({"w": np.zeros(4)}))  # warm-up: one-time costs
    mngr.wait_until_finished()
    time.sleep(0.05); base = rss(); peak[0] = base
    mngr.save(1, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    time.sleep(0.05); save_extra = peak[0] - base
    base = rss(); peak[0] = base
    restored = mngr.restore(1, args=ocp.args.StandardRestore(abstract))
    jax.block_until_ready(restored)
    time.sleep(0.05); restore_extra = peak[0] - base
ok = all(np.array_equal(np.asarray(restored[k]), np.asarray(v)) for k, v in state.items())
print(json.dumps({"save_extra": save_extra, "restore_extra": restore_extra,
                  "state": 128 << 20, "bit_exact": ok}))
""".replace("RSS_SAMPLER", RSS_SAMPLER)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_save_and_restore_copy_each_byte_at_most_once(tmp_path):
    """On CPU a save writes straight from the arrays (TensorStore references the snapshot
    instead of copying it) and a restore reads straight into the buffers that become the
    restored arrays: save holds almost nothing extra, restore about the restored tree."""
    out = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bit_exact"], r
    # Measured: save 0.02x, restore 1.13x (the tree itself and a few arrays' pages in flight).
    # Before, with TensorStore copying into its chunk cache and jax copying out of
    # TensorStore's read buffers: save 0.64x, restore 1.63x.
    assert r["save_extra"] <= 0.25 * r["state"], r
    assert r["restore_extra"] <= 1.3 * r["state"], r


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_a_saved_state_is_freed_when_the_caller_lets_go_of_it(tmp_path, kind):
    """Once a save is durable, ckpt_async holds nothing of the state: ``del state`` frees its
    arrays at once, with no garbage collection. (The tree's flattening made a reference cycle
    through its recursive helper that held every leaf until the collector next ran: a 4 GiB
    state stayed in memory beside the 4 GiB restored after it.)"""
    import gc
    import weakref

    import jax
    import numpy as np

    import ckpt_async as ocp

    def array(i):
        a = np.full((1000,), i, np.float32)
        return jax.device_put(a) if kind == "jax" else a

    state = {"params": {f"w{i}": array(i) for i in range(4)}, "opt": [array(9), (array(8),)]}
    refs = [weakref.ref(a) for a in jax.tree_util.tree_leaves(state)]
    gc.collect()
    gc.disable()
    try:
        with ocp.CheckpointManager(tmp_path / "run") as mngr:
            mngr.save(0, args=ocp.args.StandardSave(state))
            mngr.wait_until_finished()
            del state
            assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()
