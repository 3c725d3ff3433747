"""Checkpoints move both ways between ckpt_async and the real orbax-checkpoint 0.12.8."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import json
import math
import os
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as orbax  # noqa: E402 - a test dependency: missing is a failure
import pytest
from _checks import assert_bits_equal
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ckpt_async as ocp


def make_state(mesh) -> dict:
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((8, 4)).astype(np.float32)
    f32[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    return {
        "params": {
            "w": jax.device_put(f32, NamedSharding(mesh, PartitionSpec("x", "y"))),
            "b": jnp.asarray(rng.standard_normal(6).astype(ml_dtypes.bfloat16)),
            "h": jax.device_put(rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
                                NamedSharding(mesh, PartitionSpec(None, ("x", "y")))),
        },
        "opt": [jnp.arange(5, dtype=jnp.int32), jnp.asarray(np.float16(1.5))],
        "host": np.arange(12, dtype=np.uint16).reshape(3, 4),
        "step": jnp.asarray(7, jnp.int32),
    }


def abstract(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def assert_state_equal(out, state, *, check_sharding=True):
    flat_out = jax.tree_util.tree_flatten_with_path(out)[0]
    flat_in = jax.tree_util.tree_flatten_with_path(state)[0]
    assert [jax.tree_util.keystr(p) for p, _ in flat_out] == [
        jax.tree_util.keystr(p) for p, _ in flat_in]
    for (path, a), (_, b) in zip(flat_out, flat_in):
        assert_bits_equal(a, b)
        if check_sharding and isinstance(b, jax.Array):
            assert isinstance(a, jax.Array), jax.tree_util.keystr(path)
            assert a.sharding.is_equivalent_to(b.sharding, b.ndim), jax.tree_util.keystr(path)


# --- ckpt_async writes, Orbax restores -------------------------------------------------------
def test_standard_checkpointer_to_orbax(tmp_path, mesh):
    state = make_state(mesh)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
    with orbax.StandardCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c", abstract(state))
    assert_state_equal(out, state)


def test_data_files_lie_in_the_process_folder_where_orbax_puts_them(tmp_path):
    # Orbax's item: the B+tree in d/, the data in ocdbt.process_0/d/ (its process's database,
    # merged into the item's by reference); ckpt_async's too. Orbax restores it.
    import tensorstore as ts

    from ckpt_async import _ocdbt

    # (random, so that Orbax's compressed chunks are too large to be inline in its B+tree)
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((32, 32)).astype(np.float32),
            "b": jnp.asarray(rng.integers(0, 2**15, 1000, dtype=np.int16))}
    for lib, name in ((ocp, "ours"), (orbax, "theirs")):
        with lib.StandardCheckpointer() as ckptr:
            ckptr.save(tmp_path / name, tree)
        item = tmp_path / name
        index = _ocdbt.dumped_index(ts.KvStore.open({"driver": "file",
                                                     "path": f"{item}/"}).result())
        data = {where[0] for where in index.values() if isinstance(where, tuple)}
        assert data and all(f.startswith("ocdbt.process_0/d/") for f in data), (name, data)
        assert {f.rpartition("/")[2] for f in data} <= set(
            os.listdir(item / "ocdbt.process_0" / "d")), name
        assert os.listdir(item / "d"), name  # (the B+tree)
    with orbax.StandardCheckpointer() as ockptr:
        assert_state_equal(ockptr.restore(tmp_path / "ours", abstract(tree)), tree)


def test_the_step_marker_names_the_committed_path_as_orbax_writes_it(tmp_path):
    # commit_success.txt of a step names where the step is committed (Orbax's format guide
    # prints it); ckpt_async's named its temporary directory, which is gone after the rename.
    # An item's marker names its folder as written, inside the temporary directory, in both.
    tree = {"a": np.arange(4), "b": {"c": 3}}
    for lib, name in ((ocp, "ours"), (orbax, "theirs")):
        with lib.StandardCheckpointer() as ckptr:
            ckptr.save(tmp_path / name / "ckpt", tree)
        with lib.CheckpointManager(tmp_path / name / "run", item_names=("state", "extra")) as m:
            m.save(0, args=lib.args.Composite(state=lib.args.StandardSave(tree),
                                              extra=lib.args.JsonSave({"x": 1})))
            m.wait_until_finished()
        for step in (tmp_path / name / "ckpt", tmp_path / name / "run" / "0"):
            text = (step / "commit_success.txt").read_text()
            assert text == f"Checkpoint commit was successful to {step}", (name, text)
        item_text = (tmp_path / name / "run" / "0" / "state" / "commit_success.txt").read_text()
        prefix = f"Checkpoint commit was successful to {tmp_path / name / 'run' / '0'}"
        assert item_text.startswith(prefix + ".orbax-checkpoint-tmp"), (name, item_text)
        assert item_text.endswith("/state"), (name, item_text)


def test_a_save_written_in_several_databases_restores_in_orbax(tmp_path, mesh, monkeypatch):
    # What ckpt_async's own database does not take goes through TensorStore into further OCDBT
    # databases ("lanes"), merged into the item's root one (ckpt_async's) at the end: made to
    # happen here for about half the arrays, with a small lane size and one array a batch.
    from ckpt_async import _serialize, _stage

    raw = _serialize.ItemWriter._raw_dtype
    monkeypatch.setattr(_serialize.ItemWriter, "_raw_dtype", staticmethod(lambda arr: (
        raw(arr) if zlib.crc32(arr.name.encode()) % 2 else None)))
    monkeypatch.setattr(_serialize, "LANE_BYTES", 64)
    monkeypatch.setattr(_stage, "BATCH_MAX_ARRAYS", 1)
    state = make_state(mesh)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
        assert_state_equal(ckptr.restore(tmp_path / "c", abstract(state)), state)
    # (ocdbt.process_0/ holds the data files of ckpt_async's own database; the lanes are
    # named for their save's writer, ocdbt.process_0.<lane>.<its uuid's start>)
    lanes = sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("ocdbt."))
    token = lanes[-1].rsplit(".", 1)[1]
    assert lanes == [_serialize.process_dir(0)] + [
        _serialize.lane_dir(i, token) for i in range(1, len(lanes))]
    assert len(lanes) > 2
    with orbax.StandardCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c", abstract(state))
    assert_state_equal(out, state)


def test_data_files_written_past_the_page_cache_restore_in_orbax(tmp_path, mesh, monkeypatch,
                                                                evict):
    # A large save writes its data files with O_DIRECT (made to happen here for a small one,
    # with a staging buffer smaller than some arrays): the same files, which Orbax reads.
    from ckpt_async import _ocdbt, _serialize

    monkeypatch.setattr(_serialize, "DIRECT_IO_MIN_BYTES", 0)
    monkeypatch.setattr(_serialize, "DIRECT_IO_FILE_SYSTEMS",
                        {_serialize.storage.file_system_type(tmp_path)})
    monkeypatch.setattr(_ocdbt, "DIRECT_PIECE_BYTES", 2 * _ocdbt.DIRECT_ALIGN)
    opened: list[int] = []
    real_open = _ocdbt.os.open
    monkeypatch.setattr(_ocdbt.os, "open", lambda path, flags, *a: opened.append(flags)
                        or real_open(path, flags, *a))
    state = make_state(mesh)
    state["big"] = np.arange(5000, dtype=np.float32)  # 20,000 bytes: several staging buffers
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
    assert any(flags & os.O_DIRECT for flags in opened)
    with orbax.StandardCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c", abstract(state))
    assert_state_equal(out, state)
    # ... and which ckpt_async reads past the page cache too, once they are out of it (Orbax's
    # restore read them into it).
    evict((tmp_path / "c").rglob("d/*"))
    opened.clear()
    with ocp.StandardCheckpointer() as ckptr:
        assert_state_equal(ckptr.restore(tmp_path / "c", abstract(state)), state)
    assert any(flags & os.O_DIRECT for flags in opened)



def test_a_save_that_found_the_page_cache_slow_restores_in_orbax(tmp_path, mesh, monkeypatch):
    # Its first batch through the page cache until it is found slow (made so here), its
    # blocks after that past it, every other batch past it in a data file of its own: Orbax
    # reads them all.
    from ckpt_async import _ocdbt, _serialize, _stage

    monkeypatch.setattr(_serialize, "DIRECT_IO_FILE_SYSTEMS",
                        {_serialize.storage.file_system_type(tmp_path)})
    monkeypatch.setattr(_ocdbt, "PAGE_CACHE_MIN_RATE", float("inf"))
    monkeypatch.setattr(_ocdbt, "WATCH_BYTES", 1)
    monkeypatch.setattr(_serialize, "WATCH_MIN_BYTES", 0)
    monkeypatch.setattr(_stage, "BATCH_BYTES", 1)  # (an array a batch)
    # The batches are added to the database by their writer threads, concurrently: every one
    # but the first waits until the first has found the page cache slow (else all of them
    # may be added before that, as seen on Python 3.13, and share one data file).
    real_add, first_taken = _ocdbt.DatabaseWriter.add, threading.Lock()

    def add_once_slow(self, values, **kwargs):
        if not first_taken.acquire(blocking=False):  # (held from the first add on)
            deadline = time.monotonic() + 10
            while not self.direct and time.monotonic() < deadline:
                time.sleep(0.001)
        return real_add(self, values, **kwargs)

    monkeypatch.setattr(_ocdbt.DatabaseWriter, "add", add_once_slow)
    state = make_state(mesh)
    state["big"] = np.arange(5000, dtype=np.float32)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
        assert_state_equal(ckptr.restore(tmp_path / "c", abstract(state)), state)
    data_files = list((tmp_path / "c").rglob("d/*"))
    assert len(data_files) > 3  # (the shared file, the B+tree's, and one a later batch)
    with orbax.StandardCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c", abstract(state))
    assert_state_equal(out, state)


SHARDING_FROM_FILE = pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")


@SHARDING_FROM_FILE
def test_pytree_checkpointer_to_orbax(tmp_path, mesh):
    state = make_state(mesh)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
    with orbax.PyTreeCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c")
    # Orbax rebuilds sequences as lists and places arrays on their saved shardings.
    assert_state_equal(out, state)


@SHARDING_FROM_FILE
def test_compressed_pytree_to_orbax(tmp_path, mesh):
    state = make_state(mesh)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=True)) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(state))
    with orbax.PyTreeCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c")
    assert_state_equal(out, state)


def test_composite_with_json_to_orbax(tmp_path, mesh):
    state = make_state(mesh)
    extra = {"version": 1.0, "step": 4, "tags": ["a", "b"]}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)))
    with orbax.Checkpointer(orbax.CompositeCheckpointHandler()) as ockptr:
        out = ockptr.restore(tmp_path / "c", args=orbax.args.Composite(
            state=orbax.args.StandardRestore(abstract(state)), extra=orbax.args.JsonRestore()))
    assert_state_equal(out.state, state)
    assert out.extra == extra


def test_mesh_axis_types_and_metadata_shardings_both_ways(tmp_path):
    # A mesh's axis types are written (as Orbax writes them) and come back; metadata's
    # shardings rebuild the sharding (to_jax_sharding), a permuted device order included.
    from jax.sharding import AxisType

    devices = np.array(jax.devices())[[3, 1, 2, 0]].reshape(2, 2)
    explicit = Mesh(devices, ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    sharded = NamedSharding(explicit, PartitionSpec("x", "y"))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[2])
    tree = {"a": jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4), sharded),
            "b": jax.device_put(np.ones(3, np.int8), single)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ours", tree)
        restored = ckptr.restore(tmp_path / "ours")
        meta = ckptr.metadata(tmp_path / "ours").item_metadata
    with orbax.StandardCheckpointer() as ockptr:
        theirs = ockptr.restore(tmp_path / "ours")
        ockptr.save(tmp_path / "theirs", tree)
    with ocp.StandardCheckpointer() as ckptr:
        from_theirs = ckptr.restore(tmp_path / "theirs")
    for out in (restored, theirs, from_theirs):
        assert out["a"].sharding == sharded and out["b"].sharding == single
        assert out["a"].sharding.mesh.axis_types == (AxisType.Explicit,) * 2
        assert_bits_equal(out["a"], tree["a"])
    assert meta["a"].sharding.to_jax_sharding() == sharded
    assert meta["a"].sharding.axis_types == (AxisType.Explicit,) * 2
    assert repr(meta["a"].sharding).endswith(f"device_mesh={[[3, 1], [2, 0]]})")
    assert meta["b"].sharding.to_jax_sharding() == single


def test_numpy_scalars_of_standard_save_as_orbax_stores_them(tmp_path):
    # Orbax's standard handler stores a NumPy scalar as a 0-d array and restores it as one,
    # dtype kept; as "scalar" it came back to Orbax as a Python int or float.
    tree = {"i": np.int32(3), "f": np.float32(1.5), "h": np.float16(-2), "p": 2.5}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ours", tree)
        ours = ckptr.restore(tmp_path / "ours")
    with orbax.StandardCheckpointer() as ockptr:
        ockptr.save(tmp_path / "theirs", tree)
        theirs = ockptr.restore(tmp_path / "theirs")
        from_ours = ockptr.restore(tmp_path / "ours")
    for k in "ifh":
        assert type(from_ours[k]) is type(theirs[k]) is np.ndarray and from_ours[k].shape == ()
        assert from_ours[k].dtype == theirs[k].dtype == tree[k].dtype
        assert type(ours[k]) is type(tree[k]) and ours[k] == tree[k]  # (ours keeps the type)
    assert from_ours["p"] == theirs["p"] == ours["p"] == 2.5
    # No jax array: neither library writes a ``_sharding`` or ``array_metadatas`` (ckpt_async
    # wrote ``{}`` and an empty list there until round 40)
    for name in ("_sharding", "array_metadatas"):
        assert not (tmp_path / "ours" / name).exists()
        assert not (tmp_path / "theirs" / name).exists()


def test_non_finite_json_and_custom_metadata_both_ways(tmp_path):
    doc = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "x": [1.5, None]}
    custom = {"best": float("-inf")}

    def same(out):
        assert math.isnan(out["nan"]) and out["inf"] == math.inf and out["ninf"] == -math.inf
        assert out["x"] == [1.5, None]

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "ours", args=ocp.args.JsonSave(doc))
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ours_tree", args=ocp.args.PyTreeSave(
            {"a": np.arange(3)}, custom_metadata=custom))
    with orbax.Checkpointer(orbax.JsonCheckpointHandler()) as ockptr:
        same(ockptr.restore(tmp_path / "ours", args=orbax.args.JsonRestore()))
        ockptr.save(tmp_path / "theirs", args=orbax.args.JsonSave(doc))
    with orbax.PyTreeCheckpointer() as ockptr:
        assert ockptr.metadata(tmp_path / "ours_tree").item_metadata.custom_metadata == custom
        ockptr.save(tmp_path / "theirs_tree", args=orbax.args.PyTreeSave(
            {"a": np.arange(3)}, custom_metadata=custom))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        same(ckptr.restore(tmp_path / "theirs", args=ocp.args.JsonRestore()))
    with ocp.PyTreeCheckpointer() as ckptr:
        assert ckptr.metadata(tmp_path / "theirs_tree").item_metadata.custom_metadata == custom
        assert ckptr.metadata(tmp_path / "ours_tree").item_metadata.custom_metadata == custom


@pytest.mark.parametrize("custom", [[1, 2], "note", 3, None], ids=["list", "str", "int", "none"])
def test_custom_metadata_of_any_json_kind_both_ways(tmp_path, custom):
    # Orbax takes any JSON value as an item's custom metadata, not only an object.
    tree = {"a": np.arange(3)}
    for lib, name in ((ocp, "ours"), (orbax, "theirs")):
        with lib.Checkpointer(lib.StandardCheckpointHandler()) as ckptr:
            ckptr.save(tmp_path / name, args=lib.args.StandardSave(tree, custom_metadata=custom))
    with orbax.StandardCheckpointer() as ockptr:
        assert ockptr.metadata(tmp_path / "ours").item_metadata.custom_metadata == custom
    with ocp.StandardCheckpointer() as ckptr:
        for name in ("ours", "theirs"):
            assert ckptr.metadata(tmp_path / name).item_metadata.custom_metadata == custom
            assert_bits_equal(ckptr.restore(tmp_path / name)["a"], tree["a"])


@pytest.mark.parametrize("rows", [6, 2], ids=["padded", "cut"])
def test_standard_restore_not_strict_fits_arrays_as_orbax_does(tmp_path, mesh, rows):
    # StandardRestore(strict=False): a stored array of another shape is cut or padded with
    # zeros to the target's (Orbax 0.12.8), whichever library wrote it.
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    stored = np.arange(16, dtype=np.float32).reshape(4, 4)
    tree = {"embed": jax.device_put(stored, sharding), "host": stored + 1}
    target = {"embed": jax.ShapeDtypeStruct((rows, 4), jnp.float32, sharding=sharding),
              "host": jax.ShapeDtypeStruct((rows, 4), jnp.float32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ours", tree)
    with orbax.StandardCheckpointer() as ockptr:
        ockptr.save(tmp_path / "theirs", tree)
    results = {}
    for lib in (ocp, orbax):
        with lib.Checkpointer(lib.StandardCheckpointHandler()) as ckptr:
            for name in ("ours", "theirs"):
                results[lib.__name__, name] = ckptr.restore(
                    tmp_path / name, args=lib.args.StandardRestore(target, strict=False))
    expected = np.zeros((rows, 4), np.float32)
    expected[:min(rows, 4)] = stored[:rows]
    for out in results.values():
        assert_bits_equal(out["embed"], expected)
        assert out["embed"].sharding == sharding
    # A NumPy array too (Orbax returns those in the stored shape, its docstring
    # notwithstanding; ckpt_async fits every array alike).
    host = expected + (np.arange(rows) < 4)[:, None].astype(np.float32)
    for name in ("ours", "theirs"):
        assert_bits_equal(results["ckpt_async", name]["host"], host)
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(ocp.errors.ShapeMismatchError):
        ckptr.restore(tmp_path / "ours", target)  # (strict: the stored shape or an error)


def test_scalars_into_abstract_targets_without_sharding_come_back_as_orbax_returns_them(
        tmp_path):
    tree = {"step": 3, "lr": 1.5, "a": np.arange(2, dtype=np.float32)}
    target = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "lr": jax.ShapeDtypeStruct((), jnp.float32),
              "a": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ours", tree)
    with orbax.StandardCheckpointer() as ockptr:
        ockptr.save(tmp_path / "theirs", tree)
        expected = ockptr.restore(tmp_path / "ours", target)
    for lib in (ocp, orbax):
        with lib.StandardCheckpointer() as ckptr:
            for name in ("ours", "theirs"):
                out = ckptr.restore(tmp_path / name, target)
                for k, v in out.items():
                    assert type(v) is type(expected[k]) is np.ndarray
                    assert_bits_equal(v, expected[k])


def test_pytree_restore_takes_only_the_structure_of_its_item_as_orbax_does(tmp_path):
    # PyTreeRestore(item): the item's leaves say where each value goes, not what it becomes;
    # its restore_args do that.
    tree = {"w": jnp.ones(3, jnp.bfloat16), "n": np.arange(3, dtype=np.int32)}
    item = {"w": np.zeros(3), "n": np.zeros(3)}  # float64 placeholders
    rargs = {"w": ocp.RestoreArgs(restore_type=np.ndarray), "n": ocp.RestoreArgs(dtype=np.int64)}
    orargs = {"w": orbax.RestoreArgs(restore_type=np.ndarray),
              "n": orbax.RestoreArgs(dtype=np.int64)}
    for lib, name in ((ocp, "ours"), (orbax, "theirs")):
        with lib.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / name, args=lib.args.PyTreeSave(tree))
    for lib, restore_args in ((ocp, rargs), (orbax, orargs)):
        with lib.PyTreeCheckpointer() as ckptr:
            for name in ("ours", "theirs"):
                plain = ckptr.restore(tmp_path / name, args=lib.args.PyTreeRestore(item=item))
                assert isinstance(plain["w"], jax.Array) and type(plain["n"]) is np.ndarray
                assert_bits_equal(plain["w"], tree["w"])
                assert_bits_equal(plain["n"], tree["n"])
                cast = ckptr.restore(tmp_path / name, args=lib.args.PyTreeRestore(
                    item=item, restore_args=restore_args))
                assert type(cast["w"]) is np.ndarray and cast["n"].dtype == np.int64
                assert_bits_equal(cast["w"], np.asarray(tree["w"]))


def test_json_documents_and_metrics_take_subclasses_of_json_types_as_orbax_does(tmp_path):
    # np.mean gives an np.float64, a float: Orbax's json module writes it, so does ckpt_async.
    class Mode(enum.StrEnum):
        TRAIN = "train"

    doc = {"lr": np.float64(1e-3), "mode": Mode.TRAIN, "steps": [np.float64(-0.0), 2]}
    for lib, name in ((ocp, "ours"), (orbax, "theirs")):
        with lib.Checkpointer(lib.JsonCheckpointHandler()) as ckptr:
            ckptr.save(tmp_path / name, args=lib.args.JsonSave(doc))
    for lib in (ocp, orbax):
        with lib.Checkpointer(lib.JsonCheckpointHandler()) as ckptr:
            for name in ("ours", "theirs"):
                out = ckptr.restore(tmp_path / name, args=lib.args.JsonRestore())
                assert out == {"lr": 1e-3, "mode": "train", "steps": [-0.0, 2]}
                assert type(out["lr"]) is float and math.copysign(1, out["steps"][0]) == -1
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        for step, loss in enumerate(np.array([0.5, 0.25, 0.75])):
            mngr.save(step, args=ocp.args.StandardSave({"a": np.ones(2)}),
                      metrics={"loss": loss})  # (an np.float64)
        mngr.wait_until_finished()
        assert mngr.best_step() == 1
    with orbax.CheckpointManager(tmp_path / "run") as omngr:
        assert omngr.metadata(1).metrics == {"loss": 0.25}


class _Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(_Pair, lambda p: ((p.a, p.b), None), lambda _, ch: _Pair(*ch))


def test_a_custom_node_without_keys_restores_as_a_list_as_in_orbax(tmp_path):
    tree = {"p": _Pair(np.ones(2, np.float32), np.arange(3, dtype=np.int8))}
    for lib, name in ((ocp, "ours"), (orbax, "theirs")):
        with lib.StandardCheckpointer() as ckptr:
            ckptr.save(tmp_path / name, tree)
    for lib in (ocp, orbax):
        with lib.StandardCheckpointer() as ckptr:
            for name in ("ours", "theirs"):
                out = ckptr.restore(tmp_path / name)["p"]
                assert type(out) is list and len(out) == 2, (lib.__name__, name, out)
                assert_bits_equal(out[0], tree["p"].a)
                assert_bits_equal(out[1], tree["p"].b)


def test_to_shape_dtype_struct_agrees_with_orbax(mesh):
    key = jax.random.key(0)
    leaves = [3, 1.5, True, np.float32(2.0), np.int8(-1), np.ones((2, 3), np.int8),
              jnp.ones((2,), jnp.bfloat16), jax.ShapeDtypeStruct((4,), jnp.float32), key,
              jax.device_put(np.ones((4, 2), np.float32), NamedSharding(mesh, PartitionSpec("x")))]
    for leaf in leaves:
        for kwargs in ({}, {"dtype": jnp.float16}, {"scalar_dtype": int}):
            ours = ocp.utils.to_shape_dtype_struct(leaf, **kwargs)
            theirs = orbax.utils.to_shape_dtype_struct(leaf, **kwargs)
            assert type(ours) is type(theirs) and ours == theirs, (leaf, kwargs)


def test_to_shape_dtype_struct_of_restore_metadata_rebuilds_the_sharding(tmp_path, mesh):
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    tree = {"w": jax.device_put(np.arange(8, dtype=np.float32).reshape(4, 2), sharding)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        meta = ckptr.metadata(tmp_path / "c").item_metadata.tree
        abstract_tree = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, meta)
        assert abstract_tree == {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=sharding)}
        out = ckptr.restore(tmp_path / "c", abstract_tree)
    assert_bits_equal(out["w"], tree["w"])
    assert out["w"].sharding == sharding


# --- Orbax writes, ckpt_async restores -------------------------------------------------------
FORMATS = [
    pytest.param(True, False, id="ocdbt-zarr2"),
    pytest.param(True, True, id="ocdbt-zarr3"),
    pytest.param(False, False, id="plain-zarr2"),
    pytest.param(False, True, id="plain-zarr3"),
]


@pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), FORMATS)
def test_orbax_pytree_to_ckpt_async(tmp_path, mesh, use_ocdbt, use_zarr3):
    state = make_state(mesh)
    handler = orbax.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    with orbax.Checkpointer(handler) as ockptr:
        ockptr.save(tmp_path / "c", args=orbax.args.PyTreeSave(state))
    # the format under test is the one Orbax wrote
    assert (tmp_path / "c" / "manifest.ocdbt").exists() == use_ocdbt
    if not use_ocdbt:
        marker = "zarr.json" if use_zarr3 else ".zarray"
        assert (tmp_path / "c" / "params.w" / marker).is_file()
    with ocp.PyTreeCheckpointer() as ckptr:
        as_saved = ckptr.restore(tmp_path / "c")
        into = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
            abstract(state), restore_args=jax.tree_util.tree_map(
                lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding)
                if isinstance(x, jax.Array) else ocp.RestoreArgs(restore_type=np.ndarray), state)))
        meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert_state_equal(as_saved, state)
    assert_state_equal(into, state)
    assert meta["params"]["b"].dtype == ml_dtypes.bfloat16
    assert meta["params"]["w"].shape == (8, 4)


@pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), FORMATS)
def test_orbax_bare_array_to_ckpt_async(tmp_path, use_ocdbt, use_zarr3):
    # (without OCDBT the array's zarr files lie in the item's folder itself: ckpt_async
    # refused the empty name as a path outside the checkpoint)
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    handler = orbax.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    with orbax.Checkpointer(handler) as ockptr:
        ockptr.save(tmp_path / "c", args=orbax.args.PyTreeSave(value))
    assert (tmp_path / "c" / ("zarr.json" if use_zarr3 else ".zarray")).exists() != use_ocdbt
    with ocp.PyTreeCheckpointer() as ckptr:
        assert_bits_equal(ckptr.restore(tmp_path / "c"), value)
        meta = ckptr.metadata(tmp_path / "c").item_metadata.tree
    assert (meta.shape, meta.dtype) == ((2, 3), np.float32)
    report = ocp.verify(tmp_path / "c")
    assert report.ok and report.arrays_checked == 1


def test_orbax_standard_to_ckpt_async_with_target(tmp_path, mesh):
    state = make_state(mesh)
    with orbax.StandardCheckpointer() as ockptr:  # OCDBT, zarr v2, zstd: Orbax's defaults
        ockptr.save(tmp_path / "c", state)
    other = NamedSharding(mesh, PartitionSpec("y", "x"))
    target = abstract(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=other)
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "c", target)
    assert out["params"]["w"].sharding == other
    assert_state_equal(out, state, check_sharding=False)
    assert out["params"]["h"].sharding == state["params"]["h"].sharding


@pytest.mark.parametrize("item", ["default", "state"])
def test_orbax_manager_directory_to_ckpt_async(tmp_path, mesh, item):
    state = make_state(mesh)
    with orbax.CheckpointManager(tmp_path / "run") as mngr:
        for step in (1, 2):
            args = orbax.args.StandardSave(jax.tree_util.tree_map(lambda x: x * step, state))
            if item != "default":
                args = orbax.args.Composite(**{item: args})
            mngr.save(step, args=args)
        mngr.wait_until_finished()
    # Orbax puts a single unnamed item in <step>/default, a named one in <step>/<name>.
    assert sorted(p.name for p in (tmp_path / "run" / "2").iterdir() if p.is_dir()) == [item]
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "run" / "2" / item, abstract(state))
    assert_state_equal(out, jax.tree_util.tree_map(lambda x: x * 2, state))


MIXED = {"i": 3, "f": 0.5, "b": True, "npf": np.float32(2.5), "s": "hello",
         "nested": {"t": "ünï"}, "n": None, "e": {}, "l": [1, 2.0], "t": (),
         "empties": [(), {}, []]}


def test_orbax_scalars_strings_and_empties_restore_as_orbax_restores_them(tmp_path):
    with orbax.PyTreeCheckpointer() as ockptr:
        ockptr.save(tmp_path / "c", MIXED)
        expected = ockptr.restore(tmp_path / "c")
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "c")
    assert out == expected
    assert jax.tree_util.tree_map(type, out) == jax.tree_util.tree_map(type, expected)


@pytest.mark.parametrize("kind", ["Standard", "PyTree"])
def test_orbax_dicts_of_fields_in_their_order_come_back_sorted_as_in_orbax(tmp_path, kind):
    """A dataclass's fields (flax's TrainState: step, params, opt_state) or an OrderedDict are
    saved in their own order; Orbax gives them back as dicts with sorted keys, in a restore
    without a target and in the metadata tree. ckpt_async gave them in the saved order."""

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class State:
        step: jax.Array
        params: dict
        opt_state: collections.OrderedDict

    state = State(jnp.asarray(3), {"w": jnp.ones(2)},
                  collections.OrderedDict([("mu", jnp.zeros(2)), ("10", jnp.ones(1)),
                                           ("9", jnp.ones(1))]))
    with getattr(orbax, f"{kind}Checkpointer")() as ockptr:
        ockptr.save(tmp_path / "c", state)
        expected = ockptr.restore(tmp_path / "c")
        expected_meta = ockptr.metadata(tmp_path / "c").item_metadata.tree
    with getattr(ocp, f"{kind}Checkpointer")() as ckptr:
        out = ckptr.restore(tmp_path / "c")
        meta = ckptr.metadata(tmp_path / "c").item_metadata.tree

    def keys(tree):
        return [(k, keys(v)) for k, v in tree.items()] if isinstance(tree, dict) else None

    assert keys(out) == keys(expected_meta) == keys(meta) == keys(expected) == [
        ("opt_state", [("10", None), ("9", None), ("mu", None)]), ("params", [("w", None)]),
        ("step", None)]


def test_ckpt_async_scalars_strings_and_empties_to_orbax(tmp_path):
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", MIXED)
    with orbax.PyTreeCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c")
    assert out == {**MIXED, "npf": 2.5}
    assert type(out["i"]) is int and type(out["b"]) is bool and out["n"] is None
    assert out["t"] == () and out["empties"] == [(), {}, []]  # (an empty tuple is a "Tuple")


def test_ckpt_async_zero_size_arrays_to_orbax(tmp_path):
    tree = {"z": np.zeros((0, 3), np.float32), "a": np.arange(2, dtype=np.int8)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
    with orbax.PyTreeCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c")
    for k, v in tree.items():
        assert_bits_equal(out[k], v)


def test_args_take_orbax_fields_in_orbax_order():
    # Positional args mean what they mean in Orbax; ckpt_async's extra fields come after.
    import dataclasses
    for ours, theirs in ((ocp.args.StandardSave, orbax.args.StandardSave),
                         (ocp.args.StandardRestore, orbax.args.StandardRestore),
                         (ocp.args.PyTreeSave, orbax.args.PyTreeSave),
                         (ocp.args.PyTreeRestore, orbax.args.PyTreeRestore),
                         (ocp.args.JsonSave, orbax.args.JsonSave),
                         (ocp.SaveArgs, orbax.SaveArgs), (ocp.RestoreArgs, orbax.RestoreArgs),
                         (ocp.ArrayRestoreArgs, orbax.ArrayRestoreArgs)):
        names = [f.name for f in dataclasses.fields(ours)]
        orbax_names = [f.name for f in dataclasses.fields(theirs)]
        assert names[:len(orbax_names)] == orbax_names, ours.__name__


# --- construct_restore_args and PLACEHOLDER, side by side with Orbax -------------------------
def _describe(tree):
    """Each leaf's type, dtype, shape, sharding and bits (or the PLACEHOLDER)."""
    def leaf(x):
        if x is ...:
            return "PLACEHOLDER"
        sharding = x.sharding.spec if isinstance(getattr(x, "sharding", None),
                                                 NamedSharding) else None
        arr = np.asarray(x)
        return (type(x).__name__, str(arr.dtype), arr.shape, str(sharding),
                zlib.crc32(arr.tobytes()))
    return jax.tree_util.tree_map(leaf, tree, is_leaf=lambda x: x is ...)


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_construct_restore_args_and_placeholders_restore_as_in_orbax(tmp_path, mesh, writer):
    state = make_state(mesh)
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(state))
    other = NamedSharding(mesh, PartitionSpec("y", None))
    target = abstract(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), np.float32, sharding=other)
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.PyTreeCheckpointer() as ckptr:
            ra = lib.checkpoint_utils.construct_restore_args(target)
            full = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(target, ra))
            item = {**target, "opt": [lib.PLACEHOLDER, target["opt"][1]], "host": lib.PLACEHOLDER}
            ra = lib.checkpoint_utils.construct_restore_args(item)
            holes = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(item, ra))
            holes_item_only = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(item))
        outcomes[name] = [_describe(full), _describe(holes), _describe(holes_item_only),
                          jax.tree_util.tree_map(lambda a: type(a).__name__, ra,
                                                 is_leaf=lambda x: x is ...)]
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    full, holes = outcomes["ckpt_async"][:2]
    assert full["params"]["w"][3] == str(PartitionSpec("y", None))
    assert holes["opt"][0] == holes["host"] == "PLACEHOLDER"


