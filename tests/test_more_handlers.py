"""Orbax's smaller handlers in ckpt_async: ArrayCheckpointHandler, JaxRandomKeyCheckpointHandler,
NumpyRandomKeyCheckpointHandler and ProtoCheckpointHandler (with their ``ocp.args`` and
``ocp.handlers`` args classes), and ``ocp.future`` for handlers written to Orbax's
``async_save`` interface.

Each handler is used as Orbax's users use it: as an item of a CheckpointManager's Composite
(restored with args, and with none, from the type strings in ``_CHECKPOINT_METADATA``), in a
Checkpointer, and on its own. The same checkpoints are read by orbax-checkpoint 0.12.8 and
ckpt_async reads Orbax's, bit-exactly; restore-time casts are compared with Orbax's on the same
files. Real TensorStore on ``tmp_path``; nothing mocked.

Two things ckpt_async does that Orbax 0.12.8 cannot, tested on ckpt_async alone: a typed key
of another implementation than the default (``impl='rbg'``: Orbax fails to save it) comes back
with its implementation, and bit generator states whose integers exceed int64 (PCG64's 128-bit
state: Orbax fails to save it) come back and reproduce the generator's draws.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax  # a test dependency: missing is a failure
import pytest
from _checks import assert_bits_equal
from google.protobuf import duration_pb2, struct_pb2, text_format, timestamp_pb2
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp

LIBS = {"ckpt_async": ocp, "orbax": orbax}

#: The type strings Orbax records in ``_CHECKPOINT_METADATA`` for these items, from Orbax.
_T = {name: getattr(orbax, name).typestr() for name in (
    "ArrayCheckpointHandler", "JaxRandomKeyCheckpointHandler",
    "NumpyRandomKeyCheckpointHandler", "ProtoCheckpointHandler", "StandardCheckpointHandler")}
TYPESTRS = {"state": _T["StandardCheckpointHandler"], "arr": _T["ArrayCheckpointHandler"],
            "npa": _T["ArrayCheckpointHandler"], "scal": _T["ArrayCheckpointHandler"],
            "key": _T["JaxRandomKeyCheckpointHandler"],
            "rawkey": _T["JaxRandomKeyCheckpointHandler"],
            "nplegacy": _T["NumpyRandomKeyCheckpointHandler"],
            "proto": _T["ProtoCheckpointHandler"]}



# --- values and checks --------------------------------------------------------------------------
def kind(x):
    """What a restored value is, as far as a user's code can tell."""
    if isinstance(x, jax.Array):
        return "typed key" if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else "jax"
    if isinstance(x, np.ndarray):
        return "numpy"
    return type(x).__name__


def make_proto() -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    msg.update({"lr": 0.001, "name": "run-7", "layers": [64, 32.5, "relu"],
                "nested": {"ok": True, "none": None}})
    return msg


def legacy_state():
    """A legacy ``RandomState`` tuple with a cached gaussian (all five fields in use)."""
    rs = np.random.RandomState(7)
    rs.standard_normal()  # (draws two, keeps one: has_gauss=1, cached_gaussian set)
    state = rs.get_state()
    assert state[3] == 1
    return state


def legacy_draws(state, n=6):
    rs = np.random.RandomState()
    rs.set_state(state)
    return np.concatenate([rs.standard_normal(n), rs.random_sample(n)])


def make_values() -> dict:
    rng = np.random.default_rng(3)
    f32 = rng.standard_normal((2, 3)).astype(np.float32)
    f32[0, :2] = [np.nan, -0.0]
    return {
        "state": {"w": jnp.asarray(rng.standard_normal((4, 2)).astype(np.float32)),
                  "step": jnp.asarray(3, jnp.int32)},
        "arr": jnp.asarray(f32),
        "npa": np.array([-32768, -1, 0, 7, 32767], dtype=np.int16),
        "scal": 3.5,
        "key": jax.random.key(3),
        "rawkey": jax.random.PRNGKey(5),
        "nplegacy": legacy_state(),
        "proto": make_proto(),
    }


def save_args(lib, values: dict, names=None):
    a = lib.args
    makers = {
        "state": lambda v: a.StandardSave(v),
        "arr": lambda v: a.ArraySave(v),
        "npa": lambda v: a.ArraySave(v),
        "scal": lambda v: a.ArraySave(v),
        "key": lambda v: a.JaxRandomKeySave(v),
        "rawkey": lambda v: a.JaxRandomKeySave(v),
        "nplegacy": lambda v: a.NumpyRandomKeySave(v),
        "proto": lambda v: a.ProtoSave(v),
    }
    names = names or list(values)
    return a.Composite(**{n: makers[n](values[n]) for n in names})


def restore_args(lib, names=None):
    a = lib.args
    makers = {
        "state": a.StandardRestore,
        "arr": a.ArrayRestore,
        "npa": a.ArrayRestore,
        "scal": a.ArrayRestore,
        "key": a.JaxRandomKeyRestore,
        "rawkey": a.JaxRandomKeyRestore,
        "nplegacy": a.NumpyRandomKeyRestore,
        "proto": lambda: a.ProtoRestore(struct_pb2.Struct),
    }
    names = names or list(makers)
    return a.Composite(**{n: makers[n]() for n in names})


def check_legacy(out, state):
    assert isinstance(out, tuple) and len(out) == 5
    assert out[0] == "MT19937"
    assert_bits_equal(out[1], state[1])
    assert int(out[2]) == state[2] and int(out[3]) == state[3]
    assert float(out[4]) == state[4]
    assert_bits_equal(legacy_draws(out), legacy_draws(state))


def check_restored(out, values):
    """Every value of ``values`` that ``out`` restored: kind, dtype and bits."""
    assert set(out) <= set(values)
    if "state" in out:
        assert sorted(out["state"]) == ["step", "w"]
        for k in ("w", "step"):
            assert isinstance(out["state"][k], jax.Array)
            assert_bits_equal(out["state"][k], values["state"][k])
    if "arr" in out:
        assert kind(out["arr"]) == "jax"
        assert_bits_equal(out["arr"], values["arr"])
    if "npa" in out:
        assert kind(out["npa"]) == "numpy"
        assert_bits_equal(out["npa"], values["npa"])
    if "scal" in out:
        assert type(out["scal"]) is float and out["scal"] == 3.5
    if "key" in out:
        assert kind(out["key"]) == "typed key"
        assert str(jax.random.key_impl(out["key"])) == str(jax.random.key_impl(values["key"]))
        assert_bits_equal(jax.random.key_data(out["key"]), jax.random.key_data(values["key"]))
        assert_bits_equal(jax.random.uniform(out["key"], (4,)),
                          jax.random.uniform(values["key"], (4,)))
    if "rawkey" in out:
        assert kind(out["rawkey"]) == "jax"
        assert out["rawkey"].dtype == jnp.uint32
        assert_bits_equal(out["rawkey"], values["rawkey"])
    if "nplegacy" in out:
        check_legacy(out["nplegacy"], values["nplegacy"])
    if "proto" in out:
        assert type(out["proto"]) is struct_pb2.Struct
        assert out["proto"] == values["proto"]


