"""Checks shared by the test modules."""

from __future__ import annotations

import sys

import numpy as np
import pytest

#: CPython 3.12.0-3.12.2 start no thread once exit has begun, even in a hook that runs before
#: the non-daemon threads are joined (gh-113964, fixed in 3.12.3): a commit in flight at exit
#: whose next step needs a new worker thread fails there, logged, its temporary directory
#: left behind. Tests of commits finished at exit then fail, as the guide says they do.
NO_THREADS_AT_EXIT = pytest.mark.xfail(
    (3, 12, 0) <= sys.version_info[:3] < (3, 12, 3), strict=True,
    reason="CPython 3.12.0-3.12.2 start no thread at interpreter exit (gh-113964)")

#: (use_ocdbt, use_zarr3) of Orbax's layouts other than the default (OCDBT, zarr v2).
LAYOUTS = [
    pytest.param(False, False, id="plain-zarr2"),
    pytest.param(True, True, id="ocdbt-zarr3"),
    pytest.param(False, True, id="plain-zarr3"),
]


def assert_bits_equal(actual, expected) -> None:
    """Same dtype, shape and bytes (so -0.0 and NaN payloads count)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype.itemsize:
        np.testing.assert_array_equal(actual.reshape(-1).view(np.uint8),
                                      expected.reshape(-1).view(np.uint8))


def fail_host_copy(monkeypatch, leaf: str) -> None:
    """Makes staging fail at the host copy of leaf ``leaf`` (``RuntimeError('... lost ...')``),
    as a device that loses an array mid-save: after the leaves before it were staged."""
    import ckpt_async._stage as stage

    real = stage.host_copy

    def host_copy(value, name, *args, **kwargs):
        if name == leaf:
            raise RuntimeError(f"the device lost leaf {name!r}")
        return real(value, name, *args, **kwargs)

    monkeypatch.setattr(stage, "host_copy", host_copy)


def files_under(directory) -> list[str]:
    """The files below ``directory`` (a ``pathlib.Path``), as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
