"""Multi-host: real ``jax.distributed`` runs of several processes on this machine.

Three launches (``tests/_multihost.py``), in order, each with several checks:

1. 4 processes x 2 devices save the state sharded over all 8 devices (local and S3);
2. 2 x 2: restore what 4 x 2, 1 x 4 and 1 x 1 saved (the reverse direction), save, run a
   manager (retention on the primary, the primary's save decision), a process failing mid-write,
   a process never arriving, and Orbax writing and reading across the processes;
3. 4 x 2: restore what 2 x 2 saved.

A small run (2 x 1, tiny arrays) checks the coordination itself.

This process (one process, four CPU devices) saves the 1 x 4 and 1 x 1 checkpoints and
restores the 2 x 2 ones. The S3 checkpoints live on moto's server on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
import tensorstore as ts
from _moto import client_for, list_keys, moto_s3
from _multihost import ROOT, launch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from multihost_worker import check_state, make_mesh, make_state, target

import ckpt_async as ocp

BUCKET = "multihost"


@pytest.fixture(scope="module")
def s3_env():
    with moto_s3(BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_env):
    wd = tmp_path_factory.mktemp("multihost")
    s3 = f"s3://{BUCKET}/{wd.name}"
    p = {name: str(wd / name) for name in
         ("p1x4", "p1x1", "p4x2", "p2x2", "orbax2x2", "run", "timeout")}
    p.update(s3_p4x2=f"{s3}/p4x2", s3_p2x2=f"{s3}/p2x2")

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(p["p1x4"], make_state(make_mesh()))
    ckptr.save(p["p1x1"], make_state(make_mesh(jax.devices()[:1])))
    ckptr.wait_until_finished()

    env = {"env": s3_env}
    out = {"paths": p, "dir": wd}
    out["save4x2"] = launch("save", 4, 2, {**env, "save": [p["p4x2"], p["s3_p4x2"]]}, wd)
    out["main"] = launch("main", 2, 2, {
        **env,
        "restore": [p["p4x2"], p["p1x4"], p["p1x1"], p["s3_p4x2"]],
        "save": [p["p2x2"], p["s3_p2x2"]],
        "manager": p["run"], "timeout_path": p["timeout"], "orbax_save": p["orbax2x2"],
        "orbax_restore": [p["p2x2"]], "consistency": str(wd / "consistency"),
        "single_replica": str(wd / "single_replica"),
    }, wd)
    out["restore4x2"] = launch("restore", 4, 2, {
        **env, "restore": [p["p2x2"], p["s3_p2x2"], p["orbax2x2"]]}, wd)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small run's results, one per process. (Launched without the caller's PYTHONPATH:
    the workers still import this checkout's ckpt_async, not the one installed.)"""
    wd = tmp_path_factory.mktemp("multihost_small")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTHONPATH", raising=False)
        return launch("small", 2, 1, {"dir": str(wd)}, wd)


@pytest.fixture(scope="module")
def race(tmp_path_factory, s3_env):
    """The racing run's results (2 x 1), one per process, and the prefix it saved under."""
    wd = tmp_path_factory.mktemp("multihost_race")
    return launch("race", 2, 1, {"env": s3_env, "url": f"s3://{BUCKET}/{wd.name}"}, wd), \
        wd.name


def test_every_process_joins_with_its_devices(runs):
    assert [(r["process"], r["devices"], r["local_devices"]) for r in runs["save4x2"]] == [
        (i, 8, 2) for i in range(4)]
    assert [(r["process"], r["devices"]) for r in runs["main"]] == [(0, 4), (1, 4)]
    for run in ("save4x2", "main", "restore4x2"):
        assert {r["ckpt_async"] for r in runs[run]} == {str(ROOT / "ckpt_async" / "__init__.py")}


def test_workers_import_the_checkout_under_test(small):
    assert [r["ckpt_async"] for r in small] == [str(ROOT / "ckpt_async" / "__init__.py")] * 2


def test_operations_delete_their_keys_once_every_process_is_past_them(small):
    """Each save's barrier keys are gone from the key-value store once both processes are
    done with it, whether it went through or failed (before writing, or while writing)."""
    p0, p1 = small
    assert p0["saved"] == p1["saved"] == "ok"
    assert (p0["unwritable"], p1["unwritable"]) == ("ProcessFailedError", "NotWritableError")
    assert (p0["write_failed"], p1["write_failed"]) == ("ProcessFailedError", "CommitError")
    for result in small:
        assert result["keys"]["saved"] == result["keys"]["unwritable"] == \
            result["keys"]["write_failed"] == []


