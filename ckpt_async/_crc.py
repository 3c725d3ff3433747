"""The CRC-32 of every checksum ckpt_async writes or checks (zlib's, IEEE 802.3).

``crc32(data, value=0)`` is zlib's ``crc32``, from zlib-ng when the optional ``fast`` extra is
installed (``pip install ckpt_async[fast]``: the ``zlib-ng`` package), else from Python's own
zlib. Both give the same values, so a checkpoint written with either is checked by the other.
On this project's 2-core benchmark machine zlib's ran at 4.0-4.2 GB/s on one core and
zlib-ng's at 22-28 GB/s (64 KiB to 1 MiB buffers); a save takes each array's crc32 as it writes
it and a restore checks each one as it reads it, so with plain zlib the checksums are a good
part of the CPU time of both (docs/performance.md). Both release the GIL on buffers over 5 KiB.

``CKPT_ASYNC_CRC32=zlib`` keeps Python's zlib even where zlib-ng is installed (``zlib-ng``
asks for it: an ImportError names the missing package when it is not there).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from ._runtime import env_choice

ENV = "CKPT_ASYNC_CRC32"
CHOICES = ("auto", "zlib", "zlib-ng")


def _pick(choice: str) -> tuple[Callable[..., int], str]:
    """The crc32 function for ``choice`` (one of :data:`CHOICES`) and its implementation's
    name."""
    if choice != "zlib":
        try:
            from zlib_ng import zlib_ng
        except ImportError as exc:
            if choice == "zlib-ng":
                raise ImportError(f"{ENV}=zlib-ng: the zlib-ng package is not installed "
                                  "(pip install ckpt_async[fast])") from exc
        else:
            return zlib_ng.crc32, "zlib-ng"
    return zlib.crc32, "zlib"


def _from_env() -> str:
    return env_choice(ENV, CHOICES, "auto")


#: ``crc32(data, value=0)``: zlib's crc32 of a contiguous buffer (bytes, memoryview,
#: ``ndarray.data``), continued from ``value``.
crc32: Callable[..., int]
crc32, IMPLEMENTATION = _pick(_from_env())
