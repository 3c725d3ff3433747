"""Checkpoints of Orbax's first format (Orbax 0.2 to 0.4: a msgpack ``checkpoint`` file beside
or instead of ``_METADATA``) read by ckpt_async as the real orbax-checkpoint 0.12.8 reads
them, and ``ocp.msgpack_utils`` / ``ocp.aggregate_handlers`` against Orbax's own.

The checkpoints under ``tests/data/orbax_legacy`` were written by Orbax 0.2.3, 0.3.5 and
0.4.8 themselves (``make_fixtures.py`` there says how).
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import msgspec
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _checks import assert_bits_equal

import ckpt_async as ocp
from ckpt_async.errors import CheckpointNotFoundError, CorruptCheckpointError

DATA = pathlib.Path(__file__).parent / "data" / "orbax_legacy"
VERSIONS = ("0.2.3", "0.3.5", "0.4.8")
#: (version, item) of every standalone pytree checkpoint there
ITEMS = [(v, i) for v in VERSIONS for i in ("mixed", "aggregate_all")] + [("0.4.8", "no_ocdbt")]

#: What every fixture holds (make_fixtures.TREE)
TREE = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                   "b": np.arange(4).astype(ml_dtypes.bfloat16)},
        "step": 7, "lr": 0.5, "name": "run", "small": np.array([1, 2, 3], np.int64),
        "empty": {}, "none": None, "lst": [np.float32(2.5), 3]}


@pytest.fixture
def copy(tmp_path):
    """A fixture copied to a directory of the test's own (a reader must not need to write)."""
    def copy_of(version: str, name: str) -> pathlib.Path:
        dest = tmp_path / f"orbax-{version}" / name
        shutil.copytree(DATA / f"orbax-{version}" / name, dest)
        return dest
    return copy_of


def leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]


def assert_same(actual, expected, *, types=True):
    """Same structure, bit-exact values, and (``types``) the same type for each leaf."""
    a, e = leaves(actual), leaves(expected)
    assert [jax.tree_util.keystr(p) for p, _ in a] == [jax.tree_util.keystr(p) for p, _ in e]
    for (path, x), (_, y) in zip(a, e):
        where = jax.tree_util.keystr(path)
        if y is None or isinstance(y, str):
            assert x == y, where
            continue
        assert_bits_equal(x, y)
        if types:
            assert type(x) is type(y), (where, type(x), type(y))


def expected_as_saved(version: str, item: str):
    """TREE as ckpt_async and Orbax 0.12.8 restore the fixture without a target."""
    tree = jax.tree_util.tree_map(lambda x: x, TREE, is_leaf=lambda x: x is None)
    if version < "0.4":  # (no _METADATA)
        if item == "mixed":  # the leaves TensorStore wrote are of unknown type: NumPy arrays
            tree["step"], tree["lr"] = np.asarray(7), np.asarray(0.5)
            tree["lst"] = [np.asarray(np.float32(2.5)), np.asarray(3)]
        return tree  # (an aggregated leaf is what the msgpack file holds)
    # _METADATA gives each leaf its saved type (an aggregated jax.Array's in ckpt_async only)
    tree["params"]["b"] = jnp.asarray(tree["params"]["b"])
    if item != "aggregate_all":  # (a NumPy scalar TensorStore wrote comes back as Python's)
        tree["lst"][0] = 2.5
    return tree


@pytest.mark.parametrize("version,item", ITEMS)
def test_restore_as_saved_matches_orbax(copy, version, item):
    path = copy(version, item)
    ours = ocp.PyTreeCheckpointer().restore(path)
    theirs = orbax.PyTreeCheckpointer().restore(path)
    expected = expected_as_saved(version, item)
    assert_same(ours, expected)
    aggregated_jax_array = version >= "0.4" and item == "aggregate_all"
    assert_same(theirs, expected, types=not aggregated_jax_array)
    if aggregated_jax_array:  # (the one difference: its _METADATA says jax.Array)
        assert isinstance(ours["params"]["b"], jax.Array)
        assert type(theirs["params"]["b"]) is np.ndarray


