"""An asyncio trainer that checkpoints with ``ckpt_async.aio.AsyncCheckpointManager``.

Run: ``python docs/examples/async_trainer.py [DIR]`` (a temporary directory by default).

Every ``EVERY`` steps the loop does ``fut = await mngr.save(step, args=...)``: the await returns
once the state is staged in host memory (the loop may then change its arrays), and ``fut``
completes once the step is durable on disk. The commit runs on ckpt_async's engine loop, so
training goes on meanwhile. Each completion future starts an evaluation task: it restores the
step from disk (proof that it is durable) and computes the loss of the restored parameters.
Old steps are retired by ``max_to_keep``; an evaluation is awaited before the save whose commit
could retire its step, which bounds how far evaluation may lag behind training.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ckpt_async as ocp

STEPS, EVERY, KEEP = 60, 10, 3


def init_state(key: jax.Array) -> dict[str, Any]:
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (32, 1)) * 0.1, "b": jnp.zeros((1,)),
            "step": jnp.array(0, jnp.int32), "rng": k2}


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def batch(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(rng, (128, 32))
    return x, x[:, :1] * 2.0 - 1.0


@jax.jit
def train_step(state: dict[str, Any]) -> tuple[dict[str, Any], jax.Array]:
    rng, sub = jax.random.split(state["rng"])
    x, y = batch(sub)
    params = {"w": state["w"], "b": state["b"]}
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    new = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    return {**new, "step": state["step"] + 1, "rng": rng}, loss


async def evaluate(mngr: ocp.aio.AsyncCheckpointManager, step: int, fut: ocp.CommitFuture,
                   abstract: Any) -> int:
    """Waits until ``step`` is durable, restores it from disk and evaluates it."""
    await fut  # the commit's future, awaited on this (the trainer's) loop
    restored = await mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    x, y = batch(jax.random.PRNGKey(1234))
    loss = float(loss_fn({"w": restored["w"], "b": restored["b"]}, x, y))
    print(f"  eval  step {step:3d}: durable, restored from disk, held-out loss {loss:.4f}")
    return step


async def train(root: Path) -> dict[str, Any]:
    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, max_concurrent_saves=2)
    mngr = ocp.aio.AsyncCheckpointManager(root, options)
    state = init_state(jax.random.PRNGKey(0))
    abstract = jax.tree.map(ocp.tree.to_shape_dtype_struct, state)
    evals: dict[int, asyncio.Task[int]] = {}
    durable: list[int] = []
    blocked = 0.0
    async with mngr:
        for step in range(1, STEPS + 1):
            state, loss = train_step(state)
            if step % EVERY == 0:
                # This save's commit retires the step saved KEEP saves ago: finish its evaluation.
                retiring = step - KEEP * EVERY
                if retiring in evals:
                    await evals[retiring]
                t0 = time.perf_counter()
                fut = await mngr.save(step, args=ocp.args.StandardSave(state))
                blocked += time.perf_counter() - t0
                # Done callbacks run on the engine thread: keep them short, never call the sync
                # API there (it raises RuntimeUsageError). Awaiting the future runs on our loop.
                fut.add_done_callback(lambda f, s=step: durable.append(s))
                evals[step] = asyncio.create_task(evaluate(mngr, step, fut, abstract))
                print(f"train step {step:3d}: loss {float(loss):.4f}, save staged")
            await asyncio.sleep(0)  # a real trainer awaits its data loader here
        evaluated = sorted(await asyncio.gather(*evals.values()))
        await mngr.wait_until_finished()
        kept = mngr.all_steps()
        latest = await mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))
    print(f"trained {STEPS} steps; {len(evaluated)} saves blocked the loop {blocked * 1e3:.1f} ms"
          " in total")
    return {"durable": sorted(durable), "evaluated": evaluated, "kept": kept,
            "state": state, "latest": latest}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="ckpt_async_trainer_") as tmp:
        root = Path(argv[1]) if len(argv) > 1 else Path(tmp) / "run"
        out = asyncio.run(train(root))
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(out["state"]), jax.tree.leaves(out["latest"]), strict=True))
    print(f"durable: {out['durable']}")
    print(f"evaluated: {out['evaluated']}")
    print(f"kept on disk: {out['kept']}")
    print(f"restored step {out['kept'][-1]}: {'bit-exact' if same else 'MISMATCH'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
