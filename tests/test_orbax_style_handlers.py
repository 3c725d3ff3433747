"""Handlers written to Orbax's interface (synchronous ``save`` / ``restore`` / ``metadata`` /
``finalize``, or ``async_save`` returning futures), as grain's data-iterator handler and
Orbax's custom-handler guide write them, in ckpt_async's checkpointers and managers, and
side by side with orbax-checkpoint 0.12.8 on the same files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import threading

import jax
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _checks import assert_bits_equal, files_under
from _timeout import in_thread

import ckpt_async as ocp
from ckpt_async import _ocdbt


class Iterator:
    def __init__(self, pos: int = 0) -> None:
        self.pos = pos


class GrainLikeHandler:
    """Duck-typed, as grain's PyGrainCheckpointHandler: no base class at all."""

    def save(self, directory, item=None, args=None):
        item = item or args.item
        (directory / "process_0-of-1.json").write_text(json.dumps({"pos": item.pos}))

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        item.pos = json.loads((directory / "process_0-of-1.json").read_text())["pos"]
        return item

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        (directory / "finalized").write_text("yes")

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f"{cls.__module__}.{cls.__qualname__}"


def _args_for(lib, handler_cls):
    """A save and a restore args class of ``lib`` for ``handler_cls``, as such handlers'
    authors register them."""
    @lib.args.register_with_handler(handler_cls, for_save=True)
    @dataclasses.dataclass
    class Save(lib.args.CheckpointArgs):
        item: object = None

    @lib.args.register_with_handler(handler_cls, for_restore=True)
    @dataclasses.dataclass
    class Restore(lib.args.CheckpointArgs):
        item: object = None

    return Save, Restore


GRAIN_ARGS = {lib: _args_for(lib, GrainLikeHandler) for lib in (ocp, orbax)}


@pytest.mark.parametrize(("writer", "reader"), [("ckpt_async", "ckpt_async"),
                                                ("ckpt_async", "orbax"), ("orbax", "ckpt_async")])
def test_a_duck_typed_handler_serves_an_item_of_a_manager(tmp_path, writer, reader):
    libs = {"ckpt_async": ocp, "orbax": orbax}
    w, r = libs[writer], libs[reader]
    save, _ = GRAIN_ARGS[w]
    with w.CheckpointManager(tmp_path, item_names=("state", "iter")) as mngr:
        mngr.save(1, args=w.args.Composite(state=w.args.StandardSave({"a": np.arange(3)}),
                                           iter=save(Iterator(7))))
    step = tmp_path / "1"
    assert json.loads((step / "iter" / "process_0-of-1.json").read_text()) == {"pos": 7}
    assert (step / "iter" / "finalized").read_text() == "yes"
    recorded = json.loads((step / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert recorded["iter"] == GrainLikeHandler.typestr()
    _, restore = GRAIN_ARGS[r]
    with r.CheckpointManager(tmp_path, item_names=("state", "iter")) as mngr:
        out = mngr.restore(1, args=r.args.Composite(state=r.args.StandardRestore(),
                                                    iter=restore(Iterator())))
    assert out["iter"].pos == 7
    np.testing.assert_array_equal(out["state"]["a"], np.arange(3))


class GuideHandler(ocp.CheckpointHandler):
    """Orbax's custom-handler guide: a subclass with synchronous methods."""

    def save(self, directory, args):
        (directory / "doc.json").write_text(json.dumps(args.item))

    def restore(self, directory, args=None):
        return json.loads((directory / "doc.json").read_text())

    def metadata(self, directory):
        return {"files": sorted(p.name for p in directory.iterdir())}


GuideSave, GuideRestore = _args_for(ocp, GuideHandler)


class GuideAsyncHandler(ocp.AsyncCheckpointHandler, GuideHandler):
    """The guide's asynchronous variant: async_save starts the write and returns its future."""

    release, written = threading.Event(), threading.Event()

    async def async_save(self, directory, args):
        def write():
            GuideAsyncHandler.release.wait(10)  # (still writing when save() returns)
            (directory / "doc.json").write_text(json.dumps(args.item))
            GuideAsyncHandler.written.set()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        return [pool.submit(write)]


def test_a_subclass_with_synchronous_methods_works_in_a_checkpointer(tmp_path):
    with ocp.Checkpointer(GuideHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=GuideSave({"a": 1}))
        assert ckptr.restore(tmp_path / "c", args=GuideRestore()) == {"a": 1}
        assert "doc.json" in ckptr.metadata(tmp_path / "c").item_metadata["files"]


def test_async_save_futures_are_waited_for_before_the_commit(tmp_path):
    assert issubclass(GuideAsyncHandler, ocp.CheckpointHandler)
    with ocp.AsyncCheckpointer(GuideAsyncHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=GuideSave({"b": 2}))
        assert not GuideAsyncHandler.written.is_set()  # (returned while the write runs)
        GuideAsyncHandler.release.set()
        ckptr.wait_until_finished()
        assert GuideAsyncHandler.written.is_set()
        assert ckptr.restore(tmp_path / "c", args=GuideRestore()) == {"b": 2}


def test_a_duck_typed_handler_serves_a_checkpointer(tmp_path):
    save, restore = GRAIN_ARGS[ocp]
    with ocp.Checkpointer(GrainLikeHandler()) as ckptr:
        ckptr.save(tmp_path / "it", args=save(Iterator(3)))
        assert ckptr.restore(tmp_path / "it", args=restore(Iterator())).pos == 3
    with pytest.raises(ocp.errors.InvalidArgumentError, match="not a CheckpointHandler"):
        ocp.Checkpointer(object())


# -- the built-in handlers called as Orbax's ----------------------------------------------------

TREE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": {"n": np.int64(7)}, "s": "hi"}


def _saved_step(tmp_path):
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(TREE),
                                             meta=ocp.args.JsonSave({"lr": 0.1})))
    return tmp_path / "run" / "1"