def check_layout(step, values):
    """The files Orbax's handlers write, and read back, in a step written with ``values``."""
    recorded = json.loads((step / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert recorded == {n: TYPESTRS[n] for n in values}
    for name in ("arr", "npa", "scal"):
        assert (step / name / "_METADATA").is_file()
    for name, typed in (("key", True), ("rawkey", False)):
        assert (step / name / "jax_random_key" / "_METADATA").is_file()
        meta = json.loads((step / name / "jax_random_key_metadata" / "metadata").read_text())
        assert meta["typed"] is typed
    assert (step / "nplegacy" / "np_random_key" / "_METADATA").is_file()
    meta = json.loads((step / "nplegacy" / "np_random_key_metadata" / "metadata").read_text())
    assert meta["legacy"] is True
    if "proto" in values:
        text = (step / "proto" / "proto.pbtxt").read_text()
        assert text_format.Parse(text, struct_pb2.Struct()) == values["proto"]


NO_PROTO = ["state", "arr", "npa", "scal", "key", "rawkey", "nplegacy"]


# --- 1. in a CheckpointManager ------------------------------------------------------------------
def test_manager_composite_round_trip_with_and_without_args(tmp_path):
    values = make_values()
    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions()) as mgr:
        mgr.save(1, args=save_args(ocp, values))
        mgr.save(2, args=save_args(ocp, values, NO_PROTO))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2]
        check_restored(mgr.restore(1, args=restore_args(ocp)), values)
    check_layout(tmp_path / "1", values)
    check_layout(tmp_path / "2", {n: values[n] for n in NO_PROTO})

    with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions()) as mgr:
        out = mgr.restore(2)  # (each handler from its type string)
        assert sorted(out) == sorted(NO_PROTO)
        check_restored(out, values)
        out = mgr.restore(1, args=restore_args(ocp, ["arr", "key", "proto"]))
        assert sorted(out) == ["arr", "key", "proto"]
        check_restored(out, values)
    # ProtoRestore has no default: its item, the class, is required (Orbax: a ValueError; here
    # one of ckpt_async's errors, naming the item, as every error it raises).
    with ocp.CheckpointManager(tmp_path) as mgr, pytest.raises(
            ocp.errors.InvalidArgumentError, match=f"^{tmp_path / '1' / 'proto'}: restoring a "
                                                   "protocol buffer needs its message class"):
        mgr.restore(1)


def test_handlers_args_are_also_under_ocp_handlers():
    h = ocp.handlers
    pairs = [(h.ArraySaveArgs, ocp.args.ArraySave), (h.ArrayRestoreArgs, ocp.args.ArrayRestore),
             (h.JaxRandomKeySaveArgs, ocp.args.JaxRandomKeySave),
             (h.JaxRandomKeyRestoreArgs, ocp.args.JaxRandomKeyRestore),
             (h.NumpyRandomKeySaveArgs, ocp.args.NumpyRandomKeySave),
             (h.NumpyRandomKeyRestoreArgs, ocp.args.NumpyRandomKeyRestore),
             (h.ProtoSaveArgs, ocp.args.ProtoSave), (h.ProtoRestoreArgs, ocp.args.ProtoRestore)]
    for under_handlers, under_args in pairs:
        assert under_handlers is under_args
        assert issubclass(under_args, ocp.args.CheckpointArgs)
    for name in ("ArrayCheckpointHandler", "JaxRandomKeyCheckpointHandler",
                 "NumpyRandomKeyCheckpointHandler", "ProtoCheckpointHandler"):
        assert getattr(h, name) is getattr(ocp, name)
        assert issubclass(getattr(ocp, name), ocp.AsyncCheckpointHandler)
    assert ocp.Future is ocp.future.Future
    # (ocp.ArrayRestoreArgs stays the leaf restore args, as in Orbax, not the item's args)
    assert ocp.ArrayRestoreArgs is ocp.type_handlers.ArrayRestoreArgs
    assert ocp.ArrayRestoreArgs is not ocp.handlers.ArrayRestoreArgs


# --- 2. both ways with orbax-checkpoint ---------------------------------------------------------
def test_orbax_writes_ckpt_async_restores(tmp_path):
    values = make_values()
    with orbax.CheckpointManager(tmp_path) as omgr:
        omgr.save(1, args=save_args(orbax, values))
        omgr.save(2, args=save_args(orbax, values, NO_PROTO))
        omgr.wait_until_finished()
    check_layout(tmp_path / "1", values)  # (and so TYPESTRS are Orbax's)
    with ocp.CheckpointManager(tmp_path) as mgr:
        assert mgr.all_steps() == [1, 2]
        check_restored(mgr.restore(1, args=restore_args(ocp)), values)
    with ocp.CheckpointManager(tmp_path) as mgr:
        out = mgr.restore(2)
        assert sorted(out) == sorted(NO_PROTO)
        check_restored(out, values)


def test_ckpt_async_writes_orbax_restores(tmp_path):
    values = make_values()
    with ocp.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, args=save_args(ocp, values))
        mgr.save(2, args=save_args(ocp, values, NO_PROTO))
        mgr.wait_until_finished()
    with orbax.CheckpointManager(tmp_path) as omgr:
        assert omgr.all_steps() == [1, 2]
        check_restored(omgr.restore(1, args=restore_args(orbax)), values)
    with orbax.CheckpointManager(tmp_path) as omgr:
        out = omgr.restore(2)  # (Orbax's handlers from ckpt_async's type strings)
        assert sorted(out) == sorted(NO_PROTO)
        check_restored(out, values)


# --- 3. handlers on their own, and in a Checkpointer --------------------------------------------
def array_items(mesh):
    return {
        "jax": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4) / 3,
        "sharded": jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4) - 0.5,
                                  NamedSharding(mesh, PartitionSpec("x", "y"))),
        "numpy": np.array([[1, -2], [3, 2**40]], dtype=np.int64),
        "numpy0d": np.array(np.pi, dtype=np.float64),
        "float": 2.0 / 3.0,
        "int": -(2**40),
        "np.float32": np.float32(2.5),
    }


