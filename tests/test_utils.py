"""``ocp.utils`` and the ``ocp.tree`` helpers, against the real ``orbax.checkpoint`` on the
same trees and the same directories (object stores: ``_objstore_suite``)."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest

import ckpt_async as ocp
from ckpt_async.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    MissingIndexError,
    MissingKeyError,
    ShardingMismatchError,
)

NT = collections.namedtuple("NT", "x y")

TREES = [
    {"a": (1, 2), "b": NT(3, {"c": 4}), "e": {}, "n": None, "l": [5, [6, 7]]},
    [{"w": np.arange(3)}, (np.float32(1.5),), []],
    {"params": {"dense": {"kernel": np.ones((2, 2)), "bias": np.zeros(2)}}, "step": 7},
    {1: "int key", 2: {"t": {"u": ()}}},
    np.arange(4),
]


def _same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b), (a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y) and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("tree", TREES, ids=range(len(TREES)))
def test_serialize_and_flat_dicts_match_orbax(tree, keep: bool) -> None:
    _same(ocp.tree.serialize_tree(tree, keep), orbax.tree.serialize_tree(tree, keep))
    for sep in (None, "/"):
        ours = ocp.utils.to_flat_dict(tree, sep=sep, keep_empty_nodes=keep)
        theirs = orbax.utils.to_flat_dict(tree, sep=sep, keep_empty_nodes=keep)
        assert list(ours) == list(theirs)
        _same(list(ours.values()), list(theirs.values()))
        _same(ocp.utils.from_flat_dict(dict(ours), target=tree, sep=sep),
              orbax.utils.from_flat_dict(dict(theirs), target=tree, sep=sep))
        if not keep and isinstance(tree, dict) and sep is None:
            _same(ocp.utils.from_flat_dict(dict(ours)), orbax.utils.from_flat_dict(dict(theirs)))
    serialized = ocp.tree.serialize_tree(tree, keep)
    _same(ocp.tree.deserialize_tree(serialized, tree, keep),
          orbax.tree.deserialize_tree(serialized, tree, keep))


def test_serialize_tree_turns_tuples_into_lists_and_namedtuples_into_dicts() -> None:
    got = ocp.tree.serialize_tree({"t": (1, NT(2, 3)), "gap": [None, 4]})
    assert got == {"t": [1, {"x": 2, "y": 3}], "gap": [None, 4]}
    # (a list with a dropped element before a kept one: Orbax's fails an assert, see
    # migration.md; ckpt_async's gives None in its place, and deserialize_tree reads it)
    tree = {"d": [{}, {"x": "y"}, None], "e": [1, None, 2]}
    assert ocp.tree.serialize_tree(tree) == {"d": [None, {"x": "y"}], "e": [1, None, 2]}
    assert ocp.tree.deserialize_tree(ocp.tree.serialize_tree(tree), tree) == tree
    with pytest.raises(AssertionError):
        orbax.tree.serialize_tree(tree)
    with pytest.raises(InvalidArgumentError):
        ocp.tree.serialize_tree({"a": {}, "b": None})  # nothing to serialize


def test_from_flat_dict_inplace_and_errors() -> None:
    flat = {"a/b": 1, "a/c": 2, "d": 3}
    assert ocp.utils.from_flat_dict(flat, sep="/", inplace=True) == {"a": {"b": 1, "c": 2}, "d": 3}
    assert flat == {}
    assert ocp.utils.from_flat_dict({(): 5}) == 5
    # A key the target has and the values lack: Orbax's KeyError, an InvalidArgumentError too
    for lib in (ocp, orbax):
        with pytest.raises(KeyError):
            lib.utils.from_flat_dict({("a",): 1}, target={"a": 0, "b": 0})
        with pytest.raises(KeyError):
            lib.tree.deserialize_tree({"a": {}}, {"a": {"z": 1}})
    with pytest.raises(MissingKeyError, match=r"^flat_dict has no value for \[\('b',\)\]"):
        ocp.utils.from_flat_dict({("a",): 1}, target={"a": 0, "b": 0})
    with pytest.raises(MissingKeyError, match="^no value for 'a/z'"):
        ocp.tree.deserialize_tree({"a": {}}, {"a": {"z": 1}})


@pytest.mark.parametrize("serialized,target,builtin,cls,message", [
    ({"a": [1]}, {"a": [0, 0]}, IndexError, MissingIndexError,
     r"^no value for 'a/1' in the serialized tree \(its list at 'a' has 1 elements\)$"),
    ([1], [0, 0], IndexError, MissingIndexError, r"'1' .* \(its list as the root has 1 "),
    ({"a": [1]}, {"a": {"x": 0}}, TypeError, InvalidTypeError,
     r"^no value for 'a/x' in the serialized tree \(it has a value of type list at 'a'\)$"),
    ({"a": 1}, {"a": [0]}, TypeError, InvalidTypeError, r"'a/0' .* type int at 'a'\)$"),
    ({"a": None}, {"a": {"b": 0}}, TypeError, InvalidTypeError, r"type NoneType at 'a'\)$"),
])
def test_deserialize_tree_raises_the_builtin_orbax_raises(serialized, target, builtin, cls,
                                                          message) -> None:
    """A serialized tree lacking what the target has: the builtin Orbax raises (IndexError
    for a list too short, TypeError where there is no container to look in), mixed into an
    InvalidArgumentError naming the key and what is there instead."""
    with pytest.raises(builtin):
        orbax.tree.deserialize_tree(serialized, target)
    with pytest.raises(cls, match=message) as caught:
        ocp.tree.deserialize_tree(serialized, target)
    assert isinstance(caught.value, builtin) and isinstance(caught.value, InvalidArgumentError)


def test_to_shape_dtype_struct_is_the_tree_helper() -> None:
    x = jnp.ones((2, 3), jnp.bfloat16)
    s = ocp.utils.to_shape_dtype_struct(x)
    assert (s.shape, s.dtype, s.sharding) == ((2, 3), jnp.bfloat16, x.sharding)
    # A leaf without a shape (a string) is returned as it is (Orbax: ValueError; see
    # migration.md), so that a state with strings is described leaf by leaf.
    abstract = jax.tree.map(ocp.tree.to_shape_dtype_struct, {"w": x, "name": "run", "n": 3})
    assert abstract["name"] == "run" and abstract["n"] == 3
    with pytest.raises(ValueError):
        orbax.tree.to_shape_dtype_struct("run")


@pytest.mark.parametrize("name,step", [("12", 12), ("ckpt_0012", 12), ("a_b_7", 7),
                                       ("3.orbax-checkpoint-tmp-1712", 3),
                                       ("ckpt_5.orbax-checkpoint-tmp-99", 5)])
def test_step_from_checkpoint_name_matches_orbax(name: str, step: int) -> None:
    assert ocp.utils.step_from_checkpoint_name(name) == step
    assert orbax.utils.step_from_checkpoint_name(name) == step


@pytest.mark.parametrize("name", ["ckpt", "x.json", "_"])
def test_step_from_checkpoint_name_refuses_other_names(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ocp.utils.step_from_checkpoint_name(name)


def test_step_queries_on_a_manager_directory_match_orbax(tmp_path: Path) -> None:
    root = tmp_path / "run"
    assert ocp.utils.checkpoint_steps(root) == [] and ocp.utils.any_checkpoint_step(root) is None
    with ocp.CheckpointManager(root) as mngr:
        for step in (0, 5, 10):
            mngr.save(step, args=ocp.args.StandardSave({"w": np.arange(4) * step}))
    with ocp.CheckpointManager(tmp_path / "prefixed",
                               ocp.CheckpointManagerOptions(step_prefix="ckpt",
                                                            step_format_fixed_length=4)) as mngr:
        mngr.save(3, args=ocp.args.StandardSave({"w": np.arange(2)}))
    (root / "20.orbax-checkpoint-tmp-123").mkdir()  # a save cut short
    (root / "30").write_text("a stray file, not a step")
    (root / "notes").mkdir()

    assert ocp.utils.checkpoint_steps(root) == [0, 5, 10]
    assert sorted(orbax.utils.checkpoint_steps(root)) == [0, 5, 10]
    assert ocp.utils.checkpoint_steps(tmp_path / "prefixed") == [3]
    assert orbax.utils.checkpoint_steps(tmp_path / "prefixed") == [3]
    assert ocp.utils.any_checkpoint_step(root) == 10
    assert ocp.utils.tmp_checkpoints(root) == ["20.orbax-checkpoint-tmp-123"]
    for path, final in [(root / "5", True), (root / "20.orbax-checkpoint-tmp-123", False),
                        (tmp_path / "prefixed" / "ckpt_0003", True)]:
        assert ocp.utils.is_checkpoint_finalized(path) is final
        assert orbax.utils.is_checkpoint_finalized(path) is final
        assert ocp.utils.is_tmp_checkpoint(path) is (not final)
        assert orbax.utils.is_tmp_checkpoint(path) is (not final)
    assert ocp.utils.TMP_DIR_SUFFIX == orbax.utils.TMP_DIR_SUFFIX


def test_primary_host_and_barrier_in_one_process() -> None:
    assert ocp.utils.is_primary_host(0) and not ocp.utils.is_primary_host(1)
    ocp.utils.sync_global_processes("test_utils")  # one process: returns at once


def test_primary_host_none_is_every_process_as_in_orbax(monkeypatch, tmp_path) -> None:
    """On process 1 of a run: ``is_primary_host(None)`` is True (every process its own
    primary), and a MsgpackHandler given ``primary_host=None`` writes there, as Orbax's."""
    import asyncio

    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
    for primary in (None, 0, 1):
        assert ocp.utils.is_primary_host(primary) is orbax.utils.is_primary_host(primary) \
            is (primary != 0), primary
    for primary, written in ((None, True), (0, False)):
        path = tmp_path / f"checkpoint-{primary}"
        for lib in (ocp, orbax):
            handler = lib.aggregate_handlers.MsgpackHandler(primary_host=primary)
            asyncio.run(handler.serialize(path, {"a": 1})).result()
            assert path.exists() is written, (lib.__name__, primary)
            path.unlink(missing_ok=True)


