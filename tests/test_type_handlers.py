"""Orbax's TypeHandler layer: the registry's rules side by side with Orbax's, custom handlers
for leaves of users' own types (written by the handler, in both libraries, both ways), the
built-in handlers on their own, and SingleReplicaArrayRestoreArgs on one process (the
broadcast across processes is in ``test_multihost.py``)."""

# The handlers here read and write their small files as users' handlers often do: blocking.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import collections
import collections.abc
import concurrent.futures
import dataclasses
import json
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_async as ocp
from ckpt_async import type_handlers as th
from ckpt_async.errors import CommitError, ShardingMismatchError, UnsupportedLeafError

LIBS = {"ckpt_async": ocp, "orbax": orbax}


@dataclasses.dataclass(frozen=True)
class Point:  # a leaf: not a pytree node
    x: float
    y: float


@dataclasses.dataclass(frozen=True)
class Pair:  # a leaf of two arrays, which its handler hands to the built-in NumpyHandler
    a: np.ndarray
    b: np.ndarray


def point_handler(lib):
    """A handler of ``Point`` leaves written against ``lib``'s interface: one JSON file at
    ``info.path`` per point (the same code runs under both libraries)."""

    class PointHandler(lib.type_handlers.TypeHandler):
        def typestr(self) -> str:
            return "test.Point"

        async def serialize(self, values, infos, args=None):
            for value, info in zip(values, infos):
                await info.await_path_creation()
                Path(info.path).write_text(json.dumps(dataclasses.asdict(value)))
            return []

        async def deserialize(self, infos, args=None):
            return [Point(**json.loads(Path(info.path).read_text())) for info in infos]

        async def metadata(self, infos):
            return [{"point": info.name} for info in infos]

    return PointHandler()


def pair_handler(lib):
    class PairHandler(lib.type_handlers.TypeHandler):
        numpy = lib.type_handlers.NumpyHandler()

        def typestr(self) -> str:
            return "test.Pair"

        @staticmethod
        def parts(infos):
            return [i.replace(name=f"{i.name}.{p}", path=i.parent_dir / f"{i.name}.{p}")
                    for i in infos for p in "ab"]

        async def serialize(self, values, infos, args=None):
            arrays = [getattr(v, p) for v in values for p in "ab"]
            sargs = [lib.SaveArgs()] * len(arrays)
            return await self.numpy.serialize(arrays, self.parts(infos), sargs)

        async def deserialize(self, infos, args=None):
            parts = self.parts(infos)
            arrays = await self.numpy.deserialize(parts, [lib.RestoreArgs()] * len(parts))
            return [Pair(arrays[2 * i], arrays[2 * i + 1]) for i in range(len(infos))]

        async def metadata(self, infos):
            parts = await self.numpy.metadata(self.parts(infos))
            return [tuple(parts[2 * i:2 * i + 2]) for i in range(len(infos))]

    return PairHandler()


def registry(lib, *handlers):
    t = lib.type_handlers
    return t.create_type_handler_registry(
        (int, t.ScalarHandler()), (np.ndarray, t.NumpyHandler()), (jax.Array, t.ArrayHandler()),
        (str, t.StringHandler()), *handlers)


def checkpointer(lib, reg):
    return lib.Checkpointer(lib.PyTreeCheckpointHandler(type_handler_registry=reg))


# --- the registry ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LIBS))
def test_registry_rules_are_orbaxs(name):
    t = LIBS[name].type_handlers
    reg = t.create_type_handler_registry((int, t.ScalarHandler()))
    assert reg.get(int).typestr() == "scalar" and reg.get("scalar") is reg.get(int)
    assert reg.has(bool) and not reg.has(str)  # (a subclass of a registered type has its handler)
    with pytest.raises(ValueError, match="Unknown type"):
        reg.get(str)
    with pytest.raises(ValueError, match="already registered"):
        reg.add(int, t.ScalarHandler())
    with pytest.raises(ValueError, match="collides"):
        reg.add(float, t.ScalarHandler())  # (another type, the same typestr)
    reg.add(float, t.ScalarHandler(), override=True)
    reg.add(int, t.NumpyHandler(), override=True)
    assert reg.get(int).typestr() == "np.ndarray"
    reg.add(Point, point_handler(LIBS[name]), func=lambda ty: ty is Point)
    assert reg.get(Point).typestr() == "test.Point" and reg.has("test.Point")
    assert t.supported_types() == [int, float, bytes, np.number, np.ndarray, jax.Array, str,
                                   type(...)]
    assert t.get_type_handler(jax.Array).typestr() == "jax.Array"
    assert t.has_type_handler(np.ndarray) and not t.has_type_handler(Point)
    with pytest.raises(ValueError, match="already registered"):
        t.register_type_handler(jax.Array, t.ArrayHandler())


