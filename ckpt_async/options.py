"""Orbax's ``ocp.options``: the option classes shared by checkpointers and managers."""

import dataclasses
import enum

from ._checkpointer import AsyncOptions
from .manager.options import FileOptions, MultiprocessingOptions


class AtomicityMode(enum.Enum):
    """How a checkpoint is made visible (Orbax's): ckpt_async renames locally and writes a
    commit marker on object stores, whichever mode is asked for. ``COMMIT_FILE`` (in which
    Orbax writes local steps in place) makes a local step count only once its
    ``commit_success.txt`` is there, as in Orbax."""

    AUTO = "auto"
    COMMIT_FILE = "commit_file"
    ATOMIC_RENAME = "atomic_rename"


@dataclasses.dataclass
class AtomicityOptions:
    """Orbax's atomicity options, taken by checkpointers and managers (``atomicity_options=``):
    see :class:`AtomicityMode` (``allow_legacy_atomic_rename``: a local step without its
    ``commit_success.txt`` counts in ``COMMIT_FILE`` mode too)."""

    mode: AtomicityMode = AtomicityMode.AUTO
    allow_legacy_atomic_rename: bool = False


@dataclasses.dataclass
class MemoryLimitOptions:
    """Orbax's transfer limit, accepted without effect: bound host memory with
    ``host_memory_budget_bytes`` on the pytree handlers instead."""

    max_transfer_concurrent_gb: int | None = None


__all__ = ["AsyncOptions", "AtomicityMode", "AtomicityOptions", "FileOptions",
           "MemoryLimitOptions", "MultiprocessingOptions"]
