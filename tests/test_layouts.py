"""Orbax's other layouts, written by ckpt_async as Orbax 0.12.8 writes them for the same
options: ``use_ocdbt=False`` (each array a zarr array in a folder of its own) and
``use_zarr3=True`` (zarr v3, in OCDBT or not). Both libraries restore them bit-exact; the
checksums, verify and a failed save's cleanup work as in the default layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as orbax
import pytest
import tensorstore as ts
from _checks import LAYOUTS, assert_bits_equal
from jax.sharding import NamedSharding, PartitionSpec

import ckpt_async as ocp
from ckpt_async import _serialize, _stage, cli
from ckpt_async.errors import CommitError, CorruptCheckpointError, InvalidArgumentError

#: ckpt_async's own files beside Orbax's.
OURS = {"_CHECKSUMS", "_CKPT_ASYNC"}

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")


def make_tree(mesh) -> dict:
    f32 = np.arange(32, dtype=np.float32).reshape(8, 4)
    f32[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    return {
        "w": jax.device_put(f32, NamedSharding(mesh, PartitionSpec("x", "y"))),
        "b": jnp.asarray(np.linspace(-1, 1, 6).astype(ml_dtypes.bfloat16)),
        "host": np.arange(12, dtype=np.uint16).reshape(3, 4),
        "zeros": np.zeros((2, 2), np.float32),  # (zarr v3's fill value: stored all the same)
        "cast": np.array([1.0, -2.5, np.nan, 3e38], np.float32),  # saved as bfloat16
        "step": 7,
        "lr": np.float64(2.5),
    }


def save_args(tree: dict, lib) -> dict:
    return {k: lib.SaveArgs(dtype=np.dtype(ml_dtypes.bfloat16)) if k == "cast" else lib.SaveArgs()
            for k in tree}


def save(lib, path: Path, tree: dict, use_ocdbt: bool, use_zarr3: bool, compress: bool) -> None:
    handler = lib.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                                          use_compression=compress)
    with lib.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=lib.args.PyTreeSave(tree, save_args=save_args(tree, lib)))


def files(item: Path) -> list[str]:
    """The item's files, relative, an OCDBT file's random name as ``<id>``, without ours."""
    names = {re.sub(r"/[0-9a-f]{32}$", "/<id>", str(p.relative_to(item)))
             for p in item.rglob("*") if p.is_file()}
    return sorted(names - OURS)


def zarr_documents(item: Path, use_ocdbt: bool) -> dict[str, bytes]:
    """Every array's ``.zarray`` or ``zarr.json``, by key (in the database, or as files)."""
    if not use_ocdbt:
        return {str(p.relative_to(item)): p.read_bytes() for p in item.rglob("*")
                if p.name in (".zarray", "zarr.json")}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
    return {k.decode(): kv.read(k).result().value for k in kv.list().result()
            if k.endswith((b".zarray", b"zarr.json"))}


def orbax_fields(item: Path) -> dict:
    doc = json.loads((item / "_METADATA").read_text())
    doc.pop("ckpt_async", None)
    return doc


def assert_trees_bits_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert_bits_equal(got[k], want[k])


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), LAYOUTS)
def test_the_layout_orbax_writes_restored_bit_exact_by_both(tmp_path, mesh, monkeypatch,
                                                            use_ocdbt, use_zarr3, compress):
    # (batches of one array, and lanes of 64 bytes: the default layout would spread these
    # over several databases, ocdbt.process_0.1/ ..., where Orbax writes one)
    monkeypatch.setattr(_serialize, "LANE_BYTES", 64)
    monkeypatch.setattr(_stage, "BATCH_MAX_ARRAYS", 1)
    tree = make_tree(mesh)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    save(ocp, ours, tree, use_ocdbt, use_zarr3, compress)
    save(orbax, theirs, tree, use_ocdbt, use_zarr3, compress)
    # The same files (OCDBT's random names aside) and the same zarr and tree documents.
    assert files(ours) == files(theirs)
    assert zarr_documents(ours, use_ocdbt) == zarr_documents(theirs, use_ocdbt)
    assert orbax_fields(ours) == orbax_fields(theirs)
    assert (orbax_fields(ours)["use_ocdbt"], orbax_fields(ours)["use_zarr3"]) == (
        use_ocdbt, use_zarr3)
    with orbax.PyTreeCheckpointer() as ockptr:
        expected = ockptr.restore(theirs)  # (the cast leaf: as Orbax's cast stores it)
        assert expected["cast"].dtype == ml_dtypes.bfloat16
        assert_trees_bits_equal(ockptr.restore(ours), expected)
    with ocp.PyTreeCheckpointer() as ckptr:
        assert_trees_bits_equal(ckptr.restore(ours), expected)
        meta = ckptr.metadata(ours).item_metadata
    assert (meta["w"].shape, meta["cast"].dtype) == ((8, 4), ml_dtypes.bfloat16)
    report = ocp.verify(ours)
    assert report.ok and report.arrays_checked == len(tree), report.problems


