"""Integrity: checksums written with every item, checked on every read, and ``verify(path)``.

Each pytree item gets ``_CHECKSUMS``: the crc32 of every chunk of every array (as written)
and of every small document of the item. Orbax ignores the file, so it still restores the
checkpoint; ckpt_async checks every chunk it reads and every document it decodes, and raises
:class:`~ckpt_async.errors.CorruptCheckpointError` naming the path (step and item) and the key.
Checkpoints without ``_CHECKSUMS`` (written by Orbax) are read as before, unchecked.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from . import _format as fmt
from . import _serialize as ser
from . import _storage as storage
from ._crc import crc32
from ._ocdbt import MANIFEST, IndexHint
from ._paths import AnyPath, as_path
from ._runtime import get_runtime, on_engine
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

CHECKSUMS = "_CHECKSUMS"
#: Arrays smaller than this are checked on the engine loop; larger ones in a worker thread.
INLINE_CHECK_BYTES = 1 << 20


class ArraySums(msgspec.Struct):
    chunks: list[int]
    crc: dict[str, int]


class Checksums(msgspec.Struct):
    """``_CHECKSUMS`` of an item: crc32 of each array chunk and each document."""

    version: int = 1
    algorithm: str = "crc32"
    documents: dict[str, int] = {}
    arrays: dict[str, ArraySums] = {}
    #: Where the item's OCDBT B+tree lies, when ckpt_async wrote it (``_ocdbt.read_index``
    #: decodes it without TensorStore while the database's manifest is the one written).
    index: IndexHint | None = None


def checksums_document(documents: dict[str, bytes], arrays: dict[str, dict[str, int]],
                       chunks: dict[str, tuple[int, ...]],
                       index: IndexHint | None = None) -> bytes:
    return fmt.encode(Checksums(
        documents={name: crc32(data) for name, data in documents.items()},
        arrays={name: ArraySums(list(chunks[name]), crc) for name, crc in arrays.items()},
        index=index))


PARTIAL_CHECKSUMS = f"{CHECKSUMS}.parts"


def partial_checksums_name(index: int) -> str:
    """Where process ``index`` of a multi-process save leaves its checksums for the primary."""
    return f"{PARTIAL_CHECKSUMS}/process_{index}"


async def merge_partial_checksums(directory: AnyPath, count: int) -> None:
    """Writes the item's ``_CHECKSUMS`` from every process's partial one (the union of their
    chunks and documents), and removes the partial ones."""
    merged = Checksums()
    for i in range(count):
        path = directory / partial_checksums_name(i)
        if not await storage.exists(path):
            continue  # a process that wrote nothing in this item
        part = fmt.decode(await storage.read_bytes(path), Checksums, where=str(path))
        merged.documents.update(part.documents)
        for name, sums in part.arrays.items():
            have = merged.arrays.setdefault(name, ArraySums(sums.chunks, {}))
            have.crc.update(sums.crc)
    await storage.write_bytes(directory / CHECKSUMS, fmt.encode(merged), durable=False)
    await storage.rmtree(directory / PARTIAL_CHECKSUMS)


async def read_checksums(directory: AnyPath) -> Checksums | None:
    path = directory / CHECKSUMS
    data = await storage.read_optional(path)
    return None if data is None else fmt.decode(data, Checksums, where=str(path))


def check_document(directory: AnyPath, name: str, data: bytes, sums: Checksums | None) -> None:
    expected = sums.documents.get(name) if sums is not None else None
    if expected is not None and crc32(data) != expected:
        raise CorruptCheckpointError(f"{directory / name}: checksum mismatch (the file is damaged)")


async def check_array(directory: AnyPath, name: str, arr: np.ndarray, sums: Checksums | None,
                      origin: tuple[int, ...] | None = None) -> None:
    """Raises CorruptCheckpointError when ``arr`` fails its checksums: the whole stored array,
    or with ``origin`` a chunk-aligned region of it whose corner lies there (then only the
    chunks the region holds are checked)."""
    entry = sums.arrays.get(name) if sums is not None else None
    if entry is None:
        return
    chunks = tuple(entry.chunks)

    def compute() -> dict[str, int]:
        got = ser.chunk_checksums(arr, chunks)  # keys relative to arr's corner
        if not origin or not chunks:
            return got
        offset = [o // max(1, c) for o, c in zip(origin, chunks, strict=True)]
        return {".".join(str(int(k) + o) for k, o in zip(key.split("."), offset, strict=True)):
                crc for key, crc in got.items()}

    # a thread hop costs more than the crc of a small array
    got = compute() if arr.nbytes < INLINE_CHECK_BYTES else await get_runtime().to_thread(compute)
    expected = entry.crc if origin is None else {k: entry.crc[k] for k in got if k in entry.crc}
    bad = [k for k, crc in expected.items() if got.get(k) != crc]
    if bad:
        raise ser.checksum_error(directory, name, bad)


async def read_step_metadata(
        step: AnyPath) -> tuple[fmt.StepMetadata | None, fmt.StepExtension | None]:
    """A step's ``_CHECKPOINT_METADATA`` (None when absent) and our ``_CKPT_ASYNC`` beside it,
    the former checked against the latter's crc32 when there is one."""
    path = step / fmt.CHECKPOINT_METADATA
    data, raw_ext = await asyncio.gather(storage.read_optional(path),
                                         storage.read_optional(step / fmt.STEP_EXTENSION))
    if data is None:
        return None, None
    ext = None
    if raw_ext is not None:
        ext = fmt.decode(raw_ext, fmt.StepExtension, where=str(step / fmt.STEP_EXTENSION))
        if ext.checkpoint_metadata_crc32 not in (None, crc32(data)):
            raise CorruptCheckpointError(f"{path}: checksum mismatch (the file is damaged)")
    return fmt.decode_step_metadata(data, where=str(path)), ext


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify` checked and what it found (empty ``problems``: all good)."""

    path: AnyPath
    items_checked: int = 0
    arrays_checked: int = 0
    bytes_checked: int = 0
    documents_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, other: VerifyReport) -> None:
        """Counts what ``other`` (another checkpoint's report) checked and found, too."""
        self.items_checked += other.items_checked
        self.arrays_checked += other.arrays_checked
        self.bytes_checked += other.bytes_checked
        self.documents_checked += other.documents_checked
        self.problems += other.problems


async def _pytree_plan(item: AnyPath, report: VerifyReport) -> tuple[Any, Any, list[str]] | None:
    """Reads (and checks) an item's documents; the names of its stored arrays."""
    from .handlers.pytree import PyTreeCheckpointHandler

    try:
        tree_doc, _shardings, _strings, sums, _aggregated = (
            await PyTreeCheckpointHandler().read_documents(item))
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return None
    report.documents_checked += 1
    if sums is not None:  # (every other document the checksums name: array_metadatas/...)
        for name, crc in sorted(sums.documents.items()):
            if name == fmt.PYTREE_METADATA:
                continue  # (read and checked above)
            data = await storage.read_optional(item / name)
            if data is None:
                report.problems.append(f"{item / name}: missing (the checksums list it)")
            elif crc32(data) != crc:
                report.problems.append(f"{item / name}: checksum mismatch (the file is damaged)")
            else:
                report.documents_checked += 1
    # (a value aggregated into the msgpack file of Orbax's first format was checked as that
    # file was read: no array of its own is stored)
    names = [".".join(k.key for k in e.key_metadata) for e in tree_doc.tree_metadata.values()
             if e.value_metadata.value_type in ("jax.Array", "np.ndarray", "scalar")
             and not e.value_metadata.skip_deserialize]
    return tree_doc, sums, names


#: Files of a folder that are not its documents: the commit marker, the checksums, and the
#: step's own documents (checked on their own), the step-level files of ``_format``.
NOT_DOCUMENTS = (fmt.COMMIT_SUCCESS, CHECKSUMS, fmt.CHECKPOINT_METADATA, fmt.STEP_EXTENSION)


def _is_proto(typestr: str | None, name: str) -> bool:
    """Whether a document is a protocol buffer message in text format (a ProtoSave item's)."""
    return name.endswith(".pbtxt") or (typestr or "").endswith(".ProtoCheckpointHandler")


async def _verify_documents(item: AnyPath, names: list[str], typestr: str | None,
                            report: VerifyReport) -> None:
    """Checks the documents ``names`` of an item: each against its checksum where one is
    recorded, and decoded (JSON; a protocol buffer's text format as text)."""
    try:
        sums = await read_checksums(item)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return
    for name in names:
        try:
            data = await storage.read_bytes(item / name)
            check_document(item, name, data, sums)
            if not _is_proto(typestr, name):
                fmt.decode(data, Any, where=f"{item / name}: invalid JSON")
            else:  # (the message's class is not recorded: its text is what can be checked)
                try:
                    data.decode()
                except UnicodeDecodeError as exc:
                    raise CorruptCheckpointError(f"{item / name}: not a protocol buffer "
                                                 f"message in text format ({exc})") from None
            report.documents_checked += 1
        except CheckpointError as exc:
            report.problems.append(str(exc))


async def _check_folder(folder: AnyPath, typestr: str | None, report: VerifyReport,
                        plans: dict[Any, Any]) -> bool:
    """Checks one item's folder by what it holds: a pytree item (its documents now, its arrays
    planned in ``plans``), a composite of parts (a random key item: its key, a pytree, and the
    key's JSON description, each checked so), or documents (a JSON or proto item). False when
    it holds nothing to check."""
    from .manager._steps import is_leftover

    if await _is_pytree(folder):
        plans[folder] = await _pytree_plan(folder, report)
        return True
    if await _holds_arrays(folder):
        report.problems.append(f"{folder / fmt.PYTREE_METADATA}: missing (the item holds "
                               "array data, which cannot be read without it)")
        return True
    names = sorted(await storage.listdir(folder))
    parts = [n for n in await storage.listdirs(folder) if not is_leftover(n)]
    if parts:
        for name in sorted(parts):
            if not await _check_folder(folder / name, None, report, plans):
                report.problems.append(f"{folder / name}: holds nothing to check")
        return True
    documents = [n for n in names if n not in NOT_DOCUMENTS and not is_leftover(n)]
    await _verify_documents(folder, documents, typestr, report)
    return bool(documents)


async def _is_pytree(item: AnyPath) -> bool:
    """Whether a folder is a pytree item: ``_METADATA``, or the msgpack file of Orbax's first
    format, which may stand alone."""
    from .handlers._legacy import AGGREGATE_FILE

    return (await storage.exists(item / fmt.PYTREE_METADATA)
            or (await storage.exists(item / AGGREGATE_FILE)
                and not await storage.is_dir(item / AGGREGATE_FILE)))


async def _holds_arrays(item: AnyPath) -> bool:
    """Whether a folder without ``_METADATA`` still holds a pytree item's array data."""
    return (await storage.exists(item / MANIFEST)
            or await storage.is_dir(item / fmt.ARRAY_METADATAS))


def verify(path: Any, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Checks a checkpoint (a step, or one item) without building arrays: every document
    decodes and matches its checksum, every array chunk is read and matches its checksum.
    ``progress(arrays_done, arrays_total)`` is called as it goes.

    >>> report = ckpt_async.verify('/ckpts/run1/1000')   # doctest: +SKIP
    >>> report.ok, report.problems
    """
    return get_runtime().call(averify, path, progress)


async def manager_steps(root: AnyPath) -> list[AnyPath]:
    """The steps of a manager's directory ``root`` that :func:`verify` checks: every folder
    holding ``_CHECKPOINT_METADATA`` or a commit marker (committed steps whose
    ``_CHECKPOINT_METADATA`` is gone included), and every folder it cannot list (reported,
    not skipped); not the leftovers of a save or delete that did not finish, which no manager
    lists, nor other folders, nor, on an object store, a step without its commit marker.
    Empty when ``root`` is itself a checkpoint."""
    from ._commit import scan
    from .manager._steps import is_leftover

    if any([await storage.exists(root / n) for n in (
            fmt.CHECKPOINT_METADATA, fmt.PYTREE_METADATA, fmt.COMMIT_SUCCESS)]):
        return []
    _names, visible = await scan(root)  # (on an object store: the committed ones)

    async def is_step(name: str) -> bool:
        try:
            inside = await storage.listdir(root / name)
        except NotADirectoryError:
            return False
        except OSError:
            return await storage.is_dir(root / name)
        return fmt.CHECKPOINT_METADATA in inside or fmt.COMMIT_SUCCESS in inside

    return [root / n for n in sorted(visible) if not is_leftover(n) and await is_step(n)]


async def averify_step(step: AnyPath,
                       progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Checks one step of a manager's directory (one of :func:`manager_steps`), as
    :func:`verify` of the directory does: a step it cannot read, or whose
    ``_CHECKPOINT_METADATA`` is gone, is reported, not raised."""
    report = VerifyReport(step)
    try:
        if not await storage.exists(step / fmt.CHECKPOINT_METADATA):
            report.problems.append(f"{step / fmt.CHECKPOINT_METADATA}: missing (without it "
                                   "a restore must name every item's args)")
        report.add(await averify(step, progress))
    except (CheckpointError, OSError) as exc:
        report.problems.append(f"{step}: cannot be read ({exc})" if isinstance(exc, OSError)
                               else str(exc))
    return report


@on_engine
async def averify(path: Any, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """The coroutine behind :func:`verify` (``ckpt_async.aio.verify``)."""
    from .manager._steps import is_leftover

    root = as_path(path)
    report = VerifyReport(root)
    if not await storage.is_dir(root):
        raise CheckpointNotFoundError(f"checkpoint {root} does not exist")
    # A manager's directory: every step in it (as the CLI's verify does). Its step folders
    # are not items, and taken for items they held nothing to check.
    steps = await manager_steps(root)
    for step in steps:
        report.add(await averify_step(step, progress))
    if steps:
        return report
    metadata = None
    if await storage.exists(root / fmt.CHECKPOINT_METADATA):
        try:
            metadata, _ext = await read_step_metadata(root)
            report.documents_checked += 1
        except CheckpointError as exc:
            report.problems.append(str(exc))
    handlers = metadata.item_handlers if metadata is not None else None
    plans: dict[Any, Any] = {}
    items = [n for n in await storage.listdirs(root) if not is_leftover(n)]
    if await _is_pytree(root) or await _holds_arrays(root) or not items:
        # one item: the checkpoint's own folder (a pytree, or a document: a JSON item)
        single = handlers if isinstance(handlers, str) else None
        if await _check_folder(root, single, report, plans):
            report.items_checked += 1
        else:
            leftovers = sum(map(is_leftover, await storage.listdir(root)))
            report.problems.append(f"{root}: no checkpoint items found" + (
                f" (only {leftovers} leftover(s) of a save or delete that did not finish)"
                if leftovers else ""))
        items = []
    for name in sorted(items):
        report.items_checked += 1
        typestr = handlers.get(name) if isinstance(handlers, dict) else None
        if not await _check_folder(root / name, typestr, report, plans):
            report.problems.append(f"{root / name}: neither a pytree item (no "
                                   f"{fmt.PYTREE_METADATA}) nor a document item (no "
                                   "document): nothing to check")
    total = sum(len(p[2]) for p in plans.values() if p is not None)
    done = 0
    for item, plan in plans.items():
        if plan is None:
            continue
        tree_doc, sums, names = plan
        ctx = ser.new_context()
        for name in names:
            try:
                arr = await ser.read_array(
                    ctx, item, name, use_ocdbt=tree_doc.use_ocdbt, use_zarr3=tree_doc.use_zarr3,
                    fill_missing=not tree_doc.store_array_data_equal_to_fill_value)
                await check_array(item, name, arr, sums)
                report.arrays_checked += 1
                report.bytes_checked += arr.nbytes
            except CheckpointError as exc:
                report.problems.append(str(exc))
            done += 1
            if progress is not None:
                progress(done, total)
    return report