def test_placeholders_are_skipped_where_orbax_reads_them_or_refuses_them(tmp_path):
    """The migration guide's differences: leaves marked PLACEHOLDER are not read in a
    partial restore (Orbax reads them there) nor in a ``StandardRestore`` (Orbax refuses the
    target); ``transforms={}`` needs no restore args (Orbax refuses it without them)."""
    tree = {"params": {"w": np.arange(4.0), "b": np.ones(2)}, "opt": [np.arange(3)], "n": 7}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
    item = {"params": {"w": ocp.PLACEHOLDER, "b": np.zeros(2)}, "n": 0}
    for lib in (ocp, orbax):
        with lib.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(
                item, partial_restore=True))
        assert set(out) == {"params", "n"} and out["n"] == 7
        assert_bits_equal(out["params"]["b"], tree["params"]["b"])
        if lib is ocp:
            assert out["params"]["w"] is ocp.PLACEHOLDER
        else:
            assert_bits_equal(out["params"]["w"], tree["params"]["w"])
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
            {"params": {"b": 0}}, transforms={}))
    assert set(out) == {"params"} and set(out["params"]) == {"b"}
    with orbax.PyTreeCheckpointer() as ckptr, pytest.raises(ValueError, match="restore_args"):
        ckptr.restore(tmp_path / "c", args=orbax.args.PyTreeRestore(
            {"params": {"b": 0}}, transforms={}))
    arrays = {"w": np.arange(4.0), "b": np.ones(2)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "s", arrays)
        out = ckptr.restore(tmp_path / "s", {"w": ocp.PLACEHOLDER, "b": np.zeros(2)})
    assert out["w"] is ocp.PLACEHOLDER
    assert_bits_equal(out["b"], arrays["b"])
    with orbax.StandardCheckpointer() as ckptr, pytest.raises(ValueError, match="Unsupported"):
        ckptr.restore(tmp_path / "s", {"w": orbax.PLACEHOLDER, "b": np.zeros(2)})


