"""After save() returns, nothing the caller does to its arrays reaches the checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ckpt_async as ocp
from ckpt_async import _commit


def _slow_commits(monkeypatch) -> None:
    # Keep the commit in flight while the caller mutates, donates and deletes.
    original = _commit.commit

    async def slow(*args, **kwargs):
        import asyncio

        await asyncio.sleep(0.3)
        return await original(*args, **kwargs)

    monkeypatch.setattr(_commit, "commit", slow)


def test_mutate_donate_delete_after_save(tmp_path, monkeypatch):
    _slow_commits(monkeypatch)
    n = np.arange(1 << 16, dtype=np.float32)
    d = jnp.arange(1 << 16, dtype=jnp.float32) * 2
    x = jnp.ones((1 << 16,), jnp.float32) * 3
    expected = {"n": n.copy(), "d": np.asarray(d).copy(), "x": np.asarray(x).copy()}
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.StandardSave({"n": n, "d": d, "x": x}))
        assert not mngr.commit_future(1).done()
        n[:] = -1                                            # in-place mutation
        step = jax.jit(lambda a: a * 0 - 7, donate_argnums=0)
        out = step(d)                                        # donation of a saved buffer
        x.delete()                                           # deletion of a saved array
        churn = [jnp.full((1 << 16,), 9.0) for _ in range(8)]  # reuse freed memory, if any
        jax.block_until_ready((out, churn))
        mngr.wait_until_finished()
        restored = mngr.restore(1)
    for key, want in expected.items():
        assert np.asarray(restored[key]).tobytes() == want.tobytes(), key
