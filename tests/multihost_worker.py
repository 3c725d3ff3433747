"""One process of a multi-process test run (started by ``tests/_multihost.py``).

``python multihost_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT CONFIG_JSON``: joins the
``jax.distributed`` run whose coordinator is process 0 on 127.0.0.1:PORT, runs SCENARIO and
writes its findings to ``<config dir>/<SCENARIO>.<PROCESS_ID>.json``. Every check compares
bytes; a failed check raises, and the launcher then kills the sibling processes.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_SHAPES = {1: (1, 1), 4: (2, 2), 8: (4, 2)}
#: name -> (shape, dtype, partition spec as saved, partition spec of the "swapped" target)
ARRAYS = {
    "w": ((128, 32), np.float32, P("a", "b"), P("b", "a")),
    "m": ((128, 32), ml_dtypes.bfloat16, P("a", None), P(None, "b")),
    "r": ((4, 4), np.float32, P(), P("a")),
}


def full(name: str) -> np.ndarray:
    shape, dtype, _, _ = ARRAYS[name]
    seed = sum(map(ord, name))
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def make_mesh(devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices).reshape(MESH_SHAPES[len(devices)]), ("a", "b"))


def make_state(mesh: Mesh) -> dict:
    state = {}
    for name, (shape, _, spec, _) in ARRAYS.items():
        data = full(name)
        state[name] = jax.make_array_from_callback(shape, NamedSharding(mesh, spec),
                                                   lambda idx, d=data: d[idx])
    state["host"] = np.arange(10, dtype=np.int32)
    state["step"] = 7
    return state


def target(mesh: Mesh, swapped: bool = False) -> dict:
    out = {}
    for name, (shape, dtype, spec, other) in ARRAYS.items():
        out[name] = jax.ShapeDtypeStruct(shape, dtype,
                                         sharding=NamedSharding(mesh, other if swapped else spec))
    out["host"] = np.zeros(10, np.int32)
    out["step"] = 0
    return out


def check_state(restored: dict, mesh: Mesh | None = None, swapped: bool = False) -> int:
    """Compares every addressable shard with the expected bytes; returns how many it checked."""
    checked = 0
    for name, (shape, dtype, spec, other) in ARRAYS.items():
        arr = restored[name]
        assert isinstance(arr, jax.Array), (name, type(arr))
        assert arr.shape == shape and arr.dtype == np.dtype(dtype), (name, arr.shape, arr.dtype)
        if mesh is not None:
            want = NamedSharding(mesh, other if swapped else spec)
            assert arr.sharding.is_equivalent_to(want, len(shape)), (name, arr.sharding, want)
        expected = full(name)
        for shard in arr.addressable_shards:
            got = np.asarray(shard.data)
            assert got.tobytes() == np.ascontiguousarray(expected[shard.index]).tobytes(), (
                name, shard.index, shard.device)
            checked += 1
    assert np.array_equal(restored["host"], np.arange(10, dtype=np.int32))
    assert int(restored["step"]) == 7
    return checked


def barrier(name: str) -> None:
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, 180_000)


# --- scenarios ---------------------------------------------------------------------------------
def scenario_save(cfg: dict, out: dict) -> None:
    """Saves the state laid out over every device of the run to each of cfg['save']."""
    import ckpt_async as ocp

    mesh = make_mesh()
    ckptr = ocp.StandardCheckpointer()
    for path in cfg["save"]:
        ckptr.save(path, make_state(mesh))
        ckptr.wait_until_finished()
        out["checked"][f"saved {path}"] = check_state(ckptr.restore(path, target(mesh)), mesh)


def scenario_restore(cfg: dict, out: dict) -> None:
    """Restores each of cfg['restore'] onto this run's devices, as saved and swapped."""
    import ckpt_async as ocp

    mesh = make_mesh()
    ckptr = ocp.StandardCheckpointer()
    for path in cfg["restore"]:
        meta = ckptr.metadata(path)
        assert meta.item_metadata["w"].shape == (128, 32), meta
        for swapped in (False, True):
            restored = ckptr.restore(path, target(mesh, swapped))
            out["checked"][f"{path} swapped={swapped}"] = check_state(restored, mesh, swapped)


def scenario_restore_orbax(cfg: dict, out: dict) -> None:
    """Orbax restores each of cfg['orbax_restore'] (written by ckpt_async) on this run."""
    import orbax.checkpoint as orbax

    mesh = make_mesh()
    ckptr = orbax.StandardCheckpointer()
    for path in cfg.get("orbax_restore", []):
        out["checked"][f"orbax restored {path}"] = check_state(
            ckptr.restore(path, target(mesh, True)), mesh, True)
    ckptr.close()


