"""Array bytes to and from TensorStore, in Orbax's layout (zarr in an OCDBT database; or, as
the handlers' ``use_ocdbt`` and ``use_zarr3`` say, a zarr folder per array, zarr v3).

Reads run on the engine loop, a commit's writes on the background loop
(``Runtime.in_background_loop``); TensorStore's own threads do the I/O and its futures are
awaited directly. One TensorStore context is used per save or restore. Writes are uncompressed by
default (weight-like data barely compresses and zstd costs far more CPU than it saves disk
time); Orbax restores either. Reads accept everything Orbax 0.12 writes: OCDBT or one zarr
array per directory, zarr v2 or v3, compressed or not.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import itertools
import json
import math
import mmap
import os
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import tensorstore as ts

from . import _ocdbt
from . import _storage as storage
from ._crc import crc32
from ._paths import AnyPath, below, kvstore_base
from ._runtime import BACKGROUND_THREADS, batch_pace, get_runtime, log
from .errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    OutOfMemoryError,
    ShardingMismatchError,
    StepAlreadyExistsError,
    UnreadableCheckpointError,
    read_failure,
)

#: OCDBT data files are split at this size at most (Orbax uses 2 GiB on local filesystems).
TARGET_DATA_FILE_SIZE = 256 << 20
#: ... and at this size at least.
MIN_DATA_FILE_SIZE = 16 << 20
#: A save's bytes are spread over about this many data files, which TensorStore writes (and
#: fsyncs) concurrently: on the virtio disk of the benchmark machine a 2 GiB state took a
#: median 1.15 s in 256 MiB files against 2.5 s in Orbax's 2 GiB ones and 3.9 s for one
#: file per array written in turn (``docs/performance-history.md``, rounds 1-3).
DATA_FILES_PER_SAVE = 8


def data_file_size(total_bytes: int) -> int:
    """The OCDBT ``target_data_file_size`` for a save of ``total_bytes`` (readers ignore it)."""
    return int(min(TARGET_DATA_FILE_SIZE,
                   max(MIN_DATA_FILE_SIZE, total_bytes // DATA_FILES_PER_SAVE)))


@functools.lru_cache(maxsize=256)
def is_storable(dtype: np.dtype) -> bool:
    """Whether TensorStore's zarr driver stores ``dtype`` (ml_dtypes included, objects not)."""
    if dtype.hasobject or dtype.kind in "OSU" or dtype.fields is not None:
        return False
    try:
        ts.dtype(dtype.name)
    except (ValueError, TypeError):
        return False
    return True


def new_context(*, use_ocdbt: bool = True, file_io_concurrency_limit: int | None = None,
                data_copy_concurrency_limit: int | None = None) -> ts.Context:
    """A TensorStore context for one item's reads or writes (an OCDBT node cache unless
    ``use_ocdbt=False``). (Made only where TensorStore reads or writes: the first in a
    process whose pages were dropped costs ~8 ms, paging in TensorStore's code, where
    ckpt_async's own local reads and writes need none.)"""
    spec: dict[str, Any] = {"file_io_concurrency": {"limit": file_io_concurrency_limit or 128}}
    if use_ocdbt:
        spec["cache_pool#ocdbt"] = {"total_bytes_limit": 100_000_000}
    if data_copy_concurrency_limit is not None:
        spec["data_copy_concurrency"] = {"limit": data_copy_concurrency_limit}
    return ts.Context(spec)


def fit(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``arr`` cut or padded with zeros to ``shape`` (same rank), each dimension from 0."""
    if arr.shape == shape:
        return arr
    out = np.zeros(shape, arr.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(arr.shape, shape, strict=True))
    out[common] = arr[common]
    return out


#: Float widenings NumPy (ml_dtypes) converts to the same bits as TensorStore, for every value
#: of the source type, NaNs included (each checked over all of them: 65,536, and 2**32 for
#: float32); NumPy's are 2-4x faster. (float16 to float64 is not one: some NaNs differ.)
_EXACT_WIDENINGS = frozenset({("bfloat16", "float32"), ("bfloat16", "float64"),
                              ("float16", "float32"), ("float32", "float64")})


def _same_in_numpy(src: np.dtype, dst: np.dtype) -> bool:
    """Whether NumPy converts ``src`` to ``dst`` as TensorStore's cast driver does: a
    widening of integers (or bools) to integers, or one of :data:`_EXACT_WIDENINGS`."""
    if src.kind in "biu" and dst.kind in "biu":
        return bool(np.can_cast(src, dst, "safe"))
    return (src.name, dst.name) in _EXACT_WIDENINGS


def cast(arr: Any, dtype: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``arr`` converted to ``dtype`` (into ``out`` when given) as TensorStore's ``cast``
    driver converts it: Orbax casts through that driver when it saves with
    ``SaveArgs(dtype=...)`` and restores with a dtype, and NumPy (ml_dtypes for bfloat16 and
    the float8 types) converts some values otherwise: NaN payloads, floats out of an
    integer type's range (bfloat16 -1.0 to uint8 is 0 there, 255 in TensorStore), large
    integers to bfloat16. NumPy's conversion where TensorStore has none (complex to bool,
    uint4: Orbax refuses those casts). A new C-order array unless ``arr`` is already of
    ``dtype``."""
    src = np.asarray(arr)
    dtype = np.dtype(dtype)
    if not src.dtype.isnative:  # (TensorStore reads a '>f4' array's bytes as '<f4')
        src = src.astype(src.dtype.newbyteorder("="), order="C")
    if src.dtype == dtype.newbyteorder("="):
        if out is None:
            return src if src.dtype == dtype else src.astype(dtype, order="C")
        np.copyto(out, src)
        return out
    if _same_in_numpy(src.dtype, dtype):
        with np.errstate(invalid="ignore"):  # (a signalling NaN, quieted as TensorStore does)
            if out is None:
                return src.astype(dtype, order="C")
            np.copyto(out, src, casting="unsafe")
        return out
    try:
        converted = ts.cast(ts.array(src), ts.dtype(dtype.newbyteorder("=").name))
        if out is None:
            result = converted.read().result()
            return result if result.dtype == dtype else result.astype(dtype)
        ts.array(out).write(converted).result()
        return out
    except ValueError:  # (no such TensorStore type, or no conversion between the two)
        if out is None:
            return src.astype(dtype, order="C")
        np.copyto(out, src, casting="unsafe")
        return out


#: How restores read local files: ``memmap`` copies from the page cache through a mapping,
#: where the default reads into a fresh buffer first (for a cold 2 GiB restore: 1.5 s of
#: system CPU instead of 3-5 s, half the page faults). Committed files are never rewritten
#: in place; ``CKPT_ASYNC_FILE_IO_MODE=default`` turns it off.
READ_FILE_IO_MODE = os.environ.get("CKPT_ASYNC_FILE_IO_MODE", "memmap")


def _for_reading(base: dict[str, Any]) -> dict[str, Any]:
    if base["driver"] != "file" or READ_FILE_IO_MODE == "default":
        return base
    return {**base, "file_io_mode": {"mode": READ_FILE_IO_MODE}}


def kvstore_spec(item_dir: AnyPath, *, use_ocdbt: bool, write: bool,
                 file_size: int = TARGET_DATA_FILE_SIZE,
                 db_uuid: str | None = None) -> dict[str, Any]:
    """The kvstore holding an item's arrays; for OCDBT, the item directory's database (on the
    local filesystem, or on an object store's key prefix for a StorePath), writing data files
    of about ``file_size`` bytes. ``db_uuid``: the database's own (its writer's, see
    :class:`ItemWriter`): a commit into a database of another uuid fails (:func:`lost_race`)."""
    base = kvstore_base(item_dir)
    if not write:
        base = _for_reading(base)
    if not use_ocdbt:
        return base
    spec: dict[str, Any] = {"driver": "ocdbt", "base": base, "cache_pool": "cache_pool#ocdbt"}
    if write:
        # Data files need no atomic rename (the step is renamed as a whole); the manifest does.
        if base["driver"] == "file":
            spec["base"] = {**base, "file_io_locking": {"mode": "non_atomic"}}
        spec["manifest"] = base
        spec["config"] = {
            "max_inline_value_bytes": 1024,
            # Orbax uses 100 MB; with values inline, a read then searches ever larger nodes:
            # 1 MB nodes made reading 50,000 small arrays 3x faster (any reader handles both).
            "max_decoded_node_bytes": 1_000_000,
            "manifest_kind": "single",
        }
        if db_uuid is not None:
            spec["config"]["uuid"] = db_uuid
        spec["assume_config"] = True
        spec["target_data_file_size"] = file_size
    return spec


#: A save of at least ``LANE_BYTES`` per lane writes into several OCDBT databases at once
#: (``MAX_LANES`` at most), merged into the item's root database when all are written. One
#: database commits one batch at a time, each commit a chain of writes and fsyncs; in
#: parallel databases they overlap. Durable write of the full ``mixed`` state (1.5 GiB in
#: 1,165 arrays), interleaved: 2.1-2.8 s in one database, 0.74-1.2 s in 4 (merge included);
#: 4,096 arrays of 64 KiB: 0.37-0.41 s against 0.28-0.30 s. Saves under ~64 MiB gain nothing.
MAX_LANES = 4
LANE_BYTES = 32 << 20


def process_dir(index: int, lane: int = 0) -> str:
    """The folder of process ``index``'s OCDBT database inside an item (Orbax's name), or of
    its further ``lane``."""
    return f"ocdbt.process_{index}" if lane == 0 else f"ocdbt.process_{index}.{lane}"


def lane_dir(lane: int, db_uuid: str) -> str:
    """The folder of a single process's OCDBT database ``lane`` inside an item (one that is
    not the item's root database), named for its writer (the start of its ``db_uuid``): two saves into one folder never write into
    one such database (Orbax reads the item's root database only, which lists where the data
    lie)."""
    return f"{process_dir(0, lane)}.{db_uuid[:12]}"


def lost_race(exc: BaseException) -> bool:
    """Whether a TensorStore commit failed on a database another writer made: its manifest
    has another uuid than the writer's (:func:`kvstore_spec`)."""
    return isinstance(exc, ValueError) and "Configuration mismatch on uuid" in str(exc)


def lane_count(total_bytes: int) -> int:
    """How many OCDBT databases a process writes ``total_bytes`` into."""
    return int(min(MAX_LANES, max(1, total_bytes // LANE_BYTES)))


async def merge_process_databases(item_dir: AnyPath, count: int,
                                  db_uuid: str | None = None) -> None:
    """Makes the item's root OCDBT database list every key of the per-process databases
    (Orbax's merge: the root manifest references their data files where they lie; nothing is
    copied). Runs on the primary process after every process has written. ``db_uuid``: the
    root database's (this save's, :func:`kvstore_spec`): a root database another save made
    refuses the merge (:func:`lost_race`)."""
    await merge_databases(item_dir, [item_dir / process_dir(i, lane) for i in range(count)
                                     for lane in range(MAX_LANES)], db_uuid)


async def merge_databases(item_dir: AnyPath, children: list[AnyPath],
                          db_uuid: str | None = None) -> None:
    """Merges the OCDBT databases among ``children`` that exist into the item's root one
    (``db_uuid``: that one's, as :func:`kvstore_spec` takes it)."""
    present = await asyncio.gather(*(storage.exists(c / _ocdbt.MANIFEST) for c in children))
    children = [c for c, ok in zip(children, present, strict=True) if ok]
    if not children:
        return  # nothing but documents in this item
    ctx = new_context()
    parent, *kids = await asyncio.gather(
        ts.KvStore.open(kvstore_spec(item_dir, use_ocdbt=True, write=True, db_uuid=db_uuid),
                        context=ctx),
        # (the children opened with the parent's write spec: TensorStore copies a range by
        # reference only between databases whose base kvstores are configured alike)
        *(ts.KvStore.open(kvstore_spec(c, use_ocdbt=True, write=True), context=ctx)
          for c in children))
    txn = ts.Transaction(atomic=True)
    await asyncio.gather(*(kid.experimental_copy_range_to(parent.with_transaction(txn))
                           for kid in kids))
    await txn.commit_async()


def _zarr_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], compress: bool) -> dict:
    return {
        "shape": list(shape),
        # zarr forbids zero-length chunks; a zero-size array has no chunk to write anyway.
        "chunks": [max(1, c) for c in chunks],
        "compressor": {"id": "zstd", "level": 1} if compress else None,
    }


def _zarr3_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], compress: bool) -> dict:
    """zarr v3 metadata as Orbax writes it (``use_zarr3=True``): each chunk a shard of one
    inner chunk (``sharding_indexed``, its index checked by CRC-32C), zstd level 3 inside
    when compressed."""
    chunk_shape = [max(1, c) for c in chunks]
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        codecs.append({"name": "zstd", "configuration": {"level": 3}})
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        "shape": list(shape),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": chunk_shape, "codecs": codecs,
            "index_codecs": [little, {"name": "crc32c"}], "index_location": "end"}}],
    }