def test_a_managers_decisions_leave_no_keys_behind(small):
    """A manager broadcasts its save decision for every step it is called with (saved or
    skipped): those keys, its retention's and a deletion's, and wait_for_new_checkpoint's,
    are gone once both processes have read them."""
    for result in small:
        assert result["decided"] == [True, False, True, False, True]
        assert (result["steps"], result["waited"]) == ([4], 4)
        assert result["keys"]["manager"] == []


def test_a_process_arriving_after_another_gave_up_raises_at_once_naming_it(small):
    p0, p1 = small
    path = str(Path(p0["dir"]) / "late")
    assert p0["late"] == ["BarrierTimeoutError", f"saving {path}: process 1 did not reach "
                          "'ready' within 2 s; nothing was committed"]
    assert p1["late"] == ["BarrierTimeoutError", f"saving {path}: process 0 gave up waiting at "
                          "'ready' before this process could go on (process 1 did not reach "
                          "'ready' within 2 s); nothing was committed"]
    assert not p0["late_visible"] and not p1["late_visible"]
    assert p0["keys"]["late"] == p1["keys"]["late"] == []


def test_processes_saving_different_trees_are_refused_on_every_process(small):
    path = str(Path(small[0]["dir"]) / "other_tree")
    for result in small:
        assert result["other_tree"] == [
            "StructureMismatchError", f"saving {path}: process 1 saves another tree than "
            "process 0, the primary (first difference: 'x' is float32[4] on process 0, "
            "float16[4] on process 1); every process must save the same tree (paths, shapes "
            "and dtypes); nothing was written"]
        assert result["other_tree_visible"] == [False, []]  # (no temporary directory either)
        assert result["keys"]["other_tree"] == []
        assert result["same_tree_after"] == "ok"
        assert result["numpy_differs"] == [0, 0]  # (the primary's)


@pytest.mark.parametrize("layout", ["layout_00", "layout_11", "layout_01"])
def test_orbax_other_layouts_written_by_two_processes(small, layout):
    """use_ocdbt=False: both processes write their shard's chunk into the array's one folder;
    use_zarr3=True in OCDBT: each its own database, merged. Both libraries restore it."""
    assert [r["layouts"][layout] for r in small] == [[[0.0, 1.0]], [[2.0, 3.0]]]
    item = Path(small[0]["dir"]) / layout
    use_ocdbt, use_zarr3 = layout[-2:] == "11", layout[-1] == "1"
    if use_ocdbt:
        assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(item))
    else:
        chunks = item / "x" / "c" if use_zarr3 else item / "x"
        assert {"0", "1"} <= set(os.listdir(chunks))
    mesh = Mesh(np.array(jax.devices()[:2]), ("a",))
    want = {"x": jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(mesh, P("a"))),
            "step": 0}
    for lib in (orbax, ocp):
        with lib.StandardCheckpointer() as ckptr:
            got = ckptr.restore(item, want)
        assert np.asarray(got["x"]).tolist() == [0.0, 1.0, 2.0, 3.0] and got["step"] == 1
    assert ocp.verify(item).ok


def test_a_sharding_that_does_not_split_an_array_is_named_on_every_process(small):
    """The region read of a target spanning both processes checks the sharding as the
    single-process placement does (jax's IndivisibleError, naming no leaf, is the cause)."""
    path = Path(small[0]["dir"]) / "odd"
    for result in small:
        assert result["indivisible"] == [
            "ShardingMismatchError", f"{path}: key 'x' of shape (3,): the sharding the "
            "restore asks for does not split it evenly", "IndivisibleError"]


def test_each_process_writes_its_shards_into_its_own_database(runs):
    item = Path(runs["paths"]["p2x2"])
    names = sorted(os.listdir(item))
    assert {"ocdbt.process_0", "ocdbt.process_1", "manifest.ocdbt", "_METADATA", "_sharding",
            "_CHECKSUMS", "commit_success.txt"} <= set(names)
    assert sorted(os.listdir(item / "array_metadatas")) == ["process_0", "process_1"]
    assert "_CHECKSUMS.parts" not in names  # merged by the primary, then removed

    def keys(d: Path) -> set[str]:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{d}"}).result()
        return {k.decode() for k in kv.list().result() if not k.endswith(b".zarray")}

    p0, p1 = keys(item / "ocdbt.process_0"), keys(item / "ocdbt.process_1")
    # w is sharded over both processes' devices; m is split by rows (and replicated over b);
    # r is replicated on every device: written once. NumPy and scalars: by the primary.
    # (Chunks over 1 KiB lie in the process's data files, smaller ones inline in its b-tree.)
    assert p0 == {"w/0.0", "w/0.1", "m/0.0", "r/0.0", "host/0", "step/0"}
    assert p1 == {"w/1.0", "w/1.1", "m/1.0"}
    assert keys(item) == p0 | p1  # the root database lists both (merged, nothing copied)


