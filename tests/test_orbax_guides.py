"""Orbax's checkpoint guides run on ckpt_async as they run on Orbax.

Orbax's documentation has, beside the API Overview (tests/test_api_overview.py), a guide per
topic (docs/guides/checkpoint/ of Orbax's repository): Orbax Checkpoint 101, Checkpointing
PyTrees, Async Checkpointing, Checkpoint Format, Optimized Checkpointing, Preemption
Checkpointing and the Debugging guide. Each function below takes the steps of one guide
in its order (written again here, with small arrays, in directories of the test's own) and
calls them through the module it is given, ``ckpt_async`` or ``orbax.checkpoint`` 0.12.8,
collecting what the guide shows: restored trees, metadata, step lists, files, errors. Each
test runs a guide with both libraries and asks for the same observations (arrays bit for
bit, with their types, dtypes and shardings), and where the guide restores it reads what
each library wrote with the other. The differences the guides show on purpose are asserted
as such; each is in docs/migration.md:

- ckpt_async's own files (``_CKPT_ASYNC`` in a step, ``_CHECKSUMS`` in an item), data files
  named by their content, and no per-process manifest in ``ocdbt.process_0/``;
- ``StepMetadata.performance_metrics`` is a dict, a metadata entry's ``directory`` and
  ``ocp.test_utils.erase_and_create_empty``'s result are ``pathlib.Path``s;
- chunks uncompressed (the debugging guide's disk usage) and one chunk per shard
  (``SaveArgs(chunk_byte_size=...)`` and ``ocdbt_target_data_file_size`` have no effect);
- ``get_json_tspec_read``'s spec has keys of its own, and opens the same array;
- ``CheckpointManagerOptions`` has ``max_concurrent_saves``; error messages are worded
  differently (their types are Orbax's).

The Transformations guide has no code left (Orbax replaced it by the partial restore of
Checkpointing PyTrees). No guide uses flax or optax.
"""

from __future__ import annotations

import asyncio
import collections
import json
import operator
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as orbax  # noqa: E402 - a test dependency: missing is a failure
import pytest
import tensorstore as ts
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ckpt_async

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")

OURS_ONLY = {"_CKPT_ASYNC", "_CHECKSUMS"}


