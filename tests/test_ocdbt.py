"""ckpt_async's own OCDBT writer: what it writes, TensorStore and Orbax read exactly."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import jax
import msgspec
import numpy as np
import orbax.checkpoint as orbax
import pytest
import tensorstore as ts

import ckpt_async as ocp
from ckpt_async import _ocdbt, _storage
from ckpt_async import _serialize as ser
from ckpt_async.errors import CommitError


def _reference_crc32c(data: bytes) -> int:
    r = 0xFFFFFFFF
    for b in data:
        r ^= b
        for _ in range(8):
            r = (r >> 1) ^ (0x82F63B78 if r & 1 else 0)
    return r ^ 0xFFFFFFFF


def test_crc32c_matches_the_standard_and_tensorstore():
    assert _ocdbt.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert _ocdbt.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    # around the vectorised path's thresholds: bytewise below 256, above it a power of two
    # of blocks of 32 to 64 bytes, behind up to 8 zero bytes each
    for n in [1, 31, 255, 256, 257, 287, 319, 320, 321, 505, 511, 2047, 2048, 2049, 4096,
              4097, 65536 + 300, 95_804, 300_001, 900_007, 2_000_003]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _ocdbt.crc32c(data) == _reference_crc32c(data), n
    kv = ts.KvStore.open({"driver": "ocdbt", "base": "memory://"}).result()
    kv["a"] = b"b"
    encoded = kv.base["manifest.ocdbt"]  # TensorStore's manifest ends in its own CRC-32C
    assert struct.unpack("<I", encoded[-4:])[0] == _ocdbt.crc32c(encoded[:-4])


def _values(count: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"params.layer_{i % 7}.w{i:05d}/{'.zarray' if i % 3 == 0 else '0.0'}":
            rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
            for i in range(count)}


@pytest.fixture(params=[None, 2_000], ids=["one-leaf", "interior-levels"])
def node_bytes(request, monkeypatch):
    """The B+tree's node size: the default (one leaf here) or small (interior levels)."""
    if request.param:
        monkeypatch.setattr(_ocdbt, "_NODE_BYTES", request.param)
    return request.param


def _write(writer: _ocdbt.DatabaseWriter, values) -> None:
    writer.write(writer.add(values))


def _write_database(root, given: dict, batch: int = 700) -> _ocdbt.DatabaseWriter:
    """A database of ``given`` written in batches (ranges of its data file), finished."""
    writer = _ocdbt.DatabaseWriter(root)
    items = list(given.items())
    for i in range(0, len(items), batch):
        _write(writer, items[i:i + batch])
    writer.finish()
    return writer


def _read_all(root) -> dict[str, bytes]:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{root}"}).result()
    return {k.decode(): kv.read(k).result().value for k in kv.list().result()}


def _laid_out(values) -> bytes:
    """A data file's bytes holding ``values``: each zero-padded to a multiple of VALUE_ALIGN."""
    return b"".join(bytes(v) + bytes(-len(v) % _ocdbt.VALUE_ALIGN) for v in values)


def _manifest(root) -> dict:
    return ts.ocdbt.dump(ts.KvStore.open(f"file://{root}/").result()).result()


def test_every_key_reads_back_exactly(tmp_path, node_bytes):
    values = _values(3000)
    # half as documents (bytes: inline up to the limit), half as array data (views: never)
    given = {k: v if i % 2 else memoryview(v) for i, (k, v) in enumerate(values.items())}
    _write_database(tmp_path, given)
    assert _read_all(tmp_path) == values
    version, = _manifest(tmp_path)["versions"]
    assert version["generation_number"] == 1
    assert version["root"]["statistics"]["num_keys"] == len(values)
    assert version["root"]["statistics"]["num_indirect_value_bytes"] == sum(
        len(v) for v in given.values()
        if isinstance(v, memoryview) or len(v) > _ocdbt.MAX_INLINE_VALUE_BYTES)
    if node_bytes:
        assert version["root_height"] >= 2
    else:
        assert version["root_height"] == 0
    # one data file for the 5 batches, one for the nodes
    assert len(os.listdir(tmp_path / "d")) == 2


