"""Seeded random pytrees move both ways between ckpt_async and the real orbax-checkpoint 0.12.8.

Each seed builds a tree of nested dicts, lists and tuples whose leaves are NumPy arrays (C and
Fortran order, 0-d to 3-d, zero-size included), jax arrays on one device or sharded over the
2 x 2 mesh, Python scalars and None, in 13 dtypes. The tree is saved by each library and
restored by both libraries, without a target and into one; then both restore each
checkpoint into a second target that casts floats and ints and
moves arrays onto other shardings, and must give the same bits. A second test saves seeded
PyTreeSave trees (strings, bools, int dict keys, namedtuples, None and empty containers too)
with both libraries and restores each without a target: every reader must see what Orbax
sees in its own checkpoint. A third restores random parts of random trees
(``partial_restore=True``, restore args for each leaf) from either library's checkpoint, and
ckpt_async must give what Orbax gives. Written by hand, the other tests of the format pin
single cases; these cover their combinations.
"""

from __future__ import annotations

import collections

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as orbax  # a test dependency: missing is a failure
import pytest
from _checks import assert_bits_equal
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp

pytestmark = pytest.mark.slow

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.int16, np.int32,
          np.int64, np.uint8, np.uint32, np.uint64, np.bool_, np.complex64]
#: jax keeps 32-bit types (x64 off): these stay NumPy arrays
_NOT_JAX = {np.dtype(t) for t in (np.float64, np.int64, np.uint64, np.complex64)}
FLOATS = [np.float32, np.float16, ml_dtypes.bfloat16]


def _values(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if dtype.kind == "c":
        return np.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape), dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dtype,
                                       endpoint=True))
    return np.asarray(rng.standard_normal(shape), dtype)


def _array(rng: np.random.Generator, mesh, allow_empty: bool):
    dtype = np.dtype(DTYPES[rng.integers(len(DTYPES))])
    sizes = [0, 1, 2, 4, 8] if allow_empty and rng.random() < 0.1 else [1, 2, 4, 6, 8]
    shape = tuple(int(rng.choice(sizes)) for _ in range(int(rng.integers(0, 4))))
    value = _values(rng, dtype, shape)
    kind = int(rng.integers(4))
    if kind == 0 or dtype in _NOT_JAX:
        return np.asfortranarray(value) if value.ndim >= 2 and rng.random() < 0.3 else value
    if kind == 1 or value.ndim == 0:
        return jax.device_put(value)
    spec: list[str | None] = []
    for dim in value.shape:  # (each mesh axis used once, on a dimension it divides)
        free = [a for a in ("x", "y") if a not in spec]
        spec.append(free[0] if free and dim and dim % 2 == 0 and rng.random() < 0.6 else None)
    return jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))


def random_tree(rng: np.random.Generator, mesh, allow_empty: bool, depth: int = 0):
    r = rng.random()
    if depth >= 3 or r < 0.35:
        x = rng.random()
        if x < 0.75:
            return _array(rng, mesh, allow_empty)
        if x < 0.85:
            return float(rng.standard_normal())
        if x < 0.95:
            return int(rng.integers(-1000, 1000))
        return None
    n = int(rng.integers(1, 4))
    children = [random_tree(rng, mesh, allow_empty, depth + 1) for _ in range(n)]
    if r < 0.75:
        return {f"k{rng.integers(100)}_{i}": c for i, c in enumerate(children)}
    return children if r < 0.9 else tuple(children)


