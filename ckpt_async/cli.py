"""The ``ckpt-async`` command line: inspect, check, compare, clean and convert checkpoints.

``ckpt-async ls DIR``, ``show PATH``, ``verify PATH``, ``diff A B``, ``gc DIR``,
``export PATH --to F.safetensors`` and ``import F.safetensors --to PATH`` (see docs/cli.md).
Also ``python -m ckpt_async``. Works on local paths, reads arrays only where a command needs
their values (``verify``, ``diff --values``, ``export``). ``main(argv)`` returns the exit
status: 0 success, 1 a failure (or, for ``verify`` and ``diff``, problems or differences),
2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import _format as fmt
from .manager import _steps

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


def _print_json(doc: Any, out: Any) -> None:
    print(json.dumps(doc, indent=2, default=_json_default, allow_nan=True), file=out)


# -- the filesystem view ---------------------------------------------------------------------


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


_ANY_STEP = re.compile(r"(?:(.+)_)?(\d+)")


def _parse_step(name: str, prefix: str | None) -> int | None:
    if _steps.is_leftover(name):
        return None
    if prefix is not None:
        return _steps.NameFormat(prefix or None).parse(name)
    m = _ANY_STEP.fullmatch(name)  # any prefix, any padding (Orbax's legacy rule)
    return int(m.group(2)) if m else None


def _step_dirs(directory: Path, prefix: str | None) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for entry in sorted(os.listdir(directory)):
        path = directory / entry
        step = _parse_step(entry, prefix)
        if step is not None and path.is_dir():
            out.setdefault(step, path)
    return dict(sorted(out.items()))


def _leftover_kind(name: str) -> str | None:
    if fmt.TMP_SUFFIX in name:
        return "tmp"
    if _steps.TODELETE_MARK in name:
        return "todelete"
    return None


def _leftovers(directory: Path) -> list[dict[str, Any]]:
    out = []
    for name in sorted(os.listdir(directory)):
        kind = _leftover_kind(name)
        if kind is not None:
            path = directory / name
            out.append({"name": name, "path": str(path), "kind": kind, "bytes": _du(path),
                        "mtime": path.lstat().st_mtime})
    return out


def _read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CLIError(f"{path} does not exist") from None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CLIError(f"{path}: invalid JSON ({exc})") from exc


def _step_doc(path: Path) -> fmt.StepMetadata | None:
    doc_path = path / fmt.CHECKPOINT_METADATA
    if not doc_path.exists():
        return None
    return fmt.decode(doc_path.read_bytes(), fmt.StepMetadata, where=str(doc_path))


@dataclasses.dataclass
class Item:
    """One item of a checkpoint: ``name`` None for a single-item checkpoint."""

    name: str | None
    path: Path
    kind: str  # "pytree" | "json" | "unknown"
    typestr: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "(item)"


def _kind_of(typestr: str | None, path: Path) -> str:
    tail = _short_handler(typestr) if typestr else ""
    if tail in ("StandardCheckpointHandler", "PyTreeCheckpointHandler"):
        return "pytree"
    if tail == "JsonCheckpointHandler":
        return "json"
    if (path / fmt.PYTREE_METADATA).is_file():
        return "pytree"
    if typestr is None and path.is_dir():
        files = [p for p in path.iterdir() if p.name != fmt.COMMIT_SUCCESS]
        if len(files) == 1 and files[0].is_file():
            return "json"  # a JSON item (Orbax names its file after the item or `metadata`)
    return "unknown"


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / fmt.CHECKPOINT_METADATA).is_file()
                              or (path / fmt.PYTREE_METADATA).is_file())


def checkpoint_items(path: Path) -> list[Item]:
    """The items of a checkpoint (a step directory, a checkpointer's path or one item folder)."""
    doc = _step_doc(path)
    handlers = doc.item_handlers if doc is not None else None
    if isinstance(handlers, str) or (handlers is None and (path / fmt.PYTREE_METADATA).is_file()):
        return [Item(None, path, _kind_of(handlers, path), handlers)]
    items = []
    recorded = handlers if isinstance(handlers, dict) else {}
    names = set(recorded) | {p.name for p in path.iterdir() if p.is_dir()}
    for name in sorted(names):
        sub = path / name
        if not sub.is_dir():
            continue  # recorded but saved as None
        typestr = recorded.get(name)
        items.append(Item(name, sub, _kind_of(typestr, sub), typestr))
    return items


def resolve_checkpoint(path: Path, step: int | None, prefix: str | None) -> tuple[Path, int | None]:
    """``path`` itself when it is a checkpoint, else a step of the manager directory ``path``
    (``step``, or the latest)."""
    if not path.exists():
        raise CLIError(f"{path} does not exist")
    if not path.is_dir():
        raise CLIError(f"{path} is not a directory")
    if step is None and is_checkpoint(path):
        return path, None
    steps = _step_dirs(path, prefix)
    if not steps:
        if step is not None:
            raise CLIError(f"{path} holds no steps")
        if any(i.kind != "unknown" for i in checkpoint_items(path)):
            return path, None
        raise CLIError(f"{path} holds no checkpoint and no steps")
    if step is None:
        step = max(steps)
    if step not in steps:
        raise CLIError(f"step {step} is not in {path} (steps: {list(steps)[-10:]})")
    return steps[step], step


# -- reading items -----------------------------------------------------------------------------


def _pytree_checkpointer() -> Any:
    from . import PyTreeCheckpointer

    return PyTreeCheckpointer()


def item_metadata(item: Item) -> Any:
    """The ``TreeMetadata`` of a pytree item, read without loading arrays."""
    ckptr = _pytree_checkpointer()
    try:
        return ckptr.metadata(item.path).item_metadata
    finally:
        ckptr.close()


def restore_item(item: Item) -> Any:
    """A pytree item's tree as saved (every array read)."""
    ckptr = _pytree_checkpointer()
    try:
        return ckptr.restore(item.path)
    finally:
        ckptr.close()


def _json_files(item: Item) -> list[Path]:
    return sorted(p for p in item.path.iterdir() if p.is_file() and p.name != fmt.COMMIT_SUCCESS)


def json_document(item: Item) -> Any:
    files = _json_files(item)
    if not files:
        raise CLIError(f"{item.path}: the JSON item holds no document")
    preferred = [p for p in files if p.name in (fmt.JSON_ITEM, item.path.name)]
    return _read_json((preferred or files)[0])


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


def leaf_record(keys: tuple[str, ...], leaf: Any) -> dict[str, Any]:
    """A metadata leaf as a JSON-able record."""
    from .metadata import ArrayMetadata, ScalarMetadata, StringMetadata

    rec: dict[str, Any] = {"key": ".".join(keys)}
    if isinstance(leaf, ArrayMetadata):
        dtype = np.dtype(leaf.dtype)
        shape = [int(s) for s in leaf.shape]
        rec.update(kind="scalar" if isinstance(leaf, ScalarMetadata) else "array",
                   shape=shape, dtype=dtype.name, bytes=math.prod(shape) * dtype.itemsize,
                   sharding=_sharding_str(leaf.sharding))
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


def item_records(item: Item) -> list[dict[str, Any]]:
    meta = item_metadata(item)
    tree = getattr(meta, "tree", meta)
    return [leaf_record(k, leaf) for k, leaf in walk_tree(tree)]


# -- ls ----------------------------------------------------------------------------------------


def _step_entry(step: int, path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": step, "name": path.name, "path": str(path),
                             "bytes": _du(path)}
    problems = []
    try:
        doc = _step_doc(path)
    except Exception as exc:  # noqa: BLE001 - listed, not fatal
        doc = None
        problems.append(str(exc))
    try:
        items = checkpoint_items(path)
    except Exception as exc:  # noqa: BLE001
        items = []
        problems.append(str(exc))
    entry["items"] = [i.name for i in items if i.name is not None] or (
        ["(single)"] if items else [])
    ns = doc.commit_timestamp_nsecs if doc else None
    entry["commit_timestamp_nsecs"] = ns
    entry["commit_time"] = _iso(ns) or _iso(int(path.stat().st_mtime * 1e9))
    metrics = (doc.metrics if doc else None) or None
    metrics_file = path / "metrics" / "metrics"
    if metrics_file.is_file():
        with contextlib.suppress(CLIError):
            metrics = _read_json(metrics_file)
    entry["metrics"] = metrics
    entry["committed"] = doc is not None or (path / fmt.COMMIT_SUCCESS).exists()
    if problems:
        entry["problems"] = problems
    return entry


def _fmt_metrics(m: Any) -> str:
    if not m:
        return "-"
    if isinstance(m, dict):
        return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in m.items())
    return str(m)


