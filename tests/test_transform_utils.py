"""ocp.transform_utils: tree transformations in memory, each case run beside orbax-checkpoint
0.12.8 and compared, and the smaller Orbax names code imports."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest

import ckpt_async as ocp
from ckpt_async.errors import InvalidArgumentError

ORIGINAL = {"enc": {"w": 1, "b": 2}, "dec": {"w": 3, "b": 4}, "step": 5, "extra": 6}


def _cases(lib):
    t = lib.transform_utils.Transform
    new = {"encoder": {"w": 0, "b": 0}, "dec": {"w": 0, "b": 0}, "step": 0, "fresh": 9,
           "double": 0}
    return {
        "regex rename": ({r"encoder/(.*)": t(original_key=r"enc/\1")}, new, True),
        "value_fn and multi_value_fn": (
            {"encoder/w": t(original_key="enc/w", value_fn=lambda v: v * 10),
             "double": t(multi_value_fn=lambda key, tree: tree["step"] * 2)},
            {"encoder": {"w": 0}, "double": 0, "step": 0}, True),
        "fallback, new by default": ({"step": t(use_fallback=True)},
                                     {"step": 0, "dec": {"w": 0}}, False),
        "fallback, original by default": ({"step": t(use_fallback=True)},
                                          {"step": 0, "dec": {"w": 0}}, True),
        "later rule wins": ({r"dec/.*": t(original_key="extra"), "dec/w": t(original_key="step")},
                            {"dec": {"w": 0, "b": 0}}, True),
    }


@pytest.mark.parametrize("case", list(_cases(ocp)))
def test_apply_transformations_gives_what_orbax_gives(case):
    outcomes = {}
    for name, lib in (("ckpt_async", ocp), ("orbax", orbax)):
        transforms, new, default = _cases(lib)[case]
        outcomes[name] = lib.transform_utils.apply_transformations(
            ORIGINAL, transforms, new, default_to_original=default)
    assert outcomes["ckpt_async"] == outcomes["orbax"]


def test_apply_transformations_refuses_what_orbax_refuses():
    for lib in (ocp, orbax):
        t = lib.transform_utils.Transform
        with pytest.raises(ValueError):
            lib.transform_utils.apply_transformations(
                ORIGINAL, {"x": t(original_key="missing")}, {"x": 0})
    # Arguments that exclude each other: InvalidArgumentError naming them, where Orbax's fail
    # an assert (see migration.md)
    for kwargs in ({"original_key": "a", "use_fallback": True},
                   {"value_fn": abs, "multi_value_fn": max}, {"use_fallback": True, "value_fn": abs}):
        with pytest.raises(InvalidArgumentError, match="exclude each other"):
            ocp.Transform(**kwargs)
        with pytest.raises(AssertionError):
            orbax.Transform(**kwargs)
    with pytest.raises(InvalidArgumentError, match="needs multi_value_fn"):
        ocp.RestoreTransform(multi_value_fn_input_args={"a": None})
    with pytest.raises(AssertionError):
        orbax.RestoreTransform(multi_value_fn_input_args={"a": None})
    assert ocp.apply_transformations is ocp.transform_utils.apply_transformations
    assert issubclass(ocp.RestoreTransform, ocp.Transform)


@dataclasses.dataclass
class _Fields:
    a: object = None
    b: object = None


jax.tree_util.register_dataclass(_Fields, data_fields=["a", "b"], meta_fields=[])


@pytest.mark.parametrize("new", [_Fields(), {"a": None}, [None], {}, [], None],
                         ids=["dataclass of Nones", "dict of None", "list of None", "{}", "[]",
                              "None"])
def test_a_new_tree_without_leaves_as_orbax(new):
    # Orbax returns {} for a new tree of no leaves only where it is empty itself ({}, [],
    # None); a dataclass whose fields are all None comes back as itself. ckpt_async gave {}
    # for any node but a non-empty dict, list or tuple.
    ours = ocp.transform_utils.apply_transformations({"a": 1}, {}, new)
    theirs = orbax.transform_utils.apply_transformations({"a": 1}, {}, new)
    assert type(ours) is type(theirs) and ours == theirs


def test_intersect_and_merge_trees_as_orbax():
    a = {"a": {"w": 1, "b": 2}, "c": 3, "only_a": 4}
    b = {"a": {"w": 10, "b": 20}, "c": 30, "only_b": 5}
    for fn in ("intersect_trees", "merge_trees"):
        ours, theirs = (getattr(lib.transform_utils, fn)(a, b) for lib in (ocp, orbax))
        assert ours == theirs, fn
    target = {"a": {"w": None, "b": None}, "c": None}
    assert ocp.transform_utils.intersect_trees(a, b, target=target) == \
        orbax.transform_utils.intersect_trees(a, b, target=target)


def test_value_metadata_shares_orbaxs_base_class(tmp_path):
    tree = {"w": np.ones(3, np.float32), "s": "text", "n": 4}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        meta = ckptr.metadata(tmp_path / "c").item_metadata.tree
    assert all(isinstance(leaf, ocp.metadata.Metadata) for leaf in meta.values())
    assert not isinstance(tree["w"], ocp.metadata.Metadata)


def test_a_missing_item_of_a_restored_composite_is_a_key_error(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": np.ones(2)})))
        out = mngr.restore(1)
    with pytest.raises(KeyError, match="cfg"):  # (Orbax raises KeyError for both)
        out.cfg
    assert not hasattr(out, "cfg") and hasattr(out, "state")


def test_options_and_setup_calls_orbax_code_makes(tmp_path):
    # A Windows workaround, MaxText's setup after jax.distributed.initialize(), a checkpointer's
    # older positional timeout, and the default timeout, as in Orbax.
    with ocp.StandardCheckpointer(atomicity_options=ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE)) as ckptr:
        assert ckptr.async_checkpointer.async_options.timeout_secs == \
            orbax.AsyncOptions().timeout_secs == 1200
    with ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler(), 50) as ckptr:
        assert ckptr.async_checkpointer.async_options.timeout_secs == 50
    assert ocp.options.MemoryLimitOptions(max_transfer_concurrent_gb=4).max_transfer_concurrent_gb
    ocp.CompositeCheckpointHandler("a", composite_options=ocp.CompositeOptions())
    assert ocp.multihost.initialize_runtime_to_distributed_ids() is None
    assert ocp.multihost.initialize_distributed_to_device_ids() is None  # (MaxText's next call)
    assert ocp.multihost.is_distributed_to_device_ids_initialized() is True
    # flax's checkpoints.restore_checkpoint reads a checkpointer's private _handler; octo's
    # save_pretrained reads a manager's _directory.
    assert ocp.PyTreeCheckpointer()._handler.__class__ is ocp.PyTreeCheckpointHandler
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        assert mngr._directory == mngr.directory
    assert ocp.multihost.is_pathways_backend() is ocp.utils.is_pathways_backend() is False
    with pytest.raises(ocp.errors.InvalidArgumentError):
        ocp.args.Composite(**{"a/b": ocp.args.StandardSave({"x": 1})})


def test_smaller_names_orbax_code_imports():
    assert ocp.DefaultCheckpointHandlerRegistry is ocp.handlers.DefaultCheckpointHandlerRegistry
    assert ocp.checkpoint_manager.METADATA_ITEM_NAME == \
        orbax.checkpoint_manager.METADATA_ITEM_NAME
    assert ocp.utils.reached_preemption(0) is ocp.multihost.reached_preemption(0) is False
    for value in (1, 2.5, np.float32(1), "x", None, np.ones(2)):
        assert ocp.utils.is_scalar(value) == orbax.utils.is_scalar(value)
    import jax

    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, {"b": 2}]})[0]]
    assert [ocp.utils.tuple_path_from_keypath(p) for p in paths] == \
        [orbax.utils.tuple_path_from_keypath(p) for p in paths]
    assert str(ocp.utils.get_save_directory(3, "/ck", "state", step_prefix="s")) == \
        str(orbax.utils.get_save_directory(3, "/ck", "state", step_prefix="s"))
