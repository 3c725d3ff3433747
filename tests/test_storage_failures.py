"""Full disks and failing storage: a failed background commit is reported, never lost or
half-visible.

- ENOSPC on a real, small tmpfs mounted by the test (root only; skipped with the reason when
  mounting is not permitted): the error reaches the commit future, ``wait_until_finished()``
  and the next ``save()`` as a CommitError naming the path; the temporary directory is gone;
  earlier steps restore; the next save after space is freed succeeds.
- EIO from fsync and from the final rename (monkeypatched): the same contract.
- Stalled storage (an fsync that hangs): ``AsyncOptions(timeout_secs=...)`` fails the commit
  with CommitTimeoutError in time, with no temporary directory left and no step listed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async import _storage
from ckpt_async.errors import CommitError, CommitTimeoutError, NotWritableError
from ckpt_async.manager import _steps

TMPFS_BYTES = 8 * 1024 * 1024
LIMIT_S = 30


def small(step: int) -> dict:
    return {"a": np.arange(1024, dtype=np.float32) + step, "b": np.int64(step)}


def big(step: int) -> dict:  # about 3 MB, compressible poorly (random bits)
    rng = np.random.default_rng(step)
    return {f"w{i}": rng.integers(0, 2**32, 32 * 1024, dtype=np.uint32) for i in range(24)}


def assert_bit_exact(restored: dict, expected: dict) -> None:
    assert set(restored) == set(expected)
    for k, e in expected.items():
        a, e = np.asarray(restored[k]), np.asarray(e)
        assert a.dtype == e.dtype and a.tobytes() == e.tobytes(), k


def leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if _steps.is_leftover(n)]


def manager(directory: Path, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, ocp.CheckpointManagerOptions(**options))


# -- ENOSPC on a real full file system ----------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 8 MiB tmpfs; skipped when this process may not mount one."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                               str(mnt)], capture_output=True, text=True, timeout=LIMIT_S)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small tmpfs to fill")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=LIMIT_S)


def fill(mnt: Path, leave: int) -> Path:
    """Fills ``mnt`` until only ``leave`` bytes are free; returns the filler file."""
    filler = mnt / f"filler-{uuid.uuid4().hex}"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_enospc_reaches_future_and_wait_and_tmp_dir_is_removed(tmpfs):
    directory = tmpfs / "run"
    mngr = manager(directory)
    try:
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        filler = fill(tmpfs, leave=256 * 1024)
        mngr.save(2, args=ocp.args.StandardSave(big(2)))
        exc = mngr.commit_future(2).exception(timeout=LIMIT_S)
        assert isinstance(exc, CommitError), repr(exc)
        assert str(directory) in str(exc), f"the error does not name the path: {exc}"
        assert "No space left" in str(exc) or "ENOSPC" in str(exc) or (
            isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC), exc
        with pytest.raises(CommitError) as raised:
            mngr.wait_until_finished()
        assert raised.value is exc
        assert leftovers(directory) == []
        assert mngr.all_steps() == [1]
        assert sorted(os.listdir(directory)) == ["1"]
        assert_bit_exact(mngr.restore(1), small(1))
        filler.unlink()
        mngr.save(2, args=ocp.args.StandardSave(big(2)))  # the same step, space freed
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
        assert_bit_exact(mngr.restore(2), big(2))
    finally:
        mngr.close()
    reopened = manager(directory)
    try:
        assert reopened.all_steps() == [1, 2]
        assert_bit_exact(reopened.restore(2), big(2))
    finally:
        reopened.close()


def test_enospc_is_raised_by_the_next_save(tmpfs):
    directory = tmpfs / "run"
    mngr = manager(directory, max_to_keep=2)
    try:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave(small(step)))
        mngr.wait_until_finished()
        filler = fill(tmpfs, leave=256 * 1024)
        mngr.save(3, args=ocp.args.StandardSave(big(3)))
        mngr.commit_future(3).exception(timeout=LIMIT_S)  # let it fail in the background
        with pytest.raises(CommitError, match=str(directory)):
            mngr.save(4, args=ocp.args.StandardSave(small(4)))
        # Retention ran for no failed step: both earlier steps are listed and whole.
        assert mngr.all_steps() == [1, 2] and leftovers(directory) == []
        for step in (1, 2):
            assert_bit_exact(mngr.restore(step), small(step))
        filler.unlink()
        mngr.save(3, args=ocp.args.StandardSave(big(3)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]
        assert_bit_exact(mngr.restore(3), big(3))
    finally:
        mngr.close()


def test_enospc_in_small_documents_at_commit(tmpfs, monkeypatch):
    """Space runs out after the arrays are written, while commit writes its documents."""
    directory = tmpfs / "run"
    mngr = manager(directory)
    holder: dict[str, Path] = {}
    real_write = _storage.write_files

    async def write_files(files):
        if any(p.name == "_CHECKPOINT_METADATA" for p, _ in files) and "filler" not in holder:
            holder["filler"] = fill(tmpfs, leave=0)
        await real_write(files)

    monkeypatch.setattr(_storage, "write_files", write_files)
    try:
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        with pytest.raises(CommitError, match="_CHECKPOINT_METADATA") as raised:
            mngr.wait_until_finished()
        assert "No space left" in str(raised.value)
        assert leftovers(directory) == [] and mngr.all_steps() == []
        holder["filler"].unlink()
        monkeypatch.setattr(_storage, "write_files", real_write)
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        assert_bit_exact(mngr.restore(1), small(1))
    finally:
        mngr.close()


# -- EIO (monkeypatched) -----------------------------------------------------------------------
def test_eio_on_fsync_fails_the_commit_cleanly(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    mngr = manager(directory)
    try:
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        real_fsync = os.fsync

        def failing_fsync(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", failing_fsync)
        mngr.save(2, args=ocp.args.StandardSave(small(2)))
        exc = mngr.commit_future(2).exception(timeout=LIMIT_S)
        assert isinstance(exc, CommitError) and "Input/output error" in str(exc), repr(exc)
        # the step first (until round 40 the error named the temporary directory alone,
        # gone by then: "cannot fsync .../2.orbax-checkpoint-tmp-<ns>: Input/output error")
        assert str(exc).startswith(f"saving {directory / '2'} failed: cannot fsync "
                                   f"{directory / '2'}.orbax-checkpoint-tmp-"), str(exc)
        with pytest.raises(CommitError):
            mngr.wait_until_finished()
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert leftovers(directory) == [] and mngr.all_steps() == [1]
        assert_bit_exact(mngr.restore(1), small(1))
        mngr.save(2, args=ocp.args.StandardSave(small(2)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
    finally:
        mngr.close()


def test_eio_on_the_final_rename_fails_the_commit_cleanly(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    mngr = manager(directory)
    real = _storage.rename_noreplace_sync

    def failing(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))

    try:
        monkeypatch.setattr(_storage, "rename_noreplace_sync", failing)
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        with pytest.raises(CommitError, match="cannot rename .*Input/output error"):
            mngr.wait_until_finished()
        assert leftovers(directory) == [] and mngr.all_steps() == []
        monkeypatch.setattr(_storage, "rename_noreplace_sync", real)
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1]
    finally:
        mngr.close()


# -- stalled storage ---------------------------------------------------------------------------
def test_stalled_fsync_times_out_with_commit_timeout_error(tmp_path, monkeypatch):
    """An fsync that hangs (a stalled disk or NFS server) in a worker thread: the timeout
    still fires on time, the tmp directory is removed, no step is listed."""
    directory = tmp_path / "run"
    stall_s, timeout_s = 6.0, 0.5
    real = _storage.fsync_tree_sync

    def stalled(root):
        time.sleep(stall_s)
        real(root)

    mngr = manager(directory, async_options=ocp.AsyncOptions(timeout_secs=timeout_s))
    try:
        monkeypatch.setattr(_storage, "fsync_tree_sync", stalled)
        t0 = time.monotonic()
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        exc = mngr.commit_future(1).exception(timeout=LIMIT_S)
        elapsed = time.monotonic() - t0
        assert isinstance(exc, CommitTimeoutError), repr(exc)
        assert elapsed < stall_s / 2, f"timeout of {timeout_s} s fired after {elapsed:.1f} s"
        with pytest.raises(CommitTimeoutError):
            mngr.wait_until_finished()
        assert leftovers(directory) == [] and mngr.all_steps() == []
        assert not (directory / "1").exists()
        monkeypatch.setattr(_storage, "fsync_tree_sync", real)
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1]
        assert_bit_exact(mngr.restore(1), small(1))
    finally:
        mngr.close()


def test_stalled_array_write_times_out(tmp_path, monkeypatch):
    """A stall inside the engine loop's awaitables (not a thread) also times out cleanly."""
    import asyncio

    from ckpt_async import _commit

    directory = tmp_path / "run"
    real = _commit.commit

    async def stalled(*args, **kwargs):
        await asyncio.sleep(60)
        await real(*args, **kwargs)

    mngr = manager(directory, async_options=ocp.AsyncOptions(timeout_secs=0.3))
    try:
        monkeypatch.setattr(_commit, "commit", stalled)
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        with pytest.raises(CommitTimeoutError, match=str(directory / "1")):
            mngr.wait_until_finished()
        assert leftovers(directory) == [] and mngr.all_steps() == []
    finally:
        mngr.close()


