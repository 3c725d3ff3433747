"""Deleting steps (Orbax's ``ocp.path.deleter``): what a manager does to the steps its
retention policy retires, for code that deletes steps of a directory itself.

A deleter deletes a step of ``directory`` named in ``name_format`` (on the primary process
only): locally the step is first renamed to a to-delete leftover, then removed (a kill in
between leaves a leftover that ``cleanup_tmp_directories`` removes, never a listed step with
missing files), or, with ``todelete_subdir``, moved to ``<directory>/<todelete_subdir>/``; on
an object store its commit marker is deleted first. This is the manager's own deletion code.
:class:`ThreadedCheckpointDeleter` deletes in a background thread (``close`` waits for it and
raises what it raised). ``todelete_full_path`` (Orbax's: a rename on Google Cloud Storage's
hierarchical buckets) is accepted without effect, as by a manager.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .. import _storage as storage
from .. import multihost
from .._paths import as_given, as_path
from .._runtime import CommitFuture, get_runtime
from ..errors import InvalidArgumentError
from ..manager._steps import name_format_of, remove_step
from . import step as step_lib

log = logging.getLogger("ckpt_async")


class CheckpointDeleter(Protocol):
    """What a deleter does: ``delete(step)``, ``delete_steps(steps)``, ``close()``."""

    def delete(self, step: int) -> None:
        """Deletes ``step``."""

    def delete_steps(self, steps: Sequence[int]) -> None:
        """Deletes each of ``steps``."""

    def close(self) -> None:
        """Finishes what was asked for (and releases what the deleter holds)."""


class PathDeleter:
    """Removes a directory, or moves it to a destination given (no step lookup, no processes
    waited for: the caller decides)."""

    def __init__(self, directory: Any, *, num_threads: int | None = None) -> None:
        #: (Orbax's: how many threads remove a local directory's files; one removal here)
        self._num_threads = num_threads

    def delete(self, path: Any, *, destination: Any = None, overwrite: bool = False) -> None:
        """Removes ``path``, or with ``destination`` moves it there (the directories above it
        made; ``overwrite``: one there is replaced where the filesystem allows it, as
        ``os.replace``; else ``FileExistsError``)."""
        where = as_given(path)
        if destination is None:
            get_runtime().call(storage.rmtree, where)
            return
        src, dst = as_path(path), as_path(destination)
        if not isinstance(src, Path) or not isinstance(dst, Path):
            raise InvalidArgumentError(f"{src}: an object store's prefix cannot be moved "
                                       f"(to {dst}); delete it instead")
        get_runtime().call(storage.makedirs, dst.parent)
        if overwrite:
            os.replace(src, dst)
        else:
            get_runtime().call(storage.rename_durable, src, dst)


class StandardCheckpointDeleter:
    """Deletes steps when asked, in the caller's thread."""

    def __init__(self, directory: Any, *, name_format: Any, primary_host: int | None = 0,
                 todelete_subdir: str | None = None, todelete_full_path: str | None = None,
                 duration_metric: str | None = None, num_threads: int | None = None) -> None:
        self._directory = as_path(directory)
        self._name_format = name_format_of(name_format)
        self._primary_host = primary_host
        self._todelete_subdir = todelete_subdir
        #: (accepted without effect, as the manager option of that name)
        self._todelete_full_path = todelete_full_path
        self._duration_metric = duration_metric
        self._num_threads = num_threads

    def delete(self, step: int) -> None:
        """Deletes ``step`` (an unfinished save of it first, where there is one, as Orbax's),
        or moves it to ``todelete_subdir``; a step that is not there is logged and skipped.
        Only the primary process deletes."""
        get_runtime().call(self._delete, step)

    async def _delete(self, step: int) -> None:
        if not multihost.is_primary_host(self._primary_host):
            log.info("not the primary process (%s): step %d is deleted there",
                     self._primary_host, step)
            return
        try:  # (a name format's find_all may list the directory itself: in a thread)
            target = await get_runtime().to_own_thread(
                step_lib.find_step_path, self._directory, self._name_format, step=step,
                include_uncommitted=True)
        except ValueError as exc:
            log.warning("step %d of %s cannot be deleted: %s", step, self._directory, exc)
            return
        found = as_path(target)
        await remove_step(found.parent, found.name, self._todelete_subdir,
                          self._name_format.build_name(step))
        log.info("deleted step %d of %s", step, self._directory)

    def delete_steps(self, steps: Sequence[int]) -> None:
        """Deletes each of ``steps``, in order."""
        for step in steps:
            self.delete(step)

    def close(self) -> None:
        """Nothing to finish: each deletion is done when ``delete`` returns."""


class ThreadedCheckpointDeleter:
    """Deletes steps in the background (on the library's engine), one at a time, in the order
    asked; ``close`` waits for them and raises the first failure (after which nothing more
    was deleted)."""

    def __init__(self, directory: Any, *, name_format: Any, primary_host: int | None = 0,
                 todelete_subdir: str | None = None, todelete_full_path: str | None = None,
                 num_threads: int | None = None) -> None:
        self._standard = StandardCheckpointDeleter(
            directory, name_format=name_format, primary_host=primary_host,
            todelete_subdir=todelete_subdir, todelete_full_path=todelete_full_path,
            num_threads=num_threads)
        #: The deletion asked for last (each waits for the one before it).
        self._last: CommitFuture | None = None

    async def _enqueue(self, step: int) -> None:
        before = self._last

        async def after() -> None:
            if before is not None:
                await before  # (its failure is this one's: nothing more is deleted)
            await self._standard._delete(step)

        self._last = get_runtime().spawn(after())

    def delete(self, step: int) -> None:
        """Queues the deletion of ``step``."""
        get_runtime().call(self._enqueue, step)

    def delete_steps(self, steps: Sequence[int]) -> None:
        """Queues the deletion of each of ``steps``."""
        for step in steps:
            self.delete(step)

    def close(self) -> None:
        """Waits for the deletions queued; raises the first failure."""
        last, self._last = self._last, None
        if last is not None:
            last.result()
        self._standard.close()


def create_checkpoint_deleter(directory: Any, *, name_format: Any, primary_host: int | None = 0,
                              todelete_subdir: str | None = None,
                              todelete_full_path: str | None = None,
                              enable_background_delete: bool = False,
                              num_threads: int | None = None) -> CheckpointDeleter:
    """The deleter a manager with these options uses: a :class:`ThreadedCheckpointDeleter`
    with ``enable_background_delete``, else a :class:`StandardCheckpointDeleter`."""
    if enable_background_delete:
        return ThreadedCheckpointDeleter(
            directory, name_format=name_format, primary_host=primary_host,
            todelete_subdir=todelete_subdir, todelete_full_path=todelete_full_path,
            num_threads=num_threads)
    return StandardCheckpointDeleter(
        directory, name_format=name_format, primary_host=primary_host,
        todelete_subdir=todelete_subdir, todelete_full_path=todelete_full_path,
        num_threads=num_threads)


__all__ = ["CheckpointDeleter", "PathDeleter", "StandardCheckpointDeleter",
           "ThreadedCheckpointDeleter", "create_checkpoint_deleter"]
