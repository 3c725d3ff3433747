"""Several processes under ``jax.distributed``: who is primary, barriers and small agreements.

Every process of a multi-controller JAX run calls ``save`` and ``restore`` together. Each one
writes the shards it owns; the primary process (``MultiprocessingOptions.primary_host``, default
0) creates the step's temporary directory, writes the documents, merges the per-process OCDBT
databases and commits. They meet at barriers kept in the distributed client's key-value store:

- a process arrives at a barrier with ``ok`` or with its error; everyone waits until all have
  arrived, and raises :class:`~ckpt_async.errors.ProcessFailedError` naming the processes that
  failed (and why) as soon as one arrives with an error;
- a barrier that is not complete within the timeout raises
  :class:`~ckpt_async.errors.BarrierTimeoutError` on every waiting process, naming the processes
  that did not arrive; no step becomes visible. A process that gives up says so in its key, so
  a process still waiting, or arriving late, raises it at once (naming who gave up, where)
  rather than going on alone into a wait of its own full timeout.

Keys are ``ckpt_async/<operation>/<phase>/<process>``; an operation is named after what it does
and where (``save:/ckpts/7:op``), so every process derives the same names as long as they call
the same operations, as multi-controller JAX requires. Each process leaves an operation once
it reads none of its keys again, whatever its outcome; the last one to leave deletes them all,
so a long run leaves nothing behind in the store. An operation called again (a step saved
again after a delete) has the same keys: a process joins it only once every process has left
the previous call and its keys are gone, so nothing is kept per operation in the processes
either.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax

from ._runtime import get_runtime
from .errors import (
    BarrierTimeoutError,
    InvalidArgumentError,
    ProcessFailedError,
    StepAlreadyExistsError,
)

KEY_PREFIX = "ckpt_async"

log = logging.getLogger("ckpt_async")


@dataclasses.dataclass(frozen=True)
class Roles:
    """This process's place in the run: its index, how many there are, which one is primary."""

    index: int = 0
    count: int = 1
    primary: int = 0

    @property
    def is_primary(self) -> bool:
        return self.index == self.primary

    @property
    def multi(self) -> bool:
        return self.count > 1


_current: contextvars.ContextVar[Roles | None] = contextvars.ContextVar("ckpt_async_roles",
                                                                       default=None)


def reached_preemption(step: int) -> bool:
    """Whether JAX's preemption sync point was reached at ``step`` (False without a
    preemption service)."""
    try:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # noqa: BLE001 - no preemption service: not preempted
        return False


def initialize_runtime_to_distributed_ids() -> None:
    """Orbax's setup call after ``jax.distributed.initialize()`` (MaxText makes it): ckpt_async
    keeps no mapping of process ids to set up (every process is known by
    ``jax.process_index()``), so there is nothing to do."""


def is_runtime_to_distributed_ids_initialized() -> bool:
    """True: ckpt_async needs no mapping (:func:`initialize_runtime_to_distributed_ids`)."""
    return True


def initialize_distributed_to_device_ids() -> None:
    """Orbax's other setup call after ``jax.distributed.initialize()`` (MaxText makes it
    right after :func:`initialize_runtime_to_distributed_ids`): ckpt_async keeps no mapping of
    process ids to device ids either, so there is nothing to do."""


def is_distributed_to_device_ids_initialized() -> bool:
    """True: ckpt_async needs no mapping (:func:`initialize_distributed_to_device_ids`)."""
    return True


def is_pathways_backend() -> bool:
    """False: ckpt_async runs on JAX's own multi-process runtime, not on Pathways."""
    return False


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary_host(primary_host: int | None = 0) -> bool:
    """Whether this process is ``primary_host``; True on every process for None (every
    process is its own primary, as in Orbax: a handler given ``primary_host=None`` writes on
    each one)."""
    return primary_host is None or process_index() == primary_host


def roles_for(options: Any = None) -> Roles:
    """The roles under ``options`` (a ``MultiprocessingOptions``, or None for the defaults)."""
    primary = getattr(options, "primary_host", 0) or 0
    if getattr(options, "active_processes", None) is not None:
        raise InvalidArgumentError(
            "MultiprocessingOptions.active_processes is not supported: every process of the "
            "run takes part in each save")
    count = process_count()
    if not 0 <= primary < count:
        raise InvalidArgumentError(f"primary_host={primary} is not a process of this run "
                                   f"(processes 0..{count - 1})")
    return Roles(process_index(), count, primary)


