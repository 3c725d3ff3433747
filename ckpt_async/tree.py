"""Tree helpers (Orbax's ``ocp.tree``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeVar, Union

import jax
import numpy as np

from .errors import (
    InvalidArgumentError,
    InvalidTypeError,
    MissingIndexError,
    MissingKeyError,
    StructureMismatchError,
)

#: Orbax's type aliases, for annotations: any pytree; a pytree of ``T`` leaves; one entry of
#: a key path (as ``jax.tree_util`` gives them); a key path; a JSON document.
PyTree = Any
_T = TypeVar("_T")
PyTreeOf = Union[PyTree, _T]  # noqa: UP007 - (a runtime alias: ``|`` cannot take Any)
PyTreeKey: TypeAlias = (jax.tree_util.SequenceKey | jax.tree_util.DictKey | jax.tree_util.GetAttrKey
             | jax.tree_util.FlattenedIndexKey)
PyTreePath = tuple[PyTreeKey, ...]
JsonType = Union[list[Any], dict[str, Any]]  # noqa: UP007


def to_shape_dtype_struct(x: Any, dtype: Any = None, scalar_dtype: Any = None) -> Any:
    """The abstract version of a leaf, as Orbax makes it: a scalar (``int``, ``float``, a NumPy
    number) stays a scalar (converted by ``scalar_dtype``, e.g. ``int``, if given); a NumPy
    array becomes a ``jax.ShapeDtypeStruct``; anything else with a shape (or
    ``global_shape``), a dtype and a sharding (``jax.Array``, ``ShapeDtypeStruct``,
    ``ArrayRestoreArgs``, :class:`~ckpt_async.metadata.ArrayMetadata`, whose sharding is
    rebuilt with ``to_jax_sharding()``) a ``ShapeDtypeStruct`` with that sharding. ``dtype``
    overrides the array's. A random key array is described by its key data. Other leaves
    (strings, ...) are returned as they are."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if isinstance(x, (int, float, np.number)):  # (bool is an int)
        return x if scalar_dtype is None else scalar_dtype(x)
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = getattr(x, "global_shape", None)
    if shape is None or getattr(x, "dtype", None) is None:
        return x
    sharding = getattr(x, "sharding", None)
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        sharding = sharding.to_jax_sharding()  # (a ShardingMetadata)
    return jax.ShapeDtypeStruct(tuple(shape), dtype or x.dtype, sharding=sharding)


def _key_name(key: Any) -> int | str:
    """A jax key path entry as Orbax names it: a sequence index, or a dict key / attribute as str."""
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    raise InvalidArgumentError(f"unsupported key {key!r} ({type(key).__name__}) in a tree path")


def _is_empty_or_leaf(x: Any) -> bool:
    """A leaf, or a container without children (``{}``, ``[]``, ``()``, None)."""
    children = jax.tree_util.tree_leaves(x, is_leaf=lambda y: y is not x)
    return not children or (len(children) == 1 and children[0] is x)


def _flat_with_path(tree: Any, keep_empty_nodes: bool, is_leaf: Any = None) -> list:
    return jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=is_leaf or (_is_empty_or_leaf if keep_empty_nodes else None))[0]


def serialize_tree(tree: Any, keep_empty_nodes: bool = False) -> Any:
    """``tree`` as nested dicts and lists, keyed as the checkpoint names its leaves: tuples
    become lists, namedtuples and other keyed nodes dicts (Orbax's ``serialize_tree``). Empty
    containers and None are dropped unless ``keep_empty_nodes``."""
    return from_flattened_with_keypath(_flat_with_path(tree, keep_empty_nodes))


def _is_sequence_key(key: Any) -> bool:
    return isinstance(key, (jax.tree_util.SequenceKey, jax.tree_util.FlattenedIndexKey))