def _assert_tree(out):
    np.testing.assert_array_equal(out["w"], TREE["w"])
    assert out["w"].dtype == np.float32
    assert out["b"]["n"] == 7 and out["s"] == "hi"


@pytest.mark.parametrize("as_str", [True, False])
def test_builtin_handlers_methods_are_synchronous_outside_the_engine(tmp_path, as_str):
    step = _saved_step(tmp_path)
    state, meta = (str(step / n) if as_str else step / n for n in ("state", "meta"))
    tree = ocp.PyTreeCheckpointHandler().metadata(state).tree  # (as users of Orbax write it)
    assert tree["w"].shape == (3, 4) and tree["w"].dtype == np.float32
    _assert_tree(ocp.StandardCheckpointHandler().restore(state))
    _assert_tree(ocp.PyTreeCheckpointHandler().restore(state, ocp.args.PyTreeRestore()))
    assert ocp.JsonCheckpointHandler().restore(meta) == {"lr": 0.1}
    assert ocp.JsonCheckpointHandler().metadata(meta) is None
    with pytest.raises(ocp.errors.CheckpointNotFoundError, match="nowhere"):
        ocp.StandardCheckpointHandler().metadata(tmp_path / "nowhere")


def test_builtin_handlers_take_orbaxs_legacy_keywords(tmp_path):
    # As older Orbax code calls them: restore(directory=, item=, restore_args=), save(item=).
    (tmp_path / "item").mkdir()
    handler = ocp.PyTreeCheckpointHandler()
    handler.save(tmp_path / "item", item=TREE)
    ra = {"w": ocp.RestoreArgs(restore_type=np.ndarray), "b": {"n": ocp.RestoreArgs()},
          "s": ocp.RestoreArgs()}
    for lib in (ocp, orbax):
        out = lib.PyTreeCheckpointHandler().restore(
            directory=tmp_path / "item", item=TREE, transforms=None, restore_args=ra)
        assert isinstance(out["w"], np.ndarray) and out["s"] == "hi", lib
        np.testing.assert_array_equal(out["w"], TREE["w"])
    (tmp_path / "doc").mkdir()
    ocp.JsonCheckpointHandler().save(tmp_path / "doc", item={"k": [1, 2]})
    assert ocp.JsonCheckpointHandler().restore(tmp_path / "doc") == {"k": [1, 2]}
    assert orbax.JsonCheckpointHandler().restore(tmp_path / "doc") == {"k": [1, 2]}


