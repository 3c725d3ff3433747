"""Two saves of different values racing into one new folder, through what TensorStore writes:
arrays of a dtype without a zarr v2 name (TensorStore's lanes, merged into the item's root
database) and zarr v3 in OCDBT (Orbax's ``ocdbt.process_0``, merged). Each race is forced: one
save is paused at a chosen point (a patched method) while the other runs to its end. Exactly
one save succeeds, the item restores bit-exact to its values in both libraries, the other
raises StepAlreadyExistsError naming the folder, and leaves none of its own database folders.

The object-store cases (the item's root database written in place, a checkpointer's in-place
save) are in ``_objstore_suite.py``; the race on ckpt_async's own database file in
``test_orbax_style_handlers.py``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as orbax
import pytest
from _checks import assert_bits_equal, files_under

import ckpt_async as ocp
from ckpt_async import _serialize as ser
from ckpt_async import _stage


def int4_tree(value: int) -> dict[str, np.ndarray]:
    """Arrays TensorStore writes (int4 has no zarr v2 name ckpt_async's own writer takes)."""
    return {f"a{i}": np.full((64,), value, ml_dtypes.int4) for i in range(4)}


def float_tree(value: int) -> dict[str, np.ndarray]:
    return {f"f{i}": np.full((256,), value, np.float32) for i in range(4)}


def run_other_first(monkeypatch: pytest.MonkeyPatch, cls: type, name: str,
                    other: Callable[[], None], *, call: int = 1, after: bool = False) -> None:
    """Patches coroutine method ``cls.name`` so that its ``call``-th call first runs ``other()``
    (another save) to its end in a thread, then goes on (``after``: runs it once the call
    returned); the patch is gone from then on."""
    original = getattr(cls, name)
    calls = [0]

    async def patched(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return await original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, original)  # (the other save's calls: as they are)
        if after:
            result = await original(self, *args, **kwargs)
            await asyncio.to_thread(other)
            return result
        await asyncio.to_thread(other)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, patched)


def shape_of(item: Path) -> tuple[list[str], int, set[str]]:
    """The item's files, their random parts (OCDBT's file names, a writer's folder token)
    replaced, each once (how many data files TensorStore writes varies); how many data files
    ckpt_async's own database has (in ``ocdbt.process_0/d/``); the writers' folder tokens."""
    files = files_under(item)
    return (sorted({re.sub(r"\.[0-9a-f]{12}/", ".*/", re.sub(r"[0-9a-f]{32}", "*", f))
                    for f in files}),
            sum(f.startswith("ocdbt.process_0/d/") for f in files),
            {f.split("/")[0].rsplit(".", 1)[1] for f in files if f.startswith("ocdbt.process_0.")})


def assert_only_the_winners(item: Path, alone: Path) -> None:
    """``item`` holds the files a save of the winner's alone (in ``alone``) holds: none of the
    loser's (its own data files, its lane folders) are left."""
    files, own, tokens = shape_of(item)
    assert (files, own) == shape_of(alone)[:2]
    assert len(tokens) == len(shape_of(alone)[2]) <= 1, tokens


def race(monkeypatch, tmp_path, handler: Callable[[], ocp.PyTreeCheckpointHandler],
         tree: Callable[[int], dict], paused: tuple[type, str], call: int = 1,
         after: bool = False) -> tuple[dict[int, BaseException | None], Path]:
    """Save 1 is paused at its ``call``-th call of ``paused`` (``after``: once it returned)
    while save 2 runs to its end; returns each save's error (None: it succeeded) and the
    item."""
    item = tmp_path / "item"
    errors: dict[int, BaseException | None] = {}

    async def nothing_there(self, directory, args):
        return None  # (both saves checked the folder before either wrote there)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "existing_item", nothing_there)

    def save(value: int) -> None:
        try:
            handler().save(item, ocp.args.PyTreeSave(tree(value)))
            errors[value] = None
        except ocp.errors.StepAlreadyExistsError as exc:
            errors[value] = exc

    run_other_first(monkeypatch, *paused, lambda: save(2), call=call, after=after)
    save(1)
    return errors, item


