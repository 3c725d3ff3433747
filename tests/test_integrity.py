"""Damaged checkpoints never restore silently wrong: CorruptCheckpointError, and verify()."""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async.errors import CorruptCheckpointError, UnreadableCheckpointError


def _save(path: Path) -> dict:
    tree = {"big": np.arange(1 << 18, dtype=np.float32),          # 1 MiB: its own data file
            "w": jnp.linspace(0, 1, 4096, dtype=jnp.float32), "b": np.ones(3), "s": 7}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, tree)
    return tree


def _largest_data_file(path: Path) -> Path:
    # (in the item's database or a merged one: ocdbt.process_0.1/d/...)
    files = [p for p in path.rglob("d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _restore(path: Path):
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path)


def test_intact_checkpoint_verifies_and_restores(tmp_path):
    tree = _save(tmp_path / "c")
    report = ocp.verify(tmp_path / "c")
    assert report.ok, report.problems
    assert report.arrays_checked == 4 and report.bytes_checked >= tree["big"].nbytes
    np.testing.assert_array_equal(_restore(tmp_path / "c")["big"], tree["big"])
    assert (tmp_path / "c" / "_CHECKSUMS").is_file()


def test_flipped_byte_in_array_data(tmp_path):
    _save(tmp_path / "c")
    f = _largest_data_file(tmp_path / "c")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="big"):
        _restore(tmp_path / "c")
    report = ocp.verify(tmp_path / "c")
    assert not report.ok and any("big" in p for p in report.problems)


def test_verify_of_a_manager_directory_checks_every_step(tmp_path):
    # A manager's directory used to pass with nothing checked: its step folders were taken
    # for items without documents.
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave({"big": np.arange(1 << 18) + step}))
    report = ocp.verify(tmp_path / "run")
    assert report.ok and report.items_checked == 2 and report.arrays_checked == 2, report
    f = _largest_data_file(tmp_path / "run" / "2")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    report = ocp.verify(tmp_path / "run")
    assert not report.ok and all(str(tmp_path / "run" / "2") in p for p in report.problems)
    (tmp_path / "empty" / "item").mkdir(parents=True)  # (not a checkpoint: nothing to check)
    assert not ocp.verify(tmp_path / "empty").ok


def test_verify_of_a_manager_directory_takes_the_steps_a_manager_lists(tmp_path):
    # A half-deleted step (a kill in retention) is no step: not checked. A committed step
    # whose _CHECKPOINT_METADATA is gone is one: checked, and the loss reported.
    run = tmp_path / "run"
    with ocp.CheckpointManager(run) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=ocp.args.StandardSave({"big": np.arange(1 << 18) + step}))
    (run / "1").rename(run / "1.orbax-checkpoint-todelete-123")
    (run / "1.orbax-checkpoint-todelete-123" / "default" / "manifest.ocdbt").unlink()
    report = ocp.verify(run)
    assert report.ok and report.items_checked == 2, report.problems
    (run / "2" / "_CHECKPOINT_METADATA").unlink()
    f = _largest_data_file(run / "2")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    report = ocp.verify(run)
    assert report.items_checked == 2 and len(report.problems) == 2, report.problems
    assert report.problems[0].startswith(f"{run / '2' / '_CHECKPOINT_METADATA'}: missing")
    assert str(run / "2" / "default") in report.problems[1] and "'big'" in report.problems[1]
    with ocp.CheckpointManager(run) as mngr:
        assert mngr.all_steps() == [2, 3]


def test_verify_of_a_directory_holding_only_a_leftover_checks_no_item(tmp_path):
    (tmp_path / "1.orbax-checkpoint-tmp-123" / "default").mkdir(parents=True)
    report = ocp.verify(tmp_path)
    assert report.items_checked == 0 and report.problems == [
        f"{tmp_path}: no checkpoint items found (only 1 leftover(s) of a save or delete that "
        "did not finish)"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_data_file(tmp_path, damage):
    _save(tmp_path / "c")
    f = _largest_data_file(tmp_path / "c")
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 3)
    else:
        f.unlink()
    with pytest.raises(CorruptCheckpointError) as ei:
        _restore(tmp_path / "c")
    assert str(tmp_path / "c") in str(ei.value)
    assert not ocp.verify(tmp_path / "c").ok


