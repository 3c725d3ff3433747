"""Writes the checkpoints under ``tests/data/orbax_legacy/orbax-<version>/`` with an old Orbax.

They were made once, each in a venv of its own (Python 3.11), and are committed; the tests
read them with ckpt_async and with the Orbax of the test dependencies::

    python3 -m venv /tmp/old && /tmp/old/bin/pip install orbax-checkpoint==0.4.8 \\
        jax==0.4.23 jaxlib==0.4.23 "numpy<2" tensorstore==0.1.51
    JAX_PLATFORMS=cpu /tmp/old/bin/python tests/data/orbax_legacy/make_fixtures.py

(0.2.3, 0.3.5 and 0.4.8 were used.) ``TREE`` is the tree each holds; the tests spell out the
same values.
"""

import importlib.metadata
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

VERSION = importlib.metadata.version("orbax-checkpoint")
OUT = pathlib.Path(__file__).parent / f"orbax-{VERSION}"
TREE = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                   "b": jnp.arange(4, dtype=jnp.bfloat16)},
        "step": 7, "lr": 0.5, "name": "run", "small": np.array([1, 2, 3], np.int64),
        "empty": {}, "none": None, "lst": [np.float32(2.5), 3]}


def save_args(tree, aggregate):
    return jax.tree_util.tree_map(lambda x: ocp.SaveArgs(aggregate=aggregate(x)), tree)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    # Strings aggregated (Orbax before 0.4 wrote no strings to TensorStore), the rest not.
    ocp.PyTreeCheckpointer().save(OUT / "mixed", TREE,
                                  save_args=save_args(TREE, lambda x: isinstance(x, str)))
    # Every leaf aggregated, as flax's orbax_utils.save_args_from_target asked.
    ocp.PyTreeCheckpointer().save(OUT / "aggregate_all", TREE,
                                  save_args=save_args(TREE, lambda x: True))
    if VERSION >= "0.4":  # arrays one per directory, Python numbers aggregated
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(
            OUT / "no_ocdbt", TREE,
            save_args=save_args(TREE, lambda x: isinstance(x, (str, int, float))))
    if VERSION < "0.3":
        return  # (0.2's CheckpointManager needs a jax older than 0.4.23)
    # A manager of two items over two steps.
    mngr = ocp.CheckpointManager(OUT / "manager", {"state": ocp.PyTreeCheckpointer(),
                                                   "extra": ocp.PyTreeCheckpointer()})
    for step in (1, 2):
        state = {"params": jax.tree_util.tree_map(lambda x: x * step, TREE["params"]),
                 "step": step}
        extra = {"note": f"step {step}", "v": np.arange(3) + step}
        mngr.save(step, {"state": state, "extra": extra}, save_kwargs={
            "state": {"save_args": save_args(state, lambda x: True)},
            "extra": {"save_args": {"note": ocp.SaveArgs(aggregate=True),
                                    "v": ocp.SaveArgs()}}})
    if hasattr(mngr, "wait_until_finished"):
        mngr.wait_until_finished()


if __name__ == "__main__":
    main()
