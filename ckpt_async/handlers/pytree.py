"""PyTreeCheckpointHandler and StandardCheckpointHandler: pytrees of arrays, scalars, strings.

Layout of an item directory (Orbax's): ``_METADATA`` (tree), ``_sharding``,
``array_metadatas/process_0``, ``_strings.json`` when the tree holds strings, and the arrays
in an OCDBT database (``manifest.ocdbt``, ``d/``), or with ``use_ocdbt=False`` each in a
zarr folder of its own (zarr v3 with ``use_zarr3=True``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import re
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from .. import _format as fmt
from .. import _integrity, _tree
from .. import _serialize as ser
from .. import _storage as storage
from .._ocdbt import MANIFEST
from .._paths import AnyPath, below, coerce, escapes
from .._progress import Tracker
from .._runtime import gc_paused, get_runtime
from .._stage import ByteBudget, cancel_all, cpu_sharding, stage, total_bytes
from ..args import (
    CheckpointArgs,
    PyTreeRestore,
    PyTreeSave,
    StandardRestore,
    StandardSave,
    register_with_handler,
)
from ..errors import (
    CorruptCheckpointError,
    HandlerError,
    InvalidArgumentError,
    InvalidTypeError,
    MissingKeyError,
    ShapeMismatchError,
    StructureMismatchError,
    UnsupportedLeafError,
    read_failure,
)
from ..metadata import (
    ArrayMetadata,
    ScalarMetadata,
    StorageMetadata,
    StringMetadata,
    TreeMetadata,
    sharding_metadata_from_json,
)
from ..multihost import Roles, current_roles
from ..transform_utils import RestoreTransform, Transform, apply_transformations
from ..tree import from_flat_dict, to_flat_dict
from ..type_handlers import (
    GLOBAL_TYPE_HANDLER_REGISTRY,
    PLACEHOLDER,
    RANDOM_KEY_IMPL,
    ArrayRestoreArgs,
    ParamInfo,
    RestoreArgs,
    SaveArgs,
    SingleReplicaArrayHandler,
    SingleReplicaArrayRestoreArgs,
    TypeHandler,
    TypeHandlerRegistry,
    decode_sharding_document,
    recorded_key_impls,
    sharding_key,
)
from . import _legacy
from .base import AsyncCheckpointHandler, Writer, engine_method

_SCALAR_DTYPES = {bool: np.dtype(bool), int: np.dtype(np.int64), float: np.dtype(np.float64),
                  complex: np.dtype(np.complex128)}

log = logging.getLogger("ckpt_async")


@dataclass(slots=True, eq=False)  # (not frozen: a frozen __init__ costs 4x, per leaf)
class _Planned:
    """One leaf of a save plan: its metadata entry, and what to stage for it."""

    leaf: _tree.Leaf
    value_type: str
    dtype: np.dtype | None
    scalar_tag: str | None = None
    key_impl: str | None = None  # a typed PRNG key's implementation (its key data is staged)
    handler: TypeHandler | None = None  # a registered TypeHandler's leaf: it writes the leaf


#: Exact array types and the kind of leaf they are (jax.Array implementations added as met):
#: most leaves are classified by one lookup.
_ARRAY_KINDS: dict[type, str] = {np.ndarray: "np.ndarray"}


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_UINT64_MAX = int(np.iinfo(np.uint64).max)


def _classify(leaf: _tree.Leaf, save_arg: SaveArgs | None, where: str,
              numpy_scalar: str = "scalar",
              custom: Callable[[type], TypeHandler | None] | None = None) -> _Planned:
    """What ``leaf`` becomes; a NumPy scalar the ``numpy_scalar`` kind ("np.ndarray" in the
    standard handler, as Orbax's; its tag still brings back its type here); ``custom`` gives
    the TypeHandler that writes leaves of a type, if one is registered and not built in."""
    v = leaf.value
    if custom is not None and (handler := custom(type(v))) is not None:
        return _Planned(leaf, handler.typestr(), None, handler=handler)
    cast = np.dtype(save_arg.dtype) if save_arg is not None and save_arg.dtype is not None else None
    if isinstance(v, jax.Array) and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
        # A typed PRNG key: its key data is stored, and its implementation recorded, as Orbax
        # does (``ext_metadata.random_key_impl`` in array_metadatas)
        leaf.value = jax.random.key_data(v)
        return _Planned(leaf, "jax.Array", None, key_impl=str(jax.random.key_impl(v)))
    kind = _ARRAY_KINDS.get(type(v))
    if kind is None and isinstance(v, jax.Array):
        kind = _ARRAY_KINDS[type(v)] = "jax.Array"
    if kind is not None:
        _check_storable(leaf, v.dtype, cast, where)
        if kind == "jax.Array" and v.is_deleted():
            raise UnsupportedLeafError(f"{where}: leaf {leaf.name!r} is a jax.Array that has been "
                                       "deleted (donated to a jitted function?)")
        return _Planned(leaf, kind, cast)
    if v is None:
        return _Planned(leaf, "None", None)
    if _tree.is_empty_node(v):  # (an empty node: as Orbax, a "None" entry, "Dict" if a mapping)
        return _Planned(leaf, "Dict" if isinstance(v, Mapping) else "None", None)
    if isinstance(v, (dict, list, tuple)) and not v:  # (Orbax's names for them)
        return _Planned(leaf, "Dict" if isinstance(v, dict) else
                        "Tuple" if isinstance(v, tuple) else "List", None)
    if isinstance(v, str):  # (np.str_ too, as Orbax stores it, before NumPy's scalars)
        return _Planned(leaf, "string", None)
    if isinstance(v, (np.ndarray, np.generic)):
        _check_storable(leaf, v.dtype, cast, where)
    if isinstance(v, jax.Array):
        return _Planned(leaf, "jax.Array", cast)
    if isinstance(v, np.ndarray):
        return _Planned(leaf, "np.ndarray", cast)
    if isinstance(v, np.generic):
        return _Planned(leaf, numpy_scalar, cast or v.dtype, f"np:{v.dtype.name}")
    if type(v) is int and not _INT64_MIN <= v <= _INT64_MAX:
        if 0 <= v <= _UINT64_MAX:  # (as Orbax stores it: a uint64 scalar)
            return _Planned(leaf, "scalar", cast or np.dtype(np.uint64), "int")
        raise UnsupportedLeafError(f"{where}: leaf {leaf.name!r} is an int outside the int64 "
                                   "and uint64 ranges, which cannot be checkpointed")
    if type(v) in _SCALAR_DTYPES:
        return _Planned(leaf, "scalar", cast or _SCALAR_DTYPES[type(v)], type(v).__name__)
    raise UnsupportedLeafError(
        f"{where}: leaf {leaf.name!r} is a {type(v).__module__}.{type(v).__qualname__}; supported "
        "leaves are jax.Array, np.ndarray, Python and NumPy scalars, strings and None, and types "
        "with a TypeHandler registered (ocp.type_handlers.register_type_handler)"
    )


def _check_storable(leaf: _tree.Leaf, dtype: Any, cast: np.dtype | None, where: str) -> None:
    for dt in (dtype, cast):
        if dt is not None and not ser.is_storable(np.dtype(dt)):
            raise UnsupportedLeafError(f"{where}: leaf {leaf.name!r} has dtype {dt}, which "
                                       "cannot be checkpointed")


def _save_args_by_name(save_args: Any, where: str) -> dict[str, SaveArgs]:
    if save_args is None:
        return {}
    pairs, _ = _tree.target_leaves(save_args)
    return {name: a for _k, name, a in pairs if isinstance(a, SaveArgs)}


def _refuse_args_off_the_tree(args_tree: Any, item: Any, kind: type, where: str, *,
                              partial: bool = False) -> None:
    """Raises when save or restore args stand at no leaf of ``item`` (they would not be
    used), as Orbax refuses args whose structure is not the item's: ``StructureMismatchError``
    (a ValueError). Partial restores (Orbax trims the args to the item) ignore args under
    keys the item lacks, and refuse args standing for a subtree of it with
    ``InvalidTypeError`` (a TypeError), as Orbax's do."""
    inner, outside = _tree.args_off_the_tree(args_tree, item, kind)
    if partial:
        outside = []
    if not inner and not outside:
        return
    shown = [f"at {', '.join(repr(n) if n else 'the whole tree' for n in names[:5])}"
             f"{' ...' if len(names) > 5 else ''} ({what})" for names, what in (
                 (inner, "a subtree of the item: give one per leaf"),
                 (outside, "not in the item")) if names]
    error = InvalidTypeError if partial else StructureMismatchError
    raise error(f"{where}: {kind.__name__} that stand at no leaf of the item would not be used: "
                f"{'; '.join(shown)}")


#: The key of ``_METADATA``'s ckpt_async extension naming the leaves TypeHandlers wrote.
TYPE_HANDLED = "type_handlers"


def _by_handler(items: Iterable[tuple[Any, Any]]) -> list[tuple[TypeHandler, list[Any]]]:
    groups: dict[int, tuple[TypeHandler, list[Any]]] = {}
    for handler, item in items:
        groups.setdefault(id(handler), (handler, []))[1].append(item)
    return list(groups.values())


def _failed(exc: BaseException, handler: TypeHandler, what: str, where: str,
            names: list[str]) -> BaseException:
    shown = ", ".join(map(repr, names[:5])) + (" ..." if len(names) > 5 else "")
    exc.add_note(f"{where}: {type(handler).__name__}.{what} failed on leaves {shown}")
    return exc


async def _serialize_custom(planned: list[_Planned], directory: AnyPath,
                            save_args: Any, use_zarr3: bool) -> list[Any]:
    """Has each registered TypeHandler write its leaves (all of its leaves in one call, as
    Orbax does, told the item's zarr version: a restore tells it the same); returns the
    futures they left running."""
    by_name = _save_args_by_name(save_args, str(directory))
    ctx = ser.new_context()
    running: list[Any] = []
    for handler, group in _by_handler((p.handler, p) for p in planned):
        names = [p.leaf.name for p in group]
        infos = [ParamInfo(name=p.leaf.name, parent_dir=directory, keypath=tuple(p.leaf.keys),
                           is_ocdbt_checkpoint=False, use_zarr3=use_zarr3, ts_context=ctx,
                           value_typestr=p.value_type)
                 for p in group]
        try:
            running.extend(await handler.serialize(
                [p.leaf.value for p in group], infos,
                [by_name.get(n) or SaveArgs() for n in names]) or ())
        except Exception as exc:
            raise _failed(exc, handler, "serialize", str(directory), names)
    return running


async def _keep_handlers_documents(directory: AnyPath, docs: dict[str, bytes]) -> None:
    """Keeps in the item's ``_sharding`` and ``array_metadatas/process_<i>`` (``docs``, this
    process's) the entries TypeHandlers wrote there while they saved their leaves (the
    built-in ArrayHandler, handed arrays by a handler of the user's, records each one's
    sharding, and with an ``array_metadata_store`` its shapes and a PRNG key's
    implementation, as Orbax's does): the item's own documents would replace them."""
    names = [n for n in docs if n.startswith(f"{fmt.ARRAY_METADATAS}/")]
    names += [fmt.SHARDING] if fmt.PYTREE_METADATA in docs else []  # (the primary writes it)
    found = await asyncio.gather(*(storage.read_optional(directory / n) for n in names))
    for name, raw in zip(names, found, strict=True):
        if raw is None:
            continue
        where = str(directory / name)
        if name == fmt.SHARDING:
            theirs = fmt.decode(raw, dict[str, str], where=where)
            ours = fmt.decode(docs[name], dict[str, str], where=where) if name in docs else {}
            docs[name] = fmt.encode({**theirs, **ours})
            continue
        entries = {w.array_metadata.param_name: w for w in [
            *fmt.decode(raw, fmt.ArrayMetadatas, where=where).array_metadatas,
            *fmt.decode(docs[name], fmt.ArrayMetadatas, where=where).array_metadatas]}
        docs[name] = fmt.encode(fmt.ArrayMetadatas(list(entries.values())))


#: The other arguments of Orbax's PyTreeCheckpointHandler and StandardCheckpointHandler.
_ORBAX_HANDLER_OPTIONS = frozenset({
    "save_concurrent_gb", "restore_concurrent_gb", "save_device_host_concurrent_gb",
    "memory_limit_options", "use_ocdbt", "use_zarr3", "multiprocessing_options",
    "type_handler_registry", "handler_impl", "pytree_metadata_options",
    "array_metadata_validator", "enable_pinned_host_transfer", "is_prioritized_key_fn"})


_told_rich_types = False


def _warn_rich_types(handler: str) -> None:
    """Says, once per process, that ``support_rich_types=True`` changes nothing here."""
    global _told_rich_types
    if _told_rich_types:
        return
    _told_rich_types = True
    warnings.warn(
        f"{handler}(pytree_metadata_options=PyTreeMetadataOptions(support_rich_types=True)) "
        "has no effect in ckpt_async: Orbax's rich-typed 'value_metadata_tree' is neither "
        "written to _METADATA (Orbax, reading with rich types, gives lists and dicts for the "
        "tuples and named tuples) nor read from a checkpoint Orbax wrote (it restores as "
        "without rich types); a checkpoint ckpt_async wrote restores with its tuples and "
        "named tuples either way (see docs/migration.md)", UserWarning, stacklevel=3)


def _budget_bytes(value: Any, handler: str) -> int | None:
    """``host_memory_budget_bytes`` checked: None (no budget) or a positive int. (0 or less
    staged every array alone, a float or a string was taken, the latter failing the save.)"""
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidTypeError(f"{handler}(host_memory_budget_bytes={value!r}): must be an int "
                               "(bytes), or None for no budget")
    value = int(value.__index__())
    if value <= 0:
        raise InvalidArgumentError(f"{handler}(host_memory_budget_bytes={value}): must be "
                                   "positive (bytes), or None for no budget")
    return value


class PyTreeCheckpointHandler(AsyncCheckpointHandler):
    """Saves and restores a pytree (``PyTreeSave`` / ``PyTreeRestore``).

    ``host_memory_budget_bytes`` bounds the bytes staged in host memory but not yet written:
    with a budget smaller than the state, ``save`` waits for writes (slower, never wrong).
    ``use_compression`` writes zstd-compressed chunks (Orbax's default; off here by default).
    ``use_ocdbt=False`` writes each array as a zarr array in a folder of its own, and
    ``use_zarr3=True`` as zarr v3, in Orbax's layout for those options (``docs/format.md``);
    every layout is read whatever they say. Orbax's other arguments are accepted, without
    effect (see the migration guide); a name Orbax does not have raises ``TypeError``.
    """

    typestr = fmt.PYTREE_TYPESTR
    _allow_strings = True
    _numpy_scalars_as_arrays = False

    def __init__(
        self,
        aggregate_filename: str | None = None,
        *,
        host_memory_budget_bytes: int | None = None,
        use_compression: bool = False,
        **orbax_options: Any,
    ) -> None:
        unknown = sorted(set(orbax_options) - _ORBAX_HANDLER_OPTIONS)
        #: Orbax's switch of the pinned-host path of arrays on a GPU (None: ckpt_async's
        #: default, ``_stage.PINNED_HOST_TRANSFER``); a save's own ``PyTreeSave`` one wins.
        self._pinned: bool | None = orbax_options.get("enable_pinned_host_transfer")
        if unknown:
            raise InvalidTypeError(f"{type(self).__name__}() got unexpected keyword argument(s) "
                                   f"{', '.join(map(repr, unknown))}")
        if getattr(orbax_options.get("pytree_metadata_options"), "support_rich_types", False):
            _warn_rich_types(type(self).__name__)
        # One budget per handler: it bounds the bytes staged-but-unwritten of all its saves in
        # flight together, not of each save alone.
        self._budget = ByteBudget(_budget_bytes(host_memory_budget_bytes, type(self).__name__))
        self._compress = use_compression
        self._use_ocdbt = bool(orbax_options.get("use_ocdbt", True))
        self._use_zarr3 = bool(orbax_options.get("use_zarr3", False))
        self._type_registry: TypeHandlerRegistry | None = orbax_options.get(
            "type_handler_registry")
        #: the msgpack file of Orbax's first format (read, never written: ``_legacy``)
        self._aggregate_file = aggregate_filename or _legacy.AGGREGATE_FILE

    @property
    def type_registry(self) -> TypeHandlerRegistry:
        """The TypeHandler registry this handler consults (its own, else the global one)."""
        return self._type_registry or GLOBAL_TYPE_HANDLER_REGISTRY

    # -- save -----------------------------------------------------------------------------------
    def plan(self, item: Any, save_args: Any, where: str) -> tuple[list[_Planned], Any]:
        """Pure: validates the tree and decides what each leaf becomes. Raises before any I/O."""
        if item is None:
            raise InvalidArgumentError(f"{where}: nothing to save (item is None)")
        try:
            leaves, skeleton = _tree.flatten(item)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{where}: {exc}") from None
        by_name = _save_args_by_name(save_args, where)
        # (no set of every leaf's name on the blocking path unless save args are given)
        if by_name and not by_name.keys() <= {leaf.name for leaf in leaves}:
            _refuse_args_off_the_tree(save_args, item, SaveArgs, where)
        kind = "np.ndarray" if self._numpy_scalars_as_arrays else "scalar"
        custom = self.type_registry.custom_handler if self.type_registry.has_custom else None
        planned = [_classify(leaf, by_name.get(leaf.name), where, kind, custom) for leaf in leaves]
        if not self._allow_strings:
            for p in planned:
                if p.value_type == "string" and p.handler is None:
                    raise UnsupportedLeafError(
                        f"{where}: leaf {p.leaf.name!r} is a string; StandardSave takes arrays and"
                        " scalars (use PyTreeSave for strings)"
                    )
        return planned, skeleton

    async def stage(self, directory: AnyPath, args: PyTreeSave | StandardSave) -> Writer:
        where = str(directory)
        if getattr(args, "partial_update", False):
            raise InvalidArgumentError(f"{where}: PyTreeSave(partial_update=True) is not supported")
        if args.custom_metadata is not None:
            fmt.require_json(args.custom_metadata, f"{where}: custom_metadata")
        planned, skeleton = self.plan(args.item, args.save_args, where)
        strings = {p.leaf.name: p.leaf.value for p in planned
                   if p.value_type == "string" and p.handler is None}
        try:
            strings_doc = fmt.encode(fmt.strings_document(strings)) if strings else None
        except ValueError as exc:
            raise InvalidArgumentError(f"{where}: {exc}") from exc
        roles = current_roles()
        if roles.multi and roles.is_primary:
            _refuse_arrays_of_another_process_only(planned, roles, where)
        if not self._use_ocdbt:
            _refuse_names_without_folders(planned, where)
        await storage.makedirs(directory)
        # Leaves of registered TypeHandlers are written by them, now (Orbax's contract: a
        # handler copies what it needs before it returns, and may leave futures running).
        custom = [p for p in planned if p.handler is not None]
        running = (await _serialize_custom(custom, directory, args.save_args, self._use_zarr3)
                   if custom else [])
        handed = bool(custom)
        # With several processes each writes the shards it owns (replica 0) into its own OCDBT
        # database, as Orbax does; arrays held whole by every process (NumPy, scalars, jax
        # arrays on this process's devices only) are written once, by the primary.
        to_stage = [(p.leaf.value, p.leaf.name, p.dtype) for p in planned
                    if p.value_type in _STORED and p.handler is None
                    and (roles.is_primary or (p.value_type == "jax.Array"
                                              and not p.leaf.value.is_fully_addressable))]
        # Under a memory budget every array TensorStore writes takes its kvstore path (as every
        # one ckpt_async writes itself does): its bytes are freed when the write lands, while
        # the zarr driver keeps its own buffers past the budget's release.
        nbytes = total_bytes(to_stage)
        writer = ser.ItemWriter(directory, compress=self._compress, direct_max_bytes=(
            math.inf if self._budget.limit is not None else ser.DIRECT_WRITE_MAX_BYTES),
            total_bytes=nbytes, process_index=roles.index if roles.multi else None,
            memory_budget=self._budget.limit, use_ocdbt=self._use_ocdbt,
            use_zarr3=self._use_zarr3)
        tracker = Tracker("save", directory, nbytes)

        async def write_batch(batch: list[ser.StoredArray]) -> None:
            await writer.write(batch)
            tracker.add(sum(a.nbytes for a in batch))

        try:
            pinned = getattr(args, "enable_pinned_host_transfer", None)
            tasks = await stage(to_stage, self._budget, write_batch,
                                pinned=self._pinned if pinned is None else pinned)
        except BaseException:
            await writer.settle()  # (the threads of batches handed over before the failure)
            raise
        all_in = writer.expect_batches(len(tasks))

        async def abort(extra: Sequence[asyncio.Future[Any]] = (), settle: bool = True) -> None:
            await cancel_all([*tasks, *extra])
            if settle:
                await writer.settle()

        try:
            custom = copy.deepcopy(args.custom_metadata)  # the caller may change it after save()
        except BaseException:
            await abort()
            raise

        def documents() -> dict[str, bytes]:
            # Built off the blocking path: it needs only names, kinds and shardings. Its
            # per-array objects are acyclic and die before the pause ends: no collection.
            with gc_paused():
                return self._documents(planned, skeleton, custom, roles, strings_doc)

        async def build_documents() -> dict[str, bytes]:
            await asyncio.wrap_future(all_in)
            return await asyncio.wrap_future(get_runtime().start_background(documents))

        async def write() -> None:
            # The documents are built while the arrays are written, once every batch is in
            # the page cache (the disk takes it from there), started at once
            # (``start_background``: not queued behind the writes in the pool).
            building = asyncio.ensure_future(build_documents())
            try:
                await asyncio.gather(*tasks)
                for future in running:  # (a TypeHandler's own writes)
                    await asyncio.to_thread(future.result)
                await writer.finish()
                docs = await building
                if handed:
                    await _keep_handlers_documents(directory, docs)
            except BaseException as exc:
                # (a commit that timed out or was dropped is not held here by writes a store
                # that stopped answering keeps retrying: its checkpointer waits for them only
                # a while, ABORT_GRACE_SECS, before the directory goes)
                await abort([building], settle=not isinstance(exc, asyncio.CancelledError))
                if writer.lost_race:  # (another save's item is there: its own files go)
                    await writer.discard()
                raise
            # (with several processes the primary merges their checksums when finalizing)
            docs[_integrity.partial_checksums_name(roles.index) if roles.multi
                 else _integrity.CHECKSUMS] = _integrity.checksums_document(
                docs, writer.checksums, writer.chunks, writer.index_hint)
            files = [(directory / name, data) for name, data in docs.items()]
            if roles.multi and roles.is_primary:
                primary_docs.extend(files)  # (once the root database is this save's)
                return
            await storage.write_files(files)

        primary_docs: list[tuple[AnyPath, bytes]] = []

        async def finalize() -> None:
            if roles.multi:
                # The primary's documents are written only once every process's part is in
                # (each database went to this save) and merged, as a single process writes its
                # own after its merge: a save that lost a race on another process, writing in
                # place on an object store, never writes them over the winner's. The item's
                # root database carries the uuid of the primary's writer: the per-process
                # databases do not decide every race alone (a single process's save of this
                # path writes none of them, only the root one, and so does a save whose
                # primary is another process, or whose processes hold no shard), and a merge
                # into a root database another save made fails as a lost race rather than
                # adding this save's keys to the other's.
                try:
                    await ser.merge_process_databases(directory, roles.count, writer.db_uuid)
                except Exception as exc:
                    if ser.lost_race(exc):
                        raise writer.race_error(directory) from exc
                    raise
                await storage.write_files(primary_docs)
                await _integrity.merge_partial_checksums(directory, roles.count)

        return Writer(write, nbytes, len(to_stage), finalize, abort, writer.discard)

    async def existing_item(self, directory: AnyPath, args: Any) -> AnyPath | None:
        """The OCDBT manifest of an item already in ``directory``: the arrays go into a new
        database there, whose manifest would be refused by that one only once the data files
        were written."""
        manifest = coerce(directory) / MANIFEST
        return manifest if await storage.exists(manifest) else None

    def _documents(self, planned: list[_Planned], skeleton: Any, custom: Any,
                   roles: Roles, strings_doc: bytes | None) -> dict[str, bytes]:
        """The item's documents this process writes: every one on the primary, only its own
        ``array_metadatas/process_<i>`` on the others (``strings_doc``: ``_strings.json``)."""
        entries: dict[str, fmt.TreeEntry] = {}
        shardings: dict[str, str] = {}
        array_metas: list[fmt.ArrayMetadataWrapper] = []
        scalars: dict[str, str] = {}
        random_keys: dict[str, str] = {}
        handled: dict[str, str] = {}  # leaves a TypeHandler wrote: name -> its typestr
        key_entry, tree_entry, value_meta = fmt.KeyEntry, fmt.TreeEntry, fmt.ValueMetadata
        for p in planned:
            leaf = p.leaf
            write_shape = None
            if p.handler is not None:
                handled[leaf.name] = p.value_type
            elif p.value_type == "jax.Array":
                v = leaf.value
                sharding = v.sharding
                write_shape = ser.shard_shape(sharding, v.shape)
                sjson = ser.sharding_to_json(sharding)
                if sjson is not None:
                    shardings[sharding_key(leaf.name)] = sjson
                ext = None
                if p.key_impl is not None:
                    ext = {RANDOM_KEY_IMPL: p.key_impl}
                    random_keys[leaf.name] = p.key_impl
                array_metas.append(fmt.ArrayMetadataWrapper(fmt.ArrayMetadataEntry(
                    leaf.name, write_shape, write_shape, ext)))
            if p.scalar_tag is not None:
                scalars[leaf.name] = p.scalar_tag
            keys = list(map(str, leaf.keys))
            entries[_tree.tuple_key(keys)] = tree_entry(  # (Leaf.tuple_key, keys made once)
                list(map(key_entry, keys, leaf.key_types)),
                value_meta(p.value_type, p.value_type in _tree.EMPTY_TYPES, write_shape))
        tree_doc = fmt.TreeMetadata(
            entries, use_ocdbt=self._use_ocdbt, use_zarr3=self._use_zarr3, custom_metadata=custom,
            store_array_data_equal_to_fill_value=True,  # (every chunk is stored)
            ckpt_async={"version": STRINGS_AT_POINTERS, "skeleton": skeleton,
                        "scalars": scalars, **({"random_keys": random_keys} if random_keys else {}),
                        **({TYPE_HANDLED: handled} if handled else {})})
        # (as Orbax: no ``array_metadatas`` nor ``_sharding`` for a tree without jax arrays)
        docs = {f"{fmt.ARRAY_METADATAS}/process_{roles.index}":
                fmt.encode(fmt.ArrayMetadatas(array_metas))} if array_metas else {}
        if not roles.is_primary:
            return docs
        docs[fmt.PYTREE_METADATA] = fmt.encode(tree_doc, values=custom)
        if shardings:
            docs[fmt.SHARDING] = fmt.encode(shardings)
        if strings_doc is not None:
            docs[fmt.STRINGS] = strings_doc
        return docs

    # -- read -----------------------------------------------------------------------------------
    async def read_documents(self, directory: AnyPath) -> tuple[
            fmt.TreeMetadata, dict[str, str], dict, _integrity.Checksums | None,
            _legacy.Aggregated | None]:
        """The item's documents (read at once), each checked against ``_CHECKSUMS`` when
        present, and the values an Orbax before 0.5 aggregated into its msgpack file."""
        sums, raw, raw_shardings, raw_strings = await asyncio.gather(
            _integrity.read_checksums(directory),
            storage.read_optional(directory / fmt.PYTREE_METADATA),
            storage.read_optional(directory / fmt.SHARDING),
            storage.read_optional(directory / fmt.STRINGS))
        if raw is None:  # (Orbax before 0.3: the tree is in the msgpack file; else none is here)
            doc, in_file = await _legacy.tree_without_metadata(directory, self._aggregate_file)
            return doc, {}, {}, sums, in_file
        for name, data in ((fmt.PYTREE_METADATA, raw), (fmt.SHARDING, raw_shardings),
                           (fmt.STRINGS, raw_strings)):
            if data is not None:
                _integrity.check_document(directory, name, data, sums)
        tree_doc = fmt.decode(raw, fmt.TreeMetadata, where=str(directory / fmt.PYTREE_METADATA))
        if sums is None and tree_doc.ckpt_async is not None:
            # (ckpt_async writes every item of its own with them; Orbax's have none)
            raise CorruptCheckpointError(
                f"{directory / _integrity.CHECKSUMS}: missing (ckpt_async wrote this item with "
                "the checksums of its data and documents: without them nothing could be "
                "checked)")
        if tree_doc.ckpt_async is None and b'"use_ocdbt"' not in raw:  # (Orbax before 0.5)
            tree_doc.use_ocdbt = await storage.exists(directory / MANIFEST)
        aggregated: _legacy.Aggregated | None = None
        if names := _legacy.aggregated_names(tree_doc):
            aggregated = await _legacy.aggregated_values(directory, self._aggregate_file, names)
        shardings: dict[str, str] = {}
        if raw_shardings is not None:
            shardings = decode_sharding_document(raw_shardings, str(directory / fmt.SHARDING))
        strings: dict = {}
        if raw_strings is not None:
            strings = fmt.decode(raw_strings, dict, where=str(directory / fmt.STRINGS))
        return tree_doc, shardings, strings, sums, aggregated

    @engine_method
    async def restore(self, directory: AnyPath, args: PyTreeRestore | StandardRestore | None = None
                      ) -> Any:
        if isinstance(args, CheckpointArgs) and not isinstance(args, PyTreeRestore |
                                                               StandardRestore):
            # (read for their fields, another handler's args were taken for a target: a
            # Composite, a JsonRestore restored the whole tree; Orbax's handler fails on them)
            raise HandlerError(
                f"{directory}: {type(args).__name__} cannot be restored by "
                f"{type(self).__name__}; pass ocp.args.StandardRestore or "
                "ocp.args.PyTreeRestore")
        with gc_paused():  # per-array records are acyclic: no full collections mid-restore
            return await self._restore(coerce(directory), args)

    async def _restore(self, directory: AnyPath, args: PyTreeRestore | StandardRestore | None
                       ) -> Any:
        transforms = getattr(args, "transforms", None)
        to_original = getattr(args, "transforms_default_to_original", True)
        # transforms={} (each key of item from the checkpoint's same key): a partial restore,
        # an idiom of Orbax's older API (MaxText loads its parameters so)
        by_name = transforms == {} and to_original
        if getattr(args, "legacy_transform_fn", None) is not None:
            raise InvalidArgumentError(
                f"{directory}: legacy_transform_fn is not supported by ckpt_async; pass "
                "`transforms` (ocp.Transform), or restore the tree and transform it afterwards")
        tree_doc, shardings, strings, sums, aggregated = await self.read_documents(directory)
        # (a target or restore args built from item metadata: its tree, as in Orbax)
        target, restore_args = (
            getattr(x, "tree") if isinstance(x, TreeMetadata) else x
            for x in (getattr(args, "item", None), getattr(args, "restore_args", None)))
        # StandardRestore(strict=False): arrays are cut or padded to the target's shapes (as
        # Orbax does), and the target may name a part of the checkpoint (which Orbax refuses).
        loose = isinstance(args, StandardRestore) and not args.strict
        partial = bool(getattr(args, "partial_restore", False)) or loose or by_name
        reader = _Reader(directory, tree_doc, shardings, strings, sums, self.type_registry,
                         aggregated)
        reader.random_keys = await random_key_impls(directory, tree_doc)
        if transforms is not None and not by_name:
            return await _restore_transformed(reader, target, restore_args, transforms,
                                              to_original)
        if target is None and restore_args is None:
            return await reader.restore_as_saved()
        if target is not None and getattr(args, "partial_restore", False):
            _tree.check_partial_containers(
                target, (e.key_metadata for e in reader.by_key.values()), where=str(directory))
        # PyTreeRestore's item gives the tree's structure only (Orbax): its leaves restore as
        # saved, or as their restore_args say; StandardRestore's item gives their types too.
        return await reader.restore_into(
            target if target is not None else restore_args, restore_args, partial=partial,
            strict=not loose, structure_only=isinstance(args, PyTreeRestore) and target is not None,
            standard=isinstance(args, StandardRestore))

    @engine_method
    async def metadata(self, directory: AnyPath) -> TreeMetadata:
        directory = coerce(directory)
        tree_doc, shardings, _, sums, aggregated = await self.read_documents(directory)
        return await _Reader(directory, tree_doc, shardings, {}, sums, self.type_registry,
                             aggregated).metadata()


class StandardCheckpointHandler(PyTreeCheckpointHandler):
    """Saves and restores a pytree of arrays and scalars (``StandardSave`` / ``StandardRestore``)."""

    typestr = fmt.STANDARD_TYPESTR
    _allow_strings = True
    # Orbax's standard handler stores a NumPy scalar as a 0-d array ("np.ndarray"), which
    # Orbax restores as one, dtype kept (as "scalar" it came back a Python int or float).
    _numpy_scalars_as_arrays = True


@dataclass(frozen=True)
class _NoArgs:
    """In place of the args of a key of a transformed restore's result that ``restore_args``
    has none for."""

    key: str


def _input_args(key: str, rules: dict[str, Transform], out_args: dict[str, Any]) -> Any:
    """The restore args the checkpoint's ``key`` is read with for ``rules`` to use it (Orbax's
    reverse of the transformations), or None: a multi_value_fn's input, or the source of a
    result key (itself, or the ``original_key`` a rule renames it from)."""
    for pattern, rule in rules.items():
        if rule.multi_value_fn is not None:
            for regex, args in (getattr(rule, "multi_value_fn_input_args", None) or {}).items():
                if re.fullmatch(regex, key):
                    return args
        elif not rule.use_fallback:
            for out_key, args in out_args.items():
                if (m := re.fullmatch(pattern, out_key)) is not None and key == (
                        out_key if rule.original_key is None else m.expand(str(rule.original_key))):
                    return args
    return None


def _checkpoint_tree(reader: _Reader, read: Any, wanted: Mapping[str, Any]) -> Any:
    """The tree a transformed restore hands its transformations (a ``multi_value_fn`` gets it
    whole), as Orbax's: the checkpoint's structure, as its key metadata has it (dicts, their
    keys sorted, and lists), with the values read (``read``, nested dicts by the keys of
    ``wanted``) at their keys, empty nodes as their empty values and ``PLACEHOLDER`` at the
    keys not read (Orbax puts its internal metadata entries there)."""
    entries = []
    for entry in reader.by_key.values():
        keys = [k.key for k in entry.key_metadata]
        empty: Any = _tree.EMPTY_TYPES.get(entry.value_metadata.value_type)
        if empty is not None:
            value: Any = empty()
        elif "/".join(keys) in wanted:
            value = functools.reduce(lambda node, k: node[k], keys, read)
        else:
            value = PLACEHOLDER
        entries.append((entry.key_metadata, value))
    if not entries:
        return {}
    return _tree.tree_from_key_metadata(entries, sort_keys=True)


async def _restore_transformed(reader: _Reader, item: Any, restore_args: Any, transforms: Any,
                               to_original: bool) -> Any:
    """``PyTreeRestore(transforms=...)``: the checkpoint's keys the transformations (or the
    keys of ``item`` they carry over) use, read with the restore args of the result's keys,
    then :func:`apply_transformations` into ``item``'s structure; the others are not read."""
    where = reader.dir
    if item is None:
        raise InvalidArgumentError(f"{where}: a restore with `transforms` needs `item`, the "
                                   "structure of its result")
    if restore_args is None:
        raise InvalidArgumentError(f"{where}: a restore with `transforms` needs `restore_args`, "
                                   "in the structure of `item`")
    rules: dict[str, Transform] = to_flat_dict(
        transforms, sep="/", is_leaf=lambda x: isinstance(x, Transform))
    for pattern, rule in rules.items():
        if not isinstance(rule, Transform):
            raise InvalidArgumentError(f"{where}: transform {pattern!r} is a "
                                       f"{type(rule).__name__}, not an ocp.Transform")
        if rule.multi_value_fn is None:
            continue
        if not isinstance(rule, RestoreTransform):
            raise InvalidArgumentError(f"{where}: transform {pattern!r}: a restore's "
                                       "multi_value_fn needs a RestoreTransform")
        if rule.multi_value_fn_input_args is None:
            raise InvalidArgumentError(f"{where}: transform {pattern!r}: multi_value_fn needs "
                                       "multi_value_fn_input_args (the keys it reads)")
    # (every key of the result: a key the checkpoint gives it needs restore args, as in Orbax)
    out_args: dict[str, Any] = {key: _NoArgs(key) for key in to_flat_dict(item, sep="/")}
    out_args.update(to_flat_dict(restore_args, sep="/"))
    wanted: dict[str, Any] = {}
    for entry in reader.by_key.values():
        if entry.value_metadata.value_type in _tree.EMPTY_TYPES:
            continue
        key = "/".join(k.key for k in entry.key_metadata)
        args = _input_args(key, rules, out_args)
        if args is None and key in out_args:
            fallback = any(rule.use_fallback and re.fullmatch(p, key) for p, rule in rules.items())
            args = out_args[key] if fallback != to_original else None
        if args is not None:
            wanted[key] = args
    missing = sorted({args.key for args in wanted.values() if isinstance(args, _NoArgs)} | {
        key for key, args in out_args.items() if isinstance(args, _NoArgs) and any(
            rule.multi_value_fn is not None and re.fullmatch(p, key) for p, rule in rules.items())})
    if missing:
        raise MissingKeyError(
            f"{where}: no restore args for {', '.join(map(repr, missing[:10]))}"
            f"{' ...' if len(missing) > 10 else ''}: the result takes them from the checkpoint, "
            "and a restore with `transforms` reads each with its key's restore args")
    read: Any = {}
    if wanted:
        needed = from_flat_dict(wanted, sep="/")
        # (its dicts stand for the checkpoint's lists too: built from the keys)
        read = await reader.restore_into(needed, needed, partial=True, check_kinds=False)
    original = _checkpoint_tree(reader, read, wanted)

    def bound(rule: Transform) -> Transform:
        fn = rule.multi_value_fn
        if fn is None:
            return rule
        return Transform(multi_value_fn=lambda key, tree: fn(key, tree, out_args[key]))

    return apply_transformations(original, {p: bound(r) for p, r in rules.items()}, item,
                                 to_original)


def _is_random_key(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key)


def _is_key_dtype(dtype: Any) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data_like(leaf: Any) -> jax.ShapeDtypeStruct:
    """The key data of a typed PRNG key target: its shape and dtype, on the key's devices."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = (*sharding.spec, *([None] * (len(data.shape) - len(sharding.spec))))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


async def random_key_impls(directory: AnyPath, tree_doc: fmt.TreeMetadata) -> dict[str, str]:
    """The typed PRNG keys of an item (each stored as its key data): parameter name -> impl,
    as ckpt_async's extension key records them, else (a checkpoint of Orbax's) as its
    ``array_metadatas`` do."""
    if tree_doc.ckpt_async is not None:
        return dict(tree_doc.ckpt_async.get("random_keys", {}))
    return await recorded_key_impls(directory)


def _args_of_target(tleaf: Any) -> RestoreArgs:
    """The restore args a TypeHandler is given for a leaf of the target (as Orbax builds
    them): an array's sharding, shape and dtype."""
    if isinstance(tleaf, (jax.Array, jax.ShapeDtypeStruct)) and getattr(
            tleaf, "sharding", None) is not None:
        return ArrayRestoreArgs(sharding=tleaf.sharding, global_shape=tuple(tleaf.shape),
                                dtype=tleaf.dtype)
    if isinstance(tleaf, np.ndarray):
        return RestoreArgs(restore_type=np.ndarray, dtype=tleaf.dtype)
    return RestoreArgs()


