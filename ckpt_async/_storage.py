"""The local filesystem backend: small documents, directories, durability and atomic rename.

Every call is a coroutine that runs on the engine loop; blocking system calls leave it through
the runtime's limiter. Array data does not pass through here: TensorStore writes it (and fsyncs
it, with its default ``file_io_sync``). OS errors are mapped to ckpt_async errors that name the
path, with ``__cause__`` kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

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


# -- create-once rename ------------------------------------------------------------------------
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_renameat2_fn: Any = None  # ctypes function, False when the platform has none


def _renameat2_or_none() -> Any:
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            except (OSError, AttributeError):  # old glibc or no libc: fall back
                pass
    return _renameat2_fn or None


def renameat2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags)``; False when the kernel, libc or file
    system does not support it (the caller falls back), OSError for any other failure."""
    fn = _renameat2_or_none()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def rename_noreplace_sync(src: Path, dst: Path) -> None:
    """Renames ``src`` to ``dst``; FileExistsError when ``dst`` exists, decided atomically by
    the kernel (``RENAME_NOREPLACE``) where it can, else by a check just before the rename."""
    if renameat2(str(src), str(dst), RENAME_NOREPLACE):
        return
    # Fallback: check, then rename. rename(2) replaces an empty directory silently, so refuse
    # one that exists; a non-empty one makes rename fail with ENOTEMPTY/EEXIST.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst)) from exc
        raise


async def rename_durable(src: Path, dst: Path) -> None:
    """Renames ``src`` to ``dst`` (which must not exist: FileExistsError, create-once) and
    fsyncs the parent directory, so the rename survives a power loss."""

    def _rename() -> None:
        rename_noreplace_sync(src, dst)
        _fsync_path(str(dst.parent), directory=True)

    await get_runtime().to_thread(_rename)


async def exchange_durable(src: Path, dst: Path) -> bool:
    """Atomically swaps ``src`` and ``dst`` (both exist) and fsyncs the parent; False when the
    platform cannot (the caller then moves ``dst`` aside and renames)."""

    def _exchange() -> bool:
        if not renameat2(str(src), str(dst), RENAME_EXCHANGE):
            return False
        _fsync_path(str(dst.parent), directory=True)
        return True

    return await get_runtime().to_thread(_exchange)