EXPECTED_KIND = {"jax": "jax", "sharded": "jax", "numpy": "numpy", "numpy0d": "numpy",
                 "float": "float", "int": "int", "np.float32": "float"}  # (Orbax's)
#: Where ckpt_async gives another kind on its own checkpoints: a NumPy scalar keeps its type
#: (docs/migration.md, "Trees come back with their types"; Orbax gives a Python float).
OWN_KIND = {**EXPECTED_KIND, "np.float32": "float32"}


def check_array(out, item, name, expected=EXPECTED_KIND):
    assert kind(out) == expected[name], name
    if isinstance(item, jax.Array | np.ndarray):
        assert_bits_equal(out, item)
    else:
        assert out == item
    if name == "sharded":
        assert out.sharding.is_equivalent_to(item.sharding, item.ndim)


@pytest.mark.parametrize("name", list(EXPECTED_KIND))
def test_array_handler_on_its_own(tmp_path, mesh, name):
    item = array_items(mesh)[name]
    d = tmp_path / "x"
    d.mkdir()  # (Orbax's handlers write into an existing directory)
    h = ocp.ArrayCheckpointHandler()
    h.save(d, args=ocp.args.ArraySave(item))
    assert (d / "_METADATA").is_file()
    assert "checkpoint" in (d / "_METADATA").read_text()
    # (Orbax's reading of these very files first: EXPECTED_KIND is what it gives)
    check_array(orbax.ArrayCheckpointHandler().restore(d, args=orbax.args.ArrayRestore()),
                item, name)
    check_array(h.restore(d, args=ocp.args.ArrayRestore()), item, name, OWN_KIND)
    check_array(h.restore(d), item, name, OWN_KIND)


@pytest.mark.parametrize("there", ["empty", "missing"])
def test_array_handler_restore_without_an_item_is_file_not_found_as_in_orbax(tmp_path, there):
    # (it was a CorruptCheckpointError, about TensorStore failing to open 'checkpoint')
    path = tmp_path / there
    if there == "empty":
        path.mkdir()
    with pytest.raises(FileNotFoundError):
        orbax.ArrayCheckpointHandler().restore(path, args=orbax.args.ArrayRestore())
    with pytest.raises(ocp.errors.CheckpointNotFoundError,
                       match=f"^{path} holds no array item"):
        ocp.ArrayCheckpointHandler().restore(path)


@pytest.mark.parametrize("name", ["jax", "sharded", "numpy", "float", "int"])
def test_array_handler_in_a_checkpointer_both_ways(tmp_path, mesh, name):
    item = array_items(mesh)[name]
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "a", args=ocp.args.ArraySave(item))
        check_array(ckptr.restore(tmp_path / "a", args=ocp.args.ArrayRestore()), item, name)
        check_array(ckptr.restore(tmp_path / "a"), item, name)
    with orbax.Checkpointer(orbax.ArrayCheckpointHandler()) as ockptr:
        check_array(ockptr.restore(tmp_path / "a", args=orbax.args.ArrayRestore()), item, name)
        ockptr.save(tmp_path / "o", args=orbax.args.ArraySave(item))
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler()) as ckptr:
        check_array(ckptr.restore(tmp_path / "o", args=ocp.args.ArrayRestore()), item, name)


def test_array_handler_checkpoint_name(tmp_path):
    item = np.arange(6, dtype=np.uint8).reshape(2, 3)
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler("named")) as ckptr:
        ckptr.save(tmp_path / "a", args=ocp.handlers.ArraySaveArgs(item))
        assert_bits_equal(ckptr.restore(tmp_path / "a"), item)
    tree = json.loads((tmp_path / "a" / "_METADATA").read_text())["tree_metadata"]
    assert [k for k in tree if "named" in k] and not [k for k in tree if "checkpoint" in k]
    with orbax.Checkpointer(orbax.ArrayCheckpointHandler("named")) as ockptr:
        assert_bits_equal(ockptr.restore(tmp_path / "a"), item)


def test_array_handler_metadata_is_the_values_shape_and_dtype(tmp_path):
    # A documented superset: Orbax's ArrayCheckpointHandler.metadata gives None (a manager's
    # item_metadata of such an item too); ckpt_async's gives the value's metadata, unread.
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "a", args=ocp.args.ArraySave(np.zeros((2, 3), np.float16)))
        ckptr.save(tmp_path / "s", args=ocp.args.ArraySave(7))
    meta = ocp.ArrayCheckpointHandler().metadata(tmp_path / "a")
    assert type(meta) is ocp.metadata.ArrayMetadata
    assert (meta.shape, meta.dtype) == ((2, 3), np.float16)
    meta = ocp.ArrayCheckpointHandler().metadata(tmp_path / "s")
    assert type(meta) is ocp.metadata.ScalarMetadata and meta.shape == ()
    assert orbax.ArrayCheckpointHandler().metadata(tmp_path / "a") is None


JAX_KEYS = {
    "typed": lambda: jax.random.key(3),
    "raw": lambda: jax.random.PRNGKey(5),
    "raw rbg": lambda: jax.random.PRNGKey(5, impl="rbg"),
    "typed batch": lambda: jax.random.split(jax.random.key(11), 3),
}


def check_key(out, key):
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert kind(out) == ("typed key" if typed else "jax")
    if typed:
        assert str(jax.random.key_impl(out)) == str(jax.random.key_impl(key))
        assert_bits_equal(jax.random.key_data(out), jax.random.key_data(key))
    else:
        assert_bits_equal(out, key)


@pytest.mark.parametrize("name", list(JAX_KEYS))
def test_jax_random_key_handler_in_a_checkpointer_both_ways(tmp_path, name):
    key = JAX_KEYS[name]()
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    with ocp.Checkpointer(ocp.JaxRandomKeyCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "k", args=ocp.args.JaxRandomKeySave(key))
        check_key(ckptr.restore(tmp_path / "k", args=ocp.args.JaxRandomKeyRestore()), key)
        check_key(ckptr.restore(tmp_path / "k"), key)
    assert (tmp_path / "k" / "jax_random_key" / "_METADATA").is_file()
    meta = json.loads((tmp_path / "k" / "jax_random_key_metadata" / "metadata").read_text())
    assert meta["typed"] is typed
    with orbax.Checkpointer(orbax.JaxRandomKeyCheckpointHandler()) as ockptr:
        check_key(ockptr.restore(tmp_path / "k", args=orbax.args.JaxRandomKeyRestore()), key)
        if name != "raw rbg":  # (Orbax 0.12.8 fails to save a raw key of 4 words)
            ockptr.save(tmp_path / "o", args=orbax.args.JaxRandomKeySave(key))
    if name != "raw rbg":
        with ocp.Checkpointer(ocp.JaxRandomKeyCheckpointHandler()) as ckptr:
            check_key(ckptr.restore(tmp_path / "o", args=ocp.args.JaxRandomKeyRestore()), key)
            check_key(ckptr.restore(tmp_path / "o"), key)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg", "threefry2x32"])
