"""Pytrees as checkpoints see them: flattened leaves with Orbax key paths, and back.

Pure functions, no I/O. A tree is flattened into :class:`Leaf` records (keys, key types,
value) plus a *skeleton*: a JSON description of the exact containers (dict with str or int
keys, list, tuple, namedtuple, None) so that a tree restores as it was saved. Orbax ignores
the skeleton and rebuilds dicts and lists from the key metadata, as it always does.
"""

from __future__ import annotations

import collections
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from . import _format as fmt
from .errors import InvalidArgumentError, InvalidTypeError, StructureMismatchError

EMPTY_TYPES = {"Dict": dict, "List": list, "Tuple": tuple, "None": type(None)}


@dataclass(slots=True, eq=False)  # (not frozen: a frozen __init__ costs 4x, per leaf)
class Leaf:
    """One leaf: its key path, the kind of each key (1 sequence, 2 dict), its value, and the
    parameter name Orbax stores it under (``params.w``: the keys joined by dots)."""

    keys: tuple[Any, ...]
    key_types: tuple[int, ...]
    value: Any
    name: str

    @property
    def tuple_key(self) -> str:
        """The ``_METADATA`` key (``"('params', 'w')"``)."""
        return tuple_key(tuple(map(str, self.keys)))


def tuple_key(str_keys: Sequence[str]) -> str:
    """The ``_METADATA`` key of a leaf whose keys, as strings, are ``str_keys``."""
    return str(tuple(str_keys))


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _is_custom_node(x: Any) -> bool:
    return not jax.tree_util.all_leaves([x])


def is_empty_node(x: Any) -> bool:
    """A pytree node without children other than None and an empty dict, list or tuple:
    optax's ``EmptyState`` and ``MaskedNode``, an empty dataclass, NamedTuple or FrozenDict.
    Orbax stores one as a leaf of its own, of value type "None" ("Dict" for a mapping), and
    so does ckpt_async."""
    if x is None or type(x) in (dict, list, tuple) or isinstance(x, jax.ShapeDtypeStruct) \
            or _is_leaf_type(x):
        return False
    if is_namedtuple(x):
        return not x
    if isinstance(x, (dict, list, tuple)) or not _is_custom_node(x):
        return False
    return not jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)[0]


#: Exact types known to be leaves, so most leaves skip jax's registry lookup; jax.Array
#: implementations are added as they are met (an array type is never a pytree node).
_LEAF_TYPES: set[type] = {int, float, bool, complex, str, bytes, np.ndarray}


def _is_leaf_type(x: Any) -> bool:
    t = type(x)
    if t in _LEAF_TYPES or isinstance(x, np.generic):
        return True
    if isinstance(x, jax.Array) and not _is_custom_node(x):
        _LEAF_TYPES.add(t)
        return True
    return False


def _key_of(entry: Any) -> tuple[Any, int]:
    """A jax key-path entry as (key, Orbax key type)."""
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx, fmt.KEY_SEQUENCE
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key, fmt.KEY_DICT
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name, fmt.KEY_DICT
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key, fmt.KEY_SEQUENCE
    raise InvalidArgumentError(f"unsupported pytree key {entry!r}")


def _checked_key(key: Any, path: tuple[Any, ...]) -> str | int:
    """A dict key that is not a non-empty str, as it is stored: an int (a NumPy integer as
    the int it equals, e.g. a key from ``np.unique``); refused if anything else."""
    if isinstance(key, np.integer):
        return int(key)
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise InvalidArgumentError(
            f"key {key!r} at {path!r} is a {type(key).__name__}; dict keys must be str or int"
        )
    if key == "":
        raise InvalidArgumentError(f"empty key at {path!r}: every key must be non-empty")
    return key