def fp(value: Any) -> Any:
    """What a notebook shows of a value, comparable across the libraries: containers with
    their types, arrays with their type, dtype, shape, bytes and sharding."""
    if isinstance(value, jax.Array):
        return ("jax.Array", str(value.dtype), value.shape, np.asarray(value).tobytes(),
                repr(value.sharding))
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, np.generic | bool | int | float | str | type(None)):
        return (type(value).__name__, value)
    if value is Ellipsis:
        return ("placeholder",)
    if isinstance(value, dict):  # (in the order of its keys: a dict restored without a
        # target keeps the order it was saved in, where Orbax sorts it; migration.md)
        return ("dict", tuple(sorted((k, fp(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(fp(v) for v in value))
    if isinstance(value, jax.ShapeDtypeStruct):
        return ("ShapeDtypeStruct", value.shape, str(value.dtype), repr(value.sharding))
    return (type(value).__name__, re.sub(r"0x[0-9a-f]+", "0x", repr(value)))


def assert_same(ours: dict, theirs: dict, *, only: set | None = None) -> None:
    labels = only if only is not None else set(ours) | set(theirs)
    for label in sorted(labels):
        assert label in ours and label in theirs, label
        if isinstance(theirs[label], type):  # an error's type: Orbax's, or a subclass of it
            assert ours[label] is not None and issubclass(ours[label], theirs[label]), label
            continue
        if fp(ours[label]) != fp(theirs[label]):
            pytest.fail(f"{label}: {ours[label]!r}\n  differs from\n{theirs[label]!r}")


def raised(fn) -> type | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the guide prints what it catches
        return type(exc)
    return None


def sharded(values: dict, spec: PartitionSpec, axis: str = "model") -> dict:
    sharding = NamedSharding(Mesh(jax.devices(), (axis,)), spec)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), values)


def listing(directory: Path) -> list[str]:
    """The files and folders below ``directory``, as the guides print them, less ckpt_async's
    own files; data files are named by their content in both, so their names are left out."""
    out = []
    for path in sorted(Path(directory).rglob("*")):
        rel = path.relative_to(directory)
        if path.name in OURS_ONLY or rel.parent.name == "d":
            continue
        if rel.parent.name == "ocdbt.process_0" and path.name == "manifest.ocdbt":
            continue  # (Orbax's process manifest, which no reader opens; migration.md)
        out.append(str(rel) + ("/" if path.is_dir() else ""))
    return out


def flat_metadata(ocp: ModuleType, item_metadata) -> dict:
    return {".".join(k): (type(v).__name__, tuple(v.shape), str(v.dtype))
            for k, v in ocp.tree.to_flat_dict(item_metadata).items()}


# --- Orbax Checkpoint 101 -----------------------------------------------------------------

def guide_101(ocp: ModuleType, base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    root = ocp.test_utils.erase_and_create_empty(base / "my-checkpoints")
    tree = {"a": np.arange(8), "b": {"c": 42, "d": np.arange(16)}}
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    seen["target"] = target

    standard = ocp.StandardCheckpointer()
    standard.save(root / "checkpoint_name", tree)
    seen["standard"] = standard.restore(root / "checkpoint_name/", target)
    meta = standard.metadata(root / "checkpoint_name")
    seen["standard metadata"] = flat_metadata(ocp, meta.item_metadata)
    seen["standard handler"] = meta.item_handlers
    seen["standard metrics"] = (meta.metrics, meta.custom_metadata)

    doc = {"version": 1.0, "lang": "en"}
    composite = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    composite.save(root / "composite_checkpoint", args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), metadata=ocp.args.JsonSave(doc)))
    both = composite.restore(root / "composite_checkpoint")
    seen["composite state"], seen["composite metadata"] = both.state, both.metadata
    seen["composite files"] = sorted(
        p.name for p in (root / "composite_checkpoint").iterdir() if p.name not in OURS_ONLY)

    run = ocp.test_utils.erase_and_create_empty(base / "checkpoint_manager")
    state, extra = {"a": np.arange(8), "b": np.arange(16)}, [42, 43]
    mngr = ocp.CheckpointManager(
        run, options=ocp.CheckpointManagerOptions(max_to_keep=3, save_interval_steps=2),
        item_names=("state", "extra_params"))
    seen["saved"] = [mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra_params=ocp.args.JsonSave(extra)))
        for step in range(11)]
    mngr.wait_until_finished()
    ten = mngr.restore(10)
    seen["step 10"] = (ten.state, ten.extra_params)
    seen["steps"] = (mngr.all_steps(), mngr.latest_step(), mngr.should_save(11))
    mngr.close()

    run = ocp.test_utils.erase_and_create_empty(base / "checkpoint_manager_sharded")
    train_state = sharded({"a": np.arange(16), "b": np.ones(16)}, PartitionSpec("model"))
    seen["shardings"] = jax.tree_util.tree_map(lambda x: x.sharding, train_state)
    mngr = ocp.CheckpointManager(
        run, options=ocp.CheckpointManagerOptions(max_to_keep=3, save_interval_steps=2))
    step_fn = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x + 1, s))
    for step in range(10):
        train_state = step_fn(train_state)
        mngr.save(step, args=ocp.args.StandardSave(train_state))
    mngr.wait_until_finished()
    seen["sharded latest"] = mngr.restore(mngr.latest_step())
    zeros = sharded(jax.tree_util.tree_map(np.zeros_like, train_state), PartitionSpec(None))
    replicated = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, zeros)
    seen["replicated"] = mngr.restore(mngr.latest_step(),
                                      args=ocp.args.StandardRestore(replicated))
    seen["sharded steps"] = mngr.all_steps()
    mngr.close()
    standard.close()
    composite.close()
    return seen


def reread_101(ocp: ModuleType, base: Path) -> dict:
    """The restores of the 101 guide, with fresh objects, of what either library wrote."""
    seen: dict[str, Any] = {}
    root = base / "my-checkpoints"
    tree = {"a": np.arange(8), "b": {"c": 42, "d": np.arange(16)}}
    with ocp.StandardCheckpointer() as standard:
        seen["standard"] = standard.restore(
            root / "checkpoint_name", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                                             tree))
        seen["standard metadata"] = flat_metadata(
            ocp, standard.metadata(root / "checkpoint_name").item_metadata)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as composite:
        both = composite.restore(root / "composite_checkpoint")
        seen["composite state"], seen["composite metadata"] = both.state, both.metadata
    with ocp.CheckpointManager(base / "checkpoint_manager",
                               item_names=("state", "extra_params")) as mngr:
        ten = mngr.restore(10, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), extra_params=ocp.args.JsonRestore()))
        seen["step 10"] = (ten.state, ten.extra_params)
    with ocp.CheckpointManager(base / "checkpoint_manager_sharded") as mngr:
        seen["sharded steps"] = mngr.all_steps()
        latest = sharded({"a": np.zeros(16, np.int32), "b": np.zeros(16, np.float32)},
                         PartitionSpec("model"))
        seen["sharded latest"] = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(
            jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, latest)))
        zeros = sharded({"a": np.zeros(16, np.int32), "b": np.zeros(16, np.float32)},
                        PartitionSpec(None))
        seen["replicated"] = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(
            jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, zeros)))
    return seen