def test_batches_written_at_once_and_out_of_order_share_one_data_file(tmp_path):
    """Through the page cache each batch is a range of the database's one data file, reserved
    when it is added; threads write their ranges in any order. With O_DIRECT each batch has a
    file of its own (its writes must start at aligned offsets)."""
    values = _values(1200)
    items = [(k, memoryview(v)) for k, v in values.items()]
    for direct in (False, True):
        root = tmp_path / str(direct)
        writer = _ocdbt.DatabaseWriter(root, direct=direct)
        files = [writer.add(items[i:i + 300]) for i in range(0, len(items), 300)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            sums = [f.result() for f in [pool.submit(writer.write, d) for d in files[::-1]]]
        writer.finish()
        assert {k: v for s in sums for k, v in s.items()} == {
            k: zlib.crc32(v) for k, v in values.items()}
        assert _read_all(root) == values
        data = [p for p in (root / "d").iterdir() if p.name != Path(writer.hint.node_file).name]
        assert len(data) == (4 if direct else 1)
        if not direct:  # (each value zero-padded to the next multiple of VALUE_ALIGN)
            assert data[0].read_bytes() == _laid_out(v for _, v in items)


def _resolved_index(root) -> dict[str, bytes]:
    """read_index's answer with every located value read from its data file."""
    out = {}
    for key, value in _ocdbt.read_index(root).items():
        if isinstance(value, tuple):
            path, offset, length = value
            with open(path, "rb") as f:
                f.seek(offset)
                value = f.read(length)
                assert len(value) == length
        out[key] = value
    return out


def test_read_index_finds_every_key_where_tensorstore_reads_it(tmp_path, node_bytes):
    values = _values(3000, seed=3)
    _write_database(tmp_path, {k: memoryview(v) for k, v in values.items()})
    assert _resolved_index(tmp_path) == values == _read_all(tmp_path)
    assert _ocdbt.read_index(tmp_path / "nothing-here") is None


def test_the_dump_of_a_database_asks_for_a_levels_nodes_at_once(tmp_path, monkeypatch):
    """TensorStore's dump of a database's index (an object store's restore, or a database
    this module did not write) requests every node of a B+tree level before it waits for
    the first: on an object store each is a request (30,000 arrays on fake-gcs-server, each
    request held 20 ms: 0.17 s against 0.47 s node by node)."""
    monkeypatch.setattr(_ocdbt, "_NODE_BYTES", 2_000)
    values = _values(3000, seed=5)
    _write_database(tmp_path, {k: memoryview(v) for k, v in values.items()})
    events: list[tuple[str, str]] = []
    real = _ocdbt.ts.ocdbt.dump

    class Logged:
        def __init__(self, fut, where):
            self.fut, self.where = fut, where

        def result(self):
            events.append(("wait", self.where))
            return self.fut.result()

    def spied(base, node=None, **kwargs):
        where = "manifest" if node is None else node
        events.append(("ask", where))
        return Logged(real(base, node, **kwargs) if node else real(base, **kwargs), where)

    monkeypatch.setattr(_ocdbt.ts.ocdbt, "dump", spied)
    base = _ocdbt.ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()
    index = _ocdbt.dumped_index(base)
    assert set(index) == set(values)
    runs: list[list] = []  # (runs of consecutive asks, or waits, for nodes)
    for kind, where in events:
        if where != "manifest":
            if runs and runs[-1][0] == kind:
                runs[-1][1] += 1
            else:
                runs.append([kind, 1])
    asks = [n for kind, n in runs if kind == "ask"]
    waits = [n for kind, n in runs if kind == "wait"]
    # level by level: every node of a level asked for, then every one waited for
    height = _manifest(tmp_path)["versions"][0]["root_height"]
    assert asks == waits and len(asks) == height + 1 >= 3 and asks[0] == 1 and asks[-1] > 1


def _no_tensorstore_dump(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("ts.ocdbt.dump called")

    monkeypatch.setattr(_ocdbt.ts.ocdbt, "dump", refuse)


def test_read_index_decodes_its_own_writers_nodes_without_tensorstore(tmp_path, monkeypatch,
                                                                     node_bytes):
    values = _values(3000, seed=5)
    writer = _write_database(tmp_path, {k: v if i % 2 else memoryview(v)
                                        for i, (k, v) in enumerate(values.items())})
    hint = writer.hint
    assert hint is not None and hint.height == (_manifest(tmp_path)["versions"][0]["root_height"])
    if node_bytes:
        assert hint.height >= 2
    expected = _ocdbt.read_index(tmp_path)  # (TensorStore's dump)
    with monkeypatch.context() as m:
        _no_tensorstore_dump(m)
        assert _ocdbt.read_index(tmp_path, hint) == expected
    assert _resolved_index(tmp_path) == values


def test_read_index_falls_back_to_tensorstore_when_the_hint_does_not_match(tmp_path,
                                                                          monkeypatch):
    values = _values(500, seed=6)
    writer = _ocdbt.DatabaseWriter(tmp_path)
    _write(writer, [(k, memoryview(v)) for k, v in values.items()])
    writer.finish()
    hint = writer.hint
    assert hint is not None
    expected = _ocdbt.read_index(tmp_path)
    used: list[str] = []
    real_dump = _ocdbt.ts.ocdbt.dump
    monkeypatch.setattr(_ocdbt.ts.ocdbt, "dump",
                        lambda *a: used.append("dump") or real_dump(*a))
    # another manifest (the database was changed since: a merge, another writer), a node
    # file that is not the one written, a root that is not a node
    for wrong in (msgspec.structs.replace(hint, manifest_crc32=hint.manifest_crc32 ^ 1),
                  msgspec.structs.replace(hint, node_crc32=hint.node_crc32 ^ 1),
                  msgspec.structs.replace(hint, root_offset=1)):
        used.clear()
        assert _ocdbt.read_index(tmp_path, wrong) == expected
        assert used, wrong
    used.clear()
    assert _ocdbt.read_index(tmp_path, hint) == expected and not used


def test_restore_reads_the_index_its_checksums_point_to(tmp_path, monkeypatch):
    state = {f"w{i}": np.arange(100 + i, dtype=np.float32) * i for i in range(40)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "x", state)
    sums = json.loads((tmp_path / "x" / "_CHECKSUMS").read_bytes())
    assert sums["index"]["node_file"].startswith("d/")
    _no_tensorstore_dump(monkeypatch)
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "x")
    for k, v in state.items():
        assert out[k].dtype == v.dtype and np.array_equal(out[k], v)


def test_read_index_follows_references_into_merged_databases(tmp_path):
    # TensorStore's merge (and Orbax's per-process databases) leave keys whose values lie in
    # another directory's data files, under B+tree nodes TensorStore wrote (zstd, key prefixes).
    ours, theirs = _merged_database(tmp_path)
    index = _ocdbt.read_index(tmp_path)
    assert any(isinstance(v, tuple) and "/lane/" in v[0] for v in index.values())
    assert _resolved_index(tmp_path) == {**ours, **theirs} == _read_all(tmp_path)


def test_read_index_of_a_deep_tree_tensorstore_wrote(tmp_path):
    # Small nodes: interior levels whose entries carry subtree common prefixes, which the
    # child nodes' keys leave out.
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path}",
                          "config": {"max_decoded_node_bytes": 400,
                                     "max_inline_value_bytes": 64}}).result()
    values = {f"params.block_{i // 40:02d}.layer_{i:04d}/{'.zarray' if i % 2 else '0.0'}":
              bytes([i % 251]) * (10 + i % 120) for i in range(600)}
    txn = ts.Transaction()
    for k, v in values.items():
        kv.with_transaction(txn)[k] = v
    txn.commit_async().result()
    version = _manifest(tmp_path)["versions"][-1]
    assert version["root_height"] >= 2
    base = ts.KvStore.open(f"file://{tmp_path}/").result()
    root = ts.ocdbt.dump(base, version["root"]["location"]).result()
    assert any(e["subtree_common_prefix"] for e in root["entries"])
    assert _resolved_index(tmp_path) == values == _read_all(tmp_path)


