"""Staging of device-resident arrays through pinned host memory (the GPU path), run here on
CPU devices: the test treats them as a GPU's (not host-resident, a platform with the pinned
path), which CPU devices can be since they have a ``pinned_host`` memory kind too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async import _stage
from ckpt_async.errors import UnsupportedLeafError


@pytest.fixture
def as_gpu(monkeypatch):
    """CPU arrays take the path a GPU's take; returns the list of pinned-host shardings
    jax.device_put was asked to move arrays to."""
    monkeypatch.setattr(_stage, "_host_resident", lambda value: not isinstance(value, jax.Array))
    monkeypatch.setattr(_stage, "PINNED_HOST_PLATFORMS", frozenset({"cpu"}))
    moves: list = []
    real = jax.device_put

    def spy(x, device=None, **kw):
        if isinstance(device, list):
            moves.extend(d for d in device if getattr(d, "memory_kind", None) == "pinned_host")
        return real(x, device, **kw)

    monkeypatch.setattr(_stage.jax, "device_put", spy)
    return moves


def _mesh_array(shape, spec, dtype=jnp.float32):
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    data = (np.arange(np.prod(shape)) * 0.25).astype(dtype).reshape(shape)
    return jax.device_put(data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))), data


def test_device_arrays_reach_disk_through_pinned_host_memory(tmp_path, as_gpu):
    single = jnp.arange(1000, dtype=jnp.bfloat16)
    split, split_np = _mesh_array((8, 6), ("a", "b"))       # 4 shards, no replicas
    replicated, rep_np = _mesh_array((8, 6), ("a",))        # 2 shards, each on 2 devices
    tree = {"single": single, "split": split, "replicated": replicated, "n": np.int32(7)}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "c", tree)
    ckptr.wait_until_finished()
    # One move to pinned host memory per array on one device, per replica-0 shard otherwise:
    # the replicas, which are not written, stay on their devices.
    assert len(as_gpu) == 1 + 4 + 2
    restored = ckptr.restore(tmp_path / "c")
    assert restored["single"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["single"]).view(np.uint16),
                                  np.asarray(single).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(restored["split"]), split_np)
    np.testing.assert_array_equal(np.asarray(restored["replicated"]), rep_np)
    assert int(restored["n"]) == 7
    # Orbax's layout: one chunk per shard.
    meta = ckptr.metadata(tmp_path / "c").item_metadata
    assert tuple(meta["split"].storage.chunk_shape) == (4, 3)
    assert tuple(meta["replicated"].storage.chunk_shape) == (4, 6)


def test_a_cast_on_save_applies_to_pinned_copies(tmp_path, as_gpu):
    split, split_np = _mesh_array((4, 4), ("a", "b"))
    single = jnp.linspace(0, 1, 64, dtype=jnp.float32)
    args = {"split": ocp.SaveArgs(dtype=np.float16), "single": ocp.SaveArgs(dtype=np.float16)}
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"split": split, "single": single},
                                                        save_args=args))
    restored = ckptr.restore(tmp_path / "c")
    assert restored["split"].dtype == np.float16 and restored["single"].dtype == np.float16
    np.testing.assert_array_equal(np.asarray(restored["split"]), split_np.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(restored["single"]),
                                  np.asarray(single).astype(np.float16))
    assert len(as_gpu) == 4 + 1


def test_under_a_memory_budget_transfers_start_ahead_only_as_far_as_the_budget_admits(
        tmp_path, as_gpu, monkeypatch):
    arrays = {f"a{i}": jnp.full((64, 1024), i, jnp.float32) for i in range(6)}  # 256 KiB each
    limit = 512 << 10
    handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=limit)
    budget = handler._budget
    events: list[tuple[str, int]] = []
    real_start, real_copy = _stage.start_transfers, _stage.host_copy

    def start(values, *args):
        # Every array moved to the host has its bytes admitted first, within the budget.
        assert 0 < budget._used <= limit
        events.append(("transfer", int(values[0][0, 0])))
        return real_start(values, *args)

    def copy(value, name, *args, **kwargs):
        events.append(("staged", int(name.rsplit("a", 1)[1])))
        return real_copy(value, name, *args, **kwargs)

    monkeypatch.setattr(_stage, "start_transfers", start)
    monkeypatch.setattr(_stage, "host_copy", copy)
    ckptr = ocp.Checkpointer(handler)
    ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(arrays))
    assert budget._used == 0
    transfers = [k for e, k in events if e == "transfer"]
    assert sorted(transfers) == list(range(6))
    # The next array's transfer starts before this one is staged (the budget holds two).
    assert events.index(("transfer", 1)) < events.index(("staged", 0))
    restored = ckptr.restore(tmp_path / "c", args=ocp.args.StandardRestore())
    for i in range(6):
        np.testing.assert_array_equal(np.asarray(restored[f"a{i}"]), np.full((64, 1024), i))


def test_pinned_copies_are_let_go_as_their_arrays_are_written(tmp_path, as_gpu, monkeypatch):
    # Without a budget every transfer starts at once; each pinned copy is the save's own and
    # goes once its array is written, while later arrays still stage.
    import gc
    import time
    import weakref

    monkeypatch.setattr(_stage, "BATCH_MAX_ARRAYS", 1)  # each array written on its own
    refs: list = []
    real_put = jax.device_put

    def recording_put(x, device=None, **kw):
        out = real_put(x, device, **kw)
        if isinstance(device, list):
            refs.extend(weakref.ref(o) for o in out)
        return out

    monkeypatch.setattr(_stage.jax, "device_put", recording_put)
    real_copy = _stage.host_copy
    alive_later: list[bool] = []

    def copy(value, name, *args, **kwargs):
        if name == "a5":  # staging waits here until a0's pinned copy is gone, or 10 s
            deadline = time.monotonic() + 10
            while refs[0]() is not None and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.01)
            alive_later.append(refs[0]() is not None)
        return real_copy(value, name, *args, **kwargs)

    monkeypatch.setattr(_stage, "host_copy", copy)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "c", {f"a{i}": jnp.full((1 << 16,), i, jnp.float32) for i in range(6)})
    ckptr.wait_until_finished()
    assert len(refs) == 6 and alive_later == [False]


def test_a_failed_pinned_transfer_falls_back_to_pageable_memory(tmp_path, as_gpu, monkeypatch,
                                                                caplog):
    real_put = jax.device_put

    def refuse_pinned(x, device=None, **kw):
        if isinstance(device, list):
            raise RuntimeError("out of pinned memory")
        return real_put(x, device, **kw)

    monkeypatch.setattr(_stage.jax, "device_put", refuse_pinned)
    ckptr = ocp.StandardCheckpointer()
    with caplog.at_level("WARNING", logger="ckpt_async"):
        ckptr.save(tmp_path / "c", {"x": jnp.arange(64.0)})
    assert "pinned host memory failed" in caplog.text
    np.testing.assert_array_equal(np.asarray(ckptr.restore(tmp_path / "c")["x"]), np.arange(64.0))


def test_a_pinned_copy_that_cannot_be_read_falls_back_to_pageable_memory(tmp_path, as_gpu,
                                                                         monkeypatch, caplog):
    class Unreadable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("pinned buffer lost")

    real_start = _stage.start_transfers

    def start(values, *args):
        out = real_start(values, *args)
        for v in out:
            if type(v) is _stage.PinnedShards:
                v.shards[:] = [(index, Unreadable()) for index, _ in v.shards]
        return out

    monkeypatch.setattr(_stage, "start_transfers", start)
    split, split_np = _mesh_array((4, 4), ("a", "b"))
    ckptr = ocp.StandardCheckpointer()
    with caplog.at_level("WARNING", logger="ckpt_async"):
        ckptr.save(tmp_path / "c", {"split": split, "one": jnp.arange(8.0)})
    assert "did not reach pinned host memory" in caplog.text
    restored = ckptr.restore(tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(restored["split"]), split_np)
    np.testing.assert_array_equal(np.asarray(restored["one"]), np.arange(8.0))


def test_a_deleted_device_array_is_named_in_the_error(tmp_path, as_gpu):
    gone = jnp.ones((16,))
    gone.delete()
    ckptr = ocp.StandardCheckpointer()
    with pytest.raises(UnsupportedLeafError, match="leaf 'gone' .* deleted"):
        ckptr.save(tmp_path / "c", {"ok": jnp.zeros((4,)), "gone": gone})
    assert not (tmp_path / "c").exists()


def test_the_plain_path_serves_arrays_when_pinned_transfers_are_off(tmp_path, as_gpu, monkeypatch):
    monkeypatch.setattr(_stage, "PINNED_HOST_TRANSFER", False)
    hinted: list = []
    arr = jnp.arange(32.0)
    monkeypatch.setattr(type(arr), "copy_to_host_async", lambda self: hinted.append(1))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "c", {"x": arr})
    assert as_gpu == [] and hinted == [1]
    np.testing.assert_array_equal(np.asarray(ckptr.restore(tmp_path / "c")["x"]), np.arange(32.0))


@pytest.mark.parametrize(("handler_says", "save_says", "pinned"), [
    (None, None, True), (False, None, False), (None, False, False), (False, True, True)])
def test_orbaxs_enable_pinned_host_transfer_chooses_the_path(tmp_path, as_gpu, handler_says,
                                                             save_says, pinned):
    handler = ocp.PyTreeCheckpointHandler(
        **({} if handler_says is None else {"enable_pinned_host_transfer": handler_says}))
    ckptr = ocp.Checkpointer(handler)
    ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(
        {"x": jnp.arange(16.0)}, enable_pinned_host_transfer=save_says))
    assert len(as_gpu) == (1 if pinned else 0)
    np.testing.assert_array_equal(np.asarray(ckptr.restore(tmp_path / "c")["x"]),
                                  np.arange(16.0))