def test_get_and_register_again_restores_the_default_handler():
    """MaxText's pattern: keep the registered ArrayHandler, register another, put it back."""
    original = th.get_type_handler(jax.Array)
    th.register_type_handler(jax.Array, th.SingleReplicaArrayHandler(), override=True)
    try:
        assert isinstance(th.get_type_handler(jax.Array), th.SingleReplicaArrayHandler)
    finally:
        th.register_type_handler(jax.Array, original, override=True)
    assert th.get_type_handler(jax.Array) is original
    assert not th.GLOBAL_TYPE_HANDLER_REGISTRY.has_custom


# --- custom handlers ------------------------------------------------------------------------
@pytest.mark.parametrize(("writer", "reader"), [(w, r) for w in LIBS for r in LIBS])
def test_a_custom_handlers_leaves_move_between_the_libraries(tmp_path, writer, reader):
    state = {"p": Point(1.5, -2.0), "w": np.arange(6, dtype=np.float32), "n": 3,
             "nested": {"q": Point(0.0, 7.0)}}
    path = tmp_path / "ckpt"
    w = checkpointer(LIBS[writer], registry(LIBS[writer], (Point, point_handler(LIBS[writer]))))
    w.save(path, args=LIBS[writer].args.PyTreeSave(state))
    assert json.loads((path / "p").read_text()) == {"x": 1.5, "y": -2.0}
    assert (path / "nested.q").exists()
    r = checkpointer(LIBS[reader], registry(LIBS[reader], (Point, point_handler(LIBS[reader]))))
    restored = r.restore(path)
    assert restored["p"] == Point(1.5, -2.0) and restored["nested"]["q"] == Point(0.0, 7.0)
    assert np.array_equal(restored["w"], state["w"]) and int(restored["n"]) == 3
    if reader == "ckpt_async":
        partial = r.restore(path, args=ocp.args.PyTreeRestore(
            {"p": Point(0, 0), "nested": {"q": Point(0, 0)}}, partial_restore=True))
        assert partial == {"p": Point(1.5, -2.0), "nested": {"q": Point(0.0, 7.0)}}
    for ckptr in (w, r):
        ckptr.close()


def test_item_metadata_of_a_custom_leaf_is_its_handlers(tmp_path):
    reg = registry(ocp, (Point, point_handler(ocp)))
    ckptr = checkpointer(ocp, reg)
    ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"p": Point(1, 2), "w": np.zeros(3)}))
    meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert meta["p"] == {"point": "p"} and meta["w"].shape == (3,)


