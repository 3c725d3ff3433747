"""Unit tests of ckpt_async._tree: flattening, skeletons, Orbax key metadata. Pure, no I/O."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from ckpt_async import _format as fmt
from ckpt_async import _tree
from ckpt_async.errors import InvalidArgumentError, StructureMismatchError

Point = collections.namedtuple("Point", ["x", "y"])


def roundtrip(tree):
    leaves, skeleton = _tree.flatten(tree)
    return _tree.unflatten(skeleton, lambda i: leaves[i].value), leaves, skeleton


def assert_same_tree(a, b):
    """Equal values *and* identical container types all the way down."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert type(k) is type(next(kk for kk in b if kk == k))
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    else:
        assert a == b


def test_dict_with_str_and_int_keys():
    tree = {"a": 1, 3: 2.0, "n": {0: "s", "k": 4}}
    out, leaves, _ = roundtrip(tree)
    assert_same_tree(out, tree)
    assert 3 in out and "3" not in out
    assert 0 in out["n"]
    by_name = {leaf.name: leaf for leaf in leaves}
    assert set(by_name) == {"a", "3", "n.0", "n.k"}
    assert by_name["n.0"].keys == ("n", 0)
    assert by_name["n.0"].key_types == (fmt.KEY_DICT, fmt.KEY_DICT)
    assert by_name["n.0"].tuple_key == "('n', '0')"


def test_list_tuple_and_namedtuple_keep_their_types():
    tree = {"l": [1, [2, 3]], "t": (4, (5,)), "p": Point(x=6, y=Point(7, 8))}
    out, leaves, _ = roundtrip(tree)
    assert_same_tree(out, tree)
    assert type(out["p"]) is Point and type(out["p"].y) is Point
    by_name = {leaf.name: leaf for leaf in leaves}
    assert by_name["l.1.0"].key_types == (fmt.KEY_DICT, fmt.KEY_SEQUENCE, fmt.KEY_SEQUENCE)
    assert by_name["t.1.0"].keys == ("t", 1, 0)
    # namedtuple fields are dict keys in Orbax's metadata
    assert by_name["p.y.x"].key_types == (fmt.KEY_DICT, fmt.KEY_DICT, fmt.KEY_DICT)


def test_none_and_empty_containers_are_leaves():
    tree = {"none": None, "d": {}, "l": [], "t": (), "x": [None, {}]}
    out, leaves, _ = roundtrip(tree)
    assert_same_tree(out, tree)
    values = {leaf.name: leaf.value for leaf in leaves}
    assert values["none"] is None
    assert values["d"] == {} and type(values["d"]) is dict
    assert type(values["t"]) is tuple and type(values["l"]) is list
    assert set(values) == {"none", "d", "l", "t", "x.0", "x.1"}


def test_bare_leaf_and_empty_root():
    out, leaves, _ = roundtrip(np.arange(3))
    np.testing.assert_array_equal(out, np.arange(3))
    assert len(leaves) == 1 and leaves[0].keys == ()
    out, _, _ = roundtrip({})
    assert out == {} and type(out) is dict


def test_nested_100_levels_deep():
    tree: object = 1.5
    for i in range(100):
        tree = {f"k{i}": tree} if i % 2 else [tree]
    out, leaves, _ = roundtrip(tree)
    assert_same_tree(out, tree)
    assert len(leaves) == 1 and len(leaves[0].keys) == 100


def test_ten_thousand_leaves_wide():
    tree = {f"p{i}": i for i in range(10_000)}
    out, leaves, skeleton = roundtrip(tree)
    assert out == tree and list(out) == list(tree)
    assert [leaf.value for leaf in leaves] == list(range(10_000))
    assert list(_tree.skeleton_leaf_order(skeleton)) == list(range(10_000))


def test_name_collision_raises():
    with pytest.raises(InvalidArgumentError, match="a.b"):
        _tree.flatten({"a.b": 1, "a": {"b": 2}})
    with pytest.raises(InvalidArgumentError):
        _tree.flatten({1: "x", "1": "y"})


