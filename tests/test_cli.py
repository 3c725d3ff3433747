"""The ckpt-async command line, run in-process on checkpoints written by ckpt_async and Orbax."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ckpt_async as ocp
from ckpt_async import cli

Pair = collections.namedtuple("Pair", ["left", "right"])


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert out, err  # a document on stdout, whatever the exit status
    return code, json.loads(out), err


def state(step: int, mesh: Mesh) -> dict:
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + step  # big enough for d/ files
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, PartitionSpec("x", "y"))),
            "b": jnp.arange(6, dtype=jnp.bfloat16),
        },
        "opt": [np.arange(3, dtype=np.uint16), ()],
        "step": step,
    }



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mesh) -> Path:
    """A manager directory: steps 0, 10, 20 (state + extra JSON), a tmp and a todelete leftover."""
    root = tmp_path_factory.mktemp("cli") / "run"
    options = ocp.CheckpointManagerOptions(max_to_keep=5)
    with ocp.CheckpointManager(root, options=options) as mngr:
        for step in (0, 10, 20):
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state(step, mesh)),
                extra=ocp.args.JsonSave({"data_index": step * 2})),
                metrics={"loss": 1.0 / (step + 1)})
        mngr.wait_until_finished()
    (root / "30.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    (root / "30.orbax-checkpoint-tmp-1234" / "state" / "junk").write_bytes(b"x" * 100)
    (root / "5.orbax-checkpoint-todelete-99").mkdir()
    return root


@pytest.fixture(scope="module")
def orbax_ckpt(tmp_path_factory) -> Path:
    import orbax.checkpoint as orbax
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    tree = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3),
            "b": {"c": np.int32(3), "d": [jnp.ones(2, jnp.bfloat16)]}}
    ckptr = orbax.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    ckptr.close()
    return path


def copy_step(run_dir: Path, tmp_path: Path, step: int = 10) -> Path:
    dest = tmp_path / str(step)
    shutil.copytree(run_dir / str(step), dest)
    return dest


# -- ls ----------------------------------------------------------------------------------------


def test_ls_json_lists_steps_items_metrics_and_leftovers(capsys, run_dir):
    code, doc, _ = run_json(capsys, "ls", run_dir)
    assert code == 0
    assert [s["step"] for s in doc["steps"]] == [0, 10, 20]
    s10 = doc["steps"][1]
    assert s10["items"] == ["extra", "state"]
    assert s10["metrics"] == {"loss": pytest.approx(1 / 11)}
    assert s10["bytes"] > 64 * 64 * 4
    assert s10["commit_time"].endswith("Z") and s10["commit_timestamp_nsecs"] > 0
    assert {(lo["name"], lo["kind"]) for lo in doc["leftovers"]} == {
        ("30.orbax-checkpoint-tmp-1234", "tmp"), ("5.orbax-checkpoint-todelete-99", "todelete")}


def test_ls_text(capsys, run_dir):
    code, out, _ = run(capsys, "ls", run_dir)
    assert code == 0
    assert "leftover (tmp)" in out and "leftover (todelete)" in out
    assert "3 step(s)" in out and "loss=" in out


def test_ls_step_prefix(capsys, tmp_path):
    opts = ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=4)
    with ocp.CheckpointManager(tmp_path / "r", options=opts) as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave({"x": np.ones(3)}))
        mngr.wait_until_finished()
    _, doc, _ = run_json(capsys, "ls", tmp_path / "r", "--step-prefix", "ckpt")
    assert [(s["step"], s["name"]) for s in doc["steps"]] == [(1, "ckpt_0001"), (2, "ckpt_0002")]
    _, doc, _ = run_json(capsys, "ls", tmp_path / "r")  # any prefix by default
    assert [s["step"] for s in doc["steps"]] == [1, 2]
    _, doc, _ = run_json(capsys, "ls", tmp_path / "r", "--step-prefix", "other")
    assert doc["steps"] == []


def test_only_real_step_directories_are_steps(capsys, tmp_path, orbax_ckpt):
    # Any <anything>_<digits> folder used to be a step: a tensorboard_1/ beside the steps, a
    # ckpt_000200/ chosen over the latest step 40, an Orbax checkpoint's ocdbt.process_0/.
    run_ = tmp_path / "run"
    with ocp.CheckpointManager(run_) as mngr:
        for step in (20, 40):
            mngr.save(step, args=ocp.args.StandardSave({"w": np.ones(2)}))
    opts = ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=6)
    with ocp.CheckpointManager(run_, options=opts) as mngr:
        mngr.save(200, args=ocp.args.StandardSave({"w": np.ones(2)}))
    (run_ / "tensorboard_1").mkdir()
    _, doc, _ = run_json(capsys, "ls", run_)
    assert [(s["step"], s["name"]) for s in doc["steps"]] == [(20, "20"), (40, "40")]
    _, doc, _ = run_json(capsys, "show", run_)
    assert doc["step"] == 40
    _, doc, _ = run_json(capsys, "ls", run_, "--step-prefix", "ckpt")
    assert [s["name"] for s in doc["steps"]] == ["ckpt_000200"]
    (run_ / "20").rename(tmp_path / "20")
    (run_ / "40").rename(tmp_path / "40")  # only prefixed steps: the committed ones count
    _, doc, _ = run_json(capsys, "ls", run_)
    assert [s["name"] for s in doc["steps"]] == ["ckpt_000200"]
    assert (orbax_ckpt / "ocdbt.process_0").is_dir()
    code, out, _ = run(capsys, "ls", orbax_ckpt)
    assert (code, out) == (0, f"{orbax_ckpt}: no steps (a checkpoint, not a manager "
                              "directory)\n")


# -- show --------------------------------------------------------------------------------------


def test_show_json_tree_without_loading(capsys, run_dir):
    code, doc, _ = run_json(capsys, "show", run_dir / "10")
    assert code == 0
    items = {i["name"]: i for i in doc["items"]}
    assert items["extra"]["document"] == {"data_index": 20}
    leaves = {r["key"]: r for r in items["state"]["leaves"]}
    w = leaves["params.w"]
    assert (w["shape"], w["dtype"], w["bytes"]) == ([64, 64], "float32", 64 * 64 * 4)
    assert "NamedSharding" in w["sharding"] and "x:2" in w["sharding"]
    assert leaves["params.b"]["dtype"] == "bfloat16"
    assert leaves["step"]["kind"] == "scalar" and leaves["step"]["shape"] == []
    assert leaves["opt.1"]["kind"] == "empty"
    assert doc["metrics"] == {"loss": pytest.approx(1 / 11)}


def test_show_manager_dir_uses_latest_or_step(capsys, run_dir):
    code, out, _ = run(capsys, "show", run_dir)
    assert code == 0 and "(step 20)" in out and "params.w" in out and "float32[64,64]" in out
    _, doc, _ = run_json(capsys, "show", run_dir, "--step", "0", "--item", "state")
    assert doc["step"] == 0 and [i["name"] for i in doc["items"]] == ["state"]


def test_show_item_folder(capsys, run_dir):
    _, doc, _ = run_json(capsys, "show", run_dir / "20" / "state")
    assert {r["key"] for r in doc["items"][0]["leaves"]} == {
        "params.w", "params.b", "opt.0", "opt.1", "step"}
    assert doc["items"][0]["handler"] == "StandardCheckpointHandler"  # (the step records it)


def test_show_json_item_folder(capsys, run_dir):
    code, doc, _ = run_json(capsys, "show", run_dir / "20" / "extra")
    assert code == 0
    assert [(i["name"], i["kind"], i["document"], i["handler"]) for i in doc["items"]] == [
        (None, "json", {"data_index": 40}, "JsonCheckpointHandler")]


def test_a_json_item_with_its_own_filename_is_its_document_not_the_step_files(capsys, tmp_path):
    # beside state.json lie _CHECKPOINT_METADATA and _CKPT_ASYNC: show gave the step's
    # metadata as the document, and diff found two equal documents different (its timestamps)
    for name, doc in (("a", {"x": 1}), ("b", {"x": 1}), ("c", {"x": 2})):
        ckptr = ocp.Checkpointer(ocp.JsonCheckpointHandler(filename="state.json"))
        ckptr.save(tmp_path / name, args=ocp.args.JsonSave(doc))
        ckptr.close()
    assert {"_CHECKPOINT_METADATA", "_CKPT_ASYNC", "state.json"} <= set(
        os.listdir(tmp_path / "a"))
    code, doc, _ = run_json(capsys, "show", tmp_path / "a")
    assert code == 0 and [(i["kind"], i["document"]) for i in doc["items"]] == [
        ("json", {"x": 1})]
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert (code, out) == (0, "identical (shapes and dtypes)\n")
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "c")
    assert (code, out) == (1, "~ (json)  document differs\n")


def test_ls_and_show_give_the_metrics_orbax_recorded(capsys, tmp_path):
    # Orbax writes a step's metrics into its metrics item, not _CHECKPOINT_METADATA.
    import orbax.checkpoint as orbax
    options = orbax.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with orbax.CheckpointManager(tmp_path / "run", options=options) as mngr:
        mngr.save(1, args=orbax.args.StandardSave({"a": np.ones(2)}), metrics={"loss": 0.25})
        mngr.wait_until_finished()
    code, doc, _ = run_json(capsys, "ls", tmp_path / "run")
    assert code == 0 and doc["steps"][0]["metrics"] == {"loss": 0.25}
    code, doc, _ = run_json(capsys, "show", tmp_path / "run")
    assert code == 0 and doc["metrics"] == {"loss": 0.25}
    code, out, _ = run(capsys, "show", tmp_path / "run")
    assert code == 0 and "metrics: loss=0.25" in out


def test_orbax_checkpoint_show_verify_export(capsys, orbax_ckpt, tmp_path):
    code, doc, _ = run_json(capsys, "show", orbax_ckpt)
    assert code == 0
    leaves = {r["key"]: r for r in doc["items"][0]["leaves"]}
    assert leaves["a"]["shape"] == [2, 3] and leaves["b.d.0"]["dtype"] == "bfloat16"
    code, doc, _ = run_json(capsys, "verify", orbax_ckpt)
    assert code == 0 and doc["ok"] and doc["checkpoints"][0]["arrays_checked"] == 3
    assert run(capsys, "export", orbax_ckpt, "--to", tmp_path / "o.safetensors")[0] == 0
    assert run(capsys, "import", tmp_path / "o.safetensors", "--to", tmp_path / "back")[0] == 0
    code, out, _ = run(capsys, "diff", orbax_ckpt, tmp_path / "back", "--values")
    assert code == 0, out


# -- verify ------------------------------------------------------------------------------------


def test_verify_all_steps_ok(capsys, run_dir):
    code, doc, _ = run_json(capsys, "verify", run_dir)
    assert code == 0 and doc["ok"]
    assert [c["step"] for c in doc["checkpoints"]] == [0, 10, 20]
    assert all(c["arrays_checked"] == 4 for c in doc["checkpoints"])
    assert all(c["bytes_checked"] >= 64 * 64 * 4 for c in doc["checkpoints"])


def test_verify_progress_plain_lines_when_not_a_tty(capsys, run_dir):
    code, out, _ = run(capsys, "verify", run_dir / "20")
    assert code == 0
    assert "verifying" in out and "%" in out and "\r" not in out
    assert out.strip().splitlines()[-1].startswith("OK")


def _corrupt_data(step: Path) -> None:
    files = [p for p in (step / "state" / "d").iterdir() if p.is_file()]
    assert files, "the fixture's arrays should have data files"
    for p in files:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncate", "delete", "metadata"])
def test_verify_fails_on_corruption(capsys, run_dir, tmp_path, damage):
    step = copy_step(run_dir, tmp_path)
    if damage == "truncate":
        _corrupt_data(step)
    elif damage == "delete":
        for p in (step / "state" / "d").iterdir():
            p.unlink()
    else:
        (step / "state" / "_METADATA").write_bytes(b'{"tree_metadata": {"garbled')
    code, out, err = run(capsys, "verify", step)
    assert code == 1, out
    assert "FAIL" in out and "problem:" in out
    assert "failed" in err and "Traceback" not in err


def test_verify_and_show_random_key_proto_and_json_only_checkpoints(capsys, tmp_path):
    from google.protobuf import duration_pb2
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.Composite(
            rng=ocp.args.JaxRandomKeySave(jax.random.key(0)),
            np_rng=ocp.args.NumpyRandomKeySave(np.random.get_state()),
            spec=ocp.args.ProtoSave(duration_pb2.Duration(seconds=5)),
            extra=ocp.args.JsonSave({"i": 1})))
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(tmp_path / "doc",
                                                       args=ocp.args.JsonSave({"a": 1}))
    for path in ("run", "run/1/extra", "run/1/rng", "run/1/spec", "doc"):
        code, out, err = run(capsys, "verify", "-q", tmp_path / path)
        assert code == 0 and out.startswith("OK") and err == "", (path, out, err)
    code, doc, _ = run_json(capsys, "show", tmp_path / "run")
    items = {i["name"]: i for i in doc["items"]}
    assert items["spec"]["kind"] == "proto" and items["spec"]["text"] == "seconds: 5\n"
    assert items["rng"]["kind"] == "random_key"
    assert items["rng"]["document"] == {"typed": True, "impl": "threefry2x32"}
    assert [(r["dtype"], r["shape"]) for r in items["rng"]["leaves"]] == [("uint32", [2])]
    code, out, _ = run(capsys, "show", tmp_path / "run")
    assert code == 0 and "unknown handler" not in out
    assert "spec  [ProtoCheckpointHandler]  seconds: 5" in out


def test_a_directory_that_is_no_checkpoint_is_said_to_hold_none(capsys, tmp_path):
    (tmp_path / "proj" / "notes").mkdir(parents=True)
    (tmp_path / "proj" / "notes" / "readme.txt").write_text("hello")
    (tmp_path / "proj" / "src").mkdir()
    (tmp_path / "proj" / "src" / "a.py").write_text("x = 1")
    for command in ("show", "verify", "diff"):
        extra = [tmp_path / "proj"] if command == "diff" else []
        code, out, err = run(capsys, command, tmp_path / "proj", *extra)
        assert (code, out, err) == (
            2 if command == "diff" else 1, "",
            f"ckpt-async {command}: error: {tmp_path / 'proj'} holds no checkpoint and no "
            "steps\n")


def test_verify_of_a_manager_directory_agrees_with_the_library(capsys, tmp_path, monkeypatch):
    # A step without _CHECKPOINT_METADATA used to pass, an empty step-named folder to fail, and
    # a step that could not be read stopped the command.
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=ocp.args.StandardSave({"w": np.ones(4)}))
    (tmp_path / "run" / "1" / "_CHECKPOINT_METADATA").unlink()
    (tmp_path / "run" / "7").mkdir()
    code, doc, err = run_json(capsys, "verify", "-q", tmp_path / "run")
    assert code == 1 and [(c["step"], c["ok"]) for c in doc["checkpoints"]] == [
        (1, False), (2, True), (3, True)]
    assert doc["checkpoints"][0]["problems"] == ocp.verify(tmp_path / "run").problems
    assert err == "verify: 1 of 3 checkpoint(s) failed\n"

    from ckpt_async import _storage
    bad = tmp_path / "run" / "2"

    def denied(real):  # (as a folder without permission, which root could still read)
        async def listing(path):
            if path == bad:
                raise PermissionError(13, "Permission denied", str(path))
            return await real(path)
        return listing

    for name in ("listdir", "listdirs"):
        monkeypatch.setattr(_storage, name, denied(getattr(_storage, name)))
    code, out, err = run(capsys, "verify", "-q", tmp_path / "run")
    assert code == 1 and err == "verify: 2 of 3 checkpoint(s) failed\n"
    assert f"FAIL  step 2: 0 arrays, 0 B checked\n  problem: {bad}: cannot be read" in out
    assert out.rstrip().splitlines()[-1] == "OK  step 3: 1 arrays, 32 B checked"


def test_verify_missing_path(capsys, tmp_path):
    code, _, err = run(capsys, "verify", tmp_path / "nope")
    assert code == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1


# -- diff --------------------------------------------------------------------------------------


def test_diff_structure_and_values(capsys, run_dir, tmp_path):
    code, doc, _ = run_json(capsys, "diff", run_dir / "0", run_dir / "10")
    assert code == 1  # the JSON item differs
    assert doc["added"] == [] and doc["removed"] == []
    assert [c["key"] for c in doc["changed"]] == ["extra"]
    code, doc, _ = run_json(capsys, "diff", run_dir / "0", run_dir / "10", "--values")
    by_key = {v["key"]: v for v in doc["values"]}
    assert set(by_key) == {"state/params.w", "state/step"}
    assert by_key["state/params.w"]["differing"] == 64 * 64
    assert by_key["state/params.w"]["max_abs_diff"] == pytest.approx(10.0)
    assert by_key["state/step"]["max_abs_diff"] == 10

    other = tmp_path / "other"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(other, args=ocp.args.StandardSave({
        "params": {"w": np.zeros((64, 32), np.float32), "b": np.zeros(6, np.float32)},
        "new": np.ones(2), "step": 0, "opt": [np.arange(3, dtype=np.uint16), ()]}))
    ckptr.wait_until_finished()
    ckptr.close()
    code, doc, _ = run_json(capsys, "diff", run_dir / "0" / "state", other)
    assert code == 1
    assert doc["added"] == ["new"] and doc["removed"] == []
    changed = {c["key"]: (c["a"], c["b"]) for c in doc["changed"]}
    assert changed == {"params.w": ("float32[64,64]", "float32[64,32]"),
                       "params.b": ("bfloat16[6]", "float32[6]")}


def test_diff_identical(capsys, run_dir):
    code, out, _ = run(capsys, "diff", run_dir / "10", run_dir / "10", "--values")
    assert code == 0 and "identical" in out


def test_compare_arrays_nan_and_ints():
    a = np.array([1.0, np.nan, 3.0], ml_dtypes.bfloat16)
    b = np.array([1.0, np.nan, 5.0], ml_dtypes.bfloat16)
    assert cli.compare_arrays(a, b) == (1, 2.0)
    assert cli.compare_arrays(np.array([2**63 - 1], np.int64), np.array([0], np.int64)) == (
        1, float(2**63 - 1))


# -- gc ----------------------------------------------------------------------------------------


def test_gc_removes_exactly_the_leftovers(capsys, run_dir, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    before = sorted(os.listdir(work))
    code, out, _ = run(capsys, "gc", work, "--dry-run")
    assert code == 0 and "would remove 30.orbax-checkpoint-tmp-1234" in out
    assert sorted(os.listdir(work)) == before
    code, doc, _ = run_json(capsys, "gc", work)
    assert code == 0
    assert sorted(doc["removed"]) == ["30.orbax-checkpoint-tmp-1234",
                                      "5.orbax-checkpoint-todelete-99"]
    assert sorted(os.listdir(work)) == ["0", "10", "20"]
    assert run(capsys, "verify", work, "-q")[0] == 0
    code, out, _ = run(capsys, "gc", work)
    assert code == 0 and "no leftovers" in out


@pytest.mark.parametrize("command", ["show", "verify"])
def test_a_leftover_is_named_as_one_not_decoded(capsys, run_dir, command):
    code, _, err = run(capsys, command, run_dir / "30.orbax-checkpoint-tmp-1234")
    assert code == 1 and "is a leftover of a save or deletion that did not finish" in err


def test_gc_older_than_keeps_fresh_leftovers(capsys, run_dir, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    _, doc, _ = run_json(capsys, "gc", work, "--older-than", "3600")
    assert doc["removed"] == [] and len(os.listdir(work)) == 5
    code, out, _ = run(capsys, "gc", work, "--older-than", "3600")
    assert code == 0 and out.strip() == f"{work}: no leftovers older than 3600 s (2 younger left alone)"


# -- export / import ---------------------------------------------------------------------------


def assert_same_tree(a, b, path=()):
    """Same containers (types, key order and key types), same leaf types, same bits."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        assert [type(k) for k in a] == [type(k) for k in b], path
        for k in a:
            assert_same_tree(a[k], b[k], (*path, k))
    elif isinstance(a, (list, tuple)):
        assert type(a).__name__ == type(b).__name__ and len(a) == len(b), path
        assert getattr(a, "_fields", None) == getattr(b, "_fields", None), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, (*path, i))
    else:
        assert type(a) is type(b), (path, type(a), type(b))
        if isinstance(a, (str, type(None))):
            assert a == b, path
            return
        x, y = np.asarray(a), np.asarray(b)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), path
        assert x.tobytes() == y.tobytes(), path