def test_read_index_of_an_orbax_checkpoint(tmp_path):
    state = {"a": np.arange(5000, dtype=np.float32), "b": {"c": np.ones((3, 4))}}
    ckptr = orbax.StandardCheckpointer()
    ckptr.save(tmp_path / "x", state)
    ckptr.wait_until_finished()
    assert _resolved_index(tmp_path / "x") == _read_all(tmp_path / "x")
    with ocp.StandardCheckpointer() as ours:  # (compressed: read through TensorStore's driver)
        out = ours.restore(tmp_path / "x")
    assert np.array_equal(out["a"], state["a"]) and np.array_equal(out["b"]["c"], state["b"]["c"])


def test_small_documents_are_inline_and_array_data_in_data_files(tmp_path):
    writer = _ocdbt.DatabaseWriter(tmp_path)
    chunk = np.arange(4, dtype=np.int8)
    _write(writer, [("a/.zarray", b"{}"), ("a/0", b"x" * 1024), ("b/0", b"y" * 1025),
                    ("c/0", _ocdbt.as_bytes(chunk))])  # a view of an array: never inline
    writer.finish()
    root = _manifest(tmp_path)["versions"][0]["root"]["location"]
    node = ts.ocdbt.dump(ts.KvStore.open(f"file://{tmp_path}/").result(), root).result()
    kinds = {e["key"]: ("inline" if "inline_value" in e else "indirect") for e in node["entries"]}
    assert kinds == {b"a/.zarray": "inline", b"a/0": "inline", b"b/0": "indirect",
                     b"c/0": "indirect"}
    # the data file holds exactly the out-of-line values, one after the other
    contents = [(tmp_path / "d" / f).read_bytes() for f in os.listdir(tmp_path / "d")]
    assert _laid_out([b"y" * 1025, chunk.tobytes()]) in contents  # (the other: the B+tree)
    assert _read_all(tmp_path)["c/0"] == chunk.tobytes()


def test_a_database_with_nothing_written_leaves_no_files(tmp_path):
    writer = _ocdbt.DatabaseWriter(tmp_path / "db")
    _write(writer, [])
    writer.finish()
    assert not (tmp_path / "db").exists()


