"""Orbax's ``ocp.msgpack_utils``: trees of arrays to and from msgpack bytes, in the encoding of
Orbax's first checkpoint format and of flax's ``flax.serialization`` (the ``checkpoint`` file
older Orbax versions wrote beside, or instead of, their TensorStore arrays).

The encoding (msgpack extension types, the payload of each itself msgpack):

- ``1`` an array: ``[shape, dtype name, row-major bytes]`` (``np.ndarray``, ``jax.Array``);
- ``2`` a Python ``complex``: ``[real, imag]``;
- ``3`` a NumPy scalar: an array's payload, of shape ``()``;
- ``4`` a tuple: its items as a msgpack array (lists stay plain msgpack arrays).

msgpack holds at most 2**31 - 1 bytes in one value: an array larger than
:data:`MAX_CHUNK_SIZE` bytes, reached through dictionaries, is written as a dictionary of its
flat chunks (``{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}``) and
joined again on restore. The bytes written are Orbax's, byte for byte.
"""

from __future__ import annotations

from typing import Any

import jax
import msgspec
import numpy as np

from ._ocdbt import as_bytes
from ._serialize import dtype_named
from .errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidTypeError,
    UnsupportedLeafError,
)

__all__ = ["MAX_CHUNK_SIZE", "msgpack_restore", "msgpack_serialize"]

#: Arrays above this many bytes are split into chunks of at most this many (msgpack's own
#: limit is 2**31 - 1 bytes a value; the margin leaves room for the encoding).
MAX_CHUNK_SIZE = 2**30

_NDARRAY, _COMPLEX, _NPSCALAR, _TUPLE = 1, 2, 3, 4
_CHUNKED = "__msgpack_chunked_array__"

_encoder = msgspec.msgpack.Encoder()
_plain_decoder = msgspec.msgpack.Decoder()


def _array_payload(arr: np.ndarray) -> bytes:
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise UnsupportedLeafError(f"arrays of dtype {arr.dtype} (objects or fields) cannot be "
                                   "written to msgpack")
    return _encoder.encode((arr.shape, arr.dtype.name, as_bytes(np.ascontiguousarray(arr))))


def _array_of(payload: bytes | memoryview) -> np.ndarray:
    shape, name, data = _plain_decoder.decode(payload)
    return np.frombuffer(data, dtype=dtype_named(name)).reshape(shape)


def _chunked(arr: np.ndarray) -> dict[str, Any]:
    """The chunked form of a large array, encodable (its keys in Orbax's order, not sorted)."""
    step = max(1, MAX_CHUNK_SIZE // arr.dtype.itemsize)
    flat = arr.reshape(-1)
    return {_CHUNKED: True, "shape": {str(i): n for i, n in enumerate(arr.shape)},
            "chunks": {str(i): msgspec.msgpack.Ext(_NDARRAY, _array_payload(flat[s:s + step]))
                       for i, s in enumerate(range(0, flat.size, step))}}


def _sorted(node: dict[Any, Any]) -> list[Any]:
    try:
        return sorted(node)
    except TypeError:
        return list(node)


def _encodable(node: Any, chunk: bool) -> Any:
    """``node`` with every value msgpack has no type of its own for made an extension value.
    ``chunk``: arrays above MAX_CHUNK_SIZE are split (where Orbax's restore joins them again:
    the tree's root and values reached through dictionaries only)."""
    if isinstance(node, jax.Array):
        node = np.asarray(node)
    if type(node) is dict:  # (in key order, as Orbax writes a dictionary: a copy by jax.tree)
        return {k: _encodable(node[k], chunk) for k in _sorted(node)}
    if type(node) is list:
        return [_encodable(v, False) for v in node]
    if isinstance(node, tuple):
        return msgspec.msgpack.Ext(_TUPLE, _encoder.encode([_encodable(v, False) for v in node]))
    if isinstance(node, np.ndarray):
        if chunk and node.nbytes > MAX_CHUNK_SIZE:
            return _chunked(node)
        return msgspec.msgpack.Ext(_NDARRAY, _array_payload(node))
    if isinstance(node, np.generic):
        return msgspec.msgpack.Ext(_NPSCALAR, _array_payload(np.asarray(node)))
    if type(node) is complex:
        return msgspec.msgpack.Ext(_COMPLEX, _encoder.encode((node.real, node.imag)))
    if node is None or type(node) in (bool, int, float, str, bytes):
        return node
    raise UnsupportedLeafError(f"msgpack cannot hold a value of type {type(node).__name__}: "
                               f"{node!r}")


def _ext(code: int, data: memoryview) -> Any:
    if code == _NDARRAY:
        return _array_of(data)
    if code == _NPSCALAR:
        return _array_of(data)[()]
    if code == _COMPLEX:
        real, imag = _plain_decoder.decode(data)
        return complex(real, imag)
    if code == _TUPLE:
        return tuple(_decoder.decode(data))
    raise InvalidArgumentError(f"msgpack extension type {code} is not one of Orbax's")


_decoder = msgspec.msgpack.Decoder(ext_hook=_ext)


def _joined(node: Any) -> Any:
    if type(node) is not dict:
        return node
    if _CHUNKED in node:
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {k: _joined(v) for k, v in node.items()}


def msgpack_serialize(pytree: Any, in_place: bool = False) -> bytes:
    """``pytree`` (dicts, lists, tuples; arrays, NumPy and Python scalars, strings, bytes,
    None) as msgpack bytes, in Orbax's and flax's encoding. ``in_place`` is accepted for
    Orbax's signature: the tree is never changed. ``ValueError`` for any other value."""
    del in_place
    return _encoder.encode(_encodable(pytree, True))


def msgpack_restore(encoded_pytree: bytes | bytearray | memoryview) -> Any:
    """The tree in msgpack bytes written by :func:`msgpack_serialize` (or by Orbax or flax):
    arrays come back as read-only NumPy arrays over the bytes read, chunked ones joined.
    Bytes that hold no such tree raise :class:`~ckpt_async.errors.InvalidArgumentError` (a
    ``ValueError``; :class:`~ckpt_async.errors.InvalidTypeError`, also a ``TypeError``, for
    an array of a dtype NumPy does not know, as Orbax's ``TypeError``)."""
    try:
        return _joined(_decoder.decode(encoded_pytree))
    except InvalidArgumentError:
        raise
    except TypeError as exc:  # (an array's dtype name or payload that is none)
        raise InvalidTypeError(f"not a msgpack-encoded tree: {exc}") from exc
    except (msgspec.DecodeError, ValueError, LookupError) as exc:
        raise InvalidArgumentError(f"not a msgpack-encoded tree: {exc}") from exc


class CorruptMsgpackError(CorruptCheckpointError, ValueError):
    """Raised when a checkpoint's msgpack file holds no tree (Orbax: msgpack's ValueError)."""


class CorruptMsgpackTypeError(CorruptMsgpackError, TypeError):
    """Raised when a checkpoint's msgpack file holds an array of no known dtype (Orbax: TypeError)."""


def read_tree(data: bytes | bytearray | memoryview, path: Any) -> Any:
    """:func:`msgpack_restore` of the bytes of the checkpoint's file ``path``: bytes that hold
    no tree are damage, a :class:`CorruptMsgpackError` naming the file (a ``ValueError``, and
    a ``TypeError`` where msgpack_restore's is one, as Orbax's are)."""
    try:
        return msgpack_restore(data)
    except InvalidArgumentError as exc:
        cls = CorruptMsgpackTypeError if isinstance(exc, TypeError) else CorruptMsgpackError
        raise cls(f"{path}: {exc}") from exc
