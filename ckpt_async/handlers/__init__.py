"""Checkpoint handlers: how each kind of item is saved and restored.

Each handler's args are here too under Orbax's longer names (``ArraySaveArgs`` is
``ckpt_async.args.ArraySave``)."""

from ..args import ArrayRestore as ArrayRestoreArgs
from ..args import ArraySave as ArraySaveArgs
from ..args import Composite as CompositeArgs
from ..args import Composite as CompositeResults
from ..args import JaxRandomKeyRestore as JaxRandomKeyRestoreArgs
from ..args import JaxRandomKeySave as JaxRandomKeySaveArgs
from ..args import JsonRestore as JsonRestoreArgs
from ..args import JsonSave as JsonSaveArgs
from ..args import NumpyRandomKeyRestore as NumpyRandomKeyRestoreArgs
from ..args import NumpyRandomKeySave as NumpyRandomKeySaveArgs
from ..args import ProtoRestore as ProtoRestoreArgs
from ..args import ProtoSave as ProtoSaveArgs
from ..args import PyTreeRestore as PyTreeRestoreArgs
from ..args import PyTreeSave as PyTreeSaveArgs
from ..args import StandardRestore as StandardRestoreArgs
from ..args import StandardSave as StandardSaveArgs
from . import registry as handler_registration  # (Orbax's name of the registry's module)
from .array import ArrayCheckpointHandler
from .base import AsyncCheckpointHandler, CheckpointHandler, Writer
from .composite import CompositeCheckpointHandler, CompositeOptions
from .json_handler import JsonCheckpointHandler
from .proto import ProtoCheckpointHandler
from .pytree import PyTreeCheckpointHandler, StandardCheckpointHandler
from .random_key import JaxRandomKeyCheckpointHandler, NumpyRandomKeyCheckpointHandler
from .registry import (
    CheckpointHandlerRegistry,
    DefaultCheckpointHandlerRegistry,
    create_default_handler_registry,
)

__all__ = [
    "ArrayCheckpointHandler",
    "ArrayRestoreArgs",
    "ArraySaveArgs",
    "AsyncCheckpointHandler",
    "CheckpointHandler",
    "CheckpointHandlerRegistry",
    "CompositeArgs",
    "CompositeCheckpointHandler",
    "CompositeOptions",
    "CompositeResults",
    "DefaultCheckpointHandlerRegistry",
    "JaxRandomKeyCheckpointHandler",
    "JaxRandomKeyRestoreArgs",
    "JaxRandomKeySaveArgs",
    "JsonCheckpointHandler",
    "JsonRestoreArgs",
    "JsonSaveArgs",
    "NumpyRandomKeyCheckpointHandler",
    "NumpyRandomKeyRestoreArgs",
    "NumpyRandomKeySaveArgs",
    "ProtoCheckpointHandler",
    "ProtoRestoreArgs",
    "ProtoSaveArgs",
    "PyTreeCheckpointHandler",
    "PyTreeRestoreArgs",
    "PyTreeSaveArgs",
    "StandardCheckpointHandler",
    "StandardRestoreArgs",
    "StandardSaveArgs",
    "Writer",
    "create_default_handler_registry",
    "handler_registration",
]