@pytest.mark.parametrize("tree", [{"": 1}, {"a": {"": 1}}])
def test_empty_key_raises(tree):
    with pytest.raises(InvalidArgumentError, match="empty key"):
        _tree.flatten(tree)


@pytest.mark.parametrize("key", [1.5, (1, 2), True, b"x", None])
def test_non_str_int_key_raises(key):
    with pytest.raises(InvalidArgumentError):
        _tree.flatten({"a": {key: 1}})


def test_skeleton_is_json_serializable():
    tree = {"a": [1, (2, Point(3, None))], 4: {}}
    _, skeleton = _tree.flatten(tree)
    decoded = fmt.decode(fmt.encode(skeleton), list, where="test")
    leaves, _ = _tree.flatten(tree)
    assert_same_tree(_tree.unflatten(decoded, lambda i: leaves[i].value), tree)


def test_tree_from_key_metadata_builds_dicts_and_lists():
    def km(*pairs):
        return [fmt.KeyEntry(k, kt) for k, kt in pairs]

    D, S = fmt.KEY_DICT, fmt.KEY_SEQUENCE
    entries = [
        (km(("params", D), ("w", D)), "w"),
        (km(("params", D), ("b", D)), "b"),
        (km(("layers", D), ("1", S)), "l1"),
        (km(("layers", D), ("0", S)), "l0"),
        (km(("layers", D), ("10", S)), "l10"),
        (km(("layers", D), ("2", S)), "l2"),
    ]
    # a sequence of 11 slots is sparse here; only the indices present are kept, in int order
    out = _tree.tree_from_key_metadata(entries)
    assert out["params"] == {"w": "w", "b": "b"}
    assert out["layers"] == ["l0", "l1", "l2", "l10"]
    assert _tree.tree_from_key_metadata([([], 42)]) == 42


def test_target_leaves_keys_and_names():
    target = {"a": [np.zeros(2), None], "b": {3: ()}, "p": Point(1, 2)}
    pairs, rebuild = _tree.target_leaves(target)
    keys = {k: (n, leaf) for k, n, leaf in pairs}
    assert set(keys) == {"('a', '0')", "('a', '1')", "('b', '3')", "('p', 'x')", "('p', 'y')"}
    assert keys["('b', '3')"][0] == "b.3" and keys["('b', '3')"][1] == ()
    assert keys["('a', '1')"][1] is None
    assert len(pairs) == 5
    rebuilt = rebuild([f"v{i}" for i in range(5)])
    assert type(rebuilt["p"]) is Point and rebuilt["b"] == {3: rebuilt["b"][3]}
    assert sorted(jax.tree_util.tree_leaves(rebuilt)) == [f"v{i}" for i in range(5)]


def test_target_leaves_match_flatten_keys():
    tree = {"a": [1, {"b": 2}], 7: Point(3, (4,)), "e": {}}
    leaves, _ = _tree.flatten(tree)
    pairs, rebuild = _tree.target_leaves(tree)
    out = rebuild([leaf for _k, _n, leaf in pairs])
    assert_same_tree(out, tree)
    assert {leaf.tuple_key for leaf in leaves} == {k for k, _n, _l in pairs}
    assert {leaf.name for leaf in leaves} == {n for _k, n, _l in pairs}


def test_check_structure():
    _tree.check_structure({"a", "b"}, {"a", "b"}, where="x")
    _tree.check_structure({"a", "b"}, {"a"}, where="x", allow_missing=True)
    with pytest.raises(StructureMismatchError) as ei:
        _tree.check_structure({"a", "b"}, {"a", "c"}, where="/ckpt")
    msg = str(ei.value)
    assert "missing from the target: b" in msg and "not in the checkpoint: c" in msg
    assert "/ckpt" in msg
    with pytest.raises(StructureMismatchError, match="not in the checkpoint: c"):
        _tree.check_structure({"a"}, {"a", "c"}, where="x", allow_missing=True)