def cmd_ls(a: argparse.Namespace, out: Any) -> int:
    directory = Path(a.dir)
    if not directory.is_dir():
        raise CLIError(f"{directory} is not a directory")
    steps = [_step_entry(s, p) for s, p in _step_dirs(directory, a.step_prefix).items()]
    leftovers = _leftovers(directory)
    if a.json:
        _print_json({"directory": str(directory.absolute()), "steps": steps,
                     "leftovers": leftovers}, out)
        return 0
    rows = [["STEP", "COMMITTED (UTC)", "SIZE", "ITEMS", "METRICS"]]
    for s in steps:
        flag = "" if s["committed"] else "  (no _CHECKPOINT_METADATA)"
        rows.append([str(s["step"]), s["commit_time"] or "-", human_bytes(s["bytes"]),
                     ",".join(s["items"]) or "-", _fmt_metrics(s["metrics"]) + flag])
    for lo in leftovers:
        rows.append([lo["name"], f"leftover ({lo['kind']})", human_bytes(lo["bytes"]), "-", "-"])
    if len(rows) == 1:
        print(f"{directory}: no steps", file=out)
        return 0
    _table(rows, out)
    total = sum(s["bytes"] for s in steps)
    tail = f", {len(leftovers)} leftover(s) (remove with: ckpt-async gc)" if leftovers else ""
    print(f"{len(steps)} step(s), {human_bytes(total)}{tail}", file=out)
    return 0