def _walk(x: Any, keys: tuple[Any, ...], kts: tuple[int, ...], name: str,
          leaves: list[Leaf]) -> Any:
    """:func:`flatten`'s recursion: ``x``'s skeleton, its leaves appended to ``leaves``. (A
    module function: a nested one refers to itself, a cycle that held the leaves, and so the
    tree's arrays, until the garbage collector next ran; ``del state`` freed nothing.)"""
    if _is_leaf_type(x):  # the common case first: one set lookup
        leaves.append(Leaf(keys, kts, x, name))
        return ["L", len(leaves) - 1]
    if x is None:
        leaves.append(Leaf(keys, kts, None, name))
        return ["N", len(leaves) - 1]
    prefix = name + "." if keys else ""
    if isinstance(x, dict):
        if not x:
            leaves.append(Leaf(keys, kts, {}, name))
            return ["E", len(leaves) - 1, "Dict"]
        items = []
        for k, v in x.items():
            if type(k) is not str or not k:  # (a non-empty str: the common case, checked)
                k = _checked_key(k, keys)
            kt = "i" if isinstance(k, int) else "s"
            if type(v) in _LEAF_TYPES:  # (a known leaf type: _walk(v) inlined)
                leaves.append(Leaf((*keys, k), (*kts, fmt.KEY_DICT), v, f"{prefix}{k!s}"))
                items.append([k, kt, ["L", len(leaves) - 1]])
                continue
            items.append([k, kt, _walk(v, (*keys, k), (*kts, fmt.KEY_DICT), f"{prefix}{k!s}",
                                       leaves)])
        return ["D", items]
    if is_namedtuple(x):
        children = [_walk(v, (*keys, f), (*kts, fmt.KEY_DICT), f"{prefix}{f!s}", leaves)
                    for f, v in zip(x._fields, x)]
        cls = type(x)
        node = ["T", f"{cls.__module__}:{cls.__qualname__}", list(x._fields), children]
        if not x:  # (an empty node: a leaf of its own, as Orbax stores it, see "Z")
            leaves.append(Leaf(keys, kts, x, name))
            return ["Z", len(leaves) - 1, node]
        return node
    if isinstance(x, (list, tuple)):
        if not x:
            kind = "List" if isinstance(x, list) else "Tuple"
            leaves.append(Leaf(keys, kts, x, name))
            return ["E", len(leaves) - 1, kind]
        tag = "l" if isinstance(x, list) else "t"
        return [tag, [_walk(v, (*keys, i), (*kts, fmt.KEY_SEQUENCE), f"{prefix}{i!s}",
                            leaves) for i, v in enumerate(x)]]
    if _is_custom_node(x):
        pairs, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
        items, sequence = [], True
        for path, v in pairs:
            k, key_type = _key_of(path[0])
            sequence = sequence and key_type == fmt.KEY_SEQUENCE
            items.append([k, "i" if isinstance(k, int) else "s",
                          _walk(v, (*keys, k), (*kts, key_type), f"{prefix}{k!s}", leaves)])
        if not items:  # (an empty node: a leaf of its own, restored as None, or as an empty
            # dict if it is a mapping, as in Orbax)
            leaves.append(Leaf(keys, kts, x, name))
            return ["E", len(leaves) - 1, "Dict"] if isinstance(x, Mapping) else \
                ["N", len(leaves) - 1]
        # (a node whose children have no names, only places, comes back as a list: as Orbax
        # restores it, from their key type)
        return ["l", [child for _, _, child in items]] if sequence else ["D", items]
    leaves.append(Leaf(keys, kts, x, name))
    return ["L", len(leaves) - 1]


#: The deepest nesting a saved tree may have: its skeleton in ``_METADATA`` nests three JSON
#: levels for each of a dict's, and on Python 3.11 msgspec's encoder stops at Python's
#: recursion limit (1,000), at about 330 dicts deep; refused at ``save()``, not at the commit.
MAX_DEPTH = 300


def flatten(tree: Any) -> tuple[list[Leaf], Any]:
    """Flattens ``tree`` into leaves (empty containers and None included) and its skeleton."""
    leaves: list[Leaf] = []
    skeleton = _walk(tree, (), (), "", leaves)
    seen: dict[str, tuple[Any, ...]] = {}
    for leaf in leaves:
        if len(leaf.keys) > MAX_DEPTH:
            raise InvalidArgumentError(
                f"the tree is nested {len(leaf.keys)} levels deep at {leaf.keys[:3]!r}...; "
                f"at most {MAX_DEPTH} levels can be saved (its _METADATA document could not "
                "be written)")
        other = seen.setdefault(leaf.name, leaf.keys)
        if other != leaf.keys:
            raise InvalidArgumentError(
                f"keys {other!r} and {leaf.keys!r} would both be stored as {leaf.name!r}; "
                "rename one of them"
            )
    return leaves, skeleton


def _namedtuple_class(path: str, fields: list[str]) -> type:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and list(getattr(obj, "_fields", ())) == fields:
            return obj
    except Exception:  # noqa: BLE001 - fall back to an equivalent namedtuple
        pass
    return collections.namedtuple(qualname.rpartition(".")[2] or "NamedTuple", fields)  # type: ignore[misc]