def test_construct_restore_args_takes_numpy_scalars_orbax_refuses(tmp_path):
    # A documented superset: Orbax's construct_restore_args raises ValueError for a NumPy
    # scalar (other than np.float64) or a complex leaf; ckpt_async's restores each as its type,
    # ml_dtypes' scalars (which both save) included.
    tree = {"f": np.float32(1.5), "i": np.int64(-3), "b": np.bool_(True), "c": 1 - 2j,
            "h": ml_dtypes.bfloat16(-2.5), "e": ml_dtypes.float8_e4m3fn(3), "n": ml_dtypes.int4(-7)}
    for key in tree:
        with pytest.raises(ValueError, match="Unsupported type"):
            orbax.checkpoint_utils.construct_restore_args({key: tree[key]})
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        ra = ocp.checkpoint_utils.construct_restore_args(tree)
        out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(tree, ra))
    assert {k: type(v) for k, v in out.items()} == {k: type(v) for k, v in tree.items()}
    assert out == tree
    # a NumPy string gives str, as in Orbax; a NumPy scalar that cannot be saved is refused
    for lib in (ocp, orbax):
        assert lib.checkpoint_utils.construct_restore_args({"s": np.str_("x")})["s"] == \
            lib.RestoreArgs(restore_type=str)
    with pytest.raises(ocp.errors.InvalidArgumentError, match="datetime64"):
        ocp.checkpoint_utils.construct_restore_args({"t": np.datetime64(1, "D")})