def test_a_typed_key_keeps_its_implementation(tmp_path, impl):
    key = jax.random.key(3, impl=impl)
    d = tmp_path / "k"
    d.mkdir()
    h = ocp.JaxRandomKeyCheckpointHandler(key_name="my_key")
    h.save(d, args=ocp.handlers.JaxRandomKeySaveArgs(key))
    assert (d / "my_key" / "_METADATA").is_file()
    meta = json.loads((d / "my_key_metadata" / "metadata").read_text())
    assert meta["typed"] is True
    out = h.restore(d, args=ocp.handlers.JaxRandomKeyRestoreArgs())
    check_key(out, key)
    assert jax.random.key_impl(out) == jax.random.key_impl(key)
    assert_bits_equal(jax.random.normal(out, (5,)), jax.random.normal(key, (5,)))


def mt19937_dict_state():
    g = np.random.Generator(np.random.MT19937(11))
    g.random(3)
    return g.bit_generator.state


def check_dict_state(out, state):
    assert isinstance(out, dict)
    assert out["bit_generator"] == state["bit_generator"]
    g = np.random.Generator(getattr(np.random, state["bit_generator"])())
    g.bit_generator.state = out
    ref = np.random.Generator(getattr(np.random, state["bit_generator"])())
    ref.bit_generator.state = state
    assert_bits_equal(g.random(8), ref.random(8))
    assert_bits_equal(g.integers(0, 2**62, 8), ref.integers(0, 2**62, 8))


@pytest.mark.parametrize("legacy", [True, False])
def test_numpy_random_key_handler_in_a_checkpointer_both_ways(tmp_path, legacy):
    state = legacy_state() if legacy else mt19937_dict_state()
    check = check_legacy if legacy else check_dict_state
    with ocp.Checkpointer(ocp.NumpyRandomKeyCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "n", args=ocp.args.NumpyRandomKeySave(state))
        check(ckptr.restore(tmp_path / "n", args=ocp.args.NumpyRandomKeyRestore()), state)
        check(ckptr.restore(tmp_path / "n"), state)
    assert (tmp_path / "n" / "np_random_key" / "_METADATA").is_file()
    meta = json.loads((tmp_path / "n" / "np_random_key_metadata" / "metadata").read_text())
    assert meta["legacy"] is legacy
    with orbax.Checkpointer(orbax.NumpyRandomKeyCheckpointHandler()) as ockptr:
        check(ockptr.restore(tmp_path / "n", args=orbax.args.NumpyRandomKeyRestore()), state)
        ockptr.save(tmp_path / "o", args=orbax.args.NumpyRandomKeySave(state))
    with ocp.Checkpointer(ocp.NumpyRandomKeyCheckpointHandler()) as ckptr:
        check(ckptr.restore(tmp_path / "o", args=ocp.args.NumpyRandomKeyRestore()), state)


def test_random_key_handlers_on_their_own(tmp_path):
    key, state = jax.random.key(21), legacy_state()
    (tmp_path / "k").mkdir()
    (tmp_path / "n").mkdir()
    jh = ocp.JaxRandomKeyCheckpointHandler()
    jh.save(tmp_path / "k", args=ocp.args.JaxRandomKeySave(key))
    check_key(jh.restore(tmp_path / "k", args=ocp.args.JaxRandomKeyRestore()), key)
    nh = ocp.NumpyRandomKeyCheckpointHandler(key_name="rs")
    nh.save(tmp_path / "n", args=ocp.args.NumpyRandomKeySave(state))
    assert sorted(p.name for p in (tmp_path / "n").iterdir() if p.is_dir()) == ["rs",
                                                                               "rs_metadata"]
    check_legacy(nh.restore(tmp_path / "n", args=ocp.args.NumpyRandomKeyRestore()), state)


PROTOS = {
    "struct": make_proto,
    "timestamp": lambda: timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789),
    "duration": lambda: duration_pb2.Duration(seconds=-5, nanos=-250_000_000),
}


@pytest.mark.parametrize("name", list(PROTOS))
def test_proto_handler_in_a_checkpointer_both_ways(tmp_path, name):
    msg = PROTOS[name]()
    cls = type(msg)
    with ocp.Checkpointer(ocp.ProtoCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "p", args=ocp.args.ProtoSave(msg))
        out = ckptr.restore(tmp_path / "p", args=ocp.args.ProtoRestore(cls))
    assert type(out) is cls and out == msg
    assert (tmp_path / "p" / "proto.pbtxt").read_text() == text_format.MessageToString(msg)
    with orbax.Checkpointer(orbax.ProtoCheckpointHandler()) as ockptr:
        out = ockptr.restore(tmp_path / "p", args=orbax.args.ProtoRestore(cls))
        assert type(out) is cls and out == msg
        ockptr.save(tmp_path / "o", args=orbax.args.ProtoSave(msg))
    with ocp.Checkpointer(ocp.ProtoCheckpointHandler()) as ckptr:
        out = ckptr.restore(tmp_path / "o", args=ocp.handlers.ProtoRestoreArgs(cls))
    assert type(out) is cls and out == msg


def test_proto_handler_on_its_own_with_its_filename(tmp_path):
    msg = PROTOS["timestamp"]()
    (tmp_path / "p").mkdir()
    h = ocp.ProtoCheckpointHandler(filename="config.pbtxt")
    h.save(tmp_path / "p", args=ocp.args.ProtoSave(msg))
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert "config.pbtxt" in names and "proto.pbtxt" not in names
    assert h.restore(tmp_path / "p", args=ocp.args.ProtoRestore(timestamp_pb2.Timestamp)) == msg
    oh = orbax.ProtoCheckpointHandler(filename="config.pbtxt")
    assert oh.restore(tmp_path / "p", args=orbax.args.ProtoRestore(timestamp_pb2.Timestamp)) == msg


