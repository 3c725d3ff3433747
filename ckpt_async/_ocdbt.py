"""Writes an OCDBT database on a local filesystem without TensorStore's writer.

TensorStore's OCDBT writer takes each value as a Python ``bytes`` object: for every array one
copy into ``bytes``, a second into TensorStore's buffers, a Python call per key, then the
kernel's copy into the page cache. Here the values go from the arrays' own host buffers to the
kernel (``writev`` calls of 1 MiB), in a worker thread without the GIL; this module then
encodes the B+tree over them itself (TensorStore's documented format, ``kvstore/ocdbt``
"Storage format") and has TensorStore encode the manifest (``ts.ocdbt.undump_manifest``).
TensorStore and Orbax read the result like any database TensorStore wrote: one version whose
B+tree holds every key; small values (the ``.zarray`` documents) inline in its leaves, the
chunks in ``d/<random id>`` data files, one per batch.

See :class:`DatabaseWriter` for the order of its calls. :func:`read_index` gives a restore
every key's value or location: for a database written here (located by its
:class:`IndexHint`) decoded here, for any other from TensorStore's dump of its nodes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np
import tensorstore as ts

from ._crc import crc32
from ._storage import start_writeback
from .errors import StepAlreadyExistsError, UnreadableCheckpointError

#: The database's manifest, at the root of an item: its presence says an item is in OCDBT.
MANIFEST = "manifest.ocdbt"

log = logging.getLogger("ckpt_async")

#: The configuration TensorStore gives a database it creates from ``_serialize.kvstore_spec``
#: (which later writers, such as a merge, assume without reading it).
MAX_INLINE_VALUE_BYTES = 1024
#: Every value in a data file this module writes starts at a multiple of this many bytes
#: (zero bytes pad the one before it): an array read straight from the file into memory laid
#: out as the file is (a restore past the page cache, ``_serialize.ItemReader``) then starts
#: where jax adopts a host buffer without copying it. Any OCDBT reader reads a value by its
#: offset and length alone.
VALUE_ALIGN = 64
MAX_DECODED_NODE_BYTES = 1_000_000
_VERSION_TREE_ARITY_LOG2 = 4
_BTREE_MAGIC = 0x0CDB20DE
#: Nodes are cut at about this many decoded bytes, safely below the configured limit (an
#: entry's size is estimated from above).
_NODE_BYTES = 900_000
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024


# -- CRC-32C (Castagnoli), the checksum of every node ----------------------------------------
def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_TABLE = _crc_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _word_tables() -> tuple[np.ndarray, ...]:
    """Slicing-by-4 tables: entry ``i`` of table ``k`` is the register after byte ``i``
    followed by ``k`` zero bytes (table 0 is the byte table)."""
    tables = [_TABLE]
    for _ in range(3):
        prev = tables[-1]
        tables.append(((prev >> 8) ^ _TABLE[prev & 0xFF]).astype(np.uint32))
    return tuple(tables)


def _half_tables() -> tuple[np.ndarray, np.ndarray]:
    """The register after one 32-bit word, by its low and its high 16 bits (two lookups a word
    rather than four: 0.31 against 1.15 ms for a node of 96 KB)."""
    t0, t1, t2, t3 = _word_tables()
    x = np.arange(1 << 16, dtype=np.uint32)
    return t3[x & 0xFF] ^ t2[x >> 8], t1[x & 0xFF] ^ t0[x >> 8]


_HALF_TABLES = _half_tables()


@functools.lru_cache(maxsize=64)
def _shift(log2_bytes: int) -> tuple[np.ndarray, ...]:
    """Tables applying ``2**log2_bytes`` zero bytes to a CRC register (a linear map, one table
    per register byte): ``_apply(_shift(k), r)`` is the register after those bytes."""
    if log2_bytes == 0:
        b = np.arange(256, dtype=np.uint32)
        return tuple((_TABLE[(b << (8 * j)) & 0xFF] ^ ((b << (8 * j)) >> 8)).astype(np.uint32)
                     for j in range(4))
    half = _shift(log2_bytes - 1)
    return tuple(_apply(half, t) for t in half)


@functools.cache
def _zeros(nbytes: int) -> tuple[np.ndarray, ...]:
    """Tables applying ``nbytes`` (> 0) zero bytes (:func:`_shift` for each bit of it)."""
    low = nbytes & -nbytes
    if low == nbytes:
        return _shift(low.bit_length() - 1)
    then = _shift(low.bit_length() - 1)
    return tuple(_apply(then, t) for t in _zeros(nbytes - low))


def _apply(tables: tuple[np.ndarray, ...], r: np.ndarray) -> np.ndarray:
    t0, t1, t2, t3 = tables
    return t0[r & 0xFF] ^ t1[(r >> 8) & 0xFF] ^ t2[(r >> 16) & 0xFF] ^ t3[r >> 24]


#: Bytes per block of :func:`crc32c`: a multiple of _BLOCK_STEP from _MIN_BLOCK to twice that.
_MIN_BLOCK, _BLOCK_STEP = 32, 8
# Made at import (~3 ms) rather than on a process's first B+tree of more than a few KB, whose
# save would otherwise wait for them: the shift of every block size times every power of two
# up to the largest node.
for _width in range(_MIN_BLOCK, 2 * _MIN_BLOCK + 1, _BLOCK_STEP):
    for _level in range((MAX_DECODED_NODE_BYTES * 2 // _MIN_BLOCK).bit_length()):
        _zeros(_width << _level)
del _width, _level


_V = TypeVar("_V")


def _by_powers(value: _V, nbytes: int, step: Callable[[int, _V], _V]) -> _V:
    """``value`` after ``nbytes`` zero bytes, given ``step(k, value)``, which applies
    ``2**k`` of them."""
    k = 0
    while nbytes:
        if nbytes & 1:
            value = step(k, value)
        nbytes >>= 1
        k += 1
    return value


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (as ``google_crc32c`` / absl compute it)."""
    n = len(data)
    if n < 8 * _MIN_BLOCK:
        r, table = 0xFFFFFFFF, _TABLE_LIST
        for b in data:
            r = table[(r ^ b) & 0xFF] ^ (r >> 8)
        return r ^ 0xFFFFFFFF
    # The data, behind zero bytes, as 2**k blocks of `width` bytes, whose registers are
    # computed at once, a 32-bit word a step (one numpy step per word column), then combined
    # pairwise: crc(A + B) = zeros(len(B)) applied to crc(A), xor crc(B). The register starts
    # at 0, so the leading zero bytes leave it there, and the standard initial register
    # (0xFFFFFFFF) is the data's first four bytes inverted.
    k = (n // _MIN_BLOCK).bit_length() - 1
    width = -(-n // (_BLOCK_STEP << k)) * _BLOCK_STEP
    pad = (width << k) - n
    buf = np.empty(width << k, np.uint8)
    buf[:pad] = 0
    buf[pad:] = np.frombuffer(data, np.uint8)
    buf[pad:pad + 4] ^= 0xFF
    words = np.ascontiguousarray(buf.view("<u4").reshape(1 << k, width // 4).T)
    low, high = _HALF_TABLES
    reg = np.zeros(1 << k, dtype=np.uint32)
    for word in words:
        reg ^= word
        reg = np.take(low, reg & 0xFFFF) ^ np.take(high, reg >> 16)
    span = width
    while len(reg) > 1:
        reg = _apply(_zeros(span), reg[0::2]) ^ reg[1::2]
        span *= 2
    return int(reg[0]) ^ 0xFFFFFFFF


# -- CRC-32 (zlib's), the checksum of array chunks (``_CHECKSUMS``) ----------------------------
def _gf2_apply(matrix: list[int], vector: int) -> int:
    """A 32x32 matrix over GF(2), given by its columns, applied to a 32-bit vector."""
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


@functools.cache
def _crc32_zeros(log2_bytes: int) -> list[int]:
    """The linear map that ``2**log2_bytes`` zero bytes apply to a CRC-32 register (zlib's
    reflected polynomial), as its 32 columns."""
    if log2_bytes == 0:
        op = [0xEDB88320] + [1 << i for i in range(31)]  # one zero bit
        for _ in range(3):
            op = [_gf2_apply(op, column) for column in op]
        return op
    half = _crc32_zeros(log2_bytes - 1)
    return [_gf2_apply(half, column) for column in half]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``crc32(a + b)`` from ``crc1 = crc32(a)``, ``crc2 = crc32(b)`` and
    ``len2 = len(b)`` (zlib's ``crc32_combine``, which Python's zlib does not offer)."""
    return _by_powers(crc1, len2, lambda k, crc: _gf2_apply(_crc32_zeros(k), crc)) ^ crc2


# -- encoding ---------------------------------------------------------------------------------
def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [_encode_varint(n) for n in range(1 << 14)]


def _varint(n: int) -> bytes:
    """``n`` as an unsigned LEB128 varint."""
    return _SMALL_VARINTS[n] if n < 16384 else _encode_varint(n)


def _varints(values: Sequence[int] | np.ndarray) -> bytes:
    """Each of ``values`` (non-negative, below 2**64) as an unsigned LEB128 varint, back to
    back: a B+tree node's columns, encoded column-wise with numpy (not value by value)."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    if int(v.max()) < 0x80:
        return v.astype(np.uint8).tobytes()
    groups = [v >> np.uint64(7 * j) for j in range(10)]
    count = np.ones(len(v), np.int64)  # bytes per value
    for g in groups[1:]:
        count += g != 0
    width = int(count.max())
    out = np.empty((len(v), width), np.uint8)
    for j in range(width):
        more = np.where(count > j + 1, 0x80, 0).astype(np.uint8)
        out[:, j] = (groups[j] & np.uint64(0x7F)).astype(np.uint8) | more
    return out[np.arange(width) < count[:, None]].tobytes()


def _prefix_lengths(keys: Sequence[bytes], lens: np.ndarray) -> np.ndarray:
    """The length of the common prefix of each key with the one before it (0 for the first);
    ``lens``: the keys' lengths."""
    n = len(keys)
    out = np.zeros(n, np.int64)
    if n > 1:
        width = max(1, int(lens.max()))
        grid = np.frombuffer(b"".join([k.ljust(width, b"\0") for k in keys]),
                             np.uint8).reshape(n, width)
        differ = grid[1:] != grid[:-1]
        first = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
        # (padding matches padding: a prefix never runs past the shorter key)
        out[1:] = np.minimum(first, np.minimum(lens[1:], lens[:-1]))
    return out


def _key_columns(keys: Sequence[bytes], lens: np.ndarray | None = None) -> list[bytes]:
    """``key_prefix_length`` (after the first), ``key_suffix_length`` and the suffixes;
    ``lens``: the keys' lengths, where known."""
    if lens is None:
        lens = np.fromiter(map(len, keys), np.int64, len(keys))
    prefixes = _prefix_lengths(keys, lens)
    return [_varints(prefixes[1:]), _varints(lens - prefixes),
            b"".join([k[p:] for k, p in zip(keys, prefixes.tolist())])]


def _file_table(files: list[str]) -> tuple[bytes, dict[str, int]]:
    """A node's data file table and each file's index in it. A file's base path is what
    precedes its ``d/<id>`` (``ocdbt.process_0/``, as in Orbax's merged databases; else
    empty)."""
    files = sorted(set(files))
    paths = [f.encode() for f in files]
    prefix_lengths, suffix_lengths, suffixes = _key_columns(paths)
    table = b"".join([_varint(len(paths)), prefix_lengths, suffix_lengths,
                      _varints([f.rindex("d/") for f in files]), suffixes])
    return table, {f: i for i, f in enumerate(files)}


def _node(height: int, body: bytes) -> bytes:
    """An encoded B+tree node: header, uncompressed body, CRC-32C of everything before it."""
    payload = _varint(0) + _varint(0) + bytes([height]) + body  # version 0, uncompressed
    head = struct.pack(">I", _BTREE_MAGIC) + struct.pack("<Q", 12 + len(payload) + 4)
    data = head + payload
    return data + struct.pack("<I", crc32c(data))


#: A leaf entry's value: inline bytes, or (data file, offset, length).
Value = bytes | tuple[str, int, int]


@dataclass
class _Entries:
    """Sorted B+tree entries as columns, each computed once for every leaf node cut from
    them (entry by entry in Python, they were most of a large tree's encoding)."""

    keys: list[bytes]
    values: list[Value]
    key_lengths: np.ndarray
    inline: np.ndarray  # bool: the value is inline bytes
    #: Each value's length: of its bytes inline, else of its range in a data file.
    value_lengths: np.ndarray

    @classmethod
    def of(cls, entries: Sequence[tuple[bytes, Value]]) -> _Entries:
        keys = [k for k, _ in entries]
        values = [v for _, v in entries]
        inline = np.fromiter([type(v) is bytes for v in values], bool, len(values))
        lengths = np.fromiter([len(v) if type(v) is bytes else v[2] for v in values], np.int64,
                              len(values))
        return cls(keys, values, np.fromiter(map(len, keys), np.int64, len(keys)), inline,
                   lengths)

    def cut(self, start: int, stop: int) -> _Entries:
        return _Entries(self.keys[start:stop], self.values[start:stop],
                        self.key_lengths[start:stop], self.inline[start:stop],
                        self.value_lengths[start:stop])


def encode_leaf(cols: _Entries) -> bytes:
    values = cols.values
    inline = [v for v in values if isinstance(v, bytes)]
    indirect = [v for v in values if not isinstance(v, bytes)]
    table, index = _file_table([v[0] for v in indirect])
    files = ([0] * len(indirect) if len(index) == 1 else [index[v[0]] for v in indirect])
    return _node(0, b"".join([
        table, _varint(len(values)), *_key_columns(cols.keys, cols.key_lengths),
        _varints(cols.value_lengths),
        (~cols.inline).astype(np.uint8).tobytes(),  # 0: inline, 1: in a data file
        _varints(files),
        _varints([v[1] for v in indirect]),
        *inline,
    ]))


@dataclass(frozen=True)
class _Child:
    """A node as its parent references it: its first key, (data file, offset, length), and the
    statistics of its subtree."""

    key: bytes
    where: tuple[str, int, int]
    keys: int
    tree_bytes: int
    indirect_bytes: int


def encode_interior(height: int, children: Sequence[_Child]) -> bytes:
    # (every child's keys are stored whole: no subtree common prefix is taken out)
    table, index = _file_table([c.where[0] for c in children])
    prefix_lengths, suffix_lengths, suffixes = _key_columns([c.key for c in children])
    return _node(height, b"".join([
        table, _varint(len(children)), prefix_lengths, suffix_lengths,
        _varints([0] * len(children)),  # subtree_common_prefix_length
        suffixes,
        _varints([index[c.where[0]] for c in children]),
        _varints([c.where[1] for c in children]),
        _varints([c.where[2] for c in children]),
        _varints([c.keys for c in children]),
        _varints([c.tree_bytes for c in children]),
        _varints([c.indirect_bytes for c in children]),
    ]))


def _leaf_groups(cols: _Entries) -> list[tuple[int, int]]:
    """Where to cut entries into leaves of at most _NODE_BYTES (estimated; at least one
    entry): each leaf's (start, stop)."""
    ends = np.cumsum(cols.key_lengths + 40 + np.where(cols.inline, cols.value_lengths, 0))
    groups, start = [], 0
    while start < len(ends):
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _NODE_BYTES, side="right")))
        groups.append((start, stop))
        start = stop
    return groups


def encode_tree(entries: list[tuple[bytes, Value]], node_file: str
                ) -> tuple[bytes, _Child, int]:
    """Every node of a B+tree over ``entries`` (sorted, unique keys; at least one), as the
    bytes of ``node_file`` (children first), the root's reference and its height."""
    cols = _Entries.of(entries)
    indirect_ends = np.cumsum(np.where(cols.inline, 0, cols.value_lengths))
    out = bytearray()
    level: list[_Child] = []
    for start, stop in _leaf_groups(cols):
        node = encode_leaf(cols.cut(start, stop))
        indirect = int(indirect_ends[stop - 1]) - (int(indirect_ends[start - 1]) if start else 0)
        level.append(_Child(cols.keys[start], (node_file, len(out), len(node)), stop - start,
                            len(node), indirect))
        out += node
    height = 0
    while len(level) > 1:
        height += 1
        per_node = max(2, _NODE_BYTES // (80 + max(len(c.key) for c in level)))
        parents = []
        for i in range(0, len(level), per_node):
            children = level[i:i + per_node]
            node = encode_interior(height, children)
            parents.append(_Child(children[0].key, (node_file, len(out), len(node)),
                                  sum(c.keys for c in children),
                                  len(node) + sum(c.tree_bytes for c in children),
                                  sum(c.indirect_bytes for c in children)))
            out += node
        level = parents
    return bytes(out), level[0], height


def manifest(root: _Child, height: int, db_uuid: str) -> bytes:
    """The encoded manifest of a database with one version (generation 1) rooted at ``root``."""
    return ts.ocdbt.undump_manifest({
        "config": {"compression": {"id": "zstd"},
                   "max_decoded_node_bytes": MAX_DECODED_NODE_BYTES,
                   "max_inline_value_bytes": MAX_INLINE_VALUE_BYTES,
                   "uuid": db_uuid, "version_tree_arity_log2": _VERSION_TREE_ARITY_LOG2},
        "version_tree_nodes": [],
        "versions": [{
            "commit_time": time.time_ns(), "generation_number": 1, "root_height": height,
            "root": {"location": "btreenode::{}:{}:{}".format(*root.where),
                     "statistics": {"num_keys": root.keys, "num_tree_bytes": root.tree_bytes,
                                    "num_indirect_value_bytes": root.indirect_bytes}},
        }],
    })


# -- the writer -------------------------------------------------------------------------------
def _new_file(base: str = "") -> str:
    return f"{base}d/{os.urandom(16).hex()}"


#: Bytes handed to the kernel per ``writev``: between calls a background writer returns to
#: user space, where the scheduler may run the training loop's threads instead.
WRITE_PIECE_BYTES = 1 << 20
#: A data file's writeback is started each time this many more bytes are in the page cache,
#: so the disk starts on a file while the rest of it is copied (rather than once it is whole:
#: in-process medians of 12 interleaved durable saves, quick ``many_small`` 43 against 49 ms,
#: quick ``mixed`` 110 against 120 ms, quick ``large`` 110 against 120 ms).
WRITEBACK_STEP_BYTES = 2 << 20


def _pieces(buffers: Sequence[memoryview | bytes], piece: int | None = None
            ) -> Iterator[tuple[list[memoryview], list[int]]]:
    """``buffers`` as lists of views of about ``piece`` bytes (``WRITE_PIECE_BYTES`` by
    default; at most ``IOV_MAX`` views), each with the index in ``buffers`` of every view's
    buffer."""
    piece = piece or WRITE_PIECE_BYTES
    group: list[memoryview] = []
    owners: list[int] = []
    size = 0
    for i, b in enumerate(buffers):
        view = memoryview(b).cast("B")
        for start in range(0, len(view), piece):
            part = view[start:start + piece]
            group.append(part)
            owners.append(i)
            size += len(part)
            if size >= piece or len(group) == IOV_MAX:
                yield group, owners
                group, owners, size = [], [], 0
    if group:
        yield group, owners


def _write_all(fd: int, group: list[memoryview]) -> int:
    """Writes ``group`` at ``fd``'s position (one ``writev``, then after a short write the
    rest view by view); returns the bytes written."""
    done = total = os.writev(fd, group)
    for view in group:
        if done >= len(view):
            done -= len(view)
            continue
        view = view[done:]
        done = 0
        while view:
            n = os.write(fd, view)
            view = view[n:]
            total += n
    return total


#: Bytes of a data file written per ``O_DIRECT`` write (see :func:`_write_direct`), staged
#: in a buffer of this size per writer thread.
DIRECT_PIECE_BYTES = 4 << 20
#: Alignment of the file offsets, lengths and memory of ``O_DIRECT`` writes (the largest
#: logical block size in common use).
DIRECT_ALIGN = 4096


#: A save through the page cache that could go past it (:class:`DatabaseWriter`'s
#: ``watch``) times its copies into the page cache by the writing threads' CPU time: finding
#: and filling fresh pages, not waiting for the disk. Once WATCH_BYTES of them in a row ran
#: slower than PAGE_CACHE_MIN_RATE bytes a second, the rest of the save goes past the page
#: cache: the ranges being written from their next piece on, every later batch in a file of
#: its own. On the benchmark machine the copies run at 3-6 GB/s, and at 0.3 GB/s right after
#: another process wrote gigabytes and freed its memory: a 2 GiB save then took 1.9-3.9 s
#: to a durable commit through the page cache and 0.94-1.04 s past it (3 pairs, each after
#: the benchmark's measurement of the disk's limits).
WATCH_BYTES = 16 << 20
PAGE_CACHE_MIN_RATE = 1e9


class _Watch:
    """The pace of one save's copies into the page cache (see WATCH_BYTES): :attr:`slow`
    once a window of them was slow, for the rest of the save."""

    __slots__ = ("slow", "_bytes", "_cpu", "_lock", "_on_slow")

    def __init__(self, on_slow: Callable[[int, float], None]) -> None:
        self.slow = False
        self._bytes, self._cpu = 0, 0.0
        self._lock = threading.Lock()
        self._on_slow = on_slow

    def sample(self, nbytes: int, cpu_s: float) -> None:
        """``nbytes`` went into the page cache in ``cpu_s`` seconds of a thread's CPU time."""
        with self._lock:
            self._bytes += nbytes
            self._cpu += cpu_s
            if self._bytes < WATCH_BYTES:
                return
            window, cpu = self._bytes, self._cpu
            self._bytes, self._cpu = 0, 0.0
            went_slow = not self.slow and window < PAGE_CACHE_MIN_RATE * cpu
            self.slow = self.slow or went_slow
        if went_slow:
            self._on_slow(window, cpu)


def round_up(n: int, step: int) -> int:
    """``n`` rounded up to a multiple of ``step``."""
    return -(-n // step) * step


def round_down(n: int, step: int) -> int:
    """``n`` rounded down to a multiple of ``step``."""
    return n // step * step


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_SHARED_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
_bounce = threading.local()


#: ``relocate(rest)``: asked after each piece of a data file whether its other pieces go on in
#: another thread (see :func:`_drive`).
Relocate = Callable[[Callable[[], None]], bool]


def _drive(steps: Iterator[None], relocate: Relocate | None) -> None:
    """Runs ``steps`` (a generator that writes one piece of a file per step) to its end. After
    each piece, ``relocate(rest)`` may take the rest: it runs ``rest`` in another thread
    (never lowered: ``Runtime.run_raised``), waits for it and says True. (The generator then
    goes on there, with its staging buffer, whose thread waits.)"""
    for _ in steps:
        if relocate is not None and relocate(functools.partial(_drain, steps)):
            return


def _drain(steps: Iterator[None]) -> None:
    for _ in steps:
        pass


def _bounce_buffer() -> np.ndarray:
    """This thread's page-aligned staging buffer for ``O_DIRECT`` writes (made once)."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) != DIRECT_PIECE_BYTES:
        buf = _bounce.buf = np.frombuffer(mmap.mmap(-1, DIRECT_PIECE_BYTES), np.uint8)
    return buf


def _staged(parts: Iterable[tuple[memoryview, int]], crcs: list[int] | None,
            stage: np.ndarray) -> Iterator[np.ndarray]:
    """The bytes of ``parts`` (views, each with the index in ``crcs`` of its buffer), in order,
    copied into ``stage`` (a thread's staging buffer: that thread's, which waits while
    another goes on with the rest, see :func:`_drive`): the buffer each time it is full, then
    what is left in it. Each piece's crc32 is taken just before it is copied."""
    fill = 0
    for view, i in parts:
        src = np.frombuffer(view, np.uint8)
        while len(src):
            n = min(len(src), len(stage) - fill)
            if crcs is not None:
                crcs[i] = crc32(src[:n].data, crcs[i])
            stage[fill:fill + n] = src[:n]  # (numpy's copy releases the GIL)
            fill, src = fill + n, src[n:]
            if fill == len(stage):
                yield stage[:fill]
                fill = 0
    if fill:
        yield stage[:fill]


def _write_direct(path: Path, buffers: Sequence[memoryview | bytes], crcs: list[int] | None,
                  hold: Callable[[int], None] | None = None,
                  relocate: Relocate | None = None) -> bool:
    """Writes ``buffers`` one after the other into a new file ``path`` with ``O_DIRECT``: no
    page cache, the disk reads each ``DIRECT_PIECE_BYTES`` from this thread's staging buffer,
    into which they are copied (an array's own memory need not be aligned), and the file is
    cut to its exact length at the end. False, with nothing left at ``path``: the file system
    refuses ``O_DIRECT`` (the caller writes it through the page cache instead). ``hold``,
    ``relocate``: see :func:`_write_new`."""
    flags = getattr(os, "O_DIRECT", 0)
    if not flags:
        return False
    try:
        fd = os.open(path, _NEW_FILE_FLAGS | flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    total = 0

    def blocks_written() -> Iterator[None]:
        nonlocal total
        stage = _bounce_buffer()
        parts = ((memoryview(b).cast("B"), i) for i, b in enumerate(buffers))
        for block in _staged(parts, crcs, stage):
            n = len(block)
            if n % DIRECT_ALIGN:  # (the last one, padded to a whole block)
                stage[n:round_up(n, DIRECT_ALIGN)] = 0
                block = stage[:round_up(n, DIRECT_ALIGN)]
            _write_all(fd, [block.data])
            total += n
            if hold is not None:
                hold(total)
            yield

    try:
        _drive(blocks_written(), relocate)
        if total % DIRECT_ALIGN:
            os.ftruncate(fd, total)
    except OSError as exc:
        os.close(fd)
        fd = -1
        if exc.errno != errno.EINVAL:
            raise
        os.unlink(path)  # (an alignment this file system wants beyond DIRECT_ALIGN)
        if crcs is not None:
            crcs[:] = [0] * len(crcs)
        return False
    finally:
        if fd >= 0:
            os.close(fd)
    return True


def _pwrite_all(fd: int, data: memoryview | np.ndarray, offset: int) -> None:
    view = data.data.cast("B") if isinstance(data, np.ndarray) else data.cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_rest_direct(path: Path, fd: int, buffers: Sequence[memoryview | bytes], skip: int,
                       pos: int, crcs: list[int] | None, hold: Callable[[int], None] | None,
                       begin: int, relocate: Relocate | None = None) -> bool:
    """Writes what is left of a range of the shared data file ``path``, from byte ``skip`` of
    ``buffers`` on, at offset ``pos``: its whole DIRECT_ALIGN blocks with ``O_DIRECT``
    (through this thread's staging buffer), its ragged ends, which may share a block with the
    ranges beside it, through the page cache (``fd``), carrying on the ``crcs``; ``hold``
    after each piece, with the bytes written since ``begin``; ``relocate``: see
    :func:`_write_new`. False, with nothing written, when no whole block is left or the file
    system refuses ``O_DIRECT``."""
    flag = getattr(os, "O_DIRECT", 0)
    rest: collections.deque[tuple[memoryview, int]] = collections.deque()
    for i, b in enumerate(buffers):
        view = memoryview(b).cast("B")
        if skip < len(view):
            rest.append((view[skip:], i))
        skip = max(0, skip - len(view))
    total = sum(len(v) for v, _ in rest)
    head = min(total, -pos % DIRECT_ALIGN)
    middle = round_down(total - head, DIRECT_ALIGN)
    if not middle or not flag:
        return False
    try:
        dfd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise

    def take(n: int) -> Iterator[tuple[memoryview, int]]:
        while n:
            view, i = rest.popleft()
            if len(view) > n:
                rest.appendleft((view[n:], i))
                view = view[:n]
            n -= len(view)
            yield view, i

    def buffered(n: int, at: int) -> int:
        for part, i in take(n):
            if crcs is not None:
                crcs[i] = crc32(part, crcs[i])
            _pwrite_all(fd, part, at)
            at += len(part)
        return at

    def blocks_written() -> Iterator[None]:
        nonlocal pos
        target = dfd
        # (whole blocks, as the middle is)
        for block in _staged(take(middle), crcs, _bounce_buffer()):
            target = _put_direct(target, fd, block, pos)
            pos += len(block)
            if hold is not None:
                hold(pos - begin)
            yield
        buffered(total - head - middle, pos)

    try:
        pos = buffered(head, pos)
        _drive(blocks_written(), relocate)
    finally:
        os.close(dfd)
    return True


def _put_direct(target: int, fd: int, block: np.ndarray, pos: int) -> int:
    """Writes ``block`` at ``pos`` through ``target`` (an ``O_DIRECT`` descriptor), or, once the
    file system refused an ``O_DIRECT`` write (an alignment beyond DIRECT_ALIGN), through
    ``fd``; returns the descriptor to write the next block through."""
    if target != fd:
        try:
            _pwrite_all(target, block, pos)
            return target
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _pwrite_all(fd, block, pos)
    return fd


def _write_new(path: Path, buffers: Sequence[memoryview | bytes], *, fsync_fallback: bool,
               crcs: list[int] | None = None, direct: bool = False, at: int | None = None,
               hold: Callable[[int], None] | None = None,
               watch: _Watch | None = None, relocate: Relocate | None = None) -> None:
    """Writes ``buffers`` one after the other into a new file ``path``, starting the writeback
    (:func:`start_writeback`) of every ``WRITEBACK_STEP_BYTES`` as it goes, then that of the
    rest (where there is none, ``fsync_fallback`` fsyncs the file instead). The commit's fsync of the whole checkpoint
    makes it durable. ``crcs`` (one 0 per buffer): each buffer's crc32, taken piece by piece
    just before the piece is written, by this thread (the GIL released for each).
    ``direct``: written past the page cache (:func:`_write_direct`) where the file system
    takes ``O_DIRECT``. ``at``: from
    that offset of ``path``, a file other writers may be writing other ranges of (made if it
    is not there yet). ``hold(n)``: called once each piece is written, ``n`` the bytes written
    so far (a paced commit's thread waits there: ``_runtime.BatchPace``). ``watch``: each
    piece's copy into the page cache is timed there, and once it finds the page cache slow
    the rest of a range of a shared file goes past it (:func:`_write_rest_direct`).
    ``relocate(rest)``: asked after each piece whether the remaining pieces go on in another
    thread (it runs ``rest`` there, waits, and says True: ``Runtime.run_raised``), whichever
    way they are written (:func:`_drive`)."""
    if direct and _write_direct(path, buffers, crcs, hold, relocate):
        return
    fd = os.open(path, _NEW_FILE_FLAGS if at is None else _SHARED_FILE_FLAGS, 0o644)
    try:
        begin = written = started = at or 0
        if begin:
            os.lseek(fd, begin, os.SEEK_SET)

        def pieces_written() -> Iterator[None]:
            nonlocal written, started
            for group, owners in _pieces(buffers):
                if crcs is not None:
                    for view, i in zip(group, owners, strict=True):
                        crcs[i] = crc32(view, crcs[i])
                if watch is None:
                    written += _write_all(fd, group)
                else:
                    begin_cpu = time.thread_time()
                    n = _write_all(fd, group)
                    watch.sample(n, time.thread_time() - begin_cpu)
                    written += n
                    if watch.slow and at is not None and _write_rest_direct(
                            path, fd, buffers, written - begin, written, crcs, hold, begin,
                            relocate):
                        start_writeback(fd, started, written - started)
                        started = written = begin + sum(len(memoryview(b).cast("B"))
                                                        for b in buffers)
                        return
                if written - started >= WRITEBACK_STEP_BYTES and start_writeback(
                        fd, started, written - started):
                    started = written
                if hold is not None:
                    hold(written - begin)
                yield

        _drive(pieces_written(), relocate)
        if written > started and not start_writeback(fd, started, written - started) \
                and fsync_fallback:
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised inside names ``path`` when it names no file: those of the calls on a
    descriptor (``writev``, ``pwrite``, ``fsync``) do not, and a full disk then failed a
    commit naming neither the file nor its item."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def as_bytes(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (any dtype, ml_dtypes included)."""
    return arr.reshape(-1).view(np.uint8).data


@dataclass(frozen=True)
class DataFile:
    """A data file's range to write: the file's name in the database and the range's
    contents, in order."""

    name: str
    buffers: list[bytes | memoryview]
    #: The key of each of :attr:`buffers` ("" for the zero bytes padding a value to
    #: VALUE_ALIGN).
    keys: list[str]
    #: Where in the file the range starts; None: the file is this range alone.
    at: int | None = None
    #: Written past the page cache (:attr:`DatabaseWriter.direct` when it was added).
    direct: bool = False


class DatabaseWriter:
    """One OCDBT database in directory ``root`` (created here), written by this process.

    Call order: :meth:`add` for each batch (cheap, any thread), and :meth:`write` of what it
    returned (in a worker thread), any number of times and concurrently; then, once every
    add returned, :meth:`finish` (in a worker thread; writes may still be running: the B+tree
    needs each value's place only, which :meth:`add` fixed).

    ``watch`` (through the page cache only, on a file system that takes ``O_DIRECT``): the
    copies into the page cache are timed, and once they run slow (WATCH_BYTES) the rest of
    the save goes past the page cache.

    ``data_base``: the folder (``"ocdbt.process_0/"``) of the data files, in ``root``; the
    B+tree's node file is in ``root / "d"``. That is the layout of a database Orbax merged
    from its processes' (whose data lie in their folders), as Orbax writes one process's.
    """

    def __init__(self, root: Path, *, direct: bool = False, watch: bool = False,
                 data_base: str = "", db_uuid: str | None = None) -> None:
        self.root = root
        #: The database's uuid, in its manifest (random unless given).
        self.db_uuid = db_uuid or uuid.uuid4().hex
        self.data_base = data_base
        #: Data files written past the page cache (``O_DIRECT``, see :func:`_write_direct`):
        #: from the start, or once the page cache was found slow.
        self.direct = direct
        #: The page cache's pace, while it is written through (None: not watched).
        self.watch = _Watch(self._went_slow) if watch and not direct else None
        self._entries: list[tuple[bytes, Value]] = []
        self._lock = threading.Lock()
        # Through the page cache every batch is a range of one data file, reserved by add():
        # the disk then takes one file front to back rather than a file per batch at once.
        # (Fresh processes, interleaved, medians of 8: quick large 129 against 141 ms, quick
        # mixed 102 against 112 ms; of 5: full mixed 748 against 856 ms; many_small
        # unchanged, whose two threads' copies into one file take turns on its lock.)
        self._data_name = _new_file(data_base)
        self._data_end = 0
        #: The data files :meth:`add` gave writes of (their names in ``root``).
        self._data_files: set[str] = set()
        #: Where :meth:`finish` put the B+tree (for ``read_index``), once it has.
        self.hint: IndexHint | None = None

    def add(self, values: Sequence[tuple[str, bytes | memoryview]], *,
            past_cache: bool = False) -> DataFile:
        """Records ``values`` (key, data): documents (``bytes``) of up to
        MAX_INLINE_VALUE_BYTES inline in the B+tree, everything else, array data given as
        views of the arrays' buffers included, one after the other in a range of the
        database's data file (with ``direct``, a new file of their own), which :meth:`write`
        writes. (Array chunks of 1 KiB inline made the B+tree of 20,000 such arrays 24 MB,
        whose CRC-32C and encoding were the whole tail of the save; any reader takes a value
        either way.) ``past_cache``: this batch is written past the page cache, whatever
        :attr:`direct` says (the caller knows the file system takes it)."""
        inline: list[tuple[str, bytes | memoryview]] = []
        stored: list[tuple[str, bytes | memoryview]] = []
        for key, data in values:
            (inline if len(data) <= MAX_INLINE_VALUE_BYTES and isinstance(data, bytes)
             else stored).append((key, data))
        with self._lock:
            direct = self.direct or past_cache
            if direct:  # (a file per batch: O_DIRECT writes start at aligned offsets)
                name, at = _new_file(self.data_base), None
            else:
                name, at = self._data_name, self._data_end
                self._data_end += sum(len(chunk) + -len(chunk) % VALUE_ALIGN
                                      for _, chunk in stored)
            if stored:
                self._data_files.add(name)
        entries: list[tuple[bytes, Value]] = [(key.encode(), bytes(doc)) for key, doc in inline]
        buffers: list[bytes | memoryview] = []
        keys: list[str] = []
        offset = at or 0
        for key, chunk in stored:
            entries.append((key.encode(), (name, offset, len(chunk))))
            buffers.append(chunk)
            keys.append(key)
            offset += len(chunk)
            if gap := -len(chunk) % VALUE_ALIGN:
                buffers.append(bytes(gap))
                keys.append("")  # (padding: no value's)
                offset += gap
        with self._lock:
            self._entries.extend(entries)
        return DataFile(name, buffers, keys, at, direct)

    def _went_slow(self, nbytes: int, cpu_s: float) -> None:
        with self._lock:
            self.direct = True
        log.info("%s: copies into the page cache ran at %.2f GB/s of CPU time (%d bytes); the "
                 "rest of the save goes past it", self.root, nbytes / max(cpu_s, 1e-9) / 1e9,
                 nbytes)

    def _make_dirs(self, base: str) -> None:
        """Makes ``root / base / "d"`` (and ``root``, ``root / base``). (Not the parents: a
        writer left running after a failed save removed them fails rather than making them
        again.)"""
        self.root.mkdir(exist_ok=True)
        if base:
            (self.root / base).mkdir(exist_ok=True)
        (self.root / base / "d").mkdir(exist_ok=True)

    def write(self, data_file: DataFile, hold: Callable[[int], None] | None = None,
              relocate: Relocate | None = None) -> dict[str, int]:
        """Runs in a worker thread: writes a data file (calling ``hold`` after each piece:
        see :func:`_write_new`) and starts its writeback (``relocate``: see
        :func:`_write_new`); returns the crc32 of each value written there, by key. Not durable yet: the commit's fsync of the whole checkpoint makes it so. (An
        fsync here held this thread until the disk had the file, so that with more files than
        threads the checksums and page-cache copies of the next ones waited for the disk, and
        the disk then for them: full ``large`` 2.6 s against 1.1 s, full ``mixed`` 1.22 s
        against 0.97 s, in-process medians of 5.)"""
        if not data_file.buffers:  # (every value inline: zero-size arrays' documents only)
            return {}
        self._make_dirs(self.data_base)
        crcs = [0] * len(data_file.buffers)
        path = self.root / data_file.name
        with _naming(path):
            _write_new(path, data_file.buffers, fsync_fallback=True, crcs=crcs,
                       direct=data_file.direct, at=data_file.at, hold=hold,
                       watch=None if data_file.direct else self.watch, relocate=relocate)
        return {key: crc for key, crc in zip(data_file.keys, crcs, strict=True) if key}

    def finish(self) -> None:
        """Runs in a worker thread, after every add: writes the B+tree and the manifest.
        Where another writer made the manifest meanwhile (two saves into one new folder),
        this one's B+tree node goes and StepAlreadyExistsError names the folder; its data
        files are :meth:`discard`'s, once their writes ended."""
        if not self._entries:
            return  # nothing was added: no database
        entries = sorted(self._entries)
        for a, b in zip(entries, entries[1:]):
            if a[0] == b[0]:
                raise ValueError(f"{self.root}: key {a[0].decode()!r} written twice")
        node_file = _new_file()
        nodes, root, height = encode_tree(entries, node_file)
        head = manifest(root, height, self.db_uuid)
        self.hint = IndexHint(crc32(head), node_file, crc32(nodes), len(nodes),
                              root.where[1], root.where[2], height)
        self._make_dirs("")
        # (like the data files and the documents, left to the commit's fsync of the whole
        # checkpoint: one journal commit for every small file, rather than two more here)
        with _naming(self.root / node_file):
            _write_new(self.root / node_file, [nodes], fsync_fallback=False)
        try:
            with _naming(self.root / MANIFEST):
                _write_new(self.root / MANIFEST, [head], fsync_fallback=False)
        except FileExistsError as exc:
            (self.root / node_file).unlink(missing_ok=True)
            raise StepAlreadyExistsError(
                f"{self.root} already holds a checkpoint item: another save made its "
                f"{MANIFEST} while this one wrote its data (two saves into one folder); this "
                "save's data files there are removed") from exc

    def discard(self) -> None:
        """Removes the data files this writer wrote (after a failed :meth:`finish`, once
        every write ended): those of its own names, never another writer's."""
        for name in self._data_files:
            (self.root / name).unlink(missing_ok=True)


# -- reading ----------------------------------------------------------------------------------
#: A value as :func:`read_index` gives it: its bytes (inline in the B+tree), or the data file
#: (a path), offset and length where its bytes lie.
Located = bytes | tuple[str, int, int]


def _located(prefix: str, ref: str) -> tuple[str, int, int]:
    """A dumped reference ``<kind>:<base path>:<relative path>:<offset>:<length>`` as the
    file's path (after ``prefix``), the offset and the length."""
    _kind, base, rest = ref.split(":", 2)
    path, offset, length = rest.rsplit(":", 2)
    return f"{prefix}{base}{path}", int(offset), int(length)


def _read_varints(buf: np.ndarray, pos: int, n: int) -> tuple[np.ndarray, int]:
    """``n`` unsigned LEB128 varints back to back in ``buf`` (uint8) from ``pos``, decoded
    column-wise with numpy (the inverse of :func:`_varints`); and the position after them."""
    if n == 0:
        return np.zeros(0, np.uint64), pos
    seg = buf[pos:pos + 10 * n]
    ends = np.flatnonzero(seg < 0x80)[:n]
    if len(ends) < n:
        raise ValueError("truncated varints")
    stop = int(ends[-1]) + 1
    starts = np.empty(n, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    shift = (np.arange(stop) - np.repeat(starts, ends - starts + 1)) * 7
    if int(shift.max()) > 63:
        raise ValueError("varint out of range")
    parts = (seg[:stop] & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts), pos + stop


def _read_keys(buf: np.ndarray, pos: int, n: int, third_column: bool = False
               ) -> tuple[list[bytes], int]:
    """``n`` prefix-compressed keys: prefix lengths (after the first), suffix lengths, with
    ``third_column`` one more column of ``n`` (an interior node's subtree common prefix
    lengths, a data file table's base path lengths: 0 where this module wrote them), then
    the suffixes."""
    prefixes, pos = _read_varints(buf, pos, max(n - 1, 0))
    suffixes, pos = _read_varints(buf, pos, n)
    if third_column:
        _third, pos = _read_varints(buf, pos, n)
    raw = buf[pos:pos + int(suffixes.sum())].tobytes()
    keys: list[bytes] = []
    prev, at = b"", 0
    for p, length in zip([0, *prefixes.tolist()], suffixes.tolist()):
        prev = prev[:p] + raw[at:at + length]
        keys.append(prev)
        at += length
    return keys, pos + at


def _decode_node(data: bytes) -> tuple[int, np.ndarray, int]:
    """An uncompressed node as this module writes it: its height, its bytes (uint8) and where
    its body begins."""
    if len(data) < 19 or struct.unpack(">I", data[:4])[0] != _BTREE_MAGIC or \
            struct.unpack("<Q", data[4:12])[0] != len(data) or data[12:14] != b"\0\0":
        raise ValueError("not an uncompressed B+tree node of version 0")
    return data[14], np.frombuffer(data, np.uint8, len(data) - 4), 15


def _file_names(buf: np.ndarray, pos: int) -> tuple[list[str], int]:
    """A node's data file table: each file's path (its base path being a prefix of it)."""
    (count,), pos = _read_varints(buf, pos, 1)
    paths, pos = _read_keys(buf, pos, int(count), third_column=True)
    return [path.decode() for path in paths], pos


def _index_from_nodes(root: Path, hint: IndexHint) -> dict[str, Located]:
    """The index of a database this module wrote (``hint``: from its writer), from its node
    file, decoded here: no TensorStore call (whose first one, in a cold process, pages in
    tens of milliseconds of its code). ValueError when anything differs from what was
    written."""
    data = (root / hint.node_file).read_bytes()
    if len(data) != hint.node_bytes or crc32(data) != hint.node_crc32:
        raise ValueError("node file differs from the one written")
    out: dict[str, Located] = {}
    prefix = str(root)
    pending = [(hint.root_offset, hint.root_length)]
    while pending:
        offset, length = pending.pop()
        node = data[offset:offset + length]
        height, buf, pos = _decode_node(node)
        files, pos = _file_names(buf, pos)
        (count,), pos = _read_varints(buf, pos, 1)
        n = int(count)
        keys, pos = _read_keys(buf, pos, n, third_column=height > 0)
        if height > 0:
            _files, pos = _read_varints(buf, pos, n)
            offsets, pos = _read_varints(buf, pos, n)
            lengths, pos = _read_varints(buf, pos, n)
            pending += zip(offsets.tolist(), lengths.tolist())
            continue
        lengths, pos = _read_varints(buf, pos, n)
        kinds = node[pos:pos + n]
        pos += n
        file_ids, pos = _read_varints(buf, pos, n - kinds.count(0))
        offsets, pos = _read_varints(buf, pos, len(file_ids))
        paths = [f"{prefix}/{f}" for f in files]
        refs = iter(zip(file_ids.tolist(), offsets.tolist()))
        for key, kind, size in zip(keys, kinds, lengths.tolist()):
            if kind == 0:
                out[key.decode()] = node[pos:pos + size]
                pos += size
            else:
                file_id, at = next(refs)
                out[key.decode()] = (paths[file_id], at, size)
        if pos != len(buf):
            raise ValueError("leaf node longer than its entries")
    return out


class IndexHint(msgspec.Struct, frozen=True):
    """Where a database's B+tree lies, as :class:`DatabaseWriter` wrote it: the crc32 of its
    manifest (the database is still the one written when its manifest is), its node file
    (name, crc32, size) and its root node (offset, length, height)."""

    manifest_crc32: int
    node_file: str
    node_crc32: int
    node_bytes: int
    root_offset: int
    root_length: int
    height: int


def read_index(root: Path, hint: IndexHint | None = None) -> dict[str, Located] | None:
    """Every key of the newest version of the OCDBT database in local directory ``root``,
    with its value or where the value lies. None: no database there. Blocks: call it from a
    worker thread. Raises ValueError for a database TensorStore cannot read,
    UnreadableCheckpointError for a manifest that is there but cannot be read.

    With the ``hint`` of a database :class:`DatabaseWriter` wrote, whose manifest is still
    the one written, its nodes are decoded here; otherwise (any writer's database,
    compressed nodes, references into merged databases, a database changed since) from
    TensorStore's dump of the manifest and of each B+tree node (a few calls in all, where
    reading key by key costs a TensorStore future each)."""
    try:
        head = (root / MANIFEST).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # (there, but not to be read: an I/O error, no access, a directory)
        raise UnreadableCheckpointError(
            f"cannot read {root / MANIFEST}: {exc.strerror or exc}") from exc
    if hint is not None and crc32(head) == hint.manifest_crc32:
        with contextlib.suppress(ValueError, IndexError, OSError, UnicodeDecodeError):
            return _index_from_nodes(root, hint)
    base = ts.KvStore.open({"driver": "file", "path": f"{root}/"}).result()
    return dumped_index(base, f"{root}/")


def dumped_index(base: ts.KvStore, under: str = "") -> dict[str, Located]:
    """Every key of the newest version of the OCDBT database in kvstore ``base`` (any driver:
    a local directory, an object store's prefix), from TensorStore's dump of its manifest and
    of each B+tree node, with its value or where the value lies: a data file's key in
    ``base``, after ``under``. Blocks. Raises ValueError where ``base`` holds no database
    TensorStore can read."""
    versions = ts.ocdbt.dump(base).result().get("versions") or []
    out: dict[str, Located] = {}
    top = versions[-1]["root"].get("location") if versions else None
    level = [(top, b"")] if top else []
    while level:  # (a level's nodes read at once: on an object store each is a request)
        dumps = [(ts.ocdbt.dump(base, location), prefix) for location, prefix in level]
        level = []
        for dump, prefix in dumps:
            node = dump.result()
            if node["height"] > 0:  # (a child's keys exclude the subtree prefix its parent took)
                level += [(e["location"], prefix + e["subtree_common_prefix"])
                          for e in node["entries"]]
                continue
            for e in node["entries"]:
                key = (prefix + e["key"]).decode()
                inline = e.get("inline_value")
                out[key] = inline if inline is not None else _located(under, e["indirect_value"])
    return out


#: Bytes per ``preadv`` of a local restore, each piece checksummed while it is in the CPU's
#: cache. Cold, 4 threads, crc32 of each piece as it lands (microbenchmarks on this project's
#: benchmark VM): 16 files of 16 MiB 1.5-1.6 GB/s in 1 MiB pieces against 1.1-1.3 GB/s in one
#: call per file (1.6-1.9 with 256 KiB pieces); 16 files of 128 MiB 1.50 GB/s against 1.56
#: (1.26 with 256 KiB pieces). Cold quick ``large`` restore 170 ms against 223 ms (median of 8).
READ_PIECE_BYTES = 1 << 20


def read_into(fd: int, buffers: Sequence[memoryview], offset: int,
              crcs: list[int] | None = None) -> int:
    """Reads ``buffers`` back to back from ``offset``, in ``preadv`` calls of about
    READ_PIECE_BYTES; with ``crcs`` (one 0 per buffer), each buffer's crc32, taken piece by
    piece as it is read. Returns how many bytes it read: fewer only at the end of the file."""
    total = 0
    for group, owners in _pieces(buffers, READ_PIECE_BYTES):
        want = sum(len(v) for v in group)
        done = os.preadv(fd, group, offset + total)
        if done < want:  # (a short read: the rest view by view, up to the end of the file)
            at = offset + total  # where the view begins in the file
            for view in group:
                if done < len(view):
                    done += read_exactly(fd, view[done:], at + done)
                    if done < len(view):
                        return at - offset + done
                done -= len(view)
                at += len(view)
        if crcs is not None:
            for view, i in zip(group, owners):
                crcs[i] = crc32(view, crcs[i])
        total += want
    return total


#: Bytes per ``preadv`` of a restore past the page cache (:func:`read_region` with an
#: ``O_DIRECT`` descriptor; each call waits for the disk).
DIRECT_READ_PIECE_BYTES = 4 << 20


def open_direct(path: str) -> int | None:
    """A descriptor reading ``path`` past the page cache (``O_DIRECT``), or None where the
    system or the file system has none (the caller reads through the page cache)."""
    flags = getattr(os, "O_DIRECT", 0)
    if not flags:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


_ANONYMOUS_FLAGS = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(
    mmap, "MAP_ANONYMOUS") else {}
#: Anonymous memory of at least this many bytes asks for transparent huge pages, as NumPy does
#: for its own arrays of 4 MiB or more. A save's own copies under a budget (``_stage``): full
#: `mixed` took 0.91-1.01 s to a durable commit with them, 1.08-1.24 s without (fresh
#: processes, 4 each). A restore of 4 GiB past the page cache: 1,048,600 page faults and 10-16
#: s of system time without them (O_DIRECT faults the pages in as it reads).
HUGE_PAGES_MIN_BYTES = 4 << 20


def anonymous_memory(nbytes: int) -> mmap.mmap:
    """A fresh anonymous mapping of ``nbytes`` (at least one byte), page-aligned, in huge
    pages where it is large enough; the system gets it back as soon as its last view goes.
    OSError when none can be made (e.g. the process is at ``vm.max_map_count``)."""
    m = mmap.mmap(-1, max(nbytes, 1), **_ANONYMOUS_FLAGS)
    if nbytes >= HUGE_PAGES_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # (a kernel without transparent huge pages)
            m.madvise(mmap.MADV_HUGEPAGE)
    return m


def direct_region(nbytes: int) -> np.ndarray:
    """``nbytes`` (a multiple of DIRECT_ALIGN) of fresh memory (:func:`anonymous_memory`):
    what :func:`read_region` reads into past the page cache, whose reads fault its pages in."""
    return np.frombuffer(anonymous_memory(nbytes), np.uint8)[:nbytes]


def read_region(fd: int, region: memoryview, start: int, spans: Sequence[tuple[int, int]],
                crcs: list[int] | None, piece: int = READ_PIECE_BYTES) -> int:
    """Reads ``region`` from offset ``start`` of ``fd``, one ``preadv`` of ``piece`` bytes at a
    time (with an ``O_DIRECT`` descriptor, the region's address, ``start`` and ``piece`` are
    multiples of DIRECT_ALIGN); with ``crcs`` (one 0 per span), the crc32 of each span
    ``(begin, end)`` of the region (in order, not overlapping), taken piece by piece as it
    lands. Returns how many bytes it read: fewer only at the end of the file."""
    total = k = 0
    while total < len(region):
        want = min(piece, len(region) - total)
        try:
            got = os.preadv(fd, [region[total:total + want]], start + total)
        except OSError as exc:  # (past a short O_DIRECT read, an unaligned offset)
            if exc.errno == errno.EINVAL and total % DIRECT_ALIGN:
                break
            raise
        if got == 0:  # (the end of the file)
            break
        if crcs is not None:
            end = total + got
            while k < len(spans) and spans[k][0] < end:
                begin, stop = spans[k]
                if max(begin, total) < min(stop, end):
                    crcs[k] = crc32(region[max(begin, total):min(stop, end)], crcs[k])
                if stop > end:
                    break
                k += 1
        total += got
    return total


def read_exactly(fd: int, view: memoryview, offset: int) -> int:
    """Reads ``len(view)`` bytes at ``offset`` into ``view``; returns how many it got (fewer
    only at the end of the file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done
