"""Policies deciding whether the manager should save a checkpoint at a given step.

Mirrors ``orbax.checkpoint.checkpoint_managers.save_decision_policy`` (0.12.8).
``step`` and the elements of ``previous_steps`` are any objects with ``.step``,
``.time`` and ``.metrics`` (see ``CheckpointInfo``); ``previous_steps`` is in
save order, oldest first.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Container, Sequence
from typing import Any, Protocol, runtime_checkable

from ._info import CheckpointInfo


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecisionContext:
    """Runtime state (save in flight, preemption seen) that a save decision may depend on."""

    is_saving_in_progress: bool
    reached_preemption: bool
    multiprocessing_options: Any = None


@runtime_checkable
class SaveDecisionPolicy(Protocol):
    """Decides whether a checkpoint should be saved at ``step``."""

    def should_save(
        self,
        step: CheckpointInfo,
        previous_steps: Sequence[CheckpointInfo],
        *,
        context: DecisionContext,
    ) -> bool:
        """Returns True if a checkpoint should be saved at ``step``."""
        ...


@dataclasses.dataclass
class FixedIntervalPolicy(SaveDecisionPolicy):
    """Saves when the step is a multiple of ``interval``."""

    interval: int

    def should_save(self, step, previous_steps, *, context) -> bool:
        return step.step % self.interval == 0


@dataclasses.dataclass
class SpecificStepsPolicy(SaveDecisionPolicy):
    """Saves when the step is in ``steps``."""

    steps: Container[int]

    def should_save(self, step, previous_steps, *, context) -> bool:
        return step.step in self.steps


@dataclasses.dataclass(kw_only=True)
class ContinuousCheckpointingPolicy(SaveDecisionPolicy):
    """Saves whenever no save is in flight and ``minimum_interval_secs`` passed since the last one.

    Orbax decides on the primary host and broadcasts the result; this
    implementation is single-controller, so the decision is computed locally.
    """

    minimum_interval_secs: int | None = None

    def should_save(self, step, previous_steps, *, context) -> bool:
        if context.is_saving_in_progress:
            return False
        if not previous_steps or self.minimum_interval_secs is None:
            return True
        # Measured from the *last* element of previous_steps, as in Orbax.
        elapsed = step.time - previous_steps[-1].time
        return elapsed >= datetime.timedelta(seconds=self.minimum_interval_secs)


class PreemptionCheckpointingPolicy(SaveDecisionPolicy):
    """Saves when the context reports that a preemption was reached."""

    def should_save(self, step, previous_steps, *, context) -> bool:
        return context.reached_preemption

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class InitialSavePolicy(SaveDecisionPolicy):
    """Saves when no checkpoint has been saved yet."""

    def should_save(self, step, previous_steps, *, context) -> bool:
        return not previous_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclasses.dataclass
class AnySavePolicy(SaveDecisionPolicy):
    """Saves when any of ``policies`` says to (checked in order, stopping at the first yes)."""

    policies: Sequence[SaveDecisionPolicy]

    def should_save(self, step, previous_steps, *, context) -> bool:
        return any(
            p.should_save(step, previous_steps=previous_steps, context=context)
            for p in self.policies
        )