def test_pmap_output_becomes_a_global_replicated_array_as_in_orbax(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    stacked = jax.pmap(lambda v: v * 2)(jnp.stack([x] * jax.local_device_count()))
    for lib in (orbax, ocp):  # (ckpt_async's result is the one saved below)
        out = lib.utils.fully_replicated_host_local_array_to_global_array(stacked)
        assert out.shape == (2, 3) and out.sharding.is_fully_replicated
        assert len(out.sharding.device_set) == len(jax.devices())
        np.testing.assert_array_equal(np.asarray(out), x * 2)
    with ocp.StandardCheckpointer() as ckptr:  # (saved as any replicated array)
        ckptr.save(tmp_path / "c", {"w": out})
        np.testing.assert_array_equal(np.asarray(ckptr.restore(tmp_path / "c")["w"]), x * 2)


def test_step_paths_and_atomicity_names_as_in_orbax(tmp_path):
    with ocp.CheckpointManager(tmp_path, ocp.CheckpointManagerOptions(
            step_prefix="ckpt", step_format_fixed_length=4,
            temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath)) as mngr:
        for step in (3, 12):
            mngr.save(step, args=ocp.args.StandardSave({"a": np.arange(2)}))
    (tmp_path / "5.orbax-checkpoint-tmp-1").mkdir()  # (a leftover: no step)
    for lib in (ocp, orbax):
        assert sorted(Path(p).name for p in lib.utils.checkpoint_steps_paths(tmp_path)) == [
            "ckpt_0003", "ckpt_0012"]
        name_format = lib.path.step.standard_name_format(step_prefix="ckpt",
                                                         step_format_fixed_length=4)
        assert str(lib.step.build_step_path(tmp_path, name_format, 7)) == str(
            tmp_path / "ckpt_0007")
    assert ocp.path.atomicity.COMMIT_SUCCESS_FILE == orbax.path.atomicity.COMMIT_SUCCESS_FILE


def test_older_helpers_answer_as_orbax_s():
    # t5x's checkpointing calls these; each is checked against Orbax's on the same values.
    @dataclasses.dataclass
    class Empty:
        pass

    jax.tree_util.register_dataclass(Empty, data_fields=[], meta_fields=[])
    values = [{}, [], (), None, 1, np.zeros(2), {"a": 1}, [None], Empty(), "PLACEHOLDER://x",
              {"a": "PLACEHOLDER://a", "b": "AGGREGATED://b"}, {"a": "PLACEHOLDER://a", "b": 2}]
    for fn in ("is_empty_node", "is_empty_or_leaf", "leaf_is_placeholder",
               "all_leaves_are_placeholders"):
        ours, theirs = getattr(ocp.utils, fn), getattr(orbax.utils, fn)
        for v in values:
            assert ours(v) == theirs(v), (fn, v)
    for name in ("params.w", "a/b"):
        held = ocp.utils.leaf_placeholder(name)
        assert held == orbax.utils.leaf_placeholder(name)
        assert ocp.utils.name_from_leaf_placeholder(held) == name
        assert ocp.utils.name_from_leaf_placeholder("AGGREGATED://" + name) == name
    with pytest.raises(ValueError):
        ocp.utils.name_from_leaf_placeholder("params.w")
    for path in ("gs://bucket/run", "/tmp/run", "s3://bucket/run"):
        assert ocp.utils.is_gcs_path(path) == path.startswith("gs://")


def test_record_saved_duration_records_the_time_since_the_last_checkpoint():
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/checkpoint/write/duration_since_last_checkpoint_secs":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        now = time.time()
        ocp.utils.record_saved_duration(now)
        ocp.utils.record_saved_duration(now + 30.0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(seen) == 2 and seen[0] >= 0 and seen[1] == pytest.approx(30.0)


def test_get_param_names_as_orbax_names_them():
    Point = collections.namedtuple("Point", "x y")
    trees = [{"a": {"b": 1, "c": [2, 3]}, "d": None, "e": {}},
             {"layers": [{"w": np.ones(2)}, {"w": np.zeros(2)}], "step": 7},
             Point(x=1, y={"z": 2}), {3: "int key", 4: (4, 5)}]
    for tree in trees:
        for include in (True, False):
            assert ocp.tree.get_param_names(tree, include_empty_nodes=include) == \
                orbax.tree.get_param_names(tree, include_empty_nodes=include), (tree, include)


@dataclasses.dataclass
class _Pair:
    u: object
    v: object


jax.tree_util.register_dataclass(_Pair, data_fields=["u", "v"], meta_fields=[])


class _Node:
    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(_Node, lambda n: ((n.a, n.b), None), lambda _, c: _Node(*c))


@pytest.mark.parametrize("serialized,target", [
    (_Pair(1, "test"), _Pair(0, "")),
    ({"k": _Pair([1, 2], {"z": 3})}, {"k": _Pair([0, 0], {"z": 0})}),
    ([_Node({"q": 1}, 2)], [_Node({"q": 0}, 0)]),
    ({"p": NT(1, 2)}, {"p": NT(0, 0)}),
])
def test_deserialize_tree_of_nodes_not_dicts_or_lists_as_orbax(serialized, target) -> None:
    # A serialized tree that keeps its dataclasses, named tuples or nodes of one's own (as
    # Orbax's rich-typed metadata does) is looked up by attribute or place, as in Orbax;
    # ckpt_async indexed them as dicts and lists, and raised InvalidTypeError.
    ours = ocp.tree.deserialize_tree(serialized, target)
    theirs = orbax.tree.deserialize_tree(serialized, target)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs) == jax.tree.structure(target)
    assert jax.tree.leaves(ours) == jax.tree.leaves(theirs) == jax.tree.leaves(serialized)
    for lib in (ocp, orbax):  # (an attribute or a child it lacks: KeyError in both; a dict
        # key asked of a dataclass: TypeError in both)
        with pytest.raises(KeyError):
            lib.tree.deserialize_tree(_Pair(1, 2), NT(0, 0))
        with pytest.raises(KeyError):
            lib.tree.deserialize_tree(_Node(1, 2), _Node(0, _Node(0, 0)))
        with pytest.raises(TypeError):
            lib.tree.deserialize_tree(_Pair(1, 2), {"u": 0, "v": 0})


@pytest.mark.parametrize("a,b", [
    ({"x": [1, 2, 3], "y": "same", "z": {"p": {}, "q": 4, "r": 6}},
     {"x": [1, 3], "y": "same", "z": {"p": {}, "q": 5, "s": 6}}),
    ({"a": NT(1, 2)}, {"a": NT(1, 2.0)}),
    (_Pair(1, 2.0), _Pair(1, 2)),
    ((1, [2]), (1, [2, 3])),
    ({"a": 1}, [1]),
    ({"a": None}, {"a": 1}),
    ([1, np.zeros(2)], [1, np.ones(2)]),
])
def test_tree_difference_as_orbax_s(a, b) -> None:
    assert ocp.tree.tree_difference(a, b) == orbax.tree.tree_difference(a, b)
    assert ocp.tree.tree_difference(a, a) is None
    eq = lambda x, y: np.array_equal(x, y)  # noqa: E731
    assert repr(ocp.tree.tree_difference(a, b, leaves_equal=eq)) == repr(
        orbax.tree.tree_difference(a, b, leaves_equal=eq))


def test_tree_path_helpers_as_orbax_s() -> None:
    tree = {"a": [1, _Pair(2, {"b": 3})], "n": _Node(4, 5), "t": (6,)}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, _ in flat:
        assert ocp.tree.str_keypath(path) == orbax.tree.str_keypath(path)
        for key in path:
            assert ocp.utils.is_dict_key(key) == orbax.utils.is_dict_key(key)
            assert ocp.utils.is_sequence_key(key) == orbax.utils.is_sequence_key(key)
    assert ocp.utils.from_flattened_with_keypath(flat) == orbax.utils.from_flattened_with_keypath(
        flat) == {"a": [1, {"u": 2, "v": {"b": 3}}], "n": [4, 5], "t": [6]}
    with pytest.raises(ValueError, match="no leaves"):
        ocp.utils.from_flattened_with_keypath([])
    for t in ({"a": 1, "b": np.zeros(2)}, {"a": {"b": 1}}, {"a": None}, [1], {}):
        assert ocp.tree.is_flat_dict(t) == orbax.tree.is_flat_dict(t), t


def test_pytree_structure_of_arrays_one_per_directory(tmp_path) -> None:
    tree = {"params": {"w": np.arange(4), "b": np.ones(2)}, "step": np.int32(3)}
    orbax.Checkpointer(orbax.PyTreeCheckpointHandler(use_ocdbt=False)).save(tmp_path / "c", tree)
    expected = {"params": {"w": "PLACEHOLDER://params.w", "b": "PLACEHOLDER://params.b"},
                "step": "PLACEHOLDER://step"}
    assert ocp.utils.pytree_structure(tmp_path / "c") == expected
    with pytest.raises(FileNotFoundError):
        ocp.utils.pytree_structure(tmp_path / "missing")


def test_get_step_metadata_reads_a_step_as_orbax_s(tmp_path) -> None:
    with ocp.CheckpointManager(tmp_path / "ours") as mngr:
        mngr.save(1, args=ocp.args.StandardSave({"a": np.arange(3)}), metrics={"loss": 0.5})
    with orbax.CheckpointManager(tmp_path / "theirs") as mngr:
        mngr.save(1, args=orbax.args.StandardSave({"a": np.arange(3)}), metrics={"loss": 0.5})
    for run in ("ours", "theirs"):
        ours = ocp.metadata.get_step_metadata(tmp_path / run / "1")
        theirs = orbax.metadata.get_step_metadata(tmp_path / run / "1")
        for field in ("item_handlers", "item_metadata", "metrics", "init_timestamp_nsecs",
                      "commit_timestamp_nsecs", "custom_metadata"):
            assert getattr(ours, field) == getattr(theirs, field), (run, field)
        assert ours.commit_timestamp_nsecs > 0
        # (ckpt_async records a save's metrics; Orbax only with a best_fn)
        assert ours.metrics == ({"loss": 0.5} if run == "ours" else {})
    with pytest.raises(ValueError, match="Step metadata not found"):
        ocp.metadata.get_step_metadata(tmp_path)


def test_sharding_metadata_as_orbax_s(mesh) -> None:
    import json

    from jax.sharding import NamedSharding, PartitionSpec

    for sharding in (NamedSharding(mesh, PartitionSpec("x", None)),
                     NamedSharding(mesh, PartitionSpec(("x", "y"))),
                     jax.sharding.SingleDeviceSharding(jax.devices()[1])):
        ours = ocp.metadata.ShardingMetadata.from_jax_sharding(sharding)
        assert isinstance(ours, ocp.metadata.ShardingMetadata)
        theirs = getattr(orbax.metadata, type(ours).__name__).from_jax_sharding(sharding)
        assert json.loads(ours.to_serialized_string()) == json.loads(
            theirs.to_serialized_string())
        assert ours.to_jax_sharding() == sharding
        assert ocp.metadata.ShardingMetadata.from_deserialized_dict(
            json.loads(theirs.to_serialized_string())) == ours
    with pytest.raises(ValueError, match="cannot describe"):
        ocp.metadata.SingleDeviceShardingMetadata.from_jax_sharding(
            NamedSharding(mesh, PartitionSpec()))


def test_orbax_s_small_names_in_one_process() -> None:
    barrier = ocp.multihost.get_barrier_sync_fn()
    barrier(key="alone", timeout_ms=1)  # (nobody else to wait for)
    ocp.multihost.get_barrier_sync_fn(processes={0})(key="alone", timeout_ms=1)
    with pytest.raises(ValueError, match="not among them"):
        ocp.multihost.get_barrier_sync_fn(processes={1, 2})
    assert ocp.checkpoint_utils.STANDARD_ARRAY_TYPES == orbax.checkpoint_utils.STANDARD_ARRAY_TYPES


@pytest.mark.parametrize("shape", [(), (3,), (8,), (16, 6), (6, 16), (5, 7), (4, 4), (12, 2, 8)])
def test_construct_maximal_shardings_as_orbax_s(shape) -> None:
    tree = {"x": jax.ShapeDtypeStruct(shape, np.float32)}
    ours = ocp.arrays.construct_maximal_shardings(tree)["x"]
    theirs = orbax.arrays.construct_maximal_shardings(tree)["x"]
    assert ours.mesh.shape == theirs.mesh.shape and ours.spec == theirs.spec
    assert ours.mesh.devices.tolist() == theirs.mesh.devices.tolist()
    assert ocp.arrays.to_shape_dtype_struct is ocp.tree.to_shape_dtype_struct


@pytest.mark.parametrize("driver", ["zarr", "zarr3"])
def test_serialization_of_one_array_both_ways_with_orbax(tmp_path, mesh, driver) -> None:
    import asyncio

    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    value = np.arange(64, dtype=np.float32).reshape(8, 8)
    arr = jax.device_put(value, sharding)

    def spec(name):
        return {"driver": driver, "kvstore": {"driver": "file", "path": str(tmp_path / name)}}

    asyncio.run(ocp.serialization.async_serialize(arr, spec("ours")))
    # (Orbax's writes zarr v2's metadata into any spec: zarr v3 takes its own spec only)
    names = ("ours", "theirs") if driver == "zarr" else ("ours",)
    if driver == "zarr":
        asyncio.run(orbax.serialization.async_serialize(arr, spec("theirs")))
    other = NamedSharding(mesh, PartitionSpec(None, "x"))
    for name in names:
        for lib in (ocp, orbax):
            out, nbytes = asyncio.run(lib.serialization.async_deserialize(other, spec(name)))
            assert out.sharding == other and nbytes > 0
            np.testing.assert_array_equal(np.asarray(out), value)
    # Cast, and a larger shape padded with zeros where not strict.
    out, _ = asyncio.run(ocp.serialization.async_deserialize(
        other, spec(names[-1]), global_shape=(8, 12), dtype=np.float16, strict=False))
    expected = np.zeros((8, 12), np.float16)
    expected[:, :8] = value
    assert out.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(out), expected)
    with pytest.raises(ValueError, match="not the requested"):
        asyncio.run(ocp.serialization.async_deserialize(other, spec("ours"), global_shape=(8, 12)))
    # A sharding that does not split the shape evenly names the array (jax's bare
    # IndivisibleError named none; kept as the cause).
    with pytest.raises(ShardingMismatchError, match=r"/ours/: shape \(7, 8\): the sharding") as err:
        asyncio.run(ocp.serialization.async_deserialize(sharding, spec("ours"),
                                                        global_shape=(7, 8), strict=False))
    assert isinstance(err.value.__cause__, ValueError)


