"""Scenarios of Orbax's serialization, type handler and sharding unit tests
(``type_handlers_test``, ``serialization_test``, ``sharding_test``, ``composite_test``, ...),
run side by side with orbax-checkpoint 0.12.8 (the reference): the same calls through each
library's public API, files written by one read by the other, and the results compared
(values bit for bit, shardings, exception types). Each test is one place where ckpt_async
answered differently. Real TensorStore on ``tmp_path``; nothing mocked."""

from __future__ import annotations

import base64
import json
import zlib

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp

LIBS = {"ckpt_async": ocp, "orbax": orbax}


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_sharding_entries_are_keyed_by_url_safe_base64_names(tmp_path, mesh, writer):
    # ``_sharding`` keys each array's sharding by its name in URL-safe base64, as Orbax
    # writes and looks it up. ckpt_async used standard base64: a name such as 'ab~'
    # ('YWJ+' against Orbax's 'YWJ-') made Orbax's restore without a target fail (no entry
    # at that JSON pointer), and ckpt_async's restore of Orbax's checkpoint raise
    # binascii.Error (Incorrect padding).
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    state = {name: jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4) + i, sharding)
             for i, name in enumerate(["ab~", "x?y", "plain"])}
    path = tmp_path / "c"
    with LIBS[writer].StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
    keys = set(json.loads((path / "_sharding").read_text()))
    assert "YWJ-" in keys and "YWJ+" not in keys
    for reader in LIBS.values():
        with reader.StandardCheckpointer() as ckptr:
            out = ckptr.restore(path)
        for name, value in state.items():
            assert out[name].sharding == sharding, (reader.__name__, name)
            assert np.asarray(out[name]).tobytes() == np.asarray(value).tobytes()
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    assert meta["ab~"].sharding == ocp.metadata.NamedShardingMetadata.from_jax_sharding(sharding)


def test_sharding_entries_ckpt_async_wrote_in_standard_base64_still_read(tmp_path, mesh):
    # Checkpoints written before (standard base64 keys) keep their shardings.
    import base64

    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    path = tmp_path / "c"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"ab~": jax.device_put(np.ones((4, 4), np.float32), sharding)})
    doc = json.loads((path / "_sharding").read_text())
    old = {base64.b64encode(base64.urlsafe_b64decode(k)).decode(): v for k, v in doc.items()}
    assert "YWJ+" in old
    data = json.dumps(old).encode()
    (path / "_sharding").write_bytes(data)
    # (the item's checksums cover _sharding: give the edited document its own)
    sums = json.loads((path / "_CHECKSUMS").read_text())
    sums["documents"]["_sharding"] = zlib.crc32(data)
    (path / "_CHECKSUMS").write_text(json.dumps(sums))
    meta = ocp.PyTreeCheckpointHandler().metadata(path).tree
    assert meta["ab~"].sharding == ocp.metadata.NamedShardingMetadata.from_jax_sharding(sharding)
    with ocp.StandardCheckpointer() as ckptr:
        assert ckptr.restore(path)["ab~"].sharding == sharding


def _param(lib, directory, name="a"):
    from etils import epath

    return lib.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(directory),
                                       is_ocdbt_checkpoint=False)


def _handler_save(lib, directory, values, handler=None):
    import asyncio

    handler = handler or lib.type_handlers.ArrayHandler()
    infos = [_param(lib, directory, f"v{i}") for i in range(len(values))]

    async def save():
        for future in await handler.serialize(values, infos) or ():
            future.result()

    asyncio.run(save())
    return infos


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_array_handler_restores_into_global_shape_as_orbax_s(tmp_path, mesh, writer):
    # ArrayHandler.deserialize with ArrayRestoreArgs(global_shape=...): strict (the
    # default) refuses another shape with a ValueError, strict=False cuts or pads with
    # zeros (Orbax's test_padding / test_truncation, through the handler). ckpt_async's
    # ignored global_shape and gave the stored array.
    import asyncio

    value = jax.device_put(np.arange(32, dtype=np.int32), NamedSharding(mesh, PartitionSpec("x")))
    _handler_save(LIBS[writer], tmp_path, [value])
    sharding = NamedSharding(mesh, PartitionSpec(("x", "y")))
    for shape, strict in [((40,), False), ((16,), False), ((40,), True), ((16,), True),
                          ((32,), True)]:
        outs = {}
        for name, lib in LIBS.items():
            args = lib.type_handlers.ArrayRestoreArgs(sharding=sharding, global_shape=shape,
                                                      strict=strict)
            info = _param(lib, tmp_path, "v0")
            try:
                (outs[name],) = asyncio.run(lib.type_handlers.ArrayHandler().deserialize(
                    [info], [args]))
            except ValueError as exc:
                outs[name] = type(exc)
        if shape != (32,) and strict:
            assert outs["orbax"] is ValueError
            assert issubclass(outs["ckpt_async"], ocp.errors.ShapeMismatchError)
            continue
        expected = np.zeros(shape, np.int32)
        n = min(32, shape[0])
        expected[:n] = np.arange(n)
        for name, out in outs.items():
            assert out.shape == shape and out.sharding == sharding, name
            assert np.asarray(out).tobytes() == expected.tobytes(), name