def chunk_of(item: Path, use_ocdbt: bool, name: str) -> Path:
    """A file holding array ``name``'s chunk data: its own chunk file, or in OCDBT the
    largest data file."""
    if use_ocdbt:
        return max((item / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
    return max((p for p in (item / name).rglob("*")
                if p.is_file() and p.name not in (".zarray", "zarr.json")),
               key=lambda f: f.stat().st_size)


@pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), LAYOUTS)
def test_checksums_catch_damaged_and_missing_chunks(tmp_path, capsys, use_ocdbt, use_zarr3):
    path = tmp_path / "c"
    value = np.arange(256, dtype=np.float32).reshape(16, 16)
    save(ocp, path, {"w": value, "v": np.ones(3, np.int8)}, use_ocdbt, use_zarr3, False)
    assert cli.main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"OK  {path}: 2 arrays")
    chunk = chunk_of(path, use_ocdbt, "w")
    raw = bytearray(chunk.read_bytes())
    at = raw.find(value[8].tobytes())  # (a row of w: its bytes, whatever the layout)
    assert at >= 0
    raw[at] ^= 0x40
    chunk.write_bytes(bytes(raw))
    with ocp.PyTreeCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError,
                                                         match="'w' fails its checksum"):
        ckptr.restore(path)
    report = ocp.verify(path)
    assert not report.ok and any("'w'" in p for p in report.problems), report.problems
    assert cli.main(["verify", str(path)]) == 1
    assert "FAIL" in capsys.readouterr().out
    if not use_ocdbt:  # a chunk file gone: read as the fill value, which its checksum is not
        chunk.unlink()
        report = ocp.verify(path)
        assert not report.ok and any("'w'" in p for p in report.problems), report.problems


@pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), LAYOUTS)
def test_a_failed_save_leaves_nothing_visible(tmp_path, monkeypatch, use_ocdbt, use_zarr3):
    real = _serialize.write_array

    async def failing(ctx, item_dir, arr, **kwargs):
        if arr.name == "b":
            raise OSError("injected failure writing b")
        return await real(ctx, item_dir, arr, **kwargs)

    monkeypatch.setattr(_serialize, "write_array", failing)
    tree = {"a": np.arange(4), "b": np.ones(3), "c": np.zeros(2)}
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    with pytest.raises(CommitError, match="injected failure writing b"), \
            ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
    assert list(tmp_path.iterdir()) == []  # neither the step nor its temporary directory
    monkeypatch.setattr(_serialize, "write_array", real)
    with ocp.Checkpointer(handler) as ckptr:  # (and the next save goes through)
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave(tree))
        assert_trees_bits_equal(ckptr.restore(tmp_path / "c"), tree)


@pytest.mark.parametrize("name", ["_METADATA", "array_metadatas", "..", "../x"])
def test_names_without_a_folder_of_their_own_are_refused_before_writing(tmp_path, name):
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    with ocp.Checkpointer(handler) as ckptr, pytest.raises(
            InvalidArgumentError, match=f"leaf {re.escape(repr(name))} cannot be stored"):
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({name: np.arange(3)}))
    assert list(tmp_path.iterdir()) == []
    with ocp.PyTreeCheckpointer() as ckptr:  # (in OCDBT the name is a key like any other)
        ckptr.save(tmp_path / "c", {name: np.arange(3)})
        assert_bits_equal(ckptr.restore(tmp_path / "c")[name], np.arange(3))


@pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), LAYOUTS)
def test_a_bare_array_and_a_standard_save(tmp_path, use_ocdbt, use_zarr3):
    value = np.arange(6, dtype=np.int32).reshape(2, 3)
    with ocp.PyTreeCheckpointer(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3) as ckptr:
        ckptr.save(tmp_path / "bare", value)  # (its zarr files in the item's folder itself)
    assert (tmp_path / "bare" / ("zarr.json" if use_zarr3 else ".zarray")).exists() != \
        use_ocdbt
    with orbax.PyTreeCheckpointer() as ockptr:
        assert_bits_equal(ockptr.restore(tmp_path / "bare"), value)
    with ocp.PyTreeCheckpointer() as ckptr:
        assert_bits_equal(ckptr.restore(tmp_path / "bare"), value)
    handler = ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "std", args=ocp.args.StandardSave({"x": value}))
    with orbax.StandardCheckpointer() as ockptr:
        assert_bits_equal(ockptr.restore(tmp_path / "std")["x"], value)
    assert (tmp_path / "std" / "manifest.ocdbt").exists() == use_ocdbt
    assert (tmp_path / "std" / "x" / ("zarr.json" if use_zarr3 else ".zarray")).exists() != \
        use_ocdbt