def test_a_numpy_string_leaf_is_saved_as_a_string_as_orbax_saves_it(tmp_path):
    # (np.str_ is a NumPy scalar and a str: ckpt_async refused it as a NumPy scalar of a dtype
    # it cannot store until round 40; Orbax saves it as a string, and both give a str back)
    tree = {"s": np.str_("hello"), "a": np.arange(3)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ours", tree)
        ours = ckptr.restore(tmp_path / "ours")
    with orbax.PyTreeCheckpointer() as ockptr:
        theirs = ockptr.restore(tmp_path / "ours")
    for out in (ours, theirs):
        assert type(out["s"]) is str and out["s"] == "hello"
        assert_bits_equal(np.asarray(out["a"]), tree["a"])


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_array_restore_args_take_sharding_metadata_as_orbax_does(tmp_path, mesh, writer):
    # ArrayRestoreArgs(sharding=...) takes a ShardingMetadata too (Orbax: to_jax_sharding()),
    # as item_metadata() gives them; something else is refused, naming the key.
    state = make_state(mesh)
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(state))
    named = NamedSharding(mesh, PartitionSpec("y", None))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        ra = lib.checkpoint_utils.construct_restore_args(state)
        ra["params"]["w"] = lib.ArrayRestoreArgs(
            sharding=lib.metadata.NamedShardingMetadata.from_jax_sharding(named))
        ra["opt"][0] = lib.ArrayRestoreArgs(
            sharding=lib.metadata.SingleDeviceShardingMetadata.from_jax_sharding(single))
        with lib.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(state, ra))
        outcomes[name] = (_describe(out), out["params"]["w"].sharding, out["opt"][0].sharding)
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    assert outcomes["ckpt_async"][1:] == (named, single)
    ra = ocp.checkpoint_utils.construct_restore_args(state)
    ra["params"]["w"] = ocp.ArrayRestoreArgs(sharding=abstract(state)["params"]["w"])
    with ocp.PyTreeCheckpointer() as ckptr, pytest.raises(
            ocp.errors.InvalidArgumentError, match=r"c: key 'params\.w': sharding=ShapeDtype"):
        ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(state, ra))