def test_a_handler_may_hand_its_parts_to_the_built_in_ones(tmp_path):
    """The built-in NumpyHandler on its own: ckpt_async's writes zarr arrays at info.path; it
    reads Orbax's out of the item's OCDBT database, where Orbax's wrote them."""
    pair = Pair(np.arange(12, dtype=np.int16).reshape(3, 4), np.linspace(0, 1, 5))
    for writer in ("ckpt_async", "orbax"):
        path = tmp_path / writer
        w = checkpointer(LIBS[writer], registry(LIBS[writer], (Pair, pair_handler(LIBS[writer]))))
        w.save(path, args=LIBS[writer].args.PyTreeSave({"pair": pair, "n": 1}))
        w.close()
        assert (path / "pair.a" / ".zarray").exists() == (writer == "ckpt_async")
        r = checkpointer(ocp, registry(ocp, (Pair, pair_handler(ocp))))
        got = r.restore(path)["pair"]
        for part in "ab":
            want = getattr(pair, part)
            assert getattr(got, part).dtype == want.dtype
            assert getattr(got, part).tobytes() == want.tobytes()
        shapes = [m.shape for m in r.metadata(path).item_metadata["pair"]]
        assert shapes == [(3, 4), (5,)]


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_a_handlers_parts_take_the_items_zarr_version(tmp_path, use_ocdbt):
    """Saved with use_zarr3=True, a leaf's handler is told so (``info.use_zarr3``), as its
    restore is: the built-in NumpyHandler writes its parts as zarr v3 (it wrote zarr v2,
    which the restore then opened as v3 and failed)."""
    pair = Pair(np.arange(12, dtype=np.int16).reshape(3, 4), np.linspace(0, 1, 5))
    reg = registry(ocp, (Pair, pair_handler(ocp)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=reg, use_ocdbt=use_ocdbt,
                                          use_zarr3=True)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"pair": pair, "w": np.ones(3)}))
        got = ckptr.restore(tmp_path / "c")["pair"]
    assert (tmp_path / "c" / "pair.a" / "zarr.json").exists()
    for part in "ab":
        assert getattr(got, part).tobytes() == getattr(pair, part).tobytes()


def test_a_failing_handler_fails_the_save_and_nothing_is_committed(tmp_path):
    class Broken(th.TypeHandler):
        def typestr(self):
            return "test.Broken"

        async def serialize(self, values, infos, args=None):
            raise RuntimeError("cannot write points today")

        async def deserialize(self, infos, args=None):
            raise AssertionError

        async def metadata(self, infos):
            return []

    mngr = ocp.CheckpointManager(tmp_path / "run", item_handlers=ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry(ocp, (Point, Broken()))))
    with pytest.raises(RuntimeError, match="cannot write points today") as info:
        mngr.save(0, args=ocp.args.PyTreeSave({"p": Point(1, 2), "w": np.ones(3)}))
        mngr.wait_until_finished()
    assert any("Broken.serialize failed on leaves 'p'" in n for n in info.value.__notes__)
    assert mngr.all_steps() == [] and list((tmp_path / "run").iterdir()) == []
    mngr.close()


def test_a_handlers_futures_are_waited_for_before_the_commit(tmp_path):
    """serialize may leave work running (Orbax's commit futures): the save commits once it
    is done, and fails if it fails."""
    release = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)

    class Later(th.TypeHandler):
        def typestr(self):
            return "test.Later"

        async def serialize(self, values, infos, args=None):
            def write(info=infos[0], value=values[0]):
                release.wait(30)
                if value.x < 0:
                    raise OSError("the late write failed")
                Path(info.path).write_text(json.dumps(dataclasses.asdict(value)))
            return [pool.submit(write)]

        async def deserialize(self, infos, args=None):
            return [Point(**json.loads(Path(i.path).read_text())) for i in infos]

        async def metadata(self, infos):
            return []

    ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry(ocp, (Point, Later()))))
    ckptr.save(tmp_path / "ok", args=ocp.args.PyTreeSave({"p": Point(3, 4)}))
    assert not (tmp_path / "ok").exists()  # (not committed while the write is pending)
    release.set()
    ckptr.wait_until_finished()
    assert ckptr.restore(tmp_path / "ok") == {"p": Point(3, 4)}
    ckptr.save(tmp_path / "bad", args=ocp.args.PyTreeSave({"p": Point(-1, 4)}))
    with pytest.raises(CommitError, match="the late write failed") as failed:
        ckptr.wait_until_finished()
    assert isinstance(failed.value.__cause__, OSError)
    assert not (tmp_path / "bad").exists()
    ckptr.close()
    pool.shutdown()