def unflatten(skeleton: Any, value_of: Callable[[int], Any]) -> Any:
    """Rebuilds a tree from its skeleton; ``value_of(i)`` gives leaf ``i``'s value.

    Skeleton nodes: ``L`` a leaf, ``N`` None, ``E`` an empty dict, list or tuple, ``D`` a dict
    (or a custom node with named children), ``l``/``t`` a list/tuple, ``T`` a NamedTuple, ``Z``
    an empty NamedTuple (optax's ``EmptyState``): a leaf (Orbax's "None" entry) and the node
    it rebuilds as when restored as saved. (Another empty node is an ``N``: restored as
    saved, it comes back as None, as from Orbax.)"""
    tag = skeleton[0]
    if tag in ("L", "N", "E"):
        return value_of(skeleton[1])
    if tag == "Z":
        value = value_of(skeleton[1])
        return unflatten(skeleton[2], value_of) if value is None else value
    if tag == "D":
        return {k: unflatten(child, value_of) for k, _kt, child in skeleton[1]}
    if tag == "l":
        return [unflatten(c, value_of) for c in skeleton[1]]
    if tag == "t":
        return tuple(unflatten(c, value_of) for c in skeleton[1])
    if tag == "T":
        cls = _namedtuple_class(skeleton[1], skeleton[2])
        return cls(*[unflatten(c, value_of) for c in skeleton[3]])
    raise ValueError(f"unknown skeleton node {tag!r}")


def skeleton_leaf_order(skeleton: Any) -> Iterator[int]:
    tag = skeleton[0]
    if tag in ("L", "N", "E", "Z"):
        yield skeleton[1]
    elif tag == "D":
        for _k, _kt, child in skeleton[1]:
            yield from skeleton_leaf_order(child)
    elif tag in ("l", "t"):
        for c in skeleton[1]:
            yield from skeleton_leaf_order(c)
    elif tag == "T":
        for c in skeleton[3]:
            yield from skeleton_leaf_order(c)


def _sequences_as_lists(node: Any, kinds: dict[int, int], sort_keys: bool) -> Any:
    """``node`` with each dict whose keys ``kinds`` marks as a sequence's made a list (and
    the others' keys sorted, with ``sort_keys``)."""
    if not isinstance(node, dict) or not node:
        return node
    fixed = {k: _sequences_as_lists(node[k], kinds, sort_keys)
             for k in (sorted(node) if sort_keys else node)}
    if kinds.get(id(node)) == fmt.KEY_SEQUENCE:
        return [fixed[k] for k in sorted(fixed, key=int)]
    return fixed


def tree_from_key_metadata(entries: Sequence[tuple[list[fmt.KeyEntry], Any]], *,
                           sort_keys: bool = False) -> Any:
    """Orbax's rebuild: nested dicts for dict keys, lists for sequence keys (str keys).

    ``sort_keys``: each dict's keys sorted, as Orbax gives them (its rebuild passes through
    jax's tree functions); otherwise in the order of ``entries`` (the saved order)."""
    if len(entries) == 1 and not entries[0][0]:
        return entries[0][1]
    root: dict[str, Any] = {}
    kinds: dict[int, int] = {}
    for key_meta, value in entries:
        node = root
        for depth, entry in enumerate(key_meta):
            last = depth == len(key_meta) - 1
            kinds[id(node)] = entry.key_type
            if last:
                node[entry.key] = value
            else:
                node = node.setdefault(entry.key, {})

    return _sequences_as_lists(root, kinds, sort_keys)


def target_leaves(
    target: Any, kinds: list[list[int]] | None = None,
) -> tuple[list[tuple[str, str, Any]], Callable[[Sequence[Any]], Any]]:
    """Flattens a restore target: ``(tuple_key, name, leaf)`` and a function rebuilding it.

    None, empty containers and empty nodes are kept as leaves so a target may mirror them.
    ``kinds``: a list each leaf's key types (1 sequence, 2 dict, as ``_METADATA`` has them)
    are appended to, in the leaves' order.
    """
    paths, rebuild = target_paths(target, kinds)
    return [(tuple_key(keys), name, leaf) for keys, name, leaf in paths], rebuild