@pytest.mark.parametrize("damage", ["a directory in its place", "an I/O error"])
def test_a_data_file_that_cannot_be_read_is_named_with_the_key(tmp_path, monkeypatch, damage):
    _save(tmp_path / "c")
    f = _largest_data_file(tmp_path / "c")
    if damage == "an I/O error":  # (as a bad sector gives: the file opens, its reads fail)
        def preadv(*_args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(os, "preadv", preadv)
    else:
        f.unlink()
        f.mkdir()
    with pytest.raises(UnreadableCheckpointError) as ei:
        _restore(tmp_path / "c")
    assert isinstance(ei.value, OSError)  # (what code written against Orbax catches)
    assert f"data file {f} cannot be read" in str(ei.value) and "key 'big'" in str(ei.value)
    if damage == "a directory in its place":  # (verify reads through TensorStore)
        report = ocp.verify(tmp_path / "c")
        assert not report.ok and any("array 'big' cannot be read" in p for p in report.problems)


def test_a_zarray_naming_no_dtype_is_damage(tmp_path):
    # (a .zarray whose dtype NumPy fails to parse raised its SyntaxError out of restore and
    # metadata; another such dtype, "m8[Y/0]", killed the process: test_serialize.py)
    import tensorstore as ts

    _save(tmp_path / "c")
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path / 'c'}/"}).result()
    meta = json.loads(kv.read("b/.zarray").result().value)
    kv.write("b/.zarray", json.dumps({**meta, "dtype": "(1e999,)f4"}).encode()).result()
    with pytest.raises(CorruptCheckpointError, match="array 'b' cannot be opened"):
        _restore(tmp_path / "c")
    with ocp.PyTreeCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError, match="'b'"):
        ckptr.metadata(tmp_path / "c")


@pytest.mark.parametrize("name", ["_METADATA", "_sharding", "_CHECKSUMS", "manifest.ocdbt"])
def test_a_document_that_cannot_be_read_is_named(tmp_path, name):
    # (the OCDBT manifest, a directory in its place, raised CorruptCheckpointError naming an
    # array's .zarray, not the manifest, until round 39)
    _save(tmp_path / "c")
    (tmp_path / "c" / name).unlink()
    (tmp_path / "c" / name).mkdir()
    with pytest.raises(UnreadableCheckpointError, match=f"cannot read {tmp_path / 'c' / name}"):
        _restore(tmp_path / "c")
    assert not ocp.verify(tmp_path / "c").ok


def test_a_manifest_read_error_is_unreadable_not_a_bare_os_error(tmp_path, monkeypatch):
    # (an I/O error or EACCES reading manifest.ocdbt came out as a bare OSError until round 39)
    _save(tmp_path / "c")
    manifest = tmp_path / "c" / "manifest.ocdbt"
    real = Path.read_bytes

    def read_bytes(self):
        if self == manifest:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(UnreadableCheckpointError,
                       match=f"cannot read {manifest}: Input/output error"):
        _restore(tmp_path / "c")


def test_checksums_gone_from_an_item_ckpt_async_wrote_are_damage(tmp_path):
    # (a restore checked nothing then, silently; an item Orbax wrote has none, and restores:
    # test_orbax_roundtrip.py)
    _save(tmp_path / "c")
    (tmp_path / "c" / "_CHECKSUMS").unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{tmp_path / 'c' / '_CHECKSUMS'}: missing"):
        _restore(tmp_path / "c")
    report = ocp.verify(tmp_path / "c")
    assert any("_CHECKSUMS: missing" in p for p in report.problems), report.problems


def test_garbled_metadata(tmp_path):
    _save(tmp_path / "c")
    (tmp_path / "c" / "_METADATA").write_bytes(b'{"tree_metadata": {"(\'big\',)": 1')
    with pytest.raises(CorruptCheckpointError, match="_METADATA"):
        _restore(tmp_path / "c")
    assert not ocp.verify(tmp_path / "c").ok


@pytest.mark.parametrize("skeleton", [["X", 0], ["D", [["big", "s"]]], ["L", 99], 5])
def test_a_recorded_tree_that_does_not_decode_is_corrupt(tmp_path, skeleton):
    # A _METADATA whose checksum matches (written so) but whose tree record is none: the
    # restore raised the bare ValueError, IndexError or TypeError of the decoding.
    _save(tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "_METADATA").read_bytes())
    doc["ckpt_async"]["skeleton"] = skeleton
    data = json.dumps(doc).encode()
    (tmp_path / "c" / "_METADATA").write_bytes(data)
    sums = json.loads((tmp_path / "c" / "_CHECKSUMS").read_bytes())
    sums["documents"]["_METADATA"] = zlib.crc32(data)
    (tmp_path / "c" / "_CHECKSUMS").write_text(json.dumps(sums))
    with pytest.raises(CorruptCheckpointError,
                       match=f"^{tmp_path / 'c' / '_METADATA'}: the tree it records does not "
                             "decode"):
        _restore(tmp_path / "c")