def test_array_restore_args_with_a_mesh_and_a_sharding_take_the_mesh_as_orbax_does(
        tmp_path, mesh):
    # Orbax's ArrayHandler builds NamedSharding(mesh, mesh_axes) when both are given, whatever
    # `sharding` says (its docstring says the opposite; its code is what users get).
    state = make_state(mesh)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(state))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        ra = lib.checkpoint_utils.construct_restore_args(state)
        ra["params"]["w"] = lib.ArrayRestoreArgs(sharding=single, mesh=mesh,
                                                 mesh_axes=PartitionSpec(None, "x"))
        with lib.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(state, ra))
        outcomes[name] = (_describe(out), out["params"]["w"].sharding)
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    assert outcomes["ckpt_async"][1] == NamedSharding(mesh, PartitionSpec(None, "x"))


def test_string_leaves_sit_at_their_json_pointers_as_orbax_writes_them(tmp_path):
    # Orbax reads and writes _strings.json through the JSON Pointer '/' + name: a key "x/y"
    # is member y of member x, and "~1" in a key is "/".
    tree = {"x/y": "hello", "a~1b": "tilde", "plain": "p", "n": np.arange(3)}
    files = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / name, args=lib.args.PyTreeSave(tree))
        files[name] = json.loads((tmp_path / name / "_strings.json").read_text())
    assert files["ckpt_async"] == files["orbax"] == {
        "x": {"y": "hello"}, "a/b": "tilde", "plain": "p"}
    for writer in files:
        for lib in (ocp, orbax):
            with lib.PyTreeCheckpointer() as ckptr:
                out = ckptr.restore(tmp_path / writer)
            assert {k: out[k] for k in ("x/y", "a~1b", "plain")} == {
                "x/y": "hello", "a~1b": "tilde", "plain": "p"}, (writer, lib.__name__)
    # Both spellings in one tree: each key gets its own string back, partial restores too.
    both = {"a/b": "slash", "a~1b": "tilde"}
    with orbax.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "both", args=orbax.args.PyTreeSave(both))
    with ocp.PyTreeCheckpointer() as ckptr:
        assert ckptr.restore(tmp_path / "both") == both
        assert ckptr.restore(tmp_path / "both", args=ocp.args.PyTreeRestore(
            {"a/b": ""}, partial_restore=True)) == {"a/b": "slash"}
        with pytest.raises(ocp.errors.InvalidArgumentError, match="JSON Pointer"):
            ckptr.save(tmp_path / "clash", args=ocp.args.PyTreeSave({"x": "s", "x/y": "t"}))


def test_string_leaves_of_checkpoints_written_before_the_pointer_layout_read_back(
        tmp_path, monkeypatch):
    import ckpt_async._format as fmt
    import ckpt_async.handlers.pytree as pytree_handler

    tree = {"x/y": "hello", "a~1b": "tilde"}
    with monkeypatch.context() as m:  # (the writer of ckpt_async's version 1: plain members)
        m.setattr(pytree_handler, "STRINGS_AT_POINTERS", 1)
        m.setattr(fmt, "strings_document", dict)
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / "old", args=ocp.args.PyTreeSave(tree))
    assert json.loads((tmp_path / "old" / "_strings.json").read_text()) == tree
    with ocp.PyTreeCheckpointer() as ckptr:
        assert ckptr.restore(tmp_path / "old") == tree


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_scalar_restore_types_cast_as_orbax_casts_them(tmp_path, writer):
    tree = {"f": 2.5, "i": 7, "g": np.float64(1.25), "one": np.arange(1)}
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(tree))
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        ra = {"f": lib.RestoreArgs(restore_type=np.float32),
              "i": lib.RestoreArgs(restore_type=np.int16),
              "g": lib.RestoreArgs(restore_type=float), "one": lib.RestoreArgs()}
        with lib.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(restore_args=ra))
            with pytest.raises(ValueError):  # (a shape-(1,) array is no scalar)
                ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(
                    restore_args={**ra, "one": lib.RestoreArgs(restore_type=int)}))
        outcomes[name] = {k: (type(v).__name__, repr(v)) for k, v in out.items() if k != "one"}
    assert outcomes["ckpt_async"] == outcomes["orbax"] == {
        "f": ("float32", "np.float32(2.5)"), "i": ("int16", "np.int16(7)"),
        "g": ("float", "1.25")}


def test_a_restore_type_the_leaf_cannot_restore_as_is_refused_as_in_orbax(tmp_path):
    # ckpt_async ignored such a restore_type and gave the leaf as stored; Orbax raises a
    # ValueError (a string read as an array or an array as a string, a type no TypeHandler is
    # registered for). ckpt_async refuses before reading, naming the key.
    tree = {"w": np.arange(4, dtype=np.float32), "s": "text", "i": 3}
    with orbax.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=orbax.args.PyTreeSave(tree))
    mismatch, no_type = ocp.errors.InvalidArgumentError, ocp.errors.InvalidTypeError
    cases = [("w", str, mismatch), ("s", np.ndarray, mismatch), ("s", int, mismatch),
             ("w", dict, no_type), ("i", object, no_type)]
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.PyTreeCheckpointer() as ckptr:
            for key, rtype, error in cases:
                ra = {k: lib.RestoreArgs(restore_type=rtype if k == key else None) for k in tree}
                with pytest.raises(error if name == "ckpt_async" else ValueError,
                                   match=f"'{key}'" if name == "ckpt_async" else None):
                    ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(restore_args=ra))
    # bytes: Orbax makes bytes(7) of an int (seven zero bytes), and fails on a float; refused
    with ocp.PyTreeCheckpointer() as ckptr:
        with pytest.raises(ocp.errors.InvalidTypeError, match="'i'.*bytes"):
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(restore_args={
                "w": ocp.RestoreArgs(), "s": ocp.RestoreArgs(),
                "i": ocp.RestoreArgs(restore_type=bytes)}))


def test_array_restore_args_asking_for_numpy_give_numpy_as_in_orbax(tmp_path):
    # openpi's restore_params(..., restore_type=np.ndarray) passes ArrayRestoreArgs so.
    w = jax.numpy.arange(8, dtype=jax.numpy.float32)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"w": w, "v": w * 2})
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        ra = {"w": lib.ArrayRestoreArgs(restore_type=np.ndarray, sharding=sharding,
                                        dtype=np.dtype("bfloat16")),
              "v": lib.ArrayRestoreArgs(restore_type=np.ndarray)}
        with lib.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(restore_args=ra))
        outcomes[name] = {k: (type(v).__name__, str(v.dtype), v.tolist()) for k, v in out.items()}
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    assert outcomes["orbax"]["w"][:2] == ("ndarray", "bfloat16")


def test_array_restore_args_without_a_restore_type_give_the_stored_type_as_in_orbax(tmp_path):
    # (a NumPy scalar is left out: Orbax gives a Python number, ckpt_async the NumPy scalar)
    tree = {"n": np.arange(3, dtype=np.int16), "i": 7, "f": 2.5, "z": np.array(4, np.int32),
            "j": jnp.arange(3.0)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        ra = {k: lib.ArrayRestoreArgs(restore_type=None, sharding=sharding) for k in tree}
        ra["i"] = lib.ArrayRestoreArgs(restore_type=None, dtype=np.float32)
        for item in (None, tree):  # (restore args alone, and beside an item)
            with lib.PyTreeCheckpointer() as ckptr:
                out = ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(
                    item=item, restore_args=ra))
            outcomes[name, item is None] = {k: (type(v).__name__, np.asarray(v).dtype.name,
                                                np.asarray(v).tolist()) for k, v in out.items()}
            assert out["j"].sharding == sharding
    assert outcomes["ckpt_async", True] == outcomes["orbax", True] == \
        outcomes["ckpt_async", False] == outcomes["orbax", False]
    assert [outcomes["orbax", True][k][0] for k in tree] == [
        "ndarray", "float", "float", "ndarray", "ArrayImpl"]



@pytest.mark.parametrize("dtype", ["uint8", "int32", "uint64", "bfloat16", "float16"])
def test_dtype_casts_give_orbax_s_bits_for_nans_and_values_out_of_range(tmp_path, dtype):
    """Orbax casts through TensorStore's cast driver, on save (SaveArgs(dtype=...)) and on
    restore (RestoreArgs(dtype=...)); NumPy and ml_dtypes convert NaN payloads, floats out of
    an integer type's range (bfloat16 -1.0 as uint8: 0, TensorStore 255) and some large
    integers (to bfloat16) otherwise. ckpt_async gave NumPy's bits."""
    f32 = np.array([np.nan, -np.nan, -1.0, -2.5, 300.0, 7e4, 3e9, -3e9, 1e19, np.inf, 0.5],
                   np.float32)
    f32[:1].view(np.uint32)[0] = 0x7F800001  # (a signalling NaN)
    with np.errstate(over="ignore"):
        f16 = f32.astype(np.float16)
    tree = {"f32": f32, "bf16": f32.astype(ml_dtypes.bfloat16),
            "j_bf16": jnp.asarray(f32.astype(ml_dtypes.bfloat16)), "f16": f16,
            "u32": np.array([4286578625, 1128267838, 5], np.uint32),
            "i64": np.array([-3377699631938747431, -1625799494611433063], np.int64)}
    with orbax.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=orbax.args.PyTreeSave(tree))
    restored = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        args = lib.args.PyTreeRestore(restore_args={k: lib.RestoreArgs(dtype=np.dtype(dtype))
                                                    for k in tree})
        with lib.PyTreeCheckpointer() as ckptr:
            restored[name] = ckptr.restore(tmp_path / "c", args=args)
            ckptr.save(tmp_path / name, args=lib.args.PyTreeSave(
                tree, save_args={k: lib.SaveArgs(dtype=np.dtype(dtype)) for k in tree}))
    with orbax.PyTreeCheckpointer() as ckptr:
        saved = {name: ckptr.restore(tmp_path / name) for name in ("ckpt_async", "orbax")}
    for key in tree:
        assert_bits_equal(restored["ckpt_async"][key], restored["orbax"][key])
        assert_bits_equal(saved["ckpt_async"][key], saved["orbax"][key])
    assert np.asarray(restored["orbax"]["bf16"]).dtype == np.dtype(dtype)


