"""PyTreeRestore(transforms=...): the restore reads what the transformations need and
reshapes it into ``item``'s structure, as the real orbax-checkpoint 0.12.8 does on the same
checkpoint with the same arguments."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _checks import assert_bits_equal

import ckpt_async as ocp
from ckpt_async.errors import InvalidArgumentError

STATE = {"a": {"x": np.arange(6, dtype=np.float32).reshape(2, 3),
               "y": np.ones((2, 3), np.float32)},
         "b": np.arange(4, dtype=np.int32), "step": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("transforms") / "ckpt"
    ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(STATE))
    return path


def both(path, item, restore_args, transforms, orbax_transforms=None, orbax_restore_args=None,
         default_to_original=True):
    """Our restore and Orbax's, of the same arguments (Orbax's own classes where given)."""
    ours = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, transforms=transforms,
        transforms_default_to_original=default_to_original))
    theirs = orbax.PyTreeCheckpointer().restore(path, args=orbax.args.PyTreeRestore(
        item=item, restore_args=orbax_restore_args or restore_args,
        transforms=orbax_transforms or transforms,
        transforms_default_to_original=default_to_original))
    return ours, theirs


def assert_same(ours, theirs):
    a = jax.tree_util.tree_flatten_with_path(ours)[0]
    b = jax.tree_util.tree_flatten_with_path(theirs)[0]
    assert [jax.tree_util.keystr(p) for p, _ in a] == [jax.tree_util.keystr(p) for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert_bits_equal(x, y)
        assert type(x) is type(y), (jax.tree_util.keystr(path), type(x), type(y))


def both_summed(path, key, fn, pattern):
    """Both restores of ``{key: 0}`` through the multi_value_fn ``fn`` over the NumPy
    arrays the regex ``pattern`` names; checks that they agree and returns ours."""
    def transform(lib):
        return {key: lib.RestoreTransform(multi_value_fn=fn, multi_value_fn_input_args={
            pattern: lib.RestoreArgs(restore_type=np.ndarray)})}

    ours, theirs = both(path, {key: 0}, {key: ocp.RestoreArgs(restore_type=np.ndarray)},
                        transform(ocp), transform(orbax),
                        {key: orbax.RestoreArgs(restore_type=np.ndarray)})
    assert_same(ours, theirs)
    return ours


def np_args(tree):
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def orbax_np_args(tree):
    return jax.tree.map(lambda _: orbax.RestoreArgs(restore_type=np.ndarray), tree)


def test_renamed_keys_and_value_fn(saved):
    item = {"params": {"x": 0, "y": 0}, "b": 0, "step": 0}
    transforms = {r"params/(.*)": ocp.Transform(original_key=r"a/\1"),
                  "b": ocp.Transform(value_fn=lambda v: v * 2)}
    orbax_transforms = {r"params/(.*)": orbax.Transform(original_key=r"a/\1"),
                        "b": orbax.Transform(value_fn=lambda v: v * 2)}
    ours, theirs = both(saved, item, np_args(item), transforms, orbax_transforms,
                        orbax_np_args(item))
    assert_same(ours, theirs)
    assert_bits_equal(ours["params"]["x"], STATE["a"]["x"])
    assert_bits_equal(ours["b"], STATE["b"] * 2)


def test_restore_args_of_the_result_cast_and_place_renamed_leaves(saved, mesh):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    item = {"w": 0}
    ours, theirs = both(
        saved, item, {"w": ocp.ArrayRestoreArgs(sharding=sharding, dtype=np.float16)},
        {"w": ocp.Transform(original_key="a/y")},
        {"w": orbax.Transform(original_key="a/y")},
        {"w": orbax.ArrayRestoreArgs(sharding=sharding, dtype=np.float16)})
    assert_same(ours, theirs)
    assert isinstance(ours["w"], jax.Array) and ours["w"].sharding == sharding
    assert_bits_equal(ours["w"], STATE["a"]["y"].astype(np.float16))


def test_fallback_keys_keep_the_item_s_values(saved):
    new = np.full(3, 7, np.int64)
    item = {"a": {"x": 0, "y": 0}, "new": new, "step": 0}
    ours, theirs = both(saved, item, np_args(item), {"new": ocp.Transform(use_fallback=True)},
                        {"new": orbax.Transform(use_fallback=True)}, orbax_np_args(item))
    assert_same(ours, theirs)
    assert ours["new"] is new and "b" not in ours


@pytest.mark.parametrize("default_to_original", [True, False])
def test_default_to_original(saved, default_to_original):
    mine = np.full(4, -1, np.int32)
    item = {"b": mine, "step": 0, "a": {"x": 0, "y": 0}}
    ours, theirs = both(saved, item, np_args(item),
                        {"step": ocp.Transform(value_fn=lambda s: s + 1)},
                        {"step": orbax.Transform(value_fn=lambda s: s + 1)},
                        orbax_np_args(item), default_to_original=default_to_original)
    assert_same(ours, theirs)
    assert_bits_equal(ours["b"], STATE["b"] if default_to_original else mine)
    assert ours["step"] == 4


def test_multi_value_fn_gets_the_tree_and_its_restore_args(saved):
    seen = []

    def total(key, tree, args):
        seen.append((key, type(args).__name__))
        return tree["a"]["x"] + tree["a"]["y"]

    ours = both_summed(saved, "sum", total, r"a/.*")
    assert_bits_equal(ours["sum"], STATE["a"]["x"] + STATE["a"]["y"])
    assert seen == [("sum", "RestoreArgs")] * 2


def test_only_what_the_transforms_need_is_read(tmp_path):
    """An array the result does not use is not read: its data may be gone."""
    path = tmp_path / "ckpt"
    orbax.Checkpointer(orbax.PyTreeCheckpointHandler(use_ocdbt=False)).save(path, STATE)
    for leftover in ("a.y", "step"):  # (one array per directory: remove two of them)
        for f in (path / leftover).iterdir():
            f.unlink()
        (path / leftover).rmdir()
    item = {"renamed": 0, "b": 0}
    ours, theirs = both(path, item, np_args(item), {"renamed": ocp.Transform(original_key="a/x")},
                        {"renamed": orbax.Transform(original_key="a/x")}, orbax_np_args(item))
    assert_same(ours, theirs)
    assert_bits_equal(ours["renamed"], STATE["a"]["x"])


def test_refused_as_orbax_refuses(saved):
    restore = ocp.PyTreeCheckpointer().restore
    transforms = {"b": ocp.Transform(value_fn=lambda v: v)}
    with pytest.raises(InvalidArgumentError, match="needs `item`"):
        restore(saved, args=ocp.args.PyTreeRestore(transforms=transforms))
    with pytest.raises(InvalidArgumentError, match="needs `restore_args`"):
        restore(saved, args=ocp.args.PyTreeRestore(item={"b": 0}, transforms=transforms))
    item = {"s": 0}
    with pytest.raises(InvalidArgumentError, match="RestoreTransform"):
        restore(saved, args=ocp.args.PyTreeRestore(
            item=item, restore_args=np_args(item),
            transforms={"s": ocp.Transform(multi_value_fn=lambda k, t: 0)}))
    with pytest.raises(InvalidArgumentError, match="multi_value_fn_input_args"):
        restore(saved, args=ocp.args.PyTreeRestore(
            item=item, restore_args=np_args(item),
            transforms={"s": ocp.RestoreTransform(multi_value_fn=lambda k, t, a: 0)}))
    with pytest.raises(ValueError, match="'nope' is not in the original tree"):
        restore(saved, args=ocp.args.PyTreeRestore(
            item=item, restore_args=np_args(item),
            transforms={"s": ocp.Transform(original_key="nope")}))
    with pytest.raises(InvalidArgumentError, match="legacy_transform_fn"):
        restore(saved, args=ocp.args.PyTreeRestore(
            item=item, legacy_transform_fn=lambda *a: a))


def test_a_key_read_without_restore_args_is_refused_as_orbax_refuses_it(saved):
    # A result key taken from the checkpoint (carried over, renamed, or kept beside a
    # use_fallback rule that does not default to the original) needs restore args: Orbax
    # raises KeyError without them. ckpt_async did not read such a key and returned the
    # item's own value in its place (a silent 0 for a restored array); its error is a
    # KeyError too, so that code catching Orbax's keeps working.
    def total(key, tree, args):
        return tree["b"].sum()

    cases = [  # item, transforms of a library, transforms_default_to_original, keys
        ({"a": {"x": 0, "y": 0}, "b": 0}, lambda lib: {"b": lib.Transform(value_fn=lambda v: v)},
         True, "'a/x', 'a/y', 'b'"),  # (a/x and a/y carried over)
        ({"w": 0, "b": 0}, lambda lib: {"w": lib.Transform(original_key="a/x")}, True,
         "'b', 'w'"),
        ({"b": 0, "step": 0}, lambda lib: {"b": lib.Transform(use_fallback=True)}, False, "'b'"),
        ({"w": 0, "step": 0}, lambda lib: {"w": lib.RestoreTransform(
            multi_value_fn=total, multi_value_fn_input_args={"b": lib.RestoreArgs()})},
         True, "'w'")]
    for item, transforms, to_original, keys in cases:
        with pytest.raises(KeyError, match=f"no restore args for {keys}:") as caught:
            ocp.PyTreeCheckpointer().restore(saved, args=ocp.args.PyTreeRestore(
                item=item, restore_args={"step": ocp.RestoreArgs()}, transforms=transforms(ocp),
                transforms_default_to_original=to_original))
        assert isinstance(caught.value, InvalidArgumentError)
        assert str(caught.value).startswith(f"{saved}: no restore args")  # (not quoted)
        with pytest.raises(KeyError):
            orbax.PyTreeCheckpointer().restore(saved, args=orbax.args.PyTreeRestore(
                item=item, restore_args={"step": orbax.RestoreArgs()},
                transforms=transforms(orbax), transforms_default_to_original=to_original))
    # A key the result takes from the item needs none, in both.
    mine = np.full(4, -1, np.int32)
    item = {"b": mine, "step": 0}
    ours, theirs = both(saved, item, {"step": ocp.RestoreArgs()},
                        {"b": ocp.Transform(use_fallback=True)},
                        {"b": orbax.Transform(use_fallback=True)}, {"step": orbax.RestoreArgs()})
    assert_same(ours, theirs)
    assert ours["b"] is mine and ours["step"] == 3


def test_orbax_s_older_call_style(saved):
    item = {"w": 0, "step": 0}
    out = ocp.PyTreeCheckpointer().restore(saved, item=item, restore_args=np_args(item),
                                           transforms={"w": ocp.Transform(original_key="a/x")})
    assert_bits_equal(out["w"], STATE["a"]["x"])
    assert out["step"] == 3


def test_multi_value_fn_gets_the_checkpoint_s_structure(tmp_path):
    # Orbax hands a multi_value_fn the checkpoint's whole tree, its lists as lists: a
    # function indexing a list of layers works. ckpt_async handed it the keys it read, in
    # dicts keyed '0', '1', ... (tree['layers'][0] a KeyError, iterating them gave strings).
    state = {"layers": [{"k": np.full(2, i, np.int32)} for i in range(3)], "step": 5}
    path = tmp_path / "ckpt"
    orbax.PyTreeCheckpointer().save(path, args=orbax.args.PyTreeSave(state))
    seen = {}

    def total(key, tree, args):
        seen[len(seen)] = tree
        return sum(layer["k"] for layer in tree["layers"]) + tree["layers"][1]["k"]

    ours = both_summed(path, "total", total, r"layers/.*")
    assert_bits_equal(ours["total"], np.full(2, 4, np.int32))
    mine = seen[0]  # (ours ran first) the keys it did not read: placeholders, not read
    assert list(mine) == list(seen[1]) == ["layers", "step"]
    assert type(mine["layers"]) is list and mine["step"] is ocp.PLACEHOLDER