def test_document_that_still_parses_but_changed(tmp_path):
    # A flipped digit leaves valid JSON: only the checksum can tell.
    _save(tmp_path / "c")
    sharding = tmp_path / "c" / "_sharding"
    sharding.write_bytes(sharding.read_bytes().replace(b"cpu:0", b"cpu:1"))
    with pytest.raises(CorruptCheckpointError, match="_sharding"):
        _restore(tmp_path / "c")


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete"])
@pytest.mark.parametrize("name", ["array_metadatas/process_0", "_sharding"])
def test_verify_checks_every_document_the_checksums_list(tmp_path, damage, name):
    # array_metadatas is no restore's business (Orbax's record of the write shapes); verify
    # still finds it damaged or gone, as it does every document _CHECKSUMS lists.
    _save(tmp_path / "c")
    doc = tmp_path / "c" / name
    if damage == "edit":
        doc.write_bytes(doc.read_bytes().replace(b"4096", b"4097").replace(b"cpu:0", b"cpu:1"))
    elif damage == "truncate":
        doc.write_bytes(doc.read_bytes()[:20])
    else:
        doc.unlink()
    report = ocp.verify(tmp_path / "c")
    assert not report.ok and any(p.startswith(str(doc)) for p in report.problems), report.problems


def test_verify_names_a_missing_tree_document(tmp_path):
    _save(tmp_path / "c")
    (tmp_path / "c" / "_METADATA").unlink()
    report = ocp.verify(tmp_path / "c")
    assert report.problems == [f"{tmp_path / 'c' / '_METADATA'}: missing (the item holds array "
                               "data, which cannot be read without it)"]


def test_manager_step_corruption_names_step_and_item(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"big": np.arange(1 << 18, dtype=np.float32)})))
    f = _largest_data_file(tmp_path / "3" / "state")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with ocp.CheckpointManager(tmp_path) as mngr, pytest.raises(CorruptCheckpointError) as ei:
        mngr.restore(3)
    msg = str(ei.value)
    assert f"{tmp_path}/3/state" in msg and "'big'" in msg


def test_step_metadata_and_json_item_changes_that_still_parse(tmp_path):
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"a": np.ones(3)}),
                                             info=ocp.args.JsonSave({"lr": 0.125, "step": 1})))
    info = tmp_path / "1" / "info" / "metadata"
    info.write_bytes(info.read_bytes().replace(b"0.125", b"0.126"))
    with ocp.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(CorruptCheckpointError, match="info"):
            mngr.restore(1, args=ocp.args.Composite(info=ocp.args.JsonRestore()))
        assert mngr.restore(1, args=ocp.args.Composite(state=None)).state["a"].sum() == 3
    assert not ocp.verify(tmp_path / "1").ok
    step_doc = tmp_path / "1" / "_CHECKPOINT_METADATA"
    step_doc.write_bytes(step_doc.read_bytes().replace(b'"metrics":{}', b'"metrics":{"x":1}'))
    with ocp.CheckpointManager(tmp_path) as mngr:  # (opens, logging the damage: as in Orbax)
        assert mngr.all_steps() == [1]
        with pytest.raises(CorruptCheckpointError, match="_CHECKPOINT_METADATA"):
            mngr.restore(1)


def test_orbax_reads_step_metadata_with_our_checksum(tmp_path):
    import orbax.checkpoint as orbax

    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(2, args=ocp.args.StandardSave({"a": np.arange(3)}), metrics={"loss": 0.5},
                  custom_metadata={"run": "r1"})
    mngr = orbax.CheckpointManager(tmp_path)
    try:
        assert mngr.all_steps() == [2]
        meta = mngr.metadata(2)
        assert meta.metrics == {"loss": 0.5} and meta.custom_metadata == {"run": "r1"}
        np.testing.assert_array_equal(
            mngr.restore(2, args=orbax.args.StandardRestore())["a"], np.arange(3))
    finally:
        mngr.close()