# (a script per library: Orbax's refused restore leaves its coroutines unawaited behind it)
_OPEN_ARRAY_RESTORE_ARGS = """
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
lib = __import__("orbax.checkpoint" if sys.argv[1] == "orbax" else "ckpt_async",
                 fromlist=["_"])
single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
split = NamedSharding(Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y")), PartitionSpec("x"))
item = {"a": np.zeros((4, 6), np.float16),
        "b": jax.ShapeDtypeStruct((8,), jnp.int16, sharding=split),
        "s": np.float64(0),  # (0-d: gives nothing, in Orbax too)
        "loose": np.zeros(3, np.int64)}  # (its restore args are not strict: nothing)
ra = {"a": lib.ArrayRestoreArgs(sharding=single), "b": lib.ArrayRestoreArgs(sharding=split),
      "s": lib.ArrayRestoreArgs(sharding=single),
      "loose": lib.ArrayRestoreArgs(sharding=single, strict=False)}
with lib.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(sys.argv[2], args=lib.args.PyTreeRestore(item=item, restore_args=ra))
    result = {k: [type(v).__name__, str(v.dtype), list(v.shape), np.asarray(v).tolist(),
                  v.sharding == ra[k].sharding] for k, v in out.items()}
    try:
        ckptr.restore(sys.argv[2], args=lib.args.PyTreeRestore(
            item={**item, "a": np.zeros((2, 6), np.float32)}, restore_args=ra))
    except ValueError as exc:
        result["other shape"] = type(exc).__name__
print(json.dumps(result), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_array_restore_args_leaving_dtype_and_shape_open_take_the_items_as_in_orbax(
        tmp_path, writer):
    """PyTreeRestore(item, restore_args) whose ArrayRestoreArgs name a sharding but no dtype
    or shape: Orbax takes them from the item's leaf (an array of one dimension or more, with
    strict restore args), so the array comes back in the item's dtype and a shape other than
    the stored one is refused. (ckpt_async read them as saved, the item's leaves ignored.)"""
    import subprocess
    import sys

    tree = {"a": np.arange(24, dtype=np.float32).reshape(4, 6) / 3,
            "b": np.arange(8, dtype=np.int32) * 1000, "s": np.float32(2.5),
            "loose": np.arange(3, dtype=np.float32) + 0.5}
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(tree))
    outcomes = {}
    for lib in ("ckpt_async", "orbax"):
        done = subprocess.run([sys.executable, "-c", _OPEN_ARRAY_RESTORE_ARGS, lib,
                               str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outcomes[lib] = json.loads(done.stdout.strip().splitlines()[-1])
    mismatch = outcomes["ckpt_async"].pop("other shape")
    assert mismatch == "ShapeMismatchError" and outcomes["orbax"].pop("other shape") == "ValueError"
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    assert {k: v[1] for k, v in outcomes["orbax"].items()} == {
        "a": "float16", "b": "int16", "s": "float32", "loose": "float32"}
    assert all(v[4] for v in outcomes["orbax"].values())  # (on the shardings asked for)
    assert_bits_equal(np.asarray(outcomes["orbax"]["a"][3], np.float16),
                      tree["a"].astype(np.float16))


@pytest.mark.parametrize("kind", ["Standard", "PyTree"])
def test_item_metadata_kinds_of_leaves_as_orbax_reports_them(tmp_path, kind):
    # A NumPy scalar under StandardSave is an array to Orbax (ArrayMetadata, with storage),
    # and a scalar under PyTreeSave; tools read the chunk layout from either.
    tree = {"a": np.ones(2, np.float32), "f": np.float32(1.5), "i": np.int64(3), "py": 2.0}
    kinds = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.Checkpointer(getattr(lib, f"{kind}CheckpointHandler")()) as ckptr:
            ckptr.save(tmp_path / name, args=getattr(lib.args, f"{kind}Save")(tree))
            meta = ckptr.metadata(tmp_path / name).item_metadata.tree
        kinds[name] = {k: (type(v).__name__, v.storage is not None) for k, v in meta.items()}
    assert kinds["ckpt_async"] == kinds["orbax"]


def test_empty_transforms_restore_what_the_item_names_as_in_orbax(tmp_path):
    # Orbax's older idiom for loading parameters alone (MaxText): transforms={}.
    full = {"params": {"w": np.ones((2, 3), np.float32)}, "opt": {"mu": np.zeros(3)}, "step": 5}
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / name, full)
            item = {"params": {"w": np.zeros((2, 3), np.float32)}}
            ra = {"params": {"w": lib.RestoreArgs(restore_type=np.ndarray)}}
            out = ckptr.restore(tmp_path / name, item=item, transforms={}, restore_args=ra)
        outcomes[name] = _describe(out)
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    assert list(outcomes["orbax"]) == ["params"]


def test_checkpointer_metadata_of_a_managers_step_has_no_item_metadata_as_in_orbax(tmp_path):
    # gemma's loader asks a step directory first, then descends into its item's folder.
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.CheckpointManager(tmp_path / name) as mngr:
            mngr.save(1, args=lib.args.Composite(default=lib.args.StandardSave(
                {"params": {"w": np.ones(2)}})))
        ckptr = lib.StandardCheckpointer()
        assert ckptr.metadata(tmp_path / name / "1").item_metadata is None
        tree = ckptr.metadata(tmp_path / name / "1" / "default").item_metadata.tree
        assert list(tree) == ["params"] and tree["params"]["w"].shape == (2,)
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(ocp.errors.CheckpointNotFoundError):
        ckptr.metadata(tmp_path / "nothing")


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_typed_prng_keys_restore_through_construct_restore_args_as_in_orbax(tmp_path, writer):
    # flax NNX's idiom: PyTreeRestore(item=state, restore_args=construct_restore_args(state)),
    # the state holding a Dropout's RngStream key; concrete or from jax.eval_shape.
    tree = {"rng": jax.random.key(3), "w": np.ones(2, np.float32)}
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(tree))
    concrete = {"rng": jax.random.key(9), "w": np.zeros(2, np.float32)}
    abstract = jax.eval_shape(lambda: concrete)
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        with lib.PyTreeCheckpointer() as ckptr:
            got = [ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(
                item=target, restore_args=lib.checkpoint_utils.construct_restore_args(target)))
                for target in (concrete, abstract)]
        outcomes[name] = [(str(o["rng"].dtype), np.asarray(
            jax.random.key_data(o["rng"]) if jax.dtypes.issubdtype(
                o["rng"].dtype, jax.dtypes.prng_key) else o["rng"]).tolist()) for o in got]
    assert outcomes["ckpt_async"] == outcomes["orbax"]
    assert outcomes["orbax"][0] == ("key<fry>", np.asarray(
        jax.random.key_data(tree["rng"])).tolist())


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_typed_prng_keys_round_trip_as_in_orbax(tmp_path, mesh, writer):
    # flax NNX states hold typed keys (an RngStream): stored as their key data, with the
    # implementation in array_metadatas (Orbax's ext_metadata.random_key_impl).
    sharded = NamedSharding(mesh, PartitionSpec(("x", "y")))
    tree = {"rng": jax.random.key(3), "keys": jax.device_put(jax.random.split(jax.random.key(1), 4),
                                                           sharded),
            "rbg": jax.random.key(5, impl="rbg"), "w": np.ones(2)}
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
    entries = json.loads((tmp_path / "c" / "array_metadatas" / "process_0").read_text())
    impls = {e["array_metadata"]["param_name"]: e["array_metadata"]["ext_metadata"]
             for e in entries["array_metadatas"] if e["array_metadata"].get("ext_metadata")}
    assert impls == {"rng": {"random_key_impl": "threefry2x32"},
                     "keys": {"random_key_impl": "threefry2x32"},
                     "rbg": {"random_key_impl": "rbg"}}
    for lib in (ocp, orbax):
        with lib.StandardCheckpointer() as ckptr:
            typed = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                     for k, v in tree.items() if k != "w"}  # (targets of the keys' own types)
            for out in (ckptr.restore(tmp_path / "c"),
                        ckptr.restore(tmp_path / "c", jax.tree.map(
                            lib.utils.to_shape_dtype_struct, tree)),
                        ckptr.restore(tmp_path / "c", {**typed, "w": tree["w"]})):
                for name in ("rng", "keys", "rbg"):
                    got, want = out[name], tree[name]
                    assert got.dtype == want.dtype and got.shape == want.shape, (lib, name)
                    assert_bits_equal(jax.random.key_data(got), jax.random.key_data(want))
                assert out["keys"].sharding.is_equivalent_to(sharded, 1), lib