def scenario_main(cfg: dict, out: dict) -> None:
    """The 2 x 2 run: restores, saves, manager, failures, and Orbax both ways."""
    import ckpt_async as ocp
    from ckpt_async import _serialize
    from ckpt_async.errors import (
        BarrierTimeoutError,
        CommitError,
        CorruptCheckpointError,
        ProcessFailedError,
    )

    me = jax.process_index()
    mesh = make_mesh()
    scenario_restore(cfg, out)
    scenario_save(cfg, out)

    # Without a target, arrays come back with the shardings they were saved with (this run
    # has the devices they name), each process reading only its part.
    out["checked"]["as saved"] = check_state(ocp.StandardCheckpointer().restore(
        cfg["save"][0]), mesh)

    # Another shape than the stored one: refused with ``strict`` (the default), cut or padded
    # with zeros without it; each process builds its devices' part of the global array.
    spread = NamedSharding(mesh, ARRAYS["w"][2])
    for shape in ((160, 24), (96, 40)):
        def fit(strict: bool, shape=shape) -> dict:
            return ocp.PyTreeCheckpointer().restore(cfg["save"][0], args=ocp.args.PyTreeRestore(
                restore_args={"w": ocp.ArrayRestoreArgs(sharding=spread, global_shape=shape,
                                                        strict=strict)}, partial_restore=True))
        try:
            fit(True)
            out["checked"][f"w strict {shape}"] = "restored"
        except ocp.errors.ShapeMismatchError as exc:
            out["checked"][f"w strict {shape}"] = type(exc).__name__
        arr = fit(False)["w"]
        expected = np.zeros(shape, np.float32)
        common = tuple(slice(0, min(a, b)) for a, b in zip(shape, ARRAYS["w"][0]))
        expected[common] = full("w")[common]
        assert arr.shape == shape and arr.sharding == spread, (arr.shape, arr.sharding)
        for shard in arr.addressable_shards:
            assert np.array_equal(np.asarray(shard.data), expected[shard.index]), shard.index
        out["checked"][f"w fit {shape}"] = len(arr.addressable_shards)

    # Each process reads only the region its devices hold: damage in the data file process 1
    # wrote fails process 1's restore, while process 0 never reads those bytes.
    damaged = cfg["save"][0] + ".damaged"
    if me == 0:
        import shutil

        shutil.copytree(cfg["save"][0], damaged)
        data = max((Path(damaged) / "ocdbt.process_1" / "d").iterdir(),
                   key=lambda f: f.stat().st_size)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    barrier("damaged")
    try:
        out["damaged"] = ["restored", check_state(
            ocp.StandardCheckpointer().restore(damaged, target(mesh)), mesh)]
    except CorruptCheckpointError as exc:
        out["damaged"] = ["CorruptCheckpointError", str(exc)]

    # A manager: every process saves each step; retention runs on the primary only.
    class PrimaryOnlyPolicy:  # decides differently on each process: the primary's wins
        def should_save(self, step, previous_steps=None, *, context=None):
            return me == 0

    first_array = next(iter(ARRAYS))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, save_decision_policy=PrimaryOnlyPolicy(),
        async_options=ocp.AsyncOptions(timeout_secs=120))
    mngr = ocp.CheckpointManager(cfg["manager"], options=options)
    for step in range(3):
        state = make_state(mesh)
        fut = mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step}),
            # Orbax's smaller handlers across processes: an array spread over both, a key
            arr=ocp.args.ArraySave(state[first_array]),
            key=ocp.args.JaxRandomKeySave(jax.random.key(step))))
        assert fut is not None, f"process {me}: step {step} was skipped"
    mngr.wait_until_finished()
    out["steps"] = mngr.all_steps()
    restored = mngr.restore(2, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target(mesh, True)), meta=ocp.args.JsonRestore(),
        arr=ocp.args.ArrayRestore(restore_args=ocp.ArrayRestoreArgs(
            sharding=target(mesh, True)[first_array].sharding)),
        key=ocp.args.JaxRandomKeyRestore(restore_args=ocp.ArrayRestoreArgs(
            sharding=NamedSharding(mesh, P())))))
    out["checked"]["manager step 2"] = check_state(restored.state, mesh, True)
    assert restored.meta == {"step": 2}
    expected = full(first_array)
    for shard in restored.arr.addressable_shards:
        assert np.asarray(shard.data).tobytes() == \
            np.ascontiguousarray(expected[shard.index]).tobytes(), shard.index
    out["checked"]["manager step 2 ArraySave"] = len(restored.arr.addressable_shards)
    assert jax.random.key_data(restored.key).tolist() == \
        jax.random.key_data(jax.random.key(2)).tolist()
    # As saved: on the one device of process 0 it was saved from, which process 1 lacks.
    as_saved = jax.random.key_data(mngr.restore(2, args=ocp.args.Composite(
        key=ocp.args.JaxRandomKeyRestore())).key)
    out["key as saved"] = [np.asarray(sh.data).tolist() for sh in as_saved.addressable_shards]

    # Process 1 fails while writing step 3: both raise, naming it; nothing becomes visible.
    original = _serialize.ItemWriter.write

    async def failing_write(self, batch):
        raise OSError("injected failure on process 1")

    if me == 1:
        _serialize.ItemWriter.write = failing_write
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(make_state(mesh)),
                                         meta=ocp.args.JsonSave({"step": 3})))
    try:
        mngr.wait_until_finished()
        raise AssertionError("the failed save of step 3 raised nothing")
    except ProcessFailedError as exc:
        out["step3_error"] = ["ProcessFailedError", str(exc)]
    except CommitError as exc:
        out["step3_error"] = [type(exc).__name__, str(exc)]
    _serialize.ItemWriter.write = original
    out["steps_after_failure"] = mngr.all_steps()
    ocp.multihost.sync_global_processes("after-step-3")
    # Orbax's keywords and older name: a timeout in seconds, the processes as a set, and a
    # barrier function of the caller's own (here the client's, recording its keys).
    ocp.utils.sync_global_devices("orbax-keywords", timeout=60, processes={0, 1})
    keys: list[str] = []

    def own_barrier(*, key: str, timeout_ms: int) -> None:
        keys.append(key)
        jax._src.distributed.global_state.client.wait_at_barrier(key + "-own", timeout_ms)

    ocp.utils.sync_global_processes("own-barrier", barrier_sync_fn=own_barrier)
    # This process alone: nobody to wait for (Orbax skips it too), whatever the function.
    ocp.utils.sync_global_processes("alone", processes={me}, barrier_sync_fn=own_barrier)
    out["own_barrier_keys"] = keys
    # Orbax's barrier function: both processes pass it (a lone one would time out here).
    for processes in (None, {0, 1}):
        ocp.multihost.get_barrier_sync_fn(processes=processes)(
            key=f"barrier-fn-{processes is None}", timeout_ms=60_000)
    out["broadcast"] = int(ocp.utils.broadcast_one_to_all(np.int32(10 * me + 5)))

    # Process 1 never arrives: process 0's save times out naming it.
    if me == 0:
        ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                      async_options=ocp.AsyncOptions(timeout_secs=3))
        try:
            ckptr.save(cfg["timeout_path"], args=ocp.args.StandardSave(make_state(mesh)))
            ckptr.wait_until_finished()
            raise AssertionError("a save that process 1 never joined raised nothing")
        except BarrierTimeoutError as exc:
            out["timeout_error"] = str(exc)
    barrier("after-timeout")

    # The run goes on: the next step saves on both.
    mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(make_state(mesh)),
                                         meta=ocp.args.JsonSave({"step": 4})))
    mngr.wait_until_finished()
    out["steps_final"] = mngr.all_steps()
    mngr.close()

    # Orbax writes across these processes; ckpt_async restores what it wrote.
    import orbax.checkpoint as orbax

    ock = orbax.StandardCheckpointer()
    ock.save(cfg["orbax_save"], make_state(mesh))
    ock.wait_until_finished()
    ock.close()
    restored = ocp.StandardCheckpointer().restore(cfg["orbax_save"], target(mesh, True))
    out["checked"][f"orbax wrote {cfg['orbax_save']}"] = check_state(restored, mesh, True)
    scenario_restore_orbax(cfg, out)
    scenario_consistency(cfg, out)
    scenario_single_replica(cfg, out)


