"""Demo: a small JAX training loop that checkpoints as it trains, then restores and checks.

Run: ``python -m ckpt_async.demo [--dir DIR] [--steps N] [--every K]``. It trains a two-layer
MLP with Adam on a synthetic regression task, saves the train state (params, optimizer moments,
step, RNG key) plus a JSON item through ``CheckpointManager`` every K steps (keeping the 3
latest), and prints how long each ``save()`` blocked the loop. Afterwards it restores the
oldest step kept into a fresh manager, checks every array bit for bit against the state it
saved, resumes training from it, and checks that the resumed run matches the uninterrupted one.
``--dir`` must be a new or empty directory (the run is left there); by default a temporary one
is used and removed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ckpt_async as ocp
from ckpt_async.checkpoint_managers import preservation_policy, save_decision_policy


def init_state(key: jax.Array, width: int) -> dict[str, Any]:
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "dense1": {"w": jax.random.normal(k1, (64, width)) * 0.05, "b": jnp.zeros((width,))},
        "dense2": {"w": jax.random.normal(k2, (width, 1)) * 0.05, "b": jnp.zeros((1,))},
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "mu": zeros, "nu": zeros, "step": jnp.array(0, jnp.int32),
            "rng": k3}


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.nn.gelu(x @ params["dense1"]["w"] + params["dense1"]["b"])
    pred = h @ params["dense2"]["w"] + params["dense2"]["b"]
    return jnp.mean((pred - y) ** 2)


@jax.jit
def train_step(state: dict[str, Any]) -> tuple[dict[str, Any], jax.Array]:
    rng, sub = jax.random.split(state["rng"])
    x = jax.random.normal(sub, (256, 64))
    y = jnp.sin(x[:, :1] * 3.0) + 0.1 * x[:, 1:2]
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y)
    t = state["step"] + 1
    mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state["mu"], grads)
    nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, state["nu"], grads)
    lr = 1e-2 * jnp.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
    params = jax.tree.map(lambda p, m, v: p - lr * m / (jnp.sqrt(v) + 1e-8),
                          state["params"], mu, nu)
    return {"params": params, "mu": mu, "nu": nu, "step": t, "rng": rng}, loss


def _announce(step: int) -> Any:
    return lambda _fut: print(f"  step {step:4d} durable")


def assert_same(a: Any, b: Any) -> int:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert str(jax.tree.structure(a)) == str(jax.tree.structure(b)), "tree structure differs"
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), "values differ"
    return len(leaves_a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None,
                    help="a new or empty checkpoint directory, kept afterwards (default: a "
                         "temporary one, removed)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    opts = ap.parse_args(argv)
    if opts.dir is not None and opts.dir.is_dir() and any(opts.dir.iterdir()):
        # (never removed: it may hold a run of the user's own)
        ap.error(f"--dir {opts.dir} is not empty: give a new or empty directory")
    root = opts.dir or Path(tempfile.mkdtemp(prefix="ckpt_async_demo_"))

    state = init_state(jax.random.PRNGKey(0), opts.width)
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    print(f"ckpt_async demo: MLP train state, {len(jax.tree.leaves(state))} arrays, "
          f"{nbytes / 2**20:.1f} MiB, checkpoints in {root}")
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_decision_policy.FixedIntervalPolicy(opts.every),
        preservation_policy=preservation_policy.LatestN(3),
    )
    saved: dict[int, Any] = {}
    blocked: list[float] = []
    with ocp.CheckpointManager(root, options=options) as mngr:
        for step in range(1, opts.steps + 1):
            state, loss = train_step(state)
            if mngr.should_save(step):
                t0 = time.perf_counter()
                mngr.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    info=ocp.args.JsonSave({"step": step, "loss": float(loss)})))
                blocked.append(time.perf_counter() - t0)
                saved[step] = jax.tree.map(np.asarray, state)
                mngr.commit_future(step).add_done_callback(_announce(step))
                print(f"step {step:4d}  loss {float(loss):.5f}  save() blocked "
                      f"{blocked[-1] * 1e3:7.2f} ms")
        mngr.wait_until_finished()
        steps = mngr.all_steps()
    print(f"kept steps {steps} (LatestN(3)); median save() blocking "
          f"{np.median(blocked) * 1e3:.2f} ms over {len(blocked)} saves")

    # A fresh process would do this: open the directory and restore a step (here the oldest
    # one kept, so that there is training left to replay after it).
    abstract = jax.tree.map(ocp.tree.to_shape_dtype_struct, state)
    with ocp.CheckpointManager(root) as mngr:
        first = mngr.all_steps()[0]
        t0 = time.perf_counter()
        restored = mngr.restore(first, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), info=ocp.args.JsonRestore()))
        took = time.perf_counter() - t0
    n = assert_same(restored.state, saved[first])
    assert restored.info["step"] == first
    print(f"restored step {first} in {took * 1e3:.1f} ms: {n} arrays bit-exact")

    # Resume from the checkpoint and compare with the run that never stopped.
    resumed = restored.state
    for _ in range(first, opts.steps):
        resumed, _ = train_step(resumed)
    assert_same(jax.tree.map(np.asarray, resumed), jax.tree.map(np.asarray, state))
    print(f"resumed from step {first} to {opts.steps}: identical to the uninterrupted run")
    if opts.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