def test_composite_keys_starting_with_two_underscores_are_refused_as_orbax_s():
    # Orbax's composite_test: Composite(__invalid_name=2) raises ValueError (such keys are
    # kept for options); ckpt_async's took it as an item.
    for lib in LIBS.values():
        with pytest.raises(ValueError, match="cannot start with"):
            lib.args.Composite(__invalid_name=2)
        with pytest.raises(ValueError, match="cannot start with"):
            lib.args.Composite(**{"state": 1, "__x": 2})
    with pytest.raises(ocp.errors.InvalidArgumentError):
        ocp.args.Composite(__invalid_name=2)
    for lib in LIBS.values():  # (one underscore, or others after the first, are items)
        assert dict(lib.args.Composite(_a=1, a__b=2).items()) == {"_a": 1, "a__b": 2}


def test_async_deserialize_reads_each_part_once_and_counts_bytes_as_orbax(tmp_path, mesh):
    # ocp.serialization.async_deserialize reads each distinct part of the array once and
    # puts it on every device holding it, and returns the bytes read as Orbax counts them
    # (whole stored chunks). ckpt_async's read a replicated array once a device (four reads
    # of the whole array on four devices) and counted the bytes it handed back.
    import asyncio

    data = np.arange(16, dtype=np.int32).reshape(8, 2)
    saved = jax.device_put(data, NamedSharding(mesh, PartitionSpec("x", "y")))
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}
    asyncio.run(ocp.serialization.async_serialize(saved, dict(spec)))
    line = jax.sharding.Mesh(np.array(jax.devices()[:3]), ("x",))
    cases = [(NamedSharding(mesh, PartitionSpec()), None),            # replicated: one read
             (NamedSharding(mesh, PartitionSpec("x")), None),         # each row block twice
             (NamedSharding(mesh, PartitionSpec(None, "x")), np.float32),
             (NamedSharding(line, PartitionSpec()), np.int16)]
    for sharding, dtype in cases:
        got = {}
        for name, lib in LIBS.items():
            out, nbytes = asyncio.run(lib.serialization.async_deserialize(
                sharding, dict(spec), dtype=dtype))
            assert out.sharding == sharding
            want = data.astype(dtype or data.dtype)
            assert np.asarray(out).tobytes() == want.tobytes(), name
            for shard in out.addressable_shards:
                assert np.asarray(shard.data).tobytes() == want[shard.index].tobytes()
            got[name] = nbytes
        assert got["ckpt_async"] == got["orbax"], (sharding, got)
    assert got["ckpt_async"] == data.nbytes  # (the replicated one: the array, once)


def test_async_deserialize_places_parts_with_a_format_s_layout(tmp_path, mesh):
    # Orbax's test_load_with_layout: async_deserialize takes a jax Format (a device-local
    # layout and a sharding) and gives an array of that format. ckpt_async's raised
    # AttributeError ('Format' object has no attribute 'shard_shape').
    import asyncio

    from jax.experimental.layout import Format, Layout

    data = np.arange(32, dtype=np.int32).reshape(8, 4)
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    arr = jax.device_put(data, sharding)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}
    asyncio.run(orbax.serialization.async_serialize(arr, dict(spec)))
    own = arr.format.layout
    flipped = Format(Layout(own.major_to_minor[::-1], own.tiling), sharding=sharding)
    for fmt in (flipped, Format(own, sharding=sharding)):
        for lib in LIBS.values():
            out, _ = asyncio.run(lib.serialization.async_deserialize(fmt, dict(spec)))
            assert out.format == fmt, lib.__name__
            assert np.asarray(out).tobytes() == data.tobytes()
            for shard in out.addressable_shards:
                assert np.asarray(shard.data).tobytes() == data[shard.index].tobytes()
    with pytest.raises(ocp.errors.InvalidArgumentError):
        asyncio.run(ocp.serialization.async_deserialize("not a sharding", dict(spec)))