def _completed_by_item(leaf: Any, rarg: ArrayRestoreArgs) -> ArrayRestoreArgs:
    """The ArrayRestoreArgs of a PyTreeRestore with an item, as Orbax completes them
    (``_update_array_restore_args``): strict ones that leave the shape or the dtype open take
    them from the item's leaf, an array of one dimension or more (not a typed PRNG key; a
    0-d array, a scalar or a type gives nothing)."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if isinstance(leaf, type) or not rarg.strict or not shape or dtype is None or \
            _is_key_dtype(dtype):
        return rarg
    updates: dict[str, Any] = {}
    if rarg.global_shape is None:
        updates["global_shape"] = tuple(shape)
    if rarg.dtype is None:
        updates["dtype"] = dtype
    return dataclasses.replace(rarg, **updates) if updates else rarg


def _target_sharding(tleaf: Any, rarg: Any, where: str) -> jax.sharding.Sharding | None:
    """The sharding a restore target (or its ArrayRestoreArgs) asks for, if any (none for a
    NumPy array asked for: it is read whole)."""
    if getattr(rarg, "restore_type", None) is np.ndarray:
        return None
    if isinstance(rarg, ArrayRestoreArgs):
        return rarg.resolved_sharding(where)
    if isinstance(tleaf, ArrayRestoreArgs):
        return tleaf.resolved_sharding(where)
    if isinstance(tleaf, (jax.Array, jax.ShapeDtypeStruct)):
        return getattr(tleaf, "sharding", None)
    return None


#: A Python scalar's recorded type (the ``scalars`` of ckpt_async's extension) -> the type.
_PYTHON_SCALAR_TAGS = {t.__name__: t for t in _SCALAR_DTYPES}
#: Restore types that make a Python scalar of a one-element array.
_PYTHON_SCALARS = (int, float, complex, bool)
#: What the messages call a leaf the checkpoint holds as None or an empty container.
_EMPTY_NAMES = {"None": "None", "Dict": "an empty dict", "List": "an empty list",
                "Tuple": "an empty tuple"}
#: A key of a ``_METADATA`` entry (its keys as a tuple's repr) that is a number.
_INDEX_KEY = re.compile(r"'[0-9]+'")
#: A target's leaf of these types, empty, holds no value (read nothing into it).
_CONTAINERS = frozenset({dict, list, tuple})


def _requested_shape(tleaf: Any, rarg: Any) -> tuple[tuple[int, ...] | None, bool]:
    """The shape a restore asks for (None: the stored one), and whether it must be the stored
    one: an ArrayRestoreArgs' ``global_shape`` and ``strict``, else the target leaf's shape. (A
    NumPy array asked for comes whole, whatever ``global_shape`` says, as in Orbax.)"""
    if isinstance(rarg, ArrayRestoreArgs) and rarg.restore_type is np.ndarray:
        return None, True
    for args in (rarg, tleaf):
        if isinstance(args, ArrayRestoreArgs) and args.global_shape is not None:
            return tuple(args.global_shape), args.strict
    if isinstance(tleaf, RestoreArgs):
        return None, True
    shape = () if type(tleaf) in _SCALAR_DTYPES else getattr(tleaf, "shape", None)
    return (None if shape is None else tuple(shape)), getattr(rarg, "strict", True)


def _check_shape(where: AnyPath, name: str, stored: tuple[int, ...],
                 wanted: tuple[int, ...] | None, strict: bool) -> None:
    if wanted is None or wanted == stored:
        return
    if strict or len(wanted) != len(stored):
        raise ShapeMismatchError(
            f"{where}: key {name!r} is stored with shape {stored}, the restore asks for "
            f"{wanted}" + ("" if len(wanted) != len(stored) else
                           " (StandardRestore(..., strict=False) or ArrayRestoreArgs(strict=False)"
                           " pads or cuts it to that shape)"))


class _Deferred:
    """An array to become a jax.Array in one batched ``jax.device_put`` with the others
    (:func:`_put_deferred`)."""

    __slots__ = ("arr", "sharding")

    def __init__(self, arr: np.ndarray, sharding: jax.sharding.Sharding | None) -> None:
        self.arr = arr
        self.sharding = sharding


def _put(arr: np.ndarray, sharding: jax.sharding.Sharding | None) -> Any:
    """``arr`` as a jax.Array laid out as ``sharding`` says, or a :class:`_Deferred` to be
    placed with the others of the restore. A sharding that spans other processes' devices
    gets only this process's shards from ``arr``; the others come from the same restore
    running in those processes.

    Deferred: small arrays (about 100 us of jax's Python per put: a quarter of restoring
    4,096 small arrays), and any array bound for one CPU device, whose buffer jax adopts, so
    that waiting holds no extra memory (one put per array cost ~300 us inside a restore, GIL
    hand-offs with the reading threads, against ~25 us in a batch)."""
    if sharding is not None and not sharding.is_fully_addressable:
        return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])
    if arr.nbytes <= ser.DIRECT_READ_MAX_BYTES or (
            sharding is not None and cpu_sharding(sharding) == (True, 1)):
        return _Deferred(arr, sharding)
    return jax.device_put(arr) if sharding is None else jax.device_put(arr, sharding)


def _put_deferred(values: list[Any]) -> list[Any]:
    """``values`` with every :class:`_Deferred` placed (:func:`device_put_many`)."""
    idx = [i for i, v in enumerate(values) if type(v) is _Deferred]
    placed = device_put_many([values[i].arr for i in idx], [values[i].sharding for i in idx])
    for i, v in zip(idx, placed, strict=True):
        values[i] = v
    return values


try:  # the per-shard placement jax.device_put ends in (jax internals: used where it applies)
    from jax._src.core import ShapedArray as _ShapedArray
    from jax._src.interpreters.pxla import batched_device_put as _batched_device_put
except ImportError:  # pragma: no cover - a jax without them: jax.device_put for all
    _batched_device_put = None  # type: ignore[assignment]


def device_put_many(arrays: list[np.ndarray], shardings: list[Any]) -> list[jax.Array]:
    """``jax.device_put(arrays[i], shardings[i])`` for each host array; a None sharding means
    jax's default device, uncommitted, as ``jax.device_put(array)`` leaves it.

    An array in jax's canonical dtype bound for one device goes straight to the per-shard
    placement that ``jax.device_put`` ends in, with the abstract value ``jax.device_put`` would
    give it (4 us an array against 27-35 us through ``jax.device_put``'s Python, measured on
    10,000 arrays: half of restoring them); on a CPU device jax adopts the 64-byte-aligned
    buffer either way. The others, and every array if that placement is missing or fails,
    go through ``jax.device_put`` (one batched call for those without a sharding, one for
    the others)."""
    out: list[Any] = [None] * len(arrays)
    if _batched_device_put is not None and arrays:
        try:
            _put_direct(arrays, shardings, out)
        except (TypeError, ValueError, AttributeError, RuntimeError):
            out = [None] * len(arrays)
    for with_sharding in (False, True):
        idx = [i for i, v in enumerate(out)
               if v is None and (shardings[i] is not None) == with_sharding]
        if idx:
            batch = [arrays[i] for i in idx]
            placed = (jax.device_put(batch, [shardings[i] for i in idx]) if with_sharding
                      else jax.device_put(batch))
            for i, v in zip(idx, placed, strict=True):
                out[i] = v
    return out


def _put_direct(arrays: list[np.ndarray], shardings: list[Any], out: list[Any]) -> None:
    """Fills ``out[i]`` for the arrays :func:`device_put_many` places directly."""
    avals: dict[tuple[Any, ...], Any] = {}
    devices: dict[Any, list[Any]] = {}
    default: Any = None
    for i, (arr, sharding) in enumerate(zip(arrays, shardings, strict=True)):
        if type(arr) is not np.ndarray:
            continue
        key = (arr.shape, arr.dtype)
        if key not in avals:  # None: a dtype jax would convert (float64 without x64)
            canonical = arr.dtype == jax.dtypes.canonicalize_dtype(arr.dtype)
            avals[key] = _ShapedArray(arr.shape, arr.dtype) if canonical else None
        aval = avals[key]
        if aval is None:
            continue
        committed = sharding is not None
        if sharding is None:
            if default is None:  # the default device as jax.device_put chooses it
                out[i] = jax.device_put(arr)
                default = out[i].sharding
                continue
            sharding = default
        if not isinstance(sharding, jax.sharding.SingleDeviceSharding):
            continue
        device = devices.get(sharding)
        if device is None:
            device = devices[sharding] = list(sharding.device_set)
        out[i] = _batched_device_put(aval, sharding, [arr], device, committed)


#: Bytes of arrays being read, at most (one larger array is read alone). On CPU the buffers
#: read into become the restored arrays, so the window costs no memory there; it sets how
#: much is in flight: a cold 2 GiB restore took 2.6-3.5 s with 256 MiB, 1.7-2.0 s with 512.
READ_WINDOW_BYTES = 512 << 20


class _ByteWindow:
    """At most ``limit`` bytes held at once on the engine loop; one larger hold goes alone.

    Holds are admitted in the order they were asked for, each waiter woken once, when it is
    admitted: a restore of a thousand arrays queues a thousand holds here, and waking them all
    on every release (a condition variable) cost a fifth of the engine loop's time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def _admit(self) -> None:
        while self._waiting:
            n, fut = self._waiting[0]
            if not fut.cancelled():
                if not self._fits(n):
                    return
                self.used += n
                fut.set_result(None)
            self._waiting.popleft()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        if self._waiting or not self._fits(n):
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append((n, fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # admitted, then cancelled: give back
                    self.used -= n
                self._admit()  # the ones behind may fit now
                raise
        else:
            self.used += n
        try:
            yield
        finally:
            self.used -= n
            self._admit()


def _refuse_arrays_of_another_process_only(planned: list[_Planned], roles: Roles,
                                           where: str) -> None:
    """A ``jax.Array`` on the devices of one other process only (a pipeline stage's
    sub-mesh): that process cannot tell it from an array of its own, which the primary
    writes, so nobody would write it (Orbax refuses such arrays too)."""
    for p in planned:
        if p.value_type != "jax.Array":
            continue
        owners = {d.process_index for d in p.leaf.value.sharding.device_set}
        if len(owners) == 1 and roles.index not in owners:
            raise UnsupportedLeafError(
                f"{where}: leaf {p.leaf.name!r} is a jax.Array on the devices of process "
                f"{owners.pop()} only, which cannot be told from that process's own (host-local) "
                "array; shard it over a mesh that spans every process, or replicate it")


#: The entries of an item's folder that no array's own folder may take (``use_ocdbt=False``).
_ITEM_ENTRIES = frozenset({fmt.PYTREE_METADATA, fmt.SHARDING, fmt.STRINGS, fmt.ARRAY_METADATAS,
                           _integrity.CHECKSUMS, _integrity.PARTIAL_CHECKSUMS})


def _refuse_names_without_folders(planned: list[_Planned], where: str) -> None:
    """Without OCDBT each stored array has the folder of its name: a name that would lie
    outside the item (``..``, absolute), or on one of its documents, is refused before
    anything is written. (An empty name, a tree that is one bare array, is the item's own
    folder.)"""
    for p in planned:
        name = p.leaf.name
        if p.value_type not in _STORED or p.handler is not None or not name:
            continue
        if escapes(name) or name.replace("\\", "/").split("/")[0] in _ITEM_ENTRIES:
            raise InvalidArgumentError(
                f"{where}: leaf {name!r} cannot be stored in a folder of its own "
                "(use_ocdbt=False): the folder would lie outside the item or on one of its "
                "documents; rename the key, or save with use_ocdbt=True")


#: ``ext_metadata`` key of array_metadatas naming a typed PRNG key's implementation (Orbax's).


#: ``ckpt_async.version`` in ``_METADATA`` from which ``_strings.json`` holds each string at
#: its name's JSON Pointer, as Orbax's (version 1 held them as plain members).
STRINGS_AT_POINTERS = 2

#: Value types whose values are stored arrays.
_STORED = frozenset({"jax.Array", "np.ndarray", "scalar"})
#: The value types ckpt_async reads itself (any other was written by a TypeHandler).
_BUILT_IN_TYPES = _STORED | {"string"} | set(_tree.EMPTY_TYPES)


#: Unsigned integers of each width: arrays are broadcast as their bits, which a sum with
#: zeros leaves exact (a float sum would turn -0.0 into 0.0).
_BITS: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
         8: np.dtype(np.uint64)}


@dataclass(frozen=True, slots=True)
class _ReplicaPlan:
    """How an array sharded as ``target`` is broadcast from one replica: ``stacked`` shards
    an array of the replicas stacked on a new first axis, one per replica."""

    target: jax.sharding.NamedSharding
    stacked: jax.sharding.NamedSharding
    replicas: int
    primary: int


def _replica_plan(sharding: jax.sharding.Sharding,
                  handler: SingleReplicaArrayHandler) -> _ReplicaPlan | None:
    """The broadcast of an array sharded as ``sharding`` from replica
    ``handler.primary_replica_id`` of its mesh's axis ``handler.replica_axis_index``; None
    where there is nothing to broadcast (no such axis, one replica, or the array split over
    it), and the array is read as any other."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    axis = handler.replica_axis_index
    if not 0 <= axis < len(mesh.axis_names) or mesh.devices.shape[axis] < 2:
        return None
    name = mesh.axis_names[axis]
    used = {a for part in sharding.spec if part is not None
            for a in (part if isinstance(part, tuple) else (part,))}
    if name in used or not 0 <= handler.primary_replica_id < mesh.devices.shape[axis]:
        return None
    stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(name, *sharding.spec))
    return _ReplicaPlan(sharding, stacked, mesh.devices.shape[axis], handler.primary_replica_id)


@dataclass(slots=True, eq=False)
class _Broadcast:
    """An array read on the primary replica, to be broadcast (:func:`_broadcast`)."""

    stacked: jax.Array
    dtype: np.dtype
    target: jax.sharding.NamedSharding
    nbytes: int  # (the array's, once broadcast)


def _broadcastable(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` are broadcast as their bits (an unsigned integer as wide;
    8 bytes wide only with jax's 64-bit types enabled)."""
    if dtype == np.dtype(bool):
        return True
    if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
        return False
    for kind, info in ((np.integer, jax.numpy.iinfo), (np.inexact, jax.numpy.finfo)):
        if jax.dtypes.issubdtype(dtype, kind) and not jax.dtypes.issubdtype(
                dtype, np.complexfloating):
            return dtype.itemsize in _BITS and info(dtype).bits == 8 * dtype.itemsize
    return False


@functools.lru_cache(maxsize=64)
def _merge(dtypes: tuple[np.dtype, ...], targets: tuple[jax.sharding.Sharding, ...]) -> Any:
    """A program summing each stacked array over its replicas (the primary's bits, zeros
    elsewhere), back in its dtype, on its target sharding."""
    def merge(*stacked: jax.Array) -> tuple[jax.Array, ...]:
        out = []
        for x, dtype in zip(stacked, dtypes, strict=True):
            bits = x.sum(axis=0, dtype=x.dtype)
            out.append(bits.astype(bool) if dtype == np.dtype(bool)
                       else jax.lax.bitcast_convert_type(bits, dtype))
        return tuple(out)

    return jax.jit(merge, out_shardings=targets)


def _broadcast_limit(handler: SingleReplicaArrayHandler) -> float:
    """Bytes of arrays broadcast at a time: the handler's limit, else the scaling factor's
    part of the free memory of the least free local device (unbounded where jax does not
    tell it, as on CPU)."""
    if handler.broadcast_memory_limit_bytes is not None:
        return handler.broadcast_memory_limit_bytes
    free = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) * (handler.broadcast_memory_scaling_factor or 0.75) if free else math.inf