def test_orbax_checkpoint_101(tmp_path):
    ours = guide_101(ckpt_async, tmp_path / "ours")
    theirs = guide_101(orbax, tmp_path / "theirs")
    assert_same(ours, theirs)
    assert ours["saved"] == [True, False] * 5 + [True]
    assert ours["steps"] == ([6, 8, 10], 10, False)
    assert ours["composite metadata"] == {"version": 1.0, "lang": "en"}
    assert ours["composite files"] == [
        "_CHECKPOINT_METADATA", "commit_success.txt", "metadata", "state"]
    assert (tmp_path / "ours/my-checkpoints/composite_checkpoint/_CKPT_ASYNC").is_file()
    assert type(ckpt_async.test_utils.erase_and_create_empty(tmp_path / "p")) is type(Path())
    with ckpt_async.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(tmp_path / "ours/my-checkpoints/checkpoint_name")
        assert isinstance(meta.performance_metrics, dict)
    assert ours["sharded steps"] == [4, 6, 8]
    assert np.array_equal(ours["sharded latest"]["a"], np.arange(16) + 9)
    assert ours["replicated"]["b"].sharding.spec == PartitionSpec(None)
    assert ours["standard metadata"] == {"a": ("ArrayMetadata", (8,), "int64"),
                                         "b.c": ("ScalarMetadata", (), "int64"),
                                         "b.d": ("ArrayMetadata", (16,), "int64")}
    for reader in (ckpt_async, orbax):
        for writer in ("ours", "theirs"):
            assert_same(reread_101(reader, tmp_path / writer), theirs,
                        only={"standard", "standard metadata", "composite state",
                              "composite metadata", "step 10", "sharded steps",
                              "sharded latest", "replicated"})


# --- Checkpointing PyTrees ----------------------------------------------------------------

def partial_item(ocp: ModuleType, *, placeholders: bool) -> dict:
    layer2 = {"kernel": np.arange(8), "bias": np.arange(8)}
    if not placeholders:
        return {"params": {"layer2": layer2}, "step": 101}
    return {"params": {"layer1": {"kernel": ocp.PLACEHOLDER, "bias": ocp.PLACEHOLDER},
                       "layer2": layer2},
            "opt_state": [ocp.PLACEHOLDER, ocp.PLACEHOLDER], "step": 101}


REPLICATED = PartitionSpec()


def restore_basic(ocp: ModuleType, ckptr, one: Path, state: dict, seen: dict) -> None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    seen["abstract"] = abstract
    seen["into abstract"] = ckptr.restore(one, args=ocp.args.StandardRestore(abstract))
    seen["into arrays"] = ckptr.restore(one, args=ocp.args.StandardRestore(state))
    int16 = jax.tree_util.tree_map(lambda x: x.update(dtype=np.int16), abstract)
    seen["as int16"] = ckptr.restore(one, args=ocp.args.StandardRestore(int16))
    shapes = {"a": jax.ShapeDtypeStruct((8,), abstract["a"].dtype,
                                        sharding=abstract["a"].sharding),
              "b": jax.ShapeDtypeStruct((32,), abstract["b"].dtype,
                                        sharding=abstract["b"].sharding)}
    seen["other shapes refused"] = raised(
        lambda: ckptr.restore(one, args=ocp.args.StandardRestore(shapes)))
    seen["other shapes"] = ckptr.restore(one, args=ocp.args.StandardRestore(shapes, strict=False))
    seen["no target"] = ckptr.restore(one)
    replicated = NamedSharding(Mesh(jax.devices(), ("x",)), REPLICATED)
    moved = jax.tree_util.tree_map(lambda x: x.update(sharding=replicated), abstract)
    seen["resharded"] = ckptr.restore(one, args=ocp.args.StandardRestore(moved))