def test_a_leaf_whose_handler_is_not_registered_names_it(tmp_path):
    ckptr = checkpointer(ocp, registry(ocp, (Point, point_handler(ocp))))
    ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"deep": {"p": Point(1, 2)}}))
    with pytest.raises(UnsupportedLeafError, match=r"leaf 'deep\.p' was saved by a TypeHandler "
                       r"of typestr 'test\.Point'"):
        ocp.PyTreeCheckpointer().restore(tmp_path / "c")
    with pytest.raises(UnsupportedLeafError, match="register_type_handler"):
        ocp.PyTreeCheckpointer().save(tmp_path / "d", {"p": Point(1, 2)})


def test_a_handler_registered_for_a_built_in_type_writes_its_leaves(tmp_path):
    """A handler of users' for ``str`` (not the built-in one) takes every string leaf."""
    class Upper(th.TypeHandler):
        def typestr(self):
            return "test.Upper"

        async def serialize(self, values, infos, args=None):
            for v, i in zip(values, infos):
                Path(i.path).write_text(v.upper())
            return []

        async def deserialize(self, infos, args=None):
            return [Path(i.path).read_text().lower() for i in infos]

        async def metadata(self, infos):
            return []

    reg = registry(ocp)
    reg.add(str, Upper(), override=True)
    ckptr = checkpointer(ocp, reg)
    ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"s": "hello", "w": np.ones(2)}))
    assert (tmp_path / "c" / "s").read_text() == "HELLO"
    assert not (tmp_path / "c" / "_strings.json").exists()
    restored = ckptr.restore(tmp_path / "c")
    assert restored["s"] == "hello" and np.array_equal(restored["w"], np.ones(2))


# --- the built-in handlers on their own -----------------------------------------------------
def test_built_in_handlers_write_and_read_on_their_own(tmp_path):
    asyncio.run(built_in_handlers_on_their_own(tmp_path))


async def built_in_handlers_on_their_own(tmp_path: Path) -> None:
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    sharding = NamedSharding(mesh, P("a", "b"))
    host = np.arange(32, dtype=np.float32).reshape(4, 8)
    arr = jax.device_put(host, sharding)

    def info(name):
        return th.ParamInfo(name=name, parent_dir=tmp_path)

    assert await th.ArrayHandler().serialize([arr], [info("arr")]) == []
    await th.ScalarHandler().serialize([7], [info("seven")])
    await th.StringHandler().serialize(["hi"], [info("s")])
    assert (tmp_path / "arr" / ".zarray").exists()
    (back,) = await th.ArrayHandler().deserialize(
        [info("arr")], [th.ArrayRestoreArgs(sharding=sharding)])
    assert back.sharding == sharding and np.array_equal(np.asarray(back), host)
    (seven,) = await th.ScalarHandler().deserialize([info("seven")], [th.RestoreArgs(int)])
    assert seven == 7 and type(seven) is int
    assert await th.StringHandler().deserialize([info("s")]) == ["hi"]
    (meta,) = await th.ArrayHandler().metadata([info("arr")])
    assert meta.shape == (4, 8) and meta.dtype == np.float32
    assert await th.PlaceholderHandler().deserialize([info("x")]) == [th.PLACEHOLDER]
    with pytest.raises(ValueError, match="length 0"):
        await th.NumpyHandler().deserialize([])