def test_maximal_shardings_over_some_devices_split_as_far_as_those_allow():
    # Documented (migration.md): over a subset of the devices, ckpt_async splits an array as
    # far as the devices given allow; Orbax 0.12.8 compares the shape with
    # jax.device_count() and replicates. Over all the devices the two agree.
    tree = {"a": jax.ShapeDtypeStruct((2,), np.float32)}
    two = jax.devices()[:2]
    ours = ocp.arrays.construct_maximal_shardings(tree, devices=two)["a"]
    theirs = orbax.arrays.construct_maximal_shardings(tree, devices=two)["a"]
    assert ours.spec == PartitionSpec("a") and ours.shard_shape((2,)) == (1,)
    assert theirs.spec == PartitionSpec() and theirs.shard_shape((2,)) == (2,)
    every = [ocp.arrays.construct_maximal_shardings(tree)["a"],
             orbax.arrays.construct_maximal_shardings(tree)["a"]]
    assert every[0].spec == every[1].spec and every[0].mesh.shape == every[1].mesh.shape


def _run_handler(handler, method, *call_args):
    import asyncio

    async def go():
        out = await getattr(handler, method)(*call_args)
        if method == "serialize":
            for future in out or ():
                future.result()
        return out

    return asyncio.run(go())


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_array_handler_on_its_own_records_and_restores_the_saved_sharding(tmp_path, mesh,
                                                                          writer):
    # Orbax's ArrayHandler records each array's sharding in the `_sharding` document of
    # info.parent_dir (its name in URL-safe base64 the key): metadata() gives it, and
    # deserialize with restore args that name no sharding restores onto it; without restore
    # args it raises ValueError. ckpt_async's wrote no `_sharding`: metadata gave
    # sharding=None, RestoreArgs() a single-device array, args=None an array.
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    data = np.arange(32, dtype=np.float32).reshape(4, 8)
    value = jax.device_put(data, sharding)
    lib = LIBS[writer]
    _run_handler(lib.type_handlers.ArrayHandler(), "serialize", [value],
                 [_param(lib, tmp_path, "a~b")])
    _run_handler(lib.type_handlers.ArrayHandler(enable_write_sharding_file=False), "serialize",
                 [value], [_param(lib, tmp_path, "quiet")])
    doc = json.loads((tmp_path / "_sharding").read_text())
    assert list(doc) == ["YX5i"]  # ('a~b' in URL-safe base64; nothing for 'quiet')
    assert json.loads(doc["YX5i"]) == json.loads(ocp.metadata.NamedShardingMetadata
                                                 .from_jax_sharding(sharding)
                                                 .to_serialized_string())
    for name, reader in LIBS.items():
        th = reader.type_handlers
        (meta,) = _run_handler(th.ArrayHandler(), "metadata", [_param(reader, tmp_path, "a~b")])
        assert meta.sharding is not None and meta.sharding.to_jax_sharding() == sharding, name
        assert meta.shape == (4, 8) and meta.dtype == np.float32
        for args in ([th.RestoreArgs()], [th.ArrayRestoreArgs()]):
            (out,) = _run_handler(th.ArrayHandler(), "deserialize",
                                  [_param(reader, tmp_path, "a~b")], args)
            assert isinstance(out, jax.Array) and out.sharding == sharding, name
            assert np.asarray(out).tobytes() == data.tobytes()
        with pytest.raises(ValueError):
            _run_handler(th.ArrayHandler(), "deserialize", [_param(reader, tmp_path, "a~b")])
        with pytest.raises(ValueError):  # (no entry for it: no sharding to restore onto)
            _run_handler(th.ArrayHandler(), "deserialize", [_param(reader, tmp_path, "quiet")],
                         [th.RestoreArgs()])
        (out,) = _run_handler(th.ArrayHandler(), "deserialize",
                              [_param(reader, tmp_path, "quiet")],
                              [th.ArrayRestoreArgs(sharding=sharding)])
        assert out.sharding == sharding and np.asarray(out).tobytes() == data.tobytes()
    with pytest.raises(ocp.errors.InvalidArgumentError, match="'quiet' has no sharding"):
        _run_handler(ocp.type_handlers.ArrayHandler(), "deserialize",
                     [_param(ocp, tmp_path, "quiet")], [ocp.type_handlers.RestoreArgs()])
    (meta,) = _run_handler(ocp.type_handlers.ArrayHandler(), "metadata",
                           [_param(ocp, tmp_path, "quiet")])
    assert meta.sharding is None  # (Orbax's raises ValueError there: see migration.md)
    # No `_sharding` at all: both refuse restore args without a sharding.
    for name, reader in LIBS.items():
        other = tmp_path / f"none_{name}"
        other.mkdir()
        _run_handler(reader.type_handlers.ArrayHandler(enable_write_sharding_file=False),
                     "serialize", [value], [_param(reader, other, "a")])
        assert not (other / "_sharding").exists()
        for lib in LIBS.values():
            with pytest.raises(ValueError):
                _run_handler(lib.type_handlers.ArrayHandler(), "deserialize",
                             [_param(lib, other, "a")], [lib.type_handlers.RestoreArgs()])