#: Arrays of the single-replica restores: bit patterns a float sum would not keep (-0.0, a NaN
#: payload), and a complex one, which is read as any other array.
def replica_arrays() -> dict[str, np.ndarray]:
    f32 = np.random.default_rng(5).standard_normal((8, 6)).astype(np.float32)
    f32[0, 0] = -0.0
    f32.view(np.uint32)[0, 1] = 0x7FC0_1234  # (a NaN with a payload)
    return {"f32": f32, "bf16": f32.astype(ml_dtypes.bfloat16), "i8": np.arange(48, dtype=np.int8)
            .reshape(8, 6) - 20, "b": f32 > 0, "u16": f32.view(np.uint32).astype(np.uint16),
            "c64": (f32 + 1j * f32[::-1]).astype(np.complex64), "step": np.array(-0.0, np.float32),
            "empty": np.zeros((0, 4), np.float32)}


def scenario_single_replica(cfg: dict, out: dict) -> None:
    """SingleReplicaArrayHandler: the processes of one replica read, the others receive the
    arrays by broadcast; returns the bytes each process read in each case."""
    import ckpt_async as ocp
    from ckpt_async import type_handlers as th

    devices = np.array(jax.devices()).reshape(2, 2)  # row r: process r's two devices
    saved = Mesh(devices, ("replica", "model"))
    spec = P(None, "model")
    data = replica_arrays()
    path = cfg["single_replica"]
    ckptr = ocp.StandardCheckpointer()
    def spec_of(v: np.ndarray) -> P:
        return spec if v.ndim else P()

    ckptr.save(path, {k: jax.make_array_from_callback(v.shape, NamedSharding(saved, spec_of(v)),
                                                      lambda idx, v=v: v[idx])
                      for k, v in data.items()})
    ckptr.wait_until_finished()
    # (case: mesh, replica axis, primary replica, broadcast memory limit): in the transposed
    # mesh each replica has one device of each process, and both processes read.
    cases = {"rows, replica 0": (devices, 0, 0, 100), "rows, replica 1": (devices, 0, 1, None),
             "columns, global registry": (devices.T, 0, 0, None),
             "replica axis 1": (devices.T, 1, 0, 1 << 20)}
    out["single_replica"] = {"nbytes": {k: v.nbytes for k, v in data.items()}}
    for case, (grid, axis, primary, limit) in cases.items():
        names = ("model", "replica") if axis == 1 else ("replica", "model")
        mesh = Mesh(grid, names)
        handler = th.SingleReplicaArrayHandler(replica_axis_index=axis, primary_replica_id=primary,
                                               broadcast_memory_limit_bytes=limit)
        original = th.get_type_handler(jax.Array)
        if "global" in case:  # (as MaxText does it)
            th.register_type_handler(jax.Array, handler, override=True)
            pytree = ocp.PyTreeCheckpointHandler()
        else:
            pytree = ocp.PyTreeCheckpointHandler(
                type_handler_registry=th.create_type_handler_registry((jax.Array, handler)))
        shardings = {k: NamedSharding(mesh, spec_of(v)) for k, v in data.items()}
        args = {k: th.SingleReplicaArrayRestoreArgs(
            sharding=shardings[k], global_shape=v.shape, dtype=v.dtype,
            single_replica_sharding=NamedSharding(mesh, spec_of(v)) if axis == 0 else None)
            for k, v in data.items()}
        read: list[int] = [0]

        def count(event, read=read) -> None:
            if event.kind == "restore":
                read[0] = max(read[0], event.done_bytes)

        with ocp.progress(count):
            restored = ocp.Checkpointer(pytree).restore(path, args=ocp.args.PyTreeRestore(
                item={k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in data.items()},
                restore_args=args))
        th.register_type_handler(jax.Array, original, override=True)
        for k, v in data.items():
            arr = restored[k]
            assert arr.sharding == shardings[k] and arr.dtype == v.dtype, (case, k, arr.sharding)
            for shard in arr.addressable_shards:
                assert np.asarray(shard.data).tobytes() == np.ascontiguousarray(
                    v[shard.index]).tobytes(), (case, k, shard.index)
        out["single_replica"][case] = read[0]
        barrier(f"single replica {case}")

    # Items of a Composite restore broadcast one item after the other, in name order, on
    # every process alike (else the processes' collectives would pair different arrays).
    mesh = Mesh(devices, ("replica", "model"))
    replicated = NamedSharding(mesh, P())
    items = {"b": np.full((4,), 2.0, np.float32), "a": np.full((4,), 1.0, np.float32)}
    run = Path(path + ".composite")
    with ocp.CheckpointManager(run) as mngr:
        mngr.save(0, args=ocp.args.Composite(**{k: ocp.args.PyTreeSave({"x": v})
                                                for k, v in items.items()}))
    original = th.get_type_handler(jax.Array)
    th.register_type_handler(jax.Array, th.SingleReplicaArrayHandler(), override=True)
    with ocp.CheckpointManager(run) as mngr:
        restored = mngr.restore(0, args=ocp.args.Composite(**{k: ocp.args.PyTreeRestore(
            {"x": jax.ShapeDtypeStruct((4,), np.float32)}, restore_args={
                "x": th.SingleReplicaArrayRestoreArgs(sharding=replicated)})
            for k in items}))
    th.register_type_handler(jax.Array, original, override=True)
    for k, v in items.items():
        for shard in restored[k]["x"].addressable_shards:
            assert np.asarray(shard.data).tobytes() == v.tobytes(), (k, shard.device)
    out["single_replica"]["composite"] = sorted(items)


