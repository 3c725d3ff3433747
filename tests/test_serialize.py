"""The direct zarr writer produces what TensorStore's zarr driver produces, byte for byte."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
import zlib

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from ckpt_async import _ocdbt
from ckpt_async import _serialize as ser
from ckpt_async import _storage as storage
from ckpt_async.errors import CorruptCheckpointError

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128,
          ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
          ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e4m3b11fnuz]
SHAPES = [(), (0, 3), (5,), (2, 3, 4)]


async def _via_tensorstore(root, name, arr):
    spec = ser.array_spec(root, name, write=True)
    spec["metadata"] = {"shape": list(arr.shape), "chunks": [max(1, s) for s in arr.shape],
                        "compressor": None}
    spec["dtype"] = arr.dtype.name
    store = await ts.open(spec, create=True, open=True, context=ser.new_context())
    if arr.size:
        await store.write(arr)


async def _contents(root):
    kv = await ts.KvStore.open(ser.kvstore_spec(root, use_ocdbt=True, write=False),
                               context=ser.new_context())
    return {k.decode().split("/", 1)[1]: (await kv.read(k)).value for k in await kv.list()}


@pytest.mark.parametrize("own", [True, False], ids=["own-database", "tensorstore-kvstore"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_direct_write_matches_tensorstore(tmp_path, dtype, shape, own):
    # Both ways ckpt_async writes raw chunks store what TensorStore's zarr driver stores.
    dtype = np.dtype(dtype)
    assert ser.zarr_v2_dtype(dtype) is not None
    arr = (np.arange(int(np.prod(shape))) % 7).astype(np.float32).astype(dtype).reshape(shape)

    async def main():
        await _via_tensorstore(tmp_path / "ts", "x", arr)
        full = tuple(slice(None) for _ in shape)
        stored = ser.StoredArray("x", shape, dtype, shape, ((full, arr),))
        writer = ser.ItemWriter(tmp_path / "direct", own_database=own)
        await writer.write([stored])
        await writer.finish()
        assert (writer.db is not None) == own
        return await _contents(tmp_path / "ts"), await _contents(tmp_path / "direct")

    theirs, ours = asyncio.run(main())
    assert ours == theirs


def test_dtypes_outside_the_direct_path_are_left_to_tensorstore():
    assert ser.zarr_v2_dtype(np.dtype(ml_dtypes.int4)) is None
    assert ser.zarr_v2_dtype(np.dtype([("a", "i4")])) is None


def test_chunk_keys_of_shards():
    assert ser.chunk_key((), ()) == "0"
    assert ser.chunk_key((slice(None), slice(None)), (4, 3)) == "0.0"
    assert ser.chunk_key((slice(4, 8), slice(3, 6)), (4, 3)) == "1.1"


def test_chunk_grid_keys_and_regions_agree_with_tensorstore(tmp_path):
    assert ser.chunk_grid((), ()) == (("0", ()),)
    assert ser.chunk_grid((0, 3), (1, 3)) == ()
    grid = ser.chunk_grid((5, 3), (2, 3))  # the last row of chunks is clipped
    assert grid == (("0.0", (slice(0, 2), slice(0, 3))), ("1.0", (slice(2, 4), slice(0, 3))),
                    ("2.0", (slice(4, 5), slice(0, 3))))
    assert ser.chunk_grid((5, 3), (2, 3)) is grid  # small grids are computed once
    big = ser.chunk_grid((ser.CACHED_GRID_CHUNKS + 1,), (1,))  # larger ones each time
    assert len(big) == ser.CACHED_GRID_CHUNKS + 1 and ser.chunk_grid(*((len(big),), (1,))) == big
    assert ser.chunk_grid((len(big),), (1,)) is not big
    arr = np.arange(15, dtype=np.int32).reshape(5, 3)

    async def stored():
        spec = ser.array_spec(tmp_path, "x", write=True)
        spec["metadata"] = {"shape": [5, 3], "chunks": [2, 3], "compressor": None}
        spec["dtype"] = "int32"
        await (await ts.open(spec, create=True, open=True, context=ser.new_context())).write(arr)
        return await _contents(tmp_path)

    chunks = {k: v for k, v in asyncio.run(stored()).items() if k != ".zarray"}
    assert sorted(chunks) == [k for k, _ in grid]
    for key, region in grid:  # each stored chunk holds its region (padded to a whole chunk)
        held = np.frombuffer(chunks[key], np.int32).reshape(2, 3)
        np.testing.assert_array_equal(held[:region[0].stop - region[0].start], arr[region])


@pytest.mark.parametrize("compressor", [None, {"id": "zstd", "level": 1}])
@pytest.mark.parametrize("shape,chunks", [((5, 3), (2, 2)), ((7,), (3,)), ((), ()), ((0, 2), (1, 2)),
                                          ((4, 4), (4, 4))])
def test_item_reader_reads_what_tensorstore_wrote(tmp_path, shape, chunks, compressor):
    arr = (np.arange(int(np.prod(shape))) * 1.5).astype(np.float32).reshape(shape)

    async def main():
        spec = ser.array_spec(tmp_path, "x", write=True)
        spec["metadata"] = {"shape": list(shape), "chunks": [max(1, c) for c in chunks] or [],
                            "compressor": compressor}
        spec["dtype"] = "float32"
        store = await ts.open(spec, create=True, open=True, context=ser.new_context())
        if arr.size:
            await store.write(arr)
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        whole = await ser.read_array(ser.new_context(), tmp_path, "x", use_ocdbt=True,
                                     use_zarr3=False)
        return await reader.read_small(["x"]), whole

    direct, whole = asyncio.run(main())
    assert ("x" in direct) == (compressor is None)  # compressed chunks go through the driver
    for out in [whole, *direct.values()]:
        assert out.dtype == np.float32 and out.shape == shape
        assert out.tobytes() == arr.tobytes()
        assert out.flags.writeable


@pytest.mark.parametrize("shape,dtype", [((0,), np.float32), ((3, 5), np.int16),
                                         ((512, 1024), np.float32), ((1 << 21,), "bfloat16")])
def test_read_into_buffer_returns_the_stored_values_in_a_page_aligned_buffer(tmp_path, shape,
                                                                             dtype):
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    arr = (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)

    async def main():
        await _via_tensorstore(tmp_path, "x", arr)
        ctx = ser.new_context()
        store = await ser.open_array(ctx, tmp_path, "x", use_ocdbt=True, use_zarr3=False)
        return await ser.read_into_buffer(ctx, store)

    out = asyncio.run(main())
    assert out.dtype == dtype and out.shape == shape and out.flags.c_contiguous
    assert out.flags.writeable
    np.testing.assert_array_equal(out.view(np.uint8), arr.view(np.uint8))
    if arr.nbytes >= ser.POPULATED_BUFFER_MIN_BYTES:
        # (page-aligned: a CPU jax.device_put adopts the buffer instead of copying it)
        assert out.ctypes.data % 4096 == 0
        import jax
        assert jax.device_put(out).unsafe_buffer_pointer() == out.ctypes.data


def test_reads_of_local_files_go_through_a_mapping_and_writes_do_not(tmp_path):
    read = ser.kvstore_spec(tmp_path, use_ocdbt=True, write=False)
    write = ser.kvstore_spec(tmp_path, use_ocdbt=True, write=True)
    assert read["base"]["file_io_mode"] == {"mode": ser.READ_FILE_IO_MODE}
    assert "file_io_mode" not in write["base"] and "file_io_mode" not in write["manifest"]
    assert ser.array_spec(tmp_path, "x", use_ocdbt=False)["kvstore"]["file_io_mode"] == {
        "mode": ser.READ_FILE_IO_MODE}


def test_a_save_spreads_over_several_data_files_within_bounds():
    assert ser.data_file_size(0) == ser.MIN_DATA_FILE_SIZE
    assert ser.data_file_size(2 << 30) == ser.TARGET_DATA_FILE_SIZE == 256 << 20
    assert ser.data_file_size(512 << 20) == 64 << 20


def test_lanes_follow_the_size_of_the_save():
    assert ser.lane_count(0) == ser.lane_count(ser.LANE_BYTES * 2 - 1) == 1
    assert ser.lane_count(ser.LANE_BYTES * 2) == 2
    assert ser.lane_count(64 << 30) == ser.MAX_LANES


def _stored(name: str, arr: np.ndarray) -> ser.StoredArray:
    return ser.StoredArray(name, arr.shape, arr.dtype, arr.shape,
                           ((tuple(slice(None) for _ in arr.shape), arr),))


@pytest.mark.parametrize("processes", [None, 2])
def test_batches_spread_over_lanes_and_merge_into_the_root_database(tmp_path, monkeypatch,
                                                                    processes):
    # Small arrays (raw chunks) and ones over the direct limit (zarr driver) alike; with
    # several processes each writes its own lanes and the primary merges them all.
    monkeypatch.setattr(ser, "LANE_BYTES", 1)
    arrays = {f"a{i}": np.full((64 << i,), i, np.float32) for i in range(12)}
    names = list(arrays)

    async def main():
        writers = [ser.ItemWriter(tmp_path, total_bytes=3, direct_max_bytes=16 << 10,
                                  process_index=p, own_database=False)
                   for p in ([None] if processes is None else range(processes))]
        for i, name in enumerate(names):  # one array a batch, writers taking turns
            await writers[i % len(writers)].write([_stored(name, arrays[name])])
        if processes is None:
            await ser.merge_databases(tmp_path, writers[0].merged)
        else:
            await ser.merge_process_databases(tmp_path, processes)
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        small = await reader.read_small(names)
        ctx = ser.new_context()
        big = {n: await ser.read_into_buffer(ctx, await ser.open_array(
            ctx, tmp_path, n, use_ocdbt=True, use_zarr3=False)) for n in names if n not in small}
        return writers, {**small, **big}

    writers, out = asyncio.run(main())
    for name, arr in arrays.items():
        np.testing.assert_array_equal(out[name], arr)
    index = [0] if processes is None else list(range(processes))
    # (one process: folders of the writer's own, named for it; else Orbax's, per process)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ocdbt.")) == sorted(
        ser.lane_dir(lane, writers[0].db_uuid) if processes is None else ser.process_dir(i, lane)
        for i in index for lane in range(3))
    assert all(len(w.dirs) == 3 and w.merged == w.dirs for w in writers)


def test_one_lane_of_one_process_writes_into_the_item_directory(tmp_path):
    writer = ser.ItemWriter(tmp_path, total_bytes=ser.LANE_BYTES, own_database=False)
    assert writer.dirs == [tmp_path] and writer.merged == []


@pytest.mark.parametrize("batch_bytes", [1, 300, 1 << 20])
def test_small_arrays_read_in_batches_come_back_whole(tmp_path, monkeypatch, batch_bytes):
    monkeypatch.setattr(ser, "LOCAL_READ_BATCH_BYTES", batch_bytes)
    arrays = {f"a{i}": (np.arange(i * 7, dtype=np.int32) * (i + 1)).reshape(-1)
              for i in range(12)}
    arrays["s"] = np.array(3.5, np.float64)

    async def main():
        writer = ser.ItemWriter(tmp_path)
        await writer.write([ser.StoredArray(n, a.shape, a.dtype, a.shape,
                                            ((tuple(slice(None) for _ in a.shape), a),))
                            for n, a in arrays.items()])
        await writer.finish()
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        return await reader.read_small([*arrays, "missing"])

    out = asyncio.run(main())
    assert set(out) == set(arrays)  # an unknown name is left to the driver path
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
        np.testing.assert_array_equal(out[name], arr)
        assert not arr.size or out[name].ctypes.data % ser.HOST_ALIGNMENT == 0


@pytest.mark.parametrize("mappings", [True, False])
def test_host_buffer_is_aligned_with_or_without_anonymous_mappings(monkeypatch, mappings):
    monkeypatch.setattr(ser, "_ANONYMOUS_MAPPINGS", mappings)
    for shape in [(3,), (1 << 19,), (512, 1024)]:  # below and above the mapping threshold
        buf = ser.host_buffer(shape, np.dtype(np.float32))
        assert buf.shape == shape and buf.flags.writeable and buf.flags.c_contiguous
        assert buf.ctypes.data % ser.HOST_ALIGNMENT == 0
        buf[...] = 7
        assert float(buf.reshape(-1)[-1]) == 7.0


def _write_whole(tmp_path, arrays):
    async def main():
        writer = ser.ItemWriter(tmp_path)
        await writer.write([
            ser.StoredArray(n, a.shape, a.dtype, a.shape,
                            ((tuple(slice(None) for _ in a.shape), a),))
            for n, a in arrays.items()])
        await writer.finish()
    asyncio.run(main())


def test_small_reads_check_each_chunk_against_its_checksum_as_read(tmp_path):
    arrays = {"a": np.arange(10, dtype=np.int32), "b": np.ones((4, 4), np.float64)}
    _write_whole(tmp_path, arrays)
    right = {n: {".".join("0" * a.ndim): zlib.crc32(a.tobytes())} for n, a in arrays.items()}

    def read(sums):
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        return asyncio.run(reader.read_small(list(arrays), sums.get))

    out = read(right)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(out[name], arr)
    wrong = {**right, "b": {"0.0": right["b"]["0.0"] ^ 1}}
    with pytest.raises(CorruptCheckpointError,
                       match=rf"{re.escape(str(tmp_path))}: key 'b' fails its checksum \(chunks 0\.0\)"):
        read(wrong)


@pytest.mark.parametrize("mappings", [True, False])
def test_host_buffers_share_one_region_each_aligned_and_apart(monkeypatch, mappings):
    monkeypatch.setattr(ser, "_ANONYMOUS_MAPPINGS", mappings)
    specs = [((3,), np.dtype(np.int8)), ((0, 4), np.dtype(np.float32)),
             ((16, 1024), np.dtype(np.float32)), ((5,), np.dtype(ml_dtypes.bfloat16)),
             ((1 << 18,), np.dtype(np.float64))]  # 2 MiB in all: a populated mapping
    bufs = ser.host_buffers(specs)
    for i, ((shape, dtype), buf) in enumerate(zip(specs, bufs, strict=True)):
        assert buf.shape == shape and buf.dtype == dtype and buf.flags.c_contiguous
        assert buf.flags.writeable and buf.ctypes.data % ser.HOST_ALIGNMENT == 0
        buf[...] = i
    for i, buf in enumerate(bufs):  # no two overlap
        assert not buf.size or (buf == i).all()
    # one region (its pages populated at once): laid out one after the other
    starts = [b.ctypes.data for b in bufs]
    span = sum(-(-b.nbytes // ser.HOST_ALIGNMENT) * ser.HOST_ALIGNMENT for b in bufs)
    assert starts == sorted(starts) and starts[-1] + bufs[-1].nbytes - starts[0] <= span
    import jax
    assert jax.device_put(bufs[2]).unsafe_buffer_pointer() == bufs[2].ctypes.data  # adopted


def test_the_btree_is_written_once_every_key_has_its_place_while_the_data_is_written(
        tmp_path, monkeypatch):
    # expect_batches: once every batch is handed over and its keys have their places in the
    # database, the B+tree and manifest are written, while a data file is still being copied
    # into the page cache (held here) and none has reached the disk (writebacks held); not
    # before (the last batch's add is held first).
    arrays = {f"a{i}": np.full((300,), i, np.float64) for i in range(4)}
    place, copy, writeback = threading.Event(), threading.Event(), threading.Event()
    real_add, real_write = _ocdbt.DatabaseWriter.add, _ocdbt.DatabaseWriter.write
    real_writeback = _ocdbt.start_writeback

    def slow_add(self, values, **kwargs):
        if any(key.startswith("a2/") for key, _ in values):
            place.wait(5)
        return real_add(self, values, **kwargs)

    def slow_write(self, data_file, **kwargs):
        if "a0/0" in data_file.keys:
            copy.wait(5)
        return real_write(self, data_file, **kwargs)

    def slow_writeback(fd, *args):
        if os.fstat(fd).st_size > 1024:  # a data file's (2,400 bytes), not the B+tree's
            writeback.wait(5)
        return real_writeback(fd, *args)

    monkeypatch.setattr(_ocdbt.DatabaseWriter, "add", slow_add)
    monkeypatch.setattr(_ocdbt.DatabaseWriter, "write", slow_write)
    monkeypatch.setattr(_ocdbt, "start_writeback", slow_writeback)
    seen: list[bool] = []

    async def main():
        writer = ser.ItemWriter(tmp_path)
        all_in = writer.expect_batches(2)
        items = list(arrays.items())
        first = asyncio.ensure_future(writer.write([_stored(n, a) for n, a in items[:2]]))
        second = asyncio.ensure_future(writer.write([_stored(n, a) for n, a in items[2:]]))
        await asyncio.sleep(0.2)
        seen.append(all_in.done() or (tmp_path / "manifest.ocdbt").exists())
        place.set()
        await asyncio.wrap_future(all_in)
        deadline = time.monotonic() + 120  # (generous: two busy cores in CI)
        while time.monotonic() < deadline:  # the manifest appears while the first batch's
            if (tmp_path / "manifest.ocdbt").exists():  # copy is held
                break
            await asyncio.sleep(0.01)
        seen.append((tmp_path / "manifest.ocdbt").exists() and not first.done())
        copy.set()
        writeback.set()
        await asyncio.gather(first, second)
        await writer.finish()
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        return await reader.read_small(list(arrays))

    out = asyncio.run(main())
    assert seen == [False, True]
    assert all(np.array_equal(out[n], a) for n, a in arrays.items())


@pytest.mark.parametrize("process_index", [None, 1])
def test_each_process_of_several_fsyncs_its_own_database(tmp_path, fsynced, process_index):
    # A data file's writer only starts its writeback; one process leaves the fsync to the
    # commit's pass over the whole checkpoint, each of several fsyncs its own database in
    # finish() (another host's page cache is not the primary's to flush).

    async def main():
        writer = ser.ItemWriter(tmp_path, process_index=process_index)
        await writer.write([_stored("a", np.arange(3000, dtype=np.float64))])
        await writer.finish()
        return writer.db.root

    root = asyncio.run(main())
    files = {str(p) for p in root.rglob("*") if p.is_file()}
    assert len(files) == 3  # a data file, the B+tree nodes, the manifest
    if process_index is None:
        assert fsynced == []
    else:
        assert root.name == ser.process_dir(process_index)
        assert files <= set(fsynced) and str(root) in fsynced


def test_settle_waits_for_the_threads_a_failed_batch_left_running(tmp_path, monkeypatch):
    # One batch fails at once while another's data file is still being written: settle()
    # returns only when that thread is done, so removing the directory afterwards leaves it
    # removed.
    started, release = threading.Event(), threading.Event()
    real_write = _ocdbt.DatabaseWriter.write

    def write(self, data_file, **kwargs):
        if b"bad" in b"".join(bytes(b[:3]) for b in data_file.buffers):
            raise OSError(28, "No space left on device")
        started.set()
        release.wait(5)
        return real_write(self, data_file, **kwargs)

    monkeypatch.setattr(_ocdbt.DatabaseWriter, "write", write)
    item = tmp_path / "item"
    item.mkdir()

    async def main():
        writer = ser.ItemWriter(item)
        good = asyncio.ensure_future(writer.write([_stored("good", np.zeros(400, np.float64))]))
        bad = np.frombuffer(b"bad" + bytes(4000 - 3), np.uint8)
        with pytest.raises(OSError):
            await writer.write([_stored("bad", bad)])
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        good.cancel()
        settling = asyncio.ensure_future(writer.settle())
        await asyncio.sleep(0.05)
        assert not settling.done()  # the good batch's thread is still writing
        release.set()
        await settling

    asyncio.run(main())
    shutil.rmtree(item)
    assert not item.exists()
    assert list(tmp_path.iterdir()) == []


def _write_items(root, arrays):
    async def main():
        writer = ser.ItemWriter(root)
        await writer.write(list(arrays))
        await writer.finish()
    asyncio.run(main())


def test_local_reads_return_what_was_written_chunked_or_whole(tmp_path):
    import ml_dtypes
    rng = np.random.default_rng(5)
    grid = rng.standard_normal((4, 6)).astype(np.float32)
    whole = {"s": np.array(2.5, np.float64), "e": np.zeros((0, 3), np.int32),
             "v": np.arange(5, dtype=np.int16), "t": rng.standard_normal((2, 3, 4)),
             "bf": rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)}
    sharded = ser.StoredArray("g", (4, 6), grid.dtype, (2, 6), (
        ((slice(0, 2), slice(None)), grid[:2]), ((slice(2, 4), slice(None)), grid[2:])))
    _write_items(tmp_path, [_stored(n, a) for n, a in whole.items()] + [sharded])
    expect = {**whole, "g": grid}

    async def main():
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        assert await reader.index() is not None
        one_by_one = {}
        for name in expect:
            plan = reader.local_plan(name)
            assert plan is not None, name
            one_by_one[name] = await reader.read_array(name, plan, None)
        return one_by_one, await reader.read_small(list(expect))

    one_by_one, batched = asyncio.run(main())
    for out in (one_by_one, batched):
        assert set(out) == set(expect)
        for name, arr in expect.items():
            assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
            assert out[name].tobytes() == arr.tobytes()
            # aligned, so that a CPU jax.device_put adopts the buffer instead of copying it
            assert arr.size == 0 or out[name].ctypes.data % ser.HOST_ALIGNMENT == 0, name
    import jax
    big = one_by_one["bf"]
    assert jax.device_put(big).unsafe_buffer_pointer() == big.ctypes.data


@pytest.mark.parametrize(("size", "calls"), [(320, [256, 44]), (300, [255, 255, 87])])
def test_small_arrays_lying_side_by_side_take_one_read_per_run(tmp_path, monkeypatch, size,
                                                               calls):
    # Arrays of 1,280 bytes lie back to back; of 1,200, 16 bytes of padding apart (each value
    # starts at a multiple of VALUE_ALIGN), read into a scratch view between theirs: runs of
    # 128 arrays and 127 paddings then (IOV_MAX views a call).
    arrays = {f"a{i:03d}": np.full((size,), i, np.float32) for i in range(300)}  # (not inline)
    _write_items(tmp_path, [_stored(n, a) for n, a in arrays.items()])
    monkeypatch.setattr(_ocdbt, "IOV_MAX", 256)
    monkeypatch.setattr(_ocdbt, "READ_PIECE_BYTES", 1 << 30)  # (pieces: test_ocdbt)
    made = []
    real = os.preadv

    def counting(fd, buffers, offset):
        made.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
    names = sorted(arrays, reverse=True)  # (any order: they are read in the order they lie)
    sums = {n: {"0": zlib.crc32(a.tobytes())} for n, a in arrays.items()}
    out = asyncio.run(reader.read_small(names, sums.get))
    assert all(np.array_equal(out[n], a) for n, a in arrays.items())
    assert made == calls  # one data file, at most IOV_MAX buffers per call


@pytest.mark.parametrize("packed", [False, True])
def test_small_arrays_read_past_the_page_cache_are_views_of_aligned_regions(tmp_path,
                                                                             monkeypatch, evict,
                                                                             packed):
    # A restore past the page cache (ItemReader.direct) reads each run of arrays lying one
    # after the other with reads whose file offset, length and memory are DIRECT_ALIGN-aligned,
    # into a region laid out as the file is. ckpt_async pads every value to VALUE_ALIGN (64):
    # one run. In a database with values packed back to back (``packed``, as TensorStore
    # writes them), arrays at offsets jax's alignment does not allow (after the odd-sized
    # "b0") are read through the page cache. Every one is checked, 64-byte aligned and
    # bit-exact, whichever way it came.
    import fcntl

    arrays = {f"a{i:02d}": np.full((256,), i, np.float32) for i in range(40)}  # 1 KiB each
    arrays |= {"b0": np.arange(1000, dtype=np.float16), "b1": np.arange(999, dtype=np.int8),
               "c": np.full((256,), 7, np.float32)}
    with monkeypatch.context() as m:
        if packed:
            m.setattr(_ocdbt, "VALUE_ALIGN", 1)
        _write_items(tmp_path, [_stored(n, a) for n, a in arrays.items()])
    reads, direct_fds = [], set()
    real_read, real_open = _ocdbt.read_region, _ocdbt.open_direct

    def read_region(fd, region, start, spans, crcs, piece=_ocdbt.READ_PIECE_BYTES):
        reads.append((np.frombuffer(region, np.uint8).ctypes.data, len(region), start, piece))
        return real_read(fd, region, start, spans, crcs, piece)

    def open_direct(path):
        fd = real_open(path)
        if fd is not None:
            assert os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL)
            direct_fds.add(fd)
        return fd

    monkeypatch.setattr(_ocdbt, "read_region", read_region)
    monkeypatch.setattr(_ocdbt, "open_direct", open_direct)
    sums = {n: {"0": zlib.crc32(a.tobytes())} for n, a in arrays.items()}

    monkeypatch.setattr(ser, "DIRECT_IO_MIN_BYTES", 0)  # (a restore as large as 4 GiB)
    monkeypatch.setattr(ser, "DIRECT_IO_FILE_SYSTEMS", {storage.file_system_type(tmp_path)})
    evict(tmp_path.rglob("d/*"))  # (as a restart finds them)

    async def read():
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        out = await reader.read_small(sorted(arrays), sums.get)
        assert reader.direct
        return out

    out = asyncio.run(read())
    assert sorted(out) == sorted(arrays)
    for name, arr in arrays.items():
        assert out[name].dtype == arr.dtype and out[name].tobytes() == arr.tobytes(), name
        assert out[name].ctypes.data % ser.HOST_ALIGNMENT == 0, name
    # One aligned read of the run from a00 to c (44 KiB), or when packed to b0 (40 KiB and
    # 2,000 bytes: b1, at 42,960, and c are read through the page cache).
    assert reads == [(reads[0][0], 45056, 0, _ocdbt.DIRECT_READ_PIECE_BYTES)]
    in_region = out["c"].ctypes.data - reads[0][0] == 44032
    assert in_region != packed
    assert reads[0][0] % _ocdbt.DIRECT_ALIGN == 0
    assert (out["a00"].ctypes.data, out["b0"].ctypes.data) == (reads[0][0], reads[0][0] + 40960)
    assert direct_fds or _ocdbt.open_direct(str(next((tmp_path / "d").iterdir()))) is None
    # A chunk damaged on disk fails its checksum, named; a data file cut short is named.
    reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
    asyncio.run(reader.index())
    (_key, _region, (path, offset, length)), = reader.local_plan("a07")[3]
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        f.write(b"\xff")
        f.flush()
        with pytest.raises(CorruptCheckpointError,
                           match=r"'a07' fails its checksum \(chunks 0\)"):
            asyncio.run(read())
        f.seek(offset + 5)
        f.write(b"\x00")
    os.truncate(path, 30000)  # (whichever way it is read)
    with pytest.raises(CorruptCheckpointError,
                       match=rf"key 'a29': data file {re.escape(path)} ends inside a chunk"):
        asyncio.run(read())


def test_a_restore_reads_past_the_page_cache_when_its_data_is_not_in_it(tmp_path, monkeypatch,
                                                                         evict):
    """O_DIRECT reads on a local disk's file system for a restore whose data files are mostly
    not in the page cache, where the kernel can tell (``cachestat``); where it cannot, for a
    restore of DIRECT_IO_MIN_BYTES or more (the arrays it reads, not the whole item).
    Through the page cache otherwise, and on other file systems."""
    arrays = {"a": np.arange(1000, dtype=np.float32), "b": np.ones((30, 7), np.float64)}

    _write_items(tmp_path, [_stored(n, a) for n, a in arrays.items()])
    data_files = [str(p) for p in tmp_path.rglob("d/*")]  # (B+tree and data)

    def reads_direct(names, threshold, fs):
        monkeypatch.setattr(ser, "DIRECT_IO_MIN_BYTES", threshold)
        monkeypatch.setattr(ser, "DIRECT_IO_FILE_SYSTEMS", fs)

        async def read():
            reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
            out = await reader.read_small(names)
            assert all(np.array_equal(out[n], arrays[n]) for n in names)
            return reader.direct
        return asyncio.run(read())

    here = {storage.file_system_type(tmp_path)}
    both = arrays["a"].nbytes + arrays["b"].nbytes
    cached = storage.cached_fraction(data_files)
    if cached is None:  # (a kernel without cachestat, or a sandbox refusing it)
        assert reads_direct(["a", "b"], both, here)
        assert not reads_direct(["a", "b"], both + 1, here)
        assert not reads_direct(["a"], both, here)  # (a partial restore counts what it reads)
    else:
        assert cached == 1.0  # just written: from the page cache, at any size
        assert not reads_direct(["a", "b"], 0, here)
        evict(data_files)
        assert storage.cached_fraction(data_files) < 0.5
        assert reads_direct(["a"], both + 1, here)  # past it, at any size
        assert storage.cached_fraction(data_files) < 0.5  # (and it stays out)
        with open(data_files[0], "rb") as f:  # the page cache holds them again
            f.read()
        with open(data_files[1], "rb") as f:
            f.read()
        assert storage.cached_fraction(data_files) == 1.0
        assert not reads_direct(["a"], 0, here)
        evict(data_files)
    assert not reads_direct(["a", "b"], 0, {"nfs4"})  # e.g. NFS, FUSE, tmpfs


def test_local_reads_check_each_chunk_and_leave_foreign_encodings_to_the_driver(tmp_path):
    arr = np.arange(1000, dtype=np.float64)
    _write_items(tmp_path, [_stored("x", arr)])

    async def read(sums):
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        await reader.index()
        return await reader.read_array("x", reader.local_plan("x"), sums)

    good = asyncio.run(read({"0": zlib.crc32(arr.tobytes())}))
    assert np.array_equal(good, arr)
    with pytest.raises(CorruptCheckpointError, match=r"'x' fails its checksum \(chunks 0\)"):
        asyncio.run(read({"0": zlib.crc32(arr.tobytes()) ^ 1}))

    async def plan_with_length(length):
        reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        await reader.index()
        dtype, shape, chunks, refs = reader.local_plan("x")
        (key, region, (path, offset, _n)), = refs
        plan = (dtype, shape, chunks, [(key, region, (path, offset, length))])
        return await reader.read_array("x", plan, None)

    assert asyncio.run(plan_with_length(arr.nbytes - 8)) is None  # (say, compressed)


@pytest.mark.parametrize("sizes", [(0, 0), (1, 0), (0, 5), (7, 13), (1000, 4096),
                                   (65537, (1 << 20) + 3)])
def test_crc32_combine_matches_zlib_on_the_joined_bytes(sizes):
    rng = np.random.default_rng(sum(sizes))
    a, b = (rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes)
    assert _ocdbt.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("direct", [False, True])
def test_a_large_array_is_read_in_segments_by_several_threads_and_checked_whole(
        tmp_path, monkeypatch, direct):
    # With ``direct`` (a restore past the page cache), the segments cover the array's bytes
    # widened to DIRECT_ALIGN in the file, as O_DIRECT reads must be; the array is a view of
    # the region read, and its checksum is taken over its own bytes only.
    arr = np.random.default_rng(9).standard_normal(10_000).astype(np.float32)  # 40,000 bytes
    _write_items(tmp_path, [_stored("a", np.arange(16, dtype=np.float32)), _stored("x", arr)])
    monkeypatch.setattr(ser, "READ_SEGMENT_BYTES", 4096)  # 10 segments, the last of 3,136 bytes
    threads, reads = set(), []
    real = ser.ItemReader._read_segment

    def segment(self, name, path, part, start, span, checksum, direct):
        threads.add(threading.get_ident())
        reads.append((start, len(part)))
        return real(self, name, path, part, start, span, checksum, direct)

    monkeypatch.setattr(ser.ItemReader, "_read_segment", segment)
    right = {"0": zlib.crc32(arr.tobytes())}

    async def read(sums, reader=None):
        reader = reader or ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
        reader.direct = direct
        await reader.index()
        return await reader.read_array("x", reader.local_plan("x"), sums)

    out = asyncio.run(read(right))
    assert out.tobytes() == arr.tobytes() and out.ctypes.data % ser.HOST_ALIGNMENT == 0
    reader = ser.ItemReader(tmp_path, use_ocdbt=True, use_zarr3=False)
    asyncio.run(reader.index())
    (_key, _region, (path, offset, length)), = reader.local_plan("x")[3]
    if direct:
        assert offset == 64  # (after "a": the region starts 64 bytes before the array)
        assert sorted(reads) == [(s, 4096) for s in range(0, offset + arr.nbytes, 4096)]
        assert out.ctypes.data % 4096 == offset
    else:
        assert sorted(reads) == [(offset + s, min(4096, arr.nbytes - s))
                                 for s in range(0, arr.nbytes, 4096)]
    assert len(threads) > 1
    with pytest.raises(CorruptCheckpointError, match=r"'x' fails its checksum \(chunks 0\)"):
        asyncio.run(read({"0": right["0"] ^ 1}))
    # A byte changed in the last segment on disk is caught by the combined checksum.
    with open(path, "r+b") as f:
        f.seek(offset + length - 1)
        last = f.read(1)
        f.seek(offset + length - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match=r"'x' fails its checksum \(chunks 0\)"):
        asyncio.run(read(right))
    assert np.array_equal(asyncio.run(read(None))[:-1], arr[:-1])  # (unchecked: read as is)
    # A data file cut short inside the array: the segment past its end names the file.
    os.truncate(path, offset + length - 5000)
    with pytest.raises(CorruptCheckpointError,
                       match=rf"key 'x': data file {re.escape(path)} ends inside a chunk"):
        asyncio.run(read(right))


def test_shard_shapes_and_sharding_documents_match_jax_and_are_made_once_per_sharding():
    # A single device's shard shape is the array's own (taken without jax's cache, keyed by
    # sharding objects); a named sharding's JSON is made once for equal shardings (distinct
    # objects, as every array has its own) and reads back as the same sharding.
    import jax
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices[:4]).reshape(2, 2), ("x", "y"))
    for sharding in (SingleDeviceSharding(devices[1]), NamedSharding(mesh, PartitionSpec("x")),
                     NamedSharding(mesh, PartitionSpec(None, "y")),
                     NamedSharding(mesh, PartitionSpec())):
        assert ser.shard_shape(sharding, (8, 6)) == list(sharding.shard_shape((8, 6)))
    a, b = NamedSharding(mesh, PartitionSpec("x")), NamedSharding(mesh, PartitionSpec("x"))
    ser._named_sharding_json.cache_clear()
    assert ser.sharding_to_json(a) == ser.sharding_to_json(b)
    assert ser._named_sharding_json.cache_info().misses == 1
    assert ser.sharding_from_json(ser.sharding_to_json(a)) == a
    single = ser.sharding_to_json(SingleDeviceSharding(devices[2]))
    assert ser.sharding_from_json(single) == SingleDeviceSharding(devices[2])


def test_coalesced_ranges_take_in_small_gaps_and_stop_at_their_size():
    """The ranged reads of a restore from an object store: refs of one data file closer than
    ``gap`` share a range, up to ``most`` bytes a range (a ref larger than that has one of
    its own); refs of other files, or further apart, start new ranges; each ref maps to the
    range that holds it, duplicates included."""
    refs = [("d/b", 0, 10), ("d/a", 100, 50), ("d/a", 0, 40), ("d/a", 60, 30),  # gap 20
            ("d/a", 300, 10),   # gap 150: a new range
            ("d/a", 310, 200),  # adjacent, but the range would span 210 > 200
            ("d/a", 0, 40)]     # a duplicate
    ranges, where = ser.coalesced(refs, gap=100, most=200)
    assert ranges == [("d/a", 0, 150), ("d/a", 300, 310), ("d/a", 310, 510), ("d/b", 0, 10)]
    assert where == {("d/a", 0, 40): 0, ("d/a", 60, 30): 0, ("d/a", 100, 50): 0,
                     ("d/a", 300, 10): 1, ("d/a", 310, 200): 2, ("d/b", 0, 10): 3}
    for ref, i in where.items():  # every ref lies inside its range
        path, start, end = ranges[i]
        assert ref[0] == path and start <= ref[1] and ref[1] + ref[2] <= end
    assert ser.coalesced([]) == ([], {})


def test_dtype_names_read_from_files_reach_numpy_only_as_names():
    # np.dtype raises SyntaxError for "(1e999,)f4" and kills the process (a floating point
    # exception) for "m8[Y/0]": a .zarray or msgpack file naming them did so to a restore.
    # (The SyntaxError case first: without the check the test fails there, cleanly.)
    for name in ("(1e999,)f4", "m8[Y/0]", "f4,i4", "", None, 4, [["a", "<f4"]], "finfo"):
        with pytest.raises(TypeError, match="not understood"):
            ser.dtype_named(name)
        zarray = {"zarr_format": 2, "dtype": name, "shape": [2], "chunks": [2],
                  "compressor": None, "filters": None, "order": "C"}
        assert ser._direct_plan(zarray) is None
    for name, dtype in (("float32", np.float32), ("<f4", np.float32), ("|b1", np.bool_),
                        (b"int8", np.int8), ("bfloat16", ml_dtypes.bfloat16),
                        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn), (">c16", ">c16")):
        assert ser.dtype_named(name) == np.dtype(dtype)


@pytest.mark.parametrize("shape,chunks,dtype", [
    ((), (), np.float32), ((7,), (7,), np.int8), ((3, 0), (3, 0), np.float64),
    ((64, 33), (32, 33), ml_dtypes.bfloat16), ((2, 3, 4), (1, 3, 4), np.bool_),
    ((5,), (5,), np.complex64), ((4, 4), (4, 4), np.uint64)])
def test_the_zarray_ckpt_async_writes_is_the_one_tensorstore_writes(shape, chunks, dtype):
    """The ``.zarray`` documents ckpt_async writes itself (beside raw chunks, and for the
    arrays the zarr driver then writes with ``assume_metadata``) are byte for byte those
    TensorStore's zarr driver writes when it creates the array."""
    ctx = ts.Context()
    spec = {"driver": "zarr", "kvstore": {"driver": "memory", "path": "a/"},
            "metadata": ser._zarr_metadata(shape, chunks, compress=False),
            "dtype": np.dtype(dtype).name}
    ts.open(spec, create=True, open=True, context=ctx).result()
    kv = ts.KvStore.open({"driver": "memory"}, context=ctx).result()
    written = kv.read("a/.zarray").result().value
    zdtype = ser.zarr_v2_dtype(np.dtype(dtype))
    assert zdtype is not None
    assert ser.zarray_document(shape, chunks, zdtype) == written


