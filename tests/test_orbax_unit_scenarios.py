"""Scenarios of Orbax's own handler and checkpointer unit tests, run side by side with
orbax-checkpoint 0.12.8 (the reference): the same calls through each library's public API, on
the same trees, and the results compared (values bit for bit, types, shardings, exceptions).
Each test here is one place where ckpt_async answered differently, and was made to answer as
Orbax does. Real TensorStore on ``tmp_path``; nothing mocked."""

from __future__ import annotations

import asyncio
import json

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _checks import assert_bits_equal
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp

LIBS = {"ckpt_async": ocp, "orbax": orbax}


class MaskedNode(tuple):  # (optax's MaskedNode: a NamedTuple with no fields)
    __slots__ = ()
    _fields: tuple = ()

    def __new__(cls):
        return tuple.__new__(cls, ())


def _sharded_state(mesh):
    def put(a, spec):
        return jax.device_put(a, NamedSharding(mesh, spec))
    return {"a": put(np.arange(8, dtype=np.int32), PartitionSpec("x")),
            "b": put(np.arange(16, dtype=np.float32).reshape(4, 4), PartitionSpec("x", "y")),
            "c": {"a": put(np.arange(8, dtype=np.int32).reshape(2, 4), PartitionSpec(None, "y")),
                  "e": put(np.arange(4, dtype=np.float32) * 2.5, PartitionSpec())}}


def _masked(tree):
    """``tree`` with 'a' and 'c/e' masked, as optax masks a state (``optax.masked``)."""
    def mask(kp, x):
        keys = tuple(k.key for k in kp)
        return MaskedNode() if keys in (("a",), ("c", "e")) else x
    return jax.tree_util.tree_map_with_path(mask, tree)


@pytest.mark.parametrize("writer", ["orbax", "ckpt_async"])
@pytest.mark.parametrize("handler", ["pytree", "standard"])
def test_a_target_leaf_where_the_checkpoint_has_an_empty_node_comes_back_none(
        tmp_path, mesh, writer, handler):
    # A state saved with masked entries (optax.MaskedNode) restored with the full abstract
    # state as the target (Orbax's test_masked_shape_dtype_struct), or, in a pytree restore,
    # with restore args and no item: the masked entries come back None, as in Orbax.
    # ckpt_async gave the target's leaf back there: the ShapeDtypeStruct, or the
    # ArrayRestoreArgs itself.
    state = _sharded_state(mesh)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    w = LIBS[writer]
    if handler == "pytree":
        w.PyTreeCheckpointer().save(epath.Path(tmp_path / "c"), args=w.args.PyTreeSave(
            _masked(state)))
    else:
        ckptr = w.StandardCheckpointer()
        ckptr.save(epath.Path(tmp_path / "c"), _masked(state))
        ckptr.wait_until_finished()
    for lib in LIBS.values():
        h = lib.PyTreeCheckpointHandler() if handler == "pytree" else \
            lib.StandardCheckpointHandler()
        restore_args = jax.tree.map(lambda a: lib.ArrayRestoreArgs(sharding=a.sharding), state)
        if handler == "pytree":
            outs = [h.restore(epath.Path(tmp_path / "c"), args=lib.args.PyTreeRestore(
                        abstract, restore_args=restore_args)),
                    h.restore(epath.Path(tmp_path / "c"), args=lib.args.PyTreeRestore(
                        restore_args=restore_args))]
        else:
            outs = [h.restore(epath.Path(tmp_path / "c"), args=lib.args.StandardRestore(
                abstract))]
        for out in outs:
            assert out["a"] is None and out["c"]["e"] is None, (lib.__name__, out)
            assert_bits_equal(out["b"], state["b"])
            assert_bits_equal(out["c"]["a"], state["c"]["a"])
            assert out["b"].sharding == state["b"].sharding


