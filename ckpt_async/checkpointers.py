"""The sync face of the Checkpointer layer (Orbax's names). Each class holds an
:class:`ckpt_async.aio.AsyncCheckpointer` and forwards every call through the runtime."""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any

from ._checkpointer import AsyncCheckpointer as _AsyncCore
from ._checkpointer import AsyncOptions
from ._runtime import CommitFuture, get_runtime
from .args import CheckpointArgs, StandardRestore, StandardSave
from .errors import InvalidArgumentError
from .handlers.base import CheckpointHandler
from .handlers.pytree import PyTreeCheckpointHandler, StandardCheckpointHandler
from .options import MultiprocessingOptions


class SaverThread:
    """The thread that saved last through a sync face. When it waits for the commit
    (``wait_until_finished``, ``restore``, ``close``, a synchronous save), it is not training
    meanwhile: the commit is hurried (``hurry``: no longer paced). Another thread waiting
    proves nothing: a training loop may run on while a helper thread waits."""

    __slots__ = ("ident",)

    def __init__(self) -> None:
        self.ident: int | None = None

    def saved(self) -> None:
        self.ident = threading.get_ident()

    def waits(self, saver: Any) -> None:
        """The calling thread is about to wait for ``saver``'s commit (an async checkpointer
        or manager): hurried if it is the thread that saved."""
        if self.ident == threading.get_ident():
            saver.hurry()


class AbstractCheckpointer(abc.ABC):
    """The interface of a checkpointer (Orbax's): save to and restore from a path."""

    @abc.abstractmethod
    def save(self, directory: Any, *args: Any, **kwargs: Any) -> None:
        """Saves to ``directory``."""

    @abc.abstractmethod
    def restore(self, directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Restores from ``directory``."""

    @abc.abstractmethod
    def metadata(self, directory: Any) -> Any:
        """The metadata of the checkpoint at ``directory``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Ends the checkpointer's work."""


class AsyncCheckpointer(AbstractCheckpointer):
    """Saves in the background: ``save`` returns once the item is staged in host memory.

    >>> with AsyncCheckpointer(StandardCheckpointHandler()) as ckptr:   # doctest: +SKIP
    ...     ckptr.save('/tmp/ckpt', args=args.StandardSave(state))
    ...     ckptr.wait_until_finished()
    """

    _wait_on_save = False

    def __init__(self, handler: CheckpointHandler, timeout_secs: float | None = None, *,
                 async_options: AsyncOptions | None = None, **orbax_options: Any) -> None:
        if timeout_secs is not None:  # (Orbax's older argument: it wins over async_options)
            async_options = dataclasses.replace(async_options or AsyncOptions(),
                                                timeout_secs=timeout_secs)
        self.async_checkpointer = _AsyncCore(handler, async_options=async_options, **orbax_options)
        self.last_commit: CommitFuture | None = None
        self._saver = SaverThread()

    @property
    def handler(self) -> CheckpointHandler:
        return self.async_checkpointer.handler

    #: (Orbax's private name, which flax's ``checkpoints.restore_checkpoint`` reads)
    _handler = handler

    def save(self, directory: Any, *args: Any, **kwargs: Any) -> None:
        """Saves to ``directory`` (``args=...`` or Orbax's legacy ``save(path, item)``)."""
        self.last_commit = get_runtime().call(self.async_checkpointer.save, directory, *args,
                                              **kwargs)
        self._saver.saved()
        if self._wait_on_save:
            self._saver.waits(self.async_checkpointer)
            self.last_commit.result()

    def restore(self, directory: Any, *args: Any, **kwargs: Any) -> Any:
        self._saver.waits(self.async_checkpointer)  # (a restore waits for the saves issued before it)
        return get_runtime().call(self.async_checkpointer.restore, directory, *args, **kwargs)

    def metadata(self, directory: Any) -> Any:
        return get_runtime().call(self.async_checkpointer.metadata, directory)

    def wait_until_finished(self) -> None:
        self._saver.waits(self.async_checkpointer)
        get_runtime().call(self.async_checkpointer.wait_until_finished)

    def check_for_errors(self) -> None:
        self.async_checkpointer.check_for_errors()

    def cancel(self) -> None:
        """Cancels the saves still committing in the background: none of them becomes
        visible (Orbax's ``cancel``; see :meth:`ckpt_async.aio.AsyncCheckpointer.cancel`)."""
        self.async_checkpointer.cancel()

    def close(self) -> None:
        if get_runtime().closed:  # (interpreter exit: commits were finished, failures logged)
            return
        self._saver.waits(self.async_checkpointer)
        get_runtime().call(self.async_checkpointer.close)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Checkpointer(AsyncCheckpointer):
    """Saves synchronously: ``save`` returns once the checkpoint is durable and visible."""

    _wait_on_save = True


class StandardCheckpointer(AsyncCheckpointer):
    """``AsyncCheckpointer(StandardCheckpointHandler())`` with Orbax's signatures:
    ``save(path, state, *, save_args=None, force=False, custom_metadata=None)`` and
    ``restore(path, target=None, *, strict=True)``. Each also takes ``args=`` (a
    ``StandardSave``, a ``StandardRestore``) instead, as every checkpointer of ckpt_async
    does (Orbax's refuses it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(StandardCheckpointHandler(), **kwargs)

    def save(self, directory: Any, state: Any = None, *, save_args: Any = None,
             force: bool = False, custom_metadata: dict | None = None,
             args: CheckpointArgs | None = None) -> None:
        """Saves ``state`` (a pytree of arrays and scalars) to ``directory``."""
        if args is None:
            args = state if isinstance(state, CheckpointArgs) else StandardSave(state, save_args)
        elif state is not None or save_args is not None:
            raise InvalidArgumentError(f"StandardCheckpointer.save({directory}): pass the state "
                                       "(and save_args) or args=, not both")
        super().save(directory, args=args, force=force, custom_metadata=custom_metadata)

    def restore(self, directory: Any, target: Any = None, *, strict: bool = True,
                args: CheckpointArgs | None = None) -> Any:
        """Restores the pytree at ``directory``, into ``target``'s structure, shapes, dtypes
        and shardings if given (``strict=False``: arrays of another shape are cut or padded
        to the target's)."""
        if args is None:
            args = target if isinstance(target, CheckpointArgs) else StandardRestore(
                target, strict=strict)
        elif target is not None or not strict:
            raise InvalidArgumentError(f"StandardCheckpointer.restore({directory}): pass the "
                                       "target (and strict) or args=, not both")
        return super().restore(directory, args=args)


class PyTreeCheckpointer(Checkpointer):
    """``Checkpointer(PyTreeCheckpointHandler())``: ``save(path, tree)``, ``restore(path)``.
    Orbax's arguments: ``use_compression``, ``use_ocdbt`` and ``use_zarr3`` go to the handler
    (the latter two write Orbax's layout for them; every layout is read); ``primary_host`` to
    the multiprocessing options."""

    def __init__(self, primary_host: int | None = 0, use_ocdbt: bool = True,
                 use_zarr3: bool = False, use_compression: bool = False, **kwargs: Any) -> None:
        if primary_host != 0 and "multiprocessing_options" not in kwargs:
            kwargs["multiprocessing_options"] = MultiprocessingOptions(primary_host=primary_host)
        super().__init__(PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                                                 use_compression=use_compression), **kwargs)