@pytest.mark.parametrize("version,item", ITEMS)
def test_restore_args_cast_and_place_as_orbax(copy, version, item):
    path = copy(version, item)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    rargs = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=sharding, dtype=np.float16)
        if np.ndim(x) else ocp.RestoreArgs(), TREE)
    orbax_rargs = jax.tree_util.tree_map(
        lambda x: orbax.ArrayRestoreArgs(sharding=sharding, dtype=np.float16)
        if np.ndim(x) else orbax.RestoreArgs(), TREE)
    ours = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=rargs))
    theirs = orbax.PyTreeCheckpointer().restore(
        path, args=orbax.args.PyTreeRestore(restore_args=orbax_rargs))
    assert_same(ours, theirs)
    for arr in (ours["params"]["w"], ours["params"]["b"], ours["small"]):
        assert isinstance(arr, jax.Array) and arr.dtype == np.float16
        assert arr.sharding == sharding
    np.testing.assert_array_equal(ours["small"], [1, 2, 3])


@pytest.mark.parametrize("version,item", ITEMS)
def test_partial_restore_as_orbax(copy, version, item):
    path = copy(version, item)
    ours = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item={"params": {"w": 0}, "name": ""}, partial_restore=True))
    theirs = orbax.PyTreeCheckpointer().restore(path, args=orbax.args.PyTreeRestore(
        item={"params": {"w": 0}, "name": ""}, partial_restore=True))
    assert_same(ours, theirs)
    assert_same(ours, {"params": {"w": TREE["params"]["w"]}, "name": "run"})


@pytest.mark.parametrize("version,item", ITEMS)
def test_standard_restore_into_a_target(copy, version, item, mesh):
    path = copy(version, item)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    target = jax.tree_util.tree_map(lambda x: x, TREE, is_leaf=lambda x: x is None)
    target["params"] = {"w": jax.ShapeDtypeStruct((3, 4), np.float32),
                        "b": jax.ShapeDtypeStruct((4,), ml_dtypes.bfloat16, sharding=sharding)}
    target["small"] = np.zeros(3, np.int32)  # (cast to the target's dtype)
    out = ocp.StandardCheckpointer().restore(path, target)
    assert isinstance(out["params"]["b"], jax.Array) and out["params"]["b"].sharding == sharding
    assert_bits_equal(out["params"]["b"], TREE["params"]["b"])
    assert_bits_equal(out["params"]["w"], TREE["params"]["w"])
    assert_bits_equal(out["small"], TREE["small"].astype(np.int32))
    assert (out["step"], out["lr"], out["name"], out["none"]) == (7, 0.5, "run", None)


@pytest.mark.parametrize("version,item", ITEMS)
def test_metadata_of_an_old_checkpoint(copy, version, item):
    path = copy(version, item)
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    w, small, name = tree["params"]["w"], tree["small"], tree["name"]
    assert (w.shape, w.dtype, small.shape, small.dtype) == ((3, 4), np.float32, (3,), np.int64)
    assert tree["params"]["b"].dtype == ml_dtypes.bfloat16
    assert isinstance(name, ocp.metadata.StringMetadata)
    assert tree["none"] is None and tree["empty"] == {}
    step = tree["step"]
    assert step.shape == () and step.dtype == np.int64
    # (a leaf TensorStore wrote without _METADATA is of unknown type: an array)
    assert isinstance(step, ocp.metadata.ScalarMetadata) == (version >= "0.4" or item != "mixed")


@pytest.mark.parametrize("version", ["0.3.5", "0.4.8"])
def test_manager_restores_old_steps_as_orbax(copy, version):
    path = copy(version, "manager")
    mngr = ocp.CheckpointManager(path, item_names=("state", "extra"))
    omngr = orbax.CheckpointManager(path, item_names=("state", "extra"))
    assert mngr.all_steps() == omngr.all_steps() == [1, 2]
    for step in (1, 2):
        ours = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(), extra=ocp.args.PyTreeRestore()))
        theirs = omngr.restore(step, args=orbax.args.Composite(
            state=orbax.args.PyTreeRestore(), extra=orbax.args.PyTreeRestore()))
        assert_same(dict(ours), dict(theirs), types=version < "0.4")
        assert ours.extra["note"] == f"step {step}"
        np.testing.assert_array_equal(ours.extra["v"], np.arange(3) + step)
        assert_bits_equal(ours.state["params"]["w"], TREE["params"]["w"] * step)
        assert ours.state["step"] == step
    mngr.close()
    omngr.close()


def test_an_aggregate_file_named_otherwise(copy):
    path = copy("0.4.8", "aggregate_all")
    (path / "checkpoint").rename(path / "tree.msgpack")
    with pytest.raises(CorruptCheckpointError, match="checkpoint is missing"):
        ocp.PyTreeCheckpointer().restore(path)
    handler = ocp.PyTreeCheckpointHandler(aggregate_filename="tree.msgpack")
    out = ocp.Checkpointer(handler).restore(path)
    assert_bits_equal(out["params"]["w"], TREE["params"]["w"])