def test_restore_reshards_what_other_topologies_saved(runs):
    p = runs["paths"]
    for result in runs["main"]:  # on 2 x 2: saved on 4 x 2, 1 x 4, 1 x 1 and on S3
        for path in (p["p4x2"], p["p1x4"], p["p1x1"], p["s3_p4x2"]):
            for swapped in (False, True):
                assert result["checked"][f"{path} swapped={swapped}"] == 3 * 2
        assert result["checked"]["as saved"] == 6  # no target: the saved shardings
        for shape in ((160, 24), (96, 40)):  # (another shape: refused, or cut and padded)
            assert result["checked"][f"w strict {shape}"] == "ShapeMismatchError"
            assert result["checked"][f"w fit {shape}"] == 2
    for result in runs["restore4x2"]:  # on 4 x 2: saved on 2 x 2 (local and S3)
        for path in (p["p2x2"], p["s3_p2x2"]):
            for swapped in (False, True):
                assert result["checked"][f"{path} swapped={swapped}"] == 3 * 2


@pytest.mark.parametrize("devices", [4, 1])
def test_one_process_restores_what_two_processes_saved(runs, devices):
    p = runs["paths"]
    mesh = make_mesh(jax.devices()[:devices])
    ckptr = ocp.StandardCheckpointer()
    for path in (p["p2x2"], p["s3_p2x2"], p["orbax2x2"]):
        for swapped in (False, True):
            assert check_state(ckptr.restore(path, target(mesh, swapped)), mesh, swapped) == (
                3 * devices)
        # metadata on a topology whose devices do not match the saved ones
        meta = ckptr.metadata(path).item_metadata
        assert (meta["w"].shape, meta["m"].dtype) == ((128, 32), np.dtype("bfloat16"))
    assert ocp.verify(p["p2x2"]).ok and ocp.verify(p["s3_p2x2"]).ok


def test_each_process_reads_and_checks_only_its_region(runs):
    p0, p1 = runs["main"]
    assert p0["damaged"] == ["restored", 6]
    kind, message = p1["damaged"]
    assert kind == "CorruptCheckpointError" and "fails its checksum" in message
    assert message.startswith(runs["paths"]["p2x2"] + ".damaged")


def test_single_replica_restores_read_on_one_replica_and_broadcast(runs):
    """SingleReplicaArrayHandler (MaxText's restore): only the primary replica's processes
    read; the others get bit-exact arrays (-0.0 and a NaN payload kept) by broadcast. A
    complex array is read by each process as any other array."""
    p0, p1 = (r["single_replica"] for r in runs["main"])
    nbytes = p0["nbytes"]
    total, complex_, step = sum(nbytes.values()), nbytes["c64"], nbytes["step"]
    # Each replica is one process's devices: the primary's process reads every array, the
    # other the complex one only.
    for case in ("rows, replica 0", "replica axis 1"):
        assert (p0[case], p1[case]) == (total, complex_), case
    assert (p0["rows, replica 1"], p1["rows, replica 1"]) == (complex_, total)
    # Each replica holds a device of each process: each process reads its device's half
    # (and the half of the complex array its two devices hold), and the 0-d step whole.
    half = (total - step) // 2 + step
    assert p0["columns, global registry"] == p1["columns, global registry"] == half
    assert p0["composite"] == p1["composite"] == ["a", "b"]


def test_orbax_and_ckpt_async_read_each_others_multiprocess_checkpoints(runs):
    p = runs["paths"]
    for result in runs["main"]:
        assert result["checked"][f"orbax wrote {p['orbax2x2']}"] == 6
        assert result["checked"][f"orbax restored {p['p2x2']}"] == 6
    for result in runs["restore4x2"]:
        assert result["checked"][f"{p['orbax2x2']} swapped=True"] == 6
    mesh = make_mesh()
    restored = orbax.StandardCheckpointer().restore(p["p2x2"], target(mesh))
    assert check_state(restored, mesh) == 12


