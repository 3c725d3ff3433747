"""The ``ckpt-async`` command line: inspect, check, compare, clean and convert checkpoints.

``ckpt-async ls DIR``, ``show PATH``, ``verify PATH``, ``diff A B``, ``gc DIR``,
``export PATH --to F.safetensors`` and ``import F.safetensors --to PATH`` (see docs/cli.md).
Also ``python -m ckpt_async``. A location is a local path or an object-store URL
(``s3://bucket/prefix``): each command is one coroutine on the engine loop that reaches storage
only through the library (``_storage``, ``_commit.scan``, ``_integrity``, the checkpointers and
handlers), so one code path serves both. Arrays are read only where a command needs their
values (``verify``, ``diff --values``, ``export``). ``main(argv)`` returns the exit status:
0 success, 1 a failure (or, for ``verify``, problems; for ``diff``, differences), 2 a usage
error (and for ``diff``, any failure), 130 interrupted, 141 the output pipe closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import _commit, _integrity, _paths
from . import _format as fmt
from . import _storage as storage
from ._checkpointer import AsyncCheckpointer
from ._paths import AnyPath, as_path
from ._runtime import get_runtime
from ._serialize import dtype_named
from .errors import CheckpointError, InvalidArgumentError, StepAlreadyExistsError
from .handlers import JsonCheckpointHandler, PyTreeCheckpointHandler, StandardCheckpointHandler
from .handlers._legacy import AGGREGATE_FILE
from .handlers.base import call_handler
from .handlers.json_handler import read_document
from .handlers.pytree import _is_random_key, random_key_impls
from .manager import _steps

T = TypeVar("T")

# -- errors ----------------------------------------------------------------------------------


class CLIError(Exception):
    """A failure reported as one line on stderr, exit status 1."""


class UsageError(CLIError):
    """A bad command line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse prints usage and exits 2; keep that
        self.print_usage(sys.stderr)
        raise UsageError(message)


# -- formatting ------------------------------------------------------------------------------


def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _iso(ns: int | None) -> str | None:
    if not ns:
        return None
    dt = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _short_handler(typestr: str | None) -> str:
    return typestr.rsplit(".", 1)[-1] if typestr else "?"


def _table(rows: list[list[str]], out: Any) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float as the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"`` (JSON has no such numbers)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _print_json(doc: Any, out: Any) -> None:
    print(json.dumps(_finite(doc), indent=2, default=_json_default, allow_nan=False), file=out)


# -- locations -------------------------------------------------------------------------------


def location(arg: str) -> AnyPath:
    """A checkpoint location from the command line: a URL (``s3://bucket/prefix``) as the
    library parses it, else a local path as typed, a leading ``~`` expanded (as the library's
    paths are, and as the shell does where it is not quoted)."""
    if "://" not in arg:
        return Path(os.path.expanduser(arg))
    try:
        return as_path(arg)
    except InvalidArgumentError as exc:
        raise UsageError(str(exc)) from None


def local_file(arg: str, what: str) -> Path:
    """A safetensors file: local only (the CLI writes and reads it with ``open``), a leading
    ``~`` expanded."""
    if "://" in arg:
        raise UsageError(f"{what} {arg}: the safetensors file must be a local path "
                         "(checkpoints may be URLs)")
    return Path(os.path.expanduser(arg))


async def _gather(coros: list[Coroutine[Any, Any, T]], limit: int = 16) -> list[T]:
    """Awaits ``coros`` concurrently, at most ``limit`` at a time, results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Coroutine[Any, Any, T]) -> T:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


# -- the storage view --------------------------------------------------------------------------


async def check_dir(path: AnyPath) -> None:
    """Raises CLIError unless ``path`` is a directory (on an object store: a prefix that holds
    objects)."""
    if await storage.is_dir(path):
        return
    if await storage.exists(path):
        raise CLIError(f"{path} is not a directory")
    raise CLIError(f"{path} does not exist")


def _du(path: Path) -> int:
    """Total size of the files under ``path`` (symlinks not followed)."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


async def stored_bytes(path: AnyPath) -> int | None:
    """Bytes of the files under ``path``; None on an object store (the library's listings
    give keys, not sizes)."""
    if _paths.is_store(path):
        return None
    try:
        return await get_runtime().to_thread(_du, path)
    except OSError:
        return None


def _newest_mtime(path: Path) -> float:
    """The newest modification time of ``path`` and of anything under it."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


async def modified(path: AnyPath, anywhere: bool = False) -> float | None:
    """Modification time of ``path`` (``anywhere``: the newest of anything under it, as a
    save in flight writes deep inside); None on an object store, which has no directory
    times."""
    if not storage.has_rename(path):
        return None
    try:
        if anywhere:
            return await get_runtime().to_thread(_newest_mtime, path)
        return await storage.mtime(path)
    except OSError:
        return None


async def step_doc(path: AnyPath) -> fmt.StepMetadata | None:
    """A step's ``_CHECKPOINT_METADATA`` (checked against its recorded crc32), or None."""
    doc, _ext = await _integrity.read_step_metadata(path)
    return doc