def test_a_handler_s_arrays_keep_their_shardings_beside_the_item_s_own(tmp_path):
    """A handler handing jax arrays to the built-in ArrayHandler: it records their shardings
    in the item's ``_sharding`` (as Orbax's does), which the item's own entries join rather
    than replace, and its ``deserialize`` with ``RestoreArgs()`` restores them onto those."""
    @dataclasses.dataclass(frozen=True)
    class Wrapped:
        value: jax.Array

    class WrappedHandler(th.TypeHandler):
        arrays = th.ArrayHandler()

        def typestr(self):
            return "test.Wrapped"

        @staticmethod
        def parts(infos):
            return [i.replace(name=f"{i.name}.v", path=i.parent_dir / f"{i.name}.v",
                              is_ocdbt_checkpoint=False) for i in infos]

        async def serialize(self, values, infos, args=None):
            return await self.arrays.serialize([v.value for v in values], self.parts(infos))

        async def deserialize(self, infos, args=None):
            out = await self.arrays.deserialize(self.parts(infos), [th.RestoreArgs()] * len(infos))
            return [Wrapped(v) for v in out]

        async def metadata(self, infos):
            return await self.arrays.metadata(self.parts(infos))

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    split, rows = NamedSharding(mesh, P("a", "b")), NamedSharding(mesh, P("a"))
    host = np.arange(32, dtype=np.float32).reshape(4, 8)
    reg = registry(ocp, (Wrapped, WrappedHandler()))
    with checkpointer(ocp, reg) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(
            {"w": Wrapped(jax.device_put(host, split)), "own": jax.device_put(host, rows)}))
        assert set(json.loads((tmp_path / "c" / "_sharding").read_text())) == {"dy52", "b3du"}
        restored = ckptr.restore(tmp_path / "c")
        meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert restored["w"].value.sharding == split and restored["own"].sharding == rows
    assert np.asarray(restored["w"].value).tobytes() == host.tobytes()
    assert meta["w"].sharding.to_jax_sharding() == split
    # (Orbax reads the item's own arrays, with their shardings)
    assert orbax.PyTreeCheckpointer().restore(tmp_path / "c", args=orbax.args.PyTreeRestore(
        {"own": jax.ShapeDtypeStruct((4, 8), np.float32)}, partial_restore=True)
    )["own"].sharding == rows


def test_an_array_handler_with_a_metadata_store_gives_keys_a_pytree_restore_keeps(tmp_path):
    """An ArrayHandler subclass reading its own way, made with an array_metadata_store (it then
    restores typed PRNG keys as keys, as Orbax's does): the restore does not wrap them again
    (jax refused: wrap_key_data of a key array)."""
    from orbax.checkpoint._src.metadata import array_metadata_store

    class Own(th.ArrayHandler):
        async def deserialize(self, infos, args=None):
            return await super().deserialize(infos, args)

    reg = registry(ocp)
    reg.add(jax.Array, Own(array_metadata_store=array_metadata_store.Store()), override=True)
    key = jax.random.key(7, impl="rbg")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(type_handler_registry=reg)) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"k": key, "w": jnp.ones(3)}))
        for args in (None, ocp.args.StandardRestore({"k": key, "w": jnp.ones(3)})):
            back = ckptr.restore(tmp_path / "c", args=args)["k"]
            assert back.dtype == key.dtype
            assert np.array_equal(jax.random.key_data(back), jax.random.key_data(key))