def scenario_consistency(cfg: dict, out: dict) -> None:
    """What fails on one process fails on every one at once, and every process lists the same
    steps: an array on one process's devices only, a check failing on one process before the
    save starts, deletions, and a save failing on one process only."""
    import time

    import ckpt_async as ocp
    import ckpt_async._checkpointer as ckpt_core
    from ckpt_async.errors import CheckpointError

    me = jax.process_index()
    mesh = make_mesh()
    base = Path(cfg["consistency"])
    fast = ocp.AsyncOptions(timeout_secs=60)

    def outcome(fn) -> list:
        started = time.monotonic()
        try:
            fn()
            kind, message = "ok", ""
        except CheckpointError as exc:
            kind, message = type(exc).__name__, str(exc)
        return [kind, message, round(time.monotonic() - started, 1)]

    # A pipeline stage's parameters on process 1's devices only: refused everywhere.
    stage_mesh = Mesh(np.array([d for d in jax.devices() if d.process_index == 1]), ("x",))
    state = {"w": make_state(mesh)["w"],
             "stage1": jax.device_put(np.arange(8.0), NamedSharding(stage_mesh, P("x")))}
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), async_options=fast)
    out["submesh"] = outcome(lambda: (ckptr.save(base / "submesh", args=ocp.args.StandardSave(
        state)), ckptr.wait_until_finished()))
    out["submesh_visible"] = (base / "submesh").exists()
    barrier("submesh")

    # Process 1 finds the directory unwritable before the save starts: both raise at once;
    # the same save then goes through on both (each path's operations stay in step).
    real = ckpt_core.check_writable
    if me == 1:
        def unwritable(path):
            raise ocp.errors.NotWritableError(f"{path}: injected on process 1")
        ckpt_core.check_writable = unwritable
    out["unwritable"] = outcome(lambda: ckptr.save(
        base / "ck", args=ocp.args.StandardSave(make_state(mesh))))
    ckpt_core.check_writable = real
    out["unwritable_retry"] = outcome(lambda: (ckptr.save(
        base / "ck", args=ocp.args.StandardSave(make_state(mesh))), ckptr.wait_until_finished()))
    out["checked"]["retried ck"] = check_state(
        ocp.StandardCheckpointer().restore(base / "ck", target(mesh)), mesh)
    ckptr.close()

    # Deletions end on every process together: the listings agree, and the latest restores.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, async_options=fast)
    mngr = ocp.CheckpointManager(base / "run", options=options)
    for step in range(3):
        mngr.save(step, args=ocp.args.StandardSave(make_state(mesh)))
    mngr.wait_until_finished()
    out["listed_after_retention"] = mngr.all_steps(read=True)
    barrier("listed")  # (else the primary may delete before the other process has listed)
    mngr.delete(2)
    mngr.reload()
    out["listed_after_delete"] = [mngr.all_steps(), mngr.latest_step()]
    out["checked"]["latest after delete"] = check_state(
        mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target(mesh))), mesh)

    # Step 3 fails on process 1 only (a leaf it cannot save); the next save raises on both,
    # at once, and the one after goes through on both.
    bad = {**make_state(mesh), "loader": np.array([object()] if me == 1 else [1])}
    out["step3"] = outcome(lambda: mngr.save(3, args=ocp.args.StandardSave(bad)))
    if me == 0:  # (its save returned: the failure comes with the commit, here awaited)
        out["step3_commit"] = type(mngr.commit_future(3).exception(60)).__name__
    barrier("step3")
    out["step4"] = outcome(lambda: mngr.save(4, args=ocp.args.StandardSave(make_state(mesh))))
    out["step5"] = outcome(lambda: (mngr.save(5, args=ocp.args.StandardSave(make_state(mesh))),
                                    mngr.wait_until_finished()))
    out["listed_at_end"] = mngr.all_steps(read=True)
    mngr.close()

    # Process 1 writes too slowly: the primary gives up at its barrier, and process 1 hears
    # why rather than of a missing file.
    from ckpt_async import _serialize

    original = _serialize.ItemWriter.write

    async def slow_write(self, batch):  # (writes once the primary has given up)
        import asyncio

        for _ in range(200):
            if not self._item_dir.exists():
                break
            await asyncio.sleep(0.05)
        return await original(self, batch)

    if me == 1:
        _serialize.ItemWriter.write = slow_write
    slow = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                 async_options=ocp.AsyncOptions(timeout_secs=3))
    out["slow"] = outcome(lambda: (slow.save(base / "slow", args=ocp.args.StandardSave(
        make_state(mesh))), slow.wait_until_finished()))
    _serialize.ItemWriter.write = original
    barrier("slow")