def array_prefix(name: str) -> str:
    """The prefix of stored array ``name``'s keys in an item's database: ``name/``, and none
    for a tree that is one bare array (name ``''``: its ``.zarray`` and chunks at the root,
    where Orbax puts them)."""
    return f"{name}/" if name else ""


#: Where a bare array (name ``''``) written by ckpt_async before round 37 has its keys.
LEGACY_BARE_PREFIX = "/"


def stored_prefix(name: str, index: Mapping[str, Any]) -> str:
    """:func:`array_prefix` of ``name`` as ``index`` holds it: a bare array written by
    ckpt_async before round 37 has its keys under ``/`` (the TensorStore paths find it
    with :func:`_open_for_reading`)."""
    if not name and ".zarray" not in index and f"{LEGACY_BARE_PREFIX}.zarray" in index:
        return LEGACY_BARE_PREFIX
    return array_prefix(name)


def array_spec(
    item_dir: AnyPath,
    name: str,
    *,
    use_ocdbt: bool = True,
    use_zarr3: bool = False,
    write: bool = False,
    file_size: int = TARGET_DATA_FILE_SIZE,
    fill_missing: bool = False,
    db_uuid: str | None = None,
) -> dict[str, Any]:
    """The zarr driver's spec of stored array ``name``. A read of a chunk that is not there
    fails (a deleted or lost file is damage, not zeros), as Orbax reads a checkpoint whose
    ``_METADATA`` says every chunk was stored (``store_array_data_equal_to_fill_value``,
    true since Orbax 0.5 and in every ckpt_async checkpoint); ``fill_missing``: it reads as
    the fill value instead, as for checkpoints that left such chunks out."""
    if use_ocdbt:
        kv = kvstore_spec(item_dir, use_ocdbt=True, write=write, file_size=file_size,
                          db_uuid=db_uuid)
        kv["path"] = array_prefix(name)
    else:
        # (a tree that is one bare array: its zarr array is the item's folder itself, as
        # Orbax stores it)
        folder = below(item_dir, name, "array") if name else item_dir
        kv = kvstore_spec(folder, use_ocdbt=False, write=write)
    spec = {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kv, "recheck_cached_data": False}
    if not write:
        spec["fill_missing_data_reads"] = fill_missing
    return spec


@dataclass(slots=True, eq=False)  # (not frozen: a frozen __init__ costs 4x, per array)
class StoredArray:
    """A host copy of one array ready to write: global shape, and shards with their index."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[tuple[tuple[slice, ...], np.ndarray], ...]

    @property
    def nbytes(self) -> int:
        shards = self.shards
        if len(shards) == 1:  # (the common case, asked per array on the blocking path)
            return shards[0][1].nbytes
        return sum(a.nbytes for _, a in shards)


async def write_array(
    ctx: ts.Context, item_dir: AnyPath, arr: StoredArray, *, compress: bool = False,
    file_size: int = TARGET_DATA_FILE_SIZE, use_ocdbt: bool = True, use_zarr3: bool = False,
    metadata_written: bool = False, db_uuid: str | None = None,
) -> None:
    """Writes ``arr`` into the item's OCDBT database (``use_ocdbt=False``: as a zarr array of
    its own at ``item_dir / arr.name``), as zarr v2 (``use_zarr3``: v3, as Orbax writes it);
    ``metadata_written``: its ``.zarray`` is written already (or in the same commit), only its
    chunks are written here. ``db_uuid``: the database's (:func:`kvstore_spec`)."""
    spec = array_spec(item_dir, arr.name, write=True, file_size=file_size, use_ocdbt=use_ocdbt,
                      use_zarr3=use_zarr3, db_uuid=db_uuid)
    if use_zarr3:
        spec["metadata"] = _zarr3_metadata(arr.shape, arr.chunks, compress)
        # (zarr v3 has a fill value, 0: a chunk of zeros is stored all the same, as Orbax
        # stores it, whose reads take a missing chunk for damage)
        spec["store_data_equal_to_fill_value"] = True
    else:
        spec["metadata"] = _zarr_metadata(arr.shape, arr.chunks, compress)
    spec["dtype"] = arr.dtype.name
    if metadata_written:
        store = await ts.open(spec, open=True, assume_metadata=True, context=ctx)
    else:
        store = await ts.open(spec, create=True, open=True, context=ctx)
    for index, data in arr.shards:
        if data.size:
            # A staged shard is a snapshot nothing writes to again (a jax.Array's host view,
            # or ckpt_async's own copy): TensorStore may encode it in place instead of first
            # copying it into its chunk cache (for 2 GiB, 1.2 s of CPU on 2 cores).
            await store[index].write(data, can_reference_source_data_indefinitely=True)


#: Arrays up to this size are written as raw zarr chunks straight into the OCDBT kvstore:
#: no TensorStore driver is opened per array, which is most of the cost of a small array.
#: Larger ones go through the zarr driver, whose copies run in TensorStore's threads (at the
#: background priority) rather than on the engine loop, which holds the GIL: with 8 MiB here
#: a commit of the quick `mixed` state slowed a training loop by 18-33%, with 256 KiB by
#: 7-13%, for a commit about 10% longer.
DIRECT_WRITE_MAX_BYTES = 256 << 10
#: What a dtype's name is (``float32``, ``bfloat16``, ``<f4``, ``|b1``). A name read from a
#: file is handed to NumPy only so: ``np.dtype`` raises SyntaxError for some other strings
#: (``"(1e999,)f4"``) and kills the process for others (``"m8[Y/0]"``: a floating point
#: exception); for these it raises TypeError only.
_DTYPE_NAME = re.compile(r"[<>|=]?[A-Za-z][A-Za-z0-9_]*")


def dtype_named(name: Any) -> np.dtype:
    """The dtype of a name NumPy or ml_dtypes gives (``"float32"``, ``"bfloat16"``, ``"<f4"``,
    ...); ``TypeError`` for anything else (another string, another type)."""
    if isinstance(name, bytes):
        name = name.decode()
    if not isinstance(name, str) or not _DTYPE_NAME.fullmatch(name):
        raise TypeError(f"data type {name!r} not understood")
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        kind = getattr(ml_dtypes, name, None)
        if not (isinstance(kind, type) and issubclass(kind, np.generic)):
            raise TypeError(f"data type {name!r} not understood") from None
        return np.dtype(kind)


# ml_dtypes names TensorStore's zarr v2 driver writes as the ``dtype`` of ``.zarray``.
_ZARR_V2_NAMED = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz",
                  "float8_e5m2", "float8_e5m2fnuz"}


@functools.lru_cache(maxsize=256)
def zarr_v2_dtype(dtype: np.dtype) -> str | None:
    """The ``.zarray`` dtype string TensorStore writes for ``dtype``; None: not handled here."""
    if dtype.kind in "biufc" and dtype.type.__module__ == "numpy":  # ml_dtypes' float8 is "f"
        return dtype.str
    if dtype.name in _ZARR_V2_NAMED:
        return dtype.name
    return None


@functools.lru_cache(maxsize=4096)
def zarray_document(shape: tuple[int, ...], chunks: tuple[int, ...], zdtype: str) -> bytes:
    """``.zarray`` exactly as TensorStore writes it for an uncompressed zarr v2 array."""
    return json.dumps({
        "chunks": [max(1, c) for c in chunks], "compressor": None, "dimension_separator": ".",
        "dtype": zdtype, "fill_value": None, "filters": None, "order": "C",
        "shape": list(shape), "zarr_format": 2,
    }, separators=(",", ":")).encode()


