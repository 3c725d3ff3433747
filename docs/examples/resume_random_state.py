"""Resuming a run exactly: the JAX key, the NumPy generator that shuffles the data, the loss
history and the run's configuration saved beside the train state, each with Orbax's handler
for it, so that a resumed run draws the same numbers as one that never stopped.

    python docs/examples/resume_random_state.py
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from google.protobuf import struct_pb2

import ckpt_async as ocp

STEPS, SAVE_EVERY = 8, 3
DATA = np.arange(64, dtype=np.float32).reshape(16, 4) / 64


def train_step(w: jax.Array, key: jax.Array, batch: np.ndarray) -> tuple[jax.Array, jax.Array]:
    noise = jax.random.normal(key, w.shape) * 0.01  # (dropout's place: uses the key)
    grad = jnp.mean(batch, axis=0) * (w + noise)
    return w - 0.1 * grad, jnp.sum(w * w)


def run(directory: str | None, stop_after: int | None = None) -> list[float]:
    """Trains to STEPS, saving every SAVE_EVERY steps into ``directory`` (if any); resumes
    from its latest step when there is one; returns the loss history."""
    config = struct_pb2.Struct()
    config.update({"lr": 0.1, "batch": 4, "model": "toy"})
    w, key = jnp.ones(4), jax.random.key(0)
    rng, losses, start = np.random.default_rng(42), np.zeros(0, np.float32), 0
    mngr = ocp.CheckpointManager(directory) if directory else None
    if mngr is not None and mngr.latest_step() is not None:
        start = mngr.latest_step()
        restored = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": w}),
            key=ocp.args.JaxRandomKeyRestore(),
            data_rng=ocp.args.NumpyRandomKeyRestore(),
            losses=ocp.args.ArrayRestore(),
            config=ocp.args.ProtoRestore(struct_pb2.Struct)))
        w, key, losses = restored.state["w"], restored.key, restored.losses
        rng.bit_generator.state = restored.data_rng  # PCG64: 128-bit integers inside
        assert restored.config == config
        print(f"resumed at step {start}: key {jax.random.key_impl(key)}, "
              f"{len(losses)} losses, lr {restored.config['lr']}")
    for step in range(start + 1, STEPS + 1):
        key, sub = jax.random.split(key)
        batch = DATA[rng.permutation(len(DATA))[:4]]
        w, loss = train_step(w, sub, batch)
        losses = np.append(losses, np.float32(loss))
        if mngr is not None and step % SAVE_EVERY == 0:
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"w": w}),
                key=ocp.args.JaxRandomKeySave(key),
                data_rng=ocp.args.NumpyRandomKeySave(rng.bit_generator.state),
                losses=ocp.args.ArraySave(losses),
                config=ocp.args.ProtoSave(config)))
        if stop_after is not None and step == stop_after:
            break  # the job is preempted here
    if mngr is not None:
        mngr.wait_until_finished()
        print(f"saved steps: {mngr.all_steps()}")
        mngr.close()
    return losses.tolist()


def main() -> None:
    uninterrupted = run(None)
    with tempfile.TemporaryDirectory() as tmp:
        run(f"{tmp}/ckpts", stop_after=7)  # preempted after step 7; step 6 is the latest save
        resumed = run(f"{tmp}/ckpts")
    print(f"resumed run matches the uninterrupted one bit-exactly: {resumed == uninterrupted}")


if __name__ == "__main__":
    main()
