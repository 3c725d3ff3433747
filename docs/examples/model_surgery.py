"""Model surgery at restore: a checkpoint of one architecture restored into another, with
Orbax's restore transforms (``PyTreeRestore(transforms=...)``). The new model renames its
layers, widens its embedding by two rows, adds a head the old one did not have, and keeps
a running statistic computed from two of the old arrays. Only what the new model uses is
read from the checkpoint.

    python docs/examples/model_surgery.py
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np

import ckpt_async as ocp

rng = np.random.default_rng(0)
OLD = {
    "embed": rng.standard_normal((8, 4)).astype(np.float32),
    "blocks": {f"layer_{i}": {"w": rng.standard_normal((4, 4)).astype(np.float32),
                              "b": np.zeros(4, np.float32)} for i in range(2)},
    "stats": {"mean": np.full(4, 0.5, np.float32), "var": np.full(4, 2.0, np.float32)},
    "step": 1000,
}
# The new model: layers renamed (blocks/layer_i -> layers/i), a 10-row embedding, a new head,
# the statistics folded into one array, the step counter restarted.
NEW = {
    "embed": jax.ShapeDtypeStruct((10, 4), np.float32),
    "layers": {str(i): {"w": jax.ShapeDtypeStruct((4, 4), np.float32),
                        "b": jax.ShapeDtypeStruct((4,), np.float32)} for i in range(2)},
    "head": np.ones((4, 2), np.float32),  # freshly initialised: kept as it is
    "std": jax.ShapeDtypeStruct((4,), np.float32),
    "step": 0,
}


def widen(embed: np.ndarray) -> np.ndarray:
    """Two new vocabulary rows, initialised to the mean of the old ones."""
    return np.concatenate([embed, np.repeat(embed.mean(0, keepdims=True), 2, axis=0)])


TRANSFORMS = {
    r"layers/(\d+)/(w|b)": ocp.Transform(original_key=r"blocks/layer_\1/\2"),
    "embed": ocp.Transform(value_fn=widen),
    "head": ocp.Transform(use_fallback=True),
    "step": ocp.Transform(use_fallback=True),
    "std": ocp.RestoreTransform(
        multi_value_fn=lambda key, old, args: np.sqrt(old["stats"]["var"]),
        multi_value_fn_input_args={r"stats/var": ocp.RestoreArgs(restore_type=np.ndarray)}),
}

with tempfile.TemporaryDirectory() as root:
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(1000, args=ocp.args.PyTreeSave(OLD))
        mngr.wait_until_finished()
        # (restore args say what each leaf of the new model becomes: NumPy arrays here)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), NEW)
        new = mngr.restore(1000, args=ocp.args.PyTreeRestore(
            item=NEW, restore_args=restore_args, transforms=TRANSFORMS))

    print("layers:", sorted(new["layers"]), "embed:", new["embed"].shape,
          "head kept:", new["head"] is NEW["head"], "step:", new["step"])
    exact = all(np.array_equal(new["layers"][str(i)][k], OLD["blocks"][f"layer_{i}"][k])
                for i in range(2) for k in ("w", "b"))
    exact &= np.array_equal(new["embed"][:8], OLD["embed"])
    exact &= np.array_equal(new["std"], np.sqrt(OLD["stats"]["var"]))
    print("renamed layers, old embedding rows and std bit-exact:", bool(exact))
