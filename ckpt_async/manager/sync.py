"""CheckpointManager: the sync face of :class:`AsyncCheckpointManager` (Orbax's API).

Every call is forwarded to the async manager through the runtime; ``save`` keeps Orbax's
``bool`` return, and the step's completion future stays reachable with :meth:`commit_future`.
"""

from __future__ import annotations

from typing import Any

from .._runtime import CommitFuture, get_runtime
from ..args import CheckpointArgs
from ..checkpointers import SaverThread
from .async_manager import AsyncCheckpointManager
from .options import CheckpointManagerOptions


class CheckpointManager:
    """Saves a series of steps in ``directory``; Orbax's ``CheckpointManager``.

    >>> mngr = CheckpointManager('/tmp/run', CheckpointManagerOptions(max_to_keep=2))
    >>> mngr.save(0, args=ckpt_async.args.StandardSave(state))      # doctest: +SKIP
    True
    >>> mngr.wait_until_finished(); mngr.restore(0)                  # doctest: +SKIP
    """

    def __init__(self, directory: Any, checkpointers: Any = None,
                 options: CheckpointManagerOptions | None = None,
                 metadata: dict[str, Any] | None = None, item_names: Any = None,
                 item_handlers: Any = None, logger: Any = None,
                 handler_registry: Any = None) -> None:
        # (Orbax's order; the second argument may also be the options, or Orbax's older
        # checkpointers: see AsyncCheckpointManager)
        self._saver = SaverThread()
        self.async_manager = AsyncCheckpointManager(
            directory, checkpointers, options, metadata=metadata, item_names=item_names,
            item_handlers=item_handlers, logger=logger, handler_registry=handler_registry)
        get_runtime().call(self.async_manager._ensure_init)  # (errors now, as Orbax's)

    @property
    def directory(self) -> Any:
        return self.async_manager.directory

    #: (Orbax's private name, which some projects read: octo's ``save_pretrained``)
    _directory = directory

    def save(self, step: int, items: Any = None, save_kwargs: Any = None, metrics: Any = None,
             force: bool = False, args: CheckpointArgs | None = None,
             custom_metadata: dict | None = None) -> bool:
        """Saves ``step`` (returns once staged); True when a save was started. (Orbax's
        parameters, in its order; its older ``save(step, items)`` too: see
        AsyncCheckpointManager.save.)"""
        if self.async_manager.save_waits(step, force):
            self._saver.waits(self.async_manager)  # (not training while it waits for them)
        fut = get_runtime().call(self.async_manager.save, step, args=args, metrics=metrics,
                                 force=force, custom_metadata=custom_metadata, items=items,
                                 save_kwargs=save_kwargs)
        if fut is not None:
            self._saver.saved()
        return fut is not None

    def commit_future(self, step: int) -> CommitFuture:
        """The completion future of ``step``'s commit: ``.result()``, ``add_done_callback``."""
        return self.async_manager.commit_future(step)

    def restore(self, step: int | None = None, items: Any = None, restore_kwargs: Any = None,
                directory: Any = None, args: CheckpointArgs | None = None) -> Any:
        self._saver.waits(self.async_manager)  # (a restore of a step in flight waits for its commit)
        return get_runtime().call(self.async_manager.restore, step, items=items,
                                  restore_kwargs=restore_kwargs, directory=directory, args=args)

    def item_metadata(self, step: int) -> Any:
        return get_runtime().call(self.async_manager.item_metadata, step)

    def metadata(self, step: int | None = None) -> Any:
        return get_runtime().call(self.async_manager.metadata, step)

    def metrics(self, step: int) -> Any:
        return get_runtime().call(self.async_manager.metrics, step)

    def all_steps(self, read: bool = False) -> list[int]:
        return self.async_manager.all_steps(read)

    def latest_step(self) -> int | None:
        return self.async_manager.latest_step()

    def best_step(self) -> int | None:
        return self.async_manager.best_step()

    def should_save(self, step: int) -> bool:
        return self.async_manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.async_manager.reached_preemption(step)

    def is_saving_in_progress(self) -> bool:
        return self.async_manager.is_saving_in_progress()

    def delete(self, step: int) -> None:
        get_runtime().call(self.async_manager.delete, step)

    def reload(self) -> None:
        get_runtime().call(self.async_manager.reload)

    def wait_until_finished(self) -> None:
        self._saver.waits(self.async_manager)
        get_runtime().call(self.async_manager.wait_until_finished)

    def check_for_errors(self) -> None:
        self.async_manager.check_for_errors()

    def close(self) -> None:
        if get_runtime().closed:  # (interpreter exit: commits were finished, failures logged)
            return
        self._saver.waits(self.async_manager)
        get_runtime().call(self.async_manager.close)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