# -- show --------------------------------------------------------------------------------------


def _describe(rec: dict[str, Any]) -> str:
    kind = rec["kind"]
    if kind in ("array", "scalar"):
        shape = "[" + ",".join(str(s) for s in rec["shape"]) + "]"
        parts = [f"{rec['dtype']}{shape}", human_bytes(rec["bytes"])]
        if kind == "scalar":
            parts.append("scalar")
        if rec.get("sharding"):
            parts.append(rec["sharding"])
        return "  ".join(parts)
    if kind == "empty":
        return f"empty {rec['container']}"
    return kind


def _print_tree(records: list[dict[str, Any]], out: Any, indent: str = "  ") -> None:
    rows = [[indent + r["key"] if r["key"] else indent + "(root)", _describe(r)] for r in records]
    _table(rows, out)


def cmd_show(a: argparse.Namespace, out: Any) -> int:
    path, step = resolve_checkpoint(Path(a.path), a.step, a.step_prefix)
    doc = _step_doc(path)
    items = checkpoint_items(path)
    if a.item is not None:
        items = [i for i in items if i.name == a.item]
        if not items:
            raise CLIError(f"{path} has no item {a.item!r}")
    result: dict[str, Any] = {"path": str(path), "step": step, "items": []}
    if doc is not None:
        result.update(commit_time=_iso(doc.commit_timestamp_nsecs), metrics=doc.metrics or None,
                      custom_metadata=doc.custom_metadata or None)
    for item in items:
        entry: dict[str, Any] = {"name": item.name, "handler": _short_handler(item.typestr),
                                 "kind": item.kind, "path": str(item.path)}
        if item.kind == "pytree":
            recs = item_records(item)
            entry["leaves"] = recs
            entry["arrays"] = sum(1 for r in recs if r["kind"] in ("array", "scalar"))
            entry["bytes"] = sum(r.get("bytes", 0) for r in recs)
        elif item.kind == "json":
            entry["document"] = json_document(item)
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
        elif entry["kind"] == "json":
            text = json.dumps(entry["document"])
            if len(text) > 200:
                text = text[:197] + "..."
            print(f"{name}  [{entry['handler']}]  {text}", file=out)
        else:
            print(f"{name}  [{entry['handler']}]  (not inspected: unknown handler)", file=out)
    return 0


# -- verify ------------------------------------------------------------------------------------


def _restored_leaves(tree: Any) -> dict[str, Any]:
    return {".".join(k): v for k, v in walk_tree(tree)}


def _tidy(problem: object) -> str:
    """A problem without TensorStore's spec dump."""
    return re.sub(r"\s*\[tensorstore_spec='.*?'\]", "", str(problem), flags=re.S)


def _verify_fn() -> Callable[..., Any]:
    import ckpt_async

    return ckpt_async.verify


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