def _described(value):
    """(kind, dtype, shape, sharding, bytes) of a restored array; a typed PRNG key by its key
    data."""
    is_key = jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(value) if is_key else value
    return (is_key, str(value.dtype), value.shape, value.sharding, np.asarray(data).tobytes())


@pytest.mark.parametrize("with_store", [False, True])
@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_array_handler_on_its_own_saves_typed_prng_keys_as_orbax_s(tmp_path, mesh, writer,
                                                                   with_store):
    # Orbax's test_array_serialization_with_random_key: ArrayHandler.serialize of typed PRNG
    # keys writes their key data (and its sharding into `_sharding`). Restored by the handler
    # alone they come back as that key data, or, with an array_metadata_store (which records
    # each key's implementation in array_metadatas), as keys. ckpt_async's raised TypeError
    # (a key array cannot be converted to a NumPy array).
    from orbax.checkpoint._src.metadata import array_metadata_store

    def store():
        return {"array_metadata_store": array_metadata_store.Store()} if with_store else {}

    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec("x"))
    keys = [jax.random.key(1), jax.random.key(2, impl="rbg"), jax.random.PRNGKey(5),
            jax.device_put(jax.random.split(jax.random.key(10), 4), rows)]
    names = [f"k{i}" for i in range(len(keys))]
    lib = LIBS[writer]
    _run_handler(lib.type_handlers.ArrayHandler(**store()), "serialize", keys,
                 [_param(lib, tmp_path, n) for n in names])
    for name, key in zip(names, keys, strict=True):
        data = np.asarray(jax.random.key_data(key))
        stored = json.loads((tmp_path / name / ".zarray").read_text())
        assert (stored["shape"], stored["dtype"]) == (list(data.shape), "<u4")
    doc = json.loads((tmp_path / "_sharding").read_text())
    assert set(doc) == {base64.urlsafe_b64encode(n.encode()).decode() for n in names}
    assert json.loads(doc["azM="]) == json.loads(  # (the key data's: P('x', None))
        ocp.metadata.NamedShardingMetadata.from_jax_sharding(
            jax.random.key_data(keys[3]).sharding).to_serialized_string())
    assert (tmp_path / "array_metadatas" / "process_0").exists() == with_store
    arg_sets = {
        "sharding": lambda th: [th.ArrayRestoreArgs(sharding=replicated)] * 3 + [
            th.ArrayRestoreArgs(sharding=rows)],
        "saved": lambda th: [th.RestoreArgs()] * 4,
        "key dtype": lambda th: [th.ArrayRestoreArgs(
            sharding=rows if k.ndim else replicated, dtype=k.dtype, global_shape=k.shape)
            for k in keys]}
    for label, make in arg_sets.items():
        got = {}
        for reader, rlib in LIBS.items():
            th = rlib.type_handlers
            out = _run_handler(th.ArrayHandler(**store()), "deserialize",
                               [_param(rlib, tmp_path, n) for n in names], make(th))
            got[reader] = [_described(v) for v in out]
        assert got["ckpt_async"] == got["orbax"], label
        for (is_key, dtype, *_rest, data), key in zip(got["orbax"], keys, strict=True):
            typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            assert is_key == (with_store and typed), label
            assert dtype == (str(key.dtype) if is_key else "uint32")
            assert data == np.asarray(jax.random.key_data(key)).tobytes()