def test_export_import_round_trip_bit_exact(capsys, tmp_path, mesh):
    f32 = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    f32[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    tree = {
        "params": {"w": jax.device_put(f32, NamedSharding(mesh, PartitionSpec("x"))),
                   "b": jnp.asarray(np.arange(6).astype(ml_dtypes.bfloat16))},
        3: (np.arange(4, dtype=np.float64), [np.int8(-3), 2.5, True, 7]),
        "pair": Pair(np.zeros((0, 2), np.int32), np.complex128(1 + 2j)),
        "none": None, "empty": {}, "emptyt": (), "name": "model-1",
        "f8": np.arange(4).astype(ml_dtypes.float8_e4m3fn),
    }
    src = tmp_path / "src"
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(src, args=ocp.args.PyTreeSave(tree))
    ckptr.close()
    code, out, _ = run(capsys, "export", src, "--to", tmp_path / "m.safetensors")
    assert code == 0 and "wrote" in out
    code, _, _ = run(capsys, "import", tmp_path / "m.safetensors", "--to", tmp_path / "back")
    assert code == 0
    original = ocp.PyTreeCheckpointer().restore(src)
    back = ocp.PyTreeCheckpointer().restore(tmp_path / "back")
    assert_same_tree(back, original)
    assert list(back) == list(original) and isinstance(back[3], tuple)
    assert type(back["pair"]).__name__ == "Pair" and isinstance(back["params"]["w"], jax.Array)
    assert run(capsys, "diff", src, tmp_path / "back", "--values")[0] == 0

    # the file is a plain safetensors file for other readers
    import safetensors
    data = (tmp_path / "m.safetensors").read_bytes()
    got = {name: (v["dtype"], list(v["shape"])) for name, v in safetensors.deserialize(data)}
    assert got["params.w"] == ("F32", [8, 4]) and got["params.b"] == ("BF16", [6])
    assert got["3.1.1"] == ("F64", []) and got["3.1.3"] == ("I64", [])
    assert got["f8"] == ("F8_E4M3", [4])
    with safetensors.safe_open(tmp_path / "m.safetensors", framework="np") as f:
        assert f.metadata()["format"] == "pt" and "ckpt_async" in f.metadata()
        np.testing.assert_array_equal(f.get_tensor("3.0"), np.arange(4, dtype=np.float64))


def test_paths_with_a_leading_tilde_are_in_the_home_directory(capsys, tmp_path, monkeypatch):
    # As the library's own paths ('~/ckpts' quoted, or from a config file); the CLI looked
    # for a directory named '~' in the working directory.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    with ocp.CheckpointManager("~/run") as mngr:
        mngr.save(1, args=ocp.args.StandardSave({"x": np.arange(3, dtype=np.int32)}))
    code, doc, _ = run_json(capsys, "ls", "~/run")
    assert code == 0 and [s["step"] for s in doc["steps"]] == [1]
    assert run(capsys, "export", "~/run/1", "--to", "~/x.safetensors")[0] == 0
    assert run(capsys, "import", "~/x.safetensors", "--to", "~/back")[0] == 0
    back = ocp.PyTreeCheckpointer().restore(tmp_path / "back")
    np.testing.assert_array_equal(back["x"], np.arange(3, dtype=np.int32))
    assert back["x"].dtype == np.int32
    assert not (tmp_path.parent / "~").exists()


def test_export_needs_item_for_several_pytrees(capsys, tmp_path, run_dir):
    step = tmp_path / "two"
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        mngr.save(1, args=ocp.args.Composite(a=ocp.args.StandardSave({"x": np.ones(2)}),
                                             b=ocp.args.StandardSave({"y": np.ones(2)})))
        mngr.wait_until_finished()
    step = tmp_path / "m" / "1"
    code, _, err = run(capsys, "export", step, "--to", tmp_path / "x.safetensors")
    assert code == 1 and "--item" in err
    code, _, _ = run(capsys, "export", step, "--item", "b", "--to", tmp_path / "x.safetensors")
    assert code == 0
    # a manager dir with one pytree item per step: the latest step's state
    code, out, _ = run(capsys, "export", run_dir, "--to", tmp_path / "s.safetensors")
    assert code == 0 and str(run_dir / "20" / "state") in out
    code, _, err = run(capsys, "export", run_dir, "--to", tmp_path / "s.safetensors")
    assert code == 1 and "--force" in err


def test_typed_prng_keys_are_shown_diffed_and_exported_as_key_data(capsys, tmp_path):
    # export and diff --values failed on them (NumPy cannot take a key<fry> array); show gave
    # their key data without saying it is a key's
    import orbax.checkpoint as orbax
    import safetensors

    def keys(seed):
        return {"k": jax.random.key(seed), "r": jax.random.key(1, impl="rbg"),
                "x": np.arange(3)}

    ckptr = ocp.StandardCheckpointer()
    for name, tree in (("a", keys(0)), ("b", keys(7)), ("plain", {
            **keys(0), "k": jax.random.key_data(jax.random.key(0))})):
        ckptr.save(tmp_path / name, args=ocp.args.StandardSave(tree))
    ckptr.close()
    theirs = orbax.StandardCheckpointer()  # (Orbax records the keys in array_metadatas)
    theirs.save(tmp_path / "orbax", keys(0))
    theirs.wait_until_finished()
    theirs.close()

    for path in ("a", "orbax"):
        code, doc, _ = run_json(capsys, "show", tmp_path / path)
        leaves = {r["key"]: r for r in doc["items"][0]["leaves"]}
        assert code == 0 and "random_key" not in leaves["x"]
        assert [(leaves[k]["dtype"], leaves[k]["shape"], leaves[k]["random_key"])
                for k in ("k", "r")] == [("uint32", [2], "threefry2x32"), ("uint32", [4], "rbg")]
    code, out, _ = run(capsys, "show", tmp_path / "a")
    assert code == 0 and "uint32[4]  16 B  random key (rbg)" in out

    code, doc, _ = run_json(capsys, "diff", tmp_path / "a", tmp_path / "b", "--values")
    assert code == 1 and doc["changed"] == []
    assert [(v["key"], v["size"]) for v in doc["values"]] == [("k", 2)]
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "orbax", "--values")
    assert (code, out) == (0, "identical (values compared)\n")
    code, doc, _ = run_json(capsys, "diff", tmp_path / "plain", tmp_path / "a")
    assert code == 1 and doc["changed"] == [{"key": "k", "a": "uint32[2]", "what": "shape/dtype",
                                             "b": "uint32[2] random key (threefry2x32)"}]

    for path in ("a", "orbax"):
        out_file = tmp_path / f"{path}.safetensors"
        assert run(capsys, "export", tmp_path / path, "--to", out_file)[0] == 0
        with safetensors.safe_open(out_file, framework="np") as f:
            np.testing.assert_array_equal(f.get_tensor("k"),
                                          jax.random.key_data(jax.random.key(0)))
        assert run(capsys, "import", out_file, "--to", tmp_path / f"{path}_back")[0] == 0
        back = ocp.StandardCheckpointer().restore(tmp_path / f"{path}_back")
        for k in ("k", "r"):
            assert back[k].dtype == keys(0)[k].dtype  # key<fry>, key<rbg>
            assert_same_tree(jax.random.key_data(back[k]), jax.random.key_data(keys(0)[k]))
        code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / f"{path}_back", "--values")
        assert (code, out) == (0, "identical (values compared)\n")