# --- SingleReplicaArrayHandler on one process -----------------------------------------------
def test_single_replica_restore_args_on_one_process(tmp_path):
    """On one process every replica's devices are this process's: the array is read once and
    placed on each (the broadcast across processes: test_multihost)."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("replica", "model"))
    sharding = NamedSharding(mesh, P(None, "model"))
    host = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    saver = ocp.StandardCheckpointer()
    saver.save(tmp_path / "c", {"w": jax.device_put(host, sharding)})
    saver.wait_until_finished()
    reg = registry(ocp)
    reg.add(jax.Array, th.SingleReplicaArrayHandler(replica_axis_index=0), override=True)
    args = th.SingleReplicaArrayRestoreArgs(
        sharding=sharding, global_shape=(6, 8), dtype=np.float32,
        single_replica_sharding=NamedSharding(Mesh(mesh.devices[:1], mesh.axis_names),
                                              P(None, "model")))
    restored = checkpointer(ocp, reg).restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
        item={"w": jax.ShapeDtypeStruct((6, 8), np.float32)}, restore_args={"w": args}))
    assert restored["w"].sharding == sharding
    assert np.asarray(restored["w"]).tobytes() == host.tobytes()


def test_a_subclass_reading_its_own_way_gets_the_leaves_ckpt_async_wrote(tmp_path):
    """An ArrayHandler subclass overriding deserialize only: arrays are written as without it
    (in the OCDBT database, which Orbax reads), and its deserialize is given each array with
    restore args built from the target (its sharding), as Orbax gives them."""
    calls = []

    class Logging(th.ArrayHandler):
        async def deserialize(self, infos, args=None):
            calls.append([(i.name, type(a).__name__) for i, a in zip(infos, args)])
            return await super().deserialize(infos, args)

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    sharding = NamedSharding(mesh, P("a", "b"))
    host = np.arange(32, dtype=np.float32).reshape(4, 8)
    reg = registry(ocp)
    reg.add(jax.Array, Logging(), override=True)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(type_handler_registry=reg))
    ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"w": jax.device_put(host, sharding)}))
    assert not (tmp_path / "c" / "w").exists() and (tmp_path / "c" / "manifest.ocdbt").exists()
    assert np.array_equal(orbax.StandardCheckpointer().restore(tmp_path / "c")["w"], host)
    restored = ckptr.restore(tmp_path / "c", args=ocp.args.StandardRestore(
        {"w": jax.ShapeDtypeStruct((4, 8), np.float32, sharding=sharding)}))
    assert calls == [[("w", "ArrayRestoreArgs")]]
    assert restored["w"].sharding == sharding and np.array_equal(np.asarray(restored["w"]), host)


def test_a_sharding_that_does_not_split_the_array_is_named_by_the_array_handler(tmp_path):
    """ArrayHandler.deserialize, on its own and as a subclass reading its own way in a
    restore: ShardingMismatchError naming the leaf, jax's IndivisibleError (naming none, as
    it came before) its cause."""
    class Own(th.ArrayHandler):
        async def deserialize(self, infos, args=None):
            return await super().deserialize(infos, args)

    split = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("a",)), P("a"))  # (5 rows: no)
    host = np.arange(10, dtype=np.float32).reshape(5, 2)
    reg = registry(ocp)
    reg.add(jax.Array, Own(), override=True)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(type_handler_registry=reg))
    ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"w": jax.device_put(host)}))
    message = r"/{}: key '{}' of shape \(5, 2\): the sharding the restore asks for does not split"
    with pytest.raises(ShardingMismatchError, match=message.format("c", "w")) as err:
        ckptr.restore(tmp_path / "c", args=ocp.args.StandardRestore(
            {"w": jax.ShapeDtypeStruct((5, 2), np.float32, sharding=split)}))
    assert type(err.value.__cause__).__name__ == "IndivisibleError"
    info = th.ParamInfo(name="arr", parent_dir=tmp_path / "own")
    asyncio.run(th.ArrayHandler().serialize([jax.device_put(host)], [info]))
    with pytest.raises(ShardingMismatchError, match=message.format("own", "arr")):
        asyncio.run(th.ArrayHandler().deserialize([info], [th.ArrayRestoreArgs(sharding=split)]))


class _Mapping(collections.abc.Mapping):  # a mapping that is no dict (and no pytree node)
    def __init__(self, items=()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


def test_orbax_s_type_handler_queries() -> None:
    import types

    from orbax.checkpoint._src.metadata.pytree_metadata_options import PyTreeMetadataOptions

    nt = collections.namedtuple("nt", "a")
    empty_nt = collections.namedtuple("empty_nt", [])
    # (an empty mapping of another type than dict, and an empty list subclass, were refused)
    values = [None, {}, [], (), nt(1), empty_nt(), 1, 1.5, True, b"x", "x", np.zeros(2),
              np.float32(1), jax.numpy.zeros(2), object(), {"a": 1}, [1],
              collections.OrderedDict(), collections.OrderedDict(a=1),
              collections.defaultdict(list), types.MappingProxyType({}), _Mapping(),
              _Mapping({"a": 1}), type("L", (list,), {})()]
    for v in values:
        for fn in ("is_supported_empty_value", "is_supported_type"):
            ours = getattr(ocp.type_handlers, fn)(v)
            assert ours == getattr(orbax.type_handlers, fn)(v), (fn, v)
            # (with rich types an empty named tuple is an empty node: it was refused here)
            for rich in (False, True):
                options = PyTreeMetadataOptions(support_rich_types=rich)
                ours = getattr(ocp.type_handlers, fn)(v, options)
                assert ours == getattr(orbax.type_handlers, fn)(v, options), (fn, v, rich)


@pytest.mark.parametrize("empty", [collections.OrderedDict, lambda: collections.defaultdict(list)],
                         ids=["OrderedDict", "defaultdict"])
@pytest.mark.parametrize(("writer", "reader"), [("ckpt_async", "orbax"), ("orbax", "ckpt_async"),
                                                ("ckpt_async", "ckpt_async")])
def test_an_empty_mapping_restores_as_orbax_restores_it(tmp_path, empty, writer, reader) -> None:
    """An empty OrderedDict or defaultdict in a saved tree is an empty node ("Dict") and
    comes back an empty dict, with its metadata, as in Orbax, whichever library wrote it."""
    tree = {"a": np.arange(3), "e": empty(), "n": {"o": empty()}}
    LIBS[writer].PyTreeCheckpointer().save(tmp_path / "c", tree)
    ckptr = LIBS[reader].PyTreeCheckpointer()
    restored = ckptr.restore(tmp_path / "c")
    assert type(restored["e"]) is dict and restored["e"] == {} and restored["n"] == {"o": {}}
    assert np.array_equal(restored["a"], tree["a"])
    meta = ckptr.metadata(tmp_path / "c")
    meta = getattr(meta, "item_metadata", meta).tree
    assert meta["e"] == {} and meta["n"] == {"o": {}}
    saved = json.loads((tmp_path / "c" / "_METADATA").read_text())["tree_metadata"]
    assert saved["('e',)"]["value_metadata"]["value_type"] == "Dict"


def test_support_rich_types_warns_once_that_it_has_no_effect(monkeypatch) -> None:
    # it was accepted and silently ignored
    import warnings

    from orbax.checkpoint._src.metadata.pytree_metadata_options import PyTreeMetadataOptions

    from ckpt_async.handlers import pytree

    monkeypatch.setattr(pytree, "_told_rich_types", False, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ocp.PyTreeCheckpointHandler(pytree_metadata_options=PyTreeMetadataOptions())
        assert caught == []
        for _ in range(2):
            ocp.StandardCheckpointHandler(
                pytree_metadata_options=PyTreeMetadataOptions(support_rich_types=True))
    assert [w.category for w in caught] == [UserWarning]
    assert str(caught[0].message).startswith(
        "StandardCheckpointHandler(pytree_metadata_options=PyTreeMetadataOptions("
        "support_rich_types=True)) has no effect in ckpt_async")
    assert caught[0].filename == __file__  # (the line that passed the option)


def test_tensorstore_specs_open_the_saved_arrays(tmp_path) -> None:
    import tensorstore as ts

    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    ocp.PyTreeCheckpointer().save(tmp_path / "ocdbt", {"w": value})
    orbax.Checkpointer(orbax.PyTreeCheckpointHandler(use_ocdbt=False)).save(
        tmp_path / "folders", {"w": value})
    for name, ocdbt in (("ocdbt", True), ("folders", False)):
        assert ocp.type_handlers.is_ocdbt_checkpoint(tmp_path / name) is ocdbt
        assert orbax.type_handlers.is_ocdbt_checkpoint(tmp_path / name) is ocdbt
        info = ocp.type_handlers.ParamInfo(name="w", parent_dir=tmp_path / name)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
        context = ocp.type_handlers.get_ts_context(use_ocdbt=ocdbt)
        np.testing.assert_array_equal(ts.open(spec, context=context).result().read().result(),
                                      value)


def test_jax_s_array_serialization_context_is_reachable_after_importing_ckpt_async() -> None:
    # Orbax's format guide parents its own TensorStore context on jax's, reached as an
    # attribute, which Orbax's import makes: ckpt_async's too. (A fresh interpreter: this one
    # imported Orbax.)
    import subprocess
    import sys

    code = ("import jax, tensorstore as ts, ckpt_async\n"
            "ts.Context({'cache_pool#ocdbt': {'total_bytes_limit': 10**6}},\n"
            "           parent=jax.experimental.array_serialization.serialization.TS_CONTEXT)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr[-2000:]