@pytest.mark.parametrize("use_zarr3", [False, True])
def test_handlers_on_their_own_with_ocdbt_read_back_what_they_wrote(tmp_path, mesh, use_zarr3):
    # ParamInfo(is_ocdbt_checkpoint=True) with the handlers on their own (Orbax's
    # test_local_serialization, test_metadata): ckpt_async's write each value into a zarr
    # folder of its own, then looked for it in the item's OCDBT database only and raised
    # CorruptCheckpointError. They read it from its folder where the database does not hold
    # it; Orbax's write per-process databases that its merge_ocdbt_per_process_files (not
    # exported) merges, and read them there, which ckpt_async's read too (migration.md).
    from orbax.checkpoint._src.serialization import ocdbt_utils

    sharding = NamedSharding(mesh, PartitionSpec(("x", "y")))
    values = {"ArrayHandler": [jax.device_put(np.arange(32, dtype=np.int32), sharding)],
              "NumpyHandler": [np.arange(8, dtype=np.int32),
                               np.arange(12, dtype=np.float32).reshape(3, 4)]}

    def infos(lib, directory, n, ocdbt=True):
        from etils import epath

        context = lib.type_handlers.get_ts_context(use_ocdbt=ocdbt)
        return [lib.type_handlers.ParamInfo(
            name=str(i), parent_dir=epath.Path(directory), is_ocdbt_checkpoint=ocdbt,
            use_zarr3=use_zarr3, ts_context=context) for i in range(n)]

    def args(lib, handler):
        if handler == "ArrayHandler":
            return [lib.type_handlers.ArrayRestoreArgs(sharding=sharding)]
        return [lib.type_handlers.RestoreArgs()] * 2

    for handler, vals in values.items():
        for writer, lib in LIBS.items():
            directory = tmp_path / f"{handler}_{writer}"
            directory.mkdir()
            _run_handler(getattr(lib.type_handlers, handler)(), "serialize", vals,
                         infos(lib, directory, len(vals)))
            if lib is orbax:
                import asyncio

                asyncio.run(ocdbt_utils.merge_ocdbt_per_process_files(
                    directory, ts_context=orbax.type_handlers.get_ts_context(),
                    use_zarr3=use_zarr3))
            # (ckpt_async's: a zarr folder per value, as without OCDBT)
            assert (directory / "0").is_dir() == (writer == "ckpt_async")
            readers = {"ckpt_async": ocp} if writer == "ckpt_async" else LIBS
            for reader, rlib in readers.items():
                th = getattr(rlib.type_handlers, handler)()
                got = _run_handler(th, "deserialize", infos(rlib, directory, len(vals)),
                                   args(rlib, handler))
                for want, out in zip(vals, got, strict=True):
                    assert type(out) is type(want), (handler, writer, reader)
                    assert np.asarray(out).tobytes() == np.asarray(want).tobytes()
                metas = _run_handler(th, "metadata", infos(rlib, directory, len(vals)))
                assert [(m.shape, m.dtype) for m in metas] == [(v.shape, v.dtype) for v in vals]
            if writer == "ckpt_async":
                # (Orbax reads ckpt_async's folders when told they are no OCDBT database)
                th = getattr(orbax.type_handlers, handler)()
                got = _run_handler(th, "deserialize",
                                   infos(orbax, directory, len(vals), ocdbt=False),
                                   args(orbax, handler))
                assert [np.asarray(o).tobytes() for o in got] == [
                    np.asarray(v).tobytes() for v in vals]
                with pytest.raises(ValueError):
                    _run_handler(th, "deserialize", infos(orbax, directory, len(vals)),
                                 args(orbax, handler))
    with pytest.raises(ocp.errors.CorruptCheckpointError):  # (neither there nor in a folder)
        _run_handler(ocp.type_handlers.NumpyHandler(), "deserialize",
                     infos(ocp, tmp_path / "NumpyHandler_ckpt_async", 3)[2:])