# --- 4. restore args: casts and restore types, as Orbax's ---------------------------------------
CASTS = {
    "arr as float16": ("arr", lambda lib: lib.ArrayRestoreArgs(dtype=np.float16)),
    "arr as numpy": ("arr", lambda lib: lib.RestoreArgs(restore_type=np.ndarray)),
    "arr as numpy int32": ("arr", lambda lib: lib.RestoreArgs(restore_type=np.ndarray,
                                                               dtype=np.int32)),
    "arr cast int32": ("arr", lambda lib: lib.RestoreArgs(dtype=np.int32)),
    "npa as numpy float32": ("npa", lambda lib: lib.RestoreArgs(restore_type=np.ndarray,
                                                                 dtype=np.float32)),
    "npa on one device": ("npa", lambda lib: lib.ArrayRestoreArgs(
        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[1]))),
    "npa as bfloat16 jax": ("npa", lambda lib: lib.ArrayRestoreArgs(
        dtype=jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))),
    "scal as numpy": ("scal", lambda lib: lib.RestoreArgs(restore_type=np.ndarray)),
    "iscal cast float32": ("iscal", lambda lib: lib.RestoreArgs(dtype=np.float32)),
    # ArrayRestoreArgs without a restore_type: the stored type, its dtype cast
    "npa as stored": ("npa", lambda lib: lib.ArrayRestoreArgs(restore_type=None)),
    "npa as stored float32": ("npa", lambda lib: lib.ArrayRestoreArgs(
        restore_type=None, dtype=np.float32, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[1]))),
    "scal as stored": ("scal", lambda lib: lib.ArrayRestoreArgs(restore_type=None)),
    "iscal as stored float32": ("iscal", lambda lib: lib.ArrayRestoreArgs(restore_type=None,
                                                                          dtype=np.float32)),
    "arr as stored": ("arr", lambda lib: lib.ArrayRestoreArgs(
        restore_type=None, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[1]))),
}
CAST_ITEMS = {
    "arr": jnp.asarray(np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)),
    "npa": np.array([-300, 0, 7, 1000], dtype=np.int16),
    "scal": 3.25,
    "iscal": 7,
}


@pytest.fixture(scope="module")
def cast_checkpoints(tmp_path_factory):
    """The items of CASTS, each in an ArrayCheckpointHandler checkpoint written by each library."""
    root = tmp_path_factory.mktemp("casts")
    for writer, lib in LIBS.items():
        with lib.Checkpointer(lib.ArrayCheckpointHandler()) as ckptr:
            for name, item in CAST_ITEMS.items():
                ckptr.save(root / writer / name, args=lib.args.ArraySave(item))
    return root


def describe(x):
    if isinstance(x, jax.Array):
        return ("jax", np.dtype(x.dtype).name, x.shape, str(x.sharding))
    if isinstance(x, np.ndarray):
        return ("numpy", x.dtype.name, x.shape)
    return (type(x).__name__,)


@pytest.mark.parametrize("writer", list(LIBS))
@pytest.mark.parametrize("case", list(CASTS))
def test_restore_args_cast_as_orbax_does(cast_checkpoints, writer, case):
    name, make = CASTS[case]
    path = cast_checkpoints / writer / name
    with orbax.Checkpointer(orbax.ArrayCheckpointHandler()) as ockptr:
        expected = ockptr.restore(path, args=orbax.args.ArrayRestore(restore_args=make(orbax)))
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler()) as ckptr:
        out = ckptr.restore(path, args=ocp.args.ArrayRestore(restore_args=make(ocp)))
    assert describe(out) == describe(expected)
    if isinstance(expected, jax.Array | np.ndarray):
        assert_bits_equal(out, expected)
    else:
        assert out == expected


def test_restore_args_in_a_manager(tmp_path):
    item = jnp.asarray(np.linspace(0, 1, 8, dtype=np.float32))
    with ocp.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, args=ocp.args.Composite(a=ocp.args.ArraySave(item),
                                            k=ocp.args.JaxRandomKeySave(jax.random.key(4))))
        mgr.wait_until_finished()
        out = mgr.restore(1, args=ocp.args.Composite(
            a=ocp.args.ArrayRestore(restore_args=ocp.RestoreArgs(restore_type=np.ndarray,
                                                                 dtype=np.float16)),
            k=ocp.args.JaxRandomKeyRestore(restore_args=ocp.ArrayRestoreArgs(
                sharding=jax.sharding.SingleDeviceSharding(jax.devices()[2])))))
    with orbax.CheckpointManager(tmp_path) as omgr:
        expected = omgr.restore(1, args=orbax.args.Composite(
            a=orbax.args.ArrayRestore(restore_args=orbax.RestoreArgs(restore_type=np.ndarray,
                                                                     dtype=np.float16)),
            k=orbax.args.JaxRandomKeyRestore(restore_args=orbax.ArrayRestoreArgs(
                sharding=jax.sharding.SingleDeviceSharding(jax.devices()[2])))))
    assert describe(out["a"]) == describe(expected["a"]) == ("numpy", "float16", (8,))
    assert_bits_equal(out["a"], expected["a"])
    assert kind(out["k"]) == kind(expected["k"]) == "typed key"
    assert out["k"].sharding == expected["k"].sharding
    assert_bits_equal(jax.random.key_data(out["k"]), jax.random.key_data(jax.random.key(4)))


# --- 5. a handler of Orbax's async_save interface, and ocp.future -------------------------------
class NoteHandler(ocp.AsyncCheckpointHandler):
    """As Orbax's own ProtoCheckpointHandler is written: the write runs in a
    CommitFutureAwaitingContractedSignals that the commit waits for."""

    release = threading.Event()

    async def async_save(self, directory, args):
        async def write(text):
            await asyncio.to_thread(NoteHandler.release.wait, 20)
            (directory / "note.txt").write_text(text)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(args.text), name="x")]

    def save(self, directory, args):
        async def run():
            for f in await self.async_save(directory, args):
                f.result()

        asyncio.run(run())

    def restore(self, directory, args=None):
        return (directory / "note.txt").read_text()

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(NoteHandler, for_save=True)
@dataclasses.dataclass
class NoteSave(ocp.args.CheckpointArgs):
    text: str


@ocp.args.register_with_handler(NoteHandler, for_restore=True)
@dataclasses.dataclass
class NoteRestore(ocp.args.CheckpointArgs):
    pass


def test_a_handler_returning_commit_futures_in_a_manager(tmp_path):
    NoteHandler.release.clear()
    values = make_values()
    with ocp.CheckpointManager(tmp_path) as mgr:
        try:
            mgr.save(1, args=ocp.args.Composite(note=NoteSave("hello"),
                                                arr=ocp.args.ArraySave(values["arr"]),
                                                key=ocp.args.JaxRandomKeySave(values["key"])))
            time.sleep(0.2)
            assert not list(tmp_path.rglob("note.txt"))  # (the future is still waiting)
            assert not (tmp_path / "1").exists()  # (not committed before it is done)
        finally:
            NoteHandler.release.set()
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1]
        assert (tmp_path / "1" / "note" / "note.txt").read_text() == "hello"
        out = mgr.restore(1, args=ocp.args.Composite(note=NoteRestore(),
                                                     arr=ocp.args.ArrayRestore(),
                                                     key=ocp.args.JaxRandomKeyRestore()))
    assert out["note"] == "hello"
    check_restored({"arr": out["arr"], "key": out["key"]}, values)