def test_import_plain_safetensors_nests_names(capsys, tmp_path):
    import safetensors.numpy as st_numpy
    st_numpy.save_file({"model.layer.0.weight": np.ones((2, 2), np.float32),
                        "model.layer.0.bias": np.arange(2, dtype=np.int64)},
                       str(tmp_path / "hf.safetensors"))
    code, _, _ = run(capsys, "import", tmp_path / "hf.safetensors", "--to", tmp_path / "c")
    assert code == 0
    tree = ocp.PyTreeCheckpointer().restore(tmp_path / "c")
    np.testing.assert_array_equal(tree["model"]["layer"]["0"]["bias"], [0, 1])
    code, _, _ = run(capsys, "import", tmp_path / "hf.safetensors", "--to", tmp_path / "f",
                     "--flat")
    assert code == 0
    assert set(ocp.PyTreeCheckpointer().restore(tmp_path / "f")) == {
        "model.layer.0.weight", "model.layer.0.bias"}


def test_import_rejects_a_non_safetensors_file(capsys, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    code, _, err = run(capsys, "import", tmp_path / "bad.safetensors", "--to", tmp_path / "c")
    assert code == 1 and "not a safetensors file" in err


# -- errors and entry points -------------------------------------------------------------------


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    code, _, err = run(capsys, "export", "x")  # --to is required
    assert code == 2 and "--to" in err


def test_failures_exit_1_one_line_and_debug_raises(capsys, tmp_path):
    code, _, err = run(capsys, "show", tmp_path / "missing")
    assert code == 1 and err.strip().count("\n") == 0 and "Traceback" not in err
    with pytest.raises(cli.CLIError):
        cli.main(["show", str(tmp_path / "missing"), "--debug"])


@pytest.mark.slow
def test_python_dash_m(run_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ckpt_async", "ls", "--json", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [s["step"] for s in json.loads(proc.stdout)["steps"]] == [0, 10, 20]


def test_import_force_replaces_only_a_checkpoint(capsys, tmp_path, monkeypatch):
    # --force used to delete whatever --to named: a manager directory, unrelated files, `.`.
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "src", args=ocp.args.StandardSave({"x": np.zeros(3)}))
    ckptr.save(tmp_path / "old", args=ocp.args.StandardSave({"y": np.ones(2)}))
    ckptr.close()
    assert run(capsys, "export", tmp_path / "src", "--to", tmp_path / "m.safetensors")[0] == 0
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.StandardSave({"w": np.ones(2)}))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("keep")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "notes")
    for to, why in [("run", "is a manager directory (1 step(s)); --force replaces only a "
                            "single checkpoint"),
                    ("notes", "is not a checkpoint; --force replaces only a checkpoint"),
                    (".", "is not a checkpoint; --force replaces only a checkpoint"),
                    ("notes/thesis.txt", "is not a directory; --force replaces only a "
                                         "checkpoint")]:
        dest = tmp_path / to if to != "." else to
        code, out, err = run(capsys, "import", tmp_path / "m.safetensors", "--to", dest,
                             "--force")
        assert (code, out, err) == (1, "", f"ckpt-async import: error: {dest} {why}\n")
    assert os.listdir(tmp_path / "run") == ["1"] and (tmp_path / "run" / "1").is_dir()
    assert os.listdir(tmp_path / "notes") == ["thesis.txt"]
    for to in ("old", "empty"):
        code, _, err = run(capsys, "import", tmp_path / "m.safetensors", "--to",
                           tmp_path / to, "--force")
        assert code == 0, err
        assert list(ocp.StandardCheckpointer().restore(tmp_path / to)) == ["x"]