def _leaves(tree) -> dict[str, object]:
    """Leaves by key path, None leaves left out (Orbax restores an empty container there)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
            for path, v in flat}


def assert_same_leaves(got, expected, where: str) -> None:
    got_leaves, want = _leaves(got), _leaves(expected)
    assert set(got_leaves) == set(want), f"{where}: {sorted(set(got_leaves) ^ set(want))}"
    for key, value in want.items():
        if isinstance(value, (int, float)):
            assert float(np.asarray(got_leaves[key])) == value, f"{where} {key}"
        else:
            assert_bits_equal(got_leaves[key], value)


def assert_placed_as(got, target) -> None:
    """Each leaf of ``got`` has the dtype of ``target``'s leaf (an array or a
    ShapeDtypeStruct), and the sharding where the target names one."""
    for (key, want), leaf in zip(_leaves(target).items(), _leaves(got).values(), strict=True):
        if isinstance(want, jax.ShapeDtypeStruct | np.ndarray | jax.Array):
            assert np.dtype(leaf.dtype) == np.dtype(want.dtype), key
        if getattr(want, "sharding", None) is not None:
            assert leaf.sharding.is_equivalent_to(want.sharding, len(want.shape)), key


def _target(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        if isinstance(x, jax.Array) else x, tree)


def _recast(rng: np.random.Generator, mesh, x):
    """A target leaf for ``x`` of another float or int type, on another sharding."""
    if not isinstance(x, (np.ndarray, jax.Array)):
        return x
    dtype = np.dtype(x.dtype)
    if dtype.kind == "f" and rng.random() < 0.7:
        dtype = np.dtype(FLOATS[rng.integers(len(FLOATS))])
    elif dtype.kind in "iu" and dtype.itemsize <= 4 and rng.random() < 0.5:
        dtype = np.dtype(np.int32)
    if dtype in _NOT_JAX or (isinstance(x, np.ndarray) and rng.random() < 0.5):
        return np.zeros(x.shape, dtype) if rng.random() < 0.5 else jax.ShapeDtypeStruct(
            x.shape, dtype)
    spec: list[object] = [None] * x.ndim
    if x.ndim and x.shape[0] and x.shape[0] % 4 == 0 and rng.random() < 0.5:
        spec[0] = ("x", "y")
    return jax.ShapeDtypeStruct(x.shape, dtype,
                                sharding=NamedSharding(mesh, PartitionSpec(*spec)))


LIBRARIES = {"ckpt_async": ocp, "orbax": orbax}


def _save(library: str, path, tree) -> None:
    with LIBRARIES[library].StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)


def _restore(library: str, path, target=None):
    with LIBRARIES[library].StandardCheckpointer() as ckptr:
        return ckptr.restore(path) if target is None else ckptr.restore(path, target)


@pytest.mark.parametrize("seed", range(16))
def test_random_trees_both_ways_with_casts_and_reshards(tmp_path, mesh, seed):
    rng = np.random.default_rng(seed)
    # (Orbax refuses to save a zero-size array: the trees it writes have none)
    trees = {writer: {name: random_tree(rng, mesh, allow_empty) for name in ("a", "b", "c")}
             for writer, allow_empty in (("ckpt_async", True), ("orbax", False))}
    for writer, tree in trees.items():
        path = tmp_path / writer
        _save(writer, path, tree)
        for reader in LIBRARIES:
            assert_same_leaves(_restore(reader, path), tree, f"{writer} -> {reader}")
            target = _target(tree)
            restored = _restore(reader, path, target)
            assert_same_leaves(restored, tree, f"{writer} -> {reader}, into a target")
            assert_placed_as(restored, target)

        recast = jax.tree.map(lambda x: _recast(rng, mesh, x), tree)
        theirs = _restore("orbax", path, recast)
        ours = _restore("ckpt_async", path, recast)
        assert_same_leaves(ours, theirs, f"{writer}'s, cast and resharded, against Orbax's")
        assert_placed_as(ours, recast)


PairTuple = collections.namedtuple("PairTuple", ["alpha", "beta"])


def _pytree_leaf(rng: np.random.Generator):
    x = rng.random()
    if x < 0.45:
        dtype = [np.float32, np.int32, ml_dtypes.bfloat16, np.uint8, np.float64][rng.integers(5)]
        shape = tuple(int(rng.integers(1, 5)) for _ in range(int(rng.integers(0, 3))))
        value = np.asarray(rng.standard_normal(shape) * 10).astype(dtype)
        return value if rng.random() < 0.5 or dtype == np.float64 else jax.device_put(value)
    if x < 0.55:
        return float(rng.standard_normal())
    if x < 0.65:
        return int(rng.integers(-5, 5))
    if x < 0.72:
        return bool(rng.random() < 0.5)
    if x < 0.80:
        return f"s{rng.integers(100)}"
    return [None, {}, [], ()][int(rng.integers(4))]


def random_pytree(rng: np.random.Generator, depth: int = 0):
    """Containers PyTreeSave takes (str and int dict keys, lists, tuples, namedtuples) over
    arrays, Python scalars, strings, None and empty containers."""
    r = rng.random()
    if depth >= 3 or r < 0.3:
        return _pytree_leaf(rng)
    children = [random_pytree(rng, depth + 1) for _ in range(int(rng.integers(1, 4)))]
    if r < 0.6:
        return {f"k{i}": c for i, c in enumerate(children)}
    if r < 0.7:
        return dict(enumerate(children))
    if r < 0.8:
        return children
    return tuple(children) if r < 0.9 else PairTuple(children[0], children[-1])


def describe(tree):
    """Containers (their types and keys), leaf types and leaf bytes, comparable with ==."""
    if isinstance(tree, dict):
        return "dict", sorted(((type(k).__name__, str(k)), describe(v)) for k, v in tree.items())
    if isinstance(tree, list | tuple):  # (a namedtuple by its class's name)
        return type(tree).__name__, [describe(v) for v in tree]
    if isinstance(tree, np.ndarray | jax.Array | np.generic):
        a = np.asarray(tree)
        return ("jax.Array" if isinstance(tree, jax.Array) else type(tree).__name__,
                str(a.dtype), a.shape, a.tobytes())
    return type(tree).__name__, repr(tree)


@pytest.mark.parametrize("seed", range(16))
def test_random_pytrees_restore_without_a_target_as_orbax_restores_them(tmp_path, seed):
    """Orbax reads ckpt_async's PyTreeSave as it reads its own, and ckpt_async reads Orbax's
    as Orbax does: the same containers, keys, leaf types and bytes."""
    tree = {"root": random_pytree(np.random.default_rng(seed))}
    for name, library in LIBRARIES.items():
        with library.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / name, args=library.args.PyTreeSave(tree))
    restored = {}
    for reader, library in LIBRARIES.items():
        for writer in LIBRARIES:
            with library.PyTreeCheckpointer() as ckptr:
                restored[reader, writer] = describe(ckptr.restore(tmp_path / writer))
    assert restored["orbax", "ckpt_async"] == restored["orbax", "orbax"]
    assert restored["ckpt_async", "orbax"] == restored["orbax", "orbax"]


def _pruned(rng: np.random.Generator, tree):
    """``tree`` with some keys of each dict left out (at least one kept)."""
    if isinstance(tree, dict):
        keys = [k for k in tree if rng.random() < 0.6] or list(tree)[:1]
        return {k: _pruned(rng, tree[k]) for k in keys}
    return tree


def _restore_args(library, tree):
    def args(x):
        if isinstance(x, jax.Array):
            return library.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype)
        if isinstance(x, np.ndarray):
            return library.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
        return library.RestoreArgs()
    return jax.tree.map(args, tree)


@pytest.mark.parametrize("seed", range(12))
def test_random_partial_restores_give_what_orbax_gives(tmp_path, mesh, seed):
    """``PyTreeRestore(partial_restore=True)`` of a random part of a random tree, with restore
    args for each leaf, from either library's checkpoint: ckpt_async's result is Orbax's."""
    rng = np.random.default_rng(seed)
    tree = {name: random_tree(rng, mesh, allow_empty=False) for name in ("a", "b", "c")}
    tree = {k: v for k, v in tree.items() if v is not None} or {"a": np.arange(3)}
    part = _pruned(rng, tree)
    for writer, library in LIBRARIES.items():
        with library.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / writer, args=library.args.PyTreeSave(tree))
        restored = {}
        for reader, lib in LIBRARIES.items():
            args = lib.args.PyTreeRestore(item=part, restore_args=_restore_args(lib, part),
                                          partial_restore=True)
            with lib.PyTreeCheckpointer() as ckptr:
                restored[reader] = describe(ckptr.restore(tmp_path / writer, args=args))
        assert restored["ckpt_async"] == restored["orbax"], writer
