"""ckpt_async: async-first checkpointing for JAX, with Orbax's API and on-disk format.

``import ckpt_async as ocp`` runs Orbax's API Overview unchanged. This module is the whole
public map.
"""

from . import (
    abstract_checkpoint_manager,
    aggregate_handlers,
    aio,
    args,
    arrays,
    checkpoint_manager,
    checkpoint_managers,
    checkpoint_utils,
    errors,
    future,
    handlers,
    logging,
    metadata,
    msgpack_utils,
    multihost,
    options,
    path,
    serialization,
    test_utils,
    transform_utils,
    tree,
    type_handlers,
    utils,
)
from ._checkpointer import AsyncOptions
from ._integrity import VerifyReport, verify
from ._paths import set_gcs_options, set_s3_options
from ._progress import ProgressEvent, progress
from ._runtime import (
    CommitFuture,
    may_raise_priority,
    set_background_pace,
    set_background_priority,
)
from .checkpoint_managers import AbstractCheckpointManager
from .checkpointers import (
    AbstractCheckpointer,
    AsyncCheckpointer,
    Checkpointer,
    PyTreeCheckpointer,
    StandardCheckpointer,
)
from .errors import CheckpointError
from .future import Future
from .handlers import (
    ArrayCheckpointHandler,
    AsyncCheckpointHandler,
    CheckpointHandler,
    CheckpointHandlerRegistry,
    CompositeCheckpointHandler,
    CompositeOptions,
    JaxRandomKeyCheckpointHandler,
    JsonCheckpointHandler,
    NumpyRandomKeyCheckpointHandler,
    ProtoCheckpointHandler,
    PyTreeCheckpointHandler,
    StandardCheckpointHandler,
)
from .handlers.registry import DefaultCheckpointHandlerRegistry
from .manager import AsyncCheckpointManager, CheckpointManager, CheckpointManagerOptions
from .path import step as step  # (Orbax's alias of ocp.path.step)
from .transform_utils import RestoreTransform, Transform, apply_transformations, merge_trees
from .type_handlers import PLACEHOLDER, ArrayRestoreArgs, RestoreArgs, SaveArgs

#: Orbax's other name of the args module (``ocp.checkpoint_args.CheckpointArgs``).
checkpoint_args = args

__version__ = "0.1.0"

__all__ = [
    "PLACEHOLDER",
    "AbstractCheckpointManager",
    "AbstractCheckpointer",
    "ArrayCheckpointHandler",
    "ArrayRestoreArgs",
    "AsyncCheckpointHandler",
    "AsyncCheckpointer",
    "AsyncOptions",
    "AsyncCheckpointManager",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "CheckpointHandler",
    "CheckpointHandlerRegistry",
    "Checkpointer",
    "CommitFuture",
    "CompositeCheckpointHandler",
    "CompositeOptions",
    "DefaultCheckpointHandlerRegistry",
    "Future",
    "JaxRandomKeyCheckpointHandler",
    "JsonCheckpointHandler",
    "NumpyRandomKeyCheckpointHandler",
    "ProgressEvent",
    "ProtoCheckpointHandler",
    "PyTreeCheckpointHandler",
    "PyTreeCheckpointer",
    "RestoreArgs",
    "RestoreTransform",
    "SaveArgs",
    "StandardCheckpointHandler",
    "StandardCheckpointer",
    "Transform",
    "VerifyReport",
    "aggregate_handlers",
    "aio",
    "apply_transformations",
    "args",
    "arrays",
    "abstract_checkpoint_manager",
    "checkpoint_manager",
    "checkpoint_utils",
    "checkpoint_managers",
    "errors",
    "future",
    "handlers",
    "logging",
    "may_raise_priority",
    "merge_trees",
    "metadata",
    "msgpack_utils",
    "multihost",
    "options",
    "path",
    "progress",
    "serialization",
    "set_background_pace",
    "set_background_priority",
    "set_gcs_options",
    "set_s3_options",
    "test_utils",
    "transform_utils",
    "tree",
    "type_handlers",
    "utils",
    "verify",
]