# Empty pytree nodes: optax's EmptyState (an empty NamedTuple, in every optax optimizer state)
# and MaskedNode, an empty registered dataclass. Orbax stores each as a leaf of value type
# "None" that is not read; a target names them as leaves.
class EmptyState(tuple):  # (collections.namedtuple with no fields, as optax defines it)
    __slots__ = ()
    _fields: tuple = ()

    def __new__(cls):
        return tuple.__new__(cls, ())

    def __repr__(self):
        return "EmptyState()"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EmptyNode:
    pass


class FrozenMap(collections.abc.Mapping):  # (as flax's FrozenDict: a mapping pytree node)
    def __init__(self, data=()):
        self._data = dict(data)

    def __getitem__(self, k):
        return self._data[k]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __eq__(self, other):
        return type(other) is FrozenMap and self._data == other._data


jax.tree_util.register_pytree_with_keys(
    FrozenMap, lambda m: ([(jax.tree_util.DictKey(k), v) for k, v in m.items()], tuple(m)),
    lambda keys, values: FrozenMap(zip(keys, values)))


@pytest.mark.parametrize("writer", ["orbax", "ckpt_async"])
def test_an_empty_mapping_node_is_an_empty_dict_entry_as_in_orbax(tmp_path, writer):
    state = {"w": jnp.ones(2), "f": FrozenMap()}
    lib = orbax if writer == "orbax" else ocp
    lib.PyTreeCheckpointer().save(tmp_path / "c", args=lib.args.PyTreeSave(state))
    entries = json.loads((tmp_path / "c" / "_METADATA").read_text())["tree_metadata"]
    assert entries["('f',)"]["value_metadata"]["value_type"] == "Dict"
    for reader in (orbax, ocp):
        out = reader.PyTreeCheckpointer().restore(tmp_path / "c",
                                                  args=reader.args.PyTreeRestore(state))
        assert out["f"] == FrozenMap()
        assert_bits_equal(out["w"], state["w"])


def _optimizer_like_state():
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3)},
            "opt_state": (EmptyState(), ({"mu": jnp.ones(3), "count": jnp.asarray(2)},
                                         EmptyState()), EmptyNode()),
            "step": jnp.asarray(5, jnp.int32)}


def _same_state(out, expected):
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(expected),
                    strict=True):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("writer", ["orbax", "ckpt_async"])
def test_empty_nodes_restore_into_a_target_across_the_libraries(tmp_path, writer):
    state = _optimizer_like_state()
    lib_w, lib_r = (orbax, ocp) if writer == "orbax" else (ocp, orbax)
    ckptr = lib_w.StandardCheckpointer()
    ckptr.save(tmp_path / "c", state)
    ckptr.wait_until_finished()
    # The same entries either way: a "None" leaf per empty node, not read.
    entries = json.loads((tmp_path / "c" / "_METADATA").read_text())["tree_metadata"]
    for key in ("('opt_state', '0')", "('opt_state', '1', '1')", "('opt_state', '2')"):
        assert entries[key]["value_metadata"] == {"value_type": "None",
                                                  "skip_deserialize": True}
    for lib in (lib_r, lib_w):
        reader = lib.StandardCheckpointer()
        _same_state(reader.restore(tmp_path / "c", state), state)
        _same_state(reader.restore(tmp_path / "c", jax.eval_shape(lambda: state)), state)
    # Without a target, Orbax makes each empty node None (and the tuples lists).
    as_orbax = orbax.PyTreeCheckpointer().restore(tmp_path / "c")
    assert as_orbax["opt_state"][0] is None and as_orbax["opt_state"][2] is None


def test_empty_nodes_restore_as_saved_and_from_checkpoints_without_their_entries(tmp_path):
    state = _optimizer_like_state()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "c", state)
    ckptr.wait_until_finished()
    out = ckptr.restore(tmp_path / "c")
    assert out["opt_state"][0] == EmptyState() and out["opt_state"][1][1] == EmptyState()
    assert out["opt_state"][2] is None  # (its class is not recorded: None, as from Orbax)
    # ckpt_async 0.1.0 wrote no entry for an empty node (only its type in the skeleton): such
    # a checkpoint still restores into a target naming the node.
    path = tmp_path / "c" / "_METADATA"
    doc = json.loads(path.read_text())
    for key in ("('opt_state', '0')", "('opt_state', '1', '1')", "('opt_state', '2')"):
        del doc["tree_metadata"][key]

    gone = {1, 4, 5}  # (the three empty nodes' leaves; the others move up)
    renumber = {i: i - sum(g < i for g in gone) for i in range(7) if i not in gone}

    def old_skeleton(node):
        if node[0] == "Z":
            return node[2]
        if node[0] == "N" and node[1] in gone:  # (the empty dataclass: then an empty dict)
            return ["D", []]
        if node[0] in ("L", "N", "E"):
            return [node[0], renumber[node[1]], *node[2:]]
        if node[0] == "D":
            return ["D", [[k, kt, old_skeleton(c)] for k, kt, c in node[1]]]
        if node[0] in ("l", "t"):
            return [node[0], [old_skeleton(c) for c in node[1]]]
        if node[0] == "T":
            return [*node[:3], [old_skeleton(c) for c in node[3]]]
        return node

    doc["ckpt_async"]["skeleton"] = old_skeleton(doc["ckpt_async"]["skeleton"])
    data = json.dumps(doc).encode()
    path.write_bytes(data)
    sums_path = tmp_path / "c" / "_CHECKSUMS"
    sums = json.loads(sums_path.read_text())
    sums["documents"]["_METADATA"] = zlib.crc32(data)
    sums_path.write_text(json.dumps(sums))
    _same_state(ckptr.restore(tmp_path / "c", state), state)
    assert ckptr.restore(tmp_path / "c")["opt_state"][2] == {}  # (as 0.1.0 restored it)
    with pytest.raises(ocp.errors.StructureMismatchError):  # (a leaf with data still counts)
        ckptr.restore(tmp_path / "c", {**state, "extra": jnp.zeros(1)})


def test_an_empty_dict_in_a_partial_restore_item_reads_none_of_that_subtree(tmp_path):
    """``PyTreeRestore(item, partial_restore=True)`` with ``{}`` where the checkpoint has a
    subtree: ckpt_async gives ``{}`` there and reads the rest; Orbax refuses such an item (the
    migration note's "More is accepted")."""
    tree = {"a": {"x": np.arange(3), "y": np.ones(2)}, "b": np.arange(4.0)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
    part = {"a": {}, "b": np.zeros(4)}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(item=part,
                                                                         partial_restore=True))
    assert out["a"] == {} and set(out) == {"a", "b"}
    assert_bits_equal(out["b"], tree["b"])
    with orbax.PyTreeCheckpointer() as ckptr, pytest.raises(TypeError):
        ckptr.restore(tmp_path / "c", args=orbax.args.PyTreeRestore(item=part,
                                                                    partial_restore=True))


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_a_partial_restore_takes_lists_whole_as_orbax_does(tmp_path, writer):
    """A partial restore leaves out dict keys the item does not name, but a list or tuple of
    the item must have the checkpoint's length (ValueError), and a sequence where the
    checkpoint has a dict or the other way round is refused (TypeError), as Orbax's
    ``tree_trim`` refuses them. ckpt_async restored a prefix of the list (or added the item's
    values past its end, or took a dict's '0' for a list's first element)."""
    tree = {"l": [np.arange(2.0), np.arange(3)], "d": {"x": np.ones(2), "y": 3},
            "n": {"m": [[1, 2], [3]]}}
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(tree))
    items = {"short": ({"l": [np.zeros(2)]}, ValueError),
             "long": ({"l": [np.zeros(2), np.zeros(3), np.zeros(1)]}, ValueError),
             "short tuple": ({"l": (np.zeros(2),)}, ValueError),
             "nested": ({"n": {"m": [[1], [3]]}}, ValueError),
             "dict for a list": ({"l": {"0": np.zeros(2)}}, TypeError),
             "list for a dict": ({"d": [np.zeros(2)]}, TypeError)}
    for name, (item, error) in items.items():
        for lib in (ocp, orbax):
            with lib.PyTreeCheckpointer() as ckptr, pytest.raises(error):
                ckptr.restore(tmp_path / "c", args=lib.args.PyTreeRestore(
                    item=item, partial_restore=True))
                pytest.fail(f"{name}: {lib.__name__} restored it")
    with ocp.PyTreeCheckpointer() as ckptr:
        with pytest.raises(ocp.errors.StructureMismatchError, match=r"\('l',\).* 1 elements, "
                                                                     r"the checkpoint's 2"):
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                item={"l": [np.zeros(2)]}, partial_restore=True))
        out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
            item={"l": [np.zeros(2), np.zeros(3)], "d": {"y": 0}}, partial_restore=True))
    assert out["d"] == {"y": 3} and set(out) == {"l", "d"}
    assert_bits_equal(out["l"][1], tree["l"][1])


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_a_dict_where_the_checkpoint_has_a_list_is_named_as_such(tmp_path, writer):
    """A restore (not partial) into a target with a dict of keys '0', ... where the
    checkpoint has a list, or a list where it has a dict: refused (a ValueError, as Orbax
    refuses it), the message naming the node and what each side has there. It read
    "missing from the target: ('l', '1')", as if the dict's '0' were the list's index 0."""
    tree = {"l": [np.arange(2.0), np.arange(3)], "d": {"x": np.ones(2)}}
    lib_w = ocp if writer == "ckpt_async" else orbax
    with lib_w.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=lib_w.args.PyTreeSave(tree))
    items = {"dict for a list": ({"l": {"0": np.zeros(2)}, "d": {"x": np.zeros(2)}},
                                 r"the target has a dict at \('l',\), the checkpoint a list "
                                 r"or tuple\)$"),
             "list for a dict": ({"l": [np.zeros(2), np.zeros(3)], "d": [np.zeros(2)]},
                                 r"the target has a list or tuple at \('d',\), the checkpoint "
                                 r"a dict\)$")}
    for item, message in items.values():
        with orbax.PyTreeCheckpointer() as ckptr, pytest.raises(ValueError):
            ckptr.restore(tmp_path / "c", args=orbax.args.PyTreeRestore(item=item))
        with ocp.PyTreeCheckpointer() as ckptr, pytest.raises(
                ocp.errors.StructureMismatchError,
                match=r"/c: the target tree's structure differs from the checkpoint's \(" +
                message):
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(item=item))


