"""CheckpointManagerOptions (Orbax's fields) and how the legacy fields map onto policies.

The mapping is pure: :func:`save_decision_policy_of` and :func:`preservation_policy_of` turn
options into the policies the manager consults, exactly as Orbax 0.12 does.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Container
from typing import Any

from .._checkpointer import AsyncOptions
from ..checkpoint_managers import preservation_policy as pp
from ..checkpoint_managers import save_decision_policy as sdp
from ..errors import InvalidArgumentError

log = logging.getLogger("ckpt_async")


@dataclasses.dataclass
class MultiprocessingOptions:
    """Which process is primary, and which take part (single-process: the defaults)."""

    primary_host: int | None = 0
    active_processes: set[int] | None = None
    barrier_sync_key_prefix: str | None = None


@dataclasses.dataclass
class FileOptions:
    """Directory permissions and sync validations (accepted for Orbax compatibility)."""

    path_permission_mode: int | None = None
    skip_sync_file_validations: bool = False


@dataclasses.dataclass
class CheckpointManagerOptions:
    """Options of a CheckpointManager; Orbax 0.12's fields and defaults, plus
    ``max_concurrent_saves`` (saves whose commit may be in flight at once)."""

    save_interval_steps: int = 1
    max_to_keep: int | None = None
    keep_time_interval: datetime.timedelta | None = None
    keep_period: int | None = None
    best_fn: Callable[[Any], float] | None = None
    best_mode: str = "max"
    keep_checkpoints_without_metrics: bool = True
    step_prefix: str | None = None
    step_format_fixed_length: int | None = None
    step_name_format: Any = None
    create: bool = True
    cleanup_tmp_directories: bool = False
    save_on_steps: Container[int] | None = None
    single_host_load_and_broadcast: bool = False
    todelete_subdir: str | None = None
    todelete_full_path: str | None = None
    enable_background_delete: bool = False
    num_deletion_threads: int | None = None
    read_only: bool = False
    enable_async_checkpointing: bool = True
    async_options: AsyncOptions | None = None
    multiprocessing_options: MultiprocessingOptions = dataclasses.field(
        default_factory=MultiprocessingOptions)
    should_save_fn: Callable[[int, int | None], bool] | None = None
    file_options: FileOptions = dataclasses.field(default_factory=FileOptions)
    atomicity_options: Any = None
    save_root_metadata: bool = True
    temporary_path_class: Any = None
    save_decision_policy: sdp.SaveDecisionPolicy | None = None
    preservation_policy: pp.PreservationPolicy | None = None
    prevent_write_metrics: bool = False
    enable_should_save_is_saving_in_progress_check: bool = True
    enable_per_process_directory_creation: bool = False
    lightweight_initialize: bool = False
    max_concurrent_saves: int = 2

    def __post_init__(self) -> None:
        if self.best_mode not in ("min", "max"):
            raise InvalidArgumentError(
                f"CheckpointManagerOptions.best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.preservation_policy is None and self.max_to_keep is not None and self.max_to_keep < 0:
            raise InvalidArgumentError(
                "CheckpointManagerOptions.max_to_keep must be None or non-negative, got "
                f"{self.max_to_keep}")
        if self.max_concurrent_saves < 1:
            raise InvalidArgumentError("CheckpointManagerOptions.max_concurrent_saves must be >= 1")
        # (Orbax takes these: 0 fails the first save or cleanup, a negative interval acts as
        # its absolute value; read_only sets save_interval_steps=0 itself, as in Orbax; with
        # should_save_fn or a save_decision_policy, save_interval_steps is ignored, as Orbax
        # documents, so any goes; so is keep_period beside a preservation_policy, where a
        # non-zero one clashes with it)
        for name in ("save_interval_steps", "keep_period"):
            value = getattr(self, name)
            ignored = (self.should_save_fn is not None or self.save_decision_policy is not None
                       if name == "save_interval_steps" else
                       self.preservation_policy is not None)
            if not self.read_only and not ignored and value is not None and value <= 0:
                raise InvalidArgumentError(
                    f"CheckpointManagerOptions.{name} must be a positive number of steps or "
                    f"None, got {value!r}")
        if self.save_decision_policy is not None:
            _overridden(self, "save_decision_policy",  # (save_interval_steps: 1 is its default)
                        {"should_save_fn": None, "save_on_steps": None, "save_interval_steps": 1})
        if self.step_name_format is not None:
            _overridden(self, "step_name_format",
                        {"step_prefix": None, "step_format_fixed_length": None})
        # (both ways, as Orbax checks them)
        by_format = bool(getattr(self.step_name_format, "single_host_load_and_broadcast", False))
        if self.single_host_load_and_broadcast and self.step_name_format and not by_format:
            raise InvalidArgumentError(
                "CheckpointManagerOptions.single_host_load_and_broadcast=True requires "
                "step_name_format.single_host_load_and_broadcast=True")
        if by_format and not self.single_host_load_and_broadcast:
            raise InvalidArgumentError(
                "step_name_format.single_host_load_and_broadcast=True but "
                "CheckpointManagerOptions.single_host_load_and_broadcast=False; set it to True")
        if self.enable_per_process_directory_creation and \
                self.multiprocessing_options.primary_host is not None:
            raise InvalidArgumentError(
                "CheckpointManagerOptions.enable_per_process_directory_creation can only be "
                "used when multiprocessing_options.primary_host is None")
        if self.read_only:
            # Orbax's adjustments: a read-only manager neither saves, deletes nor creates.
            self.save_interval_steps = 0
            self.max_to_keep = None
            self.keep_time_interval = None
            self.keep_period = None
            self.save_on_steps = None
            self.should_save_fn = None
            self.todelete_subdir = None
            self.todelete_full_path = None
            self.create = False
            self.cleanup_tmp_directories = False
        # (as Orbax stores it; a Container given is iterable in practice, as Orbax assumes)
        self.save_on_steps = frozenset(self.save_on_steps or ())  # type: ignore[call-overload]
        if self.todelete_subdir is not None and self.todelete_full_path is not None:
            raise InvalidArgumentError(
                "CheckpointManagerOptions: todelete_subdir and todelete_full_path cannot both "
                "be set")


def _overridden(opts: CheckpointManagerOptions, field: str, legacy: dict[str, Any]) -> None:
    """``field`` overrides the older fields it replaces, as in Orbax; say so when any is set."""
    ignored = [name for name, default in legacy.items()
               if getattr(opts, name) not in (default, frozenset())]
    if ignored:
        log.warning("CheckpointManagerOptions: %s is set, so %s %s ignored", field,
                    ", ".join(ignored), "is" if len(ignored) == 1 else "are")


@dataclasses.dataclass(frozen=True)
class _ShouldSaveFnPolicy:
    """Wraps Orbax's legacy ``should_save_fn(step, last_step)``."""

    fn: Callable[[int, int | None], bool]

    def should_save(self, step: Any, previous_steps: Any, *, context: Any) -> bool:
        return self.fn(step.step, previous_steps[-1].step if previous_steps else None)


