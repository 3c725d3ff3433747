"""The local filesystem backend: small documents, directories, durability and atomic rename.

Every call is a coroutine that runs on the engine loop; blocking system calls leave it through
the runtime's limiter. Array data does not pass through here: TensorStore writes it (and fsyncs
it, with its default ``file_io_sync``). OS errors are mapped to ckpt_async errors that name the
path, with ``__cause__`` kept.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import aiofiles
import aiofiles.os

from ._runtime import get_runtime
from .errors import CheckpointNotFoundError, CommitError


def _fsync_path(path: str, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree_sync(root: Path) -> None:
    """Fsyncs every file and directory under ``root`` (children before parents)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name), directory=False)
        _fsync_path(dirpath, directory=True)


async def write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Writes ``data`` to ``path`` (create or truncate) and fsyncs it."""
    try:
        async with aiofiles.open(path, "wb") as f:
            await f.write(data)
            await f.flush()
            if durable:
                await get_runtime().to_thread(os.fsync, f.fileno())
    except OSError as exc:
        raise CommitError(f"cannot write {path}: {exc.strerror or exc}") from exc


async def read_bytes(path: Path) -> bytes:
    """Reads the whole file; a missing file raises CheckpointNotFoundError naming it."""
    try:
        async with aiofiles.open(path, "rb") as f:
            return await f.read()
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{path} does not exist") from exc


async def exists(path: Path) -> bool:
    return await aiofiles.os.path.exists(path)


async def is_dir(path: Path) -> bool:
    return await aiofiles.os.path.isdir(path)


async def listdir(path: Path) -> list[str]:
    try:
        return await aiofiles.os.listdir(path)
    except FileNotFoundError:
        return []


async def makedirs(path: Path) -> None:
    try:
        await aiofiles.os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CommitError(f"cannot create directory {path}: {exc.strerror or exc}") from exc


async def mkdir_exclusive(path: Path) -> None:
    """Creates ``path``; raises FileExistsError when it exists (create-once)."""
    await makedirs(path.parent)
    await aiofiles.os.mkdir(path)


async def rmtree(path: Path) -> None:
    """Removes a directory tree; missing is fine."""
    await get_runtime().to_thread(lambda: shutil.rmtree(path, ignore_errors=True))


async def fsync_tree(root: Path) -> None:
    try:
        await get_runtime().to_thread(fsync_tree_sync, root)
    except OSError as exc:
        raise CommitError(f"cannot fsync {exc.filename or root}: {exc.strerror or exc}") from exc


async def fsync_dir(path: Path) -> None:
    await get_runtime().to_thread(_fsync_path, str(path), True)


async def rename_durable(src: Path, dst: Path) -> None:
    """Renames ``src`` to ``dst`` (which must not exist) and fsyncs the parent directory."""

    def _rename() -> None:
        # os.rename replaces an empty directory silently on POSIX; refuse instead.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
        os.rename(src, dst)
        _fsync_path(str(dst.parent), directory=True)

    await get_runtime().to_thread(_rename)