def current_roles() -> Roles:
    """The roles of the save or restore running in this context (set by the checkpointer)."""
    roles = _current.get()
    return roles if roles is not None else roles_for()


def use_roles(roles: Roles) -> contextvars.Token[Roles | None]:
    """Makes ``roles`` the current roles (``current_roles``) until ``reset_roles(token)``."""
    return _current.set(roles)


def reset_roles(token: contextvars.Token[Roles | None]) -> None:
    _current.reset(token)


def _client() -> Any:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise InvalidArgumentError(
            "several JAX processes but no distributed client: call jax.distributed.initialize()")
    return client


def sync_global_processes(name: str, timeout_secs: float = 600,
                          processes: Iterable[int] | None = None, *,
                          timeout: float | None = None,
                          barrier_sync_fn: Callable[..., None] | None = None,
                          record_event_name: str | None = None) -> None:
    """Blocks until every process (or those in ``processes``) has called this with ``name``.
    Single-process, or with ``processes`` this one alone: returns at once. Orbax's keywords
    too: ``timeout`` (seconds, for ``timeout_secs``) and ``barrier_sync_fn`` (called as
    ``fn(key=name, timeout_ms=...)`` instead of the distributed client's barrier);
    ``record_event_name`` is accepted."""
    if timeout is not None:
        timeout_secs = timeout
    processes = None if processes is None else sorted(set(processes))
    if process_count() <= 1 or processes == [process_index()]:  # (nobody else to wait for)
        return
    timeout_ms = int(timeout_secs * 1000)
    if barrier_sync_fn is not None:
        barrier_sync_fn(key=name, timeout_ms=timeout_ms)
        return
    _client().wait_at_barrier(f"{KEY_PREFIX}/{name}", timeout_ms, processes)


#: Orbax's older name of :func:`sync_global_processes`.
sync_global_devices = sync_global_processes


class BarrierSyncFn(Protocol):
    """A barrier: blocks until every process taking part has called it with ``key``, or
    ``timeout_ms`` has passed."""

    def __call__(self, *, key: str, timeout_ms: int) -> None: ...


def get_barrier_sync_fn(*, processes: Iterable[int] | None = None) -> BarrierSyncFn:
    """A barrier across every process (or those in ``processes``), as Orbax's
    ``get_barrier_sync_fn`` gives it: ``fn(key=..., timeout_ms=...)``, a no-op when nobody
    else takes part; ``ValueError`` if this process is not among ``processes``."""
    wanted = None if processes is None else sorted(set(processes))
    if wanted is not None and process_index() not in wanted:
        raise InvalidArgumentError(f"a barrier across processes {wanted} was asked for in process "
                                   f"{process_index()}, which is not among them")

    def barrier(*, key: str, timeout_ms: int) -> None:
        sync_global_processes(key, timeout_ms / 1000, wanted)

    return barrier


def broadcast_one_to_all(in_tree: Any, is_source: bool | None = None) -> Any:
    """``in_tree`` of the source process (process 0 unless ``is_source`` says) on every
    process (jax's ``multihost_utils.broadcast_one_to_all``, as Orbax calls it)."""
    from jax.experimental import multihost_utils

    if is_source is None:
        is_source = process_index() == 0
    return multihost_utils.broadcast_one_to_all(in_tree, is_source=is_source)