def test_test_utils_as_orbax_s(tmp_path, mesh, caplog) -> None:
    import unittest

    from jax.sharding import PartitionSpec

    for add in (0, 3):
        _same(ocp.test_utils.setup_pytree(add), orbax.test_utils.setup_pytree(add))
    value = np.arange(32, dtype=np.int32).reshape(4, 8)
    ours = ocp.test_utils.create_sharded_array(value, mesh, PartitionSpec("x", "y"))
    theirs = orbax.test_utils.create_sharded_array(value, mesh, PartitionSpec("x", "y"))
    assert ours.sharding == theirs.sharding
    case = unittest.TestCase()
    ocp.test_utils.assert_tree_equal(case, {"a": theirs, "b": None}, {"a": ours, "b": None})
    ocp.test_utils.assert_tree_same_structure(case, {"a": 1}, {"a": 2})
    with pytest.raises(AssertionError):
        ocp.test_utils.assert_tree_equal(case, {"a": value}, {"a": value.astype(np.int64)})
    with pytest.raises(AssertionError):
        ocp.test_utils.assert_tree_equal(case, {"a": value}, {"a": value + 1})
    with pytest.raises(AssertionError):
        ocp.test_utils.assert_tree_equal(case, {"a": value}, {"b": value})
    # An interrupted save's leftovers, as either library fakes them (Orbax's takes an
    # etils path): a manager removes them at start (cleanup_tmp_directories). (Orbax's
    # manager does so in a thread of its own, after its constructor returns.)
    from etils import epath

    for lib in (ocp.test_utils, orbax.test_utils):
        run = tmp_path / lib.__name__
        run.mkdir()
        item = Path(lib.save_fake_tmp_dir(epath.Path(run), 5, "state", subdirs=["d"]))
        assert item.name.startswith("state.orbax-checkpoint-tmp") and (item / "d").is_dir()
        assert item.parent.name.startswith("5.orbax-checkpoint-tmp")
        assert ocp.utils.tmp_checkpoints(run) == [item.parent.name]
        ocp.CheckpointManager(run, options=ocp.CheckpointManagerOptions(
            cleanup_tmp_directories=True)).close()
        assert not list(run.iterdir()), lib.__name__
    item = ocp.test_utils.save_fake_tmp_dir(tmp_path / "shown", 7, "state")
    with caplog.at_level("INFO", logger="ckpt_async"):
        ocp.test_utils.print_directory(tmp_path / "shown")
    lines = [r.getMessage() for r in caplog.records if r.name == "ckpt_async"]
    assert lines == [f"Printing directory tree: {tmp_path / 'shown'}/",
                     f"..{item.parent.name}/", f"....{item.name}/"]
    assert ocp.test_utils.empty_directory(tmp_path / "shown") and not list(
        (tmp_path / "shown").iterdir())
    assert not ocp.test_utils.empty_directory(tmp_path / "missing")


@pytest.mark.parametrize("trees,overwrite", [
    (({"a": 1, "b": {"c": 2}}, {"d": 3, "b": {"e": 4}}), False),
    (({"a": 1, "b": {"c": 2}}, {"a": 100}), True),
    (({"a": 1}, {"a": 2}), False),
    (({"x": NT(1, None)}, {"x": NT(None, 2)}), True),
    (({"l": [1, None]}, {"l": [None, 3]}), True),
    (({"l": [1, None]}, {"l": [None, 3, 4]}), True),
    ((_Pair(1, None), _Pair(None, 2)), True),
    (({"a": 1}, [1]), False),
    (({"a": 1}, [1]), True),
    (({"a": {"b": 1}}, {"a": 5}), True),
    ((), False),
    (({"t": (1, None)}, {"t": (None, 2)}, {"z": 0}), True),
])
def test_tree_merge_trees_as_orbax_s(trees, overwrite) -> None:
    def run(lib):
        try:
            return repr(lib.tree.merge_trees(*trees, overwrite=overwrite))
        except ValueError as exc:
            return f"ValueError: {exc}"

    assert run(ocp) == run(orbax)
