"""What every object store (``s3://``, ``gs://``) must do, written once and run against each
real server on loopback: ``test_s3.py`` (moto's S3) and ``test_gcs.py`` (fake-gcs-server)
subclass :class:`ObjectStoreSuite` and give it a ``store`` fixture, a :class:`Bucket` that
looks behind the library's back with the server's own API (never through TensorStore).

Objects are written in place; a step becomes visible when its ``commit_success.txt`` (written
last, create-once) exists; a step without it is never listed or restored and is cleaned up like
a temporary directory; deletion removes the marker first.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

import ckpt_async as ocp
from ckpt_async import _commit, _objstore
from ckpt_async import _serialize as ser
from ckpt_async._paths import StorePath
from ckpt_async._runtime import get_runtime
from ckpt_async.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StepAlreadyExistsError,
    StepNotFoundError,
)


class Bucket:
    """One bucket on a server, reached with the server's own API (boto3, or GCS's JSON API)."""

    scheme: str
    name: str

    def url(self, prefix: str) -> str:
        return f"{self.scheme}://{self.name}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix/``, relative to it, sorted."""
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError


def state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)),
        "big": rng.standard_normal(3 << 20).astype(np.float32),  # 12 MiB: the zarr driver path
        "bf": rng.standard_normal(100).astype(ml_dtypes.bfloat16),
        "i": np.arange(10, dtype=np.int64) * seed,
        "step": seed,
    }


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == np.asarray(v).dtype, k
        assert g.tobytes() == np.asarray(v).tobytes(), k  # bit-exact


def small_round_trip(store: Bucket, prefix: str) -> None:
    """Saves and restores a one-array tree at ``prefix`` with whatever endpoint options are
    set (the tests of ``set_s3_options`` / ``set_gcs_options``); checks the value and that
    the step's marker landed in the bucket."""
    url = store.url(prefix)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(url, {"x": np.arange(3)})
        np.testing.assert_array_equal(ckptr.restore(url)["x"], np.arange(3))
    assert "commit_success.txt" in store.keys(prefix)


def _run_other_first(monkeypatch: pytest.MonkeyPatch, owner: object, name: str,
                     other, *, after: bool = False) -> None:
    """Patches coroutine ``owner.name`` (a class's method, or a module's function): its first
    call first runs ``other()`` to its end in a thread (``after``: once the call returned),
    then goes on; unpatched from then on."""
    original = getattr(owner, name)

    async def patched(*args, **kwargs):
        monkeypatch.setattr(owner, name, original)  # (the other save's calls: as they are)
        if after:
            result = await original(*args, **kwargs)
            await asyncio.to_thread(other)
            return result
        await asyncio.to_thread(other)
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


