"""The async face: every operation as a coroutine.

>>> mngr = ckpt_async.aio.AsyncCheckpointManager('/tmp/run')        # doctest: +SKIP
>>> fut = await mngr.save(step, args=ckpt_async.args.StandardSave(state))
>>> await fut   # step is durable
"""

from ._checkpointer import AsyncCheckpointer, AsyncOptions
from ._integrity import averify as verify
from ._runtime import CommitFuture
from .manager.async_manager import AsyncCheckpointManager

__all__ = ["AsyncCheckpointManager", "AsyncCheckpointer", "AsyncOptions", "CommitFuture", "verify"]