def kv_keys(name: str) -> list[str]:
    """The keys ckpt_async holds in the distributed key-value store once every process is
    past ``name`` (and before any goes on)."""
    from jax._src import distributed

    barrier(name)
    keys = sorted(k for k, _ in distributed.global_state.client.key_value_dir_get("ckpt_async/"))
    barrier(f"{name} listed")
    return keys


def scenario_small(cfg: dict, out: dict) -> None:
    """The small run (2 processes x 1 device, tiny arrays): the keys each kind of operation
    leaves in the key-value store once every process is past it (none), after it went
    through or failed."""
    import ckpt_async as ocp
    import ckpt_async._checkpointer as ckpt_core
    from ckpt_async import _serialize
    from ckpt_async.errors import CheckpointError

    me = jax.process_index()
    base = Path(cfg["dir"])
    out["dir"] = str(base)
    mesh = Mesh(np.array(jax.devices()), ("a",))

    def tiny() -> dict:
        return {"x": jax.make_array_from_callback((4,), NamedSharding(mesh, P("a")),
                                                  lambda idx: np.arange(4.0)[idx]), "step": 1}

    def outcome(fn) -> str:
        try:
            fn()
            return "ok"
        except CheckpointError as exc:
            return type(exc).__name__

    out["keys"] = {}
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                  async_options=ocp.AsyncOptions(timeout_secs=60))

    def save(name: str) -> str:
        return outcome(lambda: (ckptr.save(base / name, args=ocp.args.StandardSave(tiny())),
                                ckptr.wait_until_finished()))

    # Saves that go through, and that fail before ('ready') and while writing ('written').
    out["saved"] = save("saved")
    out["keys"]["saved"] = kv_keys("saved")
    real_check = ckpt_core.check_writable
    if me == 1:
        def unwritable(path):
            raise ocp.errors.NotWritableError(f"{path}: injected on process 1")
        ckpt_core.check_writable = unwritable
    out["unwritable"] = save("unwritable")
    ckpt_core.check_writable = real_check
    out["keys"]["unwritable"] = kv_keys("unwritable")
    real_write = _serialize.ItemWriter.write
    if me == 1:
        async def failing_write(self, batch):
            raise OSError("injected failure on process 1")
        _serialize.ItemWriter.write = failing_write
    out["write_failed"] = save("write_failed")
    _serialize.ItemWriter.write = real_write
    out["keys"]["write_failed"] = kv_keys("write_failed")
    ckptr.close()

    # A manager's decisions (save, skip), its retention and a deletion; waiting for a step.
    options = ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=2,
                                           async_options=ocp.AsyncOptions(timeout_secs=60))
    with ocp.CheckpointManager(base / "run", options=options) as mngr:
        out["decided"] = [bool(mngr.save(step, args=ocp.args.StandardSave(tiny())))
                          for step in range(5)]
        mngr.wait_until_finished()
        mngr.delete(2)
        out["steps"] = mngr.all_steps()
    with ocp.checkpoint_utils.wait_for_new_checkpoint(base / "run", until_step=4) as step:
        out["waited"] = step
    out["keys"]["manager"] = kv_keys("manager")

    # Process 1 comes to a save's first barrier only once process 0 has given up waiting
    # there: it raises at once, naming process 0 and the barrier (it went on before, and
    # waited its own timeout for the directory process 0 was never to create).
    from jax._src import distributed

    client = distributed.global_state.client
    if me == 1:
        def late(path):
            client.blocking_key_value_get("test/late/gave-up", 60_000)
        ckpt_core.check_writable = late
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), async_options=ocp.AsyncOptions(
        timeout_secs=2 if me == 0 else 10))
    try:
        ckptr.save(base / "late", args=ocp.args.StandardSave(tiny()))
        out["late"] = ["ok"]
    except CheckpointError as exc:
        out["late"] = [type(exc).__name__, str(exc)]
    if me == 0:
        client.key_value_set("test/late/gave-up", "yes")
    ckpt_core.check_writable = real_check
    ckptr.close()
    out["late_visible"] = (base / "late").exists()
    barrier("late")
    if me == 0:
        client.key_value_delete("test/late")
    out["keys"]["late"] = kv_keys("late")

    # Process 1 saves another tree (its part of x in float16, and a leaf more): refused on
    # both before anything is written, naming the first leaf that differs (process 1 wrote
    # its float16 shard under the primary's float32 metadata). A NumPy leaf that differs is
    # the primary's to write, as in Orbax: not compared.
    ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                  async_options=ocp.AsyncOptions(timeout_secs=60))
    dtype = np.float32 if me == 0 else np.float16
    other = {"x": jax.make_array_from_callback((4,), NamedSharding(mesh, P("a")),
                                               lambda idx: np.arange(4, dtype=dtype)[idx]),
             "step": 1, "host": np.zeros(3 + me), **({"y": 1} if me else {})}
    try:
        ckptr.save(base / "other_tree", args=ocp.args.StandardSave(other))
        ckptr.wait_until_finished()
        out["other_tree"] = ["ok"]
    except CheckpointError as exc:
        out["other_tree"] = [type(exc).__name__, str(exc)]
    out["other_tree_visible"] = [(base / "other_tree").exists(),
                                 sorted(p.name for p in base.glob("other_tree*"))]
    out["keys"]["other_tree"] = kv_keys("other_tree")
    out["same_tree_after"] = save("other_tree")  # (then the same tree saves)
    ckptr.save(base / "numpy_differs", args=ocp.args.StandardSave({**tiny(), "host": np.full(
        2 + me, me, np.int32)}))
    ckptr.wait_until_finished()
    out["numpy_differs"] = ocp.StandardCheckpointer().restore(base / "numpy_differs")[
        "host"].tolist()
    ckptr.close()

    # Orbax's other layouts: each process writes its shard of x (without OCDBT into the same
    # folder x/, a chunk file each; in OCDBT with zarr v3 into its own database), the primary
    # the rest; each restores its shard.
    out["layouts"] = {}
    for use_ocdbt, use_zarr3 in ((False, False), (True, True), (False, True)):
        name = f"layout_{int(use_ocdbt)}{int(use_zarr3)}"
        handler = ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(base / name, args=ocp.args.StandardSave(tiny()))
            got = ckptr.restore(base / name, args=ocp.args.StandardRestore(tiny()))
        out["layouts"][name] = [np.asarray(s.data).tolist() for s in got["x"].addressable_shards]

    # A restore target sharded over both processes' devices that does not split the array
    # (3 rows, 2 devices): each process reads its region only, and raises naming the leaf.
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(base / "odd", {"x": np.arange(3.0, dtype=np.float32)})
        ckptr.wait_until_finished()
        try:
            ckptr.restore(base / "odd", {"x": jax.ShapeDtypeStruct(
                (3,), np.float32, sharding=NamedSharding(mesh, P("a")))})
            out["indivisible"] = ["ok"]
        except ValueError as exc:
            out["indivisible"] = [type(exc).__name__, str(exc).split(" (Sharding ")[0],
                                  type(exc.__cause__).__name__]