def _legacy_handlers(lib, calls):
    """Handlers written to Orbax's older interface, with no args registered for them
    (Orbax's checkpointer tests' ``MyCheckpointHandler``): a synchronous one, and an
    asynchronous one. Each records the calls it gets in ``calls``."""
    class Legacy(lib.CheckpointHandler):
        def save(self, directory, item, extra_args=None):
            calls.append(("save", item, extra_args))
            (directory / "item.txt").write_text(repr(item))

        def restore(self, directory, item=None, extra_args=None):
            return ("restored", (directory / "item.txt").read_text(), item, extra_args)

    class LegacyAsync(lib.AsyncCheckpointHandler):
        async def async_save(self, directory, item, extra_args=None):
            calls.append(("async_save", item, extra_args))
            return []

        def save(self, directory, item, extra_args=None):
            calls.append(("save", item, extra_args))

        def restore(self, directory, item=None, extra_args=None):
            return ("restored", item, extra_args)

    return {"sync": Legacy, "async": LegacyAsync}


@pytest.mark.parametrize(("ckptr", "kind"), [("Checkpointer", "sync"), ("Checkpointer", "async"),
                                             ("AsyncCheckpointer", "async")])
def test_a_handler_with_no_registered_args_gets_the_checkpointers_arguments(
        tmp_path, ckptr, kind):
    # Orbax's checkpointers wrap a handler that has no CheckpointArgs registered and pass
    # save's and restore's arguments through to it (checkpointer_test_utils' test_legacy_api):
    # ckpt_async raised "needs explicit args= for save".
    results = {}
    for name, lib in LIBS.items():
        path = epath.Path(tmp_path / name / "ckpt")
        calls: list = []
        with getattr(lib, ckptr)(_legacy_handlers(lib, calls)[kind]()) as ck:
            ck.save(path, {"a": 1}, {"special_args": True})
            if ckptr == "AsyncCheckpointer":
                ck.wait_until_finished()
            results[name] = (
                [call[1:] for call in calls],  # (the sync Checkpointer: save, async_save in ours)
                json.loads((path / "_CHECKPOINT_METADATA").read_text())["item_handlers"],
                ck.restore(path),
                ck.restore(path, {"b": 2}, extra_args=3),
                ck.restore(path, item={"c": 4}),
                (path / "item.txt").exists())
    assert results["ckpt_async"] == results["orbax"]
    assert results["orbax"][0] == [({"a": 1}, {"special_args": True})]


def test_a_scalar_handler_of_ones_own_restores_python_scalars(tmp_path):
    # A ScalarHandler subclass in a handler's own type handler registry (Orbax's
    # test_local_registry) writes the ints; they come back as Python ints, as Orbax's
    # ScalarHandler gives them, also through ScalarHandler.deserialize itself. ckpt_async
    # gave NumPy scalars (np.int64(4)).
    out = {}
    for name, lib in LIBS.items():
        class PlusOne(lib.type_handlers.ScalarHandler):
            async def serialize(self, values, infos, args=None):
                return await super().serialize([v + 1 for v in values], infos, args)

        registry = lib.type_handlers.create_type_handler_registry((int, PlusOne()))
        handler = lib.PyTreeCheckpointHandler(type_handler_registry=registry)
        path = epath.Path(tmp_path / name)
        handler.save(path, args=lib.args.PyTreeSave({"a": 3, "b": [7, -2]}))
        handler.finalize(path)
        out[name] = handler.restore(path)
    # ScalarHandler on its own, read without restore args: a Python int too (ckpt_async's
    # own, on what it wrote).
    info = ocp.type_handlers.ParamInfo(name="seven", parent_dir=tmp_path / "own")
    asyncio.run(ocp.type_handlers.ScalarHandler().serialize([7], [info]))
    (seven,) = asyncio.run(ocp.type_handlers.ScalarHandler().deserialize([info]))
    assert type(seven) is int and seven == 7
    assert out["ckpt_async"] == out["orbax"] == {"a": 4, "b": [8, -1]}
    assert all(type(v) is int for v in jax.tree.leaves(out["ckpt_async"]))