def _split(keys: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The files directly in a directory, and the keys below each subdirectory."""
    files: list[str] = []
    dirs: dict[str, list[str]] = {}
    for key in keys:
        head, sep, rest = key.partition("/")
        if sep:
            dirs.setdefault(head, []).append(rest)
        else:
            files.append(head)
    return files, dirs


@dataclasses.dataclass
class Item:
    """One item of a checkpoint: ``name`` None for a single-item checkpoint."""

    name: str | None
    path: AnyPath
    kind: str  # "pytree" | "json" | "proto" | "random_key" | "unknown"
    typestr: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "(item)"


def _first_format(keys: list[str], name: str) -> bool:
    """Whether the folder ``name`` (its files ``keys``) is a pytree item of Orbax's first
    format: its msgpack file without ``_METADATA`` (a JSON item's one file is named after the
    item)."""
    files, dirs = _split(keys)
    return (fmt.PYTREE_METADATA not in files and AGGREGATE_FILE in files
            and (bool(dirs) or name != AGGREGATE_FILE))


def _kind_of(typestr: str | None, keys: list[str], name: str) -> str:
    """An item's kind from its recorded handler, else from its files (``keys``)."""
    tail = _short_handler(typestr) if typestr else ""
    if tail in ("StandardCheckpointHandler", "PyTreeCheckpointHandler"):
        return "pytree"
    if tail == "JsonCheckpointHandler":
        return "json"
    if tail == "ProtoCheckpointHandler":
        return "proto"
    if tail in ("JaxRandomKeyCheckpointHandler", "NumpyRandomKeyCheckpointHandler"):
        return "random_key"
    if fmt.PYTREE_METADATA in keys or _first_format(keys, name):
        return "pytree"
    if typestr is None:
        files, dirs = _split(keys)
        docs = [f for f in files if f not in _integrity.NOT_DOCUMENTS]
        if len(docs) == 1 and not dirs:  # (any other lone file is no item's)
            if docs[0].endswith(".pbtxt"):
                return "proto"
            if docs[0] in (fmt.JSON_ITEM, name):
                return "json"  # a JSON item (Orbax names its file after the item or `metadata`)
    return "unknown"


async def is_checkpoint(path: AnyPath) -> bool:
    return (await storage.exists(path / fmt.CHECKPOINT_METADATA)
            or await storage.exists(path / fmt.PYTREE_METADATA))


async def scan(directory: AnyPath, prefix: str | None) -> _steps.DirView:
    """The steps and leftovers of a manager directory (``_steps.scan_dir``), real steps only:
    none in a checkpoint's own folder (its items' folders are no steps) and, without
    ``prefix``, a ``<prefix>_<step>`` name only when it is a committed checkpoint's folder and
    no step of the directory is a bare number (a ``tensorboard_1/`` or a ``ckpt_000200/``
    beside steps ``20/``, ``30/`` is none: a manager names all its steps one way)."""
    if await is_checkpoint(directory):
        return _steps.DirView({}, [])
    view = await _steps.scan_dir(directory, prefix)
    if prefix is None:
        bare = {s: n for s, n in view.steps.items() if n.isdigit()}
        view.steps = bare or {s: n for s, n in view.steps.items() if await is_checkpoint(
            directory / n) or await storage.exists(directory / n / fmt.COMMIT_SUCCESS)}
    return view


async def _items_of(path: AnyPath, doc: fmt.StepMetadata | None) -> list[Item]:
    keys = await storage.listfiles(path)
    files, dirs = _split(keys)
    handlers = doc.item_handlers if doc is not None else None
    single = handlers if isinstance(handlers, str) else None
    if handlers is None:  # one item's folder? its handler is recorded in the step above
        with contextlib.suppress(CheckpointError, OSError):
            above = await step_doc(path.parent)
            if above is not None and isinstance(above.item_handlers, dict):
                single = above.item_handlers.get(path.name)
    if single is not None or (handlers is None and (
            fmt.PYTREE_METADATA in files or _first_format(keys, path.name)
            or (not dirs and _kind_of(None, keys, path.name) != "unknown"))):
        return [Item(None, path, _kind_of(single, keys, path.name), single)]
    recorded = handlers if isinstance(handlers, dict) else {}
    items = []
    for name in sorted(set(recorded) | set(dirs)):
        if name not in dirs:
            continue  # recorded but saved as None
        typestr = recorded.get(name)
        items.append(Item(name, path / name, _kind_of(typestr, dirs[name], name), typestr))
    return items


async def checkpoint_items(path: AnyPath) -> list[Item]:
    """The items of a checkpoint (a step, a checkpointer's path or one item folder)."""
    return await _items_of(path, await step_doc(path))


async def _check_committed(path: AnyPath) -> None:
    if _steps.is_leftover(path.name):
        raise CLIError(f"{path} is a leftover of a save or deletion that did not finish (its "
                       "temporary name), not a checkpoint; `ckpt-async gc` removes it")
    if not await _commit.is_visible(path):
        raise CLIError(f"{path} is not committed (no {fmt.COMMIT_SUCCESS}): a save that did "
                       "not finish, which no manager lists; `ckpt-async gc` removes it")


async def resolve_checkpoint(path: AnyPath, step: int | None,
                             prefix: str | None) -> tuple[AnyPath, int | None]:
    """``path`` itself when it is a checkpoint, else a step of the manager directory ``path``
    (``step``, or the latest)."""
    await check_dir(path)
    if step is None and _steps.is_leftover(path.name):
        await _check_committed(path)
    if step is None and await is_checkpoint(path):
        await _check_committed(path)
        return path, None
    steps = (await scan(path, prefix)).steps
    if not steps:
        if step is not None:
            raise CLIError(f"{path} holds no steps")
        if any(i.kind != "unknown" for i in await checkpoint_items(path)):
            await _check_committed(path)
            return path, None
        raise CLIError(f"{path} holds no checkpoint and no steps")
    if step is None:
        step = max(steps)
    if step not in steps:
        raise CLIError(f"step {step} is not in {path} (steps: {list(steps)[-10:]})")
    return path / steps[step], step


# -- reading items -----------------------------------------------------------------------------


async def item_metadata(item: Item) -> Any:
    """The ``TreeMetadata`` of a pytree item, read without loading arrays."""
    ckptr = AsyncCheckpointer(PyTreeCheckpointHandler())
    try:
        return (await ckptr.metadata(item.path)).item_metadata
    finally:
        await ckptr.close()


async def restore_item(item: Item) -> Any:
    """A pytree item's tree as saved (every array read)."""
    ckptr = AsyncCheckpointer(PyTreeCheckpointHandler())
    try:
        return await ckptr.restore(item.path)
    finally:
        await ckptr.close()


async def read_json_item(path: AnyPath, filename: str) -> Any:
    """The document of a JSON item (checked against its ``_CHECKSUMS`` when it has one)."""
    return await call_handler(JsonCheckpointHandler(filename=filename).restore, path)


async def json_document(item: Item) -> Any:
    files, _dirs = _split(await storage.listfiles(item.path))
    docs = sorted(f for f in files if f not in _integrity.NOT_DOCUMENTS)
    if not docs:
        raise CLIError(f"{item.path}: the JSON item holds no document")
    preferred = [f for f in docs if f in (fmt.JSON_ITEM, item.path.name)]
    return await read_json_item(item.path, (preferred or docs)[0])


async def proto_text(item: Item) -> str:
    """The text format of a ProtoSave item's message (checked against its ``_CHECKSUMS``)."""
    files, _dirs = _split(await storage.listfiles(item.path))
    docs = sorted(f for f in files if f.endswith(".pbtxt")) or ["proto.pbtxt"]
    data = await read_document(item.path, docs[0], "proto")
    return data.decode(errors="replace")


async def random_key_parts(item: Item) -> tuple[Item, Any]:
    """A random key item's two parts: its key (a pytree item) and the key's description."""
    _files, dirs = _split(await storage.listfiles(item.path))
    desc = [d for d in dirs if d.endswith("_metadata")]
    keys = [d for d in dirs if d not in desc]
    if len(desc) != 1 or len(keys) != 1:
        raise CLIError(f"{item.path}: a random key item holds its key and <key>_metadata/ "
                       f"(found: {', '.join(sorted(dirs)) or 'nothing'})")
    return (Item(keys[0], item.path / keys[0], "pytree"),
            await read_json_item(item.path / desc[0], fmt.JSON_ITEM))


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def walk_tree(tree: Any, keys: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, leaf) of a tree of dicts, lists, tuples and named tuples; empty containers
    and None are leaves."""
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from walk_tree(v, (*keys, str(k)))
    elif _is_namedtuple(tree):
        for f, v in zip(tree._fields, tree):
            yield from walk_tree(v, (*keys, f))
    elif isinstance(tree, (list, tuple)) and tree:
        for i, v in enumerate(tree):
            yield from walk_tree(v, (*keys, str(i)))
    else:
        yield keys, tree


def _sharding_str(sharding: Any) -> str | None:
    if sharding is None:
        return None
    from .metadata import NamedShardingMetadata, SingleDeviceShardingMetadata

    if isinstance(sharding, NamedShardingMetadata):
        mesh = ",".join(f"{a}:{s}" for a, s in zip(sharding.axis_names, sharding.shape))
        spec = ", ".join("None" if p is None else repr(p) for p in sharding.partition_spec)
        return f"NamedSharding(mesh={{{mesh}}}, spec=({spec}))"
    if isinstance(sharding, SingleDeviceShardingMetadata):
        return f"SingleDevice({sharding.device_str})"
    return str(sharding)


def leaf_record(keys: tuple[str, ...], leaf: Any, key_impl: str | None = None) -> dict[str, Any]:
    """A metadata leaf as a JSON-able record (``key_impl``: the implementation of the typed
    PRNG key whose key data the array is)."""
    from .metadata import ArrayMetadata, ScalarMetadata, StringMetadata

    rec: dict[str, Any] = {"key": ".".join(keys)}
    if isinstance(leaf, ArrayMetadata):
        dtype = np.dtype(leaf.dtype)
        shape = [int(s) for s in leaf.shape]
        rec.update(kind="scalar" if isinstance(leaf, ScalarMetadata) else "array",
                   shape=shape, dtype=dtype.name, bytes=math.prod(shape) * dtype.itemsize,
                   sharding=_sharding_str(leaf.sharding))
        if key_impl is not None:
            rec["random_key"] = key_impl
        storage = getattr(leaf, "storage", None)
        if storage is not None and storage.chunk_shape is not None:
            rec["chunk_shape"] = [int(s) for s in storage.chunk_shape]
    elif isinstance(leaf, StringMetadata):
        rec.update(kind="string")
    elif leaf is None:
        rec.update(kind="none")
    elif isinstance(leaf, (dict, list, tuple)):
        rec.update(kind="empty", container=type(leaf).__name__)
    else:
        rec.update(kind="other", value=repr(leaf))
    return rec


async def item_records(item: Item) -> list[dict[str, Any]]:
    meta = await item_metadata(item)
    doc, *_ = await PyTreeCheckpointHandler().read_documents(item.path)
    keys = await random_key_impls(item.path, doc)  # (stored as key data, as Orbax does)
    tree = getattr(meta, "tree", meta)
    return [leaf_record(k, leaf, keys.get(".".join(k))) for k, leaf in walk_tree(tree)]


# -- ls ----------------------------------------------------------------------------------------


_METRICS = "metrics"  # Orbax's metrics item, <step>/metrics/metrics


def _size(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


async def _step_entry(step: int, path: AnyPath) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": step, "name": path.name, "path": str(path),
                             "bytes": await stored_bytes(path)}
    problems = []
    doc = None
    try:
        doc = await step_doc(path)
    except Exception as exc:  # noqa: BLE001 - listed, not fatal
        problems.append(_tidy(exc))
    try:
        items = await _items_of(path, doc)
    except Exception as exc:  # noqa: BLE001
        items = []
        problems.append(_tidy(exc))
    entry["items"] = [i.name for i in items if i.name is not None] or (
        ["(single)"] if items else [])
    ns = doc.commit_timestamp_nsecs if doc else None
    entry["commit_timestamp_nsecs"] = ns
    mtime = None if ns else await modified(path)
    entry["commit_time"] = _iso(ns) or _iso(int(mtime * 1e9) if mtime else None)
    entry["metrics"] = await _step_metrics(path, doc)
    entry["committed"] = doc is not None or await storage.exists(path / fmt.COMMIT_SUCCESS)
    if doc is None and not problems:
        problems.append(f"no {fmt.CHECKPOINT_METADATA}" + (
            " (COMMITTED is the folder's modification time)" if mtime else ""))
    entry["problems"] = problems
    return entry


async def _step_metrics(path: AnyPath, doc: Any) -> Any:
    """A step's metrics: Orbax's ``metrics`` item where there is one, else those its
    ``_CHECKPOINT_METADATA`` records (None: neither)."""
    metrics = (doc.metrics if doc else None) or None
    if await storage.exists(path / _METRICS / _METRICS):
        with contextlib.suppress(CheckpointError):
            metrics = await read_json_item(path / _METRICS, _METRICS)
    return metrics


async def _leftover_entry(directory: AnyPath, name: str, kind: str) -> dict[str, Any]:
    path = directory / name
    return {"name": name, "path": str(path), "kind": kind, "bytes": await stored_bytes(path),
            "mtime": await modified(path, anywhere=True)}


async def leftovers(directory: AnyPath, view: _steps.DirView) -> list[dict[str, Any]]:
    return await _gather([_leftover_entry(directory, n, k) for n, k in view.leftovers])


def _fmt_metrics(m: Any) -> str:
    if not m:
        return "-"
    if isinstance(m, dict):
        return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in m.items())
    return str(m)


async def cmd_ls(a: argparse.Namespace, out: Any) -> int:
    directory = location(a.dir)
    await check_dir(directory)
    view = await scan(directory, a.step_prefix)
    steps = await _gather([_step_entry(s, directory / n) for s, n in view.steps.items()])
    found = await leftovers(directory, view)
    if a.json:
        _print_json({"directory": str(as_path(directory)), "steps": steps,
                     "leftovers": found}, out)
        return 0
    rows = [["STEP", "COMMITTED (UTC)", "SIZE", "ITEMS", "METRICS"]]
    for s in steps:  # (a step with problems is marked "!", its problems listed below)
        rows.append([f"{s['step']}{' !' if s['problems'] else ''}", s["commit_time"] or "-",
                     _size(s["bytes"]), ",".join(s["items"]) or "-",
                     _fmt_metrics(s["metrics"])])
    for lo in found:
        rows.append([lo["name"], f"leftover ({lo['kind']})", _size(lo["bytes"]), "-", "-"])
    if len(rows) == 1:
        what = " (a checkpoint, not a manager directory)" if await is_checkpoint(directory) else ""
        print(f"{directory}: no steps{what}", file=out)
        return 0
    _table(rows, out)
    sizes = [s["bytes"] for s in steps]
    total = f", {human_bytes(sum(sizes))}" if None not in sizes else ""
    tail = f", {len(found)} leftover(s) (remove with: ckpt-async gc)" if found else ""
    print(f"{len(steps)} step(s){total}{tail}", file=out)
    for s in steps:
        for problem in s["problems"]:
            print(f"! step {s['step']}: {problem}", file=out)
    return 0


# -- show --------------------------------------------------------------------------------------


def _describe(rec: dict[str, Any]) -> str:
    kind = rec["kind"]
    if kind in ("array", "scalar"):
        shape = "[" + ",".join(str(s) for s in rec["shape"]) + "]"
        parts = [f"{rec['dtype']}{shape}", human_bytes(rec["bytes"])]
        if kind == "scalar":
            parts.append("scalar")
        if rec.get("random_key"):
            parts.append(f"random key ({rec['random_key']})")
        if rec.get("sharding"):
            parts.append(rec["sharding"])
        return "  ".join(parts)
    if kind == "empty":
        return f"empty {rec['container']}"
    return kind


def _print_tree(records: list[dict[str, Any]], out: Any, indent: str = "  ") -> None:
    rows = [[indent + r["key"] if r["key"] else indent + "(root)", _describe(r)] for r in records]
    _table(rows, out)


async def cmd_show(a: argparse.Namespace, out: Any) -> int:
    path, step = await resolve_checkpoint(location(a.path), a.step, a.step_prefix)
    doc = await step_doc(path)
    items = await _items_of(path, doc)
    if a.item is not None:
        items = [i for i in items if i.name == a.item]
        if not items:
            raise CLIError(f"{path} has no item {a.item!r}")
    result: dict[str, Any] = {"path": str(path), "step": step, "items": []}
    result["metrics"] = await _step_metrics(path, doc)
    if doc is not None:
        result.update(commit_time=_iso(doc.commit_timestamp_nsecs),
                      custom_metadata=doc.custom_metadata or None)
    for item in items:
        entry: dict[str, Any] = {"name": item.name, "handler": _short_handler(item.typestr),
                                 "kind": item.kind, "path": str(item.path)}
        if item.kind == "pytree":
            recs = await item_records(item)
            entry["leaves"] = recs
            entry["arrays"] = sum(1 for r in recs if r["kind"] in ("array", "scalar"))
            entry["bytes"] = sum(r.get("bytes", 0) for r in recs)
        elif item.kind == "json":
            entry["document"] = await json_document(item)
        elif item.kind == "proto":
            entry["text"] = await proto_text(item)
        elif item.kind == "random_key":
            key, entry["document"] = await random_key_parts(item)
            entry["leaves"] = await item_records(key)
        result["items"].append(entry)
    if a.json:
        _print_json(result, out)
        return 0
    head = f"{path}" + (f"  (step {step})" if step is not None else "")
    if result.get("commit_time"):
        head += f"  committed {result['commit_time']}"
    print(head, file=out)
    if result.get("metrics"):
        print(f"metrics: {_fmt_metrics(result['metrics'])}", file=out)
    for entry in result["items"]:
        name = entry["name"] if entry["name"] is not None else "(single item)"
        if entry["kind"] == "pytree":
            print(f"{name}  [{entry['handler']}]  {entry['arrays']} arrays, "
                  f"{human_bytes(entry['bytes'])}", file=out)
            _print_tree(entry["leaves"], out)
        elif entry["kind"] in ("json", "proto", "random_key"):
            text = entry.get("text") or json.dumps(entry["document"])
            text = " ".join(text.split())
            if len(text) > 200:
                text = text[:197] + "..."
            print(f"{name}  [{entry['handler']}]  {text}", file=out)
            if entry["kind"] == "random_key":
                _print_tree(entry["leaves"], out)
        else:
            print(f"{name}  [{entry['handler']}]  (not inspected: unknown handler)", file=out)
    return 0


# -- verify ------------------------------------------------------------------------------------


def _restored_leaves(tree: Any) -> dict[str, Any]:
    """The leaves of a restored tree by key; a typed PRNG key as its key data."""
    import jax

    return {".".join(k): jax.random.key_data(v) if _is_random_key(v) else v
            for k, v in walk_tree(tree)}


_ANNOTATION = re.compile(r"\s*\[[\w .-]+='.*?'\]", re.S)


def _tidy(problem: object) -> str:
    """A message without TensorStore's annotations (its spec dump, an HTTP response body)."""
    return _ANNOTATION.sub("", str(problem))


class Progress:
    """A progress bar on a terminal; plain lines every 10% otherwise."""

    def __init__(self, label: str, out: Any, tty: bool, in_bytes: bool = True) -> None:
        self.label, self.out, self.tty, self.in_bytes = label, out, tty, in_bytes
        self.last_decile = -1
        self.last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        frac = 1.0 if total <= 0 else min(done / total, 1.0)
        if self.tty:
            now = time.monotonic()
            if frac < 1.0 and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            width = 30
            bar = "#" * int(frac * width)
            print(f"\r{self.label} [{bar:<{width}}] {frac:4.0%} {self._amount(done, total)}",
                  end="", file=self.out, flush=True)
            return
        decile = int(frac * 10)
        if decile != self.last_decile:
            self.last_decile = decile
            print(f"{self.label}: {frac:.0%} ({self._amount(done, total)})",
                  file=self.out, flush=True)

    def _amount(self, done: int, total: int) -> str:
        if self.in_bytes:
            return f"{human_bytes(done)} / {human_bytes(total)}"
        return f"{done} / {total}"

    def close(self) -> None:
        if self.tty and self.last_draw:
            print(file=self.out, flush=True)


async def cmd_verify(a: argparse.Namespace, out: Any) -> int:
    path = location(a.path)
    await check_dir(path)
    # (a manager directory's steps, each checked, as ckpt_async.verify checks them)
    steps = [] if a.step is not None else [
        (parsed[1] if parsed else None, p) for p in await _integrity.manager_steps(path)
        if (parsed := _steps.parse_step(p.name, a.step_prefix)) or a.step_prefix is None]
    check = _integrity.averify_step
    if not steps:
        p, s = await resolve_checkpoint(path, a.step, a.step_prefix)
        steps, check = [(s, p)], _integrity.averify
    prog_out = sys.stderr if a.json else out
    tty = bool(getattr(prog_out, "isatty", lambda: False)())
    results = []
    failed = False
    for step, target in steps:
        label = f"step {step}" if step is not None else str(target)
        bar = None if a.quiet else Progress(f"verifying {label}", prog_out, tty,
                                            in_bytes=False)  # averify() counts arrays
        try:
            report = await check(target, bar)
        finally:
            if bar is not None:
                bar.close()
        problems = [_tidy(p) for p in report.problems]
        failed = failed or bool(problems)
        results.append({"step": step, "path": str(target), "ok": not problems,
                        "arrays_checked": report.arrays_checked,
                        "bytes_checked": report.bytes_checked, "problems": problems})
        if not a.json:
            status = "FAIL" if problems else "OK"
            print(f"{status}  {label}: {report.arrays_checked} arrays, "
                  f"{human_bytes(report.bytes_checked)} checked", file=out)
            for problem in problems:
                print(f"  problem: {problem}", file=out)
    if a.json:
        _print_json({"ok": not failed, "checkpoints": results}, out)
    if failed:
        n = sum(1 for r in results if not r["ok"])
        print(f"verify: {n} of {len(results)} checkpoint(s) failed", file=sys.stderr)
    return 1 if failed else 0


# -- diff --------------------------------------------------------------------------------------


async def _flat_records(path: AnyPath) -> tuple[dict[str, dict[str, Any]], dict[str, Item]]:
    """Every leaf of every pytree item (and every JSON item) of a checkpoint, by name."""
    recs: dict[str, dict[str, Any]] = {}
    items: dict[str, Item] = {}
    for item in await checkpoint_items(path):
        prefix = f"{item.name}/" if item.name is not None else ""
        if item.kind == "pytree":
            for r in await item_records(item):
                key = prefix + r["key"]
                recs[key] = dict(r, item=item.name)
                items[key] = item
        elif item.kind == "json":
            key = prefix.rstrip("/") or "(json)"
            recs[key] = {"key": key, "kind": "json", "document": await json_document(item),
                         "item": item.name}
            items[key] = item
    return recs, items


def _sig(r: dict[str, Any]) -> tuple[Any, ...]:
    # (a scalar and a 0-d array of its dtype hold the same value: a NumPy scalar is the one
    # under PyTreeSave and the other under StandardSave, as in Orbax)
    kind = "array" if r["kind"] == "scalar" else r["kind"]
    return (kind, r.get("dtype"), tuple(r.get("shape") or ()), r.get("random_key"))


def _sig_str(r: dict[str, Any]) -> str:
    if r["kind"] in ("array", "scalar"):
        key = f" random key ({r['random_key']})" if r.get("random_key") else ""
        return f"{r['dtype']}[{','.join(str(s) for s in r['shape'])}]{key}"
    return r["kind"] if r["kind"] != "empty" else f"empty {r['container']}"


def compare_arrays(a: Any, b: Any) -> tuple[int, float]:
    """(count of differing elements, max abs difference); NaNs in the same place are equal."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "c" or b.dtype.kind == "c":
        af, bf = a.astype(np.complex128), b.astype(np.complex128)
    elif a.dtype.kind in "biu" and b.dtype.kind in "biu":
        neq = a != b
        count = int(np.count_nonzero(neq))
        if not count:
            return 0, 0.0
        diff = np.abs(a[neq].astype(object) - b[neq].astype(object))
        return count, float(max(diff))
    else:
        af, bf = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(af) & np.isnan(bf)
    neq = (af != bf) & ~both_nan
    count = int(np.count_nonzero(neq))
    if not count:
        return 0, 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(af[neq] - bf[neq])
    d = np.where(np.isnan(d), np.inf, d)
    return count, float(d.max())


async def cmd_diff(a: argparse.Namespace, out: Any) -> int:
    pa, _ = await resolve_checkpoint(location(a.a), None, a.step_prefix)
    pb, _ = await resolve_checkpoint(location(a.b), None, a.step_prefix)
    ra, ia = await _flat_records(pa)
    rb, ib = await _flat_records(pb)
    added = sorted(set(rb) - set(ra))
    removed = sorted(set(ra) - set(rb))
    changed = []
    same_sig = []
    for key in sorted(set(ra) & set(rb)):
        x, y = ra[key], rb[key]
        if x["kind"] == "json" or y["kind"] == "json":
            if x.get("document") != y.get("document") or x["kind"] != y["kind"]:
                changed.append({"key": key, "a": _sig_str(x), "b": _sig_str(y),
                                "what": "document"})
        elif _sig(x) != _sig(y):
            changed.append({"key": key, "a": _sig_str(x), "b": _sig_str(y),
                            "what": "shape/dtype"})
        elif x["kind"] in ("array", "scalar"):
            same_sig.append(key)
    values: list[dict[str, Any]] = []
    if a.values and same_sig:
        cache: dict[tuple[str, str], dict[str, Any]] = {}

        async def leaves(item: Item, side: str) -> dict[str, Any]:
            k = (side, str(item.path))
            if k not in cache:
                cache[k] = _restored_leaves(await restore_item(item))
            return cache[k]

        for key in same_sig:
            x, y = ra[key], rb[key]
            va = (await leaves(ia[key], "a"))[x["key"]]
            vb = (await leaves(ib[key], "b"))[y["key"]]
            count, max_abs = compare_arrays(va, vb)
            if count:
                values.append({"key": key, "differing": count,
                               "size": int(np.asarray(va).size), "max_abs_diff": max_abs})
    differs = bool(added or removed or changed or values)
    if a.json:
        _print_json({"a": str(pa), "b": str(pb), "added": added, "removed": removed,
                     "changed": changed, "values": values if a.values else None,
                     "identical": not differs}, out)
        return 1 if differs else 0
    for key in added:
        print(f"+ {key}  {_sig_str(rb[key])}", file=out)
    for key in removed:
        print(f"- {key}  {_sig_str(ra[key])}", file=out)
    for c in changed:
        what = "document differs" if c["what"] == "document" else f"{c['a']} -> {c['b']}"
        print(f"~ {c['key']}  {what}", file=out)
    for v in values:
        print(f"≠ {v['key']}  {v['differing']} of {v['size']} elements differ, "
              f"max abs diff {v['max_abs_diff']:.6g}", file=out)
    if not differs:
        print("identical" + (" (values compared)" if a.values else " (shapes and dtypes)"),
              file=out)
    return 1 if differs else 0


# -- gc ----------------------------------------------------------------------------------------


async def cmd_gc(a: argparse.Namespace, out: Any) -> int:
    directory = location(a.dir)
    await check_dir(directory)
    found = await leftovers(directory, await scan(directory, a.step_prefix))
    if a.older_than > 0:
        ageless = [lo["name"] for lo in found if lo["mtime"] is None]
        if ageless:
            raise UsageError(f"--older-than: the age of {directory / ageless[0]} is unknown "
                             "(object stores keep no directory times); run gc without it "
                             "while no job writes there")
        now = time.time()
        young = len(found)
        found = [lo for lo in found if now - lo["mtime"] >= a.older_than]
        young -= len(found)
    removed = []
    for lo in found:
        verb = "would remove" if a.dry_run else "removing"
        if not a.json:
            size = f", {human_bytes(lo['bytes'])}" if lo["bytes"] is not None else ""
            print(f"{verb} {lo['name']}  ({lo['kind']}{size})", file=out)
        if not a.dry_run:
            path = directory / lo["name"]
            await storage.rmtree(path)  # on an object store: the commit marker first
            if await storage.exists(path):
                raise CLIError(f"cannot remove {path} (not a directory, or not permitted)")
            removed.append(lo["name"])
    if a.json:
        _print_json({"directory": str(directory), "leftovers": found, "removed": removed,
                     "dry_run": a.dry_run}, out)
    elif not found:
        kept = (f" older than {a.older_than:g} s ({young} younger left alone)"
                if a.older_than > 0 and young else "")
        print(f"{directory}: no leftovers{kept}", file=out)
    else:
        sizes = [lo["bytes"] for lo in found]
        verb = "would free" if a.dry_run else "freed"
        freed = f", {verb} {human_bytes(sum(sizes))}" if None not in sizes else ""
        print(f"{len(found)} leftover(s){freed}", file=out)
    return 0


# -- safetensors -------------------------------------------------------------------------------

_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "F32": "float32", "F64": "float64", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
_NP_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
META_KEY = "ckpt_async"


def temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file of a unique name beside ``path``: (descriptor, name)."""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                      stop: threading.Event | None = None,
                      tmp: tuple[int, str] | None = None) -> None:
    """Writes a safetensors file (little-endian, header padded to 8 bytes) through ``tmp``
    (else a new :func:`temporary_beside` it), removed on any failure, and when ``stop`` is
    set (the command was interrupted) before the file is in place."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        st = _NP_TO_ST.get(arr.dtype.name)
        if st is None:
            raise CLIError(f"{name}: dtype {arr.dtype} has no safetensors equivalent")
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        header[name] = {"dtype": st, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, name = tmp or temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for arr in arrays:
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                f.write(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
            f.flush()
            os.fsync(f.fileno())
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file: tensors by name (in file order) and ``__metadata__``."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise CLIError(f"cannot open {path}: {exc.strerror}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CLIError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100 << 20):
            raise CLIError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CLIError(f"{path}: not a safetensors file (bad header: {exc})") from exc
        if not isinstance(header, dict):
            raise CLIError(f"{path}: not a safetensors file (header is not an object)")
        metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        out: dict[str, np.ndarray] = {}
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            st = spec.get("dtype")
            if st not in _ST_DTYPES:
                raise CLIError(f"{path}: tensor {name!r} has dtype {st}, not supported here")
            dtype = dtype_named(_ST_DTYPES[st])
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
                raise CLIError(f"{path}: tensor {name!r} is truncated or inconsistent")
            f.seek(base + begin)
            data = f.read(end - begin)
            out[name] = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(
                dtype, copy=False).reshape(shape).copy()
        return out, metadata


async def _pick_item(path: AnyPath, name: str | None) -> Item:
    items = await checkpoint_items(path)
    if name is not None:
        for item in items:
            if item.name == name:
                if item.kind != "pytree":
                    raise CLIError(f"item {name!r} of {path} is not a pytree item")
                return item
        raise CLIError(f"{path} has no item {name!r} (items: {[i.name for i in items]})")
    trees = [i for i in items if i.kind == "pytree"]
    if len(trees) == 1:
        return trees[0]
    if not trees:
        raise CLIError(f"{path} holds no pytree item")
    raise CLIError(f"{path} holds several pytree items ({', '.join(i.label for i in trees)}); "
                   "choose one with --item")


async def _disk_skeleton(item: Item) -> tuple[Any, Any] | None:
    """The skeleton and custom metadata recorded in the item's ``_METADATA``."""
    try:
        doc, _shardings, _strings, _sums, _aggregated = (
            await PyTreeCheckpointHandler().read_documents(item.path))
    except CheckpointError:  # fall back to the restored tree's structure
        return None
    return (doc.ckpt_async or {}).get("skeleton"), doc.custom_metadata


