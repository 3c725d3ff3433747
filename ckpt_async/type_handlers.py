"""Orbax's ``type_handlers``: per-leaf save and restore options, and the TypeHandler layer.

ckpt_async's pytree handlers write and read the leaves they know (arrays, scalars, strings)
themselves, in batches, and consult the registry for two things only:

- a leaf of a type they do not know, or of a known type whose registered handler is not one
  of the built-in ones below, is handed to that handler (``serialize`` when saved,
  ``deserialize`` by the ``typestr`` it was saved under when restored, ``metadata`` for
  ``item_metadata``), as Orbax's PyTreeCheckpointHandler does;
- with :class:`SingleReplicaArrayHandler` registered for ``jax.Array``, arrays restored with
  :class:`SingleReplicaArrayRestoreArgs` across processes are read by the processes of one
  replica only and broadcast to the others (``handlers/pytree.py``).

The built-in handlers also work on their own, for a custom handler that hands parts of its
value to them: they write each value as a zarr array at ``info.path`` (Orbax's layout
without OCDBT, also when ``info.is_ocdbt_checkpoint``) and read one from there, or from the
item's OCDBT database when ``info.is_ocdbt_checkpoint`` and it holds the value.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import copy
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
import tensorstore as ts

from . import _format as fmt
from . import _serialize as ser
from . import _storage as storage
from ._ocdbt import MANIFEST
from ._paths import coerce, escapes
from ._stage import host_copy
from ._tree import is_namedtuple
from .errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidTypeError,
    ShapeMismatchError,
)
from .metadata import (
    ArrayMetadata,
    ScalarMetadata,
    ShardingMetadata,
    StorageMetadata,
    StringMetadata,
    sharding_metadata_from_json,
)
from .multihost import current_roles


@dataclasses.dataclass
class SaveArgs:
    """How to save one leaf: ``dtype`` casts before writing. ``aggregate`` is ignored, as in
    Orbax 0.12 (older Orbax wrote such leaves into a msgpack file; ckpt_async reads those)."""

    aggregate: bool = False
    dtype: Any = None
    chunk_byte_size: int | None = None
    shard_axes: tuple[int, ...] = ()
    write_chunk_shape: tuple[int, ...] | None = None
    read_chunk_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        global _told_aggregate
        if self.aggregate and not _told_aggregate:
            _told_aggregate = True
            log.warning("SaveArgs(aggregate=True) is deprecated and ignored (as in Orbax 0.12): "
                        "the leaf is saved as any other")


_told_aggregate = False  # (the warning above: once a process)


@dataclasses.dataclass
class RestoreArgs:
    """How to restore one leaf: as ``restore_type`` (np.ndarray, jax.Array, int, ...), cast to
    ``dtype``."""

    restore_type: Any = None
    dtype: Any = None


@dataclasses.dataclass
class ArrayRestoreArgs(RestoreArgs):
    """Restore one leaf as a ``jax.Array`` placed on ``mesh`` + ``mesh_axes`` when both are
    given, else on ``sharding`` (as Orbax's ArrayHandler places it).

    ``global_shape`` (or its alias ``shape``): the shape to restore into. With ``strict``
    (the default) it must be the stored shape; with ``strict=False`` the stored array is cut
    to it or padded with zeros, dimension by dimension (as Orbax does)."""

    restore_type: Any = jax.Array
    mesh: jax.sharding.Mesh | None = None
    mesh_axes: jax.sharding.PartitionSpec | None = None
    sharding: jax.sharding.Sharding | ShardingMetadata | None = None
    global_shape: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if self.shape is not None and self.global_shape is not None and \
                tuple(self.shape) != tuple(self.global_shape):
            raise InvalidArgumentError(f"ArrayRestoreArgs: shape {self.shape} and global_shape "
                                       f"{self.global_shape} differ; give one, or the same")
        if self.global_shape is None:
            self.global_shape = self.shape
        self.shape = self.global_shape

    def resolved_sharding(self, where: str = "ArrayRestoreArgs") -> jax.sharding.Sharding | None:
        """The sharding to restore into, as Orbax's ArrayHandler resolves it: ``mesh`` +
        ``mesh_axes`` when both are given (even beside a ``sharding``), else ``sharding`` (a
        :class:`ShardingMetadata` becomes its jax sharding, ``to_jax_sharding()``). Another
        kind of ``sharding`` raises InvalidArgumentError."""
        if self.mesh is not None and self.mesh_axes is not None:
            return jax.sharding.NamedSharding(self.mesh, self.mesh_axes)
        sharding = self.sharding
        if isinstance(sharding, ShardingMetadata):
            return sharding.to_jax_sharding()
        if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise InvalidArgumentError(
                f"{where}: sharding={sharding!r} is no jax.sharding.Sharding (nor a "
                "ShardingMetadata)")
        return sharding


#: A leaf of a restore target (or ``item``) marked not to be restored: it comes back as
#: ``PLACEHOLDER`` and its data is not read (Orbax's, the ``Ellipsis`` object).
PLACEHOLDER = ...


def is_placeholder(value: Any) -> bool:
    """Whether ``value`` is :data:`PLACEHOLDER`."""
    return value is PLACEHOLDER


@dataclasses.dataclass
class SingleReplicaArrayRestoreArgs(ArrayRestoreArgs):
    """Restore args of :class:`SingleReplicaArrayHandler`: ``sharding`` is the array's
    sharding; ``single_replica_sharding`` (which Orbax has deprecated) is accepted and not
    needed."""

    single_replica_sharding: jax.sharding.Sharding | None = None



log = logging.getLogger("ckpt_async")
T = TypeVar("T")


class ParamInfo:
    """What a :class:`TypeHandler` is told about one leaf: its ``name`` (the leaf's key path
    joined with dots), ``parent_dir`` (the item's directory) and ``path`` (``parent_dir /
    name``, where a handler writes the leaf's own files), and the TensorStore context and
    layout of the item."""

    def __init__(self, *, name: str, parent_dir: Any, path: Any = None, keypath: Any = None,
                 skip_deserialize: bool | None = None, byte_limiter: Any = None,
                 device_host_byte_limiter: Any = None, is_ocdbt_checkpoint: bool | None = None,
                 use_compression: bool | None = False, use_zarr3: bool | None = False,
                 ocdbt_target_data_file_size: int | None = None,
                 ts_context: ts.Context | None = None, value_typestr: str | None = None,
                 enable_pinned_host_transfer: bool = False,
                 raise_array_data_missing_error: bool = True, write_shape: Any = None,
                 is_prioritized_key_fn: Any = None) -> None:
        self.name = name
        self.parent_dir = coerce(parent_dir)
        self.path = coerce(path) if path is not None else self.parent_dir / name
        self.keypath = keypath
        self.skip_deserialize = skip_deserialize
        self.byte_limiter = byte_limiter
        self.device_host_byte_limiter = device_host_byte_limiter
        self.is_ocdbt_checkpoint = is_ocdbt_checkpoint
        self.use_compression = use_compression
        self.use_zarr3 = use_zarr3
        self.ocdbt_target_data_file_size = ocdbt_target_data_file_size
        self.ts_context = ts_context
        self.value_typestr = value_typestr
        self.enable_pinned_host_transfer = enable_pinned_host_transfer
        self.raise_array_data_missing_error = raise_array_data_missing_error
        self.write_shape = write_shape
        self.is_prioritized_key_fn = is_prioritized_key_fn

    def replace(self, **kwargs: Any) -> ParamInfo:
        new = copy.copy(self)
        for k, v in kwargs.items():
            setattr(new, k, v)
        return new

    async def await_path_creation(self) -> None:
        """(Orbax's; ckpt_async creates the item directory before any handler runs.)"""

    def __repr__(self) -> str:
        return f"ParamInfo(name={self.name!r}, parent_dir={str(self.parent_dir)!r})"


class TypeHandler(abc.ABC):
    """Writes and reads one kind of pytree leaf (Orbax's interface).

    ``serialize`` may return futures (anything with ``result()``) for work it leaves running;
    the save waits for them in a thread before it commits. Whatever a handler writes under
    ``info.parent_dir`` is committed, or dropped, with the rest of the step."""

    @abc.abstractmethod
    def typestr(self) -> str:
        """The name leaves of this kind are saved under (``_METADATA``'s ``value_type``)."""

    @abc.abstractmethod
    async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
        """The metadata of each stored leaf."""

    @abc.abstractmethod
    async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                        args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
        """Writes each value; returns futures of work still running, if any."""

    @abc.abstractmethod
    async def deserialize(self, infos: Sequence[ParamInfo],
                          args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
        """Reads each value."""

    def finalize(self, directory: Any) -> None:  # noqa: B027 - optional, as in Orbax
        """Orbax's hook; its pytree handlers do not call it, nor do ckpt_async's."""

    def memory_size(self, values: Sequence[Any]) -> Sequence[tuple[int, int]]:
        """(write, read) bytes each value takes in host memory."""
        sizes = [int(getattr(v, "nbytes", 0)) for v in values]
        return [(n, n) for n in sizes]


def _check_lengths(infos: Sequence[ParamInfo], *others: Sequence[Any] | None) -> None:
    if not infos:
        raise InvalidArgumentError("Cannot pass TypeHandler input of length 0.")
    for o in others:
        if o is not None and len(o) != len(infos):
            raise InvalidArgumentError("Found input args with mismatched lengths.")


def _context(info: ParamInfo) -> ts.Context:
    return info.ts_context if info.ts_context is not None else ser.new_context()


class _ArrayLike(TypeHandler):
    """The built-in handlers of arrays and scalars, used on their own (see the module)."""

    _typestr = ""

    def typestr(self) -> str:
        return self._typestr

    async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                        args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
        """Writes each value as a zarr array in a folder of its own, ``info.name`` in
        ``info.parent_dir`` (zarr v3 where ``info.use_zarr3``; a jax.Array spread over
        processes: its replica-0 shards, from every process; anything else from the primary
        process only)."""
        _check_lengths(infos, values, args)
        primary = current_roles().is_primary
        for i, (value, info) in enumerate(zip(values, infos, strict=True)):
            if not primary and not (isinstance(value, jax.Array)
                                    and not value.is_fully_addressable):
                continue
            arg = args[i] if args is not None else None
            cast = np.dtype(arg.dtype) if arg is not None and arg.dtype is not None else None
            await ser.write_array(_context(info), info.parent_dir,
                                  host_copy(value, info.name, cast), use_ocdbt=False,
                                  use_zarr3=bool(info.use_zarr3),
                                  compress=bool(info.use_compression))
        return []

    async def _read(self, info: ParamInfo) -> np.ndarray:
        async def read(use_ocdbt: bool) -> np.ndarray:
            return await ser.read_array(_context(info), info.parent_dir, info.name,
                                        use_ocdbt=use_ocdbt, use_zarr3=bool(info.use_zarr3),
                                        fill_missing=not info.raise_array_data_missing_error)

        return await _in_database_or_folder(info, read)

    async def _read_all(self, infos: Sequence[ParamInfo],
                        args: Sequence[RestoreArgs] | None) -> list[np.ndarray]:
        """Each stored array, cast to its restore args' ``dtype`` (as Orbax's read spec casts)."""
        arrays = list(await asyncio.gather(*(self._read(info) for info in infos)))
        for i, arg in enumerate(args or ()):
            if arg is not None and arg.dtype is not None:
                arrays[i] = ser.cast(arrays[i], arg.dtype)
        return arrays

    async def deserialize(self, infos: Sequence[ParamInfo],
                          args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
        _check_lengths(infos, args)
        arrays = await self._read_all(infos, args)
        return [self._restored(arr, args[i] if args is not None else None, infos[i])
                for i, arr in enumerate(arrays)]

    def _restored(self, arr: np.ndarray, arg: RestoreArgs | None, info: ParamInfo) -> Any:
        return arr

    async def _sharding_metadatas(self, infos: Sequence[ParamInfo]) -> list[Any]:
        return [None] * len(infos)

    async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
        _check_lengths(infos)

        async def one(info: ParamInfo, sharding: Any) -> Any:
            async def layout(use_ocdbt: bool) -> tuple[Any, ...]:
                return await ser.read_shape_dtype(_context(info), info.parent_dir, info.name,
                                                  use_ocdbt=use_ocdbt,
                                                  use_zarr3=bool(info.use_zarr3))

            shape, dtype, chunks = await _in_database_or_folder(info, layout)
            if self._typestr == "scalar":  # (no storage metadata, as Orbax's gives)
                return ScalarMetadata(info.name, info.parent_dir, shape, sharding, dtype, None)
            return ArrayMetadata(info.name, info.parent_dir, shape, sharding, dtype,
                                 StorageMetadata(chunks))

        shardings = await self._sharding_metadatas(infos)
        return await asyncio.gather(*(one(i, s) for i, s in zip(infos, shardings, strict=True)))


async def _in_database_or_folder(info: ParamInfo, fn: Callable[[bool], Awaitable[T]]) -> T:
    """``fn(use_ocdbt)`` on the array ``info`` names: in the item's OCDBT database where
    ``info.is_ocdbt_checkpoint`` (where Orbax's handlers, and the pytree handlers, write it),
    else, or when the database does not hold it, in its zarr folder ``info.parent_dir /
    info.name`` (where the built-in handlers on their own write it, OCDBT or not)."""
    if not info.is_ocdbt_checkpoint:
        return await fn(False)
    try:
        return await fn(True)
    except CorruptCheckpointError:
        meta = "zarr.json" if info.use_zarr3 else ".zarray"
        if escapes(info.name) or not await storage.exists(info.parent_dir / info.name / meta):
            raise
    return await fn(False)


def sharding_key(name: str) -> str:
    """The key of array ``name``'s entry in ``_sharding``: its name in URL-safe base64, as
    Orbax writes and looks it up (for this handler and the pytree handlers alike)."""
    return base64.urlsafe_b64encode(name.encode()).decode()


def decode_sharding_document(raw: bytes, where: str) -> dict[str, str]:
    """A ``_sharding`` document: array name -> entry. Its keys are URL-safe base64, Orbax's;
    the standard '+' and '/' decode too (ckpt_async wrote them before, for names such as
    'ab~')."""
    enc = fmt.decode(raw, dict[str, str], where=where)
    return {base64.urlsafe_b64decode(k).decode(): v for k, v in enc.items()}


async def _write_sharding_entries(entries: Sequence[tuple[ParamInfo, str]]) -> None:
    """Adds each ``(info, entry)`` to the ``_sharding`` document of ``info.parent_dir``, at its
    name's key, as Orbax's ArrayHandler does: one TensorStore transaction per document, which
    keeps the entries already there."""
    by_dir: dict[str, list[tuple[ParamInfo, str]]] = {}
    for info, text in entries:
        by_dir.setdefault(str(info.parent_dir), []).append((info, text))
    for group in by_dir.values():
        kvstore = ser.kvstore_base(group[0][0].parent_dir)
        kvstore = {**kvstore, "path": kvstore["path"] + fmt.SHARDING}
        txn = ts.Transaction()
        for info, text in group:
            store = await ts.open({"driver": "json", "kvstore": kvstore,
                                   "json_pointer": "/" + sharding_key(info.name)},
                                  context=_context(info))
            await store.with_transaction(txn).write(text)
        await txn.commit_async()


async def _sharding_documents(infos: Sequence[ParamInfo]) -> dict[str, dict[str, str] | None]:
    """The ``_sharding`` document of each ``info.parent_dir`` (name -> entry), None where
    there is none."""
    dirs = {str(info.parent_dir): info.parent_dir for info in infos}

    async def one(directory: Any) -> dict[str, str] | None:
        raw = await storage.read_optional(directory / fmt.SHARDING)
        if raw is None:
            return None
        return decode_sharding_document(raw, str(directory / fmt.SHARDING))

    docs = await asyncio.gather(*(one(d) for d in dirs.values()))
    return dict(zip(dirs, docs, strict=True))


#: ``ext_metadata`` key of ``array_metadatas`` naming a typed PRNG key's implementation
#: (Orbax's; the pytree handlers' too).
#: The ``ext_metadata`` key of ``array_metadatas`` entries naming a typed PRNG key's
#: implementation (as Orbax writes it).
RANDOM_KEY_IMPL = "random_key_impl"


def _is_key_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is a typed PRNG key's (``jax.random.key(...).dtype``)."""
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data_shape(arg: RestoreArgs) -> tuple[int, ...] | None:
    """The shape of the key data stored for a typed PRNG key of ``arg``'s ``dtype`` and
    ``global_shape`` (its trailing dimensions added), or None without a shape."""
    shape = getattr(arg, "global_shape", None)
    if shape is None:
        return None
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(tuple(shape), arg.dtype))
    return tuple(data.shape)


def _as_key_data(arg: RestoreArgs) -> RestoreArgs:
    """Restore args naming a typed PRNG key's dtype (and shape) as those of its stored key
    data, which is read as stored (as Orbax reads it); others as they are."""
    if arg is None or not _is_key_dtype(arg.dtype):
        return arg
    if isinstance(arg, ArrayRestoreArgs) and (shape := _key_data_shape(arg)) is not None:
        return dataclasses.replace(arg, dtype=None, global_shape=shape, shape=shape)
    return dataclasses.replace(arg, dtype=None)


async def _record_array_metadatas(infos: Sequence[ParamInfo], values: Sequence[jax.Array],
                                  impls: Sequence[str | None]) -> None:
    """Adds each array's write shape and chunk shape, and a typed PRNG key's implementation
    (``ext_metadata.random_key_impl``), to this process's ``array_metadatas/process_<i>``
    document of ``info.parent_dir``, as Orbax's ArrayHandler with an ``array_metadata_store``
    records them (entries of other names kept)."""
    index = current_roles().index
    by_dir: dict[str, list[tuple[ParamInfo, jax.Array, str | None]]] = {}
    for info, value, impl in zip(infos, values, impls, strict=True):
        by_dir.setdefault(str(info.parent_dir), []).append((info, value, impl))
    for group in by_dir.values():
        path = group[0][0].parent_dir / fmt.ARRAY_METADATAS / f"process_{index}"
        raw = await storage.read_optional(path)
        entries = {w.array_metadata.param_name: w for w in (
            fmt.decode(raw, fmt.ArrayMetadatas, where=str(path)).array_metadatas
            if raw is not None else [])}
        for info, value, impl in group:
            shape = ser.shard_shape(value.sharding, tuple(value.shape))
            entries[info.name] = fmt.ArrayMetadataWrapper(fmt.ArrayMetadataEntry(
                info.name, shape, shape, {RANDOM_KEY_IMPL: impl} if impl is not None else None))
        await storage.write_files([(path, fmt.encode(fmt.ArrayMetadatas(list(entries.values()))))])


async def recorded_key_impls(directory: Any) -> dict[str, str]:
    """The typed PRNG keys the ``array_metadatas`` of ``directory`` record: name -> impl."""
    folder = directory / fmt.ARRAY_METADATAS
    keys: dict[str, str] = {}
    for name in await storage.listdir(folder):  # (none when it does not exist)
        path = folder / name
        doc = fmt.decode(await storage.read_bytes(path), fmt.ArrayMetadatas, where=str(path))
        for wrapper in doc.array_metadatas:
            entry = wrapper.array_metadata
            if isinstance(entry.ext_metadata, dict) and RANDOM_KEY_IMPL in entry.ext_metadata:
                keys.setdefault(entry.param_name, str(entry.ext_metadata[RANDOM_KEY_IMPL]))
    return keys


class NumpyHandler(_ArrayLike):
    """NumPy arrays (Orbax's ``np.ndarray`` handler)."""

    _typestr = "np.ndarray"

    def __init__(self, metadata_key: str | None = None, ocdbt_process_id: str | None = None,
                 deepcopy_host_arrays: bool = True) -> None:
        self.metadata_key = metadata_key
        self.ocdbt_process_id = ocdbt_process_id
        self.deepcopy_host_arrays = deepcopy_host_arrays


class ScalarHandler(NumpyHandler):
    """Python and NumPy scalars."""

    _typestr = "scalar"

    def _restored(self, arr: np.ndarray, arg: RestoreArgs | None, info: ParamInfo) -> Any:
        rtype = getattr(arg, "restore_type", None)
        if isinstance(rtype, type) and (rtype in (int, float, bool, complex)
                                        or issubclass(rtype, np.generic)):
            return rtype(arr.item())
        # (a Python scalar, as Orbax's gives it: the pytree handlers bring back the type each
        # scalar was saved as themselves)
        return arr.item() if arr.ndim == 0 else arr


class ArrayHandler(_ArrayLike):
    """``jax.Array`` leaves. Restored with :class:`ArrayRestoreArgs` they are placed on its
    sharding; ``primary_host``, ``replica_id`` and the replica-parallel options are Orbax's
    and kept (ckpt_async writes the replica-0 shards of each array, from every process)."""

    _typestr = "jax.Array"

    def __init__(self, metadata_key: str | None = None, primary_host: int | None = 0,
                 replica_id: int | None = 0, use_replica_parallel: bool | None = None,
                 min_slice_bytes_for_replica_parallel: int | None = None,
                 max_replicas_for_replica_parallel: int | None = None,
                 enable_write_sharding_file: bool = True, array_metadata_store: Any = None,
                 enable_replica_parallel_separate_folder: bool = False,
                 dispatcher: Any = None, callback: Any = None) -> None:
        self.metadata_key = metadata_key
        self.primary_host = primary_host
        self.replica_id = replica_id
        self.use_replica_parallel = use_replica_parallel
        self.min_slice_bytes_for_replica_parallel = min_slice_bytes_for_replica_parallel
        self.max_replicas_for_replica_parallel = max_replicas_for_replica_parallel
        self.enable_write_sharding_file = enable_write_sharding_file
        self.array_metadata_store = array_metadata_store
        self.enable_replica_parallel_separate_folder = enable_replica_parallel_separate_folder
        if dispatcher is not None:
            raise InvalidArgumentError("ArrayHandler(dispatcher=...): Pathways dispatchers are not "
                                       "supported by ckpt_async")
        self.callback = callback

    async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                        args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
        """Writes each array as :class:`NumpyHandler` does, and its sharding into the
        ``_sharding`` document of ``info.parent_dir`` (unless ``enable_write_sharding_file``
        is false; from the primary process), where :meth:`deserialize` finds it when restore
        args give none and :meth:`metadata` reads it, as Orbax's ArrayHandler does."""
        _check_lengths(infos, values, args)
        # (a typed PRNG key is stored as its key data, as Orbax stores it)
        impls = [str(jax.random.key_impl(v)) if isinstance(v, jax.Array)
                 and _is_key_dtype(v.dtype) else None for v in values]
        values = [jax.random.key_data(v) if impl is not None else v
                  for v, impl in zip(values, impls, strict=True)]
        futures = await super().serialize(values, infos, args)
        if self.enable_write_sharding_file and current_roles().is_primary:
            entries = [(info, text) for value, info in zip(values, infos, strict=True)
                       if isinstance(value, jax.Array)
                       and (text := ser.sharding_to_json(value.sharding)) is not None]
            if entries:
                await _write_sharding_entries(entries)
        if self.array_metadata_store is not None:
            arrays = [(i, v, k) for i, v, k in zip(infos, values, impls, strict=True)
                      if isinstance(v, jax.Array)]
            if arrays:
                await _record_array_metadatas(*zip(*arrays, strict=True))
        return futures

    async def _sharding_metadatas(self, infos: Sequence[ParamInfo]) -> list[Any]:
        docs = await _sharding_documents(infos)
        out = []
        for info in infos:
            text = (docs[str(info.parent_dir)] or {}).get(info.name)
            out.append(sharding_metadata_from_json(json.loads(text)) if text else None)
        return out

    async def _shardings(self, infos: Sequence[ParamInfo], args: Sequence[RestoreArgs]
                         ) -> list[jax.sharding.Sharding | None]:
        """The sharding each array is restored onto: its restore args' (``mesh`` +
        ``mesh_axes``, or ``sharding``), else the one ``_sharding`` recorded when it was saved
        (as Orbax's); None for one restored as ``np.ndarray``."""
        out: list[jax.sharding.Sharding | None] = [None] * len(infos)
        wanted = []
        for i, arg in enumerate(args):
            if getattr(arg, "restore_type", None) is np.ndarray:
                continue
            if isinstance(arg, ArrayRestoreArgs):
                out[i] = sharding = arg.resolved_sharding(f"{infos[i].path}: ArrayRestoreArgs")
                shape = arg.global_shape
                if (isinstance(sharding, jax.sharding.NamedSharding) and _is_key_dtype(arg.dtype)
                        and shape is not None):
                    # (a typed PRNG key's stored key data has trailing dimensions: they are
                    # not split, as in Orbax)
                    trailing = len(_key_data_shape(arg) or ()) - len(shape)
                    out[i] = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
                        *sharding.spec, *[None] * trailing))
            if out[i] is None:
                wanted.append(i)
        if not wanted:
            return out
        docs = await _sharding_documents([infos[i] for i in wanted])
        for i in wanted:
            info = infos[i]
            doc = docs[str(info.parent_dir)]
            text = doc.get(info.name) if doc is not None else None
            if text is None:
                where = ("there is no " + fmt.SHARDING if doc is None
                         else f"{fmt.SHARDING} has no entry for it")
                raise InvalidArgumentError(
                    f"{info.parent_dir}: array {info.name!r} has no sharding to restore onto: "
                    f"its restore args give none and {where} (pass "
                    "ArrayRestoreArgs(sharding=...), or mesh and mesh_axes)")
            out[i] = ser.sharding_from_json(text)
            if out[i] is None:
                raise InvalidArgumentError(
                    f"{info.parent_dir}: array {info.name!r} was saved on devices this process "
                    "does not have; pass ArrayRestoreArgs(sharding=...) to place it")
        return out

    async def deserialize(self, infos: Sequence[ParamInfo],
                          args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
        """Reads each array onto its restore args' sharding, or the one it was saved with
        (see :meth:`serialize`); restore args are needed (``ValueError`` without them, as in
        Orbax); ``restore_type=np.ndarray`` gives the NumPy array."""
        if args is None:
            where = str(infos[0].parent_dir) if infos else "ArrayHandler.deserialize"
            raise InvalidArgumentError(
                f"{where}: ArrayHandler.deserialize needs restore args to restore as jax.Array "
                "(ArrayRestoreArgs, or RestoreArgs() to restore each array onto the sharding it "
                "was saved with)")
        _check_lengths(infos, args)
        shardings = await self._shardings(infos, args)
        args = [_as_key_data(arg) for arg in args]
        arrays = await self._read_all(infos, args)
        out = [self._placed(arr, arg, info, sharding)
               for arr, arg, info, sharding in zip(arrays, args, infos, shardings, strict=True)]
        if self.array_metadata_store is not None:
            # (as Orbax's with an array_metadata_store: the keys it records come back as keys)
            dirs = {str(i.parent_dir): i.parent_dir for i in infos}
            found = await asyncio.gather(*(recorded_key_impls(d) for d in dirs.values()))
            impls = dict(zip(dirs, found, strict=True))
            for i, info in enumerate(infos):
                impl = impls[str(info.parent_dir)].get(info.name)
                if impl is not None and isinstance(out[i], jax.Array) and not _is_key_dtype(
                        out[i].dtype):
                    out[i] = jax.random.wrap_key_data(out[i], impl=impl)
        return out

    def _placed(self, arr: np.ndarray, arg: RestoreArgs, info: ParamInfo,
                sharding: jax.sharding.Sharding | None) -> Any:
        shape = getattr(arg, "global_shape", None)
        if shape is not None and tuple(shape) != arr.shape:
            # (as Orbax's: the stored shape, or with strict=False the array cut or padded
            # with zeros to it)
            if getattr(arg, "strict", True) or len(shape) != arr.ndim:
                raise ShapeMismatchError(
                    f"{info.path}: the requested shape {tuple(shape)} is not the stored "
                    f"shape {arr.shape} (ArrayRestoreArgs(strict=False) cuts or pads it)")
            arr = ser.fit(arr, tuple(shape))
        if sharding is None:  # (restore_type=np.ndarray)
            return arr
        ser.check_sharding(info.parent_dir, info.name, arr.shape, sharding)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


class SingleReplicaArrayHandler(ArrayHandler):
    """Registered for ``jax.Array``: arrays restored with :class:`SingleReplicaArrayRestoreArgs`
    onto a sharding that spans processes are read only by the processes of replica
    ``primary_replica_id`` (the slice ``primary_replica_id`` of the mesh's axis
    ``replica_axis_index``) and broadcast to the other replicas, at most
    ``broadcast_memory_limit_bytes`` of arrays at a time (default: a fourth of the host's
    memory times ``broadcast_memory_scaling_factor``). Saves are as :class:`ArrayHandler`'s."""

    def __init__(self, replica_axis_index: int | None = 0, primary_replica_id: int | None = 0,
                 broadcast_memory_limit_bytes: int | None = None,
                 broadcast_memory_scaling_factor: float | None = 0.75, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replica_axis_index = replica_axis_index or 0
        self.primary_replica_id = primary_replica_id or 0
        self.broadcast_memory_limit_bytes = broadcast_memory_limit_bytes
        self.broadcast_memory_scaling_factor = broadcast_memory_scaling_factor


class StringHandler(TypeHandler):
    """Strings, each at its name's JSON pointer in ``filename`` of the item directory."""

    def __init__(self, filename: str | None = None) -> None:
        self._filename = filename or "_strings.json"

    def typestr(self) -> str:
        return "string"

    def _spec(self, info: ParamInfo) -> dict[str, Any]:
        kvstore = ser.kvstore_base(info.parent_dir)
        return {"driver": "json", "kvstore": {**kvstore, "path": kvstore["path"] + self._filename},
                "json_pointer": "/" + info.name}

    async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                        args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
        _check_lengths(infos, values, args)
        if current_roles().is_primary:
            for value, info in zip(values, infos, strict=True):
                store = await ts.open(self._spec(info), context=_context(info))
                await store.write(value)
        return []

    async def deserialize(self, infos: Sequence[ParamInfo],
                          args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
        _check_lengths(infos, args)

        async def one(info: ParamInfo) -> Any:
            store = await ts.open(self._spec(info), context=_context(info))
            return (await store.read()).item()

        return await asyncio.gather(*(one(i) for i in infos))

    async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
        _check_lengths(infos)
        return [StringMetadata(info.name, info.parent_dir) for info in infos]


class PlaceholderHandler(TypeHandler):
    """:data:`PLACEHOLDER` leaves: nothing is written, and they restore as themselves."""

    def typestr(self) -> str:
        return "placeholder"

    async def serialize(self, values: Sequence[Any], infos: Sequence[ParamInfo],
                        args: Sequence[SaveArgs] | None = None) -> Sequence[Any]:
        return []

    async def deserialize(self, infos: Sequence[ParamInfo],
                          args: Sequence[RestoreArgs] | None = None) -> Sequence[Any]:
        return [PLACEHOLDER] * len(infos)

    async def metadata(self, infos: Sequence[ParamInfo]) -> Sequence[Any]:
        return [PLACEHOLDER] * len(infos)


#: Handlers whose leaves the pytree handlers write and read themselves.
_BUILTIN_CLASSES = frozenset({NumpyHandler, ScalarHandler, ArrayHandler, SingleReplicaArrayHandler,
                              StringHandler, PlaceholderHandler})


def is_builtin(handler: TypeHandler, methods: tuple[str, ...] = ("typestr", "serialize")) -> bool:
    """Whether ``handler`` writes (``methods``) as ckpt_async's built-in one it is: not a
    subclass overriding them (one overriding only ``deserialize`` still writes as they do)."""
    cls = type(handler)
    base = next((b for b in cls.__mro__ if b in _BUILTIN_CLASSES), None)
    return base is not None and all(getattr(cls, m) is getattr(base, m) for m in methods)


class TypeHandlerRegistry:
    """Type -> handler (the first entry whose test accepts the type wins), and typestr ->
    handler."""

    def __init__(self, *handlers: tuple[Any, TypeHandler]) -> None:
        self._entries: list[tuple[Callable[[Any], bool], TypeHandler]] = []
        self._by_typestr: dict[str, TypeHandler] = {}
        self._custom: dict[type, TypeHandler | None] = {}  # (custom_handler's, per type)
        #: whether any handler registered is not a built-in one (else saves need not ask)
        self.has_custom = False
        for ty, handler in handlers:
            self.add(ty, handler, override=True, ignore_warnings=True)

    def add(self, ty: Any, handler: TypeHandler, func: Callable[[Any], bool] | None = None,
            override: bool = False, ignore_warnings: bool = False) -> None:
        if not isinstance(handler, TypeHandler):
            raise InvalidTypeError(f"register a TypeHandler for {ty!r}, not a "
                                   f"{type(handler).__name__}")
        if func is None:
            def func(t: Any, ty: Any = ty) -> bool:
                return isinstance(t, type) and issubclass(t, ty)
        existing = next((i for i, (f, _h) in enumerate(self._entries) if f(ty)), None)
        if existing is None:
            if handler.typestr() in self._by_typestr and not override:
                raise InvalidArgumentError(f'Type "{ty}" has a `typestr` ("{handler.typestr()}")'
                                           " which collides with that of an existing "
                                           "TypeHandler.")
            self._entries.append((func, handler))
        elif override:
            if not ignore_warnings:
                log.info("type handler registry: %s now handled by %s", ty, type(handler).__name__)
            self._entries[existing] = (func, handler)
        else:
            raise InvalidArgumentError(f'A TypeHandler for "{ty}" is already registered.')
        self._by_typestr[handler.typestr()] = handler
        self._custom.clear()
        self.has_custom = not all(is_builtin(h) for _f, h in self._entries)

    def get(self, ty: Any) -> TypeHandler:
        if isinstance(ty, str):
            if ty in self._by_typestr:
                return self._by_typestr[ty]
        else:
            for func, handler in self._entries:
                if func(ty):
                    return handler
        raise InvalidArgumentError(f'Unknown type: "{ty}". Must register a TypeHandler.')

    def has(self, ty: Any) -> bool:
        try:
            self.get(ty)
        except ValueError:
            return False
        return True

    def handler_for(self, ty: type) -> TypeHandler | None:
        """The handler of ``ty``, or None."""
        return next((h for func, h in self._entries if func(ty)), None)

    def overriding_readers(self) -> dict[str, TypeHandler]:
        """Array kinds (typestrs) whose handler is a built-in one's subclass that reads them
        its own way (``deserialize`` overridden): it is given the leaves ckpt_async wrote."""
        out = {}
        for kind in ("jax.Array", "np.ndarray", "scalar"):
            handler = self._by_typestr.get(kind)
            if handler is not None and is_builtin(handler) and not is_builtin(
                    handler, ("deserialize",)):
                out[kind] = handler
        return out

    def custom_handler(self, ty: type) -> TypeHandler | None:
        """The handler of ``ty`` if one is registered and it is not a built-in one."""
        try:
            return self._custom[ty]
        except KeyError:
            pass
        handler = self.handler_for(ty)
        found = self._custom[ty] = None if handler is None or is_builtin(handler) else handler
        return found


_DEFAULT_TYPES: tuple[tuple[Any, Callable[[], TypeHandler]], ...] = (
    (int, ScalarHandler), (float, ScalarHandler), (bytes, ScalarHandler),
    (np.number, ScalarHandler), (np.ndarray, NumpyHandler), (jax.Array, ArrayHandler),
    (str, StringHandler), (type(PLACEHOLDER), PlaceholderHandler))


def create_type_handler_registry(*handlers: tuple[Any, TypeHandler]) -> TypeHandlerRegistry:
    """A registry holding ``handlers`` only."""
    return TypeHandlerRegistry(*handlers)


GLOBAL_TYPE_HANDLER_REGISTRY = create_type_handler_registry(
    *((ty, make()) for ty, make in _DEFAULT_TYPES))


def register_type_handler(ty: Any, handler: TypeHandler,
                          func: Callable[[Any], bool] | None = None,
                          override: bool = False) -> None:
    """Registers ``handler`` for ``ty`` (and its subclasses, or the types ``func`` accepts);
    ``ValueError`` if one is registered already and not ``override``."""
    GLOBAL_TYPE_HANDLER_REGISTRY.add(ty, handler, func, override)


def get_type_handler(ty: Any) -> TypeHandler:
    """The handler registered for ``ty`` (a type, or a typestr); ``ValueError`` if none."""
    return GLOBAL_TYPE_HANDLER_REGISTRY.get(ty)


def has_type_handler(ty: Any) -> bool:
    return GLOBAL_TYPE_HANDLER_REGISTRY.has(ty)


def supported_types() -> list[Any]:
    """The types the default registry has handlers for."""
    return [ty for ty, _make in _DEFAULT_TYPES]


def is_supported_empty_value(value: Any, pytree_metadata_options: Any = None) -> bool:
    """Whether ``value`` is an empty node a pytree checkpoint records as such: None, or an
    empty dict, list, tuple or other mapping (an ``OrderedDict``, ``defaultdict``, ...); an
    empty named tuple only with Orbax's ``PyTreeMetadataOptions(support_rich_types=True)``,
    as in Orbax."""
    if is_namedtuple(value):
        return not value and bool(getattr(pytree_metadata_options, "support_rich_types", False))
    return value is None or (isinstance(value, (dict, list, tuple, Mapping)) and not value)


def is_supported_type(value: Any, pytree_metadata_options: Any = None) -> bool:
    """Whether a pytree handler saves ``value``: an empty node, or a value whose type the
    global registry has a handler for."""
    return (is_supported_empty_value(value, pytree_metadata_options)
            or has_type_handler(type(value)))


def is_ocdbt_checkpoint(path: Any) -> bool:
    """Whether the item directory ``path`` holds its arrays in an OCDBT database."""
    from ._runtime import get_runtime
    from ._storage import exists

    return bool(get_runtime().call(exists, coerce(path) / MANIFEST))


def get_ts_context(*, use_ocdbt: bool = True, file_io_concurrency_limit: int | None = None,
                   data_copy_concurrency_limit: int | None = None) -> ts.Context:
    """A TensorStore context as ckpt_async reads and writes an item with (an OCDBT node cache,
    file I/O concurrency), for a handler's or a user's own TensorStore calls."""
    return ser.new_context(use_ocdbt=use_ocdbt,
                           file_io_concurrency_limit=file_io_concurrency_limit,
                           data_copy_concurrency_limit=data_copy_concurrency_limit)


def get_json_tspec_read(info: ParamInfo, use_ocdbt: bool, metadata_key: str | None = None,
                        raise_array_data_missing_error: bool = True) -> dict[str, Any]:
    """The TensorStore spec that opens the array ``info`` names for reading (in the item's
    OCDBT database, or its own zarr folder; zarr v3 where ``info.use_zarr3``)."""
    return ser.array_spec(info.parent_dir, info.name, use_ocdbt=use_ocdbt,
                          use_zarr3=bool(info.use_zarr3),
                          fill_missing=not raise_array_data_missing_error)


__all__ = [
    "PLACEHOLDER", "ArrayHandler", "ArrayRestoreArgs", "NumpyHandler", "ParamInfo",
    "PlaceholderHandler", "RestoreArgs", "SaveArgs", "ScalarHandler", "SingleReplicaArrayHandler",
    "SingleReplicaArrayRestoreArgs", "StringHandler", "TypeHandler", "TypeHandlerRegistry",
    "create_type_handler_registry", "get_json_tspec_read", "get_ts_context",
    "get_type_handler", "has_type_handler", "is_ocdbt_checkpoint", "is_placeholder",
    "is_supported_empty_value", "is_supported_type", "register_type_handler",
    "supported_types",
]