def test_eio_on_the_fsync_after_the_rename_takes_the_step_back(tmp_path, monkeypatch):
    """The parent directory's fsync after the commit's rename fails: the rename is not known
    to be durable and the commit raises, so the step must not be left on disk (it used to be:
    the manager did not list it, a reopened one did, and saving it again was refused)."""
    directory = tmp_path / "run"
    real = _storage._fsync_path

    def failing(path, **kwargs):
        if path == str(tmp_path / "run"):  # (the manager's directory: after the rename)
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real(path, **kwargs)

    mngr = manager(directory)
    try:
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        monkeypatch.setattr(_storage, "_fsync_path", failing)
        mngr.save(2, args=ocp.args.StandardSave(small(2)))
        with pytest.raises(CommitError) as raised:
            mngr.wait_until_finished()
        assert sorted(os.listdir(directory)) == ["1"]
        assert mngr.all_steps() == [1]
        assert re.search(r"cannot rename .*/2: Input/output error \(fsync of .*the rename was "
                         r"undone\)", str(raised.value)), raised.value
        monkeypatch.setattr(_storage, "_fsync_path", real)
        mngr.save(2, args=ocp.args.StandardSave(small(2)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2]
        assert_bit_exact(mngr.restore(2), small(2))
    finally:
        mngr.close()


def test_eio_on_the_fsync_after_a_forced_replace_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """The same after a forced save's atomic exchange: the old checkpoint is put back."""
    path = tmp_path / "ckpt"
    real = _storage._fsync_path

    def failing(p, **kwargs):
        if p == str(tmp_path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), p)
        return real(p, **kwargs)

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, small(1))
        ckptr.wait_until_finished()
        monkeypatch.setattr(_storage, "_fsync_path", failing)
        with pytest.raises(CommitError) as raised:
            ckptr.save(path, small(2), force=True)
            ckptr.wait_until_finished()
        monkeypatch.setattr(_storage, "_fsync_path", real)
        assert sorted(os.listdir(tmp_path)) == ["ckpt"]
        assert_bit_exact(ckptr.restore(path), small(1))
        assert "the rename was undone" in str(raised.value), raised.value