def test_scalar_metadata_is_made_with_a_dtype_alone_and_gives_restore_args(mesh):
    # Orbax's checkpoint_utils test builds ScalarMetadata(name=..., directory=..., dtype=...)
    # (shape () and no sharding by default) and gives such a tree to
    # construct_restore_args; ckpt_async's ScalarMetadata wanted shape and sharding.
    out = {}
    for name, lib in LIBS.items():
        md = lib.metadata
        scalar = md.ScalarMetadata(name="", directory=None, dtype=np.int32)
        assert scalar.shape == () and scalar.sharding is None
        tree = {"a": scalar,
                "b": md.ArrayMetadata(name="", directory=None, shape=(2, 4), sharding=None,
                                      dtype=np.float64),
                "d": md.StringMetadata(name="", directory=None)}
        args = lib.checkpoint_utils.construct_restore_args(tree)
        out[name] = {k: (type(v).__name__, v.restore_type, v.dtype) for k, v in args.items()}
    assert out["ckpt_async"] == out["orbax"]
    assert out["orbax"]["a"] == ("RestoreArgs", int, np.int32)


@pytest.mark.parametrize("lib", [orbax, ocp], ids=["orbax", "ckpt_async"])
def test_a_handler_that_needs_arguments_is_refused_by_the_registry_with_a_value_error(lib):
    """Registering args whose handler class cannot be made without arguments (given as the
    class, or found from the args) is a ValueError naming the item; an instance registers."""

    class NeedsArgs(lib.handlers.JsonCheckpointHandler):
        def __init__(self, prefix):
            super().__init__()
            self.prefix = prefix

    registry = lib.handlers.DefaultCheckpointHandlerRegistry()
    with pytest.raises(ValueError, match="state"):
        registry.add("state", lib.args.JsonSave, NeedsArgs)
    registry.add("state", lib.args.JsonSave, NeedsArgs("x"))
    assert registry.get("state", lib.args.JsonSave).prefix == "x"
    if lib is ocp:
        with pytest.raises(ocp.errors.HandlerError, match="NeedsArgs cannot be made"):
            ocp.handlers.DefaultCheckpointHandlerRegistry().add("s", ocp.args.JsonSave,
                                                               NeedsArgs)


@pytest.mark.parametrize("lib", [orbax, ocp], ids=["orbax", "ckpt_async"])
def test_the_first_args_registered_with_a_handler_stay_its_args(lib):
    """Args of one's own registered with a handler that has args already (here a built-in
    one) are taken for that handler, but the handler's registered args stay the first."""

    @lib.args.register_with_handler(lib.StandardCheckpointHandler, for_save=True)
    class MyStandardSave(lib.args.StandardSave):
        pass

    assert lib.args.get_registered_handler_cls(MyStandardSave) is lib.StandardCheckpointHandler
    assert lib.args.get_registered_args_cls(lib.StandardCheckpointHandler) == (
        lib.args.StandardSave, lib.args.StandardRestore)


@pytest.mark.parametrize("named", [False, True])
def test_a_manager_of_checkpointers_of_handlers_with_no_registered_args(tmp_path, named):
    # Orbax's older CheckpointManager(directory, checkpointers) takes a checkpointer of such a
    # handler (its wrapper) as an item's handler, one or by name: ckpt_async's wrapper was no
    # CheckpointHandler, and the manager took a single one for a dict of them (AttributeError:
    # no attribute 'items').
    results = {}
    for name, lib in LIBS.items():
        calls: list = []
        ckptr = lib.Checkpointer(_legacy_handlers(lib, calls)["sync"]())
        with lib.CheckpointManager(epath.Path(tmp_path / name), {"x": ckptr} if named
                                   else ckptr) as mngr:
            mngr.save(0, {"x": {"a": 1}} if named else {"a": 1})
            mngr.wait_until_finished()
            restored = mngr.restore(0)
            results[name] = ([call[1:] for call in calls], mngr.all_steps(),
                             dict(restored) if named else restored)
    assert results["ckpt_async"] == results["orbax"]
    assert results["orbax"][0] == [({"a": 1}, None)]
