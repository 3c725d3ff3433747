"""The step layer: CheckpointManager (sync face) over AsyncCheckpointManager."""

from .async_manager import DEFAULT_ITEM_NAME, METRIC_ITEM_NAME, AsyncCheckpointManager
from .options import CheckpointManagerOptions, FileOptions, MultiprocessingOptions
from .sync import CheckpointManager

__all__ = [
    "DEFAULT_ITEM_NAME",
    "METRIC_ITEM_NAME",
    "AsyncCheckpointManager",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "FileOptions",
    "MultiprocessingOptions",
]