def _leaf_spec(value: Any) -> tuple[dict[str, Any], np.ndarray | None]:
    """How one restored leaf is recorded, and the tensor it becomes (None for no tensor)."""
    import jax

    if isinstance(value, str):
        return {"kind": "string", "value": value}, None
    if _is_random_key(value):  # its key data, and its implementation to wrap it again
        return ({"kind": "jax", "key_impl": str(jax.random.key_impl(value))},
                np.asarray(jax.random.key_data(value)))
    if isinstance(value, jax.Array):
        return {"kind": "jax"}, np.asarray(value)
    if isinstance(value, np.ndarray):
        return {"kind": "np"}, value
    if isinstance(value, np.generic):
        return {"kind": "scalar", "type": f"np:{value.dtype.name}"}, np.asarray(value)
    if type(value) in (bool, int, float, complex):
        arr: np.ndarray = np.asarray(value, dtype={bool: np.bool_, int: np.int64, float: np.float64,
                                       complex: np.complex128}[type(value)])
        return {"kind": "scalar", "type": type(value).__name__}, arr
    raise CLIError(f"cannot export a leaf of type {type(value).__name__}")


async def cmd_export(a: argparse.Namespace, out: Any) -> int:
    from . import _tree

    dest = local_file(a.to, "--to")
    if dest.exists() and not a.force:
        raise CLIError(f"{dest} exists; pass --force to overwrite it")
    path, _ = await resolve_checkpoint(location(a.path), a.step, a.step_prefix)
    item = await _pick_item(path, a.item)
    tree = await restore_item(item)
    leaves, skeleton = _tree.flatten(tree)
    disk = await _disk_skeleton(item)
    custom = None
    if disk is not None:
        disk_skel, custom = disk
        if disk_skel is not None and len(list(_tree.skeleton_leaf_order(disk_skel))) == len(leaves):
            skeleton = disk_skel  # the original named tuple classes, not the restored stand-ins
    tensors: dict[str, np.ndarray] = {}
    specs = []
    for leaf in leaves:
        v = leaf.value
        if v is None or (isinstance(v, (dict, list, tuple)) and not v):
            specs.append({"kind": "none" if v is None else "empty"})
            continue
        spec, arr = _leaf_spec(v)
        if arr is not None:
            if arr.dtype.name not in _NP_TO_ST:  # no safetensors dtype: its raw bytes
                spec["raw_dtype"] = arr.dtype.name
                arr = np.ascontiguousarray(arr).reshape(*arr.shape, 1).view(np.uint8)
            tensors[leaf.name] = arr
            spec["name"] = leaf.name
        specs.append(spec)
    meta = {"version": 1, "skeleton": skeleton, "leaves": specs, "custom_metadata": custom}
    # (interrupted, the command removes the file while its thread, writing on, stops there)
    stop, tmp = threading.Event(), temporary_beside(dest)
    try:
        await get_runtime().to_thread(write_safetensors, dest, tensors,
                                      {"format": "pt", META_KEY: json.dumps(meta)}, stop, tmp)
    except BaseException:
        stop.set()
        with contextlib.suppress(OSError):
            os.unlink(tmp[1])
        raise
    total = sum(t.nbytes for t in tensors.values())
    print(f"wrote {dest}: {len(tensors)} tensors, {human_bytes(total)} (from {item.path})",
          file=out)
    return 0