def test_standard_save_of_a_single_array_or_number_is_accepted_and_orbax_reads_it(tmp_path,
                                                                                  mesh):
    # Documented (migration.md, "More is accepted"): StandardSave of one jax.Array or number
    # (no tree around it) is saved by ckpt_async as a tree of one bare leaf; Orbax refuses it
    # (ValueError: use ArrayCheckpointHandler / ArraySave) and restores what ckpt_async wrote.
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    values = {"array": jax.device_put(np.arange(8, dtype=np.float32).reshape(4, 2), sharding),
              "int": 3, "float": 2.5}
    for label, value in values.items():
        with pytest.raises(ValueError, match="ArraySave"):
            with orbax.Checkpointer(orbax.StandardCheckpointHandler()) as ckptr:
                ckptr.save(tmp_path / f"orbax_{label}", args=orbax.args.StandardSave(value))
        path = tmp_path / label
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(path, args=ocp.args.StandardSave(value))
        for lib in LIBS.values():
            with lib.Checkpointer(lib.StandardCheckpointHandler()) as ckptr:
                out = ckptr.restore(path)
            if label == "array":
                assert isinstance(out, jax.Array) and out.sharding == sharding, lib.__name__
                assert np.asarray(out).tobytes() == np.asarray(value).tobytes()
            else:
                assert type(out) is type(value) and out == value, lib.__name__


@pytest.mark.parametrize("writer", ["ckpt_async", "orbax"])
def test_scalar_handler_metadata_has_no_storage_as_orbax_s(tmp_path, writer):
    # ScalarHandler.metadata gives storage=None, as Orbax's (and the pytree handlers' scalar
    # metadata) does; ckpt_async's gave StorageMetadata(chunk_shape=()).
    lib = LIBS[writer]
    values = [3, 2.5, np.float32(1.5)]
    names = ["i", "f", "n"]
    _run_handler(lib.type_handlers.ScalarHandler(), "serialize", values,
                 [_param(lib, tmp_path, n) for n in names])
    got = {}
    for name, rlib in LIBS.items():
        metas = _run_handler(rlib.type_handlers.ScalarHandler(), "metadata",
                             [_param(rlib, tmp_path, n) for n in names])
        got[name] = [(type(m).__name__, m.name, m.shape, m.sharding, m.dtype, m.storage)
                     for m in metas]
    assert got["ckpt_async"] == got["orbax"]
    assert [m[-1] for m in got["ckpt_async"]] == [None] * 3


def test_array_handler_on_its_own_keeps_to_restore_type_where_orbax_s_gives_a_jax_array(
        tmp_path, mesh):
    # migration.md: ArrayHandler used on its own with ArrayRestoreArgs(restore_type=np.ndarray)
    # gives NumPy in ckpt_async, a jax.Array in Orbax (which ignores restore_type there);
    # through a pytree checkpointer both give NumPy.
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    data = np.arange(16, dtype=np.float32)
    value = jax.device_put(data, sharding)
    (tmp_path / "h").mkdir()
    _handler_save(ocp, tmp_path / "h", [value])
    outs = {}
    for name, lib in LIBS.items():
        args = lib.type_handlers.ArrayRestoreArgs(restore_type=np.ndarray, sharding=sharding)
        (outs[name],) = _run_handler(lib.type_handlers.ArrayHandler(), "deserialize",
                                     [_param(lib, tmp_path / "h", "v0")], [args])
        assert np.asarray(outs[name]).tobytes() == data.tobytes(), name
    assert type(outs["ckpt_async"]) is np.ndarray
    assert isinstance(outs["orbax"], jax.Array)
    ocp.PyTreeCheckpointer().save(tmp_path / "t", {"a": value})
    for name, lib in LIBS.items():
        restored = lib.PyTreeCheckpointer().restore(tmp_path / "t", args=lib.args.PyTreeRestore(
            restore_args={"a": lib.ArrayRestoreArgs(restore_type=np.ndarray,
                                                    sharding=sharding)}))
        assert type(restored["a"]) is np.ndarray, name
        assert restored["a"].tobytes() == data.tobytes(), name