def check_one_whole(errors, item: Path, tmp_path: Path, handler, tree, layout: dict,
                    names: str = "manifest.ocdbt") -> int:
    """Exactly one save succeeded; its values restore bit-exact in both libraries; the other
    raised StepAlreadyExistsError naming the folder and the database it met. The winner."""
    (winner,) = [v for v, e in errors.items() if e is None]
    (loser,) = [e for e in errors.values() if e is not None]
    assert str(loser).startswith(f"{item} already holds a checkpoint item: another save made "
                                 f"its {names} while this one wrote its data"), loser
    for got in (handler().restore(item),
                orbax.PyTreeCheckpointHandler(**layout).restore(item)):
        for name, want in tree(winner).items():
            assert_bits_equal(np.asarray(got[name]), want)
    assert ocp.verify(item).ok
    return winner


@pytest.mark.parametrize("winner", [1, 2])
def test_arrays_tensorstore_writes_racing_into_one_folder(tmp_path, monkeypatch, winner):
    """Every array in TensorStore's lanes (each save's own folders), merged into the root
    database by the save that gets there first. Save 2 runs once save 1's arrays are written,
    before its merge (save 2 makes the root database), or once save 1 merged, before its
    documents (save 2 stops at its merge). Before, both saves succeeded: they wrote into the
    same ``ocdbt.process_0.1`` database, and the item held one's documents over a mix of
    both's arrays (CorruptCheckpointError; Orbax restored the mix)."""
    handler = ocp.PyTreeCheckpointHandler
    errors, item = race(monkeypatch, tmp_path, handler, int4_tree,
                        (ser.ItemWriter, "finish"), after=winner == 1)
    assert check_one_whole(errors, item, tmp_path, handler, int4_tree, {}) == winner
    # (the loser's lane database went with it: the item holds what a save alone writes)
    handler().save(tmp_path / "alone", ocp.args.PyTreeSave(int4_tree(winner)))
    assert_only_the_winners(item, tmp_path / "alone")


def test_own_and_tensorstore_arrays_racing_into_one_folder(tmp_path, monkeypatch):
    """Arrays ckpt_async writes itself and arrays TensorStore writes in a lane, in one item:
    save 2 runs while save 1's arrays are written (at its second lane batch; its own database
    may be finished by then or not). The loser is refused and removes its data files and its
    lane; before, the two lanes were one database, merged by the winner with the loser's
    arrays in it."""
    def tree(value: int) -> dict[str, np.ndarray]:
        return {**int4_tree(value), **float_tree(value)}

    monkeypatch.setattr(_stage, "BATCH_MAX_ARRAYS", 1)
    handler = ocp.PyTreeCheckpointHandler
    errors, item = race(monkeypatch, tmp_path, handler, tree, (ser.ItemWriter, "_write_tensorstore"),
                        call=2)
    winner = check_one_whole(errors, item, tmp_path, handler, tree, {})
    handler().save(tmp_path / "alone", ocp.args.PyTreeSave(tree(winner)))
    assert_only_the_winners(item, tmp_path / "alone")


@pytest.mark.parametrize("winner", [1, 2])
def test_zarr3_in_ocdbt_racing_into_one_folder(tmp_path, monkeypatch, winner):
    """zarr v3 in OCDBT: every array through the zarr driver into Orbax's ``ocdbt.process_0``
    database, merged into the root one. The save that commits there second stops at that
    commit (its database has another uuid) and raises; before, both wrote into it and both
    succeeded over a mix. What TensorStore wrote for the loser's refused commit stays in
    ``ocdbt.process_0/d/``, unreferenced (names nobody records). Save 2 runs before save 1
    writes (one batch), or once save 1's first batch is in (one array a batch)."""
    if winner == 1:
        monkeypatch.setattr(_stage, "BATCH_MAX_ARRAYS", 1)

    def handler() -> ocp.PyTreeCheckpointHandler:
        return ocp.PyTreeCheckpointHandler(use_zarr3=True)

    errors, item = race(monkeypatch, tmp_path, handler, float_tree,
                        (ser.ItemWriter, "_write_tensorstore"), after=winner == 1)
    assert check_one_whole(errors, item, tmp_path, handler, float_tree, {"use_zarr3": True},
                           names="ocdbt.process_0/manifest.ocdbt") == winner
    handler().save(tmp_path / "alone", ocp.args.PyTreeSave(float_tree(winner)))
    assert shape_of(item)[0] == shape_of(tmp_path / "alone")[0]