def test_manager_retention_and_decisions_follow_the_primary(runs):
    run = Path(runs["paths"]["run"])
    for result in runs["main"]:
        assert result["steps"] == [1, 2]  # the primary's decision saved every step everywhere
        assert result["steps_after_failure"] == [1, 2]
        assert result["own_barrier_keys"] == ["own-barrier"], result
        assert result["broadcast"] == 5  # process 0's value, on both
        assert result["checked"]["manager step 2"] == 6
        assert result["checked"]["manager step 2 ArraySave"] == 2  # its shards, bit-exact
        assert result["steps_final"] == [2, 4]
    # (a key saved from process 0's device restores there; process 1 holds no part of it)
    assert [r["key as saved"] for r in runs["main"]] == [[[0, 2]], []]
    assert sorted(os.listdir(run)) == ["2", "4"]  # deleted by the primary; no leftovers


def test_a_failing_process_fails_the_save_everywhere_and_nothing_is_visible(runs):
    p0, p1 = runs["main"]
    kind, message = p0["step3_error"]
    assert kind == "ProcessFailedError"
    assert "process 1 (injected failure on process 1)" in message
    assert p1["step3_error"][0] == "CommitError" and "injected failure" in p1["step3_error"][1]
    assert not (Path(runs["paths"]["run"]) / "3").exists()


def test_a_missing_process_times_out_naming_it(runs):
    message = runs["main"][0]["timeout_error"]
    assert "process 1 did not reach 'ready' within 3 s" in message
    timeout = Path(runs["paths"]["timeout"])
    assert not timeout.exists()
    assert not [n for n in os.listdir(timeout.parent) if n.startswith(timeout.name + ".")]


def test_object_store_layout_and_marker(runs, s3_env):
    client = client_for(s3_env)
    prefix = f"{Path(runs['dir']).name}/p4x2/"
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    names = {o["Key"][len(prefix):].split("/")[0] for o in listed}
    assert {f"ocdbt.process_{i}" for i in range(4)} <= names
    assert {"commit_success.txt", "manifest.ocdbt", "_CHECKSUMS"} <= names


def test_one_process_roles_and_unsupported_options(tmp_path):
    assert (ocp.multihost.process_index(), ocp.multihost.process_count()) == (0, 1)
    assert ocp.multihost.is_primary_host(0) and ocp.multihost.is_primary_host(None)
    # (Orbax's "every process its own primary": one process, 0, commits ckpt_async's saves)
    assert ocp.multihost.roles_for(ocp.options.MultiprocessingOptions(primary_host=None)) == \
        ocp.multihost.Roles(0, 1, 0)
    ocp.multihost.sync_global_processes("alone")  # nobody to wait for
    bad = [ocp.options.MultiprocessingOptions(primary_host=3),
           ocp.options.MultiprocessingOptions(active_processes={0})]
    for options in bad:
        with pytest.raises(ocp.errors.InvalidArgumentError):
            ocp.multihost.roles_for(options)
        with pytest.raises(ocp.errors.InvalidArgumentError):  # when the manager starts
            ocp.CheckpointManager(tmp_path / "run", ocp.CheckpointManagerOptions(
                multiprocessing_options=options))
        ckptr = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(),
                                      multiprocessing_options=options)
        with pytest.raises(ocp.errors.InvalidArgumentError):
            ckptr.save(tmp_path / "run" / "0", args=ocp.args.StandardSave({"x": np.zeros(2)}))
    assert not (tmp_path / "run" / "0").exists()


