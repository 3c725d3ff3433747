"""Careless input gets a named exception before anything is written; odd values round-trip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HandlerError,
    InvalidArgumentError,
    InvalidTypeError,
    NotWritableError,
    ShapeMismatchError,
    ShardingMismatchError,
    StepNotFoundError,
    StructureMismatchError,
    UnsupportedLeafError,
)


def _round_trip(path, tree):
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, tree)
        return ckptr.restore(path)


def test_odd_keys_and_values_round_trip_exactly(tmp_path):
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 5e-324], np.float64)
    tree = {".": np.ones(2), "a/b": np.arange(3), "ünï€": np.float32(1.5), "x.y": {"z": 1},
            "nan": special, "j": jnp.array([jnp.nan, -0.0], jnp.float32),
            "empty": np.zeros((0, 4), np.int16), "scalar0d": np.array(7, np.uint8)}
    out = _round_trip(tmp_path / "c", tree)
    assert set(out) == set(tree)
    assert out["nan"].tobytes() == special.tobytes()  # NaN payload and -0.0 sign kept
    assert np.asarray(out["j"]).tobytes() == np.asarray(tree["j"]).tobytes()
    assert out["empty"].shape == (0, 4) and out["empty"].dtype == np.int16
    assert out["scalar0d"].shape == () and out["scalar0d"] == 7
    assert type(out["ünï€"]) is np.float32 and out["x.y"] == {"z": 1}


def test_deep_and_wide_trees_round_trip(tmp_path):
    deep: dict = {"leaf": np.arange(2)}
    for i in range(100):
        deep = {f"k{i}": deep}
    wide = {f"w{i}": np.full((2,), i, np.int32) for i in range(10_000)}
    out = _round_trip(tmp_path / "deep", deep)
    for i in reversed(range(100)):
        out = out[f"k{i}"]
    np.testing.assert_array_equal(out["leaf"], np.arange(2))
    out = _round_trip(tmp_path / "wide", wide)
    assert len(out) == 10_000 and all(out[f"w{i}"][0] == i for i in (0, 4321, 9999))


@pytest.mark.parametrize("leaf", [object(), lambda x: x, np.array([object()]),
                                  np.array(["a", "b"])])
def test_unsupported_leaves_write_nothing(tmp_path, leaf):
    with ocp.PyTreeCheckpointer() as ckptr, pytest.raises(UnsupportedLeafError) as err:
        ckptr.save(tmp_path / "c", {"ok": np.ones(2), "bad": leaf})
    assert os.listdir(tmp_path) == []
    # named as the caller knows it, not as the temporary directory that is gone
    assert str(err.value).startswith(f"{tmp_path / 'c'}: leaf 'bad'"), str(err.value)


def test_bad_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with ocp.StandardCheckpointer() as ckptr:
        with pytest.raises(InvalidArgumentError, match="not a directory"):
            ckptr.save(tmp_path / "file", {"a": np.ones(2)})
        with pytest.raises(InvalidArgumentError, match="is a file"):
            ckptr.save(tmp_path / "file" / "sub", {"a": np.ones(2)})
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        ocp.CheckpointManager(tmp_path / "file")
    with pytest.raises(InvalidArgumentError, match="is a file"):  # (was a CommitError)
        ocp.CheckpointManager(tmp_path / "file" / "run")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_unwritable_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with ocp.StandardCheckpointer() as ckptr, pytest.raises(NotWritableError):
            ckptr.save(ro / "c", {"a": np.ones(2)})
        # A manager's directory that has turned read-only since: its next save raises the
        # same, and what it holds still restores.
        subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
        with ocp.CheckpointManager(ro / "run") as mngr:
            mngr.save(1, args=ocp.args.StandardSave({"a": np.ones(2)}))
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with ocp.CheckpointManager(ro / "run") as mngr:
            with pytest.raises(NotWritableError, match="Read-only"):
                mngr.save(2, args=ocp.args.StandardSave({"a": np.zeros(2)}))
            assert mngr.all_steps() == [1]
            np.testing.assert_array_equal(mngr.restore(1)["a"], np.ones(2))
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_manager_bad_steps_and_args_leave_earlier_steps(tmp_path):
    state = {"a": np.arange(4)}
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        with pytest.raises(InvalidArgumentError):
            mngr.save(-1, args=ocp.args.StandardSave(state))
        for step in (1.5, "2", True):
            with pytest.raises(TypeError):
                mngr.save(step, args=ocp.args.StandardSave(state))
        # (a train state's step array of another kind: a bare TypeError about indices before)
        for step in (jnp.array([2]), jnp.array(2.0), np.array([2, 3])):
            for call in (lambda: mngr.save(step, args=ocp.args.StandardSave(state)),
                         lambda: mngr.restore(step)):
                with pytest.raises(InvalidTypeError, match=r"^step must be a non-negative "
                                   r"integer, got (Array|array)\("):
                    call()
        assert mngr.save(jnp.array(2, jnp.int32), args=ocp.args.StandardSave(state))
        mngr.delete(2)
        with pytest.raises(InvalidArgumentError):
            mngr.save(2, args={"a": 1})  # not CheckpointArgs
        with pytest.raises(HandlerError):
            mngr.save(2, args=ocp.args.JsonSave({"a": 1}))  # item locked to StandardSave
        with pytest.raises(UnsupportedLeafError):
            mngr.save(2, args=ocp.args.StandardSave({"a": object()}))
        with pytest.raises(StepNotFoundError):
            mngr.restore(7)
        assert mngr.all_steps() == [1]
        np.testing.assert_array_equal(mngr.restore(1)["a"], state["a"])
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_unsupported_orbax_options_raise_instead_of_being_ignored(tmp_path):
    with ocp.PyTreeCheckpointer() as ckptr:
        with pytest.raises(InvalidArgumentError, match="partial_update"):
            ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"a": np.ones(2)},
                                                                partial_update=True))
        ckptr.save(tmp_path / "c", {"a": np.ones(2)})
        with pytest.raises(InvalidArgumentError, match="legacy_transform_fn"):
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                item={"a": 0}, legacy_transform_fn=lambda *a: a))
        with pytest.raises(InvalidArgumentError, match=r"'\(\.\*\)' is a object, not an"):
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(
                item={"a": 0}, restore_args={"a": ocp.RestoreArgs()},
                transforms={r"(.*)": object()}))


def test_orbax_legacy_manager_constructor_refuses_what_it_cannot_take(tmp_path):
    # (what it takes is compared with Orbax in test_manager_vs_orbax.py)
    with pytest.raises(InvalidArgumentError, match=r"checkpointers\['state'\] is a object"):
        ocp.CheckpointManager(tmp_path / "a", {"state": object()})
    with pytest.raises(InvalidArgumentError, match="reserved key"):
        ocp.CheckpointManager(tmp_path / "b", {"metrics": ocp.PyTreeCheckpointer()})
    with pytest.raises(InvalidArgumentError, match="cannot be given with item_names"):
        ocp.CheckpointManager(tmp_path / "c", ocp.PyTreeCheckpointer(),
                              item_handlers=ocp.PyTreeCheckpointHandler())
    with pytest.raises(InvalidArgumentError, match="options given twice"):
        ocp.CheckpointManager(tmp_path / "d", ocp.CheckpointManagerOptions(),
                              ocp.CheckpointManagerOptions())
    assert not any(tmp_path.iterdir())
    with ocp.CheckpointManager(tmp_path / "e", item_handlers=ocp.PyTreeCheckpointHandler()) as m:
        with pytest.raises(InvalidArgumentError, match="not both"):
            m.save(1, args=ocp.args.PyTreeSave({"a": np.ones(2)}), items={"a": np.ones(2)})
    with ocp.CheckpointManager(tmp_path / "f") as m:  # (no handler to build args from)
        # (a tree given as the older items: the step, the directory, the key and the call)
        for call, kind in ((lambda: m.save(1, {"a": np.ones(2)}), "Save"),
                           (lambda: m.restore(1, {"a": np.ones(2)}), "Restore")):
            with pytest.raises(InvalidArgumentError) as ei:
                call()
            assert str(ei.value).startswith(f'step 1 of {tmp_path / "f"}: Unknown key "a": ')
            assert f"args=ocp.args.Standard{kind}(...)" in str(ei.value)
        with pytest.raises(InvalidArgumentError, match=r"^the latest step of .*/f: Unknown"):
            m.restore(None, {"a": np.ones(2)})
    with ocp.CheckpointManager(tmp_path / "g", item_names=("a", "b")) as m:
        with pytest.raises(InvalidArgumentError, match=r"^step 1 of .*/g: items for several"):
            m.save(1, [np.ones(2)])


def test_handlers_take_orbax_arguments_and_refuse_unknown_ones():
    ocp.PyTreeCheckpointHandler(None, use_ocdbt=True, use_zarr3=False, save_concurrent_gb=1,
                                restore_concurrent_gb=1, enable_pinned_host_transfer=False)
    ocp.StandardCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96)
    ocp.JsonCheckpointHandler("metrics", multiprocessing_options=ocp.options.MultiprocessingOptions())
    for handler in (ocp.PyTreeCheckpointHandler, ocp.StandardCheckpointHandler):
        with pytest.raises(TypeError, match="'use_ocbdt'"):  # (a misspelling)
            handler(use_ocbdt=True)


@pytest.mark.parametrize("handler", [ocp.PyTreeCheckpointHandler, ocp.StandardCheckpointHandler])
def test_a_host_memory_budget_is_a_positive_int_or_none(tmp_path, handler):
    """Refused when the handler is made, naming the option: a budget of 0 or less (every
    array was staged alone), a float, a bool, a string (taken, then failing the save with
    a bare TypeError). None is no budget; a NumPy int is an int."""
    name = handler.__name__
    for bad, error in ((0, InvalidArgumentError), (-1, InvalidArgumentError),
                       (1.5, InvalidTypeError), (True, InvalidTypeError),
                       ("1GB", InvalidTypeError)):
        with pytest.raises(error, match=rf"^{name}\(host_memory_budget_bytes={bad!r}\): must"):
            handler(host_memory_budget_bytes=bad)
    assert issubclass(InvalidTypeError, ValueError)
    for good in (None, 1, np.int64(1 << 20)):
        with ocp.AsyncCheckpointer(handler(host_memory_budget_bytes=good)) as ckptr:
            path = tmp_path / f"{name}-{good}"
            ckptr.save(path, {"a": np.arange(4), "b": np.ones(3)})
            out = ckptr.restore(path)
        np.testing.assert_array_equal(out["a"], np.arange(4))


@pytest.mark.parametrize("bad", ["{outside}", "../outside/s", "a/../../outside/s"])
def test_leaf_names_cannot_reach_outside_the_checkpoint(tmp_path, bad):
    """A tampered _METADATA of a checkpoint with one folder per array (Orbax's
    use_ocdbt=False) naming a path elsewhere: the restore refuses it rather than reading
    whatever array is there (Orbax 0.12.8 reads it)."""
    import json

    import orbax.checkpoint as orbax

    handler = orbax.PyTreeCheckpointHandler(use_ocdbt=False)
    orbax.Checkpointer(handler).save(tmp_path / "outside", {"s": np.arange(5) * 100})
    orbax.Checkpointer(handler).save(tmp_path / "ckpt", {"safe": np.arange(5)})
    doc = json.loads((tmp_path / "ckpt" / "_METADATA").read_text())
    entry = doc["tree_metadata"].pop("('safe',)")
    name = bad.format(outside=tmp_path / "outside" / "s")
    entry["key_metadata"][0]["key"] = name
    doc["tree_metadata"][str((name,))] = entry
    (tmp_path / "ckpt" / "_METADATA").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint"):
        ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt")
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint"):
        ocp.PyTreeCheckpointHandler().metadata(tmp_path / "ckpt")
    assert not ocp.verify(tmp_path / "ckpt").ok
    # (the same name in the msgpack file of Orbax's first format)
    (tmp_path / "ckpt" / "_METADATA").unlink()
    (tmp_path / "ckpt" / "checkpoint").write_bytes(ocp.msgpack_utils.msgpack_serialize(
        {name: ocp.utils.leaf_placeholder(name)}))
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint"):
        ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt")


def test_a_deleted_jax_array_is_refused_naming_the_step_item_and_leaf(tmp_path):
    # (it raised jax's bare RuntimeError, naming nothing)
    gone = jnp.arange(4.0) + 1
    gone.delete()
    with ocp.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(UnsupportedLeafError, match=r"/7/default: leaf 'params\.w' .*deleted"):
            mngr.save(7, args=ocp.args.StandardSave({"params": {"w": gone}, "b": np.ones(2)}))
        assert mngr.all_steps() == [] and not (tmp_path / "7").exists()


def test_a_tree_nested_past_the_limit_is_refused_at_save_not_at_the_commit(tmp_path):
    # (save() returned True and the commit failed: msgspec's encoder ran out of recursion)
    from ckpt_async._tree import MAX_DEPTH

    def nested(depth):
        tree = np.arange(2)
        for _ in range(depth):
            tree = {"k": tree}
        return tree

    with ocp.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(InvalidArgumentError, match=rf"/1/default: .* at most {MAX_DEPTH}"):
            mngr.save(1, args=ocp.args.StandardSave(nested(MAX_DEPTH + 50)))
        assert mngr.save(2, args=ocp.args.StandardSave(nested(MAX_DEPTH)))
        mngr.wait_until_finished()
        out = mngr.restore(2)
    for _ in range(MAX_DEPTH):
        out = out["k"]
    np.testing.assert_array_equal(out, np.arange(2))


def test_numpy_integer_keys_are_saved_as_the_ints_they_equal(tmp_path):
    # (keys from np.unique were refused; Orbax saves them)
    tree = {"per_class": {k: np.full(2, k) for k in np.unique(np.array([3, 1, 3]))}}
    out = _round_trip(tmp_path / "c", tree)
    assert list(out["per_class"]) == [1, 3]
    assert all(type(k) is int for k in out["per_class"])
    np.testing.assert_array_equal(out["per_class"][np.int64(3)], np.full(2, 3))


def test_an_item_saved_as_a_tree_is_not_restored_as_an_array(tmp_path):
    # (a bare KeyError: 'checkpoint', naming nothing)
    tree = {"params": {"w": np.ones(2)}, "step": 3}
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.StandardSave(tree))
    tree_error = r"/run/1/default: the item is a tree \(leaves: params/w, step\).*StandardRestore"
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for args in (ocp.args.ArrayRestore(), ocp.args.ArrayRestore(np.ones(2))):
            with pytest.raises(StructureMismatchError, match=tree_error):
                mngr.restore(1, args=args)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
    with ocp.Checkpointer(ocp.ArrayCheckpointHandler()) as ckptr:
        with pytest.raises(StructureMismatchError, match=r"/c: the item is a tree"):
            ckptr.restore(tmp_path / "c")
        ckptr.save(tmp_path / "a", np.arange(3))
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "a"), np.arange(3))


def test_a_leading_tilde_is_the_home_directory(tmp_path, monkeypatch):
    # (a directory named '~' was made in the working directory)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    with ocp.CheckpointManager("~/run") as mngr:
        assert mngr.directory == home / "run"
        mngr.save(1, args=ocp.args.StandardSave({"a": np.arange(3)}))
    with ocp.CheckpointManager(Path("~/run")) as mngr:
        np.testing.assert_array_equal(mngr.restore(1)["a"], np.arange(3))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save("~/c", {"a": np.arange(2)})
        np.testing.assert_array_equal(ckptr.restore("~/c")["a"], np.arange(2))
    assert sorted(os.listdir(home)) == ["c", "run"] and os.listdir(cwd) == []


@pytest.mark.parametrize("make, message", [
    (lambda: ocp.CheckpointManagerOptions(save_interval_steps=0), "save_interval_steps .* got 0"),
    (lambda: ocp.CheckpointManagerOptions(save_interval_steps=-2), "save_interval_steps .* got -2"),
    (lambda: ocp.CheckpointManagerOptions(keep_period=0), "keep_period .* got 0"),
    (lambda: ocp.CheckpointManagerOptions(keep_period=-3), "keep_period .* got -3"),
    (lambda: ocp.AsyncOptions(timeout_secs=0), "timeout_secs .* got 0"),
    (lambda: ocp.AsyncOptions(timeout_secs=-1.5), r"timeout_secs .* got -1\.5"),
    (lambda: ocp.StandardCheckpointer(async_options=ocp.AsyncOptions(timeout_secs=0)),
     "timeout_secs .* got 0")])
def test_options_without_meaning_are_refused_at_construction(make, message):
    # (0 failed the first save or the cleanup after it, ZeroDivisionError for the interval;
    # a negative interval acted as its absolute value; a commit timed out at once)
    with pytest.raises(InvalidArgumentError, match=message):
        make()


def test_options_that_are_left_alone_still_construct(tmp_path):
    ocp.CheckpointManagerOptions(save_interval_steps=None, keep_period=None)
    ocp.AsyncOptions(timeout_secs=None)
    read_only = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=5)
    assert read_only.save_interval_steps == 0  # (set by read_only, as in Orbax)
    with ocp.CheckpointManager(tmp_path, options=read_only) as mngr:
        assert mngr.all_steps() == []



def test_save_interval_steps_is_ignored_beside_should_save_fn(tmp_path):
    # (Orbax documents save_interval_steps as ignored when should_save_fn is given: 0 there
    # was refused, where Orbax saves as should_save_fn decides)
    opts = ocp.CheckpointManagerOptions(save_interval_steps=0,
                                        should_save_fn=lambda step, _latest=None: step % 2 == 0)
    with ocp.CheckpointManager(tmp_path, options=opts) as mngr:
        saved = [mngr.save(s, args=ocp.args.StandardSave({"a": np.arange(3)})) for s in range(4)]
        mngr.wait_until_finished()
        assert saved == [True, False, True, False] and mngr.all_steps() == [0, 2]


def test_save_interval_steps_is_ignored_beside_a_save_decision_policy(tmp_path):
    # (Orbax's manager decides by the policy alone, so save_interval_steps=0 there is taken
    # and never used; it was refused, as if no policy had been given)
    policy = ocp.checkpoint_managers.FixedIntervalPolicy(2)
    opts = ocp.CheckpointManagerOptions(save_interval_steps=0, save_decision_policy=policy)
    assert opts.save_interval_steps == 0
    with ocp.CheckpointManager(tmp_path, options=opts) as mngr:
        saved = [mngr.save(s, args=ocp.args.StandardSave({"a": np.arange(3)})) for s in range(4)]
        mngr.wait_until_finished()
        assert saved == [True, False, True, False] and mngr.all_steps() == [0, 2]
    import orbax.checkpoint as orbax_ocp  # (Orbax takes the same options)

    orbax_opts = orbax_ocp.CheckpointManagerOptions(
        save_interval_steps=0,
        save_decision_policy=orbax_ocp.checkpoint_managers.FixedIntervalPolicy(2))
    assert orbax_opts.save_interval_steps == 0


def test_keep_period_of_zero_is_ignored_beside_a_preservation_policy(tmp_path):
    # (as in Orbax, whose clash check is on truthiness: keep_period=0 beside a policy was
    # refused, where Orbax keeps what the policy keeps; a non-zero one still clashes)
    policy = ocp.checkpoint_managers.LatestN(2)
    opts = ocp.CheckpointManagerOptions(keep_period=0, preservation_policy=policy)
    with ocp.CheckpointManager(tmp_path / "run", options=opts) as mngr:
        for step in range(4):
            mngr.save(step, args=ocp.args.StandardSave({"a": np.arange(3)}))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]
    with pytest.raises(InvalidArgumentError, match="keep_period"):
        ocp.CheckpointManager(tmp_path / "other", options=ocp.CheckpointManagerOptions(
            keep_period=-3, preservation_policy=policy))


@pytest.mark.parametrize("name", ["_CHECKPOINT_METADATA", "_CKPT_ASYNC", "commit_success.txt"])
def test_an_item_cannot_take_the_name_of_a_file_of_the_step(tmp_path, name):
    # (its folder was written, then the commit failed: "Is a directory")
    items = {name: ocp.args.StandardSave({"a": np.ones(2)}), "ok": ocp.args.JsonSave({"x": 1})}
    message = rf"/run/3: item name '{name}' is reserved"
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        with pytest.raises(InvalidArgumentError, match=message):
            mngr.save(3, args=ocp.args.Composite(**items))
        assert mngr.all_steps() == [] and os.listdir(tmp_path / "run") == []
        items.pop(name)
        mngr.save(4, args=ocp.args.Composite(**items))  # (the manager goes on)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        with pytest.raises(InvalidArgumentError, match=rf"/c: item name '{name}' is reserved"):
            ckptr.save(tmp_path / "c", ocp.args.Composite(**{name: ocp.args.JsonSave({})}))
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert sorted(os.listdir(tmp_path / "run")) == ["4"]


@pytest.mark.parametrize("metrics", [None, {"loss": 0.5}])
def test_an_item_named_metrics_is_refused_when_best_fn_ranks_the_metrics(tmp_path, metrics):
    # (with metrics given, the item was replaced by them and lost, as Orbax does; without,
    # the item was read back as the step's metrics and ranked by best_fn)
    opts = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    items = {"metrics": ocp.args.JsonSave({"mine": 1}),
             "state": ocp.args.StandardSave({"a": np.ones(2)})}
    with ocp.CheckpointManager(tmp_path, options=opts) as mngr:
        with pytest.raises(InvalidArgumentError,
                           match=r"step 1 of .*: item 'metrics' is the manager's own"):
            mngr.save(1, args=ocp.args.Composite(**items), metrics=metrics)
        assert mngr.all_steps() == [] and os.listdir(tmp_path) == []
    with ocp.CheckpointManager(tmp_path / "plain") as mngr:  # (no best_fn: an item as any)
        mngr.save(1, args=ocp.args.Composite(**items), metrics=metrics)
        assert mngr.restore(1)["metrics"] == {"mine": 1}


def test_an_args_class_or_a_tree_given_for_args_names_the_call_to_make(tmp_path):
    # (the manager said "found type" / "found dict" or "dict is not a checkpoint args type";
    # a checkpointer saved the class as a leaf, or restored it as a target)
    state = {"a": np.arange(3)}
    cls = r"args is the class ocp\.args\.{}, not an instance of it; pass ocp\.args\.{}\({}\)"
    tree = r"args is a builtins\.dict, not checkpoint args; .* e\.g\. {}"
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        with pytest.raises(InvalidTypeError, match="step 1 of .*/run: " + cls.format(
                "StandardSave", "StandardSave", "state")):
            mngr.save(1, args=ocp.args.StandardSave)
        with pytest.raises(InvalidTypeError, match="step 1 of .*/run: " + tree.format(
                r"ocp\.args\.StandardSave\(state\)")):
            mngr.save(1, args=state)
        mngr.save(1, args=ocp.args.StandardSave(state))
        with pytest.raises(InvalidTypeError, match="step 1 .*" + cls.format(
                "StandardRestore", "StandardRestore", "")):
            mngr.restore(1, args=ocp.args.StandardRestore)
        with pytest.raises(InvalidTypeError, match="step 1 .*" + tree.format(
                r"ocp\.args\.StandardRestore\(state\)")):
            mngr.restore(1, args=state)
    with ocp.CheckpointManager(tmp_path / "multi", item_names=("s",)) as mngr:
        with pytest.raises(InvalidTypeError, match=r"/multi/1: item 's': " + cls.format(
                "StandardSave", "StandardSave", "state")):
            mngr.save(1, args=ocp.args.Composite(s=ocp.args.StandardSave))
        with pytest.raises(InvalidTypeError, match=r"step 1 .*" + tree.format(
                r"ocp\.args\.Composite\(name=ocp\.args\.StandardSave\(state\), \.\.\.\)")):
            mngr.save(1, args=state)
    with ocp.StandardCheckpointer() as ckptr:
        with pytest.raises(InvalidTypeError, match="/c: " + cls.format(
                "StandardSave", "StandardSave", "state")):
            ckptr.save(tmp_path / "c", args=ocp.args.StandardSave)
        ckptr.save(tmp_path / "c", state)
        with pytest.raises(InvalidTypeError, match="/c: " + cls.format(
                "StandardRestore", "StandardRestore", "")):
            ckptr.restore(tmp_path / "c", args=ocp.args.StandardRestore)
    assert sorted(os.listdir(tmp_path)) == ["c", "multi", "run"]
    assert os.listdir(tmp_path / "run") == ["1"] and os.listdir(tmp_path / "multi") == []


def test_a_file_where_a_checkpoint_directory_is_expected_is_named(tmp_path):
    # (CheckpointNotFoundError: "does not exist"; the manager's StepNotFoundError the same;
    # an item's folder replaced by a file came back None)
    (tmp_path / "file").write_text("x")
    with ocp.StandardCheckpointer() as ckptr:
        for read in (ckptr.restore, ckptr.metadata):
            with pytest.raises(InvalidArgumentError, match=r"/file is a file, not a checkpoint"):
                read(tmp_path / "file")
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave({"a": np.arange(2)}))
    shutil.rmtree(tmp_path / "run" / "2")
    (tmp_path / "run" / "2").write_text("x")
    shutil.rmtree(tmp_path / "run" / "1" / "default")
    (tmp_path / "run" / "1" / "default").write_text("x")
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        assert mngr.all_steps() == [1]  # (a file is no step, as in Orbax)
        with pytest.raises(InvalidArgumentError, match=r"step 2 of .*/run: .*/run/2 is a file"):
            mngr.restore(2)
        with pytest.raises(CorruptCheckpointError,
                           match=r"/run/1/default: item 'default' is a file"):
            mngr.restore(1)
    with ocp.CheckpointManager(tmp_path / "run", item_names=("default",)) as mngr:
        with pytest.raises(CorruptCheckpointError, match=r"item 'default' is a file"):
            mngr.restore(1, args=ocp.args.Composite(default=ocp.args.StandardRestore()))


def test_args_of_the_other_item_mode_are_refused_with_the_mode_and_the_call_to_make(tmp_path):
    # (Orbax's messages alone, which name neither the step, the mode's cause nor the fix)
    state = {"a": np.arange(2)}
    single = r"single-item mode \({}\): pass the item's args alone, args=ocp\.args\.{}\(\.\.\.\)"
    multi = (r"multi-item mode \({}\): pass args=ocp\.args\.Composite\({}=ocp\.args\.{}\(\.\.\.\), "
             r"\.\.\.\)")
    with ocp.CheckpointManager(tmp_path / "s") as mngr:
        mngr.save(1, args=ocp.args.StandardSave(state))
        with pytest.raises(InvalidArgumentError, match=r"step 2 of .*/s: Cannot provide .*" +
                           single.format("its first save, of step 1, was given StandardSave "
                                         "args", "StandardSave")):
            mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    with ocp.CheckpointManager(tmp_path / "s") as mngr:
        with pytest.raises(InvalidArgumentError, match=r"step 1 of .*/s: .*" + single.format(
                "step 1, the first it read, holds item 'default'", "StandardRestore")):
            mngr.restore(1, args=ocp.args.Composite(default=ocp.args.StandardRestore()))
    with ocp.CheckpointManager(tmp_path / "m", item_names=("state", "extra")) as mngr:
        with pytest.raises(InvalidArgumentError, match=r"step 1 of .*/m: Must provide .*" +
                           multi.format(r"it was built with the items \['extra', 'state'\]",
                                        "extra", "StandardSave")):
            mngr.save(1, args=ocp.args.StandardSave(state))
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             extra=ocp.args.JsonSave({})))
        # (the item these args are for, once the items are locked: not 'extra', a JSON item)
        for args, item in ((ocp.args.StandardRestore(), "state"), (ocp.args.JsonRestore(), "extra")):
            with pytest.raises(InvalidArgumentError, match=multi.format(
                    r"it was built with the items \['extra', 'state'\]", item,
                    type(args).__name__)):
                mngr.restore(1, args=args)
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        with pytest.raises(InvalidArgumentError, match=multi.format(
                "step 1, the first it read, has no item 'default'", "name", "StandardRestore")):
            mngr.restore(1, args=ocp.args.StandardRestore())
        assert mngr.restore(1, args=ocp.args.Composite(extra=None))["extra"] == {}


def test_a_sharding_that_does_not_split_the_array_is_named_with_the_leaf(tmp_path, mesh):
    # (jax's IndivisibleError from inside the placement, naming no leaf; still a ValueError)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    split = NamedSharding(mesh, PartitionSpec("x"))  # (2 ways: 5 rows do not split)
    tree = {"params": {"w": np.arange(10.0).reshape(5, 2)}, "b": np.arange(4.0)}
    message = r"/c: key 'params\.w' of shape \(5, 2\): the sharding .* does not split it evenly"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split),
                              tree)
        with pytest.raises(ShardingMismatchError, match=message) as err:
            ckptr.restore(tmp_path / "c", target)
        assert isinstance(err.value, ValueError) and isinstance(err.value.__cause__, ValueError)
    with ocp.PyTreeCheckpointer() as ckptr:
        with pytest.raises(ShardingMismatchError, match=message):
            ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(restore_args={
                "params": {"w": ocp.ArrayRestoreArgs(sharding=split)},
                "b": ocp.ArrayRestoreArgs(sharding=split)}))
        out = ckptr.restore(tmp_path / "c", args=ocp.args.PyTreeRestore(restore_args={
            "params": {"w": ocp.ArrayRestoreArgs(sharding=split, global_shape=(6, 2),
                                                 strict=False)},
            "b": ocp.ArrayRestoreArgs(sharding=split)}))
    assert out["params"]["w"].sharding == split and out["params"]["w"].shape == (6, 2)
    np.testing.assert_array_equal(out["b"], tree["b"])
    # A manager's restore names the step's item directory (StandardRestore, PyTreeRestore).
    with ocp.CheckpointManager(tmp_path / "m", item_names=("std", "tree")) as mngr:
        mngr.save(1, args=ocp.args.Composite(std=ocp.args.StandardSave(tree),
                                             tree=ocp.args.PyTreeSave(tree)))
        mngr.wait_until_finished()
        for item, args in (("std", ocp.args.StandardRestore(target)), ("tree", ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))):
            with pytest.raises(ShardingMismatchError, match=message.replace("/c:", f"/m/1/{item}:")):
                mngr.restore(1, args=ocp.args.Composite(**{item: args}))


class _UnregisteredArgs(ocp.args.CheckpointArgs):
    """Args no handler is registered with."""


def _deserialize_in_another_shape(path):
    import asyncio

    import jax
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / "a")}}
    ts.open(spec, create=True, shape=[2], dtype=ts.int32).result()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    asyncio.run(ocp.serialization.async_deserialize(sharding, spec, global_shape=(3,)))


def _find_missing_step(path):
    ocp.path.step.standard_name_format().find_step(path, 3)


@pytest.mark.parametrize("call, error, builtin", [
    # (ocp.tree, ocp.transform_utils, ocp.msgpack_utils)
    (lambda p: ocp.tree.merge_trees({"a": 1}, {"a": 2}), InvalidArgumentError, ValueError),
    (lambda p: ocp.tree.merge_trees({"a": [1]}, {"a": [1, 2]}, overwrite=True),
     StructureMismatchError, ValueError),
    (lambda p: ocp.transform_utils.Transform(original_key="a", use_fallback=True),
     InvalidArgumentError, ValueError),
    (lambda p: ocp.transform_utils.apply_transformations(
        {"a": 1}, {"b": ocp.transform_utils.Transform(original_key="c")}, {"b": 0}),
     StructureMismatchError, ValueError),
    (lambda p: ocp.msgpack_utils.msgpack_serialize({"a": {1, 2}}), UnsupportedLeafError,
     ValueError),
    (lambda p: ocp.msgpack_utils.msgpack_restore(b"\xc1"), InvalidArgumentError, ValueError),
    (lambda p: ocp.msgpack_utils.msgpack_restore(b"\xd4\x01\x05"), InvalidTypeError, TypeError),
    # (ocp.type_handlers, ocp.serialization)
    (lambda p: ocp.type_handlers.get_type_handler(_UnregisteredArgs), InvalidArgumentError,
     ValueError),
    (lambda p: ocp.type_handlers.register_type_handler(int, object()), InvalidTypeError,
     TypeError),
    (lambda p: ocp.type_handlers.ArrayRestoreArgs(shape=(2,), global_shape=(3,)),
     InvalidArgumentError, ValueError),
    (_deserialize_in_another_shape, ShapeMismatchError, ValueError),
    # (ocp.path.step, ocp.metadata, ocp.multihost)
    (_find_missing_step, InvalidArgumentError, ValueError),
    (lambda p: ocp.path.step.get_save_directory(1, None), InvalidArgumentError, ValueError),
    (lambda p: ocp.metadata.get_step_metadata(p), InvalidArgumentError, ValueError),
    (lambda p: ocp.metadata.SingleDeviceShardingMetadata("nodevice:9").to_jax_sharding(),
     InvalidArgumentError, ValueError),
    (lambda p: ocp.multihost.get_barrier_sync_fn(processes=[5]), InvalidArgumentError,
     ValueError),
    # (args, preservation policies, handlers)
    (lambda p: ocp.args.get_registered_handler_cls(int), InvalidTypeError, TypeError),
    (lambda p: ocp.args.get_registered_handler_cls(_UnregisteredArgs), HandlerError,
     ValueError),
    (lambda p: ocp.checkpoint_managers.EveryNSteps(interval_steps=0).should_preserve(
        [], context=None), InvalidArgumentError, ValueError),
    (lambda p: ocp.PyTreeCheckpointHandler(no_such_option=1), InvalidTypeError, TypeError),
    (lambda p: ocp.StandardCheckpointHandler().save(p / "c", 1, 2, 3), InvalidTypeError,
     TypeError),
    (lambda p: ocp.aggregate_handlers.MsgpackHandler().deserialize(p / "c"),
     CheckpointNotFoundError, FileNotFoundError),
    # (ocp.utils, ocp.test_utils)
    (lambda p: ocp.utils.name_from_leaf_placeholder("params.w"), InvalidArgumentError,
     ValueError),
    (lambda p: ocp.utils.pytree_structure(p / "c"), CheckpointNotFoundError, FileNotFoundError),
    (lambda p: ocp.test_utils.print_directory(p / "c"), InvalidArgumentError, ValueError),
])
def test_errors_of_the_public_api_are_checkpoint_errors_and_orbaxs_builtins(tmp_path, call,
                                                                             error, builtin):
    # (each raised the bare builtin, outside the CheckpointError tree the guide promises)
    with pytest.raises(error) as err:
        call(tmp_path)
    assert type(err.value) is error
    assert isinstance(err.value, ocp.errors.CheckpointError) and isinstance(err.value, builtin)


@pytest.mark.parametrize("how", ["checkpointer", "pytree_save"])
def test_custom_metadata_that_is_no_json_is_refused_at_save_not_at_the_commit(tmp_path, how):
    # Refused before any array is written (it failed as a CommitError in the background,
    # after the data), naming the path, as the manager's check of its own custom_metadata does.
    tree = {"x": np.arange(4.0)}
    if how == "checkpointer":
        ckptr = ocp.StandardCheckpointer()
        save = lambda: ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(tree),  # noqa: E731
                                  custom_metadata={"o": object()})
    else:
        ckptr = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler())
        save = lambda: ckptr.save(  # noqa: E731
            tmp_path / "c", args=ocp.args.PyTreeSave(tree, custom_metadata={"s": {1, 2}}))
    with ckptr:
        with pytest.raises(UnsupportedLeafError, match=r"c: custom_metadata must be a JSON") as e:
            save()
        assert isinstance(e.value, TypeError)
        ckptr.wait_until_finished()
        assert os.listdir(tmp_path) == []  # nothing written, not even a temporary directory
        ckptr.save(tmp_path / "c", args=ocp.args.StandardSave(tree) if how == "checkpointer"
                   else ocp.args.PyTreeSave(tree))
        ckptr.wait_until_finished()
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "c")["x"], tree["x"])