def _nested_from_names(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """A plain safetensors file as nested dicts, splitting names at dots."""
    root: dict[str, Any] = {}
    for name, arr in tensors.items():
        node = root
        parts = name.split(".")
        ok = all(parts)
        for p in parts[:-1] if ok else []:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                ok = False
                break
            node = nxt
        if not ok or parts[-1] in node:
            return dict(tensors)  # names do not nest: keep them flat
        node[parts[-1]] = arr
    return root


def _rebuild(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    import jax

    from . import _tree

    specs = meta["leaves"]
    empties = {}

    def collect(skel: Any) -> None:
        if skel[0] == "E":
            empties[skel[1]] = skel[2]
        elif skel[0] == "D":
            for _k, _kt, c in skel[1]:
                collect(c)
        elif skel[0] in ("l", "t"):
            for c in skel[1]:
                collect(c)
        elif skel[0] == "T":
            for c in skel[3]:
                collect(c)

    collect(meta["skeleton"])

    def value(i: int) -> Any:
        spec = specs[i]
        kind = spec["kind"]
        if kind == "none":
            return None
        if kind == "empty":
            empty: Any = _tree.EMPTY_TYPES.get(empties.get(i, "Dict"), dict)
            return empty()
        if kind == "string":
            return spec["value"]
        name = spec["name"]
        if name not in tensors:
            raise CLIError(f"tensor {name!r} is missing from the file")
        arr = tensors[name]
        if "raw_dtype" in spec:
            dt = dtype_named(spec["raw_dtype"])
            arr = np.ascontiguousarray(arr).view(dt).reshape(arr.shape[:-1])
        if kind == "jax":
            if "key_impl" in spec:  # a typed PRNG key, exported as its key data
                return jax.random.wrap_key_data(jax.device_put(arr), impl=spec["key_impl"])
            return jax.device_put(arr)
        if kind == "np":
            return arr
        tag = spec.get("type", "")
        if tag.startswith("np:"):
            return arr.dtype.type(arr[()])
        return {"int": int, "float": float, "bool": bool, "complex": complex}[tag](arr.item())

    return _tree.unflatten(meta["skeleton"], value)


async def _check_replaceable(dest: AnyPath) -> None:
    """Raises CLIError unless ``import --force`` may replace ``dest``: an empty directory or
    one single checkpoint, never a manager directory nor anything else."""
    if not await storage.is_dir(dest):
        raise CLIError(f"{dest} is not a directory; --force replaces only a checkpoint")
    if not await storage.listdir(dest):
        return
    if steps := (await scan(dest, None)).steps or await _integrity.manager_steps(dest):
        raise CLIError(f"{dest} is a manager directory ({len(steps)} step(s)); --force "
                       "replaces only a single checkpoint")
    if not await is_checkpoint(dest):
        raise CLIError(f"{dest} is not a checkpoint; --force replaces only a checkpoint")


async def cmd_import(a: argparse.Namespace, out: Any) -> int:
    from . import args as ocp_args

    source = local_file(a.file, "FILE")
    dest = location(a.to)
    if not a.force and await storage.exists(dest):
        # (on an object store a save clears a prefix that holds no committed checkpoint)
        raise CLIError(f"{dest} exists; pass --force to overwrite it")
    if a.force and await storage.exists(dest):
        await _check_replaceable(dest)
    tensors, metadata = await get_runtime().to_thread(read_safetensors, source)
    custom = None
    if META_KEY in metadata:
        try:
            meta = json.loads(metadata[META_KEY])
        except ValueError as exc:
            raise CLIError(f"{a.file}: invalid {META_KEY} metadata ({exc})") from exc
        tree = _rebuild(tensors, meta)
        custom = meta.get("custom_metadata")
    else:
        tree = tensors if a.flat else _nested_from_names(tensors)
    ckptr = AsyncCheckpointer(StandardCheckpointHandler())
    try:
        commit = await ckptr.save(dest, args=ocp_args.StandardSave(tree, custom_metadata=custom),
                                  force=a.force)
        await commit
    except StepAlreadyExistsError:
        raise CLIError(f"{dest} exists; pass --force to overwrite it") from None
    finally:
        await ckptr.close()
    total = sum(t.nbytes for t in tensors.values())
    print(f"wrote {dest}: {len(tensors)} tensors, {human_bytes(total)} (from {a.file})", file=out)
    return 0


# -- the parser --------------------------------------------------------------------------------

def _seconds(arg: str) -> float:
    value = float(arg)
    if not value >= 0:  # (NaN included)
        raise argparse.ArgumentTypeError(f"{arg}: not a number of seconds (0 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ckpt-async", description="Inspect, verify, compare, clean and convert "
                "Orbax / ckpt_async checkpoints, on local paths and s3:// and gs:// URLs.")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return real_add(name, parents=[common], **kw)  # type: ignore[list-item]

    sub.add_parser = add_parser  # type: ignore[method-assign,assignment]
    sub.required = True

    def step_opts(sp: argparse.ArgumentParser, step: bool = True,
                  default: str = "the latest") -> None:
        if step:
            sp.add_argument("--step", type=int, help="the step of a manager directory "
                            f"(default: {default})")
        sp.add_argument("--step-prefix", help="step directories are named <prefix>_<step> "
                        "(default: any prefix)")

    sp = sub.add_parser("ls", help="list the steps and leftovers of a manager directory")
    sp.add_argument("dir")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    step_opts(sp, step=False)
    sp.set_defaults(fn=cmd_ls)

    sp = sub.add_parser("show", help="show the tree of a checkpoint without loading arrays")
    sp.add_argument("path", help="a checkpoint, a step, an item folder or a manager directory")
    sp.add_argument("--item", help="only this item")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    step_opts(sp)
    sp.set_defaults(fn=cmd_show)

    sp = sub.add_parser("verify", help="read every array and document and check them")
    sp.add_argument("path", help="a checkpoint, or a manager directory (every step)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress")
    step_opts(sp, default="every step")
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("diff", help="compare two checkpoints (exit 1 when they differ)")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--values", action="store_true", help="also compare array values")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    step_opts(sp, step=False)
    sp.set_defaults(fn=cmd_diff)

    sp = sub.add_parser("gc", help="remove temporary and half-deleted leftovers")
    sp.add_argument("dir")
    sp.add_argument("--dry-run", action="store_true", help="only list them")
    sp.add_argument("--older-than", type=_seconds, default=0.0, metavar="SECONDS",
                    help="only leftovers last modified at least this long ago")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    step_opts(sp, step=False)
    sp.set_defaults(fn=cmd_gc)

    sp = sub.add_parser("export", help="write a pytree item as a safetensors file")
    sp.add_argument("path")
    sp.add_argument("--to", required=True, metavar="FILE.safetensors")
    sp.add_argument("--item", help="the item of a multi-item checkpoint")
    sp.add_argument("--force", action="store_true", help="overwrite FILE")
    step_opts(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("import", help="write a safetensors file as a checkpoint")
    sp.add_argument("file", metavar="FILE.safetensors")
    sp.add_argument("--to", required=True, metavar="PATH")
    sp.add_argument("--flat", action="store_true",
                    help="for a file not written by export: keep tensor names as flat keys "
                    "(default: nest at dots)")
    sp.add_argument("--force", action="store_true", help="overwrite PATH")
    sp.set_defaults(fn=cmd_import)
    return p


@contextlib.contextmanager
def _x64() -> Iterator[None]:
    """64-bit arrays stay 64-bit while the CLI reads and writes them."""
    import jax

    prev = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        a = parser.parse_args(argv)
    except UsageError as exc:
        print(f"ckpt-async: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        with _x64():
            return int(get_runtime().call(a.fn, a, sys.stdout))
    except KeyboardInterrupt:
        print("ckpt-async: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # (`ckpt-async show ... | head`): quiet, as a Unix tool is
        with contextlib.suppress(AttributeError, OSError, ValueError):
            # (nothing more reaches the closed pipe, not even the flush at exit)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # (killed by SIGPIPE)
    except Exception as exc:  # noqa: BLE001 - one line, unless --debug
        if debug or a.debug:
            raise
        msg = _tidy(exc) if isinstance(exc, CLIError) else f"{type(exc).__name__}: {_tidy(exc)}"
        line = msg.splitlines()[0] if msg.strip() else repr(exc)
        print(f"ckpt-async {a.command}: error: {line}", file=sys.stderr)
        # (diff's 1 says the checkpoints differ: trouble is 2, as diff(1) has it)
        return 2 if isinstance(exc, UsageError) or a.command == "diff" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