def from_flattened_with_keypath(flat_with_keys: list[tuple[tuple[Any, ...], Any]]) -> Any:
    """The tree of ``(key path, value)`` pairs (``jax.tree_util.tree_flatten_with_path``'s):
    nested dicts for dict keys and attributes, lists for sequence indices (a tuple or a named
    tuple comes back as a list or a dict)."""
    if not flat_with_keys:
        raise InvalidArgumentError("cannot build a tree of no leaves: it could be {} or []")
    if not flat_with_keys[0][0]:
        return flat_with_keys[0][1]  # the tree is one leaf
    root: Any = [] if _is_sequence_key(flat_with_keys[0][0][0]) else {}
    for path, value in flat_with_keys:
        node = root
        for i, key in enumerate(path):
            name = _key_name(key)
            last = i == len(path) - 1
            if not last:
                child: Any = [] if _is_sequence_key(path[i + 1]) else {}
            if isinstance(node, list):
                if not isinstance(name, int):
                    raise InvalidArgumentError(f"key {name!r} mixed with sequence indices")
                node.extend([None] * (name + 1 - len(node)))
                if last:
                    node[name] = value
                elif node[name] is None:
                    node[name] = child
            elif last:
                node[name] = value
            else:
                node.setdefault(name, child)
            if not last:
                node = node[name]
    return root


