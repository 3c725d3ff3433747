"""Commit: make a written checkpoint durable, then visible, atomically.

On a POSIX filesystem a checkpoint is written under ``<name>.orbax-checkpoint-tmp-<ns>``;
commit writes ``_CHECKPOINT_METADATA`` and the ``commit_success.txt`` markers, fsyncs every
file and directory, renames the temporary directory to its final name and fsyncs the parent.
A failure removes the temporary directory; nothing partial is ever visible at the final path.

An object store has no rename: a checkpoint is written in place at its final prefix, and the
step's ``commit_success.txt`` is written last, after every other object; a checkpoint without
it is invisible (:func:`is_visible`, :func:`scan`) and is removed like a temporary directory.
Removal deletes the marker first (``_storage.rmtree``). The marker is written create-once (a
conditional write, ``_storage.write_new``): of two writers of one step, the store lets one
marker in and the other commit raises StepAlreadyExistsError, as the local create-once rename
does; a forced save (``replace``) writes it unconditionally.

Orbax's commit-file mode (``temporary_path_class=CommitFileTemporaryPath``, or
``AtomicityOptions(mode=AtomicityMode.COMMIT_FILE)``) writes a local step in place too, so that
a run of it killed mid-save leaves a step directory without ``commit_success.txt``. Where
those options are given (:func:`requires_marker`), the local checks take the marker, as on an
object store (``marker=True``): such a directory is no step, and a save of it replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _format as fmt
from . import _storage as storage
from ._crc import crc32
from ._paths import AnyPath, StorePath
from .errors import CheckpointError, CommitError, StepAlreadyExistsError

log = logging.getLogger("ckpt_async")


def tmp_path_for(final: Path) -> Path:
    """The temporary directory a save of ``final`` writes into (Orbax's tmp pattern)."""
    return final.parent / f"{final.name}{fmt.TMP_SUFFIX}-{time.time_ns()}"


def is_tmp_name(name: str) -> bool:
    return fmt.TMP_SUFFIX in name


def _is_commit_file_class(cls: Any) -> bool:
    """Whether ``cls`` is (a subclass of) ``CommitFileTemporaryPath``, ours or Orbax's."""
    return any(c.__name__ == "CommitFileTemporaryPath" for c in getattr(cls, "__mro__", ()))


def requires_marker(temporary_path_cls: Any = None, atomicity_options: Any = None) -> bool:
    """Whether Orbax's options (a checkpointer's or manager's ``temporary_path_class`` and
    ``atomicity_options``, a name format's ``temporary_path_cls``) make a local step count only
    once its ``commit_success.txt`` is there, as Orbax's ``is_path_finalized`` decides: the
    class given, else the atomicity mode; ``allow_legacy_atomic_rename`` takes a directory
    without it too (a step written by a rename)."""
    if temporary_path_cls is not None:
        commit_file = _is_commit_file_class(temporary_path_cls)
    else:
        mode = getattr(atomicity_options, "mode", None)
        commit_file = getattr(mode, "value", mode) == "commit_file"
    return commit_file and not getattr(atomicity_options, "allow_legacy_atomic_rename", False)


async def is_visible(path: AnyPath, marker: bool = False) -> bool:
    """Whether a committed checkpoint is at ``path``: on a local filesystem, the directory
    (the rename is the commit), or with ``marker`` a directory holding its commit marker; on
    an object store, its commit marker."""
    if storage.has_rename(path):
        if marker:
            return await storage.is_dir(path) and await storage.exists(path / fmt.COMMIT_SUCCESS)
        return await storage.is_dir(path)
    return await storage.exists(path / fmt.COMMIT_SUCCESS)


async def scan(directory: AnyPath, marker: bool = False) -> tuple[list[str], set[str]]:
    """The entries of ``directory`` and the visible ones among them. Locally every directory is
    visible (unfinished saves have temporary names; a file or a dangling symlink named like a
    step is no step, as in Orbax), or with ``marker`` those holding a commit marker; on an
    object store only the entries that hold a commit marker (one listing of the prefix)."""
    if storage.has_rename(directory):
        names = await storage.listdirs(directory)
        if not marker:
            return names, set(names)
        candidates = [n for n in names if not is_tmp_name(n)]
        held = await asyncio.gather(*(storage.exists(directory / n / fmt.COMMIT_SUCCESS)
                                      for n in candidates))
        return names, {n for n, h in zip(candidates, held, strict=True) if h}
    keys = await storage.listfiles(directory)
    names = sorted({k.split("/", 1)[0] for k in keys})
    visible = {k.split("/", 1)[0] for k in keys if k.endswith("/" + fmt.COMMIT_SUCCESS)
               and k.count("/") == 1}
    return names, visible


async def create_tmp(final: AnyPath, clear: bool | list[str] = True,
                     marker: bool = False) -> AnyPath:
    """Where a save of ``final`` writes: a new temporary directory, or, on an object store,
    ``final`` itself, cleared first (unlisted, then removed: leftovers of an unfinished save, or
    the checkpoint a forced save replaces): of everything, or of the objects ``clear`` names
    only (those the caller found there: what is there now besides is another save's of the
    same path, which began since), or of nothing where ``clear`` is false or empty.
    Locally, Orbax's own temporary directory for ``final`` (``<name>.orbax-checkpoint-tmp``,
    the leftover of a save of it that did not finish) is removed first, as Orbax removes it;
    with ``marker`` and ``clear``, so is ``final`` when it is a directory without its commit
    marker (a save of Orbax's commit-file mode that did not finish, as Orbax removes it)."""
    if storage.has_rename(final):
        if marker and clear and await storage.is_dir(final) and not await is_visible(
                final, marker=True):
            log.warning("%s holds a save that was never committed (no %s); removing it",
                        final, fmt.COMMIT_SUCCESS)
            await storage.rmtree(final)
        tmp = tmp_path_for(final)
        try:
            await storage.mkdir_exclusive(
                tmp, replacing=final.parent / f"{final.name}{fmt.TMP_SUFFIX}")
        except FileExistsError:  # two saves in the same nanosecond: take the next name
            await asyncio.sleep(0)
            tmp = tmp_path_for(final)
            await storage.mkdir_exclusive(tmp)
        except CheckpointError:
            raise  # (the directory above it could not be made: makedirs named it)
        except OSError as exc:  # (a directory that cannot be written: as check_writable says)
            raise storage.not_created(tmp, exc) from exc
        return tmp
    if clear is True:
        await storage.rmtree(final)
    elif clear:
        await storage.remove_files(final, clear)
    return final


def marker_text(path: AnyPath) -> bytes:
    """What a ``commit_success.txt`` says (Orbax's text): the path it commits."""
    return f"Checkpoint commit was successful to {path}".encode()


async def commit(
    tmp: AnyPath,
    final: AnyPath,
    step_meta: fmt.StepMetadata,
    item_dirs: Sequence[AnyPath],
    *,
    replace: bool = False,
    statistics: dict | None = None,
) -> None:
    """Writes the step's documents and markers, fsyncs everything, renames ``tmp`` to ``final``.
    On an object store (``tmp`` is ``final``) the step's marker, written last, is the commit."""
    if not storage.has_rename(final) and not replace:
        await _refuse_committed(final)  # before its documents are overwritten
    step_meta.commit_timestamp_nsecs = time.time_ns()
    doc = fmt.encode(step_meta, values=[step_meta.metrics, step_meta.custom_metadata])
    files: list[tuple[AnyPath, bytes]] = [
        (tmp / fmt.CHECKPOINT_METADATA, doc),
        (tmp / fmt.STEP_EXTENSION, fmt.encode(fmt.StepExtension(
            checkpoint_metadata_crc32=crc32(doc), statistics=statistics))),
        *((d / fmt.COMMIT_SUCCESS, marker_text(d)) for d in item_dirs)]
    if not (storage.has_rename(final) and storage.has_rename(tmp)):
        await storage.write_files(files)
        await _write_store_marker(final, replace)  # (last, once every other object is in)
        return
    # (the step's marker names where the step is committed, as Orbax's does; each item's
    # names its folder as it was written, inside the temporary directory, as Orbax's too)
    await storage.write_files([*files, (tmp / fmt.COMMIT_SUCCESS, marker_text(final))])
    await storage.fsync_tree(tmp)
    try:
        if replace and await storage.exists(final):
            await _replace(tmp, final)
            return
        await storage.rename_durable(tmp, final)
    except FileExistsError as exc:
        raise StepAlreadyExistsError(
            f"{final} already exists: another writer committed it during this save; "
            "this save was discarded") from exc
    except OSError as exc:
        raise CommitError(f"cannot rename {tmp} to {final}: {exc.strerror or exc}") from exc


def _lost_race(final: AnyPath) -> StepAlreadyExistsError:
    return StepAlreadyExistsError(
        f"{final} already exists: another writer committed it during this save; this save's "
        "commit was refused (its objects were written in place under the same prefix, so "
        "objects of both saves may be mixed there: check it with ckpt_async.verify)")


async def _refuse_committed(final: AnyPath) -> None:
    """Object store: raises when ``final`` already holds a committed checkpoint (the common
    case of a race, reported before this save's documents replace the winner's)."""
    if await storage.exists(final / fmt.COMMIT_SUCCESS):
        raise _lost_race(final)


async def _write_store_marker(final: AnyPath, replace: bool) -> None:
    """Object store: the commit. Create-once unless ``replace`` (a forced save, which cleared
    the old checkpoint when it started and overwrites whatever marker is there now)."""
    marker = final / fmt.COMMIT_SUCCESS
    if replace:
        await storage.write_bytes(marker, marker_text(final))
        return
    if not isinstance(marker, StorePath):  # callers check has_rename(): a programming error
        raise CommitError(f"{final}: not an object store")
    # (this save's own marker: a write whose response was lost, retried by TensorStore or
    # checked again, finds this one there, which is no lost race)
    ours = marker_text(final) + f" (save {uuid.uuid4().hex})".encode()
    try:
        await storage.write_new(marker, ours)
    except FileExistsError as exc:
        with contextlib.suppress(CheckpointError):
            if await storage.read_bytes(marker) == ours:
                return
        raise _lost_race(final) from exc


async def _replace(tmp: Path, final: Path) -> None:
    """Puts ``tmp`` at ``final`` (which holds an older checkpoint) so that the final name holds
    a whole checkpoint at every moment: one atomic exchange where the kernel offers it, else
    move the old one aside, rename, and move it back when the rename fails."""
    if await storage.exchange_durable(tmp, final):
        await storage.rmtree(tmp)  # now holds the old checkpoint under a leftover name
        return
    old = final.parent / f"{final.name}.orbax-checkpoint-todelete-{time.time_ns()}"
    await storage.rename_durable(final, old)
    try:
        await storage.rename_durable(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            await storage.rename_durable(old, final)
        raise
    await storage.rmtree(old)


async def abort(tmp: AnyPath) -> None:
    """Removes a failed save's temporary directory (shielded: cleanup must not be cancelled).
    On an object store ``tmp`` is the final prefix: when it holds a commit marker, another
    writer committed the step there, and its checkpoint is left alone."""
    async def _remove() -> None:
        if not storage.has_rename(tmp) and await is_visible(tmp):
            return
        await storage.rmtree(tmp)

    with contextlib.suppress(Exception):
        await asyncio.shield(_remove())
