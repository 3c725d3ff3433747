"""What a manager's logger is told of each save and restore (Orbax's field names; times are
``time.time()`` seconds)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SaveStepStatistics:
    """One save: ``checkpoint_manager_blocking_*`` spans ``save()`` up to its return,
    ``wait_for_prev_*`` the wait for an earlier commit (``max_concurrent_saves``),
    ``get_old_steps_*`` the retention decision and ``checkpointer_blocking_*`` the staging."""

    step: int | None = None
    event_type: str | None = "save"
    directory: str | None = None
    reached_preemption: bool | None = False
    preemption_received_at: float | None = None
    synchronous: bool | None = False
    wait_for_prev_start_time: float | None = None
    wait_for_prev_duration_secs: float | None = None
    time_between_consecutive_saves_sec: float | None = None
    checkpointer_blocking_start_time: float | None = None
    checkpointer_blocking_duration_secs: float | None = None
    get_old_steps_start_time: float | None = None
    get_old_steps_duration_secs: float | None = None
    checkpoint_manager_blocking_start_time: float | None = None
    checkpoint_manager_blocking_duration_secs: float | None = None


@dataclasses.dataclass
class RestoreStepStatistics:
    """One restore: ``checkpointer_*`` spans reading the items, ``checkpoint_manager_*`` the
    whole ``restore()`` call."""

    step: int | None = None
    event_type: str | None = "restore"
    directory: str | None = None
    checkpointer_start_time: float | None = None
    checkpointer_duration_secs: float | None = None
    checkpoint_manager_start_time: float | None = None
    checkpoint_manager_duration_secs: float | None = None


__all__ = ["RestoreStepStatistics", "SaveStepStatistics"]
