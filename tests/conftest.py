"""Test setup: four CPU devices for sharded-array tests (set before jax is imported)."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"


import pytest  # noqa: E402 - after the environment above


@pytest.fixture(scope="module")
def mesh():
    """The four CPU devices as a 2 x 2 mesh ("x", "y")."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    assert len(jax.devices()) == 4, "the environment above sets four CPU devices"
    return Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The path of every file and directory fsynced from here on (``os.fsync``, by the
    descriptor's ``/proc/self/fd`` link), in order."""
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs Linux's /proc to name a descriptor's file")
    seen: list[str] = []
    real = os.fsync

    def recording(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def _evict(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def evict():
    """Drops files' pages from the page cache (written back first), as a job restarting on
    another day finds them: ``evict(paths)``."""
    return _evict