def restore_partial(ocp: ModuleType, ckptr, one: Path, seen: dict) -> None:
    seen["placeholders"] = ckptr.restore(one, args=ocp.args.PyTreeRestore(
        item=partial_item(ocp, placeholders=True)))
    seen["omitted refused"] = raised(lambda: ckptr.restore(one, args=ocp.args.PyTreeRestore(
        item=partial_item(ocp, placeholders=False))))
    seen["omitted"] = ckptr.restore(one, args=ocp.args.PyTreeRestore(
        item=partial_item(ocp, placeholders=False), partial_restore=True))


def restore_advanced(ocp: ModuleType, ckptr, advanced: Path, seen: dict) -> None:
    replicated = NamedSharding(Mesh(jax.devices(), ("x",)), REPLICATED)
    seen["saved as int16"] = ckptr.restore(advanced / "2")
    seen["restore args"] = ckptr.restore(advanced / "2", args=ocp.args.PyTreeRestore(
        restore_args={"a": ocp.RestoreArgs(restore_type=np.ndarray),
                      "b": ocp.ArrayRestoreArgs(dtype=np.dtype(np.int16), sharding=replicated)}))
    seen["renamed"] = ckptr.restore(advanced / "2", args=ocp.args.PyTreeRestore(
        item={"c": ..., "d": np.arange(8)},
        restore_args={"c": ocp.RestoreArgs(restore_type=np.ndarray)},
        transforms={"c": ocp.Transform(original_key="a")}))