def test_commit_future_runs_its_coroutine_in_the_background():
    started, release = threading.Event(), threading.Event()
    threads = []

    async def work():
        threads.append(threading.current_thread())
        started.set()
        await asyncio.to_thread(release.wait, 10)
        return 42

    f = ocp.future.CommitFutureAwaitingContractedSignals(work(), name="bg")
    assert started.wait(10)  # (running before anyone asks for its result)
    assert threads[0] is not threading.current_thread()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    release.set()
    assert f.result(timeout=10) == 42


def test_commit_future_raises_its_coroutines_exception():
    class Boom(RuntimeError):
        pass

    async def fail():
        await asyncio.sleep(0.01)
        raise Boom("disk on fire")

    f = ocp.future.CommitFutureAwaitingContractedSignals(fail(), name="boom")
    with pytest.raises(Boom, match="disk on fire"):
        f.result()


def test_noop_and_chained_futures():
    assert ocp.future.NoopFuture().result() is None
    assert ocp.future.NoopFuture().result(timeout=1) is None

    pool = concurrent.futures.ThreadPoolExecutor(2)
    done, calls = [], []

    def work(i, delay):
        time.sleep(delay)
        done.append(i)

    try:
        f1, f2 = pool.submit(work, 1, 0.2), pool.submit(work, 2, 0.05)
        chained = ocp.future.ChainedFuture([f1, f2], lambda: calls.append(sorted(done)))
        assert chained.result() is None
        assert calls == [[1, 2]]  # (called once, after both)
        assert f1.done() and f2.done()

        never = concurrent.futures.Future()
        late = ocp.future.ChainedFuture([ocp.future.NoopFuture(), never],
                                        lambda: calls.append("late"))
        with pytest.raises(TimeoutError):
            late.result(timeout=0.1)
        assert calls == [[1, 2]]
    finally:
        pool.shutdown()


# --- 6. errors ----------------------------------------------------------------------------------
BAD_SAVES = {
    "array of a dict": (ocp.ArrayCheckpointHandler, lambda: ocp.args.ArraySave({"a": 1})),
    "array of a string": (ocp.ArrayCheckpointHandler, lambda: ocp.args.ArraySave("abc")),
    "array of a list": (ocp.ArrayCheckpointHandler, lambda: ocp.args.ArraySave([1, 2])),
    "jax key of numpy": (ocp.JaxRandomKeyCheckpointHandler,
                         lambda: ocp.args.JaxRandomKeySave(np.zeros(2))),
    "jax key of an int": (ocp.JaxRandomKeyCheckpointHandler,
                          lambda: ocp.args.JaxRandomKeySave(5)),
    "numpy key of a list": (ocp.NumpyRandomKeyCheckpointHandler,
                            lambda: ocp.args.NumpyRandomKeySave([1, 2])),
    "numpy key of an array": (ocp.NumpyRandomKeyCheckpointHandler,
                              lambda: ocp.args.NumpyRandomKeySave(np.arange(3))),
}


@pytest.mark.parametrize("case", list(BAD_SAVES))
def test_unsupported_items_raise_type_error(tmp_path, case):
    handler_cls, make = BAD_SAVES[case]
    (tmp_path / "h").mkdir()
    with pytest.raises(TypeError):  # (Orbax: TypeError('Unsupported type: ...'))
        handler_cls().save(tmp_path / "h", args=make())
    with ocp.Checkpointer(handler_cls()) as ckptr, pytest.raises(TypeError):
        ckptr.save(tmp_path / "c", args=make())
    assert not (tmp_path / "c").exists()
    with ocp.CheckpointManager(tmp_path / "m") as mgr:
        with pytest.raises(TypeError):
            mgr.save(1, args=ocp.args.Composite(bad=make()))
        mgr.wait_until_finished()
        assert mgr.all_steps() == []
        mgr.save(1, args=ocp.args.Composite(good=ocp.args.ArraySave(np.arange(2))))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1]


def test_proto_restore_needs_its_class(tmp_path):
    (tmp_path / "p").mkdir()
    h = ocp.ProtoCheckpointHandler()
    h.save(tmp_path / "p", args=ocp.args.ProtoSave(PROTOS["duration"]()))
    with pytest.raises(ValueError):  # (Orbax: "Must provide `item` ...")
        h.restore(tmp_path / "p")
    with pytest.raises(ValueError):
        h.restore(tmp_path / "p", args=None)
    with ocp.CheckpointManager(tmp_path / "m") as mgr:
        mgr.save(1, args=ocp.args.Composite(p=ocp.args.ProtoSave(PROTOS["duration"]())))
        mgr.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "m") as mgr, pytest.raises(ValueError):
        mgr.restore(1)


# --- 7. bit generator states beyond int64 -------------------------------------------------------
@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"])
def test_numpy_bit_generator_states_round_trip(tmp_path, bit_generator):
    g = np.random.Generator(getattr(np.random, bit_generator)(1))
    g.random(3)
    g.integers(0, 10, 1, dtype=np.uint32)  # (a buffered uint32 where the generator has one)
    state = g.bit_generator.state
    with ocp.Checkpointer(ocp.NumpyRandomKeyCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "n", args=ocp.args.NumpyRandomKeySave(state))
        out = ckptr.restore(tmp_path / "n", args=ocp.args.NumpyRandomKeyRestore())
    meta = json.loads((tmp_path / "n" / "np_random_key_metadata" / "metadata").read_text())
    assert meta["legacy"] is False
    check_dict_state(out, state)
    rng = np.random.default_rng() if bit_generator == "PCG64" else np.random.Generator(
        getattr(np.random, bit_generator)())
    rng.bit_generator.state = out
    assert_bits_equal(rng.standard_normal(10), g.standard_normal(10))


def test_pcg64_state_in_a_manager(tmp_path):
    g = np.random.default_rng(1)
    g.standard_normal(5)
    state = g.bit_generator.state
    assert state["state"]["state"] > np.iinfo(np.int64).max  # (what Orbax cannot store)
    with ocp.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, args=ocp.args.Composite(rng=ocp.args.NumpyRandomKeySave(state),
                                            legacy=ocp.args.NumpyRandomKeySave(legacy_state())))
        mgr.wait_until_finished()
    with ocp.CheckpointManager(tmp_path) as mgr:
        out = mgr.restore(1)
    check_legacy(out["legacy"], legacy_state())
    rng = np.random.default_rng()
    rng.bit_generator.state = out["rng"]
    assert_bits_equal(rng.random(10), g.random(10))