def chunk_key(index: tuple[slice, ...], chunks: tuple[int, ...]) -> str:
    """The zarr v2 key of the chunk starting at ``index`` (``"0"`` for a 0-d array)."""
    if not chunks:
        return "0"
    if index is full_index(len(chunks)):  # (a single device's array: its one chunk)
        return _ORIGIN_KEYS[len(chunks)]
    return ".".join(str((s.start or 0) // max(1, c)) for s, c in zip(index, chunks, strict=True))


_FULL_INDEX: dict[int, tuple[slice, ...]] = {}
_ORIGIN_KEYS: dict[int, str] = {}


def full_index(ndim: int) -> tuple[slice, ...]:
    """``(slice(None),) * ndim``, built once per rank: the index of an array held whole."""
    index = _FULL_INDEX.get(ndim)
    if index is None:
        _ORIGIN_KEYS[ndim] = ".".join("0" * ndim)
        index = _FULL_INDEX[ndim] = (slice(None),) * ndim
    return index


#: Grids of at most this many chunks are kept (per shape and chunk shape) once computed.
CACHED_GRID_CHUNKS = 64


def chunk_grid(shape: tuple[int, ...], chunks: tuple[int, ...]
               ) -> tuple[tuple[str, tuple[slice, ...]], ...]:
    """Every chunk of an array of ``shape`` stored in ``chunks``: its zarr v2 key and the region
    of the array it holds (none for an empty array; ``("0", ())`` for a 0-d one). Small grids
    are computed once per shape (a restore of many arrays of one shape asks for each)."""
    shape, chunks = tuple(shape), tuple(chunks)
    if math.prod(-(-n // max(1, c)) for n, c in zip(shape, chunks, strict=True)) <= \
            CACHED_GRID_CHUNKS:
        return _cached_grid(shape, chunks)
    return _grid(shape, chunks)


def _grid(shape: tuple[int, ...], chunks: tuple[int, ...]
          ) -> tuple[tuple[str, tuple[slice, ...]], ...]:
    if math.prod(shape) == 0:
        return ()
    steps = [max(1, c) for c in chunks]
    return tuple((".".join(str(st // c) for st, c in zip(starts, steps, strict=True)) or "0",
                  tuple(slice(st, min(st + c, n)) for st, c, n in zip(starts, steps, shape,
                                                                        strict=True)))
                 for starts in itertools.product(*(range(0, n, c) for n, c in zip(shape, steps,
                                                                                   strict=True))))


_cached_grid = functools.lru_cache(maxsize=4096)(_grid)


#: A process's save of at least this many bytes, to a local disk's file system, writes its
#: data files past the page cache (``O_DIRECT``). Through the page cache every byte is first
#: copied into pages the kernel must find, which on the benchmark machine's VM are slow to
#: touch once it has handed them back to the host: a 4 GiB save of 16 arrays took 3.9-4.3 s
#: to a durable commit, 2.2-2.4 s with ``O_DIRECT`` (fresh processes, 2 pairs). Below that
#: it depends on what the last save or restore freed: 1.5 GiB was 1.7-2.1 s against 1.0 s at
#: one hour and 0.78-0.92 s against 1.02-1.22 s at another, 256 MiB always faster through
#: the page cache (0.15-0.16 s against 0.19-0.22 s), which also lets the disk take requests
#: as deep as it likes. A large checkpoint also leaves the page cache, and the data a
#: training job reads through it, as they were. From ``CKPT_ASYNC_DIRECT_IO_MIN_BYTES`` when
#: set: below 4 GiB, ``O_DIRECT`` takes about the same time every time (the benchmark's full
#: ``large``, 4 pairs: 1.04-1.16 s against 1.02-1.05 s and one 3.6 s through the page cache).
DIRECT_IO_MIN_BYTES = 4 << 30
DIRECT_IO_ENV = "CKPT_ASYNC_DIRECT_IO_MIN_BYTES"


def _direct_io_min_from_env() -> int:
    value = os.environ.get(DIRECT_IO_ENV, "").strip()
    if not value:
        return DIRECT_IO_MIN_BYTES
    try:
        return int(value)
    except ValueError:
        log.warning("%s=%r is not a number of bytes; using %d", DIRECT_IO_ENV, value,
                    DIRECT_IO_MIN_BYTES)
        return DIRECT_IO_MIN_BYTES


DIRECT_IO_MIN_BYTES = _direct_io_min_from_env()
#: A save of at least this many bytes that could go past the page cache watches its copies
#: into it (``_ocdbt.WATCH_BYTES``) and goes past it from where they turn slow. Past the page
#: cache each writer thread stages its writes in DIRECT_PIECE_BYTES of its own (32 MiB with 8
#: threads), which a smaller save would notice: a 128 MiB save that switched held 32 MiB more
#: than the 1 MiB it holds through the page cache.
WATCH_MIN_BYTES = 256 << 20
#: File systems of local disks, where ``O_DIRECT`` goes straight to the device (on NFS and
#: FUSE file systems each write would be a synchronous round trip).
DIRECT_IO_FILE_SYSTEMS = frozenset({"ext4", "xfs", "btrfs", "f2fs"})
#: ... and under a host-memory budget, only with a budget of at least this: each background
#: writer thread stages ``O_DIRECT`` writes in a buffer of its own (``_ocdbt``), outside the
#: budget, and all of them together stay within 5% of it. Below it the data goes through the
#: page cache, which is not the process's memory. (A save of 16 MiB arrays under a 32 MiB
#: budget, made to write past the page cache, peaked at 42 MiB above its baseline.)
DIRECT_IO_MIN_BUDGET = 20 * BACKGROUND_THREADS * _ocdbt.DIRECT_PIECE_BYTES


class ItemWriter:
    """Writes one process's arrays of an item into OCDBT.

    On a local filesystem, uncompressed arrays go into a database this module writes itself
    (:class:`_ocdbt.DatabaseWriter`: each batch's chunks from their host buffers into one data
    file, then the B+tree): the item directory's own database with one process, else
    ``process_dir(index)``; past the page cache for a save of ``DIRECT_IO_MIN_BYTES`` or more
    on a local disk's file system (under a ``memory_budget``, one of DIRECT_IO_MIN_BUDGET or
    more), from wherever the page cache turns out slow (``_ocdbt.WATCH_BYTES``) in any other
    save of WATCH_MIN_BYTES or more that could go past it, and while a background commit is
    paced. What it cannot take (compression, a dtype without a zarr v2 name, a shard smaller
    than its chunk) and everything on an object store goes through TensorStore:
    small arrays straight into its kvstore as a ``.zarray`` document and raw chunks, others
    through the zarr driver, all sharing one context and hence one OCDBT database instance per
    lane. Each such batch goes to the least loaded of ``lane_count(total_bytes)`` databases
    ("lanes"): the item directory itself when it is the only database of a single process, else
    folders of this save's own with one process (:func:`lane_dir`) or ``process_dir(index,
    lane)`` with several, which :attr:`merged` lists for :func:`merge_databases`.

    Orbax's other layouts (``use_ocdbt=False``: a zarr array in a folder of its own per
    array; ``use_zarr3=True``: zarr v3) are written by TensorStore's zarr driver alone, each
    array with its metadata, as Orbax writes them: in OCDBT, into the ``process_dir(index)``
    database, merged into the root one (as Orbax's, even for one process); without it, from
    every process into the same folders (each writes the chunks of its shards).

    Two saves into one folder (direct handler saves, or in place on an object store) never
    mix their data: every database this writer makes has its uuid (:attr:`db_uuid`), and a
    commit into one another writer made first fails; a single process's further databases
    are folders of its own (:func:`lane_dir`), merged into the root one before the item's
    documents are written. The save whose root database comes second raises
    StepAlreadyExistsError (:meth:`race_error`) and removes what it can tell is its own
    (:meth:`discard`).

    Call order: :meth:`write` for each batch (concurrently), then :meth:`finish` once.
    :meth:`expect_batches` (optional, any time before :meth:`finish`) says how many batches
    there will be: once the last one's keys have their places in :attr:`db`, its B+tree is
    written while the data files are. After a failure, :meth:`settle` waits for the
    threads still writing.
    """

    def __init__(self, item_dir: AnyPath, *, compress: bool = False,
                 direct_max_bytes: float = DIRECT_WRITE_MAX_BYTES,
                 total_bytes: int = 0, process_index: int | None = None,
                 own_database: bool = True, memory_budget: int | None = None,
                 use_ocdbt: bool = True, use_zarr3: bool = False) -> None:
        self.compress = compress
        self._process_index = process_index
        self.db: _ocdbt.DatabaseWriter | None = None
        self._may_go_direct = False
        self.use_ocdbt, self.use_zarr3 = use_ocdbt, use_zarr3
        #: The uuid of every OCDBT database this writer makes (:func:`kvstore_spec`).
        self.db_uuid = uuid.uuid4().hex
        #: Set once this writer found another save's database in its place (a lost race).
        self.lost_race = False
        self._discarded = False
        #: Whether the layout is another of Orbax's than its default (OCDBT and zarr v2):
        #: written through the zarr driver alone, in one database per process at most.
        self.other_layout = not use_ocdbt or use_zarr3
        lanes = 1 if self.other_layout else lane_count(total_bytes)
        first_lane = 0
        # (os.writev: POSIX only; elsewhere TensorStore writes everything)
        if own_database and not self.other_layout and isinstance(item_dir, Path) and \
                not compress and hasattr(os, "writev"):
            may_go_direct = ((memory_budget is None or memory_budget >= DIRECT_IO_MIN_BUDGET)
                             and storage.file_system_type(item_dir) in DIRECT_IO_FILE_SYSTEMS)
            self._may_go_direct = may_go_direct
            # (one process: the item's own database, its data files in ocdbt.process_0/d/
            # and its B+tree in d/, where Orbax's merge of its one process's leaves them)
            self.db = _ocdbt.DatabaseWriter(
                item_dir if process_index is None else item_dir / process_dir(process_index),
                direct=may_go_direct and total_bytes >= DIRECT_IO_MIN_BYTES,
                watch=may_go_direct and total_bytes >= WATCH_MIN_BYTES,
                data_base=f"{process_dir(0)}/" if process_index is None else "",
                db_uuid=self.db_uuid)
            lanes, first_lane = min(lanes, MAX_LANES - 1), 1
        #: Whether :attr:`dirs` are this save's own folders (:func:`lane_dir`).
        self._own_dirs = False
        if not use_ocdbt or (lanes == 1 and process_index is None and self.db is None
                             and not self.other_layout):
            self.dirs = [item_dir]
        elif process_index is None and not self.other_layout:
            self._own_dirs = True
            self.dirs = [item_dir / lane_dir(first_lane + i, self.db_uuid)
                         for i in range(lanes)]
        else:
            self.dirs = [item_dir / process_dir(process_index or 0, first_lane + i)
                         for i in range(lanes)]
        self._item_dir = item_dir
        # (one value per database: the kvstore and the zarr driver must open the same OCDBT
        # database instance of the shared context)
        self.file_size = data_file_size(total_bytes // lanes)
        self.direct_max_bytes = direct_max_bytes
        self._kv: dict[int, ts.KvStore] = {}
        self._kv_lock = asyncio.Lock()
        self._load = [0] * lanes
        self._used: set[int] = set()
        #: The lanes a commit of this writer's went into: databases it made (its uuid).
        self._won: set[int] = set()
        #: name -> chunk key -> crc32 of the chunk's bytes as written (``_CHECKSUMS``).
        self.checksums: dict[str, dict[str, int]] = {}
        self.chunks: dict[str, tuple[int, ...]] = {}
        # Batches handed over, how many there will be, how many of those :attr:`db` takes
        # have no places there yet (:meth:`_ocdbt.DatabaseWriter.add`), and the thread
        # finishing it.
        self._added = 0
        self._expected: int | None = None
        self._placing = 0
        self._count_lock = threading.Lock()
        self._finishing: concurrent.futures.Future[None] | None = None
        self._all_in: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._threads: list[concurrent.futures.Future[None]] = []
        #: The batches written through TensorStore (each a task, shielded from the
        #: cancellation of the batch's writer: TensorStore's writes go on regardless, and
        #: :meth:`settle` waits for them).
        self._store_writes: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]] = []

    @functools.cached_property
    def ctx(self) -> ts.Context:
        """The TensorStore context of this item's TensorStore writes, made on first use."""
        return new_context()

    @property
    def index_hint(self) -> _ocdbt.IndexHint | None:
        """Where :attr:`db`'s B+tree lies (after :meth:`finish`), when the item's database is
        that one alone (a merge rewrites the manifest: the hint would then go unused)."""
        alone = self.db is not None and self.db.root == self._item_dir and not self._used
        return self.db.hint if alone and self.db is not None else None

    @property
    def merged(self) -> list[AnyPath]:
        """The lane databases TensorStore wrote, to merge into the item's root database (none:
        everything is there already)."""
        used = [self.dirs[i] for i in sorted(self._used)]
        return [] if used == [self._item_dir] else used

    async def _kvstore(self, lane: int) -> ts.KvStore:
        async with self._kv_lock:
            if lane not in self._kv:
                spec = kvstore_spec(self.dirs[lane], use_ocdbt=True, write=True,
                                    file_size=self.file_size, db_uuid=self.db_uuid)
                self._kv[lane] = await ts.KvStore.open(spec, context=self.ctx)
            return self._kv[lane]

    @staticmethod
    def _raw_dtype(arr: StoredArray) -> str | None:
        """The ``.zarray`` dtype of an array that can be stored as raw chunks, one per shard:
        a dtype with a zarr v2 name, every shard one whole chunk (zarr pads an edge chunk)."""
        zdtype = zarr_v2_dtype(arr.dtype)
        if zdtype is None or any(data.shape != arr.chunks for _, data in arr.shards if data.size):
            return None
        return zdtype

    def _raw_values(self, batch: list[tuple[StoredArray, str]]
                    ) -> list[tuple[str, memoryview | bytes]]:
        """A batch's keys and values as raw zarr: ``.zarray`` documents (bytes) and chunks
        (views of the arrays' host buffers)."""
        values: list[tuple[str, memoryview | bytes]] = []
        for arr, zdtype in batch:
            prefix = array_prefix(arr.name)
            values.append((f"{prefix}.zarray", zarray_document(arr.shape, arr.chunks, zdtype)))
            self.checksums.setdefault(arr.name, {})
            for index, data in arr.shards:
                if data.size:
                    values.append((f"{prefix}{chunk_key(index, arr.chunks)}",
                                   _ocdbt.as_bytes(np.ascontiguousarray(data))))
        return values

    def _record(self, crcs: Iterable[tuple[str, int]]) -> None:
        """Records the crc32 of chunks, given by key (``<array>/<chunk key>``; documents are
        skipped), in :attr:`checksums`."""
        for full, crc in crcs:
            name, _, key = full.rpartition("/")
            if key != ".zarray":
                self.checksums[name][key] = crc

    async def write(self, batch: list[StoredArray]) -> None:
        """Writes a batch of arrays: those :attr:`db` takes in one data file (in a worker
        thread); through TensorStore, the small ones in one OCDBT transaction (one commit, one
        future to await) and the others through the zarr driver; all concurrently."""
        # (an array none of whose shards this process owns is written by the others)
        batch = [arr for arr in batch if arr.shards]
        own: list[tuple[StoredArray, str]] = []
        rest: list[tuple[StoredArray, str | None]] = []
        for arr in batch:
            self.chunks[arr.name] = arr.chunks
            zdtype = self._raw_dtype(arr)
            if self.db is not None and zdtype is not None:
                own.append((arr, zdtype))
            else:
                rest.append((arr, zdtype))
        writes: list[Awaitable[Any]] = []
        if own:
            assert self.db is not None
            db = self.db
            pace = batch_pace.get()  # (set while this batch is paced)
            hold = pace.hold if pace is not None else None

            def write_file() -> None:
                # The batch's keys and views are made here, not on the loop: there the next
                # batches' would hold the GIL from the threads already writing (full
                # many_small: the first data file started 60-89 ms after save() was called
                # rather than 39 ms, the commit 231 against 213 ms, in-process medians of 8).
                # This thread then takes each piece's crc32 just before writing it: one job
                # per batch (a checksum job of its own beside it made commits slower).
                try:
                    # Paced (a training step beside it): past the page cache, where finding
                    # fresh pages and the kernel's writeback would take CPU time at the
                    # caller's priority, not the background's. Full ``large``'s steps
                    # slowed by +0.1% rather than +6.4% through it (medians of 5).
                    data_file = db.add(self._raw_values(own), past_cache=self._may_go_direct
                                       and pace is not None and pace.active())
                    self._count(placing=-1)
                    self._record(db.write(data_file, hold=hold,
                                          relocate=get_runtime().run_raised).items())
                finally:
                    # The pool's work item keeps this function, and the arrays it closes
                    # over, until after its result is out: a budget released by then must
                    # not find them still in memory (a save peaked above its budget).
                    own.clear()

            self._count(placing=1)
            self._threads.append(get_runtime().submit_background(write_file))
            writes.append(asyncio.wrap_future(self._threads[-1]))
        self._count(added=1)
        if rest:
            task = asyncio.ensure_future(self._write_tensorstore(rest))
            self._store_writes.append((asyncio.get_running_loop(), task))
            writes.append(asyncio.shield(task))
        await asyncio.gather(*writes)

    def expect_batches(self, count: int) -> concurrent.futures.Future[None]:
        """Says that :meth:`write` is given ``count`` batches in all; returns a future done
        once every one is handed over and the keys of those :attr:`db` takes have their
        places there: the B+tree here and the item's documents in the caller are built from
        then on, while the data is still being copied and written, not after it. Interleaved
        fresh processes of the benchmark's worker (round 32), durable commit medians: quick
        ``mixed`` 91.6 against 94.9 ms (24 each), 77.4 against 81.4 (16) and 84.4 against
        81.1 (10); quick ``many_small`` 37.3 against 40.8 ms (24) and 38.1 against 39.6 (16).
        (Earlier rounds waited for every batch to be in the page cache: built beside the
        checksums and page-cache copies from the first batch on, they and the copies traded
        the GIL, each hand-off taking up to the interpreter's 5 ms switch interval. Once the
        last batch has a writer, most of the copies wait for the disk, not the GIL.)"""
        self._count(expected=count)
        return self._all_in

    def _count(self, added: int = 0, expected: int | None = None, placing: int = 0) -> None:
        with self._count_lock:
            self._added += added
            self._placing += placing
            if expected is not None:
                self._expected = expected
            if (self._added == self._expected and not self._placing
                    and not self._all_in.done()):
                self._start_finish()
                self._all_in.set_result(None)

    def _start_finish(self) -> None:
        """Starts :attr:`db`'s B+tree and manifest in a worker thread, once (under the lock)."""
        if self.db is not None and self._finishing is None:
            self._finishing = get_runtime().start_background(self.db.finish)

    async def _write_tensorstore(self, batch: list[tuple[StoredArray, str | None]]) -> None:
        """Writes a batch through TensorStore into the least loaded lane: arrays up to
        ``direct_max_bytes`` that can be stored as raw chunks straight into its kvstore (one
        transaction), the others through the zarr driver. Of those, an uncompressed array with
        a zarr v2 dtype has its ``.zarray`` written in that transaction too, and the driver
        writes its chunks only (``assume_metadata``): the driver's own create was a commit of
        the database per array. (Quick ``mixed`` to fake-gcs-server, each request held 20 ms:
        25-26 GETs and 29-30 POSTs rather than 43-44 and 50-51, 1.11-1.13 s rather than
        1.28-1.31 s.)"""
        lane = self._load.index(min(self._load))
        self._used.add(lane)
        try:
            await self._write_to(lane, batch)
        except Exception as exc:
            if lost_race(exc):
                raise self.race_error(self.dirs[lane]) from exc
            raise
        self._won.add(lane)

    def race_error(self, database: AnyPath) -> StepAlreadyExistsError:
        """The error of a lost race: another save made the OCDBT database at ``database`` (in
        the item) while this one wrote its data."""
        self.lost_race = True
        where = _ocdbt.MANIFEST if database == self._item_dir else \
            f"{str(database)[len(str(self._item_dir)) + 1:]}/{_ocdbt.MANIFEST}"
        return StepAlreadyExistsError(
            f"{self._item_dir} already holds a checkpoint item: another save made its {where} "
            "while this one wrote its data (two saves into one folder); this save was "
            "abandoned and its own files there are removed")

    async def _write_to(self, lane: int, batch: list[tuple[StoredArray, str | None]]) -> None:
        if self.other_layout:
            for arr, _zdtype in batch:
                self._load[lane] += arr.nbytes
            await gather_all([self._write_large(arr, lane) for arr, _zdtype in batch])
            return
        direct: list[tuple[StoredArray, str]] = []
        documents: list[tuple[str, bytes]] = []
        others: list[Awaitable[Any]] = []
        for arr, zdtype in batch:
            self._load[lane] += arr.nbytes
            if self.compress or zdtype is None:
                others.append(self._write_large(arr, lane))
            elif arr.nbytes > self.direct_max_bytes:
                documents.append((f"{array_prefix(arr.name)}.zarray",
                                  zarray_document(arr.shape, arr.chunks, zdtype)))
                others.append(self._write_large(arr, lane, metadata_written=True))
            else:
                direct.append((arr, zdtype))
        if direct or documents:
            values = [*self._raw_values(direct), *documents]
            txn = ts.Transaction()
            kv = (await self._kvstore(lane)).with_transaction(txn)
            for key, value in values:
                kv.write(key, bytes(value))  # (TensorStore takes bytes only)

            def checksum() -> None:  # (crc32 releases the GIL on large buffers)
                self._record((k, crc32(v)) for k, v in values if isinstance(v, memoryview))

            others += [get_runtime().to_thread(checksum), txn.commit_async()]
        await gather_all(others)

    async def finish(self) -> None:
        """After every :meth:`write`: completes :attr:`db` (its B+tree and manifest), and with
        one process merges :attr:`merged` into the item's root database (before the item's
        documents are written: a save that lost a race never writes them). With several
        processes, each then fsyncs its own database: the primary's fsync of the whole
        checkpoint before the commit reaches another host's page cache only as far as the
        shared file system carries it. (One process leaves its files to that pass.)"""
        with self._count_lock:
            self._start_finish()
        try:
            if self._finishing is not None:
                await asyncio.wrap_future(self._finishing)
            if self._process_index is None and self.merged:
                try:
                    await merge_databases(self._item_dir, self.merged, self.db_uuid)
                except Exception as exc:
                    if lost_race(exc):
                        raise self.race_error(self._item_dir) from exc
                    raise
        except StepAlreadyExistsError:
            # (another save into this folder made its database first: this save's files
            # go, once every write to them ended)
            self.lost_race = True
            await self.discard()
            raise
        if self.db is not None and self._process_index is not None:
            await storage.fsync_tree(self.db.root)

    async def discard(self) -> None:
        """After a lost race (:attr:`lost_race`, or another process of the save lost one):
        waits for every write this writer started, then removes what is its own: :attr:`db`'s
        data files, its own databases' folders (:func:`lane_dir`), and the other folders of
        databases it committed into (``process_dir``: it made them, with its uuid, which any
        other save's commit there refuses, so no other save's item lists them). (What
        TensorStore wrote into a database the other save made, the item's root or another
        process database, has names no one records: left there, unreferenced.)"""
        await self.settle()
        if self._discarded:
            return
        self._discarded = True
        if self.db is not None:
            await get_runtime().to_thread(self.db.discard)
        own = self.dirs if self._own_dirs else [self.dirs[i] for i in sorted(self._won)]
        await asyncio.gather(*(storage.rmtree(d) for d in own if d != self._item_dir))

    async def settle(self) -> None:
        """Waits for every thread and TensorStore write this writer started, whatever their
        outcome: after a failure, nothing is left writing into the directory it is about to
        remove."""
        threads = [*self._threads, self._finishing]
        here = asyncio.get_running_loop()

        async def ended(task: asyncio.Task[None]) -> None:
            await asyncio.gather(task, return_exceptions=True)

        await asyncio.gather(
            *(asyncio.wrap_future(t) for t in threads if t is not None),
            *(ended(task) if loop is here else  # (batches are written on the background loop)
              asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ended(task), loop))
              for loop, task in self._store_writes),
            return_exceptions=True)

    async def _write_large(self, arr: StoredArray, lane: int,
                           metadata_written: bool = False) -> None:
        def checksum() -> dict[str, int]:  # (crc32 releases the GIL on large buffers)
            return {chunk_key(i, arr.chunks): crc32_of(d) for i, d in arr.shards if d.size}

        sums, _ = await gather_all([
            get_runtime().to_thread(checksum),
            write_array(self.ctx, self.dirs[lane], arr, compress=self.compress,
                        file_size=self.file_size, metadata_written=metadata_written,
                        use_ocdbt=self.use_ocdbt, use_zarr3=self.use_zarr3,
                        db_uuid=self.db_uuid)])
        self.checksums[arr.name] = sums


async def gather_all(aws: Iterable[Awaitable[Any]]) -> list[Any]:
    """The results of ``aws``, run concurrently; when one fails, its error once every other
    has ended (``asyncio.gather`` raises at once and leaves the others running: a batch's
    other writes then landed after the failed save's directory was removed, leaving it
    behind)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _open_for_reading(ctx: ts.Context, item_dir: AnyPath, name: str, *, use_ocdbt: bool,
                            use_zarr3: bool, fill_missing: bool = False) -> Any:
    """Opens stored array ``name`` for reading (``fill_missing``: see :func:`array_spec`); a
    bare array (name ``''``) that is not at the database's root is looked for where
    ckpt_async wrote it before round 37 (under ``/``). TensorStore's ``ValueError`` (the one
    at the root) if it cannot be opened."""
    spec = array_spec(item_dir, name, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                      fill_missing=fill_missing)
    try:
        return await ts.open(spec, open=True, read=True, context=ctx)
    except ValueError:
        if name or not use_ocdbt:
            raise
        # (a spec's kvstore path loses its leading '/' in the zarr driver; an open KvStore's
        # keeps it)
        with contextlib.suppress(ValueError):
            kv = await ts.KvStore.open({**spec["kvstore"], "path": LEGACY_BARE_PREFIX},
                                       context=ctx)
            if (await kv.read(".zarray")).state == "value":
                return await ts.open({k: v for k, v in spec.items() if k != "kvstore"},
                                     kvstore=kv, open=True, read=True, context=ctx)
        raise


async def open_array(ctx: ts.Context, item_dir: AnyPath, name: str, *, use_ocdbt: bool,
                     use_zarr3: bool, fill_missing: bool = False) -> Any:
    """Opens one stored array for reading (a TensorStore; nothing is read yet;
    ``fill_missing``: see :func:`array_spec`)."""
    try:
        return await _open_for_reading(ctx, item_dir, name, use_ocdbt=use_ocdbt,
                                       use_zarr3=use_zarr3, fill_missing=fill_missing)
    except ValueError as exc:
        raise read_failure(f"{item_dir}: array {name!r} cannot be opened", exc) from exc


async def read_array(
    ctx: ts.Context,
    item_dir: AnyPath,
    name: str,
    *,
    use_ocdbt: bool,
    use_zarr3: bool,
    index: tuple[slice, ...] | None = None,
    fill_missing: bool = False,
) -> np.ndarray:
    """Reads one stored array (or the ``index`` region of it) into host memory
    (``fill_missing``: see :func:`array_spec`)."""
    try:
        store = await _open_for_reading(ctx, item_dir, name, use_ocdbt=use_ocdbt,
                                        use_zarr3=use_zarr3, fill_missing=fill_missing)
        if index is not None:
            store = store[index]
        return await store.read()
    except ValueError as exc:
        # The item's metadata lists the array: a missing, truncated or garbled one is damage
        # (one the store refused or did not serve is not).
        raise read_failure(f"{item_dir}: array {name!r} cannot be read", exc) from exc


#: Restore buffers from this size on are mapped with their pages populated up front.
POPULATED_BUFFER_MIN_BYTES = 1 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_ANONYMOUS_MAPPINGS = hasattr(mmap, "MAP_ANONYMOUS")  # not on Windows


#: jax.device_put adopts CPU host buffers aligned to this many bytes instead of copying them.
HOST_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array starting on a HOST_ALIGNMENT boundary (NumPy aligns
    small allocations to 16 bytes only)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    offset = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array for a restore to read into through TensorStore, or to
    carve small arrays from (:func:`host_buffers`).

    A large one is an anonymous mapping whose pages are populated in one call (Linux
    ``MAP_POPULATE``): TensorStore's first touch of 2 GiB page by page took 3-5 s on the
    benchmark machine, populating it 0.6 s (arrays read with ``preadv`` are not populated
    first: see :meth:`ItemReader.read_array`). Being page-aligned, it becomes a CPU jax.Array
    without a copy (``jax.device_put`` adopts 64-byte-aligned host buffers), and the mapping
    is released with the last array that uses it. Blocks: call it from a worker thread.
    """
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < POPULATED_BUFFER_MIN_BYTES or not _ANONYMOUS_MAPPINGS:
        return aligned_empty(shape, dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    return np.frombuffer(m, dtype, count=count).reshape(shape)


def host_buffers(specs: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Uninitialised C-order arrays of the given shapes and dtypes, each aligned to
    HOST_ALIGNMENT, carved from one region populated at once (:func:`host_buffer`): a restore
    of 4,096 arrays of 64 KiB spent 190 ms faulting in their pages one by one, 110 ms
    populating and filling one region. The region lives as long as any of its arrays."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += _ocdbt.round_up(math.prod(shape) * dtype.itemsize, HOST_ALIGNMENT)
    region = host_buffer((total,), np.dtype(np.uint8))
    return [region[o:o + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
            for o, (shape, dtype) in zip(offsets, specs, strict=True)]


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says no memory was to be had: NumPy's MemoryError, or ENOMEM from a
    mapping (:func:`host_buffer`, :func:`_ocdbt.anonymous_memory`)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and
                                            exc.errno == errno.ENOMEM)


@contextlib.contextmanager
def allocating(directory: AnyPath, names: Sequence[str], nbytes: int) -> Iterator[None]:
    """Around the allocation of the host buffers that the arrays ``names`` of the item at
    ``directory`` are read into (``nbytes`` in all): none to be had raises
    :class:`OutOfMemoryError` naming them and the bytes (a bare MemoryError named nothing)."""
    try:
        yield
    except (MemoryError, OSError) as exc:
        if isinstance(exc, OutOfMemoryError) or not out_of_memory(exc):
            raise
        what = f"key {names[0]!r}" + (f" (and {len(names) - 1} other arrays read with it)"
                                       if len(names) > 1 else "")
        raise OutOfMemoryError(
            f"{directory}: {what}: out of host memory allocating {nbytes} bytes"
            + (f" ({nbytes / 2**20:.1f} MiB)" if nbytes >= 2**20 else "") + " to restore into"
            + (f" ({exc})" if str(exc) else "")) from exc


async def read_into_buffer(ctx: ts.Context, store: Any) -> np.ndarray:
    """All of ``store`` read straight into a fresh :func:`host_buffer` (``store.read()``
    would return TensorStore's own, 16-byte-aligned buffer, which jax copies again)."""
    shape, dtype = tuple(store.shape), np.dtype(store.dtype.numpy_dtype)
    # (only a mapping blocks long enough to be worth a thread hop)
    dest = (await get_runtime().to_thread(host_buffer, shape, dtype)
            if math.prod(shape) * dtype.itemsize >= POPULATED_BUFFER_MIN_BYTES
            else host_buffer(shape, dtype))
    if dest.size:
        await ts.array(dest, copy=False, write=True, context=ctx).write(store)
    return dest


#: Arrays up to this size are read straight from the OCDBT kvstore when they are stored as
#: uncompressed zarr v2 (what ckpt_async writes): no zarr driver is opened per array. Larger
#: ones go through the driver, which reads into one buffer (the kvstore path copies twice).
DIRECT_READ_MAX_BYTES = 1 << 20
#: ... in batches of about this many bytes: the raw chunks of one batch are held while its
#: arrays are assembled, so a restore of many small arrays peaks near the restored size plus
#: one batch, not twice the restored size.
DIRECT_READ_BATCH_BYTES = 32 << 20
#: ... and from a local index in batches of about this many bytes, read by several threads at
#: once (:meth:`ItemReader.read_small`): each batch populates the region its arrays are carved
#: from while the others read. Cold, 32 MiB in 512 arrays: 51 ms in 8 MiB batches against 56 ms
#: in one; 1.5 GiB ``mixed``: 0.85 s against 1.0 s.
LOCAL_READ_BATCH_BYTES = 8 << 20


def _zarray_fields(meta: Any) -> tuple[Any, tuple[int, ...], tuple[int, ...]] | None:
    """The dtype field, shape and chunk shape of a parsed zarr v2 ``.zarray`` document; None
    for another format, one with filters, or fields missing or malformed."""
    if not isinstance(meta, dict):
        return None
    try:
        if meta.get("zarr_format") != 2 or meta.get("filters"):
            return None
        return (meta["dtype"], tuple(int(s) for s in meta["shape"]),
                tuple(int(c) for c in meta["chunks"]))
    except (KeyError, TypeError, ValueError):
        return None


def _direct_plan(meta: dict[str, Any], max_bytes: float = DIRECT_READ_MAX_BYTES,
                 ) -> tuple[np.dtype, tuple[int, ...], tuple[int, ...]] | None:
    """dtype, shape and chunks of a ``.zarray`` that can be read as raw chunks (an array of at
    most ``max_bytes``); else None."""
    fields = _zarray_fields(meta)
    if (fields is None or meta.get("compressor") is not None
            or meta.get("order", "C") != "C" or meta.get("dimension_separator", ".") != "."):
        return None
    zdtype, shape, chunks = fields
    try:
        dtype = dtype_named(zdtype)
    except TypeError:
        return None
    if dtype.hasobject or math.prod(shape) * dtype.itemsize > max_bytes:
        return None
    return dtype, shape, chunks


Layout = tuple[tuple[int, ...], np.dtype, tuple[int, ...]]


def zarray_layout(document: bytes) -> Layout | None:
    """Shape, dtype and chunk shape of a zarr v2 ``.zarray`` document (compressed or not), as
    :func:`read_shape_dtype` has them from TensorStore's zarr driver; None for a document
    that driver may read otherwise (or not at all): filters, a byte order not native, a dtype
    TensorStore does not write so."""
    try:
        fields = _zarray_fields(json.loads(document))
    except (TypeError, ValueError):
        return None
    if fields is None:
        return None
    zdtype, shape, chunks = fields
    try:
        dtype = dtype_named(zdtype)
    except TypeError:
        return None
    named = dtype.name if dtype.type.__module__.startswith("ml_dtypes") else None
    if (not dtype.isnative or zdtype not in (zarr_v2_dtype(dtype), named)
            or not is_storable(dtype) or len(chunks) != len(shape)):
        return None
    return shape, dtype, chunks


def _assemble(out: np.ndarray, chunks: tuple[int, ...],
              raw: Mapping[str, bytes | memoryview]) -> bool:
    """Fills ``out`` from the raw chunks of the array; False when a chunk is missing (the
    array is then left to the driver)."""
    if not out.size:
        return True
    shape, dtype = out.shape, out.dtype
    if not shape or chunks == shape:
        data = raw.get("0" if not shape else ".".join("0" * len(shape)))
        if data is None:
            return False
        out.reshape(-1)[...] = np.frombuffer(data, dtype)
        return True
    for key, region in chunk_grid(shape, chunks):
        data = raw.get(key)
        if data is None:
            return False
        block = np.frombuffer(data, dtype).reshape(chunks)
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return True


PlanT = TypeVar("PlanT", bound=tuple)


def _read_batches(planned: list[tuple[str, PlanT]], batch_bytes: int
                  ) -> list[list[tuple[str, PlanT]]]:
    """``planned`` arrays (name, plan starting with dtype and shape), in order, cut into
    batches of about ``batch_bytes``."""
    batches: list[list[tuple[str, PlanT]]] = [[]]
    held = 0
    for name, plan in planned:
        nbytes = math.prod(plan[1]) * plan[0].itemsize
        if held and held + nbytes > batch_bytes:
            batches.append([])
            held = 0
        batches[-1].append((name, plan))
        held += nbytes
    return batches


def checksum_error(directory: AnyPath, name: str, bad: list[str]) -> CorruptCheckpointError:
    """The error for stored array ``name`` whose chunks ``bad`` fail their checksums."""
    return CorruptCheckpointError(
        f"{directory}: key {name!r} fails its checksum (chunks {', '.join(sorted(bad)[:8])}); "
        "the stored data is damaged")


#: A local array stored as one chunk of more than this many bytes is read in segments of this
#: size, each by a worker thread of its own (:meth:`ItemReader.read_array`), so that a few
#: large arrays keep as many reads in flight as many arrays would.
READ_SEGMENT_BYTES = 16 << 20


@contextlib.contextmanager
def _descriptors() -> Iterator[dict[tuple[str, bool], int]]:
    """A dict of open file descriptors by path and whether they read past the page cache
    (:meth:`ItemReader._data_file` fills it), all closed on leaving."""
    files: dict[tuple[str, bool], int] = {}
    try:
        yield files
    finally:
        for fd in set(files.values()):
            os.close(fd)


#: A local array as :meth:`ItemReader.local_plan` gives it: dtype, shape, chunk shape, and for
#: each chunk its key, its region of the array and its stored value (``_ocdbt.Located``).
LocalPlan = tuple[np.dtype, tuple[int, ...], tuple[int, ...],
                  list[tuple[str, tuple[slice, ...], "_ocdbt.Located"]]]


def _whole_ref(plan: LocalPlan) -> tuple[str, int, int] | None:
    """Where a planned array stored as one chunk, its whole data, lies in a data file (path,
    offset, length); None for any other array."""
    dtype, shape, chunks, refs = plan
    ref = refs[0][2] if len(refs) == 1 and tuple(chunks) == shape else None
    if isinstance(ref, tuple) and ref[2] == math.prod(shape) * dtype.itemsize:
        return ref
    return None


_W = TypeVar("_W", bound=tuple)


def _adjacent_runs(whole: list[_W], limit: int) -> Iterator[list[_W]]:
    """``whole`` (tuples starting with a data file's path, an offset and a length), sorted,
    as runs lying one after the other in one file, at most the padding of a value to
    ``_ocdbt.VALUE_ALIGN`` apart: at most ``limit`` values and gaps between them in a run."""
    whole = sorted(whole, key=lambda w: (w[0], w[1]))
    i = 0
    while i < len(whole):
        j, end, used = i + 1, whole[i][1] + whole[i][2], 1
        while j < len(whole) and whole[j][0] == whole[i][0] \
                and 0 <= (gap := whole[j][1] - end) < _ocdbt.VALUE_ALIGN:
            used += 1 + (gap > 0)
            if used > limit:
                break
            end = whole[j][1] + whole[j][2]
            j += 1
        yield whole[i:j]
        i = j


#: Where :meth:`ItemReader._read_runs` reads the padding between values (never looked at).
_PADDING = memoryview(bytearray(_ocdbt.VALUE_ALIGN))


class ItemReader:
    """Reads an item's uncompressed zarr v2 arrays in OCDBT (what ckpt_async writes) without
    TensorStore's zarr driver, checking each chunk against its crc32 as it is read.

    In a local directory, the database's index (every key and where its value lies,
    :func:`_ocdbt.read_index`) is read once, and each array's chunks are read from the data
    files straight into the array's host buffer (``preadv``, in worker threads): any size,
    whoever wrote the database. Elsewhere (object stores), small arrays come from the kvstore,
    a batch's requests issued at once and waited for. Anything else (compressed arrays,
    missing chunks, zarr3) is left to the zarr driver (``open_array``)."""

    def __init__(self, item_dir: AnyPath, *, use_ocdbt: bool, use_zarr3: bool,
                 hint: _ocdbt.IndexHint | None = None) -> None:
        self.item_dir = item_dir
        self._hint = hint  # (from ``_CHECKSUMS``: where its writer put the B+tree)
        self.use_ocdbt = use_ocdbt
        self.use_zarr3 = use_zarr3
        self._index: dict[str, _ocdbt.Located] | None = None
        self._indexing: asyncio.Task[dict[str, _ocdbt.Located] | None] | None = None
        self._plans: dict[bytes, tuple[np.dtype, tuple[int, ...], tuple[int, ...]] | None] = {}
        # The plans of the larger arrays, made by read_small's planning, taken by local_plan
        # when the arrays are read one by one.
        self._planned: dict[str, LocalPlan] = {}
        #: Whether this restore reads its arrays past the page cache (:meth:`read_small`
        #: decides, from the bytes it restores).
        self.direct = False

    @functools.cached_property
    def ctx(self) -> ts.Context:
        """The TensorStore context of this item's TensorStore reads, made on first use."""
        return new_context()

    def start_index(self) -> asyncio.Future[dict[str, _ocdbt.Located] | None]:
        """Starts reading the index (once, in a worker thread), so that it is read while the
        caller plans the restore; :meth:`index` waits for it."""
        if self._indexing is None:  # (the arrays of a restore ask for it concurrently)
            async def read() -> dict[str, _ocdbt.Located] | None:
                if isinstance(self.item_dir, Path) and self.use_ocdbt and not self.use_zarr3:
                    with contextlib.suppress(ValueError):
                        self._index = await get_runtime().to_thread(
                            _ocdbt.read_index, self.item_dir, self._hint)
                return self._index

            self._indexing = asyncio.ensure_future(read())
            # (a restore that fails before it asks for the index leaves no unread error)
            self._indexing.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._indexing

    async def index(self) -> dict[str, _ocdbt.Located] | None:
        """The local database's index, read once; None where there is none to read (not a
        local directory, not OCDBT with zarr v2, or one TensorStore cannot read: the driver
        path then reports what is wrong)."""
        return await asyncio.shield(self.start_index())

    def _raw_plan(self, name: str, index: Mapping[str, _ocdbt.Located] | None
                  ) -> tuple[np.dtype, tuple[int, ...], tuple[int, ...]] | None:
        """dtype, shape and chunks of stored array ``name`` from its ``.zarray`` in ``index``,
        when it is uncompressed zarr v2; else None."""
        if index is None:
            return None
        meta = index.get(f"{stored_prefix(name, index)}.zarray")
        if not isinstance(meta, bytes):
            return None
        if meta not in self._plans:
            try:
                self._plans[meta] = _direct_plan(json.loads(meta), max_bytes=math.inf)
            except ValueError:
                self._plans[meta] = None
        return self._plans[meta]

    def local_plan(self, name: str) -> LocalPlan | None:
        """How to read stored array ``name`` from the local index (after :meth:`index`): None
        if it is not there as uncompressed zarr v2 with every chunk stored (a chunk never
        written holds the fill value: the driver path fills it in)."""
        if (planned := self._planned.pop(name, None)) is not None:
            return planned
        return self._plan_in(self._index, name)

    def _plan_in(self, index: Mapping[str, _ocdbt.Located] | None, name: str
                 ) -> LocalPlan | None:
        """:meth:`local_plan` from ``index`` (a local one, or an object store's)."""
        plan = self._raw_plan(name, index)
        if plan is None:
            return None
        assert index is not None
        dtype, shape, chunks = plan
        refs = []
        prefix = stored_prefix(name, index)
        for key, region in chunk_grid(shape, chunks):
            ref = index.get(f"{prefix}{key}")
            if ref is None:
                return None
            refs.append((key, region, ref))
        return dtype, shape, chunks, refs

    def _wants_direct(self, total_bytes: int, files: set[str]) -> bool:
        """Whether a restore of ``total_bytes`` of stored arrays from the local index, in data
        files ``files``, reads them past the page cache, on a local disk's file system: when
        less than half of the files is in the page cache (Linux ``cachestat``); where the
        kernel cannot tell, from DIRECT_IO_MIN_BYTES on (as a save of as many bytes writes
        them).

        A read through the page cache puts every byte into a page of the cache and then into
        the array's own. The benchmark machine's VM is slow at fresh pages, and its disk
        serves a few deep streams of aligned reads faster than buffered reads by several
        threads at once: cold restores, 12 each (quick workloads, interleaved processes),
        ``large`` (256 MiB in 16 arrays) 130 against 177 ms, ``mixed`` (178 MiB in 301)
        135 against 166 ms, ``many_small`` (32 MiB in 512) 42 against 60 ms; a cold read of
        4 GiB into fresh memory 1.68-1.76 against 0.91-1.06 GB/s. From the page cache,
        though, a copy is faster than reading the disk again (warm ``large`` 64-67 against
        129 ms)."""
        if not (isinstance(self.item_dir, Path)
                and storage.file_system_type(self.item_dir) in DIRECT_IO_FILE_SYSTEMS):
            return False
        cached = storage.cached_fraction(sorted(files))
        if cached is None:
            return total_bytes >= DIRECT_IO_MIN_BYTES
        return cached < 0.5

    def _read_batch(self, batch: list[tuple[str, LocalPlan]], buffers: list[np.ndarray],
                    expected: Callable[[str], dict[str, int] | None]) -> dict[str, np.ndarray]:
        """Blocks (a worker thread): reads the planned arrays of ``batch`` into ``buffers``
        (C-contiguous, of their shapes and dtypes), each chunk checked against
        ``expected(name)``; returns those read (the others are left to the driver path)."""
        out: dict[str, np.ndarray] = {}
        with _descriptors() as files:
            for (name, plan), buffer in self._read_runs(batch, buffers, expected, files, out):
                if self._read_chunks(name, plan, buffer, expected(name), files):
                    out[name] = buffer
        return out

    def _read_batch_direct(self, batch: list[tuple[str, LocalPlan]],
                           expected: Callable[[str], dict[str, int] | None]
                           ) -> dict[str, np.ndarray]:
        """:meth:`_read_batch` past the page cache: the arrays stored whole at offsets aligned
        to HOST_ALIGNMENT are read, each run of them lying one after the other in a data
        file with aligned reads, into a region of fresh memory laid out as the file is, and
        each becomes a view of its region (the region's other bytes, the padding between
        them and under DIRECT_ALIGN at either end, are left unused). The others are read
        through the page cache."""
        whole, rest = [], []
        for name, plan in batch:
            ref = _whole_ref(plan)
            if ref is not None and ref[1] % HOST_ALIGNMENT == 0:
                whole.append((*ref, name, plan))
            else:
                rest.append((name, plan))
        out: dict[str, np.ndarray] = {}
        with _descriptors() as files:
            for run in _adjacent_runs(whole, 2 * len(whole)):
                path, start, name = run[0][0], run[0][1], run[0][3]
                base = start - start % _ocdbt.DIRECT_ALIGN
                size = _ocdbt.round_up(run[-1][1] + run[-1][2] - base, _ocdbt.DIRECT_ALIGN)
                with allocating(self.item_dir, [w[3] for w in run], size):
                    region = _ocdbt.direct_region(size)
                spans = [(w[1] - base, w[1] - base + w[2]) for w in run]
                wanted = [(expected(w[3]) or {}).get(w[4][3][0][0]) for w in run]
                crcs = [0] * len(run) if any(c is not None for c in wanted) else None
                got = self._pread(path, name, _ocdbt.read_region,
                                  self._data_file(files, path, name, direct=True),
                                  region.data, base, spans, crcs, _ocdbt.DIRECT_READ_PIECE_BYTES)
                for k, ((begin, end), (_path, offset, n, name, plan)) in enumerate(
                        zip(spans, run, strict=True)):
                    if got < end:
                        raise self._short(path, name, n, offset)
                    if crcs is not None and wanted[k] is not None and crcs[k] != wanted[k]:
                        raise checksum_error(self.item_dir, name, [plan[3][0][0]])
                    out[name] = region[begin:end].view(plan[0]).reshape(plan[1])
        if rest:
            out.update(self._read_batch(rest, self._buffers(rest), expected))
        return out

    def _data_file(self, files: dict[tuple[str, bool], int], path: str, name: str,
                   direct: bool = False) -> int:
        """The descriptor of data file ``path`` (opened once per batch, in ``files``), with
        ``direct`` one reading past the page cache where the file system has that."""
        fd = files.get((path, direct))
        if fd is None:
            try:
                fd = _ocdbt.open_direct(path) if direct else None
                if fd is None:
                    fd = files.get((path, False))
                if fd is None:
                    fd = files[path, False] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(
                    f"{self.item_dir}: key {name!r}: data file {path} is missing") from exc
            except OSError as exc:
                raise self._unreadable(path, name, exc) from exc
            files[path, direct] = fd
        return fd

    def _buffers(self, batch: Sequence[tuple[str, Any]]) -> list[np.ndarray]:
        """:func:`host_buffers` for the arrays of ``batch`` (name, plan): no memory for them
        raises :class:`OutOfMemoryError` naming them (:func:`allocating`)."""
        specs = [(plan[1], plan[0]) for _name, plan in batch]
        with allocating(self.item_dir, [name for name, _plan in batch],
                        sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs)):
            return host_buffers(specs)

    def _short(self, path: str, name: str, length: int, offset: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.item_dir}: key {name!r}: data file {path} ends inside a chunk "
            f"({length} bytes from {offset})")

    def _unreadable(self, path: str, name: str, exc: OSError) -> UnreadableCheckpointError:
        return UnreadableCheckpointError(
            f"{self.item_dir}: key {name!r}: data file {path} cannot be read "
            f"({exc.strerror or exc})")

    def _pread(self, path: str, name: str, read: Callable[..., int], *args: Any) -> int:
        """``read(*args)`` (:func:`_ocdbt.read_into` or :func:`_ocdbt.read_region` of data file
        ``path``), an OS error of it (an I/O error, a directory in the file's place) raised
        naming the file and the key."""
        try:
            return read(*args)
        except OSError as exc:
            raise self._unreadable(path, name, exc) from exc

    def _read_chunks(self, name: str, plan: LocalPlan, out: np.ndarray,
                     sums: dict[str, int] | None, files: dict[tuple[str, bool], int]) -> bool:
        """Reads array ``name`` into ``out`` chunk by chunk, checking each against ``sums``.
        False: a chunk is not stored raw (its length is not a whole chunk's)."""
        dtype, shape, chunks, refs = plan
        whole = len(refs) == 1 and tuple(chunks) == shape
        n = math.prod(chunks) * dtype.itemsize  # (zarr stores edge chunks whole, padded)
        bad = []
        for key, region, ref in refs:
            dest = _ocdbt.as_bytes(out) if whole else memoryview(bytearray(n))
            expected = sums.get(key) if sums else None
            crcs = [0] if expected is not None else None
            if isinstance(ref, bytes):
                if len(ref) != n:
                    return False
                dest[:] = ref
                if crcs is not None:
                    crcs[0] = crc32(dest)
            else:
                path, offset, length = ref
                if length != n:
                    return False
                fd = self._data_file(files, path, name)
                if self._pread(path, name, _ocdbt.read_into, fd, [dest], offset, crcs) != n:
                    raise self._short(path, name, n, offset)
            if crcs is not None and crcs[0] != expected:
                bad.append(key)
            if not whole:
                block = np.frombuffer(dest, dtype).reshape(chunks)
                out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
        if bad:
            raise checksum_error(self.item_dir, name, bad)
        return True

    def _read_runs(self, batch: list[tuple[str, LocalPlan]], buffers: list[np.ndarray],
                   expected: Callable[[str], dict[str, int] | None],
                   files: dict[tuple[str, bool], int], out: dict[str, np.ndarray]
                   ) -> list[tuple[tuple[str, LocalPlan], np.ndarray]]:
        """Reads the arrays of ``batch`` stored as one chunk each, one after the other in a
        data file, with one ``preadv`` per run of adjacent chunks (up to IOV_MAX views of them
        and of the padding between them, :func:`_adjacent_runs`): few large reads where one
        per array would meet a cold disk at a queue depth of one. Returns the others, for
        :meth:`_read_chunks`."""
        rest = []
        # path, offset, length, array name, its buffer, the chunk's key
        whole: list[tuple[str, int, int, str, np.ndarray, str]] = []
        for (name, plan), buffer in zip(batch, buffers, strict=True):
            ref = _whole_ref(plan)
            if ref is not None:
                whole.append((*ref, name, buffer, plan[3][0][0]))
            else:
                rest.append(((name, plan), buffer))
        for run in _adjacent_runs(whole, _ocdbt.IOV_MAX):
            path, start = run[0][0], run[0][1]
            fd = self._data_file(files, path, run[0][3])
            wanted = [(expected(w[3]) or {}).get(w[5]) for w in run]
            views: list[memoryview] = []
            slots = []  # (where each array's view is among them)
            at = start
            for w in run:  # (and the padding between them, read into _PADDING)
                if w[1] > at:
                    views.append(_PADDING[:w[1] - at])
                slots.append(len(views))
                views.append(_ocdbt.as_bytes(w[4]))
                at = w[1] + w[2]
            crcs = [0] * len(views) if any(c is not None for c in wanted) else None
            got = self._pread(path, run[0][3], _ocdbt.read_into, fd, views, start, crcs)
            for (_path, offset, n, name, buffer, key), slot, want in zip(run, slots, wanted,
                                                                         strict=True):
                if got < offset - start + n:
                    raise self._short(path, name, n, offset)
                if crcs is not None and want is not None and crcs[slot] != want:
                    raise checksum_error(self.item_dir, name, [key])
                out[name] = buffer
        return rest

    async def read_array(self, name: str, plan: LocalPlan,
                         sums: dict[str, int] | None) -> np.ndarray | None:
        """Array ``name`` read as :meth:`local_plan` planned it, into an aligned buffer of its
        own (:func:`aligned_empty`; past the page cache, :meth:`_read_batch_direct`'s kind of
        region); None: left to the driver path. One stored as a single chunk of more than
        READ_SEGMENT_BYTES is read in segments by several threads at once.

        The buffer is not populated first (unlike host_buffer): the kernel faults the pages in
        as it copies. A warm restore of 16 arrays of 128 MiB took 6.3-7.0 s into populated
        buffers, 1.5-1.8 s into these; cold restores were the same either way."""
        dtype, shape, chunks, refs = plan
        nbytes = math.prod(shape) * dtype.itemsize
        ref = _whole_ref(plan)
        rt = get_runtime()
        direct = self.direct and ref is not None and ref[1] % HOST_ALIGNMENT == 0
        if ref is None or not (direct or nbytes > READ_SEGMENT_BYTES):
            def read() -> np.ndarray | None:
                with allocating(self.item_dir, [name], nbytes):
                    buffer = aligned_empty(shape, dtype)
                return self._read_batch([(name, plan)], [buffer], lambda _name: sums).get(name)

            return await rt.to_read_thread(read)
        path, offset, _length = ref
        key = refs[0][0]
        expected = sums.get(key) if sums else None
        with allocating(self.item_dir, [name], nbytes):
            if direct:  # (the region starts DIRECT_ALIGN-aligned in the file, as reads must)
                head = offset % _ocdbt.DIRECT_ALIGN
                region = _ocdbt.direct_region(_ocdbt.round_up(head + nbytes,
                                                              _ocdbt.DIRECT_ALIGN))
                buffer = region[head:head + nbytes].view(dtype).reshape(shape)
            else:
                head = 0
                buffer = aligned_empty(shape, dtype)
                region = buffer.reshape(-1).view(np.uint8)
        # Each segment: where it starts in the region, and the array's bytes in it.
        segments = [(start, (max(head - start, 0), min(head + nbytes - start, READ_SEGMENT_BYTES)))
                    for start in range(0, len(region), READ_SEGMENT_BYTES)]
        crcs = await asyncio.gather(*(
            rt.to_read_thread(self._read_segment, name, path,
                              region.data[start:start + READ_SEGMENT_BYTES],
                              offset - head + start, span, expected is not None, direct)
            for start, span in segments))
        if expected is not None:
            crc = crcs[0]
            for (_start, (begin, end)), part in zip(segments[1:], crcs[1:], strict=True):
                crc = _ocdbt.crc32_combine(crc, part, end - begin)
            if crc != expected:
                raise checksum_error(self.item_dir, name, [key])
        return buffer

    def _read_segment(self, name: str, path: str, part: memoryview, start: int,
                      span: tuple[int, int], checksum: bool, direct: bool) -> int:
        """Blocks (a worker thread): reads ``part`` from offset ``start`` of data file
        ``path``, through a descriptor of its own (the kernel reads ahead of each; with
        ``direct``, past the page cache); returns the crc32 of the array's bytes ``span`` of
        it if ``checksum``, else 0."""
        crcs = [0] if checksum else None
        with _descriptors() as files:
            fd = self._data_file(files, path, name, direct)
            piece = _ocdbt.DIRECT_READ_PIECE_BYTES if direct else _ocdbt.READ_PIECE_BYTES
            if self._pread(path, name, _ocdbt.read_region, fd, part, start, [span], crcs,
                           piece) < span[1]:
                raise self._short(path, name, span[1] - span[0], start + span[0])
        return crcs[0] if crcs is not None else 0

    async def read_small(self, names: list[str],
                         expected: Callable[[str], dict[str, int] | None] | None = None,
                         ) -> dict[str, np.ndarray]:
        """The arrays among ``names`` of at most DIRECT_READ_MAX_BYTES (on an object store,
        REMOTE_READ_MAX_BYTES) that are uncompressed zarr v2 chunks in OCDBT (what
        ckpt_async writes), read in batches; the others are left to :meth:`read_array` or the
        zarr driver.

        ``expected(name)``: the crc32 of each of the array's chunks (``_CHECKSUMS``), checked
        on the raw bytes as they arrive, in the reading thread (CorruptCheckpointError)."""
        if not (self.use_ocdbt and not self.use_zarr3 and names):
            return {}
        expected = expected or (lambda name: None)
        if await self.index() is not None:
            return await self._read_local(names, expected)
        return await self._read_direct(names, expected)

    async def layouts(self, names: Sequence[str]) -> dict[str, Layout]:
        """Shape, dtype and chunk shape of the stored arrays among ``names`` whose zarr v2
        ``.zarray`` lies inline in the database's index (local, else an object store's as
        :meth:`read_small` reads it), without opening each: the others (zarr3, not OCDBT, no
        such document in the index) are left to :func:`read_shape_dtype`."""
        if not (self.use_ocdbt and not self.use_zarr3 and names):
            return {}
        index = await self.index()
        if index is None:
            index = (await self._remote_index() or (None, None))[1]
        if not index:
            return {}

        def parse() -> dict[str, Layout]:
            out = {}
            for name in names:
                document = index.get(f"{stored_prefix(name, index)}.zarray")
                if isinstance(document, bytes) and (layout := zarray_layout(document)):
                    out[name] = layout
            return out

        return await get_runtime().to_thread(parse)

    async def _remote_index(self) -> tuple[ts.KvStore, dict[str, _ocdbt.Located]] | None:
        """The kvstore of an object store's item and its database's index (dumped by
        TensorStore); None where it cannot be dumped."""
        try:
            base = await ts.KvStore.open(kvstore_spec(self.item_dir, use_ocdbt=False,
                                                      write=False), context=self.ctx)
            index = await get_runtime().to_thread(_ocdbt.dumped_index, base)
        except ValueError:
            return None
        return (base, index) if index else None

    async def _read_local(self, names: list[str],
                          expected: Callable[[str], dict[str, int] | None],
                          ) -> dict[str, np.ndarray]:
        """Small arrays from the local index, in batches read concurrently, each batch into
        buffers carved from one region (:func:`host_buffers`). Decides :attr:`direct` from
        the bytes of all the arrays ``names`` (the larger ones :meth:`read_array` reads)."""
        def where(item: tuple[str, LocalPlan]) -> tuple[str, int]:
            ref = item[1][3][0][2] if item[1][3] else b""
            return (ref[0], ref[1]) if isinstance(ref, tuple) else ("", 0)

        def plan() -> list[list[tuple[str, LocalPlan]]]:
            small, total, files = [], 0, set[str]()
            for name in names:
                if (p := self.local_plan(name)) is None:
                    continue
                nbytes = math.prod(p[1]) * p[0].itemsize
                total += nbytes
                files.update(ref[0] for _key, _region, ref in p[3] if isinstance(ref, tuple))
                if nbytes <= DIRECT_READ_MAX_BYTES:
                    small.append((name, p))
                else:
                    self._planned[name] = p
            self.direct = self._wants_direct(total, files)
            # In the order they lie on disk (the names come in any order), so that a batch
            # reads whole stretches of its data files.
            return _read_batches(sorted(small, key=where), LOCAL_READ_BATCH_BYTES)

        def read(batch: list[tuple[str, LocalPlan]]) -> dict[str, np.ndarray]:
            if self.direct:
                return self._read_batch_direct(batch, expected)
            return self._read_batch(batch, self._buffers(batch), expected)

        rt = get_runtime()
        out: dict[str, np.ndarray] = {}
        for part in await asyncio.gather(*(rt.to_read_thread(read, b)
                                           for b in await rt.to_thread(plan) if b)):
            out.update(part)
        return out

    async def _read_direct(self, names: list[str],
                           expected: Callable[[str], dict[str, int] | None],
                           ) -> dict[str, np.ndarray]:
        """Small arrays from an object store: by the database's index, in few ranged reads
        (:meth:`_read_remote`); where TensorStore cannot dump that index, key by key."""
        if (remote := await self._remote_index()) is not None:
            return await self._read_remote(names, expected, *remote)
        try:
            kv = await ts.KvStore.open(kvstore_spec(self.item_dir, use_ocdbt=True, write=False),
                                       context=self.ctx)
        except ValueError:
            return {}  # let the driver path report what is wrong
        metas = [kv.read(f"{array_prefix(n)}.zarray") for n in names]

        def wait_metas() -> list[Any]:
            out = []
            for fut in metas:
                try:
                    value = fut.result().value
                    out.append(_direct_plan(json.loads(value)) if value else None)
                except (ValueError, json.JSONDecodeError):
                    out.append(None)
            return out

        plans = await get_runtime().to_thread(wait_metas)
        batches = _read_batches([(name, plan) for name, plan in zip(names, plans, strict=True)
                                 if plan is not None], DIRECT_READ_BATCH_BYTES)

        def issue(batch: list[tuple[str, Any]]) -> list[tuple[str, Any, dict[str, Any]]]:
            return [(name, plan, {k: kv.read(f"{array_prefix(name)}{k}")
                                  for k, _ in chunk_grid(plan[1], plan[2])})
                    for name, plan in batch]

        def wait_chunks(wanted: list[tuple[str, Any, dict[str, Any]]]) -> dict[str, np.ndarray]:
            out = {}
            buffers = self._buffers([(name, plan) for name, plan, _futs in wanted])
            for (name, plan, futs), buffer in zip(wanted, buffers, strict=True):
                try:
                    raw = {k: v for k, f in futs.items() if (v := f.result().value)}
                except ValueError:
                    continue
                futs.clear()  # (each chunk's bytes go as soon as its array is assembled)
                sums = expected(name)
                if sums:  # the bytes as read, here rather than on the engine loop
                    bad = [k for k, crc in sums.items() if k in raw and crc32(raw[k]) != crc]
                    if bad:
                        raise checksum_error(self.item_dir, name, bad)
                if _assemble(buffer, plan[2], raw):
                    out[name] = buffer
            return out

        out: dict[str, np.ndarray] = {}
        for batch in batches:
            # (reading the next batch while this one is checked and assembled gained nothing:
            # on 2 cores the reads, copies and checksums already take both)
            out.update(await get_runtime().to_thread(wait_chunks, issue(batch)))
        return out

    async def _read_remote(self, names: list[str],
                           expected: Callable[[str], dict[str, int] | None],
                           base: ts.KvStore, index: Mapping[str, _ocdbt.Located],
                           ) -> dict[str, np.ndarray]:
        """The arrays among ``names`` of up to REMOTE_READ_MAX_BYTES from the object store's
        database whose ``index`` (keys in ``base``) says where their chunks lie: each batch's
        chunks, one after the other in a few data files, in ranged reads of whole stretches
        (:func:`coalesced`), issued at once, the next REMOTE_READ_BATCHES - 1 batches' while
        this one's chunks are checked against ``expected`` and copied into their arrays. Arrays that are not raw
        zarr v2 chunks, every one stored, are left to the driver. (Against moto's S3 server,
        medians of 3: quick ``mixed`` 0.55 s in 75 requests against 1.10 s in 211 key by
        key, quick ``many_small`` 0.16 s in 25 against 2.12 s in 532.)"""
        def plan() -> list[list[tuple[str, LocalPlan]]]:
            small = []
            for name in names:
                p = self._plan_in(index, name)
                if p is not None and math.prod(p[1]) * p[0].itemsize <= REMOTE_READ_MAX_BYTES:
                    small.append((name, p))
            small.sort(key=lambda item: next(
                (ref for _k, _r, ref in item[1][3] if isinstance(ref, tuple)), ("", 0, 0)))
            return _read_batches(small, REMOTE_READ_BATCH_BYTES)

        def issue(batch: list[tuple[str, LocalPlan]]) -> tuple[
                list[tuple[str, int, int]], dict[tuple[str, int, int], int], list[Any]]:
            ranges, where = coalesced([ref for _name, p in batch for _k, _r, ref in p[3]
                                       if isinstance(ref, tuple)])
            return ranges, where, [base.read(path, byte_range=slice(start, end))
                                   for path, start, end in ranges]

        def wait(batch: list[tuple[str, LocalPlan]], ranges: list[tuple[str, int, int]],
                 where: dict[tuple[str, int, int], int], futs: list[Any],
                 ) -> dict[str, np.ndarray]:
            def users(i: int) -> str:  # (the arrays with chunks in range i)
                names = [name for name, p in batch
                         if any(isinstance(ref, tuple) and where[ref] == i for _k, _r, ref in p[3])]
                return f"key {names[0]!r}" + (f" (and {len(names) - 1} other arrays read "
                                              "with it)" if len(names) > 1 else "")

            got: list[memoryview | None] = []
            for i, (path, start, end) in enumerate(ranges):
                try:
                    result = futs[i].result()
                except ValueError as exc:  # (denied, out of range: TensorStore's error)
                    raise read_failure(f"{self.item_dir}: {users(i)}: data file {path} cannot "
                                       f"be read (bytes {start} to {end})", exc) from exc
                value = memoryview(result.value)
                futs[i] = None  # (TensorStore's copy of the bytes goes now, not with the batch)
                if result.state == "missing":
                    raise CorruptCheckpointError(
                        f"{self.item_dir}: {users(i)}: data file {path} is missing")
                if len(value) < end - start:
                    raise CorruptCheckpointError(
                        f"{self.item_dir}: {users(i)}: data file {path} ends at "
                        f"{start + len(value)}, inside the chunks stored up to {end}")
                got.append(value)
            last = {where[ref]: j for j, (_name, p) in enumerate(batch)
                    for _k, _r, ref in p[3] if isinstance(ref, tuple)}
            done_with: dict[int, list[int]] = {}  # (array -> the ranges it is the last user of)
            for i, j in last.items():
                done_with.setdefault(j, []).append(i)
            out = {}
            buffers = self._buffers(batch)
            for j, ((name, plan), buffer) in enumerate(zip(batch, buffers, strict=True)):
                if self._take_remote(name, plan, buffer, ranges, where, got, expected):
                    out[name] = buffer
                for i in done_with.get(j, ()):
                    got[i] = None  # (a range's bytes go once its last array has them)
            return out

        rt = get_runtime()
        out: dict[str, np.ndarray] = {}
        # (the batches being read while the oldest is checked and copied)
        held: collections.deque[tuple[Any, ...]] = collections.deque()
        for batch in await rt.to_thread(plan):
            if batch:
                held.append((batch, *issue(batch)))
            if len(held) >= REMOTE_READ_BATCHES:
                out.update(await rt.to_thread(wait, *held.popleft()))
        while held:
            out.update(await rt.to_thread(wait, *held.popleft()))
        return out

    def _take_remote(self, name: str, plan: LocalPlan, buffer: np.ndarray,
                     ranges: list[tuple[str, int, int]],
                     where: dict[tuple[str, int, int], int], got: list[memoryview | None],
                     expected: Callable[[str], dict[str, int] | None]) -> bool:
        """Fills ``buffer`` with array ``name``'s chunks out of the ranges read (``got``),
        each checked against ``expected``; False when they are not raw chunks (the driver
        reads it)."""
        dtype, _shape, chunks, refs = plan
        size = math.prod(chunks) * dtype.itemsize
        raw: dict[str, bytes | memoryview] = {}
        for key, _region, ref in refs:
            if isinstance(ref, tuple):
                i = where[ref]
                at = ref[1] - ranges[i][1]
                data = got[i]
                assert data is not None  # (released only after its last array)
                raw[key] = data[at:at + ref[2]]
            else:
                raw[key] = ref
        if any(len(v) != size for v in raw.values()):
            return False
        sums = expected(name)
        if sums:
            bad = [k for k, crc in sums.items() if k in raw and crc32(raw[k]) != crc]
            if bad:
                raise checksum_error(self.item_dir, name, bad)
        return _assemble(buffer, chunks, raw)


#: A restore from an object store reads the chunks of small arrays in ranges that take in the
#: bytes between two chunks up to this many (a request costs more than reading as many bytes:
#: tens of milliseconds to its first byte on S3) ...
REMOTE_READ_GAP_BYTES = 1 << 20
#: ... and stop at this many bytes, so that a batch's ranges are read by several requests at
#: once ...
REMOTE_READ_RANGE_BYTES = 4 << 20
#: ... for the arrays of up to this many bytes (larger ones are read by the zarr driver,
#: which holds more: quick ``mixed`` from moto's S3 server peaked at 1.16-1.26x the restored
#: size key by key, 1.13-1.14x with these read so) ...
REMOTE_READ_MAX_BYTES = 8 << 20
#: ... in batches of about this many bytes ...
REMOTE_READ_BATCH_BYTES = 8 << 20
#: ... this many at a time (the others read while the oldest is checked and copied). With two,
#: full ``many_small`` (256 MiB in 4,096 arrays) from moto's S3 server peaked at 1.08-1.13x
#: the restored size (1.13x with two batches of 16 MiB in ranges of 8 MiB; 1.05x key by key).
#: With four, quick ``mixed`` from fake-gcs-server, each request held 20 ms as a real store's
#: latency would: 0.53-0.62 s against 0.65-0.69 s with two, at 1.20-1.24x against
#: 1.17-1.21x the restored size; on loopback 0.19-0.20 s against 0.21-0.22 s, 1.11x against
#: 1.10x (in-process, 3 each). Ranges of 2 MiB, for more requests at once, did not help.
REMOTE_READ_BATCHES = 4


def coalesced(refs: Iterable[tuple[str, int, int]], gap: int | None = None,
              most: int | None = None,
              ) -> tuple[list[tuple[str, int, int]], dict[tuple[str, int, int], int]]:
    """Byte ranges ``(path, start, end)`` of data files covering ``refs`` (path, offset,
    length), each taking in gaps of up to ``gap`` bytes (REMOTE_READ_GAP_BYTES) and spanning
    at most ``most`` (REMOTE_READ_RANGE_BYTES) unless one ref is larger; and the index of
    the range holding each ref."""
    gap = REMOTE_READ_GAP_BYTES if gap is None else gap
    most = REMOTE_READ_RANGE_BYTES if most is None else most
    ranges: list[tuple[str, int, int]] = []
    where: dict[tuple[str, int, int], int] = {}
    for ref in sorted(set(refs)):
        path, offset, length = ref
        if ranges:
            last_path, start, end = ranges[-1]
            if (last_path == path and offset - end <= gap
                    and max(end, offset + length) - start <= most):
                ranges[-1] = (path, start, max(end, offset + length))
                where[ref] = len(ranges) - 1
                continue
        ranges.append((path, offset, offset + length))
        where[ref] = len(ranges) - 1
    return ranges, where


def crc32_of(arr: np.ndarray) -> int:
    """crc32 of an array's bytes in C order (as its zarr chunk holds them)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return crc32(flat.data)


def chunk_checksums(arr: np.ndarray, chunks: tuple[int, ...]) -> dict[str, int]:
    """crc32 of every chunk of a whole array, keyed like the stored chunks."""
    return {key: crc32_of(arr[region]) for key, region in chunk_grid(arr.shape, chunks)}


async def read_shape_dtype(
    ctx: ts.Context, item_dir: AnyPath, name: str, *, use_ocdbt: bool, use_zarr3: bool
) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
    """Shape, dtype and chunk shape of a stored array, without reading its data."""
    store = await open_array(ctx, item_dir, name, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    chunks = tuple(int(c or 0) for c in (store.chunk_layout.read_chunk.shape or store.shape))
    return tuple(store.shape), np.dtype(store.dtype.numpy_dtype), chunks


# --- shardings, as Orbax writes them into ``_sharding`` -----------------------------------------
def shard_shape(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[int]:
    """The shape of each of an array's shards (a single device's: the array's own, without
    jax's cache of every sharding and shape, whose key costs a Python ``__eq__`` per array)."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return list(shape)
    return list(sharding.shard_shape(shape))


def check_sharding(where: AnyPath | str, name: str | None, shape: tuple[int, ...],
                   sharding: jax.sharding.Sharding | None) -> None:
    """``ShardingMismatchError`` unless ``sharding`` splits ``shape`` evenly: a restore's
    placement raised jax's ``IndivisibleError``, naming no leaf (kept as the ``__cause__``).
    ``name`` None: ``where`` names the array alone."""
    if sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return
    try:
        sharding.shard_shape(shape)
    except ValueError as exc:
        what = f"key {name!r} of shape {shape}" if name is not None else f"shape {shape}"
        raise ShardingMismatchError(
            f"{where}: {what}: the sharding the restore asks for does not split it evenly "
            f"({exc})") from exc


def sharding_to_json(sharding: jax.sharding.Sharding) -> str | None:
    """The ``_sharding`` entry of an array placed by ``sharding`` (Orbax's JSON), or None for a
    kind of sharding it has none for. Made once per device or named sharding: a save asks for
    it per array, and a mesh's is a walk over every device of it."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        (device,) = sharding.device_set
        return _single_device_json(device)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return _named_sharding_json(sharding)
    return None


@functools.lru_cache(maxsize=1024)
def _single_device_json(device: jax.Device) -> str:
    return json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": str(device)})


@functools.lru_cache(maxsize=1024)
def _named_sharding_json(sharding: jax.sharding.NamedSharding) -> str:
    mesh = sharding.mesh
    return json.dumps(
        {
            "sharding_type": "NamedSharding",
            "shape": [int(s) for s in mesh.devices.shape],
            "axis_names": list(mesh.axis_names),
            "axis_types": [str(t) for t in mesh.axis_types],  # ("AxisType.Explicit", as Orbax)
            "partition_spec": [list(p) if isinstance(p, tuple) else p for p in sharding.spec],
            "device_mesh": {
                "mesh": jax.tree.map(lambda d: {"id": d.id}, mesh.devices.tolist())
            },
        }
    )


@functools.lru_cache(maxsize=1024)  # one text per sharding; not one parse per array
def sharding_from_json(text: str) -> jax.sharding.Sharding | None:
    """The sharding a ``_sharding`` entry describes, or None when this process lacks its devices."""
    data = json.loads(text)
    if data.get("sharding_type") == "SingleDeviceSharding":
        dev = device_named(str(data.get("device_str", "")))
        return jax.sharding.SingleDeviceSharding(dev) if dev is not None else None
    if data.get("sharding_type") == "NamedSharding":
        ids = mesh_ids(data)
        if ids is None:
            return None
        try:
            mesh = mesh_of(ids, tuple(data["shape"]), data["axis_names"],
                           axis_types_from_json(data.get("axis_types")))
        except ValueError:
            return None
        spec = jax.sharding.PartitionSpec(
            *[tuple(p) if isinstance(p, list) else p for p in data["partition_spec"]]
        )
        return jax.sharding.NamedSharding(mesh, spec)
    return None


def mesh_ids(data: Mapping[str, Any]) -> Any:
    """The device ids of a ``_sharding`` entry's mesh, nested as the mesh; None if it has
    none."""
    mesh = (data.get("device_mesh") or {}).get("mesh")
    return None if mesh is None else jax.tree.map(lambda d: d["id"], mesh,
                                                  is_leaf=lambda x: isinstance(x, dict))


def device_named(name: str) -> jax.Device | None:
    """This process's device that a ``_sharding`` entry names (``cpu:3``, or jax's older
    ``TFRT_CPU_3``), if it has it."""
    name = name.replace("TFRT_CPU_", "cpu:")
    return next((d for d in jax.devices() if str(d) == name), None)


def mesh_of(ids: Any, shape: tuple[int, ...], axis_names: Sequence[str],
            axis_types: tuple[jax.sharding.AxisType, ...] | None) -> jax.sharding.Mesh:
    """The mesh of this process's devices with ids ``ids`` (nested as the mesh; None:
    ``jax.devices()`` in order); ``ValueError`` naming those it lacks."""
    if ids is None:
        devices = np.array(jax.devices(), dtype=object)
    else:
        by_id = {d.id: d for d in jax.devices()}
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        if missing := [i for i in flat if i not in by_id]:
            raise InvalidArgumentError(f"devices {missing} of the saved mesh are not in this "
                                       "process")
        devices = np.array([by_id[i] for i in flat], dtype=object)
    return jax.sharding.Mesh(devices.reshape(shape), tuple(axis_names), axis_types=axis_types)


#: jax's axis types by the names a ``_sharding`` entry gives them ("AxisType.Explicit").
_AXIS_TYPES = {str(t): t for t in jax.sharding.AxisType}


def axis_types_from_json(names: list[str] | None) -> tuple[jax.sharding.AxisType, ...] | None:
    """A mesh's axis types as a ``_sharding`` entry names them; None (jax's default) when it
    names none, or one this jax does not know."""
    if not names or any(n not in _AXIS_TYPES for n in names):
        return None
    return tuple(_AXIS_TYPES[n] for n in names)