class ObjectStoreSuite:
    """The shared tests; a subclass named ``Test...`` in a test module runs them (with that
    module's ``store`` fixture). Every test works under its own fresh key prefix."""

    @pytest.fixture
    def prefix(self, store: Bucket) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    def test_manager_save_restore_retention_delete_reload(self, store: Bucket, prefix: str):
        url = store.url(prefix)
        opts = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(2))
        states = {s: state(s) for s in range(4)}
        with ocp.CheckpointManager(url, options=opts, metadata={"run": store.scheme}) as mngr:
            for s, st in states.items():
                assert mngr.save(s, args=ocp.args.StandardSave(st),
                                 metrics={"loss": 1.0 / (s + 1)})
            mngr.wait_until_finished()
            assert mngr.all_steps() == [2, 3] and mngr.latest_step() == 3
            for s in (2, 3):
                assert_same(mngr.restore(s), states[s])
            meta = mngr.metadata(3)
            assert meta.metrics == {"loss": 0.25}
            assert mngr.item_metadata(3)["w"].shape == (64, 32)
            assert mngr.metadata().custom_metadata == {"run": store.scheme}
        stored = store.keys(prefix)
        # old steps' objects are really gone; committed steps carry their marker
        assert not [k for k in stored if k.split("/")[0] in ("0", "1")]
        assert {"2/commit_success.txt", "3/commit_success.txt", "3/_CHECKPOINT_METADATA",
                "3/default/_METADATA", "3/default/manifest.ocdbt"} <= set(stored)
        assert not [k for k in stored if ".orbax-checkpoint-tmp" in k]

        with ocp.CheckpointManager(url) as mngr:  # a fresh manager lists what is committed
            assert mngr.all_steps() == [2, 3]
            assert_same(mngr.restore(), states[3])
            mngr.delete(2)
            assert mngr.all_steps() == [3]
            mngr.reload()
            assert mngr.all_steps() == [3]
        assert not [k for k in store.keys(prefix) if k.startswith("2/")]

    def test_composite_with_a_json_item(self, store: Bucket, prefix: str):
        url = store.url(prefix)
        st = state(7)
        with ocp.CheckpointManager(url) as mngr:
            mngr.save(7, args=ocp.args.Composite(
                state=ocp.args.StandardSave(st),
                extra=ocp.args.JsonSave({"lr": 0.1, "tags": ["a"]})))
            mngr.wait_until_finished()
            got = mngr.restore(7)
            assert_same(got.state, st)
            assert got.extra == {"lr": 0.1, "tags": ["a"]}
            partial = mngr.restore(7, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
            assert partial.extra == {"lr": 0.1, "tags": ["a"]}
        assert {"7/extra/metadata", "7/state/_METADATA", "7/commit_success.txt"} <= set(
            store.keys(prefix))

    def test_many_small_arrays_and_a_large_one(self, store: Bucket, prefix: str):
        rng = np.random.default_rng(11)
        tree = {f"layer{i:03d}": {"w": rng.standard_normal((8, 4)).astype(np.float32),
                                  "b": np.full(4, i, np.int32)} for i in range(150)}
        tree["embed"] = rng.standard_normal((1024, 4096)).astype(np.float32)  # 16 MiB
        url = store.url(prefix)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, tree)
            ckptr.wait_until_finished()
            got = ckptr.restore(url)
        assert set(got) == set(tree)
        for name, want in tree.items():
            if isinstance(want, dict):
                for k in want:
                    assert got[name][k].tobytes() == want[k].tobytes(), (name, k)
            else:
                assert np.asarray(got[name]).tobytes() == want.tobytes(), name
        stored = store.keys(prefix)
        # 301 arrays in one OCDBT database: a handful of objects, not one per array
        assert len(stored) < 40, stored
        assert "commit_success.txt" in stored and "manifest.ocdbt" in stored
        assert ocp.verify(url).ok

    def test_metadata_of_many_arrays_opens_no_tensorstore_per_array(
            self, store: Bucket, prefix: str, monkeypatch: pytest.MonkeyPatch):
        # (the shapes come from the database's index; each array was opened, a request each)
        tree = {f"p{i:03d}": np.full((i % 5, 2), i, np.float32) for i in range(120)}
        tree["bf"] = np.ones((3, 3), ml_dtypes.bfloat16)
        url = store.url(prefix)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, tree)
        opened: list = []
        real = ts.open
        monkeypatch.setattr(ts, "open", lambda *a, **k: opened.append(a) or real(*a, **k))
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(url).item_metadata
        assert opened == []
        assert {k: (m.shape, m.dtype, m.storage.chunk_shape) for k, m in meta.items()} == {
            k: (v.shape, v.dtype, tuple(max(1, n) for n in v.shape)) for k, v in tree.items()}

    def test_step_without_marker_is_not_listed_and_is_cleaned_up(self, store: Bucket,
                                                                 prefix: str):
        url = store.url(prefix)
        with ocp.CheckpointManager(url) as mngr:
            for s in (1, 2):
                mngr.save(s, args=ocp.args.StandardSave({"x": np.full(5, s)}))
        store.delete(f"{prefix}/2/commit_success.txt")  # a save cut short
        with ocp.CheckpointManager(url) as mngr:
            assert mngr.all_steps() == [1]
            with pytest.raises(StepNotFoundError):
                mngr.restore(2)
        # ocp.utils sees the store as the manager does
        assert ocp.utils.checkpoint_steps(url) == [1]
        assert ocp.utils.is_checkpoint_finalized(f"{url}/1")
        assert not ocp.utils.is_checkpoint_finalized(f"{url}/2")
        assert ocp.utils.is_tmp_checkpoint(f"{url}/2") and not ocp.utils.is_tmp_checkpoint(f"{url}/1")
        assert ocp.utils.tmp_checkpoints(url) == ["2"]
        assert any(k.startswith("2/") for k in store.keys(prefix))  # left alone without cleanup
        opts = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True)
        with ocp.CheckpointManager(url, options=opts) as mngr:
            assert mngr.all_steps() == [1]
            assert not any(k.startswith("2/") for k in store.keys(prefix))
            mngr.save(2, args=ocp.args.StandardSave({"x": np.full(5, 22)}))  # the step again
            mngr.wait_until_finished()
            np.testing.assert_array_equal(mngr.restore(2)["x"], np.full(5, 22))
        with ocp.StandardCheckpointer() as ckptr:  # nor does a checkpointer restore one
            store.delete(f"{prefix}/1/commit_success.txt")
            with pytest.raises(CheckpointNotFoundError):
                ckptr.restore(f"{url}/1")

    def test_checkpointers(self, store: Bucket, prefix: str):
        url = store.url(prefix)
        st = state(3)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(f"{url}/std", st)
            ckptr.wait_until_finished()
            assert_same(ckptr.restore(f"{url}/std"), st)
            abstract = {k: v if isinstance(v, int) else ocp.tree.to_shape_dtype_struct(v)
                        for k, v in st.items()}
            assert_same(ckptr.restore(f"{url}/std", abstract), st)
            meta = ckptr.metadata(f"{url}/std")
            assert meta.item_metadata["big"].shape == st["big"].shape
            with pytest.raises(StepAlreadyExistsError):
                ckptr.save(f"{url}/std", st)
            ckptr.save(f"{url}/std", {"only": np.ones(2)}, force=True)  # replaces it
            ckptr.wait_until_finished()
            assert list(ckptr.restore(f"{url}/std")) == ["only"]
        assert not [k for k in store.keys(prefix) if k.startswith("std/") and "big" in k]
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(f"{url}/pt", {"s": "text", "a": np.arange(4)})
            got = ckptr.restore(f"{url}/pt")
            assert got["s"] == "text"
            np.testing.assert_array_equal(got["a"], np.arange(4))
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(f"{url}/comp", ocp.args.Composite(
                a=ocp.args.StandardSave(st), b=ocp.args.JsonSave({"k": 1})))
            got = ckptr.restore(f"{url}/comp", ocp.args.Composite(
                a=ocp.args.StandardRestore(), b=ocp.args.JsonRestore()))
            assert_same(got.a, st)
            assert got.b == {"k": 1}

    def test_verify_and_corrupt_object(self, store: Bucket, prefix: str):
        url = store.url(prefix)
        st = state(5)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, st)
        report = ocp.verify(url)
        assert report.ok, report.problems
        assert report.arrays_checked == 5 and report.bytes_checked >= st["big"].nbytes
        data_keys = [k for k in store.keys(prefix) if k.startswith("d/")]
        largest = max(data_keys, key=lambda k: store.size(f"{prefix}/{k}"))
        body = bytearray(store.get(f"{prefix}/{largest}"))
        body[len(body) // 2] ^= 0x40
        store.put(f"{prefix}/{largest}", bytes(body))
        with ocp.StandardCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError,
                                                                match="big"):
            ckptr.restore(url)
        report = ocp.verify(url)
        assert not report.ok and any("big" in p for p in report.problems)
        # a damaged document is named too
        store.put(f"{prefix}/_METADATA", b"{not json")
        with ocp.StandardCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError):
            ckptr.restore(url)

    @pytest.mark.parametrize(("use_ocdbt", "use_zarr3"), [(False, False), (True, True),
                                                          (False, True)])
    def test_orbax_other_layouts(self, store: Bucket, prefix: str, use_ocdbt: bool,
                                 use_zarr3: bool):
        """use_ocdbt=False (an array's zarr objects under its name) and use_zarr3=True: saved
        in Orbax's layout, restored and verified; a damaged chunk object is caught."""
        url = store.url(prefix)
        tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": 3}
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(url, args=ocp.args.PyTreeSave(tree))
            assert_same(ckptr.restore(url), tree)
        keys = store.keys(prefix)
        assert ("manifest.ocdbt" in keys) == use_ocdbt
        assert (f"w/{'zarr.json' if use_zarr3 else '.zarray'}" in keys) != use_ocdbt
        assert ocp.verify(url).ok
        if not use_ocdbt:
            chunk = f"{prefix}/w/{'c/0/0' if use_zarr3 else '0.0'}"
            body = bytearray(store.get(chunk))
            body[4] ^= 0x40  # (a byte of w[0, 1], first in the chunk either way)
            store.put(chunk, bytes(body))
            report = ocp.verify(url)
            assert not report.ok and any("'w'" in p for p in report.problems), report.problems

    @pytest.mark.parametrize("in_flight", [1, 4])
    def test_small_arrays_come_in_a_few_ranged_reads(self, store: Bucket, prefix: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      in_flight: int):
        """A restore of many small arrays reads the database's index, then their chunks in a
        few ranged reads of whole stretches of the data file, not a request per chunk, the
        next batches' while the oldest is copied (``in_flight`` batches at a time, one: each
        read, then copied); each chunk is checked against its checksum, and a damaged one
        names its array. Arrays of up to REMOTE_READ_RANGE_BYTES come so."""
        monkeypatch.setattr(ser, "REMOTE_READ_BATCH_BYTES", 256 << 10)  # (several batches)
        monkeypatch.setattr(ser, "REMOTE_READ_BATCHES", in_flight)  # (read at once)
        monkeypatch.setattr(ser, "REMOTE_READ_RANGE_BYTES", 4 << 20)
        url = store.url(prefix)
        rng = np.random.default_rng(7)
        st = {f"w{i:03d}": rng.standard_normal(500 + 7 * i).astype(np.float32)
              for i in range(120)}  # (430 KiB in all)
        st["bf"] = rng.standard_normal((30, 3)).astype(ml_dtypes.bfloat16)  # (stored inline)
        st["mid"] = rng.standard_normal(3 << 18).astype(np.float32)  # 3 MiB: ranged too
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, st)
        reads: list[tuple[str, slice | None]] = []
        real = ts.KvStore.read

        def spied(kv, key, *args, **kwargs):
            reads.append((key, kwargs.get("byte_range")))
            return real(kv, key, *args, **kwargs)

        monkeypatch.setattr(ts.KvStore, "read", spied)
        with ocp.StandardCheckpointer() as ckptr:
            assert_same(ckptr.restore(url), st)
        ranged = [(key, r) for key, r in reads if r is not None]
        assert 3 <= len(ranged) <= 8, reads  # (a range per batch of 256 KiB, "mid" one)
        assert all(key.startswith("d/") for key, _r in ranged)
        assert sum(r.stop - r.start for _key, r in ranged) >= sum(
            np.asarray(v).nbytes for k, v in st.items() if k != "bf")  # (every array's)
        assert len(reads) < 25, reads  # (documents, the manifest: not one per array)
        monkeypatch.undo()  # (its own record of the method, not the unbound ``real``)
        for data_key in {key for key, _r in ranged}:  # (the chunks' files, not a B+tree's)
            body = bytearray(store.get(f"{prefix}/{data_key}"))
            body[len(body) // 2] ^= 0x40
            store.put(f"{prefix}/{data_key}", bytes(body))
        with ocp.StandardCheckpointer() as ckptr, pytest.raises(
                CorruptCheckpointError, match=r"key '(w\d{3}|mid)' fails its checksum"):
            ckptr.restore(url)

    # -- create-once commit marker -------------------------------------------------------------
    def test_marker_is_written_once(self, store: Bucket, prefix: str):
        """``write_new`` creates the marker, and refuses (FileExistsError, nothing written)
        when one is there; the other writer's bytes stay as they were."""
        path = StorePath.parse(store.url(f"{prefix}/5/commit_success.txt"))
        asyncio.run(_objstore.write_new(path, b"mine"))
        assert store.get(f"{prefix}/5/commit_success.txt") == b"mine"
        with pytest.raises(FileExistsError):
            asyncio.run(_objstore.write_new(path, b"theirs"))
        assert store.get(f"{prefix}/5/commit_success.txt") == b"mine"

    def test_a_step_committed_by_another_writer_during_the_save_is_refused(
            self, store: Bucket, prefix: str, monkeypatch: pytest.MonkeyPatch):
        """Another writer commits the step after this save checked it but before its marker:
        the commit raises StepAlreadyExistsError naming the step, and neither the other
        writer's marker nor its objects are overwritten or removed."""
        url = store.url(prefix)
        theirs = b"Checkpoint commit was successful to (the other writer)"
        real = _commit._write_store_marker

        async def other_writer_first(final, replace):
            store.put(f"{prefix}/3/commit_success.txt", theirs)
            store.put(f"{prefix}/3/theirs.bin", b"their object")
            await real(final, replace)

        monkeypatch.setattr(_commit, "_write_store_marker", other_writer_first)
        with ocp.CheckpointManager(url) as mngr:
            assert mngr.save(3, args=ocp.args.StandardSave({"x": np.arange(3)}))
            with pytest.raises(StepAlreadyExistsError, match=re.escape(f"{url}/3 already")):
                mngr.wait_until_finished()
            assert mngr.all_steps() == []  # not counted as this manager's step
        assert store.get(f"{prefix}/3/commit_success.txt") == theirs
        assert store.get(f"{prefix}/3/theirs.bin") == b"their object"  # not aborted away
        monkeypatch.setattr(_commit, "_write_store_marker", real)
        with ocp.CheckpointManager(url) as mngr:
            assert mngr.all_steps() == [3]

    def test_a_marker_write_whose_response_was_lost_commits_the_step(
            self, store: Bucket, prefix: str, monkeypatch: pytest.MonkeyPatch):
        """The marker's PUT is applied but its response lost (a reset, a 500 after the
        write): TensorStore's retry, or its check, finds a marker there. It is this save's
        own, so the step is committed. (It was reported as another writer's, with a
        StepAlreadyExistsError and the step unlisted by the manager that saved it.)"""
        url = store.url(prefix)
        real = _objstore.write_new

        async def applied_then_lost(path, data):
            await real(path, data)
            raise FileExistsError(f"{path} exists")  # (what the retried write finds)

        monkeypatch.setattr(_objstore, "write_new", applied_then_lost)
        with ocp.CheckpointManager(url) as mngr:
            assert mngr.save(3, args=ocp.args.StandardSave(state(3)))
            mngr.wait_until_finished()
            assert mngr.all_steps() == [3]
            assert_same(mngr.restore(3), state(3))

    def test_a_committed_step_is_refused_before_its_documents_are_touched(
            self, store: Bucket, prefix: str, monkeypatch: pytest.MonkeyPatch):
        """When the other writer's marker is already there as the commit starts, the commit
        refuses before writing the step's documents over the other writer's."""
        url = store.url(prefix)
        real = _commit._refuse_committed

        async def other_writer_done(final):
            store.put(f"{prefix}/4/_CHECKPOINT_METADATA", b'{"theirs": 1}')
            store.put(f"{prefix}/4/commit_success.txt", b"theirs")
            await real(final)

        monkeypatch.setattr(_commit, "_refuse_committed", other_writer_done)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(f"{url}/4", {"x": np.arange(3)})
            with pytest.raises(StepAlreadyExistsError, match=re.escape(f"{url}/4 already")):
                ckptr.wait_until_finished()
        assert store.get(f"{prefix}/4/_CHECKPOINT_METADATA") == b'{"theirs": 1}'
        assert store.get(f"{prefix}/4/commit_success.txt") == b"theirs"

    def test_forced_save_replaces_a_committed_step(self, store: Bucket, prefix: str):
        url = f"{store.url(prefix)}/f"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, {"a": np.arange(5)})
            ckptr.wait_until_finished()
            for i in range(2):  # the create-once marker does not stand in a forced save's way
                ckptr.save(url, {"b": np.full(3, i)}, force=True)
                ckptr.wait_until_finished()
                got = ckptr.restore(url)
                assert list(got) == ["b"]
                np.testing.assert_array_equal(got["b"], np.full(3, i))
        assert store.get(f"{prefix}/f/commit_success.txt").startswith(b"Checkpoint commit")

    def test_a_checkpointer_never_deletes_other_objects_under_its_path(self, store: Bucket,
                                                                       prefix: str):
        # A manager's run directory, or any data: objects but no commit marker of its own.
        store.put(f"{prefix}/run/notes.txt", b"keep me")
        with ocp.StandardCheckpointer() as ckptr:
            with pytest.raises(StepAlreadyExistsError, match="holds objects but no committed"):
                ckptr.save(f"{store.url(prefix)}/run", {"a": np.arange(3)})
            assert store.get(f"{prefix}/run/notes.txt") == b"keep me"
            ckptr.save(f"{store.url(prefix)}/run", {"a": np.arange(3)}, force=True)
            ckptr.wait_until_finished()
            np.testing.assert_array_equal(ckptr.restore(f"{store.url(prefix)}/run")["a"],
                                          np.arange(3))
        assert "notes.txt" not in store.keys(f"{prefix}/run")  # force: replaced, as asked

    # -- two saves racing into one prefix ------------------------------------------------------
    @pytest.mark.parametrize("winner", [1, 2])
    def test_two_direct_saves_racing_into_one_prefix(self, store: Bucket, prefix: str,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     winner: int):
        """Two handler saves of different values into one new prefix, both past the check for
        an item there: TensorStore writes both into the item's root database. Save 2 runs
        before save 1 writes (one batch), or once save 1's first batch is in (one array a
        batch). The save whose commit meets the other's database raises
        StepAlreadyExistsError naming the item; the other's item restores bit-exact. Before,
        both succeeded, their commits adding to one database (the item held the later
        save's keys over the earlier's, under either's documents)."""
        from ckpt_async import _stage

        if winner == 1:
            monkeypatch.setattr(_stage, "BATCH_MAX_ARRAYS", 1)
        url = f"{store.url(prefix)}/item"
        errors: dict[int, BaseException | None] = {}

        def tree(value: int) -> dict:
            return {f"a{i}": np.full((300,), value, np.float32) for i in range(4)}

        def save(value: int) -> None:
            try:
                ocp.PyTreeCheckpointHandler().save(url, ocp.args.PyTreeSave(tree(value)))
                errors[value] = None
            except StepAlreadyExistsError as exc:
                errors[value] = exc

        async def nothing_there(self, directory, args):
            return None  # (both saves checked the prefix before either wrote there)

        monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "existing_item", nothing_there)
        _run_other_first(monkeypatch, ser.ItemWriter, "_write_tensorstore", lambda: save(2),
                         after=winner == 1)
        save(1)
        assert [v for v, e in errors.items() if e is None] == [winner], errors
        (lost,) = [e for e in errors.values() if e is not None]
        assert str(lost).startswith(f"{url} already holds a checkpoint item: another save "
                                    "made its manifest.ocdbt while this one wrote"), lost
        got = ocp.PyTreeCheckpointHandler().restore(url)
        assert_same(got, tree(winner))
        assert ocp.verify(url).ok

    def test_two_checkpointer_saves_racing_to_one_path(self, store: Bucket, prefix: str,
                                                       monkeypatch: pytest.MonkeyPatch):
        """Two checkpointers' saves of one new path, in place, both past the look at it: the
        second runs to its end (committed) once the first has looked and before it writes.
        The first meets the second's database and raises StepAlreadyExistsError naming the
        path; it leaves the prefix to the second, whose checkpoint restores bit-exact (round
        41: the loser removed the whole prefix, and a save that found the path empty cleared
        it before writing)."""
        url = f"{store.url(prefix)}/ck"

        def tree(value: int) -> dict:
            return {"x": np.full(8, value, np.float32), "y": np.arange(5) * value}

        def other() -> None:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(url, tree(2))

        _run_other_first(monkeypatch, _commit, "create_tmp", other)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, tree(1))
            with pytest.raises(StepAlreadyExistsError, match=re.escape(url)):
                ckptr.wait_until_finished()
            assert_same(ckptr.restore(url), tree(2))
        assert ocp.verify(url).ok

    def test_a_forced_save_clears_only_what_it_found(self, store: Bucket, prefix: str,
                                                     monkeypatch: pytest.MonkeyPatch):
        """force=True clears what it found at the path, and nothing more. Found empty: another
        save of the path that commits after the forced save looked, before it writes, keeps
        its checkpoint (bit-exact), and the forced save, which meets that save's database,
        raises StepAlreadyExistsError. Found holding a checkpoint: that one is replaced, and
        an object put there after the look stays. Before, the forced save removed the whole
        prefix once it had looked: the other save's committed checkpoint went (its save had
        returned), and the forced save committed its own in its place."""
        url = f"{store.url(prefix)}/ck"

        def tree(value: int) -> dict:
            return {"x": np.full(8, value, np.float32)}

        def other() -> None:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(url, tree(2))

        _run_other_first(monkeypatch, _commit, "create_tmp", other)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, tree(1), force=True)
            with pytest.raises(StepAlreadyExistsError, match=re.escape(url)):
                ckptr.wait_until_finished()
            assert_same(ckptr.restore(url), tree(2))
        assert ocp.verify(url).ok

        _run_other_first(monkeypatch, _commit, "create_tmp",
                         lambda: store.put(f"{prefix}/ck/late.txt", b"put after the look"))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, tree(3), force=True)
            ckptr.wait_until_finished()
            assert_same(ckptr.restore(url), tree(3))
        assert store.get(f"{prefix}/ck/late.txt") == b"put after the look"

    # -- retention deletes ---------------------------------------------------------------------
    def test_retention_deletes_in_the_background_one_step_at_a_time(
            self, store: Bucket, prefix: str, monkeypatch: pytest.MonkeyPatch):
        """A retired step is unlisted (its marker deleted) as soon as the new step commits; its
        objects are deleted by the commit's background task, which save() does not wait for;
        steps are deleted one at a time."""
        url = store.url(prefix)
        gate = asyncio.Event()  # set on the engine loop, which runs the deletions
        running: list[int] = []
        armed: list[bool] = []
        peak = [0]
        real = _objstore.delete_prefix

        async def slow_delete_prefix(path):
            running.append(1)
            peak[0] = max(peak[0], len(running))
            try:
                if armed and path.name == "0":  # retiring step 0 (not a save's clearing)
                    await gate.wait()  # held until the test has seen save() return
                await real(path)
            finally:
                running.pop()

        monkeypatch.setattr(_objstore, "delete_prefix", slow_delete_prefix)
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, max_concurrent_saves=4)
        with ocp.CheckpointManager(url, options=opts) as mngr:
            mngr.save(0, args=ocp.args.StandardSave({"x": np.full(4, 0)}))
            mngr.wait_until_finished()
            armed.append(True)
            mngr.save(1, args=ocp.args.StandardSave({"x": np.full(4, 1)}))
            mngr.save(2, args=ocp.args.StandardSave({"x": np.full(4, 2)}))  # does not wait
            assert mngr.all_steps() == [2]
            deadline = time.monotonic() + 120  # (generous: two busy cores in CI)
            while time.monotonic() < deadline:  # step 0's marker goes first: it is unlisted
                if "0/commit_success.txt" not in store.keys(prefix):  # while held
                    break
                threading.Event().wait(0.01)
            assert "0/commit_success.txt" not in store.keys(prefix)
            assert any(k.startswith("0/") for k in store.keys(prefix))  # objects: still held
            get_runtime().loop.call_soon_threadsafe(gate.set)
            mngr.wait_until_finished()
            assert mngr.all_steps() == [2]
        assert peak[0] == 1  # one step's objects at a time
        assert sorted({k.split("/")[0] for k in store.keys(prefix)}) == ["2"]

    def test_orbax_first_format_checkpoints_restore_from_the_store(self, store: Bucket,
                                                                     prefix: str):
        """Checkpoints Orbax 0.2.3 and 0.4.8 wrote (tests/data/orbax_legacy), put in the
        bucket as Orbax left them there (each with its commit marker): a msgpack file alone
        with one folder per array, and one beside _METADATA with the values in it."""
        from pathlib import Path

        data = Path(__file__).parent / "data" / "orbax_legacy"
        url = store.url(prefix)
        for name in ("orbax-0.2.3/mixed", "orbax-0.4.8/aggregate_all", "orbax-0.4.8/no_ocdbt"):
            for f in (data / name).rglob("*"):
                if f.is_file():
                    store.put(f"{prefix}/{name}/{f.relative_to(data / name)}", f.read_bytes())
            store.put(f"{prefix}/{name}/commit_success.txt", b"")
            got = ocp.PyTreeCheckpointer().restore(f"{url}/{name}")
            np.testing.assert_array_equal(
                got["params"]["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
            assert got["name"] == "run" and got["lst"][1] == 3 and got["empty"] == {}
            assert got["params"]["b"].dtype == ml_dtypes.bfloat16