def run_other_first(cls: type, name: str, other, *, only: int | None = None) -> None:
    """Patches coroutine method ``cls.name`` (on process ``only``, or on every one): its first
    call first runs ``other()`` to its end in a thread, then goes on; unpatched from then on
    (the other save's calls run as they are)."""
    import asyncio

    if only is not None and jax.process_index() != only:
        return
    original = getattr(cls, name)

    async def patched(self, *args, **kwargs):
        setattr(cls, name, original)
        await asyncio.to_thread(other)
        return await original(self, *args, **kwargs)

    setattr(cls, name, patched)


def scenario_race(cfg: dict, out: dict) -> None:
    """Two saves in place into one object-store prefix, each race forced by pausing save A at
    a chosen point while the other runs to its end (committed). ``sym``: A is paused on both
    processes before it writes, B (two processes, barrier keys of their own) saves the same
    tree; both of A's processes meet B's databases. ``asym``: B's tree has no shard on
    process 0, so A's primary makes its database while A's process 1 meets B's. ``merge``:
    A's primary is paused before it finishes its part while a single-process save (another
    Python) writes the item's root database and documents; A's merge then meets it. Records
    A's outcome on each process and what a restore of the path gives."""
    import subprocess

    import ckpt_async as ocp
    from ckpt_async import _serialize
    from ckpt_async.errors import CheckpointError

    devices = jax.devices()
    timeouts = ocp.AsyncOptions(timeout_secs=120)

    def sharded(value: float, order=(0, 1), spec=P("a")) -> dict:
        mesh = Mesh(np.array([devices[i] for i in order]), ("a",))
        return {"x": jax.make_array_from_callback(
            (8,), NamedSharding(mesh, spec), lambda idx: np.full(8, value, np.float32)[idx])}

    def other_save(path: str, tree: dict):
        def run() -> None:
            with ocp.AsyncCheckpointer(
                    ocp.StandardCheckpointHandler(), async_options=timeouts,
                    multiprocessing_options=ocp.options.MultiprocessingOptions(
                        barrier_sync_key_prefix="other")) as ckptr:
                ckptr.save(path, args=ocp.args.StandardSave(tree))
        return run

    def outcome(path: str, tree: dict) -> list:
        ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), async_options=timeouts)
        try:
            ckptr.save(path, args=ocp.args.StandardSave(tree))
            ckptr.wait_until_finished()
            result = ["ok", ""]
        except CheckpointError as exc:
            result = [type(exc).__name__, str(exc)]
        ckptr.close()
        return result

    def restored(path: str, committed: bool = True) -> list:
        """x as restored (whole, on each process) from ``path``: a checkpoint, or an item a
        handler's save wrote (no commit marker)."""
        try:
            if not committed:
                return ocp.PyTreeCheckpointHandler().restore(path)["x"].tolist()
            whole = NamedSharding(Mesh(np.array(devices), ("a",)), P())
            got = ocp.StandardCheckpointer().restore(path, {
                "x": jax.ShapeDtypeStruct((8,), np.float32, sharding=whole)})["x"]
            return np.asarray(got.addressable_shards[0].data).tolist()
        except Exception as exc:  # noqa: BLE001 - (a mix of both saves: whatever it raises)
            return [type(exc).__name__]

    base = cfg["url"]
    out["race"] = {}
    # sym: both of A's processes meet B's databases.
    run_other_first(_serialize.ItemWriter, "write", other_save(f"{base}/sym", sharded(2.0)))
    out["race"]["sym"] = outcome(f"{base}/sym", sharded(1.0))
    barrier("sym")
    out["race"]["sym restored"] = restored(f"{base}/sym")
    # asym: B's x is replicated with replica 0 on process 1's device: B's process 0 writes no
    # database; A's process 0 makes its own, A's process 1 meets B's.
    run_other_first(_serialize.ItemWriter, "write",
                    other_save(f"{base}/asym", sharded(2.0, (1, 0), P())))
    out["race"]["asym"] = outcome(f"{base}/asym", sharded(1.0))
    barrier("asym")
    out["race"]["asym restored"] = restored(f"{base}/asym")
    # merge: a single-process direct save writes the root database and documents while A's
    # primary is paused before finishing its part.
    single = (
        "import numpy as np, ckpt_async as ocp\n"
        f"ocp.PyTreeCheckpointHandler().save({base + '/merge'!r}, "
        "ocp.args.PyTreeSave({'x': np.full(8, 2.0, np.float32)}))\n")
    run_other_first(_serialize.ItemWriter, "finish", lambda: subprocess.run(
        [sys.executable, "-c", single], check=True, timeout=170), only=0)
    out["race"]["merge"] = outcome(f"{base}/merge", sharded(1.0))
    barrier("merge")
    out["race"]["merge restored"] = restored(f"{base}/merge", committed=False)


def main() -> None:
    scenario, pid, n, port, cfg_path = sys.argv[1:6]
    cfg = json.loads(Path(cfg_path).read_text())
    # A hung process shows where it hangs before the launcher's deadline kills it.
    faulthandler.dump_traceback_later(cfg.get("dump_after_s", 240))
    os.environ.update(cfg.get("env", {}))
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(n), process_id=int(pid),
                               initialization_timeout=120, heartbeat_timeout_seconds=60)
    import ckpt_async

    out: dict = {"process": jax.process_index(), "devices": len(jax.devices()),
                 "local_devices": len(jax.local_devices()), "checked": {},
                 "ckpt_async": ckpt_async.__file__}  # (the checkout's, not an installed one)
    globals()[f"scenario_{scenario}"](cfg, out)
    Path(cfg_path).with_name(f"{scenario}.{pid}.json").write_text(json.dumps(out))
    sys.stdout.flush()
    # Leaves together: process 0 hosts the coordination service, which must outlive the rest.
    jax.distributed.shutdown()
    # Orbax 0.12.8 can wait minutes at interpreter exit for its background threads.
    os._exit(0)


if __name__ == "__main__":
    main()