def guide_pytrees(ocp: ModuleType, base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    state = sharded({"a": np.arange(16), "b": np.ones(16)}, PartitionSpec("model"))
    basic = ocp.test_utils.erase_and_create_empty(base / "basic")
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(basic / "1", args=ocp.args.StandardSave(state))
        ckptr.wait_until_finished()
        restore_basic(ocp, ckptr, basic / "1", state, seen)

    original = {"params": {"layer1": {"kernel": np.arange(8), "bias": np.arange(8)},
                           "layer2": {"kernel": np.arange(8), "bias": np.arange(8)}},
                "opt_state": [np.arange(8), np.arange(8)], "step": 101}
    partial = ocp.test_utils.erase_and_create_empty(base / "partial")
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(partial / "1", args=ocp.args.PyTreeSave(original))
        restore_partial(ocp, ckptr, partial / "1", seen)

    advanced = ocp.test_utils.erase_and_create_empty(base / "advanced")
    with ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        ckptr.save(advanced / "1", args=ocp.args.PyTreeSave(state))
        ckptr.wait_until_finished()
        seen["pytree"] = ckptr.restore(advanced / "1")
        ckptr.save(advanced / "2", args=ocp.args.PyTreeSave(
            state, save_args={"a": ocp.SaveArgs(dtype=np.dtype(np.int16)),
                              "b": ocp.SaveArgs()}))
        ckptr.wait_until_finished()
        restore_advanced(ocp, ckptr, advanced, seen)
    return seen


def reread_pytrees(ocp: ModuleType, base: Path, state: dict) -> dict:
    """The guide's restores, with fresh checkpointers, of what either library wrote."""
    seen: dict[str, Any] = {}
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        restore_basic(ocp, ckptr, base / "basic" / "1", state, seen)
    with ocp.PyTreeCheckpointer() as ckptr:
        restore_partial(ocp, ckptr, base / "partial" / "1", seen)
    with ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        seen["pytree"] = ckptr.restore(base / "advanced" / "1")
        restore_advanced(ocp, ckptr, base / "advanced", seen)
    return seen


def test_checkpointing_pytrees(tmp_path):
    ours = guide_pytrees(ckpt_async, tmp_path / "ours")
    theirs = guide_pytrees(orbax, tmp_path / "theirs")
    assert_same(ours, theirs)
    # (the guide prints the messages; their types are Orbax's, their wording ckpt_async's)
    assert issubclass(ours["other shapes refused"], ValueError)
    assert issubclass(ours["omitted refused"], ValueError)
    assert ours["placeholders"]["opt_state"] == [ckpt_async.PLACEHOLDER] * 2
    assert ours["saved as int16"]["a"].dtype == np.int16
    assert isinstance(ours["restore args"]["a"], np.ndarray)
    assert ours["restore args"]["b"].dtype == np.int16
    assert set(ours["renamed"]) == {"c", "d"}
    state = sharded({"a": np.arange(16), "b": np.ones(16)}, PartitionSpec("model"))
    for writer in ("ours", "theirs"):
        for reader in (ckpt_async, orbax):
            assert_same(reread_pytrees(reader, tmp_path / writer, state), theirs)


# --- Async Checkpointing ------------------------------------------------------------------

def guide_async(ocp: ModuleType, base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    train_state = {"layer0": {"kernel": np.ones((8, 8), dtype=np.float32),
                              "bias": np.ones((8,), dtype=np.float32)}}
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(epath.Path(base / "sync_checkpoint"), args=ocp.args.StandardSave(train_state))
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(epath.Path(base / "async_checkpoint"),
                   args=ocp.args.StandardSave(train_state))
        ckptr.wait_until_finished()
    mngr = ocp.CheckpointManager(epath.Path(base / "async_checkpoint_manager"))
    step = 0
    while step < 5:
        mngr.save(step, args=ocp.args.StandardSave(train_state))
        step += 1
    mngr.wait_until_finished()
    seen["steps"] = mngr.all_steps()
    mngr.close()
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    seen["sync option"] = options.enable_async_checkpointing
    seen["options repr"] = repr(options).split(", max_concurrent_saves=")[0].rstrip(")")
    for name in ("sync_checkpoint", "async_checkpoint"):
        with ocp.StandardCheckpointer() as ckptr:
            seen[name] = ckptr.restore(base / name)
    with ocp.CheckpointManager(base / "async_checkpoint_manager") as mngr:
        seen["latest"] = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())
    return seen


def test_async_checkpointing(tmp_path):
    ours = guide_async(ckpt_async, tmp_path / "ours")
    theirs = guide_async(orbax, tmp_path / "theirs")
    assert_same(ours, theirs)
    assert ours["steps"] == [0, 1, 2, 3, 4]
    assert ours["sync option"] is False
    assert "max_concurrent_saves=2" in repr(ckpt_async.CheckpointManagerOptions())
    for writer, reader in (("ours", orbax), ("theirs", ckpt_async)):
        for name in ("sync_checkpoint", "async_checkpoint"):
            with reader.StandardCheckpointer() as ckptr:
                assert fp(ckptr.restore(tmp_path / writer / name)) == fp(ours[name])
        with reader.CheckpointManager(tmp_path / writer / "async_checkpoint_manager") as mngr:
            assert mngr.all_steps() == [0, 1, 2, 3, 4]
            assert fp(mngr.restore(4, args=reader.args.StandardRestore())) == fp(ours["latest"])


# --- Checkpoint Format --------------------------------------------------------------------

def guide_format(ocp: ModuleType, base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    state = sharded({"a": np.arange(16), "b": np.ones(16)}, PartitionSpec("model"))
    state.update(c=np.arange(4), d=5, e="foo")
    run = ocp.test_utils.erase_and_create_empty(base / "checkpoint")
    with ocp.CheckpointManager(run, item_names=("state", "custom_data"),
                               metadata={"global_property": "foo"}) as mngr:
        mngr.save(0, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            custom_data=ocp.args.JsonSave({"lang": "en", "version": 1.2})))
    seen["files"] = listing(run)
    seen["step marker"] = (run / "0" / "commit_success.txt").read_text().replace(str(base), "")
    item = run / "0" / "state"
    document = json.loads((item / "_METADATA").read_text())
    document.pop("ckpt_async", None)  # (ckpt_async's extension, which Orbax ignores)
    seen["_METADATA"] = document

    context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}},
                         parent=jax.experimental.array_serialization.serialization.TS_CONTEXT)
    info = ocp.type_handlers.ParamInfo(name="a", parent_dir=item, is_ocdbt_checkpoint=True,
                                       use_zarr3=True)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
    seen["spec drivers"] = (spec["driver"], spec["kvstore"]["driver"],
                            spec["kvstore"]["path"].rstrip("/"))
    info = ocp.type_handlers.ParamInfo(name="a", parent_dir=item, is_ocdbt_checkpoint=True,
                                       use_zarr3=False)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
    seen["read by its spec"] = ts.open(ts.Spec(spec), open=True,
                                       context=context).result().read().result()
    seen["keys"] = sorted(ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"})
                          .result().list().result())
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/",
                                          "path": "a"}}
    seen["read by hand"] = ts.open(ts.Spec(spec), open=True,
                                   context=context).result().read().result()
    return seen