def test_a_region_is_checked_against_the_chunks_it_holds(tmp_path):
    import asyncio

    from ckpt_async import _integrity
    from ckpt_async import _serialize as ser

    arr = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    chunks = (4, 3)
    sums = _integrity.Checksums(arrays={"w": _integrity.ArraySums(
        list(chunks), ser.chunk_checksums(arr, chunks))})
    region = arr[4:8, 3:6].copy()  # chunk 1.1 alone
    asyncio.run(_integrity.check_array(tmp_path, "w", region, sums, origin=(4, 3)))
    asyncio.run(_integrity.check_array(tmp_path, "w", arr, sums))
    with pytest.raises(CorruptCheckpointError, match=r"chunks 0\.0"):  # placed at the wrong corner
        asyncio.run(_integrity.check_array(tmp_path, "w", region, sums, origin=(0, 0)))
    region[0, 0] += 1
    with pytest.raises(CorruptCheckpointError, match=r"'w' fails its checksum \(chunks 1\.1\)"):
        asyncio.run(_integrity.check_array(tmp_path, "w", region, sums, origin=(4, 3)))


def _other_items(path: Path) -> None:
    import jax
    from google.protobuf import duration_pb2
    with ocp.CheckpointManager(path) as mngr:
        mngr.save(1, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.ones(3)}),
            rng=ocp.args.JaxRandomKeySave(jax.random.key(0)),
            np_rng=ocp.args.NumpyRandomKeySave(np.random.get_state()),
            spec=ocp.args.ProtoSave(duration_pb2.Duration(seconds=5))))


def test_verify_checks_random_key_and_proto_items(tmp_path):
    # They used to fail a healthy checkpoint: "nothing to check", "proto.pbtxt: invalid JSON".
    _other_items(tmp_path / "run")
    step = tmp_path / "run" / "1"
    report = ocp.verify(step)
    assert report.ok, report.problems
    assert report.items_checked == 4 and report.arrays_checked == 1 + 1 + 4  # (the state name is a string)
    for item in ("rng", "spec"):
        assert ocp.verify(step / item).ok
    (step / "spec" / "proto.pbtxt").write_bytes(b"seconds: 6\n")
    desc = step / "rng" / "jax_random_key_metadata" / "metadata"
    desc.write_bytes(desc.read_bytes().replace(b"true", b"false"))
    problems = ocp.verify(tmp_path / "run").problems
    assert problems == [f"{step / 'rng' / 'jax_random_key_metadata' / 'metadata'}: checksum "
                        "mismatch (the file is damaged)",
                        f"{step / 'spec' / 'proto.pbtxt'}: checksum mismatch (the file is "
                        "damaged)"]


def test_verify_checks_json_only_checkpoints_and_items(tmp_path):
    import orbax.checkpoint as orbax
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(tmp_path / "doc",
                                                       args=ocp.args.JsonSave({"a": 1}))
    ckptr = orbax.Checkpointer(orbax.JsonCheckpointHandler())
    ckptr.save(tmp_path / "odoc", args=orbax.args.JsonSave({"a": 1}))
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(1, args=ocp.args.Composite(extra=ocp.args.JsonSave({"i": 1})))
    for path in ("doc", "odoc", "run", "run/1", "run/1/extra"):
        report = ocp.verify(tmp_path / path)
        assert report.ok and report.items_checked == 1 and report.documents_checked >= 1, (
            path, report.problems)
    (tmp_path / "doc" / "metadata").write_bytes(b'{"a": 2}')
    assert ocp.verify(tmp_path / "doc").problems == [
        f"{tmp_path / 'doc' / 'metadata'}: checksum mismatch (the file is damaged)"]


def test_verify_of_a_manager_directory_reports_an_unreadable_step_and_goes_on(
        tmp_path, monkeypatch):
    from ckpt_async import _storage
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=ocp.args.StandardSave({"w": np.ones(4)}))
    bad = tmp_path / "run" / "2"

    def denied(real):  # (as a folder without permission, which root could still read)
        async def listing(path):
            if path == bad:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return await real(path)
        return listing

    for name in ("listdir", "listdirs"):
        monkeypatch.setattr(_storage, name, denied(getattr(_storage, name)))
    report = ocp.verify(tmp_path / "run")
    assert report.items_checked == 2 and report.arrays_checked == 2
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{bad}: cannot be read")