def test_a_directory_refusing_creation_raises_not_writable(tmp_path, monkeypatch):
    """EACCES where ``os.access`` said the parent may be written (root on NFS with root
    squashed, a security module): the manager's directory, and a save's after it was removed
    under a running manager, raise NotWritableError naming it, as a read-only file system
    does (both raised CommitError, the first at construction)."""
    real = os.mkdir

    def refusing(path, *args, **kwargs):
        if os.fspath(path).startswith(str(tmp_path / "run")):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing)
    with pytest.raises(NotWritableError, match=f"cannot create directory {tmp_path / 'run'}"):
        manager(tmp_path / "run")
    monkeypatch.setattr(os, "mkdir", real)
    mngr = manager(tmp_path / "run")
    try:
        mngr.save(1, args=ocp.args.StandardSave(small(1)))
        mngr.wait_until_finished()
        shutil.rmtree(tmp_path / "run")
        monkeypatch.setattr(os, "mkdir", refusing)
        with pytest.raises(NotWritableError, match=f"cannot create directory {tmp_path / 'run'}"):
            mngr.save(2, args=ocp.args.StandardSave(small(2)))
        assert os.listdir(tmp_path) == []
        monkeypatch.setattr(os, "mkdir", real)
        mngr.save(2, args=ocp.args.StandardSave(small(2)))
        mngr.wait_until_finished()
        assert_bit_exact(mngr.restore(2), small(2))
    finally:
        mngr.close()


