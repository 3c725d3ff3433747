"""How a save becomes visible all at once (Orbax's ``ocp.path.atomicity``).

Two kinds of :class:`~ckpt_async.path.atomicity_types.TemporaryPath`, for code that writes a
directory of its own and commits it as Orbax's handlers do:

- :class:`AtomicRenameTemporaryPath` writes into ``<final>.orbax-checkpoint-tmp`` and renames
  it to ``<final>`` at :meth:`~AtomicRenameTemporaryPath.finalize` (local filesystems);
- :class:`CommitFileTemporaryPath` writes into ``<final>`` itself, which counts once
  ``commit_success.txt`` is written in it, last (object stores, where renaming a prefix
  means copying it).

Both fsync what was written before the commit. ``CheckpointManagerOptions(temporary_path_class=...)``
takes either name: ckpt_async's own saves rename on a local filesystem and write the marker on
an object store, and write ``commit_success.txt`` in both, so each library reads either
layout; naming ``CommitFileTemporaryPath`` (Orbax's commit-file mode, which writes local steps
in place) makes a local step count only once its ``commit_success.txt`` is there, as in Orbax.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

from .. import _commit
from .. import _storage as storage
from .._paths import AnyPath, StorePath, as_given
from .._runtime import get_runtime, on_engine
from ..errors import InvalidArgumentError, StepAlreadyExistsError
from .atomicity_types import COMMIT_SUCCESS_FILE, TMP_DIR_SUFFIX, TemporaryPath, ValidationError

log = logging.getLogger("ckpt_async")


def _tmp_of(final_path: AnyPath) -> AnyPath:
    return final_path.parent / (final_path.name + TMP_DIR_SUFFIX)


def _final_of(tmp_path: AnyPath) -> AnyPath:
    at = tmp_path.name.find(TMP_DIR_SUFFIX)
    if at == -1:
        raise InvalidArgumentError(f'Expected {tmp_path} to end with "{TMP_DIR_SUFFIX}".')
    return tmp_path.parent / tmp_path.name[:at]


async def _refuse_link(path: AnyPath) -> None:
    if not isinstance(path, StorePath) and await get_runtime().to_thread(path.is_symlink):
        raise ValidationError(f"Path {path} is a symbolic link and cannot be treated as "
                              "a temporary checkpoint.")


async def _require_dir(class_name: str, path: AnyPath) -> None:
    if not await storage.is_dir(path):
        raise ValidationError(f"Expected {class_name} ({path}) to be a directory.")


async def _make_fresh(path: AnyPath, mode: int | None) -> None:
    """``path`` made anew (what was there removed: an earlier save that did not finish)."""
    if await storage.exists(path):
        log.warning("Temporary directory %s already exists; removing it (it was never "
                    "finalized)", path)
        await storage.rmtree(path)
    if isinstance(path, StorePath):
        return  # (object stores have no directories)
    await storage.makedirs(path.parent)

    def make() -> None:
        path.mkdir() if mode is None else path.mkdir(mode=mode)

    await get_runtime().to_thread(make)


async def _write_commit_file(directory: AnyPath, final_path: AnyPath) -> None:
    await storage.replace_whole(directory / COMMIT_SUCCESS_FILE, _commit.marker_text(final_path))


class TemporaryPathBase(TemporaryPath):
    """What both kinds share: the two paths, and the permissions of the directory made."""

    def __init__(self, temporary_path: Any, final_path: Any, *,
                 checkpoint_metadata_store: Any = None, file_options: Any = None,
                 snapshot_type: Any = None) -> None:
        if snapshot_type is not None:
            raise InvalidArgumentError(
                f"{type(self).__name__}: snapshots (snapshot_type={snapshot_type!r}) are not "
                "supported")
        self._tmp_path = None if temporary_path is None else as_given(temporary_path)
        self._final_path = as_given(final_path)
        #: (Orbax's store of the step's metadata document: accepted, not written to)
        self._checkpoint_metadata_store = checkpoint_metadata_store
        self._path_permission_mode = getattr(file_options, "path_permission_mode", None)

    def get(self) -> AnyPath:
        """The temporary path."""
        if not self._tmp_path:
            raise InvalidArgumentError(
                "Temporary path has not been created yet. Please call `create` first.")
        return self._tmp_path

    def get_final(self) -> AnyPath:
        """The final path."""
        return self._final_path


class AtomicRenameTemporaryPath(TemporaryPathBase):
    """Written into ``<final>.orbax-checkpoint-tmp``, renamed to ``<final>`` at the commit
    (local filesystems)."""

    @classmethod
    @on_engine
    async def validate(cls, temporary_path: Any) -> None:
        path = as_given(temporary_path)
        await _refuse_link(path)
        if TMP_DIR_SUFFIX not in path.name:
            raise ValidationError(f'Expected {cls.__name__} ({path}) to end with '
                                  f'"{TMP_DIR_SUFFIX}".')
        await _require_dir(cls.__name__, path)

    @classmethod
    @on_engine
    async def validate_final(cls, final_path: Any) -> None:
        path = as_given(final_path)
        if TMP_DIR_SUFFIX in path.name:
            raise ValidationError(f'Expected final {cls.__name__} ({path}) not to end with '
                                  f'"{TMP_DIR_SUFFIX}".')
        await _require_dir(cls.__name__, path)

    @classmethod
    def from_temporary(cls, temporary_path: Any, *, file_options: Any = None,
                       snapshot_type: Any = None) -> AtomicRenameTemporaryPath:
        tmp = as_given(temporary_path)
        return cls(tmp, _final_of(tmp), file_options=file_options, snapshot_type=snapshot_type)

    @classmethod
    def from_final(cls, final_path: Any, *, checkpoint_metadata_store: Any = None,
                   file_options: Any = None, snapshot_type: Any = None
                   ) -> AtomicRenameTemporaryPath:
        final = as_given(final_path)
        return cls(_tmp_of(final), final, checkpoint_metadata_store=checkpoint_metadata_store,
                   file_options=file_options, snapshot_type=snapshot_type)

    @on_engine
    async def create(self) -> AnyPath:
        """Makes the temporary directory (one left by an earlier try is removed first)."""
        tmp = self.get()
        if isinstance(tmp, StorePath):
            raise InvalidArgumentError(
                f"{tmp}: object stores have no rename; use CommitFileTemporaryPath there")
        await _make_fresh(tmp, self._path_permission_mode)
        return tmp

    @on_engine
    async def finalize(self) -> None:
        """fsyncs what was written, writes ``commit_success.txt`` in it and renames it to the
        final path (``FileExistsError`` when that exists), durably."""
        tmp = self.get()
        log.info("Renaming %s to %s", tmp, self._final_path)
        await storage.fsync_tree(tmp)
        await _write_commit_file(tmp, self._final_path)
        await storage.rename_durable(tmp, self._final_path)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f'AtomicRenameTemporaryPath(tmp="{self.get().name}", '
                f'final="{self._final_path.name}", directory="{self._final_path.parent}")')


class CommitFileTemporaryPath(TemporaryPathBase):
    """Written into ``<final>`` itself, which counts once ``commit_success.txt`` is written
    in it, last (object stores)."""

    @classmethod
    @on_engine
    async def validate(cls, temporary_path: Any) -> None:
        path = as_given(temporary_path)
        await _refuse_link(path)
        if await storage.exists(path / COMMIT_SUCCESS_FILE):
            raise ValidationError(f'Expected {cls.__name__} ({path}) not to contain the '
                                  f'"{COMMIT_SUCCESS_FILE}" file.')
        await _require_dir(cls.__name__, path)

    @classmethod
    @on_engine
    async def validate_final(cls, final_path: Any) -> None:
        path = as_given(final_path)
        if not await storage.exists(path / COMMIT_SUCCESS_FILE):
            raise ValidationError(f'Expected {cls.__name__} ({path}) to contain the '
                                  f'"{COMMIT_SUCCESS_FILE}" file.')
        await _require_dir(cls.__name__, path)

    @classmethod
    def from_temporary(cls, temporary_path: Any, *, file_options: Any = None,
                       snapshot_type: Any = None) -> CommitFileTemporaryPath:
        return cls(temporary_path, temporary_path, file_options=file_options,
                   snapshot_type=snapshot_type)

    @classmethod
    def from_final(cls, final_path: Any, *, checkpoint_metadata_store: Any = None,
                   file_options: Any = None, snapshot_type: Any = None
                   ) -> CommitFileTemporaryPath:
        if snapshot_type is not None:
            raise InvalidArgumentError("Snapshot is not supported for CommitFileTemporaryPath.")
        return cls(final_path, final_path, checkpoint_metadata_store=checkpoint_metadata_store,
                   file_options=file_options)

    @on_engine
    async def create(self) -> AnyPath:
        """Makes the directory; one there that was never committed is removed first, one
        that was is refused (``StepAlreadyExistsError``; Orbax removes it too)."""
        path = self.get()
        if await storage.exists(path / COMMIT_SUCCESS_FILE):
            raise StepAlreadyExistsError(f"{path} holds a committed checkpoint "
                                         f"({COMMIT_SUCCESS_FILE}); refusing to remove it")
        await _make_fresh(path, self._path_permission_mode)
        return path

    @on_engine
    async def finalize(self) -> None:
        """fsyncs what was written, then writes ``commit_success.txt``."""
        path = self.get()
        log.info("Finalizing %s", path)
        await storage.fsync_tree(path)
        await _write_commit_file(self._final_path, self._final_path)


class ReadOnlyTemporaryPath(TemporaryPath):
    """The two paths of a save, to hand to another process (``to_bytes`` / ``from_bytes``);
    it neither makes nor commits anything."""

    def __init__(self, *, temporary_path: Any, final_path: Any) -> None:
        self._tmp_path = as_given(temporary_path)
        self._final_path = as_given(final_path)

    def get(self) -> AnyPath:
        return self._tmp_path

    def get_final(self) -> AnyPath:
        return self._final_path

    @classmethod
    def from_paths(cls, *, temporary_path: Any, final_path: Any) -> ReadOnlyTemporaryPath:
        return cls(temporary_path=temporary_path, final_path=final_path)

    def to_bytes(self) -> bytes:
        return json.dumps({"tmp_path": str(self._tmp_path),
                           "final_path": str(self._final_path)}).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadOnlyTemporaryPath:
        parsed = json.loads(data.decode("utf-8"))
        return cls(temporary_path=parsed["tmp_path"], final_path=parsed["final_path"])

    @classmethod
    def from_temporary(cls, temporary_path: Any, *, file_options: Any = None,
                       snapshot_type: Any = None) -> ReadOnlyTemporaryPath:
        raise NotImplementedError("ReadOnlyTemporaryPath is not constructible from a "
                                  "temporary path.")

    @classmethod
    def from_final(cls, final_path: Any, *, checkpoint_metadata_store: Any = None,
                   file_options: Any = None, snapshot_type: Any = None
                   ) -> ReadOnlyTemporaryPath:
        raise NotImplementedError("ReadOnlyTemporaryPath is not constructible from a final "
                                  "path.")

    async def create(self, *, file_options: Any = None) -> AnyPath:
        raise NotImplementedError("`create` is not supported.")

    async def finalize(self) -> None:
        raise NotImplementedError("`finalize` is not supported.")

    @classmethod
    async def validate(cls, temporary_path: Any) -> None:
        raise NotImplementedError("`validate` is not supported.")

    @classmethod
    async def validate_final(cls, final_path: Any) -> None:
        raise NotImplementedError("`validate_final` is not supported.")


async def create_all(paths: Sequence[TemporaryPath], *,
                     multiprocessing_options: Any = None) -> None:
    """Makes every path of ``paths`` (on the primary process, the others waiting for it, as
    in Orbax)."""
    from .. import multihost

    primary = getattr(multiprocessing_options, "primary_host", 0)
    several = multihost.process_count() > 1
    if several:
        await asyncio.to_thread(multihost.sync_global_processes, "create_tmp_directory:pre")
    if multihost.is_primary_host(primary):
        await asyncio.gather(*(p.create() for p in paths))
    if several:
        await asyncio.to_thread(multihost.sync_global_processes, "create_tmp_directory:post")


__all__ = [
    "COMMIT_SUCCESS_FILE", "TMP_DIR_SUFFIX", "AtomicRenameTemporaryPath",
    "CommitFileTemporaryPath", "ReadOnlyTemporaryPath", "TemporaryPath", "TemporaryPathBase",
    "ValidationError", "create_all",
]