def test_builtin_handlers_methods_are_synchronous_in_a_callers_event_loop(tmp_path):
    step = _saved_step(tmp_path)

    async def main():
        return ocp.StandardCheckpointHandler().metadata(step / "state").tree

    assert asyncio.run(main())["w"].shape == (3, 4)


def test_a_handlers_save_writes_an_item_orbax_reads(tmp_path):
    (tmp_path / "item").mkdir()
    handler = ocp.StandardCheckpointHandler()
    handler.save(tmp_path / "item", ocp.args.StandardSave(TREE))
    handler.finalize(tmp_path / "item")
    assert (tmp_path / "item" / "_METADATA").exists()
    _assert_tree(handler.restore(tmp_path / "item"))
    out = orbax.StandardCheckpointHandler().restore(tmp_path / "item")
    np.testing.assert_array_equal(out["w"], TREE["w"])


class Renaming(ocp.StandardCheckpointHandler):
    """A subclass of a built-in handler overriding its methods with synchronous ones that
    call the base class's, as Orbax users write them."""

    saved: list[str] = []

    def save(self, directory, args):
        Renaming.saved.append(directory.name)
        super().save(directory, args)

    def restore(self, directory, args=None):
        return {f"restored_{k}": v for k, v in super().restore(directory, args).items()}

    def metadata(self, directory):
        return sorted(super().metadata(directory).tree)


def test_a_subclass_calling_the_builtin_methods_serves_many_items_at_once(tmp_path):
    # More items than the runtime has pool threads: each subclass method waits for the base
    # method it calls, which needs pool threads of its own.
    names = [f"s{i}" for i in range(ocp._runtime.DEFAULT_THREADS + 2)]
    Renaming.saved.clear()

    def save_and_restore():
        with ocp.CheckpointManager(tmp_path, item_handlers={n: Renaming() for n in names}) as m:
            m.save(1, args=ocp.args.Composite(**{n: ocp.args.StandardSave(TREE) for n in names}))
            m.wait_until_finished()
            assert sorted(Renaming.saved) == sorted(names)
            assert m.item_metadata(1)[names[0]] == ["b", "s", "w"]
            return m.restore(1, args=ocp.args.Composite(
                **{n: ocp.args.StandardRestore() for n in names}))

    out = in_thread(save_and_restore)
    for n in names:
        _assert_tree({k.removeprefix("restored_"): v for k, v in out[n].items()})


def test_a_handler_method_called_from_a_done_callback_raises_rather_than_hangs(tmp_path):
    # A commit future's done callbacks run on the engine loop: a synchronous call there could
    # never finish, and a coroutine handed back would be dropped unawaited.
    seen = []

    def callback(_fut):
        try:
            seen.append(ocp.PyTreeCheckpointHandler().metadata(tmp_path / "1" / "default"))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            seen.append(exc)

    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.StandardSave(TREE))
        mngr.commit_future(1).add_done_callback(callback)
        mngr.wait_until_finished()
    assert len(seen) == 1 and isinstance(seen[0], ocp.errors.RuntimeUsageError)


class Wrapping(ocp.AsyncCheckpointHandler):
    """An Orbax-style handler delegating to a built-in one from its async_save and finalize."""

    finalized: list[str] = []

    def __init__(self):
        self._inner = ocp.StandardCheckpointHandler()

    async def async_save(self, directory, args):
        self._inner.save(directory, args=ocp.args.StandardSave(args.item))
        return []

    def restore(self, directory, args=None):
        return self._inner.restore(directory)

    def finalize(self, directory):
        Wrapping.finalized.append(directory.name)


WrapSave, WrapRestore = _args_for(ocp, Wrapping)


class FinalizingStandard(ocp.StandardCheckpointHandler):
    finalized: list[str] = []

    def finalize(self, directory):
        FinalizingStandard.finalized.append(directory.name)


