"""``CheckpointArgs`` and its registry under the module name Orbax also gives them
(``orbax.checkpoint.checkpoint_args``); the same objects as :mod:`ckpt_async.args`."""

from .args import (
    CheckpointArgs,
    get_registered_args_cls,
    get_registered_handler_cls,
    has_registered_args,
    register_with_handler,
)
from .handlers import CheckpointHandler

__all__ = [
    "CheckpointArgs",
    "CheckpointHandler",
    "get_registered_args_cls",
    "get_registered_handler_cls",
    "has_registered_args",
    "register_with_handler",
]
