"""A training run that checkpoints its data iterator beside its state, and an evaluator that
follows it: Orbax code, run with ``import ckpt_async as ocp``.

- The iterator's handler is written to Orbax's handler interface (synchronous ``save`` and
  ``restore``, as grain's ``PyGrainCheckpointHandler`` is): ckpt_async drives it unchanged.
- The evaluator waits for each newly committed step (``checkpoints_iterator``) and restores
  only the parameters, leaving the optimizer state unread (``ocp.PLACEHOLDER``); a step the
  trainer's retention removes before the evaluator has read it is skipped.

Run: ``python docs/examples/data_iterator_and_evaluator.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ckpt_async as ocp


class DataIterator:
    """A stand-in for a data pipeline's iterator: its state is where it is in the data."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self) -> np.ndarray:
        self.position += 1
        return np.full((4,), self.position, np.float32)


class DataIteratorHandler:
    """Saves and restores an iterator's position, written to Orbax's handler interface."""

    def save(self, directory, args):
        (directory / "position.json").write_text(json.dumps({"position": args.item.position}))

    def restore(self, directory, args):
        args.item.position = json.loads((directory / "position.json").read_text())["position"]
        return args.item

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    item: DataIterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    item: DataIterator


def train(directory: Path, steps: int) -> None:
    state = {"params": {"w": jnp.zeros(4)}, "opt_state": {"mu": jnp.zeros(4)}}
    data = DataIterator()
    options = ocp.CheckpointManagerOptions(save_interval_steps=10, max_to_keep=3)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        for step in range(1, steps + 1):
            batch = next(data)
            state = {"params": {"w": state["params"]["w"] + 0.01 * batch},
                     "opt_state": {"mu": 0.9 * state["opt_state"]["mu"] + batch}}
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=DataIteratorSave(data)))


def evaluate(directory: Path, trainer: threading.Thread) -> list[int]:
    evaluated = []
    for step in ocp.checkpoint_utils.checkpoints_iterator(
            directory, seconds_to_sleep=0.05, timeout=0.5, timeout_fn=lambda: not trainer.is_alive()):
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
                read_only=True)) as reader:
            try:
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                        reader.item_metadata(step)["state"].tree)
                # (each leaf of the optimizer state marked not to be read)
                abstract["opt_state"] = jax.tree.map(lambda _: ocp.PLACEHOLDER,
                                                     abstract["opt_state"])
                restored = reader.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
            except FileNotFoundError:
                # The trainer's retention (max_to_keep) removed the step before it was read
                # (ckpt_async raises StepNotFoundError, a FileNotFoundError, saying so).
                continue
        assert restored["state"]["opt_state"]["mu"] is ocp.PLACEHOLDER
        evaluated.append(step)
    return evaluated


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        trainer = threading.Thread(target=train, args=(run, 60))
        trainer.start()
        evaluated = evaluate(run, trainer)
        trainer.join()
        print(f"evaluated, each as it was committed: {evaluated[-1]} last, in order: "
              f"{evaluated == sorted(evaluated)}")
        # A restarted job resumes its state and its place in the data.
        with ocp.CheckpointManager(run) as mngr:
            data = DataIterator()
            restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), data=DataIteratorRestore(data)))
            print(f"kept on disk: {mngr.all_steps()}")
        print(f"resumed at step {mngr.latest_step()}: data position {data.position}, "
              f"w[0] = {float(restored['state']['params']['w'][0]):.2f}")


if __name__ == "__main__":
    main()
