"""Orbax's futures (``ocp.future``), for handlers written to Orbax's interface: an
``async_save`` returns futures whose ``result()`` the commit waits for (any object with
``result()`` will do; these are the ones Orbax's handlers and their users build).

``CommitFuture`` here is Orbax's (a coroutine run in a thread of its own), not
:class:`ckpt_async.CommitFuture`, the awaitable completion of a manager's save.

Orbax's signals (``send_signals``, ``receive_signals``, the awaitable signals contract) order
a handler's background writes after the directories Orbax creates asynchronously. ckpt_async
creates an item's directory before its handler's ``async_save`` is called, so there is
nothing to wait for: they are accepted and have no effect.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, runtime_checkable

from ._runtime import get_runtime


@runtime_checkable
class Future(Protocol):
    """What ``async_save`` returns a sequence of: ``result()`` waits for an operation that is
    already running (it does not start it)."""

    def result(self, timeout: float | None = None) -> Any:
        ...


class NoopFuture:
    """A future of nothing: done from the start."""

    def result(self, timeout: float | None = None) -> Any:
        return None

    def cancel(self) -> None:
        pass


def _remaining(start: float, timeout: float | None) -> float | None:
    return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))


class ChainedFuture:
    """Several futures, then a callback: ``result()`` waits for each in turn (within one
    ``timeout`` for them all) and then calls ``cb`` once."""

    def __init__(self, futures: Sequence[Any], cb: Callable[[], None]) -> None:
        self._futures = list(futures)
        self._cb: Callable[[], None] | None = cb

    def result(self, timeout: float | None = None) -> Any:
        start = time.monotonic()
        for done, future in enumerate(self._futures):
            try:
                future.result(timeout=_remaining(start, timeout))
            except TimeoutError as exc:
                raise TimeoutError(f"ChainedFuture: {done} of {len(self._futures)} futures "
                                   f"done after {time.monotonic() - start:.2f} s") from exc
        cb, self._cb = self._cb, None
        if cb is not None:
            cb()

    def cancel(self) -> None:
        for future in self._futures:
            if hasattr(future, "cancel"):
                future.cancel()


class CommitFuture:
    """Runs ``coro`` at once, in a thread of its own with its own event loop; ``result()``
    waits for it and raises what it raised (``TimeoutError`` when ``timeout`` passes first)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None,
                 send_signals: Sequence[Any] | None = None,
                 receive_signals: Sequence[Any] | None = None,
                 timeout_secs: int | None = None, operation_id: str | None = None) -> None:
        self.name = name
        self._done, self._cancel = get_runtime().start_own_loop(coro, name)

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._done.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.name or 'CommitFuture'} did not finish within "
                               f"{timeout} s") from None

    def cancel(self) -> None:
        """Cancels the coroutine (``result()`` then raises ``CancelledError``)."""
        self._cancel()


class CommitFutureAwaitingContractedSignals(CommitFuture):
    """Orbax's usual future of a handler's background write: a :class:`CommitFuture` (the
    contracted signals it would wait for have no counterpart in ckpt_async)."""


__all__ = ["ChainedFuture", "CommitFuture", "CommitFutureAwaitingContractedSignals", "Future",
           "NoopFuture"]