def test_checkpoint_format(tmp_path):
    ours = guide_format(ckpt_async, tmp_path / "ours")
    theirs = guide_format(orbax, tmp_path / "theirs")
    assert_same(ours, theirs)
    assert ours["step marker"] == "Checkpoint commit was successful to /checkpoint/0"
    assert ours["spec drivers"] == ("zarr3", "ocdbt", "a")
    assert np.array_equal(ours["read by hand"], np.arange(16))
    assert "0/state/manifest.ocdbt" in ours["files"]
    assert "0/_CHECKPOINT_METADATA" in ours["files"]
    assert (tmp_path / "ours/checkpoint/0/_CKPT_ASYNC").is_file()
    # (each library's step restores in the other, though the guide only reads the files)
    for writer, reader in (("ours", orbax), ("theirs", ckpt_async)):
        with reader.CheckpointManager(tmp_path / writer / "checkpoint",
                                      item_names=("state", "custom_data")) as mngr:
            out = mngr.restore(0, args=reader.args.Composite(
                state=reader.args.PyTreeRestore(), custom_data=reader.args.JsonRestore()))
            assert out.custom_data == {"lang": "en", "version": 1.2}
            assert np.array_equal(out.state["a"], np.arange(16)) and out.state["e"] == "foo"
            assert mngr.metadata().custom_metadata == {"global_property": "foo"}


# --- Optimized Checkpointing --------------------------------------------------------------

def guide_optimized(ocp: ModuleType, base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {}
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True)).close()
    _, key = jax.random.split(jax.random.PRNGKey(0))
    tree = {"a": jax.random.normal(key, (8 * 1024,), dtype=jax.numpy.float32),
            "b": jax.random.normal(key, (16 * 1024,), dtype=jax.numpy.float32)}
    save_args = jax.tree_util.tree_map(lambda x: ocp.SaveArgs(chunk_byte_size=1024), tree)
    for name, extra in (("small chunks", {}),
                        ("large files", {"ocdbt_target_data_file_size": 400 * 2**20})):
        run = base / name.replace(" ", "_")
        mngr = ocp.CheckpointManager(epath.Path(run),
                                     item_handlers=ocp.PyTreeCheckpointHandler(use_zarr3=True))
        mngr.save(0, args=ocp.args.PyTreeSave(tree, save_args=save_args, **extra))
        mngr.close()
        data = run / "0" / "default" / "ocdbt.process_0" / "d"
        seen[name] = sum(f.stat().st_size for f in data.iterdir() if f.is_file())
    seen["tree"] = tree
    return seen


def test_optimized_checkpointing(tmp_path):
    ours = guide_optimized(ckpt_async, tmp_path / "ours")
    theirs = guide_optimized(orbax, tmp_path / "theirs")
    assert_same(ours, theirs, only={"tree"})
    # (data files hold the arrays in both; Orbax's chunks are compressed and of 1 KiB,
    # ckpt_async's one per shard: chunk_byte_size has no effect, as migration.md says)
    for name in ("small chunks", "large files"):
        assert ours[name] >= 24 * 1024 * 4 and theirs[name] > 0
    tree = ours["tree"]
    for writer, reader in (("ours", orbax), ("theirs", ckpt_async)):
        with reader.CheckpointManager(tmp_path / writer / "small_chunks",
                                      item_handlers=reader.PyTreeCheckpointHandler()) as mngr:
            out = mngr.restore(0)
            meta = mngr.item_metadata(0)
            storage = getattr(meta, "tree", meta)["a"].storage
            assert storage.chunk_shape == ((8192,) if writer == "ours" else (256,))
        assert fp(out["a"]) == fp(tree["a"]) and fp(out["b"]) == fp(tree["b"])


# --- Preemption Checkpointing -------------------------------------------------------------

def guide_preemption(ocp: ModuleType, directory: Path) -> dict:
    seen: dict[str, Any] = {}
    mngr = ocp.CheckpointManager(str(directory), ocp.PyTreeCheckpointer(),
                                 ocp.CheckpointManagerOptions(save_interval_steps=4))
    state, first = {"a": 1, "b": 2}, 0
    if mngr.latest_step() is not None:
        first = mngr.latest_step()
        state = mngr.restore(first)
    seen["resumed from"] = (first, state)
    seen["saved"] = [mngr.save(step, state) for step in range(first, 12)]
    mngr.wait_until_finished()
    for step in range(first, 12):
        mngr.save(step, state)
        if mngr.reached_preemption(step):
            seen["preempted at"] = step
            break
    mngr.wait_until_finished()
    seen["steps"] = mngr.all_steps()
    mngr.close()
    return seen


