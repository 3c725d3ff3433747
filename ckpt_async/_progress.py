"""Progress of long saves and restores: bytes written and read, reported to listeners.

>>> def show(ev): print(f"{ev.kind} {ev.path}: {ev.done_bytes}/{ev.total_bytes}")
>>> with ckpt_async.progress(show):                      # doctest: +SKIP
...     mngr.save(step, args=ckpt_async.args.StandardSave(state)); mngr.wait_until_finished()

Listeners are called on the engine thread after each batch of arrays is written or each array
is read; they must be quick and must not call back into ckpt_async's sync face.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("ckpt_async")


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """``kind`` is ``"save"`` or ``"restore"``; ``total_bytes`` is None when not known ahead."""

    kind: str
    path: str
    done_bytes: int
    total_bytes: int | None


_listeners: list[Callable[[ProgressEvent], None]] = []
_lock = threading.Lock()


@contextlib.contextmanager
def progress(callback: Callable[[ProgressEvent], None]) -> Iterator[None]:
    """Calls ``callback(ProgressEvent)`` for every save and restore while the block runs."""
    with _lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(callback)


class Tracker:
    """Counts one save's or restore's bytes and tells the listeners (cheap when none)."""

    def __init__(self, kind: str, path: object, total_bytes: int | None) -> None:
        self.kind = kind
        self.path = str(path)
        self.total = total_bytes
        self.done = 0

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if not _listeners:
            return
        event = ProgressEvent(self.kind, self.path, self.done, self.total)
        for listener in list(_listeners):
            try:
                listener(event)
            except Exception:  # a broken progress bar must not fail a checkpoint
                log.exception("progress listener %r failed", listener)