def test_a_data_file_write_error_names_the_file_and_item(tmp_path, monkeypatch):
    """A full disk met by the array data's ``writev`` (whose OSError names no file): the
    CommitError names the step, the item and the data file (it named only the step)."""
    directory = tmp_path / "run"
    real = os.writev

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # (as the kernel's: no name)

    mngr = ocp.CheckpointManager(directory, item_names=("params",))
    try:
        monkeypatch.setattr(os, "writev", full)
        mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(big(1))))
        with pytest.raises(CommitError) as raised:
            mngr.wait_until_finished()
        message = str(raised.value)
        assert f"saving {directory / '1'} failed" in message and "No space left" in message
        assert re.search(
            rf"{directory}/1\.orbax-checkpoint-tmp-\d+/params/ocdbt\.process_0/d/\w+", message), \
            message
        assert leftovers(directory) == [] and mngr.all_steps() == []
        monkeypatch.setattr(os, "writev", real)
        mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(big(1))))
        mngr.wait_until_finished()
        assert_bit_exact(mngr.restore(1)["params"], big(1))
    finally:
        mngr.close()


def test_a_failed_array_write_waits_for_the_others_before_the_directory_goes(tmp_path,
                                                                             monkeypatch):
    """A compressed save (written through TensorStore's zarr driver): array 'b' fails while
    'a' of the same batch is still being written. The temporary directory is removed only
    once 'a' has landed (its write landed after the removal and left the directory behind).
    'a' waits for the removal to start, or half a second where nothing removes before it."""
    import threading

    from ckpt_async import _serialize

    real_write, real_rmtree = _serialize.write_array, _storage.rmtree
    removing = threading.Event()
    events: list[str] = []

    async def write_array(ctx, item_dir, arr, **kwargs):
        if arr.name == "b":
            raise OSError("injected failure writing b")
        await asyncio.to_thread(removing.wait, 0.5)
        await real_write(ctx, item_dir, arr, **kwargs)
        events.append("a written")

    async def rmtree(path):
        events.append("removal")
        removing.set()
        await real_rmtree(path)

    monkeypatch.setattr(_serialize, "write_array", write_array)
    monkeypatch.setattr(_storage, "rmtree", rmtree)
    handler = ocp.PyTreeCheckpointHandler(use_compression=True)
    with pytest.raises(CommitError, match="injected failure writing b"), \
            ocp.Checkpointer(handler) as ckptr:
        ckptr.save(tmp_path / "c", args=ocp.args.PyTreeSave({"a": np.arange(4),
                                                              "b": np.ones(3)}))
    assert events == ["a written", "removal"]
    assert os.listdir(tmp_path) == []