def test_damaged_or_missing_aggregate_files_name_the_file(copy):
    path = copy("0.3.5", "aggregate_all")
    data = (path / "checkpoint").read_bytes()
    (path / "checkpoint").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint: not a msgpack-encoded tree"):
        ocp.PyTreeCheckpointer().restore(path)
    (path / "checkpoint").unlink()
    with pytest.raises(CheckpointNotFoundError, match="neither _METADATA nor the 'checkpoint'"):
        ocp.PyTreeCheckpointer().restore(path)
    # _METADATA names a leaf as aggregated that the file lacks
    path = copy("0.4.8", "aggregate_all")
    tree = orbax.msgpack_utils.msgpack_restore((path / "checkpoint").read_bytes())
    del tree["params"]["w"]
    (path / "checkpoint").write_bytes(orbax.msgpack_utils.msgpack_serialize(tree))
    with pytest.raises(CorruptCheckpointError, match="the value of leaf 'params.w' is not there"):
        ocp.PyTreeCheckpointer().restore(path)


def test_a_damaged_chunk_of_an_array_in_its_own_folder_names_the_array(copy):
    # (the zarr driver's read of an array of a checkpoint without OCDBT, the chunk cut short)
    path = copy("0.4.8", "no_ocdbt")
    (path / "params.w" / "0.0").write_bytes(b"abc")
    with pytest.raises(CorruptCheckpointError,
                       match=re.escape(f"{path}: array 'params.w' cannot be read (")):
        ocp.PyTreeCheckpointer().restore(path)


def _array_ext(shape, dtype_name, data):
    """An array as the msgpack extension value of Orbax's first format encodes it."""
    return msgspec.msgpack.Ext(1, msgspec.msgpack.encode((shape, dtype_name, data)))


@pytest.mark.parametrize("value, message", [
    (_array_ext((2,), "nonsense", bytes(8)), "data type 'nonsense' not understood"),
    # (NumPy's SyntaxError came out; "m8[Y/0]" killed the process: test_serialize.py)
    (_array_ext((2,), "(1e999,)f4", bytes(8)), r"data type '\(1e999,\)f4' not understood"),
    (msgspec.msgpack.Ext(1, msgspec.msgpack.encode(5)), "cannot unpack"),
    ({"__msgpack_chunked_array__": True, "shape": {"0": 2}}, "'chunks'"),
])
def test_an_aggregate_file_that_does_not_decode_is_corrupt(copy, value, message):
    # (each raised a bare TypeError or KeyError, outside ckpt_async's errors, where a file
    # that is no msgpack at all raised CorruptCheckpointError)
    path = copy("0.3.5", "aggregate_all")
    (path / "checkpoint").write_bytes(msgspec.msgpack.encode({"w": value}))
    with pytest.raises(CorruptCheckpointError,
                       match=f"checkpoint: not a msgpack-encoded tree: {message}"):
        ocp.PyTreeCheckpointer().restore(path)


def test_a_placeholder_naming_another_leaf_is_corrupt(copy):
    path = copy("0.2.3", "mixed")
    tree = orbax.msgpack_utils.msgpack_restore((path / "checkpoint").read_bytes())
    tree["small"] = "PLACEHOLDER://step"
    (path / "checkpoint").write_bytes(orbax.msgpack_utils.msgpack_serialize(tree))
    with pytest.raises(CorruptCheckpointError, match="'small' names the array 'PLACEHOLDER://step'"):
        ocp.PyTreeCheckpointer().restore(path)


def test_verify_checks_an_old_checkpoint(copy):
    for version, item in ITEMS:
        report = ocp.verify(copy(version, item))
        assert report.problems == [] and report.items_checked == 1, (version, item)
        # (those TensorStore wrote: every number in "mixed", the arrays and the NumPy scalar
        # in "no_ocdbt"; the msgpack file holds the others)
        assert report.arrays_checked == {"mixed": 7, "no_ocdbt": 4}.get(item, 0), (version, item)
    report = ocp.verify(copy("0.3.5", "manager") / "2")
    assert report.problems == [] and report.items_checked == 2 and report.arrays_checked == 1