def test_orbax_style_overrides_of_async_save_and_finalize_run(tmp_path):
    Wrapping.finalized.clear()
    FinalizingStandard.finalized.clear()
    with ocp.AsyncCheckpointer(Wrapping()) as ckptr:
        ckptr.save(tmp_path / "w", args=WrapSave(TREE))
        ckptr.wait_until_finished()
        _assert_tree(ckptr.restore(tmp_path / "w", args=WrapRestore()))
    assert Wrapping.finalized and (tmp_path / "w" / "_METADATA").exists()
    with ocp.AsyncCheckpointer(FinalizingStandard()) as ckptr:
        ckptr.save(tmp_path / "f", args=ocp.args.StandardSave(TREE))
        ckptr.wait_until_finished()
        _assert_tree(ckptr.restore(tmp_path / "f"))
    assert len(FinalizingStandard.finalized) == 1


def test_legacy_positional_arguments_are_taken_in_orbaxs_order(tmp_path):
    (tmp_path / "item").mkdir()
    handler = ocp.PyTreeCheckpointHandler()
    handler.save(tmp_path / "item", TREE)
    ra = {"w": ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.int32),
          "b": {"n": ocp.RestoreArgs()}, "s": ocp.RestoreArgs()}
    out = handler.restore(tmp_path / "item", TREE, ra)  # (item, restore_args)
    assert out["w"].dtype == np.int32  # (the restore args were taken, not dropped)
    theirs = orbax.PyTreeCheckpointHandler().restore(tmp_path / "item", TREE, ra)
    np.testing.assert_array_equal(out["w"], theirs["w"])
    with pytest.raises(TypeError):
        handler.restore(tmp_path / "item", TREE, ra, None, True, None, "one too many")


class KerasLike(ocp.AsyncCheckpointHandler):
    """As a Keras integration writes one: async_save awaits a built-in handler's async_save
    (with Orbax's legacy item=) and adds a future of its own."""

    def __init__(self):
        self._pytree = ocp.PyTreeCheckpointHandler()
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    async def async_save(self, directory, args):
        futures = await self._pytree.async_save(directory, item=args.item)
        return [*futures, self._pool.submit(
            lambda: (directory / "extra.json").write_text(json.dumps({"ok": True})))]

    def restore(self, directory, args=None):
        return self._pytree.restore(directory)


KerasSave, KerasRestore = _args_for(ocp, KerasLike)


def test_a_built_in_handlers_async_save_serves_a_wrapping_handler(tmp_path):
    with ocp.CheckpointManager(tmp_path, item_handlers={"model": KerasLike()}) as mngr:
        mngr.save(1, args=ocp.args.Composite(model=KerasSave(TREE)))
        mngr.wait_until_finished()
        _assert_tree(mngr.restore(1, args=ocp.args.Composite(model=KerasRestore()))["model"])
    assert json.loads((tmp_path / "1" / "model" / "extra.json").read_text()) == {"ok": True}
    # Called directly from the caller's own event loop, as Orbax's is:
    (tmp_path / "direct").mkdir()
    futures = asyncio.run(ocp.StandardCheckpointHandler().async_save(
        tmp_path / "direct", ocp.args.StandardSave(TREE)))
    for fut in futures:
        fut.result(timeout=60)
    _assert_tree(ocp.StandardCheckpointHandler().restore(tmp_path / "direct"))