def test_a_key_written_twice_is_refused_by_name(tmp_path):
    writer = _ocdbt.DatabaseWriter(tmp_path)
    _write(writer, [("a/0", b"1")])
    _write(writer, [("a/0", b"2")])
    with pytest.raises(ValueError, match=r"key 'a/0' written twice"):
        writer.finish()
    assert not (tmp_path / "manifest.ocdbt").exists()


def _merged_database(root) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Our database in ``root`` with a database TensorStore wrote in ``root/lane`` merged
    into it by reference; the values of each."""
    import asyncio

    ours = _values(500, seed=1)
    writer = _ocdbt.DatabaseWriter(root)
    _write(writer, [(k, memoryview(v)) for k, v in ours.items()])
    writer.finish()
    theirs = {f"params.z{i:03d}/0.0": bytes([i]) * (i * 40) for i in range(1, 80)}
    kv = ts.KvStore.open(ser.kvstore_spec(root / "lane", use_ocdbt=True, write=True),
                         context=ser.new_context()).result()
    for k, v in theirs.items():
        kv[k] = v
    asyncio.run(ser.merge_databases(root, [root / "lane"]))
    return ours, theirs


def test_tensorstore_merges_its_databases_into_ours(tmp_path):
    ours, theirs = _merged_database(tmp_path)
    assert _read_all(tmp_path) == {**ours, **theirs}
    assert [v["generation_number"] for v in _manifest(tmp_path)["versions"]] == [1, 2]


def test_what_only_tensorstore_writes_is_merged_into_our_database(tmp_path):
    import ml_dtypes
    arrays = {"f": np.arange(1 << 16, dtype=np.float32),  # any size: ours
              "i4": np.arange(100).astype(ml_dtypes.int4)}  # no zarr v2 name: TensorStore's

    async def main():
        writer = ser.ItemWriter(tmp_path, total_bytes=64 << 20)
        await writer.write([ser.StoredArray(n, a.shape, a.dtype, a.shape,
                                            ((tuple(slice(None) for _ in a.shape), a),))
                            for n, a in arrays.items()])
        await writer.finish()  # (our database, then the lane's merged into it)
        assert writer.merged == [tmp_path / ser.lane_dir(1, writer.db_uuid)]
        assert {k.split("/")[0] for k in _read_all(tmp_path)} == {"f", "i4"}
        ctx = ser.new_context()
        return {n: await ser.read_into_buffer(ctx, await ser.open_array(
            ctx, tmp_path, n, use_ocdbt=True, use_zarr3=False)) for n in arrays}

    import asyncio
    out = asyncio.run(main())
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype and out[name].tobytes() == arr.tobytes()


def _state():
    rng = np.random.default_rng(3)
    return {"w": {f"k{i:04d}": rng.standard_normal((8, 16)).astype(np.float32)
                  for i in range(600)},
            "big": jax.device_put(rng.standard_normal((512, 1024)).astype(np.float32))}


def test_orbax_restores_a_checkpoint_whose_tree_has_interior_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(_ocdbt, "_NODE_BYTES", 20_000)
    state = _state()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", state)
        ckptr.wait_until_finished()
    assert _manifest(tmp_path / "c")["versions"][0]["root_height"] >= 1
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    with orbax.StandardCheckpointer() as ockptr:
        out = ockptr.restore(tmp_path / "c", target)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_a_failed_data_file_write_fails_the_commit_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_ocdbt.os, "writev", full)
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(_state()))
        with pytest.raises(CommitError) as ei:
            ckptr.wait_until_finished()
    assert isinstance(ei.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []


def test_a_data_file_is_handed_to_the_disk_not_fsynced_by_its_writer(tmp_path, monkeypatch,
                                                                      fsynced):
    """The writer starts a data file's writeback (sync_file_range), and the B+tree's, and
    leaves their fsync to the commit's fsync of the whole checkpoint; where the kernel has no
    sync_file_range, it fsyncs a data file itself."""
    started: list[int] = []
    real_start = _ocdbt.start_writeback
    monkeypatch.setattr(_ocdbt, "start_writeback",
                        lambda fd, *a: started.append(fd) or real_start(fd, *a))
    writer = _ocdbt.DatabaseWriter(tmp_path / "a")
    _write(writer, [("x/0", memoryview(b"1" * 5000))])
    assert len(started) == 1 and fsynced == []
    writer.finish()  # the B+tree's node file and the manifest: started too, not fsynced
    assert len(started) == 3 and fsynced == []
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"3" * 5000)
        assert real_start(fd) is True  # Linux has it
    finally:
        os.close(fd)

    monkeypatch.setattr(_storage, "_sync_file_range", lambda: None)
    monkeypatch.setattr(_ocdbt, "start_writeback", real_start)
    writer = _ocdbt.DatabaseWriter(tmp_path / "b")
    _write(writer, [("x/0", memoryview(b"2" * 5000))])
    [data_file] = (tmp_path / "b" / "d").iterdir()
    assert fsynced == [str(data_file)]
    writer.finish()  # (its small files are left to the commit's fsync)
    assert fsynced == [str(data_file)]
    assert _read_all(tmp_path / "b") == {"x/0": b"2" * 5000}


def test_a_data_files_writeback_starts_as_it_is_copied_not_once_it_is_whole(
        tmp_path, monkeypatch, fsynced):
    """Each WRITEBACK_STEP_BYTES in the page cache has its writeback started at once (ranges
    back to back, each after its bytes were written); the rest once the file is whole."""
    monkeypatch.setattr(_ocdbt, "WRITE_PIECE_BYTES", 4096)
    monkeypatch.setattr(_ocdbt, "WRITEBACK_STEP_BYTES", 3 * 4096)
    calls: list[tuple[int, int, int]] = []  # (offset, length, file size then)
    real_start = _ocdbt.start_writeback

    def recording(fd, offset=0, length=0):
        calls.append((offset, length, os.fstat(fd).st_size))
        return real_start(fd, offset, length)

    monkeypatch.setattr(_ocdbt, "start_writeback", recording)
    # (values of whole multiples of VALUE_ALIGN: no padding between them)
    data = np.random.default_rng(3).integers(0, 256, 10 * 4096 + 128, dtype=np.uint8)
    writer = _ocdbt.DatabaseWriter(tmp_path)
    crcs = writer.write(writer.add([("a/0", memoryview(data[:5056].tobytes())),
                                    ("b/0", memoryview(data[5056:].tobytes()))]))
    *ranges, (last, rest, size) = calls
    assert len(ranges) == 3 and (last + rest, size) == (data.size, data.size)
    ends = [0] + [offset + length for offset, length, _ in ranges]
    for (offset, length, size), start in zip(ranges, ends, strict=False):
        assert offset == start and 3 * 4096 <= length < 4 * 4096 and size == offset + length
    assert last == ends[-1]
    assert crcs == {"a/0": zlib.crc32(data[:5056]), "b/0": zlib.crc32(data[5056:])}
    assert fsynced == []
    writer.finish()
    assert _read_all(tmp_path) == {"a/0": data[:5056].tobytes(), "b/0": data[5056:].tobytes()}


def _direct_values(rng) -> dict[str, bytes]:
    # sizes around and across the staging buffer's (2 x DIRECT_ALIGN, set by the tests)
    return {f"v{i}/0": rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for i, n in enumerate([1, 5000, 8192, 8193, 3 * 8192 + 5, 100, 4096])}


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_a_data_file_written_past_the_page_cache_is_the_same_file(tmp_path, monkeypatch):
    """With ``direct`` the data file is written with O_DIRECT, through a staging buffer, in
    aligned writes, and cut to its length: byte for byte the file the page cache path
    writes, with the same crc32s."""
    monkeypatch.setattr(_ocdbt, "DIRECT_PIECE_BYTES", 2 * _ocdbt.DIRECT_ALIGN)
    values = _direct_values(np.random.default_rng(4))
    import fcntl

    direct_writes: list[int] = []
    real_writev = _ocdbt.os.writev

    def recording(fd, views):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.extend(len(v) for v in views)
        return real_writev(fd, views)

    monkeypatch.setattr(_ocdbt.os, "writev", recording)
    sums, files = {}, {}
    for direct in (False, True):
        writer = _ocdbt.DatabaseWriter(tmp_path / str(direct), direct=direct)
        sums[direct] = writer.write(writer.add([(k, memoryview(v)) for k, v in values.items()]))
        [files[direct]] = (tmp_path / str(direct) / "d").iterdir()
        writer.finish()
        assert _read_all(tmp_path / str(direct)) == values
    assert sums[True] == sums[False] == {k: zlib.crc32(v) for k, v in values.items()}
    assert files[True].read_bytes() == files[False].read_bytes()
    assert direct_writes and all(n % _ocdbt.DIRECT_ALIGN == 0 for n in direct_writes)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_refusing_o_direct_gets_the_page_cache_path(tmp_path, monkeypatch,
                                                                  refused):
    """EINVAL for an O_DIRECT open, or for a write (an alignment beyond DIRECT_ALIGN): the
    file is written through the page cache instead, whole, with the right crc32s."""
    monkeypatch.setattr(_ocdbt, "DIRECT_PIECE_BYTES", 2 * _ocdbt.DIRECT_ALIGN)
    values = _direct_values(np.random.default_rng(5))
    real_open, real_writev = _ocdbt.os.open, _ocdbt.os.writev
    direct_fds: set[int] = set()
    refusals: list[str] = []

    def opening(path, flags, *a):
        if flags & os.O_DIRECT and refused == "open":
            refusals.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def writing(fd, views):
        if fd in direct_fds and refused == "write":
            direct_fds.discard(fd)
            refusals.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_writev(fd, views)

    monkeypatch.setattr(_ocdbt.os, "open", opening)
    monkeypatch.setattr(_ocdbt.os, "writev", writing)
    writer = _ocdbt.DatabaseWriter(tmp_path, direct=True)
    sums = writer.write(writer.add([(k, memoryview(v)) for k, v in values.items()]))
    [data_file] = (tmp_path / "d").iterdir()
    assert data_file.read_bytes() == _laid_out(values.values())
    writer.finish()
    assert sums == {k: zlib.crc32(v) for k, v in values.items()}
    assert _read_all(tmp_path) == values
    assert refusals == [refused]  # refused once, then written through the page cache


def _batches(count: int, seed: int) -> list[list[tuple[str, memoryview]]]:
    rng = np.random.default_rng(seed)
    return [[(f"a{b}.w{i}/0.0", memoryview(rng.integers(0, 256, 9000 + 1717 * i, np.uint8)
                                           .tobytes())) for i in range(4)]
            for b in range(count)]


@pytest.fixture
def opened_direct(monkeypatch) -> list[str]:
    """The names of the files _ocdbt opens with O_DIRECT, in order."""
    names: list[str] = []
    real_open = _ocdbt.os.open

    def opening(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            names.append(Path(path).name)
        return real_open(path, flags, *a)

    monkeypatch.setattr(_ocdbt.os, "open", opening)
    return names


@pytest.mark.parametrize("slow", [True, False], ids=["slow-page-cache", "fast-page-cache"])
def test_a_watched_save_goes_past_the_page_cache_from_where_it_turns_slow(
        tmp_path, monkeypatch, opened_direct, slow):
    """With ``watch``, each piece's copy into the page cache is timed. Once a window of them
    ran slower than PAGE_CACHE_MIN_RATE, the ranges of the shared data file being written go
    on past the page cache (their whole blocks with O_DIRECT, their ragged ends, which share
    blocks with the ranges beside them, through it) and later batches each get a file of
    their own. The shared file holds exactly its ranges' bytes, every value reads back with
    its crc32."""
    monkeypatch.setattr(_ocdbt, "WRITE_PIECE_BYTES", 4096)
    monkeypatch.setattr(_ocdbt, "WATCH_BYTES", 8192)
    monkeypatch.setattr(_ocdbt, "DIRECT_PIECE_BYTES", 2 * _ocdbt.DIRECT_ALIGN)
    monkeypatch.setattr(_ocdbt, "PAGE_CACHE_MIN_RATE", float("inf") if slow else 0.0)
    first, second, third = _batches(3, seed=11)
    writer = _ocdbt.DatabaseWriter(tmp_path, watch=True)
    shared = [writer.add(first), writer.add(second)]  # (the second one at an unaligned offset)
    assert shared[1].name == shared[0].name and shared[1].at % _ocdbt.DIRECT_ALIGN
    sums = writer.write(shared[0]) | writer.write(shared[1])
    assert writer.direct == slow
    later = writer.add(third)
    assert later.direct == slow and (later.at is None) == slow  # (a file of its own)
    sums |= writer.write(later)
    writer.finish()
    values = {k: bytes(v) for batch in (first, second, third) for k, v in batch}
    assert _read_all(tmp_path) == values
    assert sums == {k: zlib.crc32(v) for k, v in values.items()}
    data = (tmp_path / shared[0].name).read_bytes()
    assert data[:len(_laid_out(v for _, v in first + second))] == _laid_out(
        v for _, v in first + second)
    if hasattr(os, "O_DIRECT"):
        name = Path(shared[0].name).name
        assert opened_direct == ([name, name, Path(later.name).name] if slow else [])


@pytest.mark.parametrize("way", ["page-cache", "direct", "slow-page-cache"])
def test_a_data_files_rest_goes_on_in_the_thread_relocate_gives(tmp_path, monkeypatch, way):
    """``relocate(rest)`` (``Runtime.run_raised``), asked after each piece, may run the
    file's other pieces in another thread, whichever way it is written: through the page
    cache, past it, or past it from where the page cache turned slow (there the first piece
    past it is where it moves). The file and the crc32s are those one thread writes; the
    staging buffer the other thread goes on with, and pads the last block in, is the first
    thread's, which waits."""
    if way != "page-cache" and not hasattr(os, "O_DIRECT"):
        pytest.skip("O_DIRECT is Linux's")
    monkeypatch.setattr(_ocdbt, "WRITE_PIECE_BYTES", 4096)
    monkeypatch.setattr(_ocdbt, "WATCH_BYTES", 8192)
    monkeypatch.setattr(_ocdbt, "DIRECT_PIECE_BYTES", 2 * _ocdbt.DIRECT_ALIGN)
    monkeypatch.setattr(_ocdbt, "PAGE_CACHE_MIN_RATE", float("inf"))
    writes: list[int] = []  # the thread of each write
    for name in ("writev", "pwrite"):
        real = getattr(_ocdbt.os, name)

        def recording(*args, real=real):
            writes.append(threading.get_ident())
            return real(*args)

        monkeypatch.setattr(_ocdbt.os, name, recording)
    asked: list[int] = []
    moves_at = 2 if way == "slow-page-cache" else 1  # (its first ask: after the first 2 pieces)

    def relocate(rest) -> bool:
        asked.append(len(writes))
        if len(asked) != moves_at:
            return False
        other = threading.Thread(target=rest)
        other.start()
        other.join()
        return True

    values = _direct_values(np.random.default_rng(6))
    writer = _ocdbt.DatabaseWriter(tmp_path, direct=way == "direct",
                                   watch=way == "slow-page-cache")
    before = writer.add([(k.replace("v", "u"), memoryview(v)) for k, v in values.items()])
    data_file = writer.add([(k, memoryview(v)) for k, v in values.items()])
    sums = writer.write(data_file, relocate=relocate)
    moved_writes = writes[asked[-1]:]
    writer.write(before)  # (with slow-page-cache, a range of the shared file before this one)
    writer.finish()
    here = threading.get_ident()
    moved = asked[moves_at - 1]
    assert len(asked) == moves_at and moved > 0 and moved_writes
    assert set(writes[:moved]) == {here} and here not in moved_writes
    assert sums == {k: zlib.crc32(v) for k, v in values.items()}
    assert {k: v for k, v in _read_all(tmp_path).items() if k in values} == values
    assert writer.direct == (way != "page-cache")  # (slow-page-cache: it did turn slow)
    if way == "slow-page-cache":
        assert data_file.at % _ocdbt.DIRECT_ALIGN  # (a range with ragged ends)