# --- msgpack_utils and aggregate_handlers ---------------------------------------------------
MSGPACK_TREE = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": jnp.arange(4, dtype=jnp.bfloat16),
    "c": 3, "d": 0.5, "e": "s", "f": b"x", "g": None, "h": True, "big": 2**40, "neg": -5,
    "i": [1, np.float32(2.5), (1, 2, np.int8(3))], "j": (), "k": {}, "l": [], "m": 1 + 2j,
    "n": np.complex64(1 + 1j), "o": np.array(3.0), "p": {"q": {"r": np.zeros((0, 3), np.int16)}},
    "f8": np.arange(3).astype(ml_dtypes.float8_e4m3fn), "z": 1, "0": "first",
}


def test_msgpack_bytes_are_orbaxs():
    for tree in (MSGPACK_TREE, [1, (2, 3)], np.arange(3), "x", {"only": {}}):
        data = ocp.msgpack_utils.msgpack_serialize(tree)
        assert data == orbax.msgpack_utils.msgpack_serialize(tree)
        assert_same(ocp.msgpack_utils.msgpack_restore(data),
                    orbax.msgpack_utils.msgpack_restore(data))


def test_msgpack_restore_gives_what_was_saved():
    out = ocp.msgpack_utils.msgpack_restore(ocp.msgpack_utils.msgpack_serialize(MSGPACK_TREE))
    assert out["i"][2] == (1, 2, np.int8(3)) and type(out["i"][2][2]) is np.int8
    assert type(out["b"]) is np.ndarray and out["b"].dtype == ml_dtypes.bfloat16
    assert out["m"] == 1 + 2j and out["n"] == np.complex64(1 + 1j)
    assert out["f"] == b"x" and out["h"] is True and out["big"] == 2**40
    assert_bits_equal(out["f8"], MSGPACK_TREE["f8"])
    assert out["p"]["q"]["r"].shape == (0, 3)


def test_msgpack_chunks_large_arrays_as_orbax(monkeypatch):
    monkeypatch.setattr(ocp.msgpack_utils, "MAX_CHUNK_SIZE", 64)
    monkeypatch.setattr(orbax.msgpack_utils, "MAX_CHUNK_SIZE", 64)
    tree = {"big": np.arange(200, dtype=np.float32).reshape(20, 10), "x": {"y": np.arange(40)},
            "small": np.arange(4, dtype=np.int8)}
    data = ocp.msgpack_utils.msgpack_serialize(tree)
    assert data == orbax.msgpack_utils.msgpack_serialize(tree)
    assert b"__msgpack_chunked_array__" in data
    assert_same(ocp.msgpack_utils.msgpack_restore(data), tree)
    assert_same(orbax.msgpack_utils.msgpack_restore(data), tree)


def test_msgpack_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="objects or fields"):
        ocp.msgpack_utils.msgpack_serialize({"a": np.array([object()])})
    with pytest.raises(ValueError, match="of type set"):
        ocp.msgpack_utils.msgpack_serialize({"a": {1, 2}})
    with pytest.raises(ValueError, match="not a msgpack-encoded tree"):
        ocp.msgpack_utils.msgpack_restore(b"\xc1")
    with pytest.raises(ValueError, match="extension type 9"):
        ocp.msgpack_utils.msgpack_restore(b"\xd4\x09\x00")


def test_msgpack_differences_from_orbax_that_migration_md_names():
    # int keys: written alike by both, restored by ckpt_async only (Orbax: strict_map_key)
    data = orbax.msgpack_utils.msgpack_serialize({1: "a", 2: {3: np.int8(4)}})
    assert data == ocp.msgpack_utils.msgpack_serialize({1: "a", 2: {3: np.int8(4)}})
    assert ocp.msgpack_utils.msgpack_restore(data) == {1: "a", 2: {3: np.int8(4)}}
    with pytest.raises(ValueError, match="strict_map_key"):
        orbax.msgpack_utils.msgpack_restore(data)
    # in_place=True: the same bytes; ckpt_async leaves the tree as it is
    trees = {lib: {"a": jnp.ones(2), "n": {"b": jnp.zeros(1)}} for lib in ("ours", "orbax")}
    assert ocp.msgpack_utils.msgpack_serialize(trees["ours"], in_place=True) == \
        orbax.msgpack_utils.msgpack_serialize(trees["orbax"], in_place=True)
    assert isinstance(trees["ours"]["a"], jax.Array) and isinstance(trees["ours"]["n"]["b"],
                                                                   jax.Array)
    assert type(trees["orbax"]["a"]) is np.ndarray