def _strict_json(text):
    def reject(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=reject)


def test_json_output_stays_valid_with_nan_and_infinity(capsys, tmp_path):
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.StandardSave({"w": np.array([np.nan, 1.0], np.float32)}),
                  metrics={"loss": float("nan")})
        mngr.save(2, args=ocp.args.StandardSave({"w": np.array([1.0, 1.0], np.float32)}),
                  metrics={"loss": float("-inf")})
    _, out, _ = run(capsys, "ls", tmp_path / "run", "--json")
    assert [s["metrics"] for s in _strict_json(out)["steps"]] == [
        {"loss": "NaN"}, {"loss": "-Infinity"}]
    _, out, _ = run(capsys, "show", tmp_path / "run", "--step", "1", "--json")
    assert _strict_json(out)["metrics"] == {"loss": "NaN"}
    code, out, _ = run(capsys, "diff", tmp_path / "run" / "1", tmp_path / "run" / "2",
                       "--values", "--json")
    assert code == 1
    assert _strict_json(out)["values"][0]["max_abs_diff"] == "Infinity"


def test_export_leaves_no_temporary_file_and_keeps_an_unrelated_one(capsys, tmp_path,
                                                                      monkeypatch):
    # export wrote FILE.tmp, left it on a failure or Ctrl-C, and overwrote one that was there.
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "c", args=ocp.args.StandardSave({"a": np.ones(3)}))
    ckptr.close()
    (tmp_path / "m.safetensors.tmp").write_text("my notes")
    (tmp_path / "outdir").mkdir()
    code, _, err = run(capsys, "export", tmp_path / "c", "--to", tmp_path / "outdir", "--force")
    assert code == 1 and str(tmp_path / "outdir") in err

    def interrupted(fd):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli.os, "fsync", interrupted)
        code, _, err = run(capsys, "export", tmp_path / "c", "--to", tmp_path / "m.safetensors")
    assert (code, err) == (130, "ckpt-async: interrupted\n")
    assert sorted(os.listdir(tmp_path)) == ["c", "m.safetensors.tmp", "outdir"]
    assert run(capsys, "export", tmp_path / "c", "--to", tmp_path / "m.safetensors")[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["c", "m.safetensors", "m.safetensors.tmp", "outdir"]
    assert (tmp_path / "m.safetensors.tmp").read_text() == "my notes"


def test_gc_older_than_ages_a_leftover_by_its_newest_file(capsys, tmp_path):
    # A save in flight writes deep inside its tmp folder; only the top folder's mtime counted.
    tmp = tmp_path / "100.orbax-checkpoint-tmp-1796230000000000000"
    (tmp / "state" / "d").mkdir(parents=True)
    (tmp / "state" / "d" / "fresh").write_text("chunk written just now")
    old = os.stat(tmp).st_mtime - 7200
    for p in (tmp / "state" / "d", tmp / "state", tmp):
        os.utime(p, (old, old))
    code, out, _ = run(capsys, "gc", tmp_path, "--older-than", "3600")
    assert code == 0 and out == f"{tmp_path}: no leftovers older than 3600 s (1 younger left alone)\n"
    assert (tmp / "state" / "d" / "fresh").is_file()
    os.utime(tmp / "state" / "d" / "fresh", (old, old))
    code, out, _ = run(capsys, "gc", tmp_path, "--older-than", "3600", "--dry-run")
    assert code == 0 and out.startswith(f"would remove {tmp.name}")
    for bad in ("-1", "nan"):
        code, _, err = run(capsys, "gc", tmp_path, "--older-than", bad)
        assert code == 2 and "not a number of seconds" in err


def test_diff_trouble_exits_2_as_diff1(capsys, run_dir, tmp_path):
    assert run(capsys, "diff", run_dir / "10", run_dir / "20")[0] == 1  # they differ
    code, out, err = run(capsys, "diff", run_dir / "10", tmp_path / "missing")
    assert (code, out, err) == (2, "", f"ckpt-async diff: error: {tmp_path / 'missing'} does "
                                       "not exist\n")
    step = copy_step(run_dir, tmp_path)
    (step / "state" / "_METADATA").write_bytes(b"garbled")
    code, _, err = run(capsys, "diff", run_dir / "10", step)
    assert code == 2 and err.startswith("ckpt-async diff: error: ")


def test_a_closed_output_pipe_ends_quietly(capsys, run_dir, monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = cli.main(["show", str(run_dir), "--json"])
    monkeypatch.undo()
    assert code == 141 and capsys.readouterr().err == ""


def test_ls_marks_damaged_and_unreadable_steps(capsys, tmp_path, monkeypatch):
    # Their problems were only in --json (undocumented), the commit time silently an mtime.
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=ocp.args.StandardSave({"w": np.ones(4)}))
    (tmp_path / "run" / "2" / "_CHECKPOINT_METADATA").write_bytes(b"garbage")
    (tmp_path / "run" / "3" / "_CHECKPOINT_METADATA").unlink()
    (tmp_path / "run" / "3" / "_CKPT_ASYNC").unlink()
    code, doc, _ = run_json(capsys, "ls", tmp_path / "run")
    problems = {s["step"]: s["problems"] for s in doc["steps"]}
    assert code == 0 and problems[1] == [] and len(problems[2]) == 1
    assert problems[3] == ["no _CHECKPOINT_METADATA (COMMITTED is the folder's modification "
                           "time)"]
    code, out, _ = run(capsys, "ls", tmp_path / "run")
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["1", lines[1].split()[1]], ["2", "!"], ["3", "!"]]
    assert lines[4].startswith("3 step(s)")
    assert lines[5].startswith(f"! step 2: {tmp_path / 'run' / '2' / '_CHECKPOINT_METADATA'}")
    assert lines[6] == f"! step 3: {problems[3][0]}"
    real = cli.step_doc

    async def denied(path):
        if path.name == "1":
            raise PermissionError(13, "Permission denied", str(path / "_CHECKPOINT_METADATA"))
        return await real(path)

    monkeypatch.setattr(cli, "step_doc", denied)
    code, out, _ = run(capsys, "ls", tmp_path / "run")
    assert code == 0 and out.splitlines()[1].startswith("1 !")
    assert "no _CHECKPOINT_METADATA" not in out.splitlines()[1]
    assert f"! step 1: [Errno 13] Permission denied: '{tmp_path / 'run' / '1'}" in out