async def _broadcast(values: list[Any], handler: SingleReplicaArrayHandler) -> None:
    """Replaces each :class:`_Broadcast` in ``values`` with its array on every replica: in
    order (every process runs the same programs, in the same order) and in groups of at most
    the handler's memory limit, each stacked array let go as soon as it is summed."""
    idx = collections.deque(i for i, v in enumerate(values) if type(v) is _Broadcast)
    limit = _broadcast_limit(handler)
    while idx:
        group: list[int] = []
        size = 0
        while idx and (not group or size + values[idx[0]].nbytes <= limit):
            size += values[idx[0]].nbytes
            group.append(idx.popleft())
        todo = [values[i] for i in group]
        for i in group:
            values[i] = None

        def run(todo: list[_Broadcast] = todo) -> tuple[jax.Array, ...]:
            program = _merge(tuple(b.dtype for b in todo), tuple(b.target for b in todo))
            out = program(*(b.stacked for b in todo))
            for b in todo:
                b.stacked.delete()
            todo.clear()
            return jax.block_until_ready(out)

        for i, arr in zip(group, await asyncio.to_thread(run), strict=True):
            values[i] = arr


class _Reader:
    """Restores one pytree item from its decoded documents."""

    def __init__(self, directory: AnyPath, doc: fmt.TreeMetadata, shardings: dict[str, str],
                 strings: dict[str, Any], sums: _integrity.Checksums | None = None,
                 registry: TypeHandlerRegistry = GLOBAL_TYPE_HANDLER_REGISTRY,
                 aggregated: _legacy.Aggregated | None = None) -> None:
        self.dir = directory
        self.registry = registry
        self.sums = sums
        self.tracker = Tracker("restore", directory, None)
        self._prefetched: dict[str, np.ndarray] = {}
        self._window = _ByteWindow(READ_WINDOW_BYTES)
        self.doc = doc
        # (a chunk not there is damage, unless the checkpoint says it left out chunks equal
        # to the fill value, as Orbax before 0.5 did)
        self._fill_missing = not doc.store_array_data_equal_to_fill_value
        self.shardings = shardings
        self.strings = strings
        self.items = ser.ItemReader(directory, use_ocdbt=doc.use_ocdbt, use_zarr3=doc.use_zarr3,
                                    hint=sums.index if sums is not None else None)
        ext = doc.ckpt_async or {}
        self.skeleton = ext.get("skeleton")
        self._flat_strings = ext.get("version", STRINGS_AT_POINTERS) < STRINGS_AT_POINTERS
        self.scalars: dict[str, str] = ext.get("scalars", {})
        #: values of Orbax's first format, from its msgpack file (name -> value): numbers as
        #: arrays, placed as if read (``_prefetched``), strings as they are
        self.aggregated: dict[str, Any] = {}
        if aggregated is not None:
            self.aggregated = aggregated.values
            self.scalars = {**self.scalars, **aggregated.scalars}
            self._prefetched.update((n, v) for n, v in self.aggregated.items()
                                    if isinstance(v, np.ndarray))
        #: parameter name -> implementation of each typed PRNG key (stored as its key data)
        self.random_keys: dict[str, str] = dict(ext.get("random_keys", {}))
        self._told_devices = False  # (the default-device warning, once per restore)
        self._strict = True  # (restore_into's)
        # name -> (tuple key, entry), in the order they were stored
        self.by_key = {k: e for k, e in doc.tree_metadata.items()}
        #: leaves a TypeHandler wrote (name -> typestr): ckpt_async's list, or in a checkpoint
        #: of Orbax's every leaf of a value type not built in
        self.handled: dict[str, str] = dict(ext.get(TYPE_HANDLED, {})) if ext else {
            self._name(e): vt for e in doc.tree_metadata.values()
            if (vt := e.value_metadata.value_type) not in _BUILT_IN_TYPES}
        #: array kinds whose registered handler reads them its own way (a subclass of a
        #: built-in one overriding ``deserialize``): kind -> handler
        self.overridden = registry.overriding_readers()

    @property
    def ctx(self) -> ts.Context:
        """The item's TensorStore context (its reader's, made on first use)."""
        return self.items.ctx

    def _string(self, name: str) -> Any:
        if name in self.aggregated:
            return self.aggregated[name]
        try:
            return fmt.string_in(self.strings, name, flat=self._flat_strings)
        except KeyError:
            raise CorruptCheckpointError(
                f"{self.dir / fmt.STRINGS}: string leaf {name!r} is missing") from None

    def _name(self, entry: fmt.TreeEntry) -> str:
        return ".".join(k.key for k in entry.key_metadata)

    async def prefetch(self, names: list[str]) -> None:
        """Reads the small ones among the named arrays in batches, each chunk checked against
        ``_CHECKSUMS`` as it is read; the others are read one by one when placed
        (``_reading``)."""
        arrays = await self.items.read_small(names, self._expected)
        for arr in arrays.values():
            self.tracker.add(arr.nbytes)
        self._prefetched.update(arrays)

    def _expected(self, name: str) -> dict[str, int] | None:
        entry = self.sums.arrays.get(name) if self.sums is not None else None
        return entry.crc if entry is not None else None

    @contextlib.asynccontextmanager
    async def _reading(self, name: str) -> AsyncIterator[np.ndarray]:
        """The stored array ``name`` (checked; one not prefetched), for as long as the caller
        places it. It is read within a window of READ_WINDOW_BYTES into a buffer of its own
        (``ItemReader.read_array`` from a local index, else :func:`ser.read_into_buffer`): on
        CPU that buffer becomes the restored jax.Array, on an accelerator it is freed once
        copied over, before the window admits more reads; so a restore peaks near the
        restored size, not twice it."""
        plan = self.items.local_plan(name) if await self.items.index() is not None else None
        if plan is not None:
            async with self._window.hold(math.prod(plan[1]) * plan[0].itemsize):
                arr = await self.items.read_array(name, plan, self._expected(name))
                if arr is not None:
                    self.tracker.add(arr.nbytes)
                    yield arr
                    del arr
                    return
        store = await ser.open_array(self.ctx, self.dir, name, use_ocdbt=self.doc.use_ocdbt,
                                     use_zarr3=self.doc.use_zarr3, fill_missing=self._fill_missing)
        nbytes = math.prod(store.shape) * np.dtype(store.dtype.numpy_dtype).itemsize
        async with self._window.hold(nbytes):
            try:
                with ser.allocating(self.dir, [name], nbytes):
                    arr = await ser.read_into_buffer(self.ctx, store)
            except ValueError as exc:
                raise read_failure(f"{self.dir}: array {name!r} cannot be read", exc) from exc
            await _integrity.check_array(self.dir, name, arr, self.sums)
            self.tracker.add(arr.nbytes)
            yield arr
            del arr

    def _empty(self, value_type: str, name: str) -> Any:
        if value_type == "List" and self.scalars.get(name) == "tuple":
            return ()  # (as earlier ckpt_async wrote an empty tuple: a List tagged "tuple")
        empty: Any = _tree.EMPTY_TYPES[value_type]
        return empty() if value_type != "None" else None

    def _scalar(self, name: str, arr: np.ndarray) -> Any:
        tag = self.scalars.get(name)
        if tag in _PYTHON_SCALAR_TAGS:
            # (its saved type, unless a restore arg's dtype cast it to another kind: an int
            # restored with dtype=float32 is a float, as Orbax gives it)
            cls = _PYTHON_SCALAR_TAGS[tag]
            same_kind = arr.dtype.kind in ("iu" if cls is int else _SCALAR_DTYPES[cls].kind)
            return cls(arr.item()) if same_kind else arr.item()
        if tag and tag.startswith("np:"):
            return arr.dtype.type(arr.item()) if arr.dtype.name == tag[3:] else arr[()]
        return arr.item()

    def _value_as_saved(self, entry: fmt.TreeEntry) -> Any:
        """The value of ``entry`` as it was saved, or a coroutine that reads it."""
        vt = entry.value_metadata.value_type
        name = self._name(entry)
        if name in self.handled or vt in self.overridden:
            return self._read_handled(name, vt, None)
        if vt in _tree.EMPTY_TYPES:
            return self._empty(vt, name)
        if vt == "string":
            return self._string(name)
        sharding = self._saved_sharding(name) if vt == "jax.Array" else None
        if sharding is not None and not sharding.is_fully_addressable and (
                name not in self.aggregated):
            return self._read_spread(name, None, None, sharding)
        arr = self._prefetched.pop(name, None)
        if arr is not None:
            return self._saved_value(name, arr, vt, sharding)
        return self._read_as_saved(name, vt, sharding)

    def _is_scalar(self, name: str, vt: str) -> bool:
        """Whether the value saved as ``name`` was a scalar (a NumPy scalar's "np.ndarray"
        entry, as the standard handler writes it, carries its tag)."""
        return vt == "scalar" or (vt == "np.ndarray" and name in self.scalars)

    def _put(self, name: str, arr: np.ndarray, sharding: jax.sharding.Sharding | None) -> Any:
        """``arr`` placed as ``sharding`` says (:func:`_put`), once it is known to split it."""
        ser.check_sharding(self.dir, name, arr.shape, sharding)
        return _put(arr, sharding)

    def _saved_value(self, name: str, arr: np.ndarray, vt: str,
                     sharding: jax.sharding.Sharding | None) -> Any:
        if self._is_scalar(name, vt):
            return self._scalar(name, arr)
        if vt == "jax.Array":
            return self._put(name, arr, sharding)
        return arr

    async def _read_as_saved(self, name: str, vt: str,
                             sharding: jax.sharding.Sharding | None) -> Any:
        async with self._reading(name) as arr:
            return self._saved_value(name, arr, vt, sharding)

    async def _read_placed(self, name: str, tleaf: Any, rarg: Any, vt: str) -> Any:
        async with self._reading(name) as arr:
            return self._place(name, arr, tleaf, rarg, vt)

    @staticmethod
    async def _resolve(value_of: Callable[..., Any], items: Iterable[tuple[Any, ...]]) -> list[Any]:
        """``value_of(*item)`` for each item, where it returns either the value or a coroutine
        that reads it: the coroutines awaited together, then every deferred array placed.
        Values ready at once (prefetched arrays: most of a restore of many small arrays) cost
        no task of their own."""
        values: list[Any] = []
        try:
            for item in items:
                values.append(value_of(*item))
        except BaseException:
            for v in values:  # (never started: nothing to wait for)
                if asyncio.iscoroutine(v):
                    v.close()
            raise
        idx = [i for i, v in enumerate(values) if asyncio.iscoroutine(v)]
        if idx:
            for i, v in zip(idx, await asyncio.gather(*(values[i] for i in idx)), strict=True):
                values[i] = v
        return _put_deferred(values)

    def _saved_sharding(self, name: str) -> jax.sharding.Sharding | None:
        """The sharding an array was saved with, when this run has all its devices (else
        None, the default device, said once per restore: Orbax refuses such a restore)."""
        text = self.shardings.get(name)
        sharding = ser.sharding_from_json(text) if text is not None else None
        if sharding is None and text is not None and not self._told_devices:
            self._told_devices = True
            log.warning("%s: array %r was saved on devices this process does not have; it and "
                        "any others like it are restored to the default device (pass a target "
                        "tree with shardings to place them)", self.dir, name)
        return sharding

    def _stored_arrays(self, named: Iterable[tuple[str, str]]) -> list[str]:
        """The names among ``named`` ((key, name) pairs) whose values are stored arrays."""
        return [name for key, name in named
                if (vt := self.by_key[key].value_metadata.value_type) in _STORED
                and name not in self.handled and vt not in self.overridden
                and name not in self.aggregated]

    async def restore_as_saved(self) -> Any:
        self.items.start_index()  # (read while the shardings are decoded)
        entries = list(self.by_key.values())
        spread = {k for k, e in self.by_key.items() if e.value_metadata.value_type == "jax.Array"
                  and (sh := self._saved_sharding(self._name(e))) is not None
                  and not sh.is_fully_addressable}
        await self.prefetch(self._stored_arrays((k, self._name(e)) for k, e in self.by_key.items()
                                                if k not in spread))
        values = await self._resolve(self._value_as_saved, ((e,) for e in entries))
        if self.random_keys:
            for i, e in enumerate(entries):
                if (impl := self.random_keys.get(self._name(e))) is not None and \
                        not _is_random_key(values[i]):  # (an ArrayHandler subclass may give keys)
                    values[i] = jax.random.wrap_key_data(values[i], impl=impl)
        if self.skeleton is not None:
            try:
                return _tree.unflatten(self.skeleton, lambda i: values[i])
            except (LookupError, TypeError, ValueError) as exc:  # (a skeleton that is none)
                raise CorruptCheckpointError(
                    f"{self.dir / fmt.PYTREE_METADATA}: the tree it records does not decode "
                    f"({exc!r})") from exc
        # (Orbax's checkpoint: its dicts as Orbax gives them, keys sorted)
        return _tree.tree_from_key_metadata(
            [(e.key_metadata, v) for e, v in zip(entries, values)], sort_keys=True)

    async def restore_into(self, target: Any, restore_args: Any, *, partial: bool,
                           strict: bool = True, structure_only: bool = False,
                           standard: bool = False, check_kinds: bool = True) -> Any:
        """``target``'s leaves restored; ``strict=False``: every array cut or padded to the
        shape its leaf asks for, whatever its restore args say; ``structure_only``: the
        leaves of ``target`` give only where each value goes (each comes back as saved, or
        as its restore args say), and a key the checkpoint lacks; ``standard``: a
        StandardRestore's target (a value where the checkpoint holds None or an empty
        container is refused); ``check_kinds=False``: a target whose dicts may stand for the
        checkpoint's lists (built from its keys)."""
        self.items.start_index()  # (read while the target is planned)
        self._strict = strict
        check_kinds = check_kinds and self._has_index_keys(partial)
        kinds: list[list[int]] | None = [] if check_kinds else None
        pairs, rebuild = _tree.target_leaves(target, kinds)
        rargs: dict[str, Any] = {}
        rkinds: dict[str, list[int]] = {}  # (the restore args' key types, where given apart)
        if restore_args is not None and restore_args is not target:
            restore_kinds: list[list[int]] | None = [] if check_kinds else None
            rpairs, _ = _tree.target_leaves(restore_args, restore_kinds)
            # (an empty container among them stands for no args, as in Orbax)
            rargs = {k: a for k, _n, a in rpairs if type(a) not in _CONTAINERS}
            if restore_kinds is not None:
                rkinds = {k: kk for (k, _n, _a), kk in zip(rpairs, restore_kinds)}
            if not {k for k, a in rargs.items() if isinstance(a, RestoreArgs)} <= {
                    k for k, _n, _l in pairs}:
                _refuse_args_off_the_tree(restore_args, target, RestoreArgs, str(self.dir),
                                          partial=partial)
        if structure_only:  # (the item's leaves fill in what their ArrayRestoreArgs leave open)
            for k, _n, leaf in pairs:
                if isinstance(rarg := rargs.get(k), ArrayRestoreArgs):
                    rargs[k] = _completed_by_item(leaf, rarg)
        # ArrayRestoreArgs(restore_type=None) asks for the stored type, as in Orbax: a leaf
        # saved as a NumPy array or a scalar comes back as one (only its dtype applies; such
        # a leaf is read whole, as for restore_type=np.ndarray), a jax.Array as a jax.Array
        for i, (k, name, leaf) in enumerate(pairs):
            rarg = rargs.get(k, leaf)
            if isinstance(rarg, ArrayRestoreArgs) and rarg.restore_type is None and (
                    entry := self.by_key.get(k)) is not None and name not in self.handled \
                    and (vt := entry.value_metadata.value_type) not in self.overridden:
                rarg = dataclasses.replace(rarg, restore_type=jax.Array) if vt == "jax.Array" \
                    else RestoreArgs(dtype=rarg.dtype)
                if k in rargs:
                    rargs[k] = rarg
                else:
                    pairs[i] = (k, name, rarg)
        wanted = {k for k, _n, _l in pairs}
        # Leaves marked PLACEHOLDER (in the target or by their restore args) are not read; nor
        # are those the target (an item, not restore args) gives as None: they come back None,
        # as in Orbax (to jax a None is a node without leaves).
        unread = {k for k, _n, leaf in pairs if leaf is None} if target is not restore_args \
            else set()
        skipped = unread | {k for k, _n, leaf in pairs if leaf is PLACEHOLDER or getattr(
            rargs.get(k), "restore_type", None) is type(PLACEHOLDER)}
        # Typed PRNG keys are stored as their key data: a target leaf of a key type stands for
        # its key data while it is read, and a key comes back, as in Orbax, unless the restore
        # args ask for a NumPy array.
        rekey: dict[int, str] = {}
        for i, (k, name, leaf) in enumerate(pairs):
            impl = self.random_keys.get(name) if self.random_keys else None
            if impl is None or k in skipped:
                continue
            rarg = rargs.get(k)
            if rarg is not None and _is_key_dtype(getattr(rarg, "dtype", None)):
                # (restore args built from a key target, as Orbax's construct_restore_args
                # makes them of an abstract key: the key data is read as stored)
                rargs[k] = dataclasses.replace(rarg, dtype=None, **(
                    {"global_shape": None, "shape": None}
                    if isinstance(rarg, ArrayRestoreArgs) else {}))
            if getattr(rarg, "restore_type", None) is np.ndarray:
                continue  # (the key data, as a NumPy array)
            if _is_random_key(leaf):
                pairs[i] = (k, name, _key_data_like(leaf))
            rekey[i] = impl
        # A partial restore takes what the target names: a key the checkpoint lacks comes back
        # as the target's own value (as in Orbax: new parameters keep their initial values).
        # An empty node of the target (optax's EmptyState) that the checkpoint has no entry
        # for, as ckpt_async before 0.1.1 wrote them, comes back as the target's own.
        wanted -= {k for k, _n, leaf in pairs if k not in self.by_key and _tree.is_empty_node(leaf)}
        _tree.check_structure(set(self.by_key), wanted, where=str(self.dir), allow_missing=partial,
                              allow_unexpected=partial, why=lambda: _tree.container_mismatch(
                                  target, (e.key_metadata for e in self.by_key.values())))
        # The target's leaves beside the checkpoint's entries, in one walk, before anything
        # is read: a node that is a dict on one side and a list or tuple on the other, which
        # the keys as strings do not show (a dict's '0' is not a list's index 0), is refused
        # as Orbax refuses it; a value of a StandardRestore's target where the checkpoint
        # holds None or an empty container is refused, as Orbax's StandardRestore refuses it
        # (another target gets the stored one, as from Orbax); an empty container of the
        # target (an item, not restore args) where the checkpoint has a value is not read:
        # it comes back, as in Orbax.
        by_key = self.by_key
        kept: set[str] = set()
        for (k, name, leaf), leaf_kinds in zip(pairs, kinds if kinds is not None
                                               else itertools.repeat(None)):
            if (entry := by_key.get(k)) is None:
                continue
            if leaf_kinds is not None and [e.key_type for e in entry.key_metadata] != leaf_kinds:
                raise StructureMismatchError(
                    f"{self.dir}: the target tree's structure differs from the checkpoint's "
                    f"({_tree.kinds_differ_at(entry.key_metadata, leaf_kinds)})")
            if rkinds and (arg_kinds := rkinds.get(k)) is not None and arg_kinds != leaf_kinds:
                differ = _tree.kinds_differ_at(entry.key_metadata, arg_kinds,
                                               sides=("the restore args have", "the target"))
                raise StructureMismatchError(
                    f"{self.dir}: the restore args' structure differs from the target's "
                    f"({differ})")
            if k in skipped:
                continue
            vt = entry.value_metadata.value_type
            if vt in _tree.EMPTY_TYPES:
                # (a standard restore's leaf with a sharding attribute that is None, an
                # abstract array placed nowhere, where the checkpoint holds an empty node is
                # refused, as Orbax's StandardCheckpointHandler refuses it, failing to find
                # a sharding for it in the checkpoint's metadata; any other comes back as the
                # stored node, None for an optax.MaskedNode, as in Orbax)
                if standard and getattr(leaf, "sharding", True) is None:
                    raise StructureMismatchError(
                        f"{self.dir}: the target tree's structure differs from the "
                        f"checkpoint's (the checkpoint holds {_EMPTY_NAMES[vt]} at "
                        f"{tuple(e.key for e in entry.key_metadata)!r}, the target a "
                        f"{type(leaf).__name__})")
            elif type(leaf) in _CONTAINERS and not leaf and target is not restore_args \
                    and name not in self.handled:
                kept.add(k)
            rtype = getattr(rargs.get(k, leaf), "restore_type", None)
            if rtype is not None and name not in self.handled:
                self._check_restore_type(name, vt, rtype)
        skipped |= kept
        # A target sharded over other processes' devices too: this process reads only the
        # region its own devices hold (each process restores its part of the global array).
        spanning: dict[int, bool] = {}  # id(sharding) -> spans other processes (asked once)

        def spans(sh: jax.sharding.Sharding) -> bool:
            if (known := spanning.get(id(sh))) is None:
                known = spanning[id(sh)] = not sh.is_fully_addressable
            return known

        spread = {k: sh for k, n, leaf in pairs if k in self.by_key and n not in self.aggregated
                  and (sh := _target_sharding(None if structure_only else leaf, rargs.get(k),
                                               f"{self.dir}: key {n!r}"))
                  is not None and spans(sh)}
        array_handler = self.registry.handler_for(jax.Array) if spread else None
        await self.prefetch(self._stored_arrays((k, n) for k, n, _leaf in pairs if k in self.by_key
                                                and k not in spread and k not in skipped))

        def one(key: str, name: str, tleaf: Any) -> Any:  # the value, or a coroutine
            if key in skipped:
                return None if key in unread else tleaf if key in kept else PLACEHOLDER
            entry = self.by_key.get(key)
            if entry is None:  # (partial: not in the checkpoint)
                return tleaf
            vt = entry.value_metadata.value_type
            if name in self.handled or vt in self.overridden:
                rarg = rargs.get(key, tleaf if isinstance(tleaf, RestoreArgs) else None)
                return self._read_handled(name, vt, rarg if rarg is not None or structure_only
                                          else _args_of_target(tleaf))
            if vt in _tree.EMPTY_TYPES:
                # (the target's own empty node, EmptyState, {} or (), comes back as itself;
                # a value of the target where the checkpoint has an empty node, an abstract
                # array of a state masked when saved or restore args, comes back as the
                # stored node, as in Orbax: None)
                return tleaf if _tree.is_empty_value(tleaf) else self._empty(vt, name)
            if vt == "string":
                return self._string(name)
            rarg = rargs.get(key, tleaf if isinstance(tleaf, RestoreArgs) else None)
            if structure_only:
                if rarg is None:
                    return self._value_as_saved(entry)
                tleaf = None
            if key in spread:
                if isinstance(rarg, SingleReplicaArrayRestoreArgs) and isinstance(
                        array_handler, SingleReplicaArrayHandler) and (plan := _replica_plan(
                            spread[key], array_handler)) is not None:
                    return self._read_replica(name, tleaf, rarg, plan)
                return self._read_spread(name, tleaf, rarg, spread[key])
            arr = self._prefetched.pop(name, None)
            if arr is not None:
                return self._place(name, arr, tleaf, rarg, vt)
            return self._read_placed(name, tleaf, rarg, vt)

        values = await self._resolve(one, pairs)
        if isinstance(array_handler, SingleReplicaArrayHandler):
            await _broadcast(values, array_handler)
        for i, impl in rekey.items():
            if not _is_random_key(values[i]):  # (an ArrayHandler subclass may give keys)
                values[i] = jax.random.wrap_key_data(values[i], impl=impl)
        return rebuild(values)

    def _has_index_keys(self, partial: bool) -> bool:
        """Whether a target could have a dict where the checkpoint has a list or tuple, or
        the other way round, with the same keys as strings: only where some key of the
        checkpoint is a number. A list's keys start at '0', and so do (but in a partial
        restore) the keys of a dict matched to a target's list: a search of the keys' text,
        not of every leaf's key types, rules out most trees of dicts."""
        text = " ".join(self.by_key)
        return "'0'" in text if not partial else _INDEX_KEY.search(text) is not None

    def _check_restore_type(self, name: str, vt: str, rtype: Any) -> None:
        """Refuses a ``restore_type`` that leaf ``name``, stored as ``vt``, cannot restore as
        (Orbax's ``ValueError``s, before anything is read): a string as anything but ``str``,
        anything else as ``str``; ``bytes``; a type no leaf restores as (no TypeHandler is
        registered for it; a scalar type on an array of more than one element: when read)."""
        if vt in _tree.EMPTY_TYPES or vt in self.overridden:
            return
        what = getattr(rtype, "__name__", repr(rtype))
        if (vt == "string") != (rtype is str):
            raise InvalidArgumentError(
                f"{self.dir}: key {name!r} is stored as " + (
                    f"a string: restore_type={what} asks for another type (str restores it)"
                    if vt == "string" else f"an array ({vt}): restore_type=str asks for a string"))
        if rtype is str or rtype in _PYTHON_SCALARS or (isinstance(rtype, type) and issubclass(
                rtype, np.generic | np.ndarray | jax.Array)):
            return
        if rtype is bytes:
            raise InvalidTypeError(f"{self.dir}: key {name!r}: restore_type=bytes: no leaf "
                                   "restores as bytes")
        if not isinstance(rtype, type) or self.registry.handler_for(rtype) is None:
            raise InvalidTypeError(
                f"{self.dir}: key {name!r}: restore_type={what} is no type a leaf restores as "
                "(jax.Array, np.ndarray, a scalar type, str, or a type a TypeHandler is "
                "registered for: ocp.type_handlers.register_type_handler)")

    async def _read_spread(self, name: str, tleaf: Any, rarg: Any,
                           sharding: jax.sharding.Sharding) -> jax.Array:
        """The global array ``sharding`` describes, from the stored region this process's
        devices hold (widened to whole chunks, so that every chunk read is checked); in the
        shape the restore asks for (cut or padded with zeros when not ``strict``)."""
        def devices_of(shape: tuple[int, ...]) -> list[tuple[slice, ...] | None]:
            return list(sharding.addressable_devices_indices_map(shape).values())

        shape, dtype, local = await self._read_region(name, tleaf, rarg, sharding, devices_of)
        # (dtype: for a process none of whose devices hold a part, such as one not holding
        # the single device an array was saved on)
        return jax.make_array_from_callback(shape, sharding, local, dtype=dtype)

    async def _read_replica(self, name: str, tleaf: Any, rarg: Any,
                            plan: _ReplicaPlan) -> _Broadcast | jax.Array:
        """Array ``name`` read by the processes of the primary replica only, as the stacked
        array :func:`_broadcast` sums over the replicas (zeros in the others); an array of a
        dtype not broadcast so (complex, sub-byte) is read as any other."""
        dtype = np.dtype(getattr(rarg, "dtype", None) or getattr(tleaf, "dtype", None)
                         or (await ser.read_shape_dtype(
                             self.ctx, self.dir, name, use_ocdbt=self.doc.use_ocdbt,
                             use_zarr3=self.doc.use_zarr3))[1])
        if not _broadcastable(dtype):
            return await self._read_spread(name, tleaf, rarg, plan.target)

        def primary_devices(shape: tuple[int, ...]) -> list[tuple[slice, ...] | None]:
            return [idx[1:] for idx in plan.stacked.addressable_devices_indices_map(
                (plan.replicas, *shape)).values() if idx and (idx[0].start or 0) == plan.primary]

        shape, _dtype, local = await self._read_region(name, tleaf, rarg, plan.target,
                                                       primary_devices)
        bits = _BITS[dtype.itemsize]

        def piece(index: tuple[slice, ...] | None) -> np.ndarray:
            assert index is not None  # (the stacked array is split over its first axis)
            if (index[0].start or 0) == plan.primary:
                part = local(index[1:])  # (a copy where not contiguous; a 0-d one stays 0-d)
                return (part if part.flags.c_contiguous else part.copy()).view(bits)[None]
            return np.zeros([len(range(*s.indices(n))) for s, n in
                             zip(index, (plan.replicas, *shape), strict=True)], bits)

        stacked = jax.make_array_from_callback((plan.replicas, *shape), plan.stacked, piece)
        return _Broadcast(stacked, dtype, plan.target, math.prod(shape) * dtype.itemsize)

    async def _read_region(self, name: str, tleaf: Any, rarg: Any,
                           sharding: jax.sharding.Sharding, devices_of: Callable[
            [tuple[int, ...]], list[tuple[slice, ...] | None]]) -> tuple[
            tuple[int, ...], np.dtype, Callable[[tuple[slice, ...] | None], np.ndarray]]:
        """The shape and dtype the restore of ``name`` asks for, and a function giving the
        part of it at an index, for each index in ``devices_of(shape)``: the region they
        cover is read at once (nothing, if none). ``ShardingMismatchError`` unless
        ``sharding``, the array's, splits that shape evenly."""
        store = await ser.open_array(self.ctx, self.dir, name, use_ocdbt=self.doc.use_ocdbt,
                                     use_zarr3=self.doc.use_zarr3, fill_missing=self._fill_missing)
        stored = tuple(store.shape)
        wanted, strict = _requested_shape(tleaf, rarg)
        strict = strict and self._strict
        _check_shape(self.dir, name, stored, wanted, strict)
        shape = stored if wanted is None else wanted
        ser.check_sharding(self.dir, name, shape, sharding)
        entry = self.sums.arrays.get(name) if self.sums is not None else None
        chunks = tuple(entry.chunks) if entry is not None else (1,) * len(shape)
        dtype = getattr(rarg, "dtype", None) or getattr(tleaf, "dtype", None)
        out_dtype = np.dtype(dtype or store.dtype.numpy_dtype)

        def bounds(index: tuple[slice, ...] | None) -> list[tuple[int, int, int]]:
            index = index or tuple(slice(None) for _ in shape)
            return [s.indices(n) for s, n in zip(index, shape, strict=True)]

        indices = [[slice(a, z) for a, z, _ in bounds(idx)] for idx in devices_of(shape)]
        if not indices:
            return shape, out_dtype, lambda index: np.zeros(  # (nothing of this process's)
                [z - a for a, z, _ in bounds(index)], out_dtype)
        box = tuple(
            slice(min(n, min(i[d].start for i in indices) // c * c),
                  min(n, -(-max(i[d].stop for i in indices) // c) * c))
            for d, (n, c) in enumerate(zip(stored, (max(1, c) for c in chunks), strict=True)))
        try:
            region = await store[box].read()
        except ValueError as exc:
            raise read_failure(f"{self.dir}: array {name!r} cannot be read", exc) from exc
        await _integrity.check_array(self.dir, name, region, self.sums,
                                     origin=tuple(b.start for b in box))
        self.tracker.add(region.nbytes)
        if dtype is not None:
            region = ser.cast(region, dtype)

        def local(index: tuple[slice, ...] | None) -> np.ndarray:
            want = bounds(index)
            piece = region[tuple(slice(min(a, n) - b.start, min(z, n) - b.start)
                                 for (a, z, _), b, n in zip(want, box, stored, strict=True))]
            return ser.fit(piece, tuple(z - a for a, z, _ in want))  # (past the stored end: 0)

        return shape, out_dtype, local

    def _place(self, name: str, arr: np.ndarray, tleaf: Any, rarg: Any, vt: str) -> Any:
        """Casts and places one restored array as the target leaf (or restore arg) asks (a
        jax.Array may come back as a :class:`_Deferred`)."""
        wanted, strict = _requested_shape(tleaf, rarg)
        strict = strict and self._strict
        _check_shape(self.dir, name, arr.shape, wanted, strict)
        if wanted is not None:
            arr = ser.fit(arr, wanted)
        dtype = getattr(rarg, "dtype", None) or getattr(tleaf, "dtype", None)
        if dtype is not None and not isinstance(tleaf, RestoreArgs) or getattr(rarg, "dtype", None):
            arr = ser.cast(arr, dtype)
        rtype = getattr(rarg, "restore_type", None)
        if rtype in _PYTHON_SCALARS or (isinstance(rtype, type) and issubclass(rtype, np.generic)):
            # int(...), np.float32(...): Orbax's scalar handler, for a 0-d array only
            if arr.ndim != 0:
                raise InvalidArgumentError(
                    f"{self.dir}: key {name!r} is stored with shape {arr.shape}: restore_type="
                    f"{rtype.__name__} asks for a scalar")
            return rtype(arr.item())
        if rarg is not None and rarg.restore_type is np.ndarray:  # (ArrayRestoreArgs' too)
            return arr
        # (a jax.Array whose restore names no sharding is placed as it was saved, as Orbax
        # places it: its sharding, where this process has its devices)
        if isinstance(rarg, ArrayRestoreArgs) or (rarg is not None and rarg.restore_type is jax.Array):
            sharding = rarg.resolved_sharding() if isinstance(rarg, ArrayRestoreArgs) else None
            return self._put(name, arr, self._saved_sharding(name) if sharding is None else sharding)
        if isinstance(tleaf, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(tleaf, "sharding", None)
            if sharding is None and vt in ("np.ndarray", "scalar"):
                return arr  # an abstract target without sharding: NumPy, as in Orbax
            if sharding is None:
                sharding = self._saved_sharding(name)
            return self._put(name, arr, sharding)
        if isinstance(tleaf, ArrayMetadata) and not isinstance(tleaf, ScalarMetadata):
            return self._put(name, arr, self._saved_sharding(name)) if tleaf.sharding is not None else arr
        if isinstance(tleaf, np.ndarray):
            return arr
        if isinstance(tleaf, np.generic):
            return tleaf.dtype.type(arr.item())
        if type(tleaf) in _SCALAR_DTYPES:
            return type(tleaf)(arr.item())
        if self._is_scalar(name, vt):
            return self._scalar(name, arr)
        if vt == "jax.Array":
            return self._put(name, arr, self._saved_sharding(name))
        return arr

    def _param(self, name: str, vt: str) -> tuple[TypeHandler, ParamInfo]:
        """The TypeHandler that wrote leaf ``name`` (found by its typestr ``vt``), and what it
        is told of the leaf."""
        try:
            handler = self.registry.get(vt)
        except ValueError:
            raise UnsupportedLeafError(
                f"{self.dir}: leaf {name!r} was saved by a TypeHandler of typestr {vt!r}, and none "
                "is registered for it (ocp.type_handlers.register_type_handler)") from None
        # (what Orbax's own handlers wrote is in the item's OCDBT database; ckpt_async's
        # built-in handlers, called by another, write zarr arrays of their own)
        ocdbt = self.doc.use_ocdbt and (self.doc.ckpt_async is None or name not in self.handled)
        below(self.dir, name, "leaf")  # (a handler may read files at its name)
        info = ParamInfo(name=name, parent_dir=self.dir, ts_context=self.ctx, value_typestr=vt,
                         is_ocdbt_checkpoint=ocdbt, use_zarr3=self.doc.use_zarr3,
                         raise_array_data_missing_error=not self._fill_missing)
        return handler, info

    async def _read_handled(self, name: str, vt: str, rarg: Any) -> Any:
        handler, info = self._param(name, vt)
        try:
            values = await handler.deserialize([info], [rarg if rarg is not None else RestoreArgs()])
        except Exception as exc:
            raise _failed(exc, handler, "deserialize", str(self.dir), [name])
        self.tracker.add(int(getattr(values[0], "nbytes", 0)))
        return values[0]

    async def _handled_metadata(self, name: str, vt: str) -> Any:
        handler, info = self._param(name, vt)
        try:
            return (await handler.metadata([info]))[0]
        except Exception as exc:
            raise _failed(exc, handler, "metadata", str(self.dir), [name])

    async def metadata(self) -> TreeMetadata:
        entries = list(self.by_key.values())
        # (the shapes and dtypes the database's index holds, read at once: opening thousands
        # of arrays one by one took seconds)
        layouts = await self.items.layouts([
            name for e in entries
            if (vt := e.value_metadata.value_type) not in _tree.EMPTY_TYPES and vt != "string"
            and vt not in self.overridden and (name := self._name(e)) not in self.handled
            and name not in self.aggregated])

        async def one(entry: fmt.TreeEntry) -> Any:
            vt = entry.value_metadata.value_type
            name = self._name(entry)
            if name in self.handled or vt in self.overridden:
                return await self._handled_metadata(name, vt)
            if vt in _tree.EMPTY_TYPES:
                return self._empty(vt, name)
            if vt == "string":
                return StringMetadata(name, self.dir)
            if name in self.aggregated:  # (its value is at hand)
                arr = self.aggregated[name]
                shape, dtype, chunks = arr.shape, arr.dtype, None
            elif name in layouts:
                shape, dtype, chunks = layouts[name]
            else:
                shape, dtype, chunks = await ser.read_shape_dtype(
                    self.ctx, self.dir, name, use_ocdbt=self.doc.use_ocdbt,
                    use_zarr3=self.doc.use_zarr3)
            if vt == "scalar":  # (a NumPy scalar of StandardSave's is an array here, as Orbax has it)
                return ScalarMetadata(name, self.dir, shape, None, dtype, None)
            sharding = None
            if name in self.shardings:
                sharding = sharding_metadata_from_json(json.loads(self.shardings[name]))
            ws = entry.value_metadata.write_shape
            storage_meta = StorageMetadata(chunks, tuple(ws) if ws is not None else None)
            return ArrayMetadata(name, self.dir, shape, sharding, dtype, storage_meta)

        values = await asyncio.gather(*(one(e) for e in entries))
        # The tree as Orbax describes it (from the key metadata: sequences as lists, custom
        # nodes as dicts), whoever wrote it: code builds restore args and targets from it, and
        # edits what they restore (brax assigns into a restored list). Dicts keep the saved
        # order where ckpt_async wrote the checkpoint, and are sorted as Orbax sorts them where
        # Orbax did.
        tree = _tree.tree_from_key_metadata(
            [(e.key_metadata, v) for e, v in zip(entries, values)],
            sort_keys=self.skeleton is None)
        return TreeMetadata(tree, self.doc.custom_metadata, self.doc.use_zarr3)


register_with_handler(PyTreeCheckpointHandler, for_save=True)(PyTreeSave)
register_with_handler(PyTreeCheckpointHandler, for_restore=True)(PyTreeRestore)
register_with_handler(StandardCheckpointHandler, for_save=True)(StandardSave)
register_with_handler(StandardCheckpointHandler, for_restore=True)(StandardRestore)

__all__ = ["PyTreeCheckpointHandler", "StandardCheckpointHandler"]