def test_msgpack_handler_writes_what_orbaxs_reads(tmp_path):
    tree = {"a": np.arange(3), "b": [1, "two"], "c": {}, "d": None}
    handler = ocp.aggregate_handlers.MsgpackHandler()
    asyncio.run(handler.serialize(tmp_path / "checkpoint", tree)).result()
    theirs = orbax.aggregate_handlers.MsgpackHandler().deserialize(tmp_path / "checkpoint")
    assert_same(theirs, tree)
    assert_same(handler.deserialize(tmp_path / "checkpoint"), tree)
    with pytest.raises(FileNotFoundError, match="no such file"):
        handler.deserialize(tmp_path / "missing")
    assert isinstance(handler, ocp.aggregate_handlers.AggregateHandler)


def test_msgpack_handler_finds_a_damaged_file_corrupt_as_the_pytree_handler_does(tmp_path):
    # Damage, naming the file, and the builtin Orbax's handler raises there (ValueError;
    # TypeError for an array of an unknown dtype), so that code catching Orbax's still works.
    # (It raised InvalidArgumentError without the file's name, as bad input.)
    good = ocp.msgpack_utils.msgpack_serialize({"a": np.arange(3)})
    cases = {"cut": (good[:-3], ValueError), "extra": (good + b"\x01", ValueError),
             "dtype": (good.replace(b"int64", b"intxx"), TypeError)}
    for name, (data, builtin) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint").write_bytes(data)
        with pytest.raises(builtin):
            orbax.aggregate_handlers.MsgpackHandler().deserialize(tmp_path / name / "checkpoint")
        errors = []
        for read in (ocp.aggregate_handlers.MsgpackHandler().deserialize,
                     lambda path: ocp.PyTreeCheckpointer().restore(path.parent)):
            with pytest.raises(CorruptCheckpointError,
                               match=re.escape(f"{tmp_path / name / 'checkpoint'}: not a "
                                               "msgpack-encoded tree")) as caught:
                read(tmp_path / name / "checkpoint")
            assert isinstance(caught.value, builtin)
            errors.append(type(caught.value))
        assert errors[0] is errors[1], name


def test_save_args_aggregate_is_ignored_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ocp.type_handlers, "_told_aggregate", False)
    tree = {"a": np.arange(3), "b": 5}
    with caplog.at_level("WARNING", logger="ckpt_async"):
        save_args = {"a": ocp.SaveArgs(aggregate=True), "b": ocp.SaveArgs(aggregate=True)}
    assert sum("aggregate=True) is deprecated" in r.getMessage() for r in caplog.records) == 1
    ocp.PyTreeCheckpointer().save(tmp_path / "c", args=ocp.args.PyTreeSave(tree, save_args))
    assert not (tmp_path / "c" / "checkpoint").exists()  # (no msgpack file is written)
    assert_same(ocp.PyTreeCheckpointer().restore(tmp_path / "c"), tree)
    assert_same(orbax.PyTreeCheckpointer().restore(tmp_path / "c"), tree)


def test_cli_shows_old_checkpoints(copy, capsys, tmp_path):
    import json

    from ckpt_async import cli

    def show(path):
        assert cli.main(["show", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["items"]

    (item,) = show(copy("0.2.3", "mixed"))  # (its arrays in folders of their own)
    assert item["kind"] == "pytree"
    leaves = {r["key"]: r for r in item["leaves"]}
    assert (leaves["params.w"]["shape"], leaves["params.w"]["dtype"]) == ([3, 4], "float32")
    assert leaves["name"]["kind"] == "string"
    items = show(copy("0.3.5", "manager") / "2")
    assert [(i["name"], i["kind"]) for i in items] == [("extra", "pytree"), ("state", "pytree")]
    # A JSON item named "checkpoint" (its one file named after it) stays a JSON item.
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint").write_text('{"a": 1}')
    (item,) = show(tmp_path / "checkpoint")
    assert (item["kind"], item["document"]) == ("json", {"a": 1})


def test_a_msgpack_file_alone_with_values_of_every_kind(tmp_path):
    """Such a file, as Orbax's first format wrote it for a tree all of whose leaves were
    aggregated: bytes and complex numbers come back too, as Orbax gives them."""
    tree = {"b": b"raw", "c": 1 + 2j, "l": [1, 2.5], "n": None, "f": np.float16(0.5),
            "a": np.arange(3, dtype=np.uint8)}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "checkpoint").write_bytes(orbax.msgpack_utils.msgpack_serialize(tree))
    ours = ocp.PyTreeCheckpointer().restore(tmp_path / "c")
    assert_same(ours, orbax.PyTreeCheckpointer().restore(tmp_path / "c"))
    assert_same(ours, tree)
