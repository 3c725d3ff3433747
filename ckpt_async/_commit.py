"""Commit: make a written checkpoint durable, then visible, atomically.

On a POSIX filesystem a checkpoint is written under ``<name>.orbax-checkpoint-tmp-<ns>``;
commit writes ``_CHECKPOINT_METADATA`` and the ``commit_success.txt`` markers, fsyncs every
file and directory, renames the temporary directory to its final name and fsyncs the parent.
A failure removes the temporary directory; nothing partial is ever visible at the final path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from . import _format as fmt
from . import _storage as storage
from .errors import CommitError, StepAlreadyExistsError


def tmp_path_for(final: Path) -> Path:
    """The temporary directory a save of ``final`` writes into (Orbax's tmp pattern)."""
    return final.parent / f"{final.name}{fmt.TMP_SUFFIX}-{time.time_ns()}"


def is_tmp_name(name: str) -> bool:
    return fmt.TMP_SUFFIX in name


async def create_tmp(final: Path) -> Path:
    tmp = tmp_path_for(final)
    try:
        await storage.mkdir_exclusive(tmp)
    except FileExistsError:  # two saves in the same nanosecond: take the next name
        await asyncio.sleep(0)
        tmp = tmp_path_for(final)
        await storage.mkdir_exclusive(tmp)
    except OSError as exc:
        raise CommitError(f"cannot create {tmp}: {exc.strerror or exc}") from exc
    return tmp


def _marker(path: Path) -> bytes:
    return f"Checkpoint commit was successful to {path}".encode()


async def commit(
    tmp: Path,
    final: Path,
    step_meta: fmt.StepMetadata,
    item_dirs: list[Path],
    *,
    replace: bool = False,
) -> None:
    """Writes the step's documents and markers, fsyncs everything, renames ``tmp`` to ``final``."""
    step_meta.commit_timestamp_nsecs = time.time_ns()
    await storage.write_bytes(tmp / fmt.CHECKPOINT_METADATA, fmt.encode(step_meta), durable=False)
    for d in item_dirs:
        await storage.write_bytes(d / fmt.COMMIT_SUCCESS, _marker(d), durable=False)
    await storage.write_bytes(tmp / fmt.COMMIT_SUCCESS, _marker(tmp), durable=False)
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


async def abort(tmp: Path) -> None:
    """Removes a failed save's temporary directory (shielded: cleanup must not be cancelled)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(storage.rmtree(tmp))