def test_only_a_large_save_to_a_local_disk_goes_past_the_page_cache(tmp_path, monkeypatch):
    """O_DIRECT for a process's save of DIRECT_IO_MIN_BYTES or more on a local disk's file
    system (as /proc/self/mountinfo names it); in other saves there of WATCH_MIN_BYTES or
    more, from where the page cache is found slow; through the page cache otherwise."""
    assert _storage.file_system_type(Path("/proc/self")) == "proc"
    monkeypatch.setattr(ser, "DIRECT_IO_FILE_SYSTEMS", {_storage.file_system_type(tmp_path)})
    big = ser.DIRECT_IO_MIN_BYTES
    assert ser.ItemWriter(tmp_path, total_bytes=big).db.direct
    assert not ser.ItemWriter(tmp_path, total_bytes=big - 1).db.direct
    # From WATCH_MIN_BYTES, through the page cache as long as that is not found slow.
    least_watched = ser.WATCH_MIN_BYTES
    assert [ser.ItemWriter(tmp_path, total_bytes=n).db.watch is not None
            for n in (least_watched - 1, least_watched, big - 1, big)] == [
        False, True, True, False]
    # Under a host-memory budget too small for the writer threads' staging buffers (their
    # 5%), through the page cache.
    least = ser.DIRECT_IO_MIN_BUDGET
    assert least == 20 * ser.BACKGROUND_THREADS * _ocdbt.DIRECT_PIECE_BYTES
    assert ser.ItemWriter(tmp_path, total_bytes=big, memory_budget=least).db.direct
    assert not ser.ItemWriter(tmp_path, total_bytes=big, memory_budget=least - 1).db.direct
    assert ser.ItemWriter(tmp_path, total_bytes=big - 1, memory_budget=least - 1).db.watch is None
    monkeypatch.setattr(ser, "DIRECT_IO_FILE_SYSTEMS", {"ext4", "xfs"} - {
        _storage.file_system_type(tmp_path)})
    for n in (ser.WATCH_MIN_BYTES, big):  # e.g. NFS, FUSE, tmpfs
        writer = ser.ItemWriter(tmp_path, total_bytes=n)
        assert not writer.db.direct and writer.db.watch is None