def target_paths(
    target: Any, kinds: list[list[int]] | None = None,
) -> tuple[list[tuple[tuple[str, ...], str, Any]], Callable[[Sequence[Any]], Any]]:
    """:func:`target_leaves` with each leaf's keys as a tuple of strings."""

    def is_leaf(x: Any) -> bool:
        return x is None or (isinstance(x, (dict, list, tuple)) and not is_namedtuple(x) and not x
                             ) or is_empty_node(x)

    try:
        pairs, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_leaf)
    except ValueError:
        # jax sorts dict keys and cannot order a dict mixing str and int keys; our walk can.
        leaves, skeleton = flatten(target)
        out = [(tuple(map(str, leaf.keys)), leaf.name, leaf.value) for leaf in leaves]
        if kinds is not None:
            kinds.extend(list(leaf.key_types) for leaf in leaves)
        return out, lambda values: unflatten(skeleton, values.__getitem__)
    out = []
    # (the key types of a path, by the types of its entries: a few kinds of path per tree,
    # each one's list shared by its leaves)
    by_entry_types: dict[tuple[type, ...], list[int]] = {}
    for path, leaf in pairs:
        keys = tuple(str(_key_of(p)[0]) for p in path)
        out.append((keys, ".".join(keys), leaf))
        if kinds is not None:
            entry_types = tuple(map(type, path))
            if (path_kinds := by_entry_types.get(entry_types)) is None:
                path_kinds = by_entry_types[entry_types] = [_key_of(p)[1] for p in path]
            kinds.append(path_kinds)
    return out, lambda values: jax.tree_util.tree_unflatten(treedef, values)


def args_off_the_tree(args_tree: Any, item: Any, kind: type) -> tuple[list[str], list[str]]:
    """The args of type ``kind`` (``SaveArgs``, ``RestoreArgs``) in ``args_tree`` that stand
    at no leaf of ``item``: the names of those at one of its subtrees (``''``: the whole
    tree), and of those under keys it does not have. (Orbax maps args onto the item leaf by
    leaf, and refuses both.)"""
    leaves = {keys for keys, _name, _leaf in target_paths(item)[0]}
    nodes = {keys[:depth] for keys in leaves for depth in range(len(keys))}
    inner: list[str] = []
    outside: list[str] = []
    for keys, name, arg in target_paths(args_tree)[0]:
        if isinstance(arg, kind) and keys not in leaves:
            (inner if keys in nodes else outside).append(name)
    return inner, outside


#: How the messages name a node by its key type.
_CONTAINER_NAMES = {fmt.KEY_SEQUENCE: "a list or tuple", fmt.KEY_DICT: "a dict"}