def cmd_verify(a: argparse.Namespace, out: Any) -> int:
    path = Path(a.path)
    if not path.exists():
        raise CLIError(f"{path} does not exist")
    steps = _step_dirs(path, a.step_prefix) if path.is_dir() else {}
    if a.step is None and steps and not is_checkpoint(path):
        targets: list[tuple[int | None, Path]] = list(steps.items())  # every step
    else:
        p, s = resolve_checkpoint(path, a.step, a.step_prefix)
        targets = [(s, p)]
    verify = _verify_fn()
    prog_out = sys.stderr if a.json else out
    tty = bool(getattr(prog_out, "isatty", lambda: False)())
    results = []
    failed = False
    for step, target in targets:
        label = f"step {step}" if step is not None else str(target)
        bar = None if a.quiet else Progress(f"verifying {label}", prog_out, tty,
                                            in_bytes=False)  # verify() counts arrays
        try:
            report = verify(target, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        problems = [_tidy(p) for p in report.problems]
        failed = failed or bool(problems)
        results.append({"step": step, "path": str(target), "ok": not problems,
                        "arrays_checked": report.arrays_checked,
                        "bytes_checked": report.bytes_checked, "problems": problems,
                        "skipped": list(getattr(report, "skipped", []))})
        if not a.json:
            status = "FAIL" if problems else "OK"
            print(f"{status}  {label}: {report.arrays_checked} arrays, "
                  f"{human_bytes(report.bytes_checked)} checked", file=out)
            for problem in problems:
                print(f"  problem: {problem}", file=out)
            for s in getattr(report, "skipped", []):
                print(f"  skipped: {s}", file=out)
    if a.json:
        _print_json({"ok": not failed, "checkpoints": results}, out)
    if failed:
        n = sum(1 for r in results if not r["ok"])
        print(f"verify: {n} of {len(results)} checkpoint(s) failed", file=sys.stderr)
    return 1 if failed else 0


# -- diff --------------------------------------------------------------------------------------


def _flat_records(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Item]]:
    """Every leaf of every pytree item (and every JSON item) of a checkpoint, by name."""
    recs: dict[str, dict[str, Any]] = {}
    items: dict[str, Item] = {}
    for item in checkpoint_items(path):
        prefix = f"{item.name}/" if item.name is not None else ""
        if item.kind == "pytree":
            for r in item_records(item):
                key = prefix + r["key"]
                recs[key] = dict(r, item=item.name)
                items[key] = item
        elif item.kind == "json":
            key = prefix.rstrip("/") or "(json)"
            recs[key] = {"key": key, "kind": "json", "document": json_document(item),
                         "item": item.name}
            items[key] = item
    return recs, items


def _sig(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["kind"], r.get("dtype"), tuple(r.get("shape") or ()))


def _sig_str(r: dict[str, Any]) -> str:
    if r["kind"] in ("array", "scalar"):
        return f"{r['dtype']}[{','.join(str(s) for s in r['shape'])}]"
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


def cmd_diff(a: argparse.Namespace, out: Any) -> int:
    pa, _ = resolve_checkpoint(Path(a.a), None, a.step_prefix)
    pb, _ = resolve_checkpoint(Path(a.b), None, a.step_prefix)
    ra, ia = _flat_records(pa)
    rb, ib = _flat_records(pb)
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

        def leaves(item: Item, side: str) -> dict[str, Any]:
            k = (side, str(item.path))
            if k not in cache:
                cache[k] = _restored_leaves(restore_item(item))
            return cache[k]

        for key in same_sig:
            x, y = ra[key], rb[key]
            va = leaves(ia[key], "a")[x["key"]]
            vb = leaves(ib[key], "b")[y["key"]]
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