@pytest.mark.parametrize(("value", "expected"), [(str(1 << 30), 1 << 30), ("1GB", 4 << 30)])
def test_the_direct_io_threshold_is_read_from_the_environment(value, expected):
    """A number of bytes sets it; anything else is reported and the default kept."""
    code = "import ckpt_async._serialize as s; print(s.DIRECT_IO_MIN_BYTES)"
    env = dict(os.environ, CKPT_ASYNC_DIRECT_IO_MIN_BYTES=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == [str(expected)], out.stderr[-2000:]
    assert ("is not a number of bytes" in out.stderr) == (not value.isdigit())


def test_small_documents_are_handed_to_the_disk_for_the_commits_fsync(tmp_path, monkeypatch,
                                                                     fsynced):
    """A save's small documents (written before the commit) start their writeback as they are
    written, so that the commit's fsync of each finds it on the disk; none is fsynced here.
    A durable write fsyncs its file at once."""
    started: list[str] = []
    real_start = _storage.start_writeback
    monkeypatch.setattr(_storage, "start_writeback",
                        lambda fd, *a: started.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_start(fd, *a))
    docs = [(tmp_path / "a" / "_METADATA", b"{}"), (tmp_path / "b" / "c" / "_sharding", b"[]")]
    _storage._write_files_sync(docs)
    assert started == [str(p) for p, _ in docs] and fsynced == []
    assert [p.read_bytes() for p, _ in docs] == [b"{}", b"[]"]
    _storage._write_file(tmp_path / "d", b"x", durable=True)
    assert fsynced == [str(tmp_path / "d")] and len(started) == 2


def test_write_returns_each_values_crc32(tmp_path, monkeypatch):
    monkeypatch.setattr(_ocdbt, "WRITE_PIECE_BYTES", 4096)  # values split across pieces
    rng = np.random.default_rng(9)
    values = {f"a{i}/0": rng.integers(0, 256, n, dtype=np.uint8).tobytes()
              for i, n in enumerate([1, 100, 4095, 4096, 4097, 3 * 4096 + 5, 50_000, 7])}
    writer = _ocdbt.DatabaseWriter(tmp_path)
    crcs = writer.write(writer.add([(k, memoryview(v)) for k, v in values.items()]))
    assert crcs == {k: zlib.crc32(v) for k, v in values.items()}
    writer.finish()
    assert _read_all(tmp_path) == values
    # Every value starts at a multiple of VALUE_ALIGN, where jax adopts a buffer read there.
    offsets = [v[1] for v in _ocdbt.read_index(tmp_path).values() if isinstance(v, tuple)]
    assert len(offsets) == len(values) and all(o % _ocdbt.VALUE_ALIGN == 0 for o in offsets)


def test_read_into_reads_in_pieces_with_each_buffers_crc32(tmp_path, monkeypatch):
    monkeypatch.setattr(_ocdbt, "READ_PIECE_BYTES", 4096)
    rng = np.random.default_rng(11)
    sizes = [1, 100, 4095, 4096, 4097, 3 * 4096 + 5, 50_000, 7]
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10 + b"".join(blobs))
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(
        sum(len(b) for b in bufs)) or real(fd, bufs, off))
    fd = os.open(path, os.O_RDONLY)
    try:
        views = [memoryview(bytearray(n)) for n in sizes]
        crcs = [0] * len(sizes)
        assert _ocdbt.read_into(fd, views, 10, crcs) == sum(sizes)
        assert [bytes(v) for v in views] == blobs
        assert crcs == [zlib.crc32(b) for b in blobs]
        assert max(calls) < 2 * 4096 and len(calls) >= sum(sizes) // 8192
        # past the end of the file: what is there, and no more
        views = [memoryview(bytearray(n)) for n in sizes]
        assert _ocdbt.read_into(fd, views, 10 + 5000) == sum(sizes) - 5000
    finally:
        os.close(fd)