@pytest.mark.parametrize("lib_name", ["ckpt_async", "orbax"])
def test_an_item_of_a_handler_registered_with_its_args_restores_without_args(tmp_path, lib_name):
    # A handler of one's own whose args are registered with it (register_with_handler) is
    # found from the type string _CHECKPOINT_METADATA records: a manager just opened restores
    # the item without args, handing the handler its restore args built with no arguments,
    # and then gives its item_metadata. ckpt_async knew only its built-in handlers' type
    # strings: the restore raised HandlerError (and item_metadata gave None).
    lib = {"ckpt_async": ocp, "orbax": orbax}[lib_name]

    @dataclasses.dataclass
    class CounterSave(lib.args.CheckpointArgs):
        item: int

    @dataclasses.dataclass
    class CounterRestore(lib.args.CheckpointArgs):
        offset: int = 100

    class CounterHandler(lib.CheckpointHandler):
        def save(self, directory, args):
            (directory / "count").write_text(str(args.item))

        def restore(self, directory, args=None):
            return int((directory / "count").read_text()) + args.offset

        def metadata(self, directory):
            return {"bytes": len((directory / "count").read_text())}

    lib.args.register_with_handler(CounterHandler, for_save=True)(CounterSave)
    lib.args.register_with_handler(CounterHandler, for_restore=True)(CounterRestore)
    with lib.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=lib.args.Composite(count=CounterSave(7)))
    with lib.CheckpointManager(tmp_path) as mngr:
        assert mngr.restore(1)["count"] == 107
        assert mngr.item_metadata(1)["count"] == {"bytes": 1}


@pytest.mark.parametrize("lib_name", ["ckpt_async", "orbax"])
def test_a_composite_handlers_metadata_is_the_steps(tmp_path, lib_name):
    # As Orbax's: CompositeCheckpointHandler().metadata(path) gives the step's StepMetadata,
    # its items' metadata in item_metadata; it gave the items' Composite alone.
    lib = {"ckpt_async": ocp, "orbax": orbax}[lib_name]
    with lib.Checkpointer(lib.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "c", args=lib.args.Composite(
            state=lib.args.StandardSave({"w": np.arange(4.0)}), cfg=lib.args.JsonSave([1])),
            custom_metadata={"run": 7})
        through_checkpointer = ckptr.metadata(tmp_path / "c")
    from etils import epath

    meta = lib.CompositeCheckpointHandler().metadata(epath.Path(tmp_path / "c"))
    assert isinstance(meta, lib.metadata.StepMetadata)
    assert set(meta.item_handlers) == {"state", "cfg"}
    assert meta.custom_metadata == {"run": 7}
    assert set(meta.item_metadata) == {"state", "cfg"}
    assert meta.item_metadata["cfg"] is None
    if lib is ocp:  # (Orbax's handler, told no item's handler, gives None for each)
        assert meta.item_metadata["state"].tree["w"].shape == (4,)
    assert set(through_checkpointer.item_metadata) == {"state", "cfg"}
    assert through_checkpointer.item_metadata["state"].tree["w"].shape == (4,)


#: Items saved twice into one directory: their handler, and the args of each save.
OVER_AN_ITEM = {
    "standard": (ocp.StandardCheckpointHandler,
                 lambda v: ocp.args.StandardSave({"w": np.full(3, v)})),
    "array": (ocp.ArrayCheckpointHandler, lambda v: ocp.args.ArraySave(np.full(3, v))),
    "composite": (ocp.CompositeCheckpointHandler, lambda v: ocp.args.Composite(
        cfg=ocp.args.JsonSave({"v": v}), state=ocp.args.StandardSave({"w": np.full(3, v)}))),
    "jax key": (ocp.JaxRandomKeyCheckpointHandler,
                lambda v: ocp.args.JaxRandomKeySave(jax.random.key(v))),
}


@pytest.mark.parametrize("how", ["save", "async_save"])
@pytest.mark.parametrize("case", list(OVER_AN_ITEM))
def test_a_direct_save_over_an_item_is_refused_before_anything_is_written(tmp_path, case, how):
    # Orbax's pytree handlers write over the item in place (its composite refuses at
    # finalize, FileExistsError). ckpt_async's new database would be refused by the old one's
    # manifest only once its data files were written: a bare FileExistsError, the files left.
    cls, args = OVER_AN_ITEM[case]
    item = tmp_path / "item"
    cls().save(item, args(1))
    before = files_under(item)
    with pytest.raises(ocp.errors.StepAlreadyExistsError, match=f"^{item} already holds") as e:
        if how == "save":
            cls().save(item, args(2))
        else:
            asyncio.run(cls().async_save(item, args(2)))
    assert isinstance(e.value, FileExistsError) and isinstance(e.value, ValueError)
    assert files_under(item) == before
    if case == "standard":  # (the item there is the first save's)
        assert_bits_equal(cls().restore(item)["w"], np.full(3, 1))