@pytest.mark.parametrize("how", ["raw", "large", "compressed"])
def test_a_bare_array_as_the_whole_tree_is_stored_at_the_items_root_as_orbax_stores_it(
        tmp_path, how):
    # (its keys were ``/.zarray`` and ``/0``: Orbax could not open it, nor metadata() or verify)
    rows = 40_000 if how == "large" else 4  # (large: 960 KB, written by the zarr driver)
    value = np.arange(rows * 6, dtype=np.int32).reshape(rows, 6)
    handler = ocp.PyTreeCheckpointHandler(use_compression=how == "compressed")
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(value))
        meta = ckptr.metadata(tmp_path / "c").item_metadata
        assert (meta.tree.shape, meta.tree.dtype) == ((rows, 6), np.int32)
        assert_bits_equal(ckptr.restore(tmp_path / "c"), value)
    assert ocp.verify(tmp_path / "c").ok
    with orbax.PyTreeCheckpointer() as ockptr:
        assert_bits_equal(ockptr.restore(tmp_path / "c"), value)


@pytest.mark.parametrize("rows", [5, 240_000])  # (raw, and large: its chunks by the driver)
def test_a_bare_array_written_under_a_slash_before_restores_reads_and_verifies(
        tmp_path, monkeypatch, capsys, rows):
    # (it restored, but metadata(), verify and the CLI's verify could not open it)
    import asyncio

    import ckpt_async._ocdbt as ocdbt
    import ckpt_async._serialize as ser
    from ckpt_async import cli

    value = np.arange(rows, dtype=np.int32)
    with monkeypatch.context() as m:  # (the layout ckpt_async wrote before: keys under '/')
        m.setattr(ser, "array_prefix", lambda name: f"{name}/")
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp_path / "old", args=ocp.args.PyTreeSave(value))
    keys = set(ocdbt.read_index(tmp_path / "old"))
    assert "/.zarray" in keys and ".zarray" not in keys
    with ocp.PyTreeCheckpointer() as ckptr:
        assert_bits_equal(ckptr.restore(tmp_path / "old"), value)
        meta = ckptr.metadata(tmp_path / "old").item_metadata.tree
    assert (meta.shape, meta.dtype) == ((rows,), np.int32)
    meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "old").tree
    assert (meta.shape, meta.dtype) == ((rows,), np.int32)
    for report in (ocp.verify(tmp_path / "old"), asyncio.run(ocp.aio.verify(tmp_path / "old"))):
        assert report.ok and report.arrays_checked == 1 and report.bytes_checked == value.nbytes
    assert cli.main(["verify", str(tmp_path / "old")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"OK  {tmp_path / 'old'}: 1 arrays")


@pytest.mark.parametrize("compressed", [False, True])
def test_big_endian_numpy_leaves_are_stored_in_native_order_as_orbax_stores_them(
        tmp_path, compressed):
    # (staged as '>f4', the zarr driver stored little-endian bytes under a checksum of the
    # big-endian ones: the checkpoint never restored; on an object store Orbax read garbage)
    tree = {"f": (np.arange(8) - 3.5).astype(">f4"), "i": (np.arange(6) * -7).astype(">i8"),
            "c": (np.arange(3) * (1 + 2j)).astype(">c16")}
    assert not any(v.dtype.isnative for v in tree.values())
    handler = ocp.PyTreeCheckpointHandler(use_compression=compressed)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        out = ckptr.restore(tmp_path / "c")
    for key, value in tree.items():
        native = value.astype(value.dtype.newbyteorder("="))
        assert out[key].dtype == native.dtype
        assert_bits_equal(out[key], native)
    with orbax.PyTreeCheckpointer() as ockptr:
        theirs = ockptr.restore(tmp_path / "c")
    for key, value in tree.items():
        assert_bits_equal(theirs[key], value.astype(value.dtype.newbyteorder("=")))


def test_python_ints_past_int64_are_stored_as_uint64_as_orbax_stores_them(tmp_path):
    tree = {"max": 2**64 - 1, "mid": 2**63, "neg": -(2**63)}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        out = ckptr.restore(tmp_path / "c")
        assert out == tree and all(type(v) is int for v in out.values())
        with pytest.raises(ocp.errors.UnsupportedLeafError, match="uint64"):
            ckptr.save(tmp_path / "d", args=ocp.args.PyTreeSave({"x": 2**64}))
    assert not (tmp_path / "d").exists()
    with orbax.PyTreeCheckpointer() as ockptr:
        assert {k: int(v) for k, v in ockptr.restore(tmp_path / "c").items()} == tree


@pytest.mark.parametrize("args", ["standard", "pytree"])
def test_a_none_leaf_of_the_target_is_not_read_and_comes_back_none_as_in_orbax(tmp_path, args):
    # (it was read and returned: a table the caller meant to leave behind came into memory)
    tree = {"emb": np.ones((100, 8), np.float32), "w": np.arange(3.0), "s": "text"}
    target = {"emb": None, "w": np.zeros(3), "s": None}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
    restore = (ocp.args.StandardRestore(target) if args == "standard"
               else ocp.args.PyTreeRestore(target))
    with ocp.PyTreeCheckpointer() as ckptr:
        ours = ckptr.restore(tmp_path / "c", args=restore)
    theirs_args = (orbax.args.StandardRestore(target) if args == "standard"
                   else orbax.args.PyTreeRestore(target))
    handler = (orbax.StandardCheckpointHandler() if args == "standard"
               else orbax.PyTreeCheckpointHandler())
    with orbax.Checkpointer(handler) as ockptr:
        theirs = ockptr.restore(tmp_path / "c", args=theirs_args)
    assert ours["emb"] is None and ours["s"] is None
    assert {k: v is None for k, v in ours.items()} == {k: v is None for k, v in theirs.items()}
    assert_bits_equal(ours["w"], tree["w"])


@pytest.mark.parametrize("src,dst", [("bfloat16", "float32"), ("bfloat16", "float64"),
                                     ("float16", "float32"), ("float32", "float64")])
def test_the_widenings_cast_with_numpy_give_tensorstore_s_bits(src, dst):
    # _serialize.cast converts these with NumPy (faster) and every other pair through
    # TensorStore's cast driver, as Orbax does: every source value, NaNs with their payloads
    # included, must come out with the same bits either way (float32: its NaNs, infinities,
    # subnormals and a million others; all 2**32 were compared once, 90 s).
    import ml_dtypes  # noqa: F401 - (registers bfloat16 with NumPy)
    import tensorstore as ts

    from ckpt_async import _serialize

    if np.dtype(src).itemsize == 2:
        values = np.arange(1 << 16, dtype=np.uint16).view(np.dtype(src))
    else:
        low = np.arange(1 << 12, dtype=np.uint32)
        edges = np.concatenate([base | low for base in (0x0, 0x7F800000, 0x7FC00000, 0x7F7FF000)])
        rng = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint32)
        bits = np.concatenate([edges, edges | 0x80000000, rng])
        values = bits.view(np.float32)
    assert _serialize._same_in_numpy(values.dtype, np.dtype(dst))
    through_ts = ts.cast(ts.array(values), ts.dtype(dst)).read().result()
    ours = _serialize.cast(values, np.dtype(dst))
    bits = np.dtype(f"u{np.dtype(dst).itemsize}")
    np.testing.assert_array_equal(ours.view(bits), through_ts.view(bits))


@pytest.mark.parametrize("use_zarr3", [False, True])
def test_a_chunk_missing_from_an_orbax_checkpoint_is_damage_unless_it_says_it_left_them_out(
        tmp_path, use_zarr3):
    # Orbax (0.5 on) stores every chunk and says so in _METADATA
    # (store_array_data_equal_to_fill_value): a chunk not there is an error in its restore, as
    # in ckpt_async's, which until round 40 read it as zeros. A checkpoint saying it left out
    # chunks equal to the fill value reads one as the fill value, in both; so does one whose
    # _METADATA does not say (written before Orbax 0.5, which left such chunks out).
    tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8) + 1}
    with orbax.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=use_zarr3) as ockptr:
        ockptr.save(tmp_path / "c", tree)
    chunks = [p for p in (tmp_path / "c" / "w").rglob("*") if p.is_file()
              and not p.name.startswith((".z", "zarr.json"))]
    assert len(chunks) == 1
    chunks[0].unlink()
    with ocp.PyTreeCheckpointer() as ckptr, \
            pytest.raises(ocp.errors.CorruptCheckpointError, match="'w'.*missing"):
        ckptr.restore(tmp_path / "c")
    meta = tmp_path / "c" / "_METADATA"
    doc = json.loads(meta.read_text())
    for said in (False, None):
        if said is None:
            del doc["store_array_data_equal_to_fill_value"]
        else:
            doc["store_array_data_equal_to_fill_value"] = said
        meta.write_text(json.dumps(doc))
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(tmp_path / "c")
        with orbax.PyTreeCheckpointer() as ockptr:
            theirs = ockptr.restore(tmp_path / "c")
        assert_bits_equal(np.asarray(out["w"]), np.zeros((8, 8), np.float32))
        assert_bits_equal(np.asarray(theirs["w"]), np.zeros((8, 8), np.float32))