def cmd_gc(a: argparse.Namespace, out: Any) -> int:
    directory = Path(a.dir)
    if not directory.is_dir():
        raise CLIError(f"{directory} is not a directory")
    now = time.time()
    found = [lo for lo in _leftovers(directory) if now - lo["mtime"] >= a.older_than]
    removed = []
    for lo in found:
        verb = "would remove" if a.dry_run else "removing"
        if not a.json:
            print(f"{verb} {lo['name']}  ({lo['kind']}, {human_bytes(lo['bytes'])})", file=out)
        if not a.dry_run:
            p = Path(lo["path"])
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError as exc:
                raise CLIError(f"cannot remove {p}: {exc}") from exc
            removed.append(lo["name"])
    total = sum(lo["bytes"] for lo in found)
    if a.json:
        _print_json({"directory": str(directory), "leftovers": found, "removed": removed,
                     "dry_run": a.dry_run}, out)
    elif not found:
        print(f"{directory}: no leftovers", file=out)
    else:
        verb = "would free" if a.dry_run else "freed"
        print(f"{len(found)} leftover(s), {verb} {human_bytes(total)}", file=out)
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


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Writes a safetensors file (little-endian, header padded to 8 bytes)."""
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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for arr in arrays:
            f.write(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            dtype = _np_dtype(_ST_DTYPES[st])
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
                raise CLIError(f"{path}: tensor {name!r} is truncated or inconsistent")
            f.seek(base + begin)
            data = f.read(end - begin)
            out[name] = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(
                dtype, copy=False).reshape(shape).copy()
        return out, metadata


def _pick_item(path: Path, name: str | None) -> Item:
    items = checkpoint_items(path)
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


def _disk_skeleton(item: Item) -> Any:
    try:
        doc = fmt.decode((item.path / fmt.PYTREE_METADATA).read_bytes(), fmt.TreeMetadata,
                         where=str(item.path / fmt.PYTREE_METADATA))
    except Exception:  # noqa: BLE001 - fall back to the restored tree's structure
        return None
    return (doc.ckpt_async or {}).get("skeleton"), doc.custom_metadata


def _leaf_spec(value: Any) -> tuple[dict[str, Any], np.ndarray | None]:
    """How one restored leaf is recorded, and the tensor it becomes (None for no tensor)."""
    import jax

    if isinstance(value, str):
        return {"kind": "string", "value": value}, None
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


def cmd_export(a: argparse.Namespace, out: Any) -> int:
    from . import _tree

    path, _ = resolve_checkpoint(Path(a.path), a.step, a.step_prefix)
    item = _pick_item(path, a.item)
    tree = restore_item(item)
    leaves, skeleton = _tree.flatten(tree)
    disk = _disk_skeleton(item)
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
    dest = Path(a.to)
    if dest.exists() and not a.force:
        raise CLIError(f"{dest} exists; pass --force to overwrite it")
    write_safetensors(dest, tensors, {"format": "pt", META_KEY: json.dumps(meta)})
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
            dt = _np_dtype(spec["raw_dtype"])
            arr = np.ascontiguousarray(arr).view(dt).reshape(arr.shape[:-1])
        if kind == "jax":
            return jax.device_put(arr)
        if kind == "np":
            return arr
        tag = spec.get("type", "")
        if tag.startswith("np:"):
            return arr.dtype.type(arr[()])
        return {"int": int, "float": float, "bool": bool, "complex": complex}[tag](arr.item())

    return _tree.unflatten(meta["skeleton"], value)


def cmd_import(a: argparse.Namespace, out: Any) -> int:
    from . import StandardCheckpointer
    from . import args as ocp_args
    from .errors import StepAlreadyExistsError

    tensors, metadata = read_safetensors(Path(a.file))
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
    dest = Path(a.to)
    ckptr = StandardCheckpointer()
    try:
        ckptr.save(dest.absolute(), args=ocp_args.StandardSave(tree, custom_metadata=custom),
                   force=a.force)
        ckptr.wait_until_finished()
    except StepAlreadyExistsError:
        raise CLIError(f"{dest} exists; pass --force to overwrite it") from None
    finally:
        ckptr.close()
    total = sum(t.nbytes for t in tensors.values())
    print(f"wrote {dest}: {len(tensors)} tensors, {human_bytes(total)} (from {a.file})", file=out)
    return 0


# -- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ckpt-async", description="Inspect, verify, compare, clean and convert "
                "Orbax / ckpt_async checkpoints on local paths.")
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

    def step_opts(sp: argparse.ArgumentParser, step: bool = True) -> None:
        if step:
            sp.add_argument("--step", type=int, help="the step of a manager directory "
                            "(default: the latest)")
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
    step_opts(sp)
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
    sp.add_argument("--older-than", type=float, default=0.0, metavar="SECONDS",
                    help="only leftovers last modified at least this long ago")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
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
            return int(a.fn(a, sys.stdout))
    except KeyboardInterrupt:
        print("ckpt-async: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, unless --debug
        if debug or a.debug:
            raise
        msg = str(exc) if isinstance(exc, CLIError) else f"{type(exc).__name__}: {_tidy(exc)}"
        line = msg.splitlines()[0] if msg.strip() else repr(exc)
        print(f"ckpt-async {a.command}: error: {line}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
