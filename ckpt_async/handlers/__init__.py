"""Checkpoint handlers: how each kind of item is saved and restored."""

from .base import AsyncCheckpointHandler, CheckpointHandler, Writer
from .composite import CompositeCheckpointHandler, CompositeOptions
from .json_handler import JsonCheckpointHandler
from .pytree import PyTreeCheckpointHandler, StandardCheckpointHandler
from .registry import DefaultCheckpointHandlerRegistry

__all__ = [
    "AsyncCheckpointHandler",
    "CheckpointHandler",
    "CompositeCheckpointHandler",
    "CompositeOptions",
    "DefaultCheckpointHandlerRegistry",
    "JsonCheckpointHandler",
    "PyTreeCheckpointHandler",
    "StandardCheckpointHandler",
    "Writer",
]