def test_what_fails_on_one_process_fails_everywhere_at_once(runs):
    p0, p1 = runs["main"]
    # An array on process 1's devices only: refused (nobody could tell it was to be written).
    assert p0["submesh"][0] == "UnsupportedLeafError" and "process 1 only" in p0["submesh"][1]
    assert p1["submesh"][0] == "ProcessFailedError" and "process 0" in p1["submesh"][1]
    assert "orbax-checkpoint-tmp" not in p1["submesh"][1]  # (the path as the user gave it)
    assert not p0["submesh_visible"] and not p1["submesh_visible"]
    # A check failing on process 1 before the save: both raise at once, and the retry saves.
    assert p1["unwritable"][:2] == ["NotWritableError", p1["unwritable"][1]]
    assert "injected on process 1" in p1["unwritable"][1]
    assert p0["unwritable"][0] == "ProcessFailedError" and "process 1" in p0["unwritable"][1]
    assert max(p0["unwritable"][2], p1["unwritable"][2]) < 30  # (not the 60 s timeout)
    assert p0["unwritable_retry"][0] == p1["unwritable_retry"][0] == "ok"
    assert p0["checked"]["retried ck"] == p1["checked"]["retried ck"] > 0
    # Deletions and retention: every process lists what is on disk.
    for result in (p0, p1):
        assert result["listed_after_retention"] == [1, 2]
        assert result["listed_after_delete"] == [[1], 1]
        assert result["checked"]["latest after delete"] > 0
    # A save failing on process 1 only: the next save raises on both, at once; then saves go on.
    assert p1["step3"][0] == "UnsupportedLeafError" and p0["step3"][0] == "ok"
    assert p0["step3_commit"] == "ProcessFailedError"
    assert p0["step4"][0] == "ProcessFailedError" and p1["step4"][0] == "ProcessFailedError"
    assert max(p0["step4"][2], p1["step4"][2]) < 30
    assert p0["step5"][0] == p1["step5"][0] == "ok"
    assert p0["listed_at_end"] == p1["listed_at_end"] == [1, 5]
    assert sorted(os.listdir(Path(runs["dir"]) / "consistency" / "run")) == ["1", "5"]
    # A process too slow for the timeout: the primary names it; it hears the primary gave up.
    assert p0["slow"][0] == "BarrierTimeoutError" and "process 1" in p0["slow"][1]
    assert p1["slow"][0] == "ProcessFailedError" and "abandoned the save" in p1["slow"][1]
    assert not (Path(runs["dir"]) / "consistency" / "slow").exists()


def test_tree_descriptions_and_where_they_first_differ(mesh):
    """What the processes of a save compare (ckpt_async._same_tree): every leaf's path, the
    shape and dtype of jax.Arrays only, and the names and kinds of the other items."""
    from ckpt_async import _same_tree

    w = jax.device_put(np.zeros((4, 2), np.float32))
    args = ocp.args.Composite(state=ocp.args.StandardSave({"params": {"w": w}, "host": np.ones(3),
                                                           "step": 1}),
                              meta=ocp.args.JsonSave({"anything": 1}))
    lines = _same_tree.describe(args)
    assert lines == ["meta: JsonSave", "state/host: ", "state/params/w: float32[4, 2]",
                     "state/step: "]  # (sorted: a dict's order is not compared)
    assert _same_tree.describe(ocp.args.StandardSave(w)) == [": float32[4, 2]"]
    assert _same_tree.digest(lines) == _same_tree.digest(list(lines))
    assert _same_tree.digest(lines) != _same_tree.digest(lines[:-1])
    differ = [(lines[:-1], "'state/step' is saved by a only"),
              ([*lines, "state/x: "], "'state/x' is saved by b only"),
              ([*lines[:2], "state/params/w: ", *lines[3:]],
               "'state/params/w' is float32[4, 2] on a, no jax.Array on b")]
    for other, where in differ:
        assert _same_tree.first_difference(lines, other, "a", "b") == where


@pytest.mark.parametrize("case", ["sym", "asym", "merge"])
def test_a_save_losing_a_race_in_place_leaves_the_winner_whole(race, s3_env, case):
    """Two saves into one object-store prefix (``multihost_worker.scenario_race``): the one
    that meets the other's database, on any of its processes, raises StepAlreadyExistsError
    naming the path on every process, removes only its own databases and leaves the prefix to
    the winner, whose checkpoint restores bit-exact. Before, where a process other than the
    primary lost (sym, asym), the primary raised ProcessFailedError and removed the whole
    prefix, the winner's committed checkpoint with it (and in asym had written its documents
    over the winner's before it learnt of the race); in merge, the multi-process save's merge
    took the root database the single-process save had made as its own, added its keys to it
    and succeeded, over the other's documents."""
    results, name = race
    url = f"s3://{BUCKET}/{name}/{case}"
    for result in results:
        kind, message = result["race"][case]
        assert kind == "StepAlreadyExistsError", (result["process"], kind, message)
        assert url in message, message
        assert result["race"][f"{case} restored"] == [2.0] * 8  # the winner's values
    assert ocp.verify(url).ok
    keys = list_keys(client_for(s3_env), BUCKET, f"{name}/{case}")
    assert ("commit_success.txt" in keys) == (case != "merge")  # (a handler's save: no marker)
    folders = {k.split("/")[0] for k in keys if k.startswith("ocdbt.process_")}
    # (the loser's own databases are gone: asym's winner wrote none for process 0, and the
    # single-process winner of merge none at all)
    assert folders == {"sym": {"ocdbt.process_0", "ocdbt.process_1"},
                       "asym": {"ocdbt.process_1"}, "merge": set()}[case]
