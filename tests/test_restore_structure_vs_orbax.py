"""A restore target (or restore args) whose structure differs from the checkpoint's: the
same code run on ckpt_async and on the real orbax-checkpoint 0.12.8, on checkpoints written
by each. Where Orbax refuses, ckpt_async refuses with an error of its own that is also the
builtin Orbax raises, naming the node; where Orbax restores, ckpt_async gives the same
containers and the same values, bit for bit.

(Differences that stay, on purpose, are in docs/migration.md: restore args without an item,
or of other containers of the same kind than the item's; an empty container in a partial
restore's item where the checkpoint has a subtree.)"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _checks import assert_bits_equal

import ckpt_async as ocp

NT = collections.namedtuple("NT", ["x", "y"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DC:
    w: object
    b: object


def a(n: int = 2, v: float = 1.0) -> np.ndarray:
    return np.arange(n, dtype=np.float32) + v


FRESH = a(4, 9.0)  # (a leaf the checkpoint does not have)

# name: (saved tree, target built by L (name in the saved tree -> its leaf), the node the
# message names where Orbax refuses)
CASES = {
    "dict for a list": ({"l": [a(), a(3)]}, lambda L: {"l": {"0": L("l.0"), "1": L("l.1")}},
                        "('l',)"),
    "list for a dict of '0', '1'": ({"l": {"0": a(), "1": a(3)}},
                                    lambda L: {"l": [L("l.0"), L("l.1")]}, "('l',)"),
    "dict for a list at the root": ([a(), a(3)], lambda L: {"0": L("0"), "1": L("1")}, "()"),
    "list for a dict at the root": ({"0": a(), "1": a(3)}, lambda L: [L("0"), L("1")], "()"),
    "list for a dict of int keys": ({"d": {0: a(), 1: a(3)}},
                                    lambda L: {"d": [L("d.0"), L("d.1")]}, "('d',)"),
    "dict of int keys for a list": ({"d": [a(), a(3)]},
                                    lambda L: {"d": {0: L("d.0"), 1: L("d.1")}}, "('d',)"),
    "dict for a list deep down": (
        {"a": {"b": {"c": [a(), {"d": a(3)}]}}},
        lambda L: {"a": {"b": {"c": {"0": L("a.b.c.0"), "1": {"d": L("a.b.c.1.d")}}}}},
        "('a', 'b', 'c')"),
    "value where the checkpoint holds None": ({"a": a(), "b": None},
                                              lambda L: {"a": L("a"), "b": FRESH}, "('b',)"),
    "value where the checkpoint holds {}": ({"a": a(), "b": {}},
                                            lambda L: {"a": L("a"), "b": FRESH}, "('b',)"),
    "value where the checkpoint holds []": ({"a": a(), "b": []},
                                            lambda L: {"a": L("a"), "b": FRESH}, "('b',)"),
    "{} where the checkpoint has a value": ({"a": a(), "b": a(3)},
                                            lambda L: {"a": L("a"), "b": {}}, "('b',)"),
    "value where the checkpoint has a subtree": ({"a": a(), "b": {"c": a(3)}},
                                                 lambda L: {"a": L("a"), "b": L("b.c")}, "('b',)"),
    "subtree where the checkpoint has a value": ({"a": a(), "b": a(3)},
                                                 lambda L: {"a": L("a"), "b": {"c": L("b")}},
                                                 "('b',)"),
    "subtree where the checkpoint holds {}": ({"a": a(), "b": {}},
                                              lambda L: {"a": L("a"), "b": {"c": FRESH}}, "('b',)"),
    # (the same kind of container: restored into the target's, as Orbax does)
    "tuple for a list": ({"l": [a(), a(3)]}, lambda L: {"l": (L("l.0"), L("l.1"))}, None),
    "list for a tuple": ({"t": (a(), a(3))}, lambda L: {"t": [L("t.0"), L("t.1")]}, None),
    "named tuple for a dict": ({"p": {"x": a(), "y": a(3)}},
                               lambda L: {"p": NT(L("p.x"), L("p.y"))}, None),
    "dataclass for a dict": ({"s": {"w": a(), "b": a(3)}},
                             lambda L: {"s": DC(w=L("s.w"), b=L("s.b"))}, None),
}


def restore(lib, api: str, path, target):
    """The restore of ``target`` through ``api``, the same code for either library."""
    make_args = lib.checkpoint_utils.construct_restore_args
    if api == "PyTreeRestore(item)":
        return lib.PyTreeCheckpointer().restore(path, args=lib.args.PyTreeRestore(item=target))
    if api == "PyTreeRestore(item, restore_args)":
        return lib.PyTreeCheckpointer().restore(path, args=lib.args.PyTreeRestore(
            item=target, restore_args=make_args(target)))
    if api == "PyTreeRestore(partial_restore=True)":
        return lib.PyTreeCheckpointer().restore(path, args=lib.args.PyTreeRestore(
            item=target, restore_args=make_args(target), partial_restore=True))
    abstract = jax.tree.map(lib.utils.to_shape_dtype_struct, target)
    if api == "StandardCheckpointer.restore":
        return lib.StandardCheckpointer().restore(path, abstract)
    assert api == "StandardRestore"
    return lib.Checkpointer(lib.StandardCheckpointHandler()).restore(
        path, args=lib.args.StandardRestore(abstract))


APIS = ["PyTreeRestore(item)", "PyTreeRestore(item, restore_args)",
        "PyTreeRestore(partial_restore=True)", "StandardCheckpointer.restore",
        "StandardRestore"]


def leaves_by_name(tree) -> dict:
    return {".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                     for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def containers(x):
    """The tree's containers, with their types, and the types of its leaves."""
    if isinstance(x, dict):
        return {k: containers(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or dataclasses.is_dataclass(x):
        kids = [getattr(x, f.name) for f in dataclasses.fields(x)] \
            if dataclasses.is_dataclass(x) else list(x)
        return (type(x), [containers(v) for v in kids])
    return type(x)


@pytest.fixture(scope="module", params=["ckpt_async", "orbax"])
def saved(request, tmp_path_factory):
    """Every case's tree, saved by one library: name -> path."""
    lib = ocp if request.param == "ckpt_async" else orbax
    root = tmp_path_factory.mktemp(f"written_by_{request.param}")
    paths = {}
    for i, (name, (tree, _, _)) in enumerate(CASES.items()):
        with lib.PyTreeCheckpointer() as ckptr:
            ckptr.save(root / str(i), args=lib.args.PyTreeSave(tree))
        paths[name] = root / str(i)
    return paths


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_target_of_another_structure_as_orbax(saved, case, api):
    tree, build, node = CASES[case]
    flat = leaves_by_name(tree)
    target = build(flat.__getitem__)
    path = saved[case]
    try:
        expected = restore(orbax, api, path, target)
    except (ValueError, TypeError, KeyError) as exc:
        builtin = next(c for c in type(exc).__mro__ if c in (ValueError, TypeError, KeyError))
        with pytest.raises(builtin) as raised:
            restore(ocp, api, path, target)
        assert isinstance(raised.value, ocp.errors.CheckpointError), raised.value
        assert node is not None and re.search(re.escape(node), str(raised.value)), raised.value
        assert str(path) in str(raised.value)
        return
    got = restore(ocp, api, path, target)
    assert containers(got) == containers(expected)
    for (p, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                              jax.tree_util.tree_flatten_with_path(expected)[0], strict=True):
        assert_bits_equal(x, y)
        assert type(x) is type(y), (jax.tree_util.keystr(p), type(x), type(y))


@pytest.mark.parametrize("case", ["dict for a list", "list for a dict of '0', '1'",
                                  "dict for a list at the root", "dict for a list deep down"])
def test_restore_args_with_a_dict_where_the_item_has_a_list_are_refused_as_by_orbax(saved,
                                                                                     case):
    """Restore args beside an item that match it but for a dict where the item has a list
    (or the other way round): refused, as by Orbax (a ValueError), naming the node. They
    were matched to the item's leaves by their keys as strings."""
    tree, build, node = CASES[case]
    flat = leaves_by_name(tree)
    target = build(flat.__getitem__)
    for lib in (orbax, ocp):
        with pytest.raises(ValueError) as raised:
            lib.PyTreeCheckpointer().restore(saved[case], args=lib.args.PyTreeRestore(
                item=tree, restore_args=lib.checkpoint_utils.construct_restore_args(target)))
    assert isinstance(raised.value, ocp.errors.StructureMismatchError)
    assert f"the restore args have a dict at {node}, the target a list or tuple" in str(
        raised.value) or f"the restore args have a list or tuple at {node}, the target a dict" \
        in str(raised.value), raised.value


def test_an_empty_dict_among_restore_args_stands_for_none(saved):
    """An empty dict in restore args where the item has an array: the array is read as
    saved, as in Orbax. It raised AttributeError ('dict' object has no attribute
    'restore_type')."""
    path = saved["{} where the checkpoint has a value"]
    item = {"a": a(), "b": a(3)}
    out = {lib.__name__: lib.PyTreeCheckpointer().restore(path, args=lib.args.PyTreeRestore(
        item=item, restore_args={"a": lib.RestoreArgs(), "b": {}})) for lib in (orbax, ocp)}
    for key in item:
        assert_bits_equal(out["ckpt_async"][key], out["orbax.checkpoint"][key])
        assert_bits_equal(out["ckpt_async"][key], item[key])