def save_decision_policy_of(opts: CheckpointManagerOptions) -> Any:
    """The save decision policy the options describe (Orbax's mapping of the legacy fields)."""
    if opts.save_decision_policy is not None:
        return opts.save_decision_policy
    policies: list[Any] = []
    if opts.should_save_fn is not None:
        policies += [_ShouldSaveFnPolicy(opts.should_save_fn), sdp.PreemptionCheckpointingPolicy()]
    else:
        if opts.save_interval_steps is not None:
            policies.append(sdp.FixedIntervalPolicy(opts.save_interval_steps))
        if opts.save_on_steps is not None:
            policies.append(sdp.SpecificStepsPolicy(opts.save_on_steps))
        policies += [sdp.PreemptionCheckpointingPolicy(), sdp.InitialSavePolicy()]
    return sdp.AnySavePolicy(policies)


def preservation_policy_of(opts: CheckpointManagerOptions) -> Any:
    """The preservation policy the options describe (Orbax's mapping of the legacy fields)."""
    if opts.preservation_policy is not None:
        # (Orbax's check, made by its manager, on truthiness: max_to_keep=0, keep_period=0
        # and a zero keep_time_interval pass, ignored)
        clashing = [name for name in ("max_to_keep", "keep_period", "keep_time_interval")
                    if getattr(opts, name)]
        if clashing:
            raise InvalidArgumentError(
                f"CheckpointManagerOptions: preservation_policy and {', '.join(clashing)} are "
                "mutually exclusive; express the latter inside preservation_policy")
        return opts.preservation_policy
    policies: list[Any] = []
    if opts.keep_period is not None:
        policies.append(pp.EveryNSteps(opts.keep_period))
    if opts.keep_time_interval is not None:
        policies.append(pp.EveryNSeconds(interval_secs=int(opts.keep_time_interval.total_seconds())))
    if opts.best_fn is not None:
        policies.append(pp.BestN(
            get_metric_fn=opts.best_fn, reverse=opts.best_mode == "min", n=opts.max_to_keep,
            keep_checkpoints_without_metrics=opts.keep_checkpoints_without_metrics))
    else:
        policies.append(pp.LatestN(n=opts.max_to_keep))
    return pp.AnyPreservationPolicy(policies)


def uses_metrics(policy: Any) -> bool:
    """Whether a preservation policy ranks by metrics (so metrics must survive a restart)."""
    if isinstance(policy, pp.BestN):
        return True
    return any(uses_metrics(p) for p in getattr(policy, "policies", ()))