def test_checkpoints_of_the_layout_before_round_40_still_restore_and_verify(tmp_path,
                                                                             monkeypatch):
    # Until round 40 a local save's data files lay in the item's d/ beside its B+tree (every
    # base path empty); since, in ocdbt.process_0/d/. Those checkpoints keep restoring, by
    # the index read directly and through TensorStore, and verify clean.
    real_init = _ocdbt.DatabaseWriter.__init__

    def old_layout(self, root, **kwargs):
        real_init(self, root, **{**kwargs, "data_base": ""})

    rng = np.random.default_rng(1)
    tree = {"w": rng.standard_normal((64, 64)).astype(np.float32),
            "b": jax.numpy.asarray(rng.integers(0, 99, 500, dtype=np.int32))}
    with monkeypatch.context() as patch:
        patch.setattr(_ocdbt.DatabaseWriter, "__init__", old_layout)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp_path / "old", tree)
    assert not (tmp_path / "old" / "ocdbt.process_0").exists()
    assert len(os.listdir(tmp_path / "old" / "d")) >= 2  # (the B+tree and the data)
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(tmp_path / "old")
    for key, want in tree.items():
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(want))
    assert ocp.verify(tmp_path / "old").ok
    with orbax.StandardCheckpointer() as ockptr:
        theirs = ockptr.restore(tmp_path / "old")
    for key, want in tree.items():
        np.testing.assert_array_equal(np.asarray(theirs[key]), np.asarray(want))