def test_preemption_checkpointing(tmp_path):
    ours = guide_preemption(ckpt_async, tmp_path / "ours")
    theirs = guide_preemption(orbax, tmp_path / "theirs")
    assert_same(ours, theirs)
    assert ours["steps"] == [0, 4, 8] and "preempted at" not in ours
    assert ours["saved"] == [True, False, False, False] * 3
    # The job restarting, in either library, on what either wrote: it resumes from step 8.
    for writer in ("ours", "theirs"):
        for reader in (ckpt_async, orbax):
            again = guide_preemption(reader, tmp_path / writer)
            assert fp(again["resumed from"]) == fp((8, {"a": 1, "b": 2}))
            assert again["saved"] == [False] * 4 and again["steps"] == [0, 4, 8]


# --- Debugging guide ----------------------------------------------------------------------

async def disk_usage(path: epath.Path) -> int:
    async def size(p):
        if p.is_dir():
            return await disk_usage(p)
        return (await asyncio.to_thread(p.stat)).length

    return sum(await asyncio.gather(*(size(p) for p in path.iterdir())))


def inspect_checkpoint(ocp: ModuleType, path: epath.Path) -> dict:
    """The guide's inspection of a checkpoint, with the given library."""
    seen: dict[str, Any] = {}
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(path).item_metadata
    counts: dict[str, int] = collections.defaultdict(int)

    def nbytes(meta):
        counts[str(meta.dtype)] += 1
        return np.prod(meta.shape) * np.dtype(meta.dtype).itemsize

    seen["bytes"] = int(jax.tree.reduce(operator.add, jax.tree.map(nbytes, metadata)))
    seen["dtypes"] = dict(counts)
    names = [".".join(k) for k in ocp.tree.to_flat_dict(metadata)]
    seen["names"] = names
    keys = [k.decode() for k in ts.KvStore.open(
        {"driver": "ocdbt", "base": f"file://{path.as_posix()}"}).result().list().result()]
    assert sorted(names) == sorted(k.replace(".zarray", "")[:-1] for k in keys if ".zarray" in k)
    entry = {".".join(k): v for k, v in ocp.tree.to_flat_dict(metadata).items()}["a.x"]
    seen["a.x"] = (entry.shape, str(entry.dtype))
    context = ts.Context({"file_io_concurrency": {"limit": 128},
                          "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
    info = ocp.type_handlers.ParamInfo(name="a.x", parent_dir=path, is_ocdbt_checkpoint=True,
                                       use_zarr3=False)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
    seen["a.x values"] = ts.open(ts.Spec(spec), open=True, context=context).result() \
        .read().result()
    return seen


def guide_debug(ocp: ModuleType, base: Path) -> dict:
    base.mkdir(parents=True, exist_ok=True)
    # (the guide's largest array has 2**24 elements; 2**12 here)
    state = {"a": {"x": np.arange(2**12), "y": np.arange(1024)}, "b": np.ones(8), "c": 42}
    path = epath.Path(base / "checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
    seen = inspect_checkpoint(ocp, path)
    seen["disk usage"] = asyncio.run(disk_usage(path))
    return seen


def test_debug_guide(tmp_path):
    ours = guide_debug(ckpt_async, tmp_path / "ours")
    theirs = guide_debug(orbax, tmp_path / "theirs")
    # (ckpt_async writes chunks uncompressed: more bytes on disk, as migration.md says)
    assert ours.pop("disk usage") > theirs.pop("disk usage") > 0
    assert_same(ours, theirs)
    assert ours["bytes"] == (2**12 + 1024 + 8 + 1) * 8
    assert ours["dtypes"] == {"int64": 3, "float64": 1}
    assert ours["names"] == ["a.x", "a.y", "b", "c"]
    assert np.array_equal(ours["a.x values"], np.arange(2**12))
    for writer, reader in (("ours", orbax), ("theirs", ckpt_async)):
        assert_same(inspect_checkpoint(reader, epath.Path(tmp_path / writer / "checkpoint")),
                    theirs)
