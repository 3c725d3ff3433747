"""The per-checkpoint record that the manager hands to save and preservation policies."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Protocol


class PolicyCheckpointInfo(Protocol):
    """What a save or preservation policy reads of a checkpoint (Orbax's protocol, for
    annotating policies of your own): :class:`CheckpointInfo` is one."""

    step: int
    metrics: dict[str, Any] | None
    time: datetime.datetime


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint (saved or candidate): its step, wall-clock time and optional metrics.

    As in Orbax, equality and hashing use only ``step`` and ``time``, and a
    non-int step (e.g. a scalar ``jax.Array``) is converted with ``int()``.
    """

    step: int
    time: datetime.datetime
    metrics: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.step, int):
            object.__setattr__(self, "step", int(self.step))

    def __str__(self) -> str:
        return f"Checkpoint[step={self.step} | time={self.time}]"
