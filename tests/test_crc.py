"""The crc32 of every checksum: zlib-ng's (the ``fast`` extra) where installed, else zlib's;
both give the same values, so checkpoints written with one are checked by the other."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async import _crc
from ckpt_async.errors import CorruptCheckpointError

zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")  # (in the test extra: never skipped in CI)


def test_the_default_is_zlib_ng_where_it_is_installed():
    assert _crc._pick("auto") == (zlib_ng.crc32, "zlib-ng")
    assert (_crc.crc32, _crc.IMPLEMENTATION) == _crc._pick(_crc._from_env())
    assert _crc._pick("zlib") == (zlib.crc32, "zlib")


@pytest.mark.parametrize("size", [0, 1, 7, 5 * 1024 - 1, 5 * 1024 + 3, 64 << 10, (1 << 20) + 13])
def test_zlib_ng_gives_zlibs_values(size):
    data = np.random.default_rng(size).integers(0, 256, size + 5, np.uint8)
    for view in (data[:size], data[5:]):  # (an unaligned start too)
        buf = memoryview(view)
        assert _crc._pick("zlib-ng")[0](buf) == zlib.crc32(buf)
        # continued from a value: a range's crc32 taken piece by piece
        half = len(buf) // 2
        assert (_crc.crc32(buf[half:], _crc.crc32(buf[:half]))
                == zlib.crc32(buf[half:], zlib.crc32(buf[:half])) == zlib.crc32(buf))
    arr = np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32)
    assert _crc.crc32(arr.data) == zlib.crc32(arr.tobytes())  # (a multi-dimensional buffer)


def test_asking_for_zlib_ng_without_it_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "zlib_ng", None)  # (an import of it now fails)
    with pytest.raises(ImportError, match=r"CKPT_ASYNC_CRC32=zlib-ng.*ckpt_async\[fast\]"):
        _crc._pick("zlib-ng")
    assert _crc._pick("auto") == (zlib.crc32, "zlib")


def test_an_unknown_choice_warns_and_takes_the_default(monkeypatch, caplog):
    monkeypatch.setenv(_crc.ENV, "crc32c")
    with caplog.at_level(logging.WARNING, logger="ckpt_async"):
        assert _crc._from_env() == "auto"
    assert "CKPT_ASYNC_CRC32='crc32c'" in caplog.text
    monkeypatch.setenv(_crc.ENV, " ZLIB ")
    assert _crc._from_env() == "zlib"


_IN_OTHER = r"""
import json, sys
import numpy as np
import ckpt_async as ocp
from ckpt_async import _crc
path, action = sys.argv[1], sys.argv[2]
tree = {"big": np.arange(1 << 18, dtype=np.float32),
        "small": {f"a{i}": np.full((64, 64), i, np.float32) for i in range(40)}}
ok = True
with ocp.PyTreeCheckpointer() as ckptr:
    if action == "save":
        ckptr.save(path, tree)
    elif action == "restore":
        out = ckptr.restore(path)
        ok = all(np.array_equal(out["small"][k], v) for k, v in tree["small"].items()) and \
            np.array_equal(out["big"], tree["big"])
print(json.dumps({"impl": _crc.IMPLEMENTATION, "ok": ok, "verified": ocp.verify(path).ok}))
"""


def _in_other(path: Path, action: str, crc: str) -> dict:
    env = {**os.environ, _crc.ENV: crc, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _IN_OTHER, str(path), action], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("saved_with,checked_with", [("zlib", "zlib-ng"), ("zlib-ng", "zlib")])
def test_checkpoints_move_between_the_two(tmp_path, saved_with, checked_with):
    path = tmp_path / "c"
    assert _in_other(path, "save", saved_with) == {"impl": saved_with, "ok": True,
                                                    "verified": True}
    assert _in_other(path, "restore", checked_with) == {"impl": checked_with, "ok": True,
                                                         "verified": True}
    # and damage is caught by the other one as well
    data = max((p for p in path.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="big"), ocp.PyTreeCheckpointer() as ckptr:
        ckptr.restore(path)  # (this process's crc32)
    assert _in_other(path, "verify", checked_with)["verified"] is False