def test_array_item_of_orbax_before_metadata_files(tmp_path):
    # An ArrayCheckpointHandler item of an Orbax version that wrote no _METADATA: the zarr
    # array alone, read through the type handlers (NumPy by default, jax with ArrayRestoreArgs).
    item = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    with orbax.Checkpointer(orbax.ArrayCheckpointHandler()) as ockptr:
        ockptr.save(tmp_path / "a", args=orbax.args.ArraySave(item))
    (tmp_path / "a" / "_METADATA").unlink()
    assert (tmp_path / "a" / "checkpoint" / ".zarray").is_file()
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler()) as ckptr:
        out = ckptr.restore(tmp_path / "a", args=ocp.args.ArrayRestore())
        assert kind(out) == "numpy"
        assert_bits_equal(out, item)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[1])
        out = ckptr.restore(tmp_path / "a", args=ocp.args.ArrayRestore(
            restore_args=ocp.ArrayRestoreArgs(sharding=sharding)))
        assert kind(out) == "jax" and out.sharding == sharding
        assert_bits_equal(out, item)


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_args_registry_lookups_as_in_orbax(lib_name):
    lib = LIBS[lib_name]
    a = lib.args
    assert a.get_registered_handler_cls(a.ArraySave) is lib.ArrayCheckpointHandler
    assert a.get_registered_handler_cls(a.ProtoRestore(struct_pb2.Struct)) is \
        lib.ProtoCheckpointHandler
    save, restore = a.get_registered_args_cls(lib.JsonCheckpointHandler())
    assert (save, restore) == (a.JsonSave, a.JsonRestore)
    assert a.get_registered_args_cls(lib.JaxRandomKeyCheckpointHandler) == (
        a.JaxRandomKeySave, a.JaxRandomKeyRestore)
    assert a.has_registered_args(lib.NumpyRandomKeyCheckpointHandler)
    assert not a.has_registered_args(object)
    with pytest.raises(TypeError):
        a.get_registered_handler_cls(int)
    with pytest.raises(ValueError):
        a.get_registered_handler_cls(a.CheckpointArgs)
    with pytest.raises(ValueError):
        a.get_registered_args_cls(object())


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_register_with_handler_refuses_what_orbax_refuses(lib_name):
    # ckpt_async registered args for neither save nor restore, and a class that is no
    # CheckpointArgs, where Orbax raises ValueError and TypeError.
    lib = LIBS[lib_name]

    class Handler(lib.CheckpointHandler):
        pass

    @dataclasses.dataclass
    class Args(lib.args.CheckpointArgs):
        item: int = 0

    with pytest.raises(ValueError):
        lib.args.register_with_handler(Handler)
    with pytest.raises(TypeError):
        lib.args.register_with_handler(Handler, for_save=True)(dict)
    with pytest.raises(ValueError):  # (nothing was registered)
        lib.args.get_registered_handler_cls(Args)
    assert lib.args.register_with_handler(Handler, for_save=True)(Args) is Args
    assert lib.args.get_registered_handler_cls(Args) is Handler


def test_a_cancelled_commit_future_ends_after_its_coroutine():
    # As Orbax's: result() raises CancelledError once the coroutine has run its clean-up.
    cleaned = threading.Event()
    started = threading.Event()

    async def write():
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # (the clean-up of a write cut short)
            cleaned.set()

    fut = ocp.future.CommitFutureAwaitingContractedSignals(write(), name="w")
    assert started.wait(10)
    fut.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(timeout=30)
    assert cleaned.is_set()