def _containers(target: Any, saved: Iterable[Sequence[fmt.KeyEntry]],
                leaves: list[Leaf] | None = None) -> tuple[
        dict[tuple[str, ...], int], dict[tuple[str, ...], int],
        dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
    """The nodes of ``target`` (``leaves``: its leaves, if flattened already) and of the
    checkpoint (``saved``: its leaves' key metadata), by their key paths as strings: each
    one's key type, and each sequence's length."""
    kinds: dict[tuple[str, ...], int] = {}  # (the checkpoint's nodes: their key type)
    lengths: dict[tuple[str, ...], int] = {}
    for key_meta in saved:
        for depth, entry in enumerate(key_meta):
            node = tuple(k.key for k in key_meta[:depth])
            kinds[node] = entry.key_type
            if entry.key_type == fmt.KEY_SEQUENCE:
                lengths[node] = max(lengths.get(node, 0), int(entry.key) + 1)
    wanted_kinds: dict[tuple[str, ...], int] = {}
    wanted_lengths: dict[tuple[str, ...], int] = {}
    for leaf in flatten(target)[0] if leaves is None else leaves:
        for depth, (key, key_type) in enumerate(zip(leaf.keys, leaf.key_types, strict=True)):
            node = tuple(map(str, leaf.keys[:depth]))
            wanted_kinds[node] = key_type
            if key_type == fmt.KEY_SEQUENCE:
                wanted_lengths[node] = max(wanted_lengths.get(node, 0), int(key) + 1)
    return wanted_kinds, wanted_lengths, kinds, lengths


def _kinds_differ(node: tuple[str, ...], kind: int, saved_kind: int,
                  sides: tuple[str, str] = ("the target has", "the checkpoint")) -> str:
    return (f"{sides[0]} {_CONTAINER_NAMES.get(kind, kind)} at {node!r}, {sides[1]} "
            f"{_CONTAINER_NAMES.get(saved_kind, saved_kind)}")


def kinds_differ_at(key_meta: Sequence[fmt.KeyEntry], kinds: Sequence[int],
                    sides: tuple[str, str] = ("the target has", "the checkpoint")) -> str:
    """Where a target's leaf whose key types are ``kinds`` and the checkpoint's entry of the
    same keys (``key_meta``) part: the node that is a dict on one side and a list or tuple
    on the other, said as :func:`container_mismatch` says it (``sides``: how the two are
    named)."""
    depth = next(d for d, (entry, kind) in enumerate(zip(key_meta, kinds, strict=True))
                 if entry.key_type != kind)
    return _kinds_differ(tuple(e.key for e in key_meta[:depth]), kinds[depth],
                         key_meta[depth].key_type, sides)


def is_empty_value(x: Any) -> bool:
    """An empty dict, list or tuple, or an empty node (:func:`is_empty_node`): a leaf of a
    target that holds no value."""
    return (isinstance(x, (dict, list, tuple)) and not x) or is_empty_node(x)


def container_mismatch(target: Any, saved: Iterable[Sequence[fmt.KeyEntry]]) -> str | None:
    """Where ``target`` has a dict and the checkpoint a sequence, or the other way round
    (their keys as strings may be the same: a dict's ``'0'`` is not a list's index 0), said
    as "the target has a dict at ('a',), the checkpoint a list or tuple"; None where none
    does."""
    wanted_kinds, _, kinds, _ = _containers(target, saved)
    return next((_kinds_differ(node, kind, kinds[node]) for node, kind in wanted_kinds.items()
                 if node in kinds and kinds[node] != kind), None)


def check_partial_containers(target: Any, saved: Iterable[Sequence[fmt.KeyEntry]], *,
                             where: str) -> None:
    """Orbax's partial restore (its ``tree_trim``) leaves out the keys of a dict that the
    target does not name, but takes a list or tuple whole: one of another length than the
    checkpoint's raises ``StructureMismatchError`` (a ValueError, as Orbax's), and a sequence
    where the checkpoint has a dict, or a dict where it has a sequence, ``InvalidTypeError``
    (a TypeError, as Orbax's), as does a value of the target where the checkpoint has a
    subtree, or a subtree of the target where the checkpoint has a leaf (None and empty
    containers included). Empty containers and None of the target are not checked."""
    saved = list(saved)
    leaves = flatten(target)[0]
    wanted_kinds, wanted_lengths, kinds, lengths = _containers(target, saved, leaves)
    for node, kind in wanted_kinds.items():
        if node not in kinds:
            continue
        if kinds[node] != kind:
            raise InvalidTypeError(
                f"{where}: partial restore: {_kinds_differ(node, kind, kinds[node])}")
        if kind == fmt.KEY_SEQUENCE and wanted_lengths[node] != lengths[node]:
            raise StructureMismatchError(
                f"{where}: partial restore: the target's sequence at {node!r} has "
                f"{wanted_lengths[node]} elements, the checkpoint's {lengths[node]} (a partial "
                "restore takes a list or tuple whole, as Orbax's does)")
    stored = {tuple(e.key for e in key_meta) for key_meta in saved}
    for node in wanted_kinds:
        if node in stored:
            raise InvalidTypeError(f"{where}: partial restore: the target has a subtree at "
                                   f"{node!r}, the checkpoint a leaf")
    for leaf in leaves:
        if (keys := tuple(map(str, leaf.keys))) in kinds and leaf.value is not None \
                and not is_empty_value(leaf.value):
            raise InvalidTypeError(
                f"{where}: partial restore: the target has a {type(leaf.value).__name__} at "
                f"{keys!r}, the checkpoint a subtree ({_CONTAINER_NAMES[kinds[keys]]})")


def check_structure(
    saved: set[str], wanted: set[str], *, where: str, allow_missing: bool = False,
    allow_unexpected: bool = False, why: Callable[[], str | None] | None = None,
) -> None:
    """Raises StructureMismatchError naming the keys missing from or unexpected in a target
    (unless ``allow_missing`` / ``allow_unexpected``), or, where ``why()`` (asked then) says
    what else differs (:func:`container_mismatch`), that."""
    missing = sorted(saved - wanted) if not allow_missing else []
    unexpected = sorted(wanted - saved) if not allow_unexpected else []
    if missing or unexpected:
        # (a dict of the target where the checkpoint has a list: its keys '0', '1', ... are
        # no indices, so the keys it lacks or has beyond the list's would mislead)
        found = why() if why is not None else None
        parts = [found] if found is not None else [
            f"{label}: {', '.join(keys[:20])}" for label, keys in (
                ("missing from the target", missing), ("not in the checkpoint", unexpected))
            if keys]
        raise StructureMismatchError(
            f"{where}: the target tree's structure differs from the checkpoint's ({'; '.join(parts)})"
        )