def _child(node: Any, key: Any) -> Any:
    """The child of a node that is not a dict, list or tuple (a dataclass, a named tuple, a
    pytree node of one's own) at one key of a jax key path, as Orbax looks it up: by index or
    dict key, by attribute, or by its place among the node's children."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        try:
            return getattr(node, key.name)
        except AttributeError as exc:
            raise KeyError(key.name) from exc
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        children = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)[0]
        if (len(children) == 1 and children[0] is node) or not 0 <= key.key < len(children):
            raise KeyError(key.key)  # (a leaf has no children: KeyError too, as in Orbax)
        return children[key.key]
    return node[_key_name(key) if isinstance(key, jax.tree_util.SequenceKey) else key.key]


def deserialize_tree(serialized: Any, target: Any, keep_empty_nodes: bool = False) -> Any:
    """The inverse of :func:`serialize_tree`: ``serialized``'s values in ``target``'s
    structure (tuples, namedtuples and custom nodes as in ``target``). ``serialized`` may
    hold such nodes too (a dataclass, a named tuple, a node of one's own), looked up by
    attribute or by place, as in Orbax. Where ``serialized`` lacks a value the target has,
    the builtin Orbax raises is mixed in: ``MissingKeyError``
    (a ``KeyError``) for a dict without the key, ``MissingIndexError`` (an ``IndexError``)
    for a list too short, ``InvalidTypeError`` (a ``TypeError``) for a leaf, or a list where
    the target has a key that is not an index."""

    def lookup(path: tuple[Any, ...], _: Any) -> Any:
        node = serialized
        for depth, key in enumerate(path):
            name = _key_name(key)
            if isinstance(node, dict) and name not in node:
                name = str(name)
            try:
                node = node[name] if type(node) in (dict, list, tuple) else _child(node, key)
            except (KeyError, IndexError, TypeError) as exc:
                where = "/".join(str(_key_name(k)) for k in path)
                at = "/".join(str(_key_name(k)) for k in path[:depth])
                at = f"at {at!r}" if at else "as the root"
                missing = f"no value for {where!r} in the serialized tree"
                if isinstance(exc, KeyError):
                    raise MissingKeyError(missing) from exc
                if isinstance(exc, IndexError):
                    raise MissingIndexError(
                        f"{missing} (its list {at} has {len(node)} elements)") from exc
                raise InvalidTypeError(
                    f"{missing} (it has a value of type {type(node).__name__} {at})") from exc
        return node

    return jax.tree_util.tree_map_with_path(
        lookup, target, is_leaf=_is_empty_or_leaf if keep_empty_nodes else None)


def to_flat_dict(tree: Any, sep: str | None = None, keep_empty_nodes: bool = False,
                 is_leaf: Any = None) -> dict[Any, Any]:
    """``{('layer', 'w'): leaf, ...}`` (or ``{'layer/w': leaf}`` with ``sep='/'``): every leaf
    by its key path, the keys as strings (Orbax's ``to_flat_dict``)."""
    flat = {tuple(str(_key_name(k)) for k in path): v
            for path, v in _flat_with_path(tree, keep_empty_nodes, is_leaf)}
    return flat if sep is None else {sep.join(k): v for k, v in flat.items()}


def from_flat_dict(flat_dict: dict[Any, Any], target: Any = None, sep: str | None = None, *,
                   inplace: bool = False) -> Any:
    """The inverse of :func:`to_flat_dict`: with ``target``, its structure filled with
    ``flat_dict``'s values; without, nested dicts. ``inplace`` empties ``flat_dict`` as it goes."""
    take = flat_dict.pop if inplace else flat_dict.__getitem__
    if target is not None:
        keys = to_flat_dict(target, sep=sep)
        missing = [k for k in keys if k not in flat_dict]
        if missing:
            raise MissingKeyError(f"flat_dict has no value for {missing[:5]} of the target")
        return jax.tree.unflatten(jax.tree.structure(target), [take(k) for k in keys])
    if sep is None and () in flat_dict:
        if len(flat_dict) != 1:
            raise InvalidArgumentError(f"the empty path () must be the only key, got {list(flat_dict)}")
        return take(())
    out: dict[str, Any] = {}
    for key in list(flat_dict):
        parts = tuple(key.split(sep)) if sep is not None else key
        node = out
        for name in parts[:-1]:
            node = node.setdefault(name, {})
        node[parts[-1]] = take(key)
    return out


def get_param_names(item: Any, *, include_empty_nodes: bool = True) -> Any:
    """``item`` with each leaf replaced by its name in a checkpoint: its key path joined with
    dots (``'params.dense.kernel'``, ``'layers.0.w'``), as Orbax names it. Empty nodes
    (``{}``, None) are named too, unless ``include_empty_nodes=False``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ".".join(str(_key_name(k)) for k in path), item,
        is_leaf=_is_empty_or_leaf if include_empty_nodes else None)


def str_keypath(keypath: tuple[Any, ...]) -> tuple[str, ...]:
    """A jax key path as the strings a checkpoint names its keys by (``('layers', '0', 'w')``)."""
    return tuple(str(_key_name(k)) for k in keypath)


def is_flat_dict(tree: Any) -> bool:
    """Whether ``tree`` is a dict whose every value is a leaf."""
    return isinstance(tree, dict) and all(jax.tree_util.all_leaves([v]) for v in tree.values())


class Diff(NamedTuple):
    """Where :func:`tree_difference` found two trees to differ: the left and right sides."""

    lhs: Any
    rhs: Any


def tree_difference(a: Any, b: Any, *, is_leaf: Callable[[Any], bool] | None = None,
                    leaves_equal: Callable[[Any, Any], bool] | None = None) -> Any:
    """How the structures of ``a`` and ``b`` differ (Orbax's ``tree_difference``): None when
    they do not; else a tree, a prefix of both, holding a :class:`Diff` where they part:
    leaves that are not ``leaves_equal`` (by default: of another type), nodes of different
    types (``Diff(type_a, type_b)``), sequences of different lengths (``Diff((type, len),
    (type, len))``), mapping keys one side lacks (``Diff(value, None)``). Equal entries of a
    mapping are left out, of a sequence are None.

    >>> tree_difference({'x': [1, 2], 'y': 1}, {'x': [1, 2, 3], 'y': 1.0})
    {'x': Diff(lhs=(<class 'list'>, 2), rhs=(<class 'list'>, 3)), 'y': Diff(lhs=1, rhs=1.0)}
    """
    leaf = is_leaf or (lambda t: jax.tree_util.all_leaves([t]))
    equal = leaves_equal or (lambda x, y: type(x) is type(y))

    def mapping_diff(x: Mapping[Any, Any], y: Mapping[Any, Any]) -> dict[Any, Any]:
        out = {k: d for k in x if k in y if (d := diff(x[k], y[k])) is not None}
        out.update((k, Diff(v, None)) for k, v in x.items() if k not in y)
        out.update((k, Diff(None, v)) for k, v in y.items() if k not in x)
        return out

    def diff(x: Any, y: Any) -> Any:
        if leaf(x) and leaf(y):
            return None if equal(x, y) else Diff(x, y)
        if type(x) is not type(y):
            return Diff(type(x), type(y))
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # (a named tuple)
            parts = [diff(i, j) for i, j in zip(x, y)]
            return None if all(p is None for p in parts) else type(x)(*parts)
        if isinstance(x, (list, tuple)):
            if len(x) != len(y):
                return Diff((type(x), len(x)), (type(y), len(y)))
            parts = [diff(i, j) for i, j in zip(x, y)]
            return None if all(p is None for p in parts) else type(x)(parts)
        if isinstance(x, Mapping):
            return mapping_diff(x, y) or None
        # another pytree node: its children by key (rebuilt as ``x``'s node where they differ)
        x_children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda t: t is not x)
        y_children, _ = jax.tree_util.tree_flatten_with_path(y, is_leaf=lambda t: t is not y)
        found = mapping_diff(dict(x_children), dict(y_children))
        if not found:
            return None
        return jax.tree_util.tree_unflatten(treedef, [found.get(k) for k, _ in x_children])

    return diff(a, b)


def _children_by_key(node: Any) -> tuple[dict[str, Any], Any]:
    """A pytree node's children by their key names (as strings), and its treedef."""
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return {str(_key_name(path[0])): child for path, child in children}, treedef


def _as_mapping(node: Any) -> Any:
    """A named tuple's fields by name; a mapping as it is."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return getattr(node, "_asdict")()  # (a named tuple; typed as a plain tuple)
    return node


def _merge_two(new: Any, old: Any, overwrite: bool, leaf: Callable[[Any], bool]) -> Any:
    if type(new) is not type(old) and not overwrite:
        raise StructureMismatchError(f"Types do not match: {type(new)} and {type(old)}")
    if leaf(new) or leaf(old):
        return new if new is not None else old
    named = isinstance(new, tuple) and hasattr(new, "_fields")
    if isinstance(new, Mapping) or named:
        new_items = _as_mapping(new)
        old_items = _as_mapping(old)
        merged = dict(old_items)
        for k, v in new_items.items():
            merged[k] = _merge_two(v, old_items[k], overwrite, leaf) if k in old_items else v
        try:
            return type(new)(**merged) if named else type(new)(merged)
        except (TypeError, ValueError):
            return merged
    if isinstance(new, Sequence) and not isinstance(new, str):
        if len(new) != len(old):
            raise StructureMismatchError(f"Sequence lengths do not match: {len(new)} and "
                                         f"{len(old)}")
        items = [_merge_two(a, b, overwrite, leaf) for a, b in zip(new, old)]
        try:
            return type(new)(items)  # type: ignore[call-arg]
        except (TypeError, ValueError):
            return items
    if not jax.tree_util.all_leaves([new]):  # (another pytree node: by its children's keys)
        new_children, treedef = _children_by_key(new)
        merged = _merge_two(new_children, _children_by_key(old)[0], overwrite, leaf)
        return jax.tree_util.tree_unflatten(treedef, [merged[k] for k in new_children])
    return new


def merge_trees(*trees: Any, overwrite: bool = False,
                is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """The trees merged into one, keeping their node types (Orbax's ``ocp.tree.merge_trees``):
    mappings and named tuples by key, sequences element by element (of equal lengths), other
    pytree nodes by their children's keys. A key path in two trees raises ``ValueError``
    unless ``overwrite`` (then the later tree's leaf wins, and nodes of different types may
    meet). ``is_leaf`` (default: a leaf or None) says what counts as a leaf. ``ocp.merge_trees``
    is Orbax's older function of the same name, by flat key paths.

    >>> merge_trees({'a': 1, 'b': {'c': 2}}, {'d': 3, 'b': {'e': 4}})
    {'a': 1, 'b': {'c': 2, 'e': 4}, 'd': 3}
    """
    leaf = is_leaf or (lambda t: t is None or jax.tree_util.all_leaves([t]))
    if not trees:
        return {}
    if not overwrite:
        seen: set[Any] = set()
        for tree in trees:
            keys = set(to_flat_dict(tree, is_leaf=leaf))
            if common := seen & keys:
                raise InvalidArgumentError(f"Found common key paths when overwrite is False: "
                                           f"{sorted(common)}")
            seen |= keys
    return functools.reduce(lambda acc, tree: _merge_two(tree, acc, overwrite, leaf), trees)