@pytest.mark.parametrize("where", ["batch", "one_by_one", "driver"])
def test_a_restore_out_of_host_memory_names_the_array_and_the_bytes(tmp_path, monkeypatch,
                                                                   where):
    """No memory for an array's buffer (NumPy's MemoryError; ENOMEM from a mapping) raises
    OutOfMemoryError, still a MemoryError, naming the step's item, the array and the bytes
    asked for: a bare MemoryError named nothing. Small arrays are read in batches into one
    region (``host_buffers``), larger ones one by one (``aligned_empty``), and without a
    local index through TensorStore's driver into a mapping (``host_buffer``)."""
    import errno

    import ckpt_async as ocp
    from ckpt_async.errors import OutOfMemoryError

    state = {"small": np.arange(8, dtype=np.float32), "big": np.ones(1 << 19, np.float32)}
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, args=ocp.args.StandardSave(state))
    name, nbytes = ("small", 32) if where == "batch" else ("big", 1 << 21)
    if where == "driver":
        async def nothing(self, *args):
            return None if not args else {}

        monkeypatch.setattr(ser.ItemReader, "index", nothing)
        monkeypatch.setattr(ser.ItemReader, "read_small", nothing)
    real = ser.host_buffer if where != "one_by_one" else ser.aligned_empty
    cause = OSError(errno.ENOMEM, "Cannot allocate memory") if where == "driver" else \
        MemoryError()

    def refuse(shape, dtype):
        size = np.prod(shape) * np.dtype(dtype).itemsize
        if size == nbytes or (where == "batch" and size < 1 << 20):  # (a batch's region)
            raise cause
        return real(shape, dtype)

    monkeypatch.setattr(ser, "host_buffer" if where != "one_by_one" else "aligned_empty",
                        refuse)
    with ocp.CheckpointManager(tmp_path) as mngr, pytest.raises(OutOfMemoryError) as ei:
        mngr.restore(3)
    assert isinstance(ei.value, MemoryError) and ei.value.__cause__ is cause
    assert str(ei.value).startswith(
        f"{tmp_path / '3' / 'default'}: key {name!r}: out of host memory allocating "
        f"{nbytes} bytes"), ei.value