class Sync:
    """Barriers and broadcasts of one collective operation, over the distributed KV store.
    Every process calls :meth:`leave` once it is done with the operation (it went through
    or failed): the last one deletes its keys.

    The keys are ``<prefix>/<what>:op/...``, the same each time ``what`` is used again (a
    step saved again after a delete): a process joins a use only once every process has left
    the one before, whose keys the last of them deleted (:meth:`_join`), so no use reads
    another's keys, and the process keeps nothing per operation name."""

    def __init__(self, what: str, roles: Roles, timeout: float | None,
                 key_prefix: str | None = None, *, label: str | None = None) -> None:
        self.what = label or what  # errors say this
        self.roles = roles
        self.timeout = 600.0 if timeout is None else float(timeout)
        self.root = f"{key_prefix or KEY_PREFIX}/{what}:op"
        self._joining: asyncio.Future[None] | None = None
        self._left = False

    async def _join(self) -> None:
        """Marks this process in the operation's keys (``<root>/joined/<process>``, counted
        up), once the previous use of the name has ended everywhere: this process's mark of
        that use is there until every process has left it and the last deleted its keys
        (deletion of a directory is one step of the store). Before the first key of this
        process is written or read, so once per operation; raises BarrierTimeoutError when
        the previous use does not end within the timeout (a process still in it, or one that
        never left it)."""
        if self._joining is None:
            self._joining = asyncio.ensure_future(self._mark())
        await asyncio.shield(self._joining)

    async def _mark(self) -> None:
        client = _client()
        rt = get_runtime()
        key = f"{self.root}/joined/{self.roles.index}"
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while await rt.to_thread(client.key_value_increment, key, 1) > 1:
            if time.monotonic() > deadline:
                raise BarrierTimeoutError(
                    f"{self.what}: its previous use (the same operation, called again) did "
                    f"not end on every process within {self.timeout:g} s; nothing was "
                    "committed")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    def _key(self, phase: str, index: int | None = None) -> str:
        return f"{self.root}/{phase}/" + ("" if index is None else str(index))

    async def arrive(self, phase: str, error: BaseException | str | None = None,
                     note: str = "") -> dict[int, str]:
        """Arrives at ``phase`` and waits until every process has; returns each process's
        ``note`` (what it brought along: its tree's digest, say), by process.

        Arriving with ``error`` tells the others this process failed; a failed process other
        than the primary returns at once (its caller raises its own error), while the primary
        still waits for everyone, so it cleans up only once nobody writes any more. Raises
        ProcessFailedError naming the processes that arrived with an error, and
        BarrierTimeoutError naming those that did not arrive within the timeout (this
        process's, or another's that gave up: its key says so, ``timeout:<why>``).

        An error that is a StepAlreadyExistsError (a lost race: another save of the same path
        made a database this save wrote into, or committed first) is carried as such
        (``lost:<why>``): where any process that arrived lost the race, this process raises
        StepAlreadyExistsError instead of ProcessFailedError, so that every process of the
        save treats it as lost (the prefix is the other save's: each removes only its own).
        """
        await self._join()
        client = _client()
        key = self._key(phase, self.roles.index)
        value = f"ok:{note}" if error is None else (
            "lost:" if isinstance(error, StepAlreadyExistsError) else "error:") + (
            str(error) or type(error).__name__)
        rt = get_runtime()
        await rt.to_thread(client.key_value_set, key, value)
        if error is not None and not self.roles.is_primary:
            return {}
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            entries = await rt.to_thread(client.key_value_dir_get, self._key(phase))
            arrived = {int(k.rsplit("/", 1)[1]): v for k, v in entries}
            everyone = len(arrived) >= self.roles.count
            failed = {i: v.split(":", 1)[1] for i, v in arrived.items()
                      if v.startswith(("error:", "lost:")) and i != self.roles.index}
            if failed and (everyone or not self.roles.is_primary):
                lost = sorted((i, v[5:]) for i, v in arrived.items() if v.startswith("lost:"))
                if lost:
                    i, why = lost[0]
                    raise StepAlreadyExistsError(
                        f"{self.what}: another save of the same path got there first: process "
                        f"{i} found it there before '{phase}' ({why}); this save was abandoned "
                        "on every process, each removing only its own files; nothing was "
                        "committed")
                raise ProcessFailedError(
                    f"{self.what}: process{'es' if len(failed) > 1 else ''} "
                    + ", ".join(f"{i} ({msg})" for i, msg in sorted(failed.items()))
                    + f" failed before '{phase}'; nothing was committed")
            gave_up = sorted((i, v[8:]) for i, v in arrived.items()
                             if v.startswith("timeout:") and i != self.roles.index)
            if gave_up:  # (everyone may be here now: the one that gave up has gone all the same)
                i, why = gave_up[0]
                raise BarrierTimeoutError(
                    f"{self.what}: process {i} gave up waiting at '{phase}' before this "
                    f"process could go on ({why}); nothing was committed")
            if everyone:
                return {i: v[3:] for i, v in arrived.items() if v.startswith("ok:")}
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.roles.count)) - set(arrived))
                why = (f"process{'es' if len(missing) > 1 else ''} "
                       f"{', '.join(map(str, missing))} did not reach '{phase}' within "
                       f"{self.timeout:g} s")
                try:  # (the others, and late comers, raise at once rather than wait on)
                    await rt.to_thread(client.key_value_set, key, "timeout:" + why, True)
                except Exception as exc:  # noqa: BLE001 - the others time out on their own
                    log.debug("%s: could not say this process gave up: %s", self.what, exc)
                raise BarrierTimeoutError(f"{self.what}: {why}; nothing was committed")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    async def broadcast(self, phase: str, value: str | None = None,
                        source: int | None = None) -> str:
        """The ``value`` of process ``source`` (the primary unless given) on every process
        (``source`` passes it, the others None)."""
        await self._join()
        client = _client()
        source = self.roles.primary if source is None else source
        key = self._key(phase, source)
        rt = get_runtime()
        if self.roles.index == source:
            assert value is not None
            await rt.to_thread(client.key_value_set, key, value)
            return value
        try:
            return await rt.to_thread(client.blocking_key_value_get, key,
                                      int(self.timeout * 1000))
        except Exception as exc:  # jax raises a plain XlaRuntimeError on DEADLINE_EXCEEDED
            who = "primary process" if source == self.roles.primary else "process"
            raise BarrierTimeoutError(
                f"{self.what}: {who} {source} did not provide "
                f"'{phase}' within {self.timeout:g} s ({exc}); nothing was committed") from exc

    async def leave(self) -> None:
        """This process is done with the operation: it reads none of its keys again (it went
        through, or failed here or elsewhere). Each process counts itself out on
        ``<root>/left``; the one that makes the count complete is the last reader, and deletes
        every key of the operation (its directory), including those of processes that failed
        early. A second call does nothing. A cancel arriving meanwhile (leave() runs where its
        caller was cancelled, so this is often the second) is raised once that is done. (A
        process that never takes part, one dead or never called, leaves the keys behind:
        nobody can tell it will not come.)"""
        if self._left:
            return
        self._left = True
        # (a task of its own, awaited to its end: leave() runs where its caller was cancelled,
        # and a second cancel arriving meanwhile must not skip the deletion; it is raised after)
        counting = asyncio.ensure_future(self._count_out())
        cancelled: asyncio.CancelledError | None = None
        while not counting.done():
            try:
                await asyncio.shield(counting)
            except asyncio.CancelledError as exc:
                cancelled = exc
        counting.result()
        if cancelled is not None:
            raise cancelled

    async def _count_out(self) -> None:
        try:  # (a process that read or wrote nothing joins first: the next use waits for it)
            await self._join()
        except Exception as exc:  # noqa: BLE001 - (its previous use never ended: the keys
            log.debug("%s: not counted out: %s", self.what, exc)  # there are not this use's)
            return
        client = _client()
        rt = get_runtime()
        try:
            if await rt.to_thread(client.key_value_increment, f"{self.root}/left", 1) >= \
                    self.roles.count:
                await rt.to_thread(client.key_value_delete, self.root)
        except Exception as exc:  # noqa: BLE001 - leftover keys cost a few bytes each
            log.debug("%s: the keys of %s were not deleted: %s", self.what, self.root, exc)


__all__ = ["BarrierSyncFn", "Roles", "Sync", "current_roles", "get_barrier_sync_fn", "is_primary_host", "process_count",
           "initialize_distributed_to_device_ids", "initialize_runtime_to_distributed_ids",
           "is_distributed_to_device_ids_initialized", "is_pathways_backend",
           "is_runtime_to_distributed_ids_initialized", "reached_preemption",
           "process_index", "roles_for", "sync_global_devices", "sync_global_processes",
           "broadcast_one_to_all"]
