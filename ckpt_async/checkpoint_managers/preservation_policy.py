"""Policies deciding which existing checkpoints the manager keeps (the rest may be deleted).

Mirrors ``orbax.checkpoint.checkpoint_managers.preservation_policy`` (0.12.8).
``checkpoints`` is a sequence of objects with ``.step``, ``.time`` and
``.metrics`` (see ``CheckpointInfo``), oldest first; each policy returns one
bool per checkpoint, True meaning "keep".
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import InvalidArgumentError
from ._info import CheckpointInfo


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreservationContext:
    """Extra state for a preservation decision (currently empty, as in Orbax)."""


class PreservationPolicy(Protocol):
    """Decides, per checkpoint, whether it must be preserved."""

    def should_preserve(
        self,
        checkpoints: Sequence[CheckpointInfo],
        *,
        context: PreservationContext,
    ) -> Sequence[bool]:
        """Returns one flag per checkpoint, True meaning it is kept."""
        ...


def _keep_last_trues(flags: list[bool], max_to_keep: int | None) -> list[bool]:
    """Clears all but the last ``max_to_keep`` True flags, with Orbax's slicing.

    Quirk kept on purpose: ``max_to_keep=0`` clears nothing (``[:-0]`` is empty).
    """
    if max_to_keep is not None:
        kept = [i for i, f in enumerate(flags) if f]
        if len(kept) > max_to_keep:
            for i in kept[:-max_to_keep]:
                flags[i] = False
    return flags


@dataclasses.dataclass
class PreserveAll(PreservationPolicy):
    """Preserves every checkpoint."""

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [True] * len(checkpoints)


@dataclasses.dataclass
class LatestN(PreservationPolicy):
    """Preserves the newest ``n`` checkpoints (all of them if ``n`` is None)."""

    n: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        total = len(checkpoints)
        if self.n is None or total <= self.n:
            return [True] * total
        keep = max(self.n, 0)  # Orbax returns a too-long list for n < 0; treat it as 0.
        return [False] * (total - keep) + [True] * keep


@dataclasses.dataclass
class EveryNSeconds(PreservationPolicy):
    """Preserves the first checkpoint, then each one >= ``interval_secs`` after the last kept."""

    interval_secs: int

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        interval = datetime.timedelta(seconds=self.interval_secs)
        flags: list[bool] = []
        last_time = None
        for ckpt in checkpoints:
            keep = last_time is None or ckpt.time - last_time >= interval
            if keep:
                last_time = ckpt.time
            flags.append(keep)
        return flags


@dataclasses.dataclass
class EveryNSteps(PreservationPolicy):
    """Preserves steps that are multiples of ``interval_steps`` (or >= that many steps apart).

    With ``exact_interval=False`` the first checkpoint is kept, then each one at
    least ``interval_steps`` after the last kept. ``max_to_keep`` then keeps only
    the newest that many of the selected checkpoints.
    """

    interval_steps: int
    exact_interval: bool = True
    max_to_keep: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        if self.interval_steps == 0:
            raise InvalidArgumentError("interval_steps must not be 0.")
        if self.exact_interval:
            flags = [ckpt.step % self.interval_steps == 0 for ckpt in checkpoints]
        else:
            flags = []
            last_step = None
            for ckpt in checkpoints:
                keep = last_step is None or ckpt.step - last_step >= self.interval_steps
                if keep:
                    last_step = ckpt.step
                flags.append(keep)
        return _keep_last_trues(flags, self.max_to_keep)


@dataclasses.dataclass
class EveryNStepsClosest(PreservationPolicy):
    """Preserves, per multiple of ``interval_steps``, the checkpoint closest to it, plus the last.

    Each checkpoint goes to the grid point ``round(step / interval_steps)``
    (Python's round: ties go to the even multiple, as in Orbax); among equally
    close checkpoints the later one wins. ``max_to_keep`` then keeps only the
    newest that many selected checkpoints.
    """

    interval_steps: int
    max_to_keep: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        if self.interval_steps == 0:
            raise InvalidArgumentError("interval_steps must not be 0.")
        if not checkpoints:
            return []
        best: dict[int, tuple[int, int]] = {}  # grid index -> (distance, checkpoint index)
        for i, ckpt in enumerate(checkpoints):
            k = round(ckpt.step / self.interval_steps)
            dist = abs(ckpt.step - k * self.interval_steps)
            if k not in best or dist <= best[k][0]:
                best[k] = (dist, i)
        flags = [False] * len(checkpoints)
        for _, i in best.values():
            flags[i] = True
        flags[-1] = True
        return _keep_last_trues(flags, self.max_to_keep)


@dataclasses.dataclass
class CustomSteps(PreservationPolicy):
    """Preserves the checkpoints whose step is in ``steps``."""

    steps: dataclasses.InitVar[Sequence[int]]
    _steps_set: set[int] = dataclasses.field(init=False)

    def __post_init__(self, steps: Sequence[int]) -> None:
        self._steps_set = set(steps)

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [ckpt.step in self._steps_set for ckpt in checkpoints]


@dataclasses.dataclass
class AnyPreservationPolicy(PreservationPolicy):
    """Preserves a checkpoint when any of ``policies`` preserves it."""

    policies: Sequence[PreservationPolicy]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        flags = [False] * len(checkpoints)
        for policy in self.policies:
            decided = list(policy.should_preserve(checkpoints, context=context))
            if len(decided) != len(flags):
                raise InvalidArgumentError(
                    f"{policy!r} returned {len(decided)} flags for {len(flags)} checkpoints."
                )
            flags = [bool(a or b) for a, b in zip(flags, decided, strict=True)]
        return flags


@dataclasses.dataclass(kw_only=True)
class BestN(PreservationPolicy):
    """Preserves the ``n`` best checkpoints by ``get_metric_fn(metrics)``.

    Checkpoints with metrics are sorted by the metric (``reverse`` as in
    ``sorted``) and the *last* ``n`` kept, so by default the highest values
    win; ties favour later checkpoints. Checkpoints whose ``metrics`` is None
    are kept too when ``keep_checkpoints_without_metrics``. If ``n`` is None or
    there are at most ``n`` checkpoints (with or without metrics) all are kept;
    ``n == 0`` keeps none.
    """

    get_metric_fn: Callable[[Any], float]
    reverse: bool = False
    n: int | None = None
    keep_checkpoints_without_metrics: bool = True

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        total = len(checkpoints)
        if self.n is None or total <= self.n:
            return [True] * total
        if self.n == 0:
            return [False] * total
        scored = [i for i, ckpt in enumerate(checkpoints) if ckpt.metrics is not None]
        ranked = sorted(
            scored,
            key=lambda i: self.get_metric_fn(checkpoints[i].metrics),
            reverse=self.reverse,
        )
        keep = set(ranked[-self.n :])
        if self.keep_checkpoints_without_metrics:
            keep.update(i for i, ckpt in enumerate(checkpoints) if ckpt.metrics is None)
        return [i in keep for i in range(total)]


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


@dataclasses.dataclass
class LatestDuration(PreservationPolicy):
    """Preserves everything from the first checkpoint at most ``duration`` old onwards.

    Age is measured against the current UTC time, so checkpoint times must be
    timezone-aware (as in Orbax).
    """

    duration: datetime.timedelta

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        now = _utcnow()
        for i, ckpt in enumerate(checkpoints):
            if now - ckpt.time <= self.duration:
                return [False] * i + [True] * (len(checkpoints) - i)
        return [False] * len(checkpoints)