def test_two_direct_saves_racing_into_one_new_folder_the_loser_is_refused_and_cleans_up(
        tmp_path, monkeypatch):
    """Two handler saves into one new folder both pass the check for an item there; the one
    whose manifest comes second (made here just before its own: the other save runs then)
    raises StepAlreadyExistsError naming the folder and removes what it wrote there, its data
    files and B+tree node, leaving the other's item whole. It raised a bare FileExistsError
    on manifest.ocdbt and left its files behind."""
    item = tmp_path / "item"
    finish = _ocdbt.DatabaseWriter.finish
    seen: dict[str, object] = {}

    def other_save_first(db: _ocdbt.DatabaseWriter) -> None:
        monkeypatch.setattr(_ocdbt.DatabaseWriter, "finish", finish)  # (the other's own)
        ocp.StandardCheckpointHandler().save(item, ocp.args.StandardSave({"w": np.full(3, 1)}))
        seen["files"] = set(files_under(item))
        seen["own"] = set(db._data_files)  # (this save's, by their names)
        finish(db)

    monkeypatch.setattr(_ocdbt.DatabaseWriter, "finish", other_save_first)
    with pytest.raises(ocp.errors.StepAlreadyExistsError,
                       match=f"^{item} already holds a checkpoint item: another save made "
                             "its manifest.ocdbt while this one"):
        ocp.StandardCheckpointHandler().save(item, ocp.args.StandardSave({"w": np.full(3, 2)}))
    assert seen["own"] and files_under(item) == sorted(seen["files"] - seen["own"])
    assert_bits_equal(ocp.StandardCheckpointHandler().restore(item)["w"], np.full(3, 1))


def test_a_direct_save_over_a_json_item_writes_over_it_as_orbaxs(tmp_path):
    for lib in (ocp, orbax):
        (tmp_path / lib.__name__).mkdir()
        for v in (1, 2):
            lib.JsonCheckpointHandler().save(tmp_path / lib.__name__,
                                             args=lib.args.JsonSave({"v": v}))
        assert ocp.JsonCheckpointHandler().restore(tmp_path / lib.__name__) == {"v": 2}


@pytest.mark.parametrize("under", [False, True], ids=["the file", "below it"])
@pytest.mark.parametrize("case", ["standard", "composite", "json"])
def test_a_direct_save_to_a_file_raises_what_orbax_callers_catch(tmp_path, case, under):
    # Orbax raises a ValueError (pytree handlers: TensorStore's) or a NotADirectoryError
    # (JSON, composite, random keys); ckpt_async raised a CommitError, neither of them.
    (tmp_path / "f").write_text("mine")
    path = tmp_path / "f" / "item" if under else tmp_path / "f"
    handler, args = (OVER_AN_ITEM[case] if case != "json" else
                     (ocp.JsonCheckpointHandler, lambda v: ocp.args.JsonSave({"v": v})))
    for save in (handler().save, lambda p, a: asyncio.run(handler().async_save(p, a))):
        with pytest.raises(ocp.errors.PathNotADirectoryError, match=str(tmp_path / "f")) as e:
            save(path, args(1))
        assert isinstance(e.value, ValueError) and isinstance(e.value, NotADirectoryError)
    assert files_under(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "mine"


def test_a_composite_handlers_metadata_of_a_missing_directory_is_file_not_found(tmp_path):
    # (ckpt_async gave a StepMetadata without items, as for an empty directory)
    from etils import epath

    with pytest.raises(FileNotFoundError):
        orbax.CompositeCheckpointHandler().metadata(epath.Path(tmp_path / "nowhere"))
    with pytest.raises(ocp.errors.CheckpointNotFoundError, match=f"^{tmp_path / 'nowhere'} "):
        ocp.CompositeCheckpointHandler().metadata(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()  # (no items: an empty Composite, in both)
    for lib in (ocp, orbax):
        assert not lib.CompositeCheckpointHandler().metadata(
            epath.Path(tmp_path / "empty")).item_metadata
