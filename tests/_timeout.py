"""A guard for tests whose failure mode is a hang."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_thread(fn: Callable[[], T], timeout: float = 60) -> T:
    """fn() in a daemon thread: its result or its exception, or a test failure if it has not
    returned within ``timeout`` seconds (a hang fails the test rather than the suite)."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            err.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if err:
        raise err[0]
    assert out, f"{fn} did not return within {timeout} s"
    return out[0]
