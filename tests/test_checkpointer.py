"""Checkpointers end to end, through the sync face and the async face (``ckpt_async.aio``)."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _checks import assert_bits_equal, fail_host_copy
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp
import ckpt_async._serialize as ser
import ckpt_async._stage as _stage
import ckpt_async.aio
from ckpt_async.errors import (
    CheckpointNotFoundError,
    ClosedError,
    CommitError,
    CommitTimeoutError,
    ShapeMismatchError,
    StepAlreadyExistsError,
    StructureMismatchError,
    UnsupportedLeafError,
)

Pair = collections.namedtuple("Pair", ["first", "second"])

# dtypes a jax.Array holds without jax_enable_x64, and those TensorStore stores (probed).
JAX_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32,
    np.float16, ml_dtypes.bfloat16, np.float32, np.complex64,
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.float8_e3m4,
    ml_dtypes.float8_e8m0fnu, ml_dtypes.float4_e2m1fn, ml_dtypes.int4, ml_dtypes.int2,
]
# ml_dtypes types that TensorStore has no data type for: rejected before anything is written.
UNSTORABLE_DTYPES = [ml_dtypes.float8_e4m3, ml_dtypes.uint4, ml_dtypes.uint2]
NP_DTYPES = JAX_DTYPES + [np.int64, np.uint64, np.float64, np.complex128]


def sample(dtype, shape=(3, 4)) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt == np.bool_:
        return (np.arange(n) % 3 == 0).reshape(shape)
    if dt.kind in "iu" or dt.name in ("int4", "int2"):
        return (np.arange(n) % 2).astype(dt).reshape(shape)
    return (np.arange(n) / 4).astype(dt).reshape(shape)



def no_tmp_dirs(parent) -> bool:
    return not [n for n in os.listdir(parent) if ".orbax-checkpoint-tmp" in n]



SYNC_FACES = {
    "standard": lambda: ocp.StandardCheckpointer(),
    "checkpointer": lambda: ocp.Checkpointer(ocp.PyTreeCheckpointHandler()),
    "async": lambda: ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler()),
    "pytree": lambda: ocp.PyTreeCheckpointer(),
}


def save_restore(ckptr, path, tree, *, target=None):
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    return ckptr.restore(path) if target is None else ckptr.restore(path, target)


# --- dtypes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("face", sorted(SYNC_FACES))
def test_every_jax_dtype_round_trips(tmp_path, face):
    tree = {np.dtype(d).name: jnp.asarray(sample(d)) for d in JAX_DTYPES}
    for name, x in tree.items():
        assert x.dtype == np.dtype(name), name  # jax holds this dtype as is
    with SYNC_FACES[face]() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    assert set(out) == set(tree)
    for name, x in tree.items():
        assert isinstance(out[name], jax.Array), name
        assert_bits_equal(out[name], x)


def test_every_numpy_dtype_round_trips(tmp_path):
    tree = {np.dtype(d).name: sample(d) for d in NP_DTYPES}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    for name, x in tree.items():
        assert type(out[name]) is np.ndarray, name
        assert_bits_equal(out[name], x)


@pytest.mark.parametrize("dtype", UNSTORABLE_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unstorable_dtype_is_rejected_before_writing(tmp_path, dtype):
    with ocp.StandardCheckpointer() as ckptr:
        with pytest.raises(UnsupportedLeafError, match=np.dtype(dtype).name):
            ckptr.save(tmp_path / "c", {"x": np.zeros(3, dtype)})
    assert os.listdir(tmp_path) == []


def test_zero_dim_and_zero_size_arrays(tmp_path):
    tree = {
        "j0": jnp.asarray(3.5, jnp.float32), "n0": np.array(7, np.int16),
        "jz": jnp.zeros((0, 3), jnp.bfloat16), "nz": np.zeros((2, 0), np.float64),
        "nzz": np.zeros((0,), np.uint8),
    }
    with ocp.StandardCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    for k, x in tree.items():
        assert_bits_equal(out[k], x)
    assert isinstance(out["j0"], jax.Array) and isinstance(out["jz"], jax.Array)
    assert type(out["n0"]) is np.ndarray and type(out["nz"]) is np.ndarray


@pytest.mark.parametrize("tree", [
    {"jz": jnp.zeros((0, 3), jnp.float32), "nz": np.zeros((0,), np.int8)},
    # (a full first batch, then a batch of a zero-size array alone: no data file to write)
    {"a": np.arange(_stage.BATCH_BYTES // 4, dtype=np.float32), "b": np.zeros((0, 2), np.int8)},
], ids=["only_zero_size", "last_batch_zero_size"])
def test_batches_of_zero_size_arrays_alone_commit(tmp_path, tree):
    # Such a batch has nothing for a data file; the save used to wait for its copy forever.
    out: list = []

    def run() -> None:
        with ocp.StandardCheckpointer() as ckptr:
            out.append(save_restore(ckptr, tmp_path / "c", tree))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the save never committed"
    for k, x in tree.items():
        assert_bits_equal(out[0][k], x)


@pytest.mark.parametrize("shape", [(6, 2), (3, 5), (4, 3)], ids=["taller", "cut_pad", "same"])
def test_array_restore_args_global_shape(tmp_path, mesh, shape):
    # Orbax's semantics: strict (the default) refuses another shape than the stored one;
    # strict=False cuts or pads with zeros, dimension by dimension; `shape` is an alias.
    stored = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"a": stored, "b": jnp.asarray(stored)})
        expected = np.zeros(shape, np.float32)
        common = tuple(slice(0, min(x, y)) for x, y in zip(shape, stored.shape))
        expected[common] = stored[common]
        sharding = NamedSharding(mesh, PartitionSpec())
        for alias in ("global_shape", "shape"):
            def restore(strict, alias=alias):
                return ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                    restore_args={k: ocp.ArrayRestoreArgs(sharding=sharding, strict=strict,
                                                          **{alias: shape}) for k in "ab"}))
            if shape != stored.shape:
                with pytest.raises(ocp.errors.ShapeMismatchError, match="strict=False"):
                    restore(True)
            else:
                assert_bits_equal(restore(True)["a"], stored)
            out = restore(False)
            for k in "ab":
                assert isinstance(out[k], jax.Array) and out[k].sharding == sharding
                assert_bits_equal(out[k], expected)
        with pytest.raises(ocp.errors.ShapeMismatchError, match="asks for"):  # another rank
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(restore_args={
                "a": ocp.ArrayRestoreArgs(global_shape=(12,), strict=False),
                "b": ocp.ArrayRestoreArgs()}))
    with pytest.raises(ValueError, match="differ"):
        ocp.ArrayRestoreArgs(shape=(1,), global_shape=(2,))


def test_restore_type_python_scalar(tmp_path):
    # As Orbax: restore_type=int / float makes a Python scalar of the stored value.
    tree = {"i": np.int64(7), "f": np.float32(1.5), "b": jnp.bfloat16(2.5), "p": 3.5,
            "zero_d": np.array(4, np.int32)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        for kind, expected in ((int, {"i": 7, "f": 1, "b": 2, "p": 3, "zero_d": 4}),
                               (float, {"i": 7.0, "f": 1.5, "b": 2.5, "p": 3.5, "zero_d": 4.0})):
            out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                tree, restore_args={k: ocp.RestoreArgs(restore_type=kind) for k in tree}))
            assert out == expected and all(type(v) is kind for v in out.values())
        ckptr.save(tmp_path / "v", {"v": np.arange(3), "one": np.array([4], np.int32)})
        for key in ("v", "one"):  # (a shape-(1,) array is no scalar either, as in Orbax)
            with pytest.raises(ocp.errors.InvalidArgumentError, match="asks for a scalar"):
                ckptr.restore(tmp_path / "v", args=ocp.args.PyTreeRestore(
                    {key: 0}, restore_args={key: ocp.RestoreArgs(restore_type=int)},
                    partial_restore=True))


def test_special_float_values_are_bit_exact(tmp_path):
    vals = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -np.nan]
    tree = {
        "f32": np.array(vals, np.float32), "f64": np.array(vals, np.float64),
        "f16": jnp.asarray(np.array(vals, np.float16)),
        "bf16": jnp.asarray(np.array(vals, ml_dtypes.bfloat16)),
        "c64": np.array([complex(np.nan, -0.0), complex(-np.inf, np.inf)], np.complex64),
        "payload": np.array([0x7FC00001, 0xFFC12345], np.uint32).view(np.float32),
    }
    with ocp.StandardCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    for k, x in tree.items():
        assert_bits_equal(out[k], x)
    assert np.signbit(np.asarray(out["f32"])[3])


# --- sharding -----------------------------------------------------------------------------------
def test_saved_on_devices_this_process_lacks_restores_to_the_default_device(
        tmp_path, mesh, caplog, monkeypatch):
    # (as from a larger topology: no sharding of this process matches what was saved) Said
    # once, not silently; the values are the same (Orbax refuses it without a target).
    tree = {k: jax.device_put(np.arange(8, dtype=np.float32) + i,
                              NamedSharding(mesh, PartitionSpec(("x", "y"))))
            for i, k in enumerate("ab")}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
    monkeypatch.setattr(ser, "sharding_from_json", lambda text: None)
    with caplog.at_level("WARNING", logger="ckpt_async"), ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "c", args=ocp.args.StandardRestore())
    for k, v in tree.items():
        assert out[k].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
        assert_bits_equal(out[k], v)
    said = [r.getMessage() for r in caplog.records if "does not have" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "c") in said[0], said


@pytest.mark.parametrize("spec", [PartitionSpec("x", "y"), PartitionSpec(None, "y"),
                                  PartitionSpec(("x", "y")), PartitionSpec()])
def test_sharded_arrays_restore_with_their_sharding(tmp_path, mesh, spec):
    sharding = NamedSharding(mesh, spec)
    x = jax.device_put(np.arange(8 * 6, dtype=np.float32).reshape(8, 6), sharding)
    b = jax.device_put(sample(ml_dtypes.bfloat16, (8, 6)), sharding)
    with ocp.StandardCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", {"x": x, "b": b})
    for k, v in (("x", x), ("b", b)):
        assert_bits_equal(out[k], v)
        assert out[k].sharding == sharding
        for s_out, s_in in zip(out[k].addressable_shards, v.addressable_shards):
            assert s_out.device == s_in.device
            assert_bits_equal(s_out.data, s_in.data)


@pytest.mark.parametrize("how", ["RestoreArgs()", "RestoreArgs(dtype)", "ArrayRestoreArgs()",
                                 "ArrayRestoreArgs(global_shape)", "its metadata as target"])
def test_a_restore_naming_no_sharding_places_arrays_as_they_were_saved(tmp_path, mesh, how):
    # As Orbax places them, from the checkpoint's _sharding (they went to the default device)
    tree = {"w": jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4),
                                NamedSharding(mesh, PartitionSpec("x", "y"))),
            "k": jax.device_put(np.arange(4, dtype=np.float32), jax.devices()[2])}
    args = {"RestoreArgs()": lambda _: ocp.RestoreArgs(),
            "RestoreArgs(dtype)": lambda _: ocp.RestoreArgs(dtype=np.float16),
            "ArrayRestoreArgs()": lambda _: ocp.ArrayRestoreArgs(),
            "ArrayRestoreArgs(global_shape)": lambda x: ocp.ArrayRestoreArgs(
                global_shape=(x.shape[0] + 2, *x.shape[1:]), strict=False)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        if how == "its metadata as target":
            out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                ckptr.metadata(tmp_path / "c").item_metadata.tree))
        else:
            out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                tree, restore_args=jax.tree.map(args[how], tree)))
    for key, value in tree.items():
        assert out[key].sharding == value.sharding, key
        n = value.shape[0]
        assert_bits_equal(np.asarray(out[key])[:n].astype(np.float32), np.asarray(value))


def test_restore_into_shape_dtype_struct_places_and_casts(tmp_path, mesh):
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    target_sharding = NamedSharding(mesh, PartitionSpec("y", "x"))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"x": jnp.asarray(x), "n": x})
        ckptr.wait_until_finished()
        out = ckptr.restore(tmp_path / "c", {
            "x": jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=target_sharding),
            "n": jax.ShapeDtypeStruct((8, 4), jnp.float16, sharding=target_sharding),
        })
    for k in ("x", "n"):
        assert isinstance(out[k], jax.Array)
        assert out[k].dtype == jnp.bfloat16 if k == "x" else out[k].dtype == jnp.float16
        assert out[k].sharding == target_sharding
        np.testing.assert_array_equal(np.asarray(out[k]), x.astype(out[k].dtype))


def test_restore_into_concrete_and_numpy_targets(tmp_path, mesh):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    sharding = NamedSharding(mesh, PartitionSpec(None, "x"))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"a": jnp.asarray(x), "b": x, "s": 3})
        ckptr.wait_until_finished()
        out = ckptr.restore(tmp_path / "c", {
            "a": np.zeros((3, 4), np.int16),
            "b": jax.device_put(np.zeros((3, 4), np.float32), sharding),
            "s": 0,
        })
    assert type(out["a"]) is np.ndarray and out["a"].dtype == np.int16
    np.testing.assert_array_equal(out["a"], x.astype(np.int16))
    assert isinstance(out["b"], jax.Array) and out["b"].dtype == np.float32
    assert out["b"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["b"]), x.astype(np.float32))
    assert type(out["s"]) is int and out["s"] == 3


# --- leaf kinds and containers ------------------------------------------------------------------
def test_scalars_keep_their_types(tmp_path):
    tree = {
        "i": 7, "big": 2**62 + 1, "neg": -3, "f": 0.1, "b": True, "bf": False,
        "np_i8": np.int8(-5), "np_u64": np.uint64(2**64 - 1), "np_f32": np.float32(1.5),
        "np_f16": np.float16(-0.0), "np_bool": np.bool_(True),
        "np_bf16": ml_dtypes.bfloat16(2.5), "np_c64": np.complex64(1 - 2j),
    }
    with ocp.StandardCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    for k, v in tree.items():
        assert type(out[k]) is type(v), k
        if isinstance(v, np.generic):
            assert out[k].dtype == v.dtype, k
            assert_bits_equal(np.asarray(out[k]), np.asarray(v))
        else:
            assert out[k] == v, k


def test_strings_round_trip(tmp_path):
    tree = {"s": "hello", "u": "ünïcødé ✓", "e": "", "n": {"t": "x" * 10_000}}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    assert out == tree


def test_containers_keep_their_types(tmp_path):
    x = np.arange(3, dtype=np.float32)
    tree = {
        0: x, 5: {"a": x + 1, 2: x + 2},
        "l": [x, [x * 2]], "t": (x, (1, 2.0)), "p": Pair(first=x, second=Pair(3, None)),
        "none": None, "empty_d": {}, "empty_l": [], "empty_t": (),
    }
    with ocp.StandardCheckpointer() as ckptr:
        out = save_restore(ckptr, tmp_path / "c", tree)
    assert set(out) == {0, 5, "l", "t", "p", "none", "empty_d", "empty_l", "empty_t"}
    assert 2 in out[5] and "2" not in out[5]
    assert type(out["l"]) is list and type(out["l"][1]) is list
    assert type(out["t"]) is tuple and type(out["t"][1]) is tuple
    assert out["t"][1] == (1, 2.0) and type(out["t"][1][0]) is int
    assert type(out["p"]) is Pair and type(out["p"].second) is Pair
    assert out["p"].second == Pair(3, None)
    assert out["none"] is None
    assert out["empty_d"] == {} and type(out["empty_d"]) is dict
    assert out["empty_l"] == [] and type(out["empty_l"]) is list
    assert out["empty_t"] == () and type(out["empty_t"]) is tuple
    np.testing.assert_array_equal(out[5][2], x + 2)
    np.testing.assert_array_equal(out["p"].first, x)


def test_restore_into_target_with_int_and_str_keys(tmp_path):
    tree = {0: np.arange(3), "a": np.ones(2, np.float16)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        ckptr.wait_until_finished()
        out = ckptr.restore(tmp_path / "c", {0: np.zeros(3, np.int64), "a": np.zeros(2, np.float16)})
    assert set(out) == {0, "a"}
    np.testing.assert_array_equal(out[0], tree[0])
    assert out["a"].dtype == np.float16


# --- errors -------------------------------------------------------------------------------------
def test_strict_restore_names_missing_and_unexpected_keys(tmp_path):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"a": np.zeros(2), "b": {"c": np.ones(3)}})
        ckptr.wait_until_finished()
        with pytest.raises(StructureMismatchError) as ei:
            ckptr.restore(tmp_path / "c", ocp.args.StandardRestore(
                {"a": np.zeros(2), "z": np.zeros(1)}, strict=True))
    msg = str(ei.value)
    assert "missing from the target: b.c" in msg or "('b', 'c')" in msg
    assert "z" in msg.split("not in the checkpoint")[1]


def test_wrong_shape_names_the_key(tmp_path):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"layer": {"w": np.zeros((2, 3))}})
        ckptr.wait_until_finished()
        with pytest.raises(ShapeMismatchError, match="layer.w"):
            ckptr.restore(tmp_path / "c", {"layer": {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}})


def test_scalar_target_for_an_array_is_a_shape_mismatch(tmp_path):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"v": np.zeros(3)})
        ckptr.wait_until_finished()
        with pytest.raises(ShapeMismatchError, match="'v'"):
            ckptr.restore(tmp_path / "c", {"v": 0.0})


def test_save_args_cast_before_writing(tmp_path):
    tree = {"n": np.linspace(0, 1, 5, dtype=np.float32), "j": jnp.arange(4, dtype=jnp.float32)}
    save_args = {"n": ocp.SaveArgs(dtype=ml_dtypes.bfloat16), "j": ocp.SaveArgs(dtype=np.float16)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree, save_args=save_args))
        out = ckptr.restore(tmp_path / "c")
        meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert_bits_equal(out["n"], tree["n"].astype(ml_dtypes.bfloat16))
    assert_bits_equal(out["j"], np.asarray(tree["j"]).astype(np.float16))
    assert meta["n"].dtype == ml_dtypes.bfloat16 and meta["j"].dtype == np.float16


def test_save_args_that_name_no_leaf_are_refused(tmp_path):
    # A SaveArgs where the tree has a subtree, or under a key it lacks, was dropped without a
    # word (a cast asked for a whole layer saved it in its own dtype); Orbax refuses both
    # (ValueError). Leaves the save args leave out are saved with the default SaveArgs.
    tree = {"w": np.linspace(0, 1, 4), "layer": {"k": np.ones(3), "b": np.zeros(2)}}
    half = ocp.SaveArgs(dtype=np.float16)
    cases = {"subtree": ({"w": half, "layer": half}, r"at 'layer' \(a subtree"),
             "whole": (half, r"at the whole tree \(a subtree"),
             "lacking": ({"w": half, "layr": {"k": half}}, r"at 'layr\.k' \(not in the item"),
             "list": ({"layer": [half, half]}, r"at 'layer\.0', 'layer\.1' \(not in the item")}
    with ocp.PyTreeCheckpointer() as ckptr:
        for name, (save_args, message) in cases.items():
            with pytest.raises(StructureMismatchError, match=message):
                ckptr.save(tmp_path / name, args=ocp.args.PyTreeSave(tree, save_args=save_args))
            assert not (tmp_path / name).exists()
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree, save_args={"w": half}))
        out = ckptr.restore(tmp_path / "c")
    assert_bits_equal(out["w"], tree["w"].astype(np.float16))
    assert_bits_equal(out["layer"]["k"], tree["layer"]["k"])


def test_restore_args_that_name_no_leaf_of_the_item_are_refused(tmp_path):
    # Restore args are taken leaf by leaf of the item: one standing for a subtree of it, or
    # under a key it lacks, was dropped without a word (its dtype or sharding not applied).
    # Orbax refuses both (ValueError); a partial restore ignores args of keys outside the
    # item and refuses one for a subtree (TypeError), as Orbax's does.
    tree = {"w": np.arange(4.0), "layer": {"k": np.ones(3), "b": np.zeros(2)}}
    half = ocp.RestoreArgs(dtype=np.float16)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)

        def restore(item, restore_args, **kw):
            return ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                item, restore_args=restore_args, **kw))

        with pytest.raises(StructureMismatchError, match=r"at 'layer' \(a subtree"):
            restore(tree, {"w": half, "layer": half})
        with pytest.raises(StructureMismatchError, match=r"at 'layr\.k' \(not in the item"):
            restore(tree, {"w": half, "layr": {"k": half}})
        for kw in ({"partial_restore": True}, {"transforms": {}}):
            with pytest.raises(TypeError, match=r"at 'layer' \(a subtree"):
                restore({"layer": {"k": 0}}, {"layer": half}, **kw)
            out = restore({"w": 0}, {"w": half, "layer": {"k": half, "b": half}}, **kw)
            assert set(out) == {"w"}
            assert_bits_equal(out["w"], tree["w"].astype(np.float16))
        out = restore(tree, {"layer": {"k": half}})  # (the others: the default RestoreArgs)
    assert_bits_equal(out["layer"]["k"], tree["layer"]["k"].astype(np.float16))
    assert_bits_equal(out["w"], tree["w"])


def test_partial_restore_restores_a_subset(tmp_path):
    tree = {"a": np.arange(4), "b": {"c": np.ones(3, np.float16), "d": 5}, "s": "x"}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
            item={"b": {"c": np.zeros(3, np.float16)}}, partial_restore=True))
    assert set(out) == {"b"} and set(out["b"]) == {"c"}
    assert_bits_equal(out["b"]["c"], tree["b"]["c"])


@pytest.mark.parametrize("face", ["pytree", "standard"])
def test_partial_restore_keeps_the_targets_values_for_keys_not_saved(tmp_path, face):
    # As in Orbax: a model that grew a parameter restores the old ones and keeps the new
    # one's initial value (it was a StructureMismatchError).
    saved = {"w": jnp.arange(4, dtype=jnp.float32), "n": np.ones(2, np.int8)}
    new = jnp.full((3,), 7.0, jnp.float32)
    target = {"w": jnp.zeros(4, jnp.float32), "new": new}
    if face == "pytree":
        ckptr, args = ocp.PyTreeCheckpointer(), ocp.args.PyTreeRestore(target, partial_restore=True)
    else:
        ckptr, args = ocp.StandardCheckpointer(), ocp.args.StandardRestore(target, strict=False)
    with ckptr:
        ckptr.save(tmp_path / "c", saved)
        out = ckptr.restore(tmp_path / "c", args=args)
        assert set(out) == {"w", "new"} and out["new"] is new
        assert_bits_equal(out["w"], saved["w"])
        with pytest.raises(StructureMismatchError, match=r"not in the checkpoint: \('new',\)"):
            ckptr.restore(tmp_path / "c", args=type(args)(target))  # (not partial)


class _Opaque:
    pass


@pytest.mark.parametrize(
    "leaf",
    [_Opaque(), lambda: 1, np.array([1, "a"], dtype=object), np.array(["ab"]), {1, 2}, 2**64,
     np.zeros(2, [("a", np.int32)])],
    ids=["object", "lambda", "object-array", "str-array", "set", "int-overflow", "structured"])
@pytest.mark.parametrize("face", ["standard", "pytree"])
def test_unsupported_leaf_raises_and_writes_nothing(tmp_path, leaf, face):
    with SYNC_FACES[face]() as ckptr:
        with pytest.raises(UnsupportedLeafError):
            ckptr.save(tmp_path / "c", {"ok": np.zeros(2), "bad": leaf})
        ckptr.wait_until_finished()
    assert os.listdir(tmp_path) == []


def test_existing_path_raises_unless_forced(tmp_path):
    path = tmp_path / "c"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"a": np.zeros(2), "old": np.ones(1)})
        ckptr.wait_until_finished()
        with pytest.raises(StepAlreadyExistsError):
            ckptr.save(path, {"a": np.ones(2)})
        ckptr.save(path, {"a": np.full(2, 7.0)}, force=True)
        ckptr.wait_until_finished()
        out = ckptr.restore(path)
    assert set(out) == {"a"}
    np.testing.assert_array_equal(out["a"], np.full(2, 7.0))
    assert sorted(os.listdir(tmp_path)) == ["c"]


# --- snapshot and background failures --------------------------------------------------------
def test_save_snapshots_values_before_returning(tmp_path):
    n = np.arange(1 << 16, dtype=np.float32)
    j = jnp.arange(1 << 16, dtype=jnp.int32) * 3
    expected_n, expected_j = n.copy(), np.asarray(j).copy()
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"n": n, "j": j}))
        n[:] = -1.0
        j.delete()
        ckptr.wait_until_finished()
        out = ckptr.restore(tmp_path / "c")
    assert_bits_equal(out["n"], expected_n)
    assert_bits_equal(out["j"], expected_j)


def test_background_write_failure_raises_commit_error_and_leaves_nothing(tmp_path, monkeypatch):
    async def failing_write(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ser.ItemWriter, "write", failing_write)
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"a": np.zeros(4)}))
        with pytest.raises(CommitError) as ei:
            ckptr.wait_until_finished()
        assert isinstance(ei.value.__cause__, OSError)
        monkeypatch.undo()
        ckptr.save(tmp_path / "d", args=ocp.args.StandardSave({"a": np.ones(4)}))
        ckptr.wait_until_finished()
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_metadata_reports_shapes_and_dtypes(tmp_path, mesh):
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    tree = {"w": jax.device_put(np.zeros((4, 6), ml_dtypes.bfloat16), sharding),
            "n": np.zeros((2, 0), np.int8), "s": 3}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        ckptr.wait_until_finished()
        meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert meta["w"].shape == (4, 6) and meta["w"].dtype == ml_dtypes.bfloat16
    assert meta["w"].storage.write_shape == (2, 6)
    assert meta["w"].sharding.partition_spec == ("x",)
    assert meta["n"].shape == (2, 0) and meta["n"].dtype == np.int8
    assert meta["s"].shape == () and meta["s"].dtype == np.int64


def test_metadata_does_not_read_array_data(tmp_path, monkeypatch):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"a": np.zeros((5, 2), np.float16)})
        ckptr.wait_until_finished()

        async def no_read(*_a, **_k):
            raise AssertionError("metadata() read array data")

        monkeypatch.setattr(ser, "read_array", no_read)
        meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert meta["a"].shape == (5, 2) and meta["a"].dtype == np.float16


def _count_opens(monkeypatch) -> list:
    """Records the arguments of each TensorStore open (``ts.open``) from here on."""
    import tensorstore as ts

    opened: list = []
    real = ts.open

    def counted(*args, **kwargs):
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ts, "open", counted)
    return opened


def _metadata_by_opening(monkeypatch, path):
    """metadata() of item ``path`` with each array opened by TensorStore (the index's
    ``.zarray`` documents left unread), and the number of TensorStore opens it took."""
    with monkeypatch.context() as m:
        async def nothing(self, names):
            return {}

        m.setattr(ser.ItemReader, "layouts", nothing)
        opened = _count_opens(m)
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.metadata(path).item_metadata.tree, len(opened)


@pytest.mark.parametrize("writer", ["raw", "compressed", "orbax", "orbax_zarr3"])
def test_metadata_from_the_index_is_what_opening_each_array_gives(tmp_path, monkeypatch, mesh,
                                                                    writer):
    """Shapes, dtypes and chunks read from the ``.zarray`` documents of the database's index
    equal those TensorStore gives opening each array; zarr3 (no ``.zarray``) opens them."""
    import orbax.checkpoint as orbax

    sharding = NamedSharding(mesh, PartitionSpec("x"))
    tree = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3),
            "bf16": np.ones((3, 2), ml_dtypes.bfloat16),
            "f8": np.ones(4, ml_dtypes.float8_e4m3fn), "f16": np.ones(2, np.float16),
            "b": np.array([True, False]), "c64": np.ones(2, np.complex64),
            "u8": np.arange(3, dtype=np.uint8), "np_scalar": np.float64(2.5), "int": 3, "float": 1.5,
            "sharded": jax.device_put(np.arange(16, dtype=np.int32).reshape(8, 2), sharding),
            "large": np.arange(100_000, dtype=np.int64),  # (written by the zarr driver)
            "nested": {"s": "text", "e": {}, "x": np.zeros((2, 2, 2), np.uint16)}}
    if writer in ("raw", "compressed"):  # (Orbax's save refuses these)
        tree["i4"] = np.arange(-4, 4, dtype=ml_dtypes.int4)
        tree["empty"] = np.zeros((0, 3), np.int16)
        handler = ocp.PyTreeCheckpointHandler(use_compression=writer == "compressed")
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
    else:
        handler = orbax.PyTreeCheckpointHandler(use_zarr3=writer == "orbax_zarr3")
        with orbax.Checkpointer(handler) as ockptr:
            ockptr.save(tmp_path / "c", args=orbax.args.PyTreeSave(tree))
    arrays = len(jax.tree.leaves(tree)) - 1  # (not the string)
    expected, opens = _metadata_by_opening(monkeypatch, tmp_path / "c")
    assert opens == arrays
    with monkeypatch.context() as m:
        opened = _count_opens(m)
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(tmp_path / "c").item_metadata.tree
    assert len(opened) == (arrays if writer == "orbax_zarr3" else 0)
    assert meta == expected
    flat, expected_flat = jax.tree.leaves(meta), jax.tree.leaves(expected)
    assert [(type(a), a.dtype.str, a.dtype.name) for a in flat if hasattr(a, "dtype")] == \
        [(type(a), a.dtype.str, a.dtype.name) for a in expected_flat if hasattr(a, "dtype")]
    assert meta["int"].shape == () and meta["bf16"].dtype == ml_dtypes.bfloat16
    if "empty" in tree:
        assert meta["empty"].shape == (0, 3) and meta["empty"].storage.chunk_shape == (1, 3)


def test_metadata_of_many_arrays_opens_no_tensorstore_per_array(tmp_path, monkeypatch):
    # (it opened each array with TensorStore: seconds for thousands of arrays)
    tree = {f"p{i:03d}": np.full((i % 7, 3), i, np.float32) for i in range(300)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
    opened = _count_opens(monkeypatch)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert opened == []
    assert {k: (m.shape, m.dtype) for k, m in meta.items()} == {
        k: (v.shape, v.dtype) for k, v in tree.items()}


def test_host_memory_budget_smaller_than_state_round_trips(tmp_path, mesh):
    rng = np.random.default_rng(0)
    tree = {f"p{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(12)}
    tree["sharded"] = jax.device_put(rng.standard_normal((64, 64)).astype(np.float32),
                                     NamedSharding(mesh, PartitionSpec("x", "y")))
    handler = ocp.PyTreeCheckpointHandler(host_memory_budget_bytes=3 * 64 * 64 * 4)
    with ocp.AsyncCheckpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        ckptr.wait_until_finished()
        out = ckptr.restore(tmp_path / "c")
    for k, v in tree.items():
        assert_bits_equal(out[k], v)


def test_a_cancel_that_lands_while_arrays_stage_inline_abandons_the_save(tmp_path, monkeypatch):
    # Host arrays with no memory budget stage on the engine loop itself, which is busy: a
    # cancel made meanwhile (a KeyboardInterrupt in a sync save(), a wait_for's timer) takes
    # effect once staging is done. The save is abandoned then, as one cancelled during
    # threaded staging is: the caller is told it was cancelled, and no step appears.
    stage_sync = _stage.stage_sync

    def cancelled_while_busy(*args, **kwargs):
        out = stage_sync(*args, **kwargs)
        asyncio.current_task().cancel()
        return out

    monkeypatch.setattr(_stage, "stage_sync", cancelled_while_busy)
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        with pytest.raises(asyncio.CancelledError):
            ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"a": np.arange(10)}))
        ckptr.wait_until_finished()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("before", [1, 600], ids=["held_batch", "handed_over_batches"])
def test_failed_staging_gives_the_memory_budget_back(tmp_path, monkeypatch, before):
    # A leaf that cannot be copied to the host fails the save; the bytes reserved for it and
    # for the arrays staged before it (held, or handed over in batches of BATCH_MAX_ARRAYS
    # whose writes are cancelled) come back, so the next save does not wait.
    fail_host_copy(monkeypatch, "x")
    handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=1 << 20)
    tree = {**{f"w{i:03d}": np.ones(16, np.float32) for i in range(before)},
            "x": jnp.arange(3.0)}
    with ocp.Checkpointer(handler) as ckptr:
        with pytest.raises(RuntimeError, match="lost") as err:
            ckptr.save(tmp_path / "a", args=ocp.args.StandardSave(tree))
        assert "leaf 'x'" in " ".join(err.value.__notes__)
        done: list = []
        worker = threading.Thread(target=lambda: done.append(ckptr.save(
            tmp_path / "b", args=ocp.args.StandardSave({"w": np.ones(1 << 18, np.float32)}))),
            daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the next save waited for the budget forever"
        assert handler._budget._used == 0
        assert_bits_equal(ckptr.restore(tmp_path / "b")["w"], np.ones(1 << 18, np.float32))
    assert not (tmp_path / "a").exists()


# --- the async face -----------------------------------------------------------------------------
#: Bounds each await in the async-face tests, so a hang fails the test instead of the run.
AWAIT_LIMIT_S = 3


def settle(futures) -> None:
    """Wakes the engine loop and lets stray commit futures finish, so exit does not hang on them."""
    from ckpt_async._runtime import get_runtime

    get_runtime().loop.call_soon_threadsafe(lambda: None)
    for fut in futures:
        try:
            fut.result(timeout=AWAIT_LIMIT_S)
        except BaseException:  # noqa: BLE001, S110 - only the hang matters here
            pass


def test_async_face_round_trip(tmp_path, mesh):
    sharding = NamedSharding(mesh, PartitionSpec("x", None))
    tree = {"j": jax.device_put(sample(ml_dtypes.bfloat16, (4, 4)), sharding),
            "n": sample(np.uint16), "i": 3, "t": (1.5, Pair(np.float32(2), None))}

    futures = []

    async def main():
        ckptr = ckpt_async.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        fut = await ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(tree))
        futures.append(fut)
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), AWAIT_LIMIT_S)
        assert fut.done() and fut.exception() is None
        assert (tmp_path / "c").is_dir() and no_tmp_dirs(tmp_path)
        out = await ckptr.restore(tmp_path / "c")
        meta = await ckptr.metadata(tmp_path / "c")
        with pytest.raises(StepAlreadyExistsError):
            await ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(tree))
        await ckptr.close()
        return out, meta

    try:
        out, meta = asyncio.run(main())
    finally:
        settle(futures)
    assert_bits_equal(out["j"], tree["j"])
    assert out["j"].sharding == sharding
    assert_bits_equal(out["n"], tree["n"])
    assert type(out["i"]) is int and out["i"] == 3
    assert type(out["t"]) is tuple and type(out["t"][1]) is Pair
    assert type(out["t"][1].first) is np.float32
    assert meta.item_metadata["n"].dtype == np.uint16


def test_async_checkpointer_is_an_async_context_manager(tmp_path):
    # (as the async manager is: leaving the block waits for the commits and closes; until
    # round 40 ``async with`` an AsyncCheckpointer raised TypeError)
    tree = {"a": sample(np.float32)}

    async def main():
        async with ckpt_async.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
            await ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(tree))
        assert (tmp_path / "c").is_dir() and no_tmp_dirs(tmp_path)  # (committed at exit)
        with pytest.raises(ClosedError):
            await ckptr.save(tmp_path / "d", args=ocp.args.StandardSave(tree))

    asyncio.run(main())
    with ocp.StandardCheckpointer() as ckptr:
        assert_bits_equal(ckptr.restore(tmp_path / "c")["a"], tree["a"])


def test_async_face_restore_gathered_with_a_save_there_reads_that_save(tmp_path):
    # The save is called first: the restore (and metadata) there wait for it, as the calls'
    # order says. (Both raised CheckpointNotFoundError: the save had not staged yet.)
    state = {"a": sample(np.float32)}

    async def main():
        ckptr = ckpt_async.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        try:
            return await asyncio.wait_for(asyncio.gather(
                ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(state)),
                ckptr.restore(tmp_path / "c"), ckptr.metadata(str(tmp_path / "c"))),
                AWAIT_LIMIT_S)
        finally:
            await ckptr.close()

    _, out, meta = asyncio.run(main())
    assert_bits_equal(out["a"], state["a"])
    assert meta.item_metadata["a"].dtype == np.float32


def test_async_face_background_failure(tmp_path, monkeypatch):
    async def failing_write(*_a, **_k):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(ser.ItemWriter, "write", failing_write)

    futures = []

    async def main():
        ckptr = ckpt_async.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        fut = await ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"a": np.zeros(3)}))
        futures.append(fut)
        with pytest.raises(CommitError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), AWAIT_LIMIT_S)
        with pytest.raises(CommitError):
            await asyncio.wait_for(ckptr.wait_until_finished(), AWAIT_LIMIT_S)

    try:
        asyncio.run(main())
    finally:
        settle(futures)
    assert os.listdir(tmp_path) == []


def test_a_pytree_restore_refuses_another_handlers_args(tmp_path):
    # Their fields were read as a PyTreeRestore's: a Composite or a JsonRestore restored the
    # whole tree, an ArrayRestore's item was taken for a target. Orbax's handler fails on
    # them too (reading fields they lack).
    from ckpt_async.errors import HandlerError

    tree = {"a": np.arange(3), "b": np.float32(2.0)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(tree))
        ckptr.wait_until_finished()
        for args in (ocp.args.JsonRestore(), ocp.args.ArrayRestore({"a": np.zeros(3)}),
                     ocp.args.Composite(a=ocp.args.StandardRestore())):
            with pytest.raises(HandlerError, match=f"{type(args).__name__} cannot be restored"):
                ckptr.restore(tmp_path / "c", args=args)
        for args in (ocp.args.StandardRestore(), ocp.args.PyTreeRestore(), None):
            assert_bits_equal(ckptr.restore(tmp_path / "c", args=args)["a"], tree["a"])
    with pytest.raises(ValueError, match="JsonRestore cannot be restored"):
        ocp.PyTreeCheckpointHandler().restore(tmp_path / "c", ocp.args.JsonRestore())


def test_checkpointer_calls_as_orbax_makes_them(tmp_path):
    import ckpt_async.errors as errs
    tree = {"a": np.arange(3)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "kw", item=tree)  # (Orbax's legacy keyword)
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "kw")["a"], tree["a"])
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state=tree)
        # A save to where a commit is still in flight waits for it, then finds it there.
        with pytest.raises(errs.StepAlreadyExistsError) as ei:
            ckptr.save(tmp_path / "state", {"a": np.arange(4)})
        assert isinstance(ei.value, ValueError)  # (as Orbax raises there)
        ckptr.save(tmp_path / "state", {"a": np.arange(5)}, force=True)  # (right away)
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "state")["a"], np.arange(5))
    tmp = tmp_path / "7.orbax-checkpoint-tmp-123"
    (tmp_path / "state").rename(tmp)  # (what a save that did not finish leaves)
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(ValueError, match="temporary"):
        ckptr.restore(tmp)


def test_pytree_checkpointer_takes_orbax_constructor_arguments(tmp_path):
    zeros = {"z": np.zeros(1 << 15, np.uint8)}
    sizes = {}
    for compress in (False, True):
        with ocp.PyTreeCheckpointer(0, use_compression=compress) as ckptr:
            ckptr.save(tmp_path / str(compress), zeros)
            np.testing.assert_array_equal(ckptr.restore(tmp_path / str(compress))["z"], zeros["z"])
        sizes[compress] = sum(p.stat().st_size for p in (tmp_path / str(compress)).rglob("*")
                              if p.is_file())
    assert sizes[True] < sizes[False] - 16_000  # (zstd: 32 KiB of zeros to almost nothing)


# Orbax's AsyncOptions.post_finalization_callback: called once a save is written and
# finalized, before the step is committed; raising fails the save, and nothing is committed.
def test_the_post_finalization_callback_runs_before_each_commit(tmp_path):
    seen = []

    def callback():
        seen.append((threading.current_thread() is threading.main_thread(),
                     (tmp_path / "x").exists(),
                     sorted(p.name for p in tmp_path.iterdir())))

    options = ocp.options.AsyncOptions(post_finalization_callback=callback)
    ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(), async_options=options)
    ckptr.save(tmp_path / "x", args=ocp.args.PyTreeSave({"a": np.arange(3)}))
    ckptr.wait_until_finished()
    (on_main, committed, names), = seen
    assert not on_main and not committed and names[0].startswith("x.orbax-checkpoint-tmp")
    np.testing.assert_array_equal(ckptr.restore(tmp_path / "x")["a"], np.arange(3))
    ckptr.close()


def test_a_checkpointer_given_a_managers_step_or_directory_says_what_to_pass(tmp_path):
    # (a common slip: the step's folder, or the run's, where the item's folder is needed)
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for step in (2, 10):
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": np.ones(2)}),
                                                    extra=ocp.args.JsonSave({})))
    with ocp.StandardCheckpointer() as ckptr:
        with pytest.raises(CheckpointNotFoundError) as ei:
            ckptr.restore(tmp_path / "run" / "10")
        assert str(ei.value).startswith(f"{tmp_path}/run/10 holds no pytree checkpoint")
        assert f"holding the items ['state']: restore an item's folder ({tmp_path}/run/10/state)" \
            in str(ei.value)
        with pytest.raises(CheckpointNotFoundError, match=r"/run holds no pytree .*; it is a "
                           r"CheckpointManager's directory \(steps 2, 10\)"):
            ckptr.restore(tmp_path / "run")
        with pytest.raises(CheckpointNotFoundError, match=r"first format is there\)$"):
            ckptr.restore(tmp_path / "run" / "10" / "extra")  # (no hint where none fits)
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "run" / "10" / "state")["a"],
                                      np.ones(2))


def test_a_closed_checkpointer_names_the_path_it_refuses(tmp_path):
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "a", {"a": np.ones(2)})
    ckptr.close()
    ckptr.close()  # (again: nothing to do)
    for call, words in ((lambda: ckptr.save(tmp_path / "b", {"a": np.ones(2)}), "save to"),
                        (lambda: ckptr.restore(tmp_path / "a"), "restore")):
        with pytest.raises(ClosedError) as ei:
            call()
        assert str(ei.value).startswith(f"cannot {words} {tmp_path}/")
        assert "closed" in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_failing_post_finalization_callback_fails_the_save_with_its_error(tmp_path):
    def callback():
        raise RuntimeError("disk quota check failed")

    options = ocp.options.AsyncOptions(post_finalization_callback=callback)
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), async_options=options)
    ckptr.save(tmp_path / "y", args=ocp.args.StandardSave({"a": np.ones(2)}))
    with pytest.raises(RuntimeError, match="disk quota check failed") as info:
        ckptr.wait_until_finished()
    assert "nothing was committed" in "".join(info.value.__notes__)
    assert list(tmp_path.iterdir()) == []  # neither the step nor its temporary directory
    ckptr.close()


def test_managers_call_the_post_finalization_callback_of_their_async_options(tmp_path):
    calls = []
    options = ocp.CheckpointManagerOptions(async_options=ocp.options.AsyncOptions(
        post_finalization_callback=lambda: calls.append(1)))
    with ocp.CheckpointManager(tmp_path / "m", options=options) as mngr:
        for step in range(3):
            mngr.save(step, args=ocp.args.StandardSave({"a": np.full(2, step)}))
        mngr.wait_until_finished()
        assert calls == [1, 1, 1] and mngr.all_steps() == [0, 1, 2]
    sync_only = ocp.CheckpointManagerOptions(enable_async_checkpointing=False,
                                             async_options=options.async_options)
    with pytest.raises(ValueError, match="post_finalization_callback"):
        ocp.CheckpointManager(tmp_path / "s", options=sync_only)


def _held_writes(monkeypatch):
    """Makes every batch write wait for ``release`` (set by the test) before it writes;
    ``writing`` is set once one is waiting."""
    writing, release = threading.Event(), threading.Event()
    real_write = ser.ItemWriter.write

    async def held(self, batch):
        writing.set()
        await asyncio.to_thread(release.wait, 60)
        await real_write(self, batch)

    monkeypatch.setattr(ser.ItemWriter, "write", held)
    return writing, release


@pytest.mark.parametrize("kind", ["pytree", "composite"])
def test_cancel_drops_the_commits_in_flight(tmp_path, monkeypatch, kind):
    # Orbax's AsyncCheckpointer.cancel(): the save in flight is dropped once the writes under
    # way end (nothing it started is left running), never becomes visible, its temporary
    # directory is removed, its future raises CancelledError, and the checkpointer goes on.
    import concurrent.futures

    writing, release = _held_writes(monkeypatch)
    state = {"w": np.arange(64, dtype=np.float32), "b": np.ones(3, np.int8)}
    if kind == "pytree":
        ckptr, args = ocp.StandardCheckpointer(), ocp.args.StandardSave(state)
    else:
        ckptr = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave({"step": 1}))
    ckptr.cancel()  # nothing in flight: nothing happens
    ckptr.save(tmp_path / "a", args=args)
    assert writing.wait(30)
    ckptr.cancel()
    cancelled = ckptr.last_commit
    assert not cancelled.done()  # (its write is still under way: not cut short)
    assert not cancelled.cancel()  # (a running future's own cancel() refuses)
    # The future ends cancelled, as concurrent.futures has it (it raised CancelledError while
    # cancelled() stayed False, exception() returned the error, wait() counted it finished).
    called, waited, callback_ran = [], [], threading.Event()
    cancelled.add_done_callback(lambda f: (called.append(f.cancelled()), callback_ran.set()))
    waiting = threading.Thread(
        target=lambda: waited.append(concurrent.futures.wait([cancelled], timeout=60)))
    waiting.start()
    release.set()
    with pytest.raises(concurrent.futures.CancelledError, match="save of .* was cancelled"):
        cancelled.result(timeout=60)
    waiting.join(60)
    assert callback_ran.wait(60)  # (callbacks run after result() has returned to waiters)
    assert cancelled.cancelled() and cancelled.done() and not cancelled.running()
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.exception()
    assert called == [True] and waited[0].done == {cancelled}
    ckptr.wait_until_finished()  # the cancelled commit is not a failure to report
    ckptr.check_for_errors()
    assert os.listdir(tmp_path) == []  # not committed, its temporary directory removed
    ckptr.save(tmp_path / "a", args=args)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "a")
    restored = restored if kind == "pytree" else restored.state
    for key, value in state.items():
        assert_bits_equal(restored[key], value)
    ckptr.close()


def test_a_save_right_after_cancel_waits_for_the_cancelled_commit(tmp_path, monkeypatch):
    import concurrent.futures

    writing, release = _held_writes(monkeypatch)
    state = {"w": np.arange(16, dtype=np.float32)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "a", args=ocp.args.StandardSave(state))
    assert writing.wait(30)
    ckptr.cancel()
    cancelled = ckptr.last_commit
    release.set()
    # The same path: this save waits for the cancelled commit's clean-up, then saves.
    ckptr.save(tmp_path / "a", args=ocp.args.StandardSave(state))
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result(timeout=60)
    ckptr.wait_until_finished()
    assert os.listdir(tmp_path) == ["a"]
    assert_bits_equal(ckptr.restore(tmp_path / "a")["w"], state["w"])
    ckptr.close()


@pytest.mark.parametrize("force", [True, False])
def test_a_save_to_where_another_is_under_way_waits_for_it(tmp_path, monkeypatch, force):
    # A second save to the same path while the first is still staging: forced, it replaces
    # the first (the path held the first one's data, whichever commit ended last); unforced,
    # save() itself raises (the first one failed at its commit).
    from ckpt_async import _commit

    started, release = threading.Event(), threading.Event()
    real = _commit.create_tmp

    async def create_tmp(final, clear=True, **kw):
        tmp = await real(final, clear, **kw)
        if not started.is_set():
            started.set()
            await asyncio.to_thread(release.wait, 60)
        return tmp

    monkeypatch.setattr(_commit, "create_tmp", create_tmp)
    path = tmp_path / "a"
    first, second = {"w": np.zeros(4, np.float32)}, {"w": np.ones(4, np.float32)}

    async def main():
        ckptr = ckpt_async.aio.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        one = asyncio.create_task(ckptr.save(path, args=ocp.args.StandardSave(first)))
        assert await asyncio.to_thread(started.wait, 60)
        two = asyncio.create_task(ckptr.save(path, args=ocp.args.StandardSave(second),
                                             force=force))
        await asyncio.sleep(0.05)
        assert not two.done() and [n for n in os.listdir(tmp_path) if "tmp" in n]
        release.set()
        await (await one)
        if force:
            await (await two)
        else:
            with pytest.raises(StepAlreadyExistsError):
                await two
        await ckptr.wait_until_finished()
        restored = await ckptr.restore(path)
        await ckptr.close()
        return restored

    assert_bits_equal(asyncio.run(main())["w"], (second if force else first)["w"])
    assert os.listdir(tmp_path) == ["a"]


def test_a_commit_past_its_last_check_commits_despite_cancel(tmp_path, monkeypatch):
    # A cancel that arrives while the commit renames its directory into place is too late:
    # the step is whole and visible, and its future says so.
    from ckpt_async import _commit

    renaming, release = threading.Event(), threading.Event()
    real_commit = _commit.commit

    async def slow_commit(*args, **kwargs):
        renaming.set()
        await asyncio.to_thread(release.wait, 60)
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(_commit, "commit", slow_commit)
    state = {"w": np.arange(16, dtype=np.float32)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "a", args=ocp.args.StandardSave(state))
    assert renaming.wait(30)
    ckptr.cancel()
    release.set()
    assert ckptr.last_commit.result(timeout=60) == tmp_path / "a"
    ckptr.wait_until_finished()
    assert_bits_equal(ckptr.restore(tmp_path / "a")["w"], state["w"])
    ckptr.close()


def test_cancel_of_real_writes_leaves_a_whole_checkpoint_or_nothing(tmp_path):
    # No stand-ins: compressed TensorStore writes and data-file threads are under way when
    # cancel() lands. Whichever way it ends, nothing is left half-written: a dropped commit
    # leaves no directory at all, one past its last check is whole.
    import concurrent.futures

    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal(1 << 20).astype(np.float32) for i in range(8)}
    ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=True))
    ckptr.save(tmp_path / "a", args=ocp.args.PyTreeSave(state))
    ckptr.cancel()
    try:
        ckptr.last_commit.result(timeout=120)
    except concurrent.futures.CancelledError:
        ckptr.wait_until_finished()
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path) == ["a"]
        restored = ckptr.restore(tmp_path / "a")
        for key, value in state.items():
            assert_bits_equal(restored[key], value)
    ckptr.close()


def test_a_commit_that_times_out_leaves_nothing_behind(tmp_path):
    # Its task is cancelled mid-write: the TensorStore writes and threads it started are
    # waited for before its temporary directory goes (they used to recreate it afterwards).
    rng = np.random.default_rng(1)
    state = {f"w{i}": rng.standard_normal(1 << 20).astype(np.float32) for i in range(16)}
    ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=True),
                                  async_options=ocp.AsyncOptions(timeout_secs=0.05))
    ckptr.save(tmp_path / "a", args=ocp.args.PyTreeSave(state))
    try:
        ckptr.wait_until_finished()
    except CommitTimeoutError:
        # (and stays so: stray writes used to recreate the directory a moment later)
        for _ in range(20):
            assert os.listdir(tmp_path) == []
            time.sleep(0.1)
    else:  # (a machine fast enough to commit within the timeout: then it is whole)
        restored = ckptr.restore(tmp_path / "a")
        for key, value in state.items():
            assert_bits_equal(restored[key], value)
    ckptr.close()


def test_a_commit_whose_writes_stall_times_out_on_time(tmp_path, monkeypatch):
    # A store that stops answering (an S3 endpoint answering 503 to every PUT, which
    # TensorStore retries for many minutes): the commit fails with CommitTimeoutError once
    # its timeout and ABORT_GRACE_SECS have passed. (It waited for the stalled writes
    # themselves: still blocked after 10 minutes.)
    from ckpt_async import _checkpointer, _ocdbt

    stalled, release = threading.Event(), threading.Event()
    real = _ocdbt.DatabaseWriter.write

    def stall(self, *args, **kwargs):
        stalled.set()
        release.wait(120)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_ocdbt.DatabaseWriter, "write", stall)
    monkeypatch.setattr(_checkpointer, "ABORT_GRACE_SECS", 0.5)
    ckptr = ocp.StandardCheckpointer(async_options=ocp.AsyncOptions(timeout_secs=0.5))
    try:
        ckptr.save(tmp_path / "a", args=ocp.args.StandardSave({"w": np.arange(1024.0)}))
        started = time.monotonic()
        with pytest.raises(CommitTimeoutError):
            ckptr.wait_until_finished()
        assert stalled.is_set() and time.monotonic() - started < 30
        assert not (tmp_path / "a").exists()
    finally:
        release.set()
        ckptr.close()


def test_a_checkpoint_deleted_while_it_is_read_raises_checkpoint_not_found(tmp_path, monkeypatch):
    # (the manager's form of this says which step: tests/test_manager.py)
    from ckpt_async.handlers import pytree

    path = tmp_path / "ckpt"
    real = pytree.PyTreeCheckpointHandler.read_documents

    async def removed_meanwhile(self, directory):
        documents = await real(self, directory)
        shutil.rmtree(path)
        return documents

    monkeypatch.setattr(pytree.PyTreeCheckpointHandler, "read_documents", removed_meanwhile)
    for read in ("restore", "metadata"):
        with ocp.StandardCheckpointer() as ckptr:
            with ocp.StandardCheckpointer() as writer:
                writer.save(path, args=ocp.args.StandardSave({"a": np.arange(4.0)}))
            with pytest.raises(ocp.errors.CheckpointNotFoundError,
                               match=f"checkpoint {path} was deleted while it was being read"):
                getattr(ckptr, read)(path)


def test_a_checkpoint_replaced_while_it_is_read_raises_checkpoint_replaced(tmp_path,
                                                                           monkeypatch):
    """A forced save of the same path (another one renamed in its place) in the middle of a
    read, after its documents and index were read and before its data: the read meets files
    of both, and says that, not that the checkpoint is damaged."""
    from ckpt_async.handlers import pytree

    path, other = tmp_path / "ckpt", tmp_path / "other"
    rng = np.random.default_rng(0)
    with ocp.StandardCheckpointer() as writer:
        for p in (path, other):
            writer.save(p, args=ocp.args.StandardSave(
                {k: rng.standard_normal(1 << 14) for k in "abcdefgh"}))
    real = pytree._Reader.prefetch

    async def replaced_meanwhile(self, names):
        shutil.rmtree(path)
        os.rename(other, path)
        return await real(self, names)

    monkeypatch.setattr(pytree._Reader, "prefetch", replaced_meanwhile)
    with ocp.StandardCheckpointer() as reader:
        with pytest.raises(ocp.errors.CheckpointReplacedError,
                           match=f"checkpoint {path} was replaced .* while it was being read"):
            reader.restore(path)
        monkeypatch.setattr(pytree._Reader, "prefetch", real)
        assert sorted(reader.restore(path)) == list("abcdefgh")  # (read again: the new one)


def test_check_for_errors_beside_wait_until_finished_taking_the_same_commit(tmp_path):
    # check_for_errors() runs in the caller's thread while wait_until_finished() (on the
    # engine loop) takes finished commits off the same list: a commit it took between the
    # copy of the list and the removal is reported there, not raised here as a ValueError.
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    pending = ckptr.async_checkpointer._pending

    class TakenMeanwhile:
        def done(self):
            pending.remove(self)  # (what wait_until_finished does, in another thread)
            return True

        def exception(self):
            return OSError("disk full")

    pending.append(TakenMeanwhile())
    ckptr.check_for_errors()  # nothing left to report here
    assert pending == []
    ckptr.close()
