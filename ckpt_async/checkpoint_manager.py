"""``ocp.checkpoint_manager``: Orbax's module of that name, for code importing from it
(``from orbax.checkpoint.checkpoint_manager import CheckpointManagerOptions``,
``except ocp.checkpoint_manager.StepAlreadyExistsError``)."""

from ._checkpointer import AsyncOptions
from .checkpoint_managers import CheckpointInfo
from .errors import StepAlreadyExistsError
from .manager import (
    DEFAULT_ITEM_NAME,
    METRIC_ITEM_NAME,
    AsyncCheckpointManager,
    CheckpointManager,
    CheckpointManagerOptions,
    FileOptions,
    MultiprocessingOptions,
)
from .metadata import RootMetadata, StepMetadata

#: Where Orbax's managers keep their root metadata (``<directory>/metadata``).
METADATA_ITEM_NAME = "metadata"

__all__ = [
    "DEFAULT_ITEM_NAME",
    "METADATA_ITEM_NAME",
    "METRIC_ITEM_NAME",
    "AsyncCheckpointManager",
    "AsyncOptions",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "FileOptions",
    "MultiprocessingOptions",
    "RootMetadata",
    "StepAlreadyExistsError",
    "StepMetadata",
]