def test_orbax_reads_a_pcg64_state_with_its_big_integers_as_strings(tmp_path):
    # (docs/guide.md says so: Orbax cannot save this state, and reads ckpt_async's so)
    state = np.random.default_rng(1).bit_generator.state
    with ocp.Checkpointer(ocp.NumpyRandomKeyCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "a", args=ocp.args.NumpyRandomKeySave(state))
    with orbax.Checkpointer(orbax.NumpyRandomKeyCheckpointHandler()) as ockptr:
        read = ockptr.restore(tmp_path / "a", args=orbax.args.NumpyRandomKeyRestore())
    assert read["state"] == {k: str(v) for k, v in state["state"].items()}
    assert read["bit_generator"] == "PCG64"


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_registry_refuses_a_pair_twice_and_misses_with_a_key_error(lib_name):
    lib = LIBS[lib_name]
    registry = lib.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", lib.args.StandardSave)
    registry.add("state", lib.args.StandardRestore)
    with pytest.raises(ValueError, match="already exists"):
        registry.add("state", lib.args.StandardSave)
    assert isinstance(registry.get("state", lib.args.StandardSave({})),
                      lib.StandardCheckpointHandler)
    with pytest.raises(KeyError):
        registry.get("other", lib.args.StandardSave)
    assert not registry.has("other", lib.args.StandardSave)


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_create_default_handler_registry_as_in_orbax(lib_name, tmp_path):
    lib = LIBS[lib_name]
    state, meta = lib.StandardCheckpointHandler(), lib.JsonCheckpointHandler()
    registry = lib.handlers.create_default_handler_registry(state=state, meta=meta)
    assert registry.get("state", lib.args.StandardSave) is state
    assert registry.get("state", lib.args.StandardRestore) is state
    assert registry.get("meta", lib.args.JsonRestore) is meta
    assert not registry.has("meta", lib.args.StandardSave)
    tree = {"w": np.arange(4.0)}
    with lib.CheckpointManager(tmp_path, handler_registry=registry) as mngr:
        mngr.save(1, args=lib.args.Composite(state=lib.args.StandardSave(tree),
                                             meta=lib.args.JsonSave({"lr": 0.5})))
        mngr.wait_until_finished()
        out = mngr.restore(1, args=lib.args.Composite(state=lib.args.StandardRestore(),
                                                      meta=lib.args.JsonRestore()))
    assert_bits_equal(out["state"]["w"], tree["w"])
    assert out["meta"] == {"lr": 0.5}
    with pytest.raises(ValueError):
        lib.handlers.create_default_handler_registry(other=object())


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_general_registry_entries_serve_any_item_with_their_own_handler(lib_name, tmp_path):
    # An entry of item None is a general one: its handler (here one writing `doc.json`)
    # serves an item no entry names, and `get`/`has` of an item find only its own entries.
    # ckpt_async wrote the item with a default handler (its `metadata` file), answered
    # `get("b", JsonSave)` with the general handler, refused two general entries of two
    # handler types, and had no `get_all_entries`.
    lib = LIBS[lib_name]
    registry = lib.handlers.DefaultCheckpointHandlerRegistry()
    doc = lib.JsonCheckpointHandler(filename="doc.json")
    registry.add(None, lib.args.JsonSave, doc)
    registry.add(None, lib.args.JsonRestore, doc)
    registry.add(None, lib.args.StandardSave)
    assert not registry.has("b", lib.args.JsonSave)
    with pytest.raises(KeyError):
        registry.get("b", lib.args.JsonSave)
    assert registry.get(None, lib.args.JsonRestore) is doc
    assert set(registry.get_all_entries()) == {
        (None, lib.args.JsonSave), (None, lib.args.JsonRestore), (None, lib.args.StandardSave)}
    copy = lib.handlers.DefaultCheckpointHandlerRegistry(registry)
    assert copy.get_all_entries() == registry.get_all_entries()
    with lib.CheckpointManager(tmp_path, handler_registry=registry) as mngr:
        mngr.save(1, args=lib.args.Composite(cfg=lib.args.JsonSave({"lr": 0.5}),
                                             log=lib.args.JsonSave([1, 2])))
        mngr.wait_until_finished()
        out = mngr.restore(1, args=lib.args.Composite(cfg=lib.args.JsonRestore()))
    assert out["cfg"] == {"lr": 0.5}
    for item in ("cfg", "log"):
        assert (tmp_path / "1" / item / "doc.json").exists()
        assert not (tmp_path / "1" / item / "metadata").exists()
    # The manager locked its copy of the registry in, not the caller's.
    assert not registry.has("cfg", lib.args.JsonSave)


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_composite_handler_takes_a_registry_or_items_and_an_item_without_handler(lib_name,
                                                                                 tmp_path):
    # ckpt_async took a registry beside item names or handlers (Orbax refuses the pair with a
    # ValueError), and refused an item handler of None (HandlerError), which Orbax takes as
    # an item whose handler its first args lock in.
    lib = LIBS[lib_name]
    registry = lib.handlers.DefaultCheckpointHandlerRegistry()
    with pytest.raises(ValueError):
        lib.CompositeCheckpointHandler(handler_registry=registry, a=lib.JsonCheckpointHandler())
    with pytest.raises(ValueError):
        lib.CompositeCheckpointHandler("a", handler_registry=registry)
    handler = lib.CompositeCheckpointHandler(a=None, b=lib.JsonCheckpointHandler())
    with lib.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=lib.args.Composite(
            a=lib.args.StandardSave({"w": np.arange(3.0)}), b=lib.args.JsonSave([1])))
        with pytest.raises(ValueError):  # (only its items)
            ckptr.save(tmp_path / "d", args=lib.args.Composite(z=lib.args.JsonSave(1)))
        out = ckptr.restore(tmp_path / "c")
    assert_bits_equal(out["a"]["w"], np.arange(3.0))
    assert out["b"] == [1]


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_composite_keeps_its_items_order_and_equals_a_mapping(lib_name, tmp_path):
    # ckpt_async sorted a Composite's items by name (list(Composite(b=.., a=..)) gave
    # ['a', 'b']) and a Composite equalled no dict of the same items. Then it hashed by
    # identity, so two equal Composites hashed apart; as a mapping it is unhashable.
    lib = LIBS[lib_name]
    args = lib.args.Composite(zeta=lib.args.JsonSave([1]), alpha=lib.args.JsonSave({"k": 2}))
    assert list(args) == ["zeta", "alpha"]
    assert [v.item for v in args.values()] == [[1], {"k": 2}]
    assert lib.args.Composite(b=1, a=2) == {"a": 2, "b": 1}
    assert lib.args.Composite(b=1, a=2) != {"a": 2}
    with pytest.raises(TypeError, match="unhashable"):
        hash(lib.args.Composite(a=1))
    with lib.Checkpointer(lib.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=args)
        out = ckptr.restore(tmp_path / "c", args=lib.args.Composite(
            zeta=lib.args.JsonRestore(), alpha=lib.args.JsonRestore()))
    assert list(out) == ["alpha", "zeta"]  # (a restore's result: in the order of the names)
    assert out == {"alpha": {"k": 2}, "zeta": [1]}


@pytest.mark.parametrize("lib_name", list(LIBS))
def test_a_composite_checkpointer_refuses_a_single_handlers_checkpoint(lib_name, tmp_path):
    # A checkpoint of one handler (_CHECKPOINT_METADATA records item_handlers as one type
    # string) read by a composite handler: ckpt_async took the item's own folders (OCDBT's
    # `d`, `array_metadatas`) for items, failing on an item 'array_metadatas' and giving
    # metadata of such items; Orbax raises ValueError.
    lib = LIBS[lib_name]
    with lib.Checkpointer(lib.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=lib.args.StandardSave({"w": np.arange(4.0)}))
    with lib.Checkpointer(lib.CompositeCheckpointHandler()) as ckptr:
        with pytest.raises(ValueError, match="non-composite handler|not by a composite"):
            ckptr.restore(tmp_path / "c")
        with pytest.raises(ValueError, match="non-composite handler|not by a composite"):
            ckptr.metadata(tmp_path / "c")


def test_a_damaged_proto_raises_what_orbax_and_ckpt_async_callers_catch(tmp_path):
    from ckpt_async.errors import CorruptCheckpointError

    msg = PROTOS["timestamp"]()
    # (written by Orbax, which records no checksum: the parse meets the damage; in a
    # checkpoint of ckpt_async's the checksum does, first)
    with orbax.Checkpointer(orbax.ProtoCheckpointHandler()) as ockptr:
        ockptr.save(tmp_path / "p", args=orbax.args.ProtoSave(msg))
    (tmp_path / "p" / "proto.pbtxt").write_text("seconds: oops")
    with ocp.Checkpointer(ocp.ProtoCheckpointHandler()) as ckptr:
        with pytest.raises(text_format.ParseError) as caught:
            ckptr.restore(tmp_path / "p", args=ocp.args.ProtoRestore(timestamp_pb2.Timestamp))
    assert isinstance(caught.value, CorruptCheckpointError)
    assert "proto.pbtxt is not a Timestamp in text format" in str(caught.value)
    with pytest.raises(text_format.ParseError):  # (Orbax's, on the same file)
        orbax.ProtoCheckpointHandler().restore(
            tmp_path / "p", args=orbax.args.ProtoRestore(timestamp_pb2.Timestamp))
