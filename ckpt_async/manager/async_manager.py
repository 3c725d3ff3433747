"""AsyncCheckpointManager: a series of steps in one directory, saved in the background.

``await save(step, args=...)`` decides (policy), stages the state into host memory and returns
the step's :class:`~ckpt_async._runtime.CommitFuture` (or ``None`` when the policy skips the
step). Commits run on the engine loop, in step order, at most ``max_concurrent_saves`` in
flight; retention deletes old steps only after the new step is committed. What
``all_steps()``, ``latest_step()`` and ``best_step()`` answer matches Orbax 0.12, which lists
a step as soon as its save starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import threading
import time
from typing import Any

from .. import _commit, _integrity, multihost
from .. import _format as fmt
from .. import _storage as storage
from .._checkpointer import AsyncCheckpointer, AsyncOptions, check_writable, reading
from .._paths import AnyPath, as_path
from .._runtime import CommitFuture, EngineLocal, get_runtime, on_engine
from ..args import CheckpointArgs, Composite, JsonSave, args_classes_for, refuse_non_args
from ..checkpoint_managers import CheckpointInfo, DecisionContext, PreservationContext
from ..errors import (
    CheckpointError,
    ClosedError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidTypeError,
    ItemNotFoundError,
    PathNotADirectoryError,
    StepAlreadyExistsError,
    StepNotFoundError,
)
from ..handlers.base import CheckpointHandler, call_handler
from ..handlers.composite import CompositeCheckpointHandler
from ..handlers.json_handler import JsonCheckpointHandler
from ..handlers.registry import DefaultCheckpointHandlerRegistry
from ..logging import AbstractLogger
from ..logging.step_statistics import RestoreStepStatistics, SaveStepStatistics
from ..metadata import RootMetadata, StepMetadata
from . import _steps
from .options import (
    CheckpointManagerOptions,
    preservation_policy_of,
    save_decision_policy_of,
    uses_metrics,
)

log = logging.getLogger("ckpt_async")

DEFAULT_ITEM_NAME = "default"
METRIC_ITEM_NAME = "metrics"


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise InvalidTypeError(f"step must be a non-negative integer, got {step!r}")
    try:
        step = int(step.__index__())
    except TypeError as exc:  # (an array of floats, or of more than one element: jax, NumPy)
        raise InvalidTypeError(f"step must be a non-negative integer, got {step!r}") from exc
    if step < 0:
        raise InvalidArgumentError(f"step must be a non-negative integer, got {step}")
    return step


def _utc(ns: int | None, fallback: float) -> datetime.datetime:
    secs = ns / 1e9 if ns else fallback
    return datetime.datetime.fromtimestamp(secs, tz=datetime.UTC)


def _legacy_item_handlers(checkpointers: Any, directory: Any) -> tuple[Any, bool]:
    """Orbax's older ``CheckpointManager(directory, checkpointers)``: the item handler(s) of
    the checkpointer(s) (one: the default item; a dict: items by name), and whether any saves
    in the background (then the manager does; else it saves synchronously; as Orbax's, whatever
    ``enable_async_checkpointing`` says)."""
    def handler_of(c: Any, name: str | None) -> CheckpointHandler:
        handler = getattr(c, "handler", None)
        if handler is None:
            where = "checkpointers" if name is None else f"checkpointers[{name!r}]"
            raise InvalidArgumentError(
                f"CheckpointManager({directory!r}, checkpointers): {where} is a "
                f"{type(c).__name__}, not a Checkpointer")
        return handler

    def is_async(c: Any) -> bool:
        from ..checkpointers import Checkpointer

        return not isinstance(c, Checkpointer)

    if isinstance(checkpointers, dict):
        for name in checkpointers:
            if name == METRIC_ITEM_NAME:
                raise InvalidArgumentError(f"Found {name!r} in `checkpointers`; this is a "
                                           "reserved key.")
        handlers = {name: handler_of(c, name) for name, c in checkpointers.items()}
        return handlers, any(is_async(c) for c in checkpointers.values())
    return handler_of(checkpointers, None), is_async(checkpointers)


async def _missing(root: AnyPath) -> str:
    """``': the directory does not exist'`` when ``root`` does not (a mistyped path), else ''."""
    return "" if await storage.exists(root) else ": the directory does not exist"


def legacy_args(registry: DefaultCheckpointHandlerRegistry, default_item: bool, kind: str,
                items: Any, kwargs: Any, where: str) -> CheckpointArgs:
    """Orbax's older ``save(step, items, save_kwargs)`` / ``restore(step, items,
    restore_kwargs)``: each item's args of its registered handler (one item, or a dict of
    them by name), as Orbax builds them. ``where`` (the step and directory) starts errors."""
    if default_item:
        items, kwargs = {DEFAULT_ITEM_NAME: items}, {DEFAULT_ITEM_NAME: kwargs or {}}
    else:
        items, kwargs = items or {}, kwargs or {}
        if not isinstance(items, dict) or not isinstance(kwargs, dict):
            raise InvalidArgumentError(
                f"{where}: items for several named items must be a dict of them by name, not "
                f"{type(items).__name__}")
    names = list(items) + [k for k in kwargs if k not in items and kind == "restore"]
    built = {}
    for name in names:
        handler = registry.locked(name)
        cls = args_classes_for(type(handler)).get(kind) if handler is not None else None
        if cls is None:
            raise InvalidArgumentError(
                f'{where}: Unknown key "{name}": {kind}(step, items) takes a dict of items by '
                f"name, each with a handler (item_handlers= or Orbax's checkpointers), and "
                f'this manager has none for "{name}"; to {kind} a tree, pass '
                f"args=ocp.args.Standard{kind.capitalize()}(...)")
        item, extra = items.get(name), dict(kwargs.get(name) or {})
        built[name] = cls(item, **extra) if item is not None or kind == "save" else cls(**extra)
    return built[DEFAULT_ITEM_NAME] if default_item else Composite(**built)


class AsyncCheckpointManager:
    """Saves, lists, restores and retains the steps of one training run (coroutines).

    >>> mngr = AsyncCheckpointManager('/tmp/run', CheckpointManagerOptions(max_to_keep=3))
    >>> fut = await mngr.save(100, args=ckpt_async.args.StandardSave(state))  # doctest: +SKIP
    >>> fut.add_done_callback(lambda f: print('step 100 is durable'))          # doctest: +SKIP
    """

    def __init__(
        self,
        directory: Any,
        checkpointers: Any = None,
        options: CheckpointManagerOptions | None = None,
        metadata: dict[str, Any] | None = None,
        item_names: Any = None,
        item_handlers: CheckpointHandler | dict[str, CheckpointHandler] | None = None,
        logger: AbstractLogger | None = None,
        handler_registry: DefaultCheckpointHandlerRegistry | None = None,
    ) -> None:
        # Orbax's order of arguments. The second may also be the options (as ckpt_async
        # took them), or Orbax's older checkpointers: a Checkpointer (one item) or a dict of
        # them (named items), whose handlers become the item handlers.
        if isinstance(checkpointers, CheckpointManagerOptions):
            if options is not None:
                raise InvalidArgumentError(
                    f"CheckpointManager({directory!r}, ...): options given twice")
            checkpointers, options = None, checkpointers
        if options is not None and not isinstance(options, CheckpointManagerOptions):
            raise InvalidArgumentError(
                f"CheckpointManager({directory!r}, ...): options must be a "
                f"CheckpointManagerOptions, not {type(options).__name__}")
        if checkpointers is not None:
            if item_names is not None or item_handlers is not None or handler_registry is not None:
                raise InvalidArgumentError(
                    "checkpointers (Orbax's older constructor) cannot be given with item_names, "
                    "item_handlers or handler_registry")
            item_handlers, use_async = _legacy_item_handlers(checkpointers, directory)
            options = options or CheckpointManagerOptions()
            # (as Orbax: the checkpointers decide, whatever enable_async_checkpointing says)
            if options.enable_async_checkpointing != use_async:
                options = dataclasses.replace(options, enable_async_checkpointing=use_async)
        if item_names is not None and isinstance(item_handlers, CheckpointHandler):
            raise InvalidArgumentError(
                "item_handlers in default item mode (a single handler) and item_names cannot "
                "be given together")
        for given, name in ((item_handlers, "item_handlers"), (item_names, "item_names")):
            if given is not None and handler_registry is not None:
                raise InvalidArgumentError(
                    f"{name} and handler_registry are mutually exclusive; register the items' "
                    "handlers in the registry")
        self.directory = as_path(directory)
        self.options = options or CheckpointManagerOptions()
        if not self.options.enable_async_checkpointing and getattr(
                self.options.async_options, "post_finalization_callback", None) is not None:
            raise InvalidArgumentError(  # (as Orbax: the callback is a background commit's)
                "AsyncOptions.post_finalization_callback is only supported with "
                "enable_async_checkpointing=True")
        self._logger = logger
        self._last_save_time: float | None = None
        self._name_format = _steps.name_format_for(
            self.options.step_name_format, self.options.step_prefix,
            self.options.step_format_fixed_length)
        #: Orbax's commit-file mode, named by the options or the step name format (as Orbax's
        #: lists steps, and writes them in place): a local step counts once its
        #: ``commit_success.txt`` is there, so that a step an Orbax run of that mode was
        #: killed while writing is neither listed nor restored (a save of it replaces it).
        self._marker = _commit.requires_marker(self.options.temporary_path_class,
                                               self.options.atomicity_options) or \
            _steps.format_requires_marker(self._name_format)
        self._save_policy = save_decision_policy_of(self.options)
        self._preservation_policy = preservation_policy_of(self.options)
        self._persist_metrics = uses_metrics(self._preservation_policy) or bool(self.options.best_fn)
        registry = handler_registry or DefaultCheckpointHandlerRegistry()
        # Single-item (default) mode: args are one item's; else a Composite of named items.
        # Known from the constructor, else from the first save or the first step restored;
        # ``_mode_by`` says which, for the error that advises a caller of the other mode.
        self._default_item: bool | None = None
        self._mode_by = ""
        self._named: list[str] = []  # (the items it was built with)
        if isinstance(item_handlers, CheckpointHandler):
            registry.add(DEFAULT_ITEM_NAME, None, item_handlers)
            self._default_item, self._mode_by = True, "it was built with a single handler"
        else:  # (item_names beside a single handler was refused above)
            for name, handler in (item_handlers or {}).items():
                registry.add(name, None, handler)
            if item_names is not None or item_handlers is not None:  # ({}: no items, as ())
                self._named = sorted({*(item_names or ()), *(item_handlers or {})})
                self._default_item = False
                self._mode_by = f"it was built with the items {self._named}"
        if item_names is not None or item_handlers is not None:
            registry.limit_to([*(item_names or ()), *registry.locked_items()])
        if not registry.has(METRIC_ITEM_NAME):
            # Orbax's metrics item: JSON in ``<step>/metrics/metrics``, so each library reads
            # the other's metrics (a default JsonCheckpointHandler would use ``metadata``).
            registry.add(METRIC_ITEM_NAME, None, JsonCheckpointHandler(filename=METRIC_ITEM_NAME))
        composite = CompositeCheckpointHandler(handler_registry=registry)
        self._registry = composite.registry  # (its copy, which lock-ins change)
        self._checkpointer = AsyncCheckpointer(
            composite,
            async_options=self.options.async_options or AsyncOptions(),
            multiprocessing_options=self.options.multiprocessing_options,
            file_options=self.options.file_options)
        self._checkpointer._marker = self._marker
        self._checkpoints: list[CheckpointInfo] = []
        self._futures: dict[int, CommitFuture] = {}
        #: The commits of ``_futures`` still in flight, each let go as it ends (by
        #: :meth:`_on_done`): what a save or a wait walks, however many steps are listed.
        self._in_flight_steps: dict[int, CommitFuture] = {}
        # One save() at a time, from its decision to its commit's registration: two awaited
        # at once (asyncio.gather) each read the step list before the other wrote it back.
        self._saving = EngineLocal(asyncio.Lock)
        #: The steps of the save() calls under way (how many of each), until each returns: a
        #: restore of one of them waits for the saves before it (``_resolve_step_dir``).
        self._under_way: dict[int, int] = {}
        #: The failures of commits not yet raised, with their futures; recorded (by
        #: :meth:`_on_done`, in the thread that ends the commit) and taken (by a caller's
        #: check_for_errors(), in its own thread) under ``_failures_lock``.
        self._failures: list[tuple[BaseException, CommitFuture]] = []
        self._failures_lock = threading.Lock()
        #: The steps whose commit failed while saves were in flight (by :meth:`_on_done`):
        #: a later save that retired one of them and fails too does not list it again.
        #: Emptied once no commit is in flight (no failure can give a step back then).
        self._failed_steps: set[int] = set()
        self._root_metadata = metadata
        self._closed = False  # (refuses new calls; set once close() begins)
        self._close_done = False  # (close() has waited for every commit)
        self._initialized = False
        self._roles = multihost.Roles()
        #: retention deletions waiting for the background deleter: (retiring step, steps)
        self._deletions: list[tuple[int, list[int]]] = []
        self._deleter: CommitFuture | None = None
        self._init_lock = EngineLocal(asyncio.Lock)

    # -- setup (on the engine loop, on first use) ------------------------------------------------
    async def _open(self) -> None:
        """Set up, and not closed."""
        if self._closed:
            raise ClosedError(f"the manager of {self.directory} is closed")
        await self._ensure_init()

    async def _ensure_init(self) -> None:
        if self._initialized:
            return
        # (calls made at once wait for one setup; a failed one is tried again by the next call)
        async with self._init_lock.get():
            if not self._initialized:
                await self._initialize()
                self._initialized = True

    async def _initialize(self) -> None:
        self._roles = multihost.roles_for(self.options.multiprocessing_options)
        if self.options.create and not self.options.read_only:
            if await storage.exists(self.directory):
                if not await storage.is_dir(self.directory):
                    raise PathNotADirectoryError(
                        f"{self.directory} exists and is not a directory")
            else:  # (a file above it: PathNotADirectoryError, as for a checkpointer)
                await get_runtime().to_thread(check_writable, self.directory)
            await storage.makedirs(self.directory)
        # (with several processes the primary alone removes and writes shared files)
        if self.options.cleanup_tmp_directories and self._roles.is_primary:
            await self._cleanup_leftovers()
        self._checkpoints = await self._load_checkpoint_infos()
        if self._root_metadata is not None and not self.options.read_only and \
                self.options.save_root_metadata and self._roles.is_primary:
            await self._save_root_metadata(self._root_metadata)

    async def _cleanup_leftovers(self) -> None:
        names, visible = await _commit.scan(self.directory, marker=self._marker)
        for name in names:
            # (on an object store, a step written in place without its commit marker is an
            # unfinished save too)
            if _steps.is_leftover(name) or (
                    name not in visible and _steps.parses_as_step(self._name_format, name)):
                await storage.rmtree(self.directory / name)

    async def _save_root_metadata(self, custom: dict[str, Any]) -> None:
        path = self.directory / fmt.ROOT_METADATA_DIR / fmt.ROOT_METADATA
        try:
            data = await storage.read_optional(path)
            if data is not None:
                fmt.decode_root_metadata(data, where=str(path))
                return  # written by an earlier run; root metadata is written once
        except CorruptCheckpointError as exc:  # (e.g. Orbax's, cut short: it writes in place)
            log.warning("%s; writing this manager's root metadata in its place", exc)
        fmt.require_json(custom, f"{path}: CheckpointManager(metadata=...)")
        await storage.makedirs(path.parent)
        await storage.replace_whole(path, fmt.encode(fmt.RootMetadata({}, dict(custom)),
                                                     values=custom))

    async def _step_names(self, root: Any = None) -> dict[int, str]:
        """Committed steps in ``root`` (default: this manager's directory): step -> name."""
        return await _steps.committed_steps(self.directory if root is None else root,
                                            self._name_format, marker=self._marker)

    async def _load_checkpoint_infos(self) -> list[CheckpointInfo]:
        infos = []
        for step, name in sorted((await self._step_names()).items()):
            path = self.directory / name
            meta = await self._read_step_doc(path)
            metrics = await self._read_metrics(path, meta)
            ns = meta.commit_timestamp_nsecs if meta is not None else None
            mtime = 0.0
            if not ns:  # (no commit time recorded: the directory's, as in Orbax)
                try:
                    mtime = await storage.mtime(path)
                except FileNotFoundError:
                    continue  # (deleted since it was listed: another manager's retention)
            infos.append(CheckpointInfo(step, _utc(ns, mtime), metrics))
        return infos

    async def _read_step_doc(self, path: AnyPath) -> fmt.StepMetadata | None:
        """A step's ``_CHECKPOINT_METADATA``; None when it has none, or (logged) when it is
        damaged: one step's damaged document does not take the others from the manager (as
        in Orbax); restoring that step still fails, naming it."""
        try:
            meta, _ = await _integrity.read_step_metadata(path)
        except CorruptCheckpointError as exc:
            log.error("%s; its time and metrics are unknown to the manager", exc)
            return None
        return meta

    async def _read_metrics(self, path: AnyPath, meta: fmt.StepMetadata | None) -> Any:
        found = await self._metrics_item(path)
        if found is not None:
            return found
        if self._persist_metrics and meta is not None and meta.metrics:
            return meta.metrics
        return None

    @staticmethod
    async def _metrics_item(path: AnyPath) -> Any:
        """The step's ``metrics`` item (Orbax writes it when ``best_fn`` is set), or None."""
        item = path / METRIC_ITEM_NAME / METRIC_ITEM_NAME
        try:
            # (one read, no look first: a step another manager's retention took away
            # between the two made the listing raise CheckpointNotFoundError)
            data = await storage.read_optional(item)
            return None if data is None else fmt.decode(data, Any, where=str(item))
        except CorruptCheckpointError as exc:  # (as a damaged step document, above)
            log.error("%s; the step's metrics are unknown to the manager", exc)
            return None

    # -- listing ---------------------------------------------------------------------------------
    def all_steps(self, read: bool = False) -> list[int]:
        """The steps this manager lists, in order (in-flight saves included, as in Orbax);
        ``read=True`` reads the directory again first (:meth:`reload`; not on the engine
        loop, where ``await reload()`` does it)."""
        if read:
            get_runtime().call(self.reload)
        return [c.step for c in self._listed()]

    def _listed(self) -> list[CheckpointInfo]:
        """The listed steps; the directory is read first when no call has read it yet (a
        manager just built answers as Orbax's, whose constructor reads it)."""
        if not self._initialized and not get_runtime().on_engine_thread():
            get_runtime().call(self._ensure_init)
        return self._checkpoints

    def latest_step(self) -> int | None:
        """The highest listed step, or None."""
        listed = self._listed()
        return listed[-1].step if listed else None

    def best_step(self) -> int | None:
        """The best step by ``best_fn`` (the latest one when no best_fn is set)."""
        if self.options.best_fn is None:
            return self.latest_step()
        ranked = [c for c in self._listed() if c.metrics is not None]
        if not ranked:
            return None
        ranked.sort(key=lambda c: self.options.best_fn(c.metrics),  # type: ignore[misc]
                    reverse=self.options.best_mode == "min")
        return ranked[-1].step

    @on_engine
    async def reload(self) -> None:
        """Re-reads the steps from the directory (after another writer changed it)."""
        await self._open()
        self._checkpoints = await self._load_checkpoint_infos()

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption sync point was reached at ``step`` (False without one)."""
        return multihost.reached_preemption(step)

    def is_saving_in_progress(self) -> bool:
        """Whether any commit of this manager is still in flight."""
        return self._in_flight() > 0

    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` would write a checkpoint (Orbax's rules)."""
        if self.options.read_only:
            log.warning("%s is read only, save of step %s will be skipped", self.directory, step)
            return False
        latest = self.latest_step()
        if latest is not None and latest >= step:
            return False
        in_progress = (self.is_saving_in_progress()
                       if self.options.enable_should_save_is_saving_in_progress_check else False)
        context = DecisionContext(
            is_saving_in_progress=in_progress, reached_preemption=self.reached_preemption(step),
            multiprocessing_options=self.options.multiprocessing_options)
        now = CheckpointInfo(step, datetime.datetime.now(tz=datetime.UTC), None)
        return bool(self._save_policy.should_save(now, list(self._checkpoints), context=context))

    # -- save ------------------------------------------------------------------------------------
    def _step_path(self, step: int) -> AnyPath:
        return self.directory / self._name_format.build_name(step)

    def _as_composite(self, args: CheckpointArgs | None, step: int) -> Composite:
        if args is None:
            raise InvalidArgumentError("Must provide `args` for `save`.")
        refuse_non_args(args, "save", f"step {step} of {self.directory}",
                        several=self._default_item is False)
        is_composite = isinstance(args, Composite)
        if self._default_item is None:
            self._default_item = not is_composite
            self._mode_by = f"its first save, of step {step}, was given {type(args).__name__} args"
        if self._default_item == is_composite:
            raise self._mode_error("save", step, args)
        if self._default_item:
            return Composite(**{DEFAULT_ITEM_NAME: args})
        assert isinstance(args, Composite)
        return args

    def _mode_error(self, kind: str, step: int, args: CheckpointArgs) -> InvalidArgumentError:
        """The error for ``args`` of the other mode than this manager's (Orbax's message,
        then which mode this manager is in, why, and the call to make)."""
        where = f"step {step} of {self.directory}"
        if self._default_item:
            inner = [a for a in args.values() if a is not None] if isinstance(
                args, Composite) else []
            alone = type(inner[0]).__name__ if len(inner) == 1 else f"Standard{kind.capitalize()}"
            return InvalidArgumentError(
                f"{where}: Cannot provide `args` of type `Composite` when dealing with a "
                f"single, unnamed (default) checkpointable object. This manager is in "
                f"single-item mode ({self._mode_by}): pass the item's args alone, "
                f"args=ocp.args.{alone}(...); several named items need a manager built with "
                "item_names=(...), in a directory of their own")
        names = list(self._named or [n for n in self._registry.locked_items()
                                     if n != METRIC_ITEM_NAME])
        takes = [n for n in names if (h := self._registry.locked(n)) is not None
                 and type(args) in args_classes_for(type(h)).values()]
        name = next(iter(takes + names), "name")  # (an item these args are for, if any)
        return InvalidArgumentError(
            f"{where}: Must provide `args` of type `Composite` when dealing with multiple "
            f"checkpointable objects. This manager is in multi-item mode ({self._mode_by}): "
            f"pass args=ocp.args.Composite({name}=ocp.args.{type(args).__name__}(...), ...); "
            "a single unnamed item needs a manager built without item_names, in a directory "
            "of its own")

    def _told(self, fut: CommitFuture) -> None:
        """The failure of ``fut`` was raised to the caller that saved (a synchronous save):
        no later call raises it again."""
        with self._failures_lock:
            self._failures = [(e, f) for e, f in self._failures if f is not fut]
        fut.retrieved()

    def _raise_failure(self) -> None:
        # (taken whole under the lock: a failure recorded meanwhile is either in what is
        # taken here, or in the list left for the next call, never in one let go)
        with self._failures_lock:
            failures, self._failures = self._failures, []
        if failures:
            for _, fut in failures:  # (told now: the first raised, the others with it)
                fut.retrieved()
            raise failures[0][0]

    @on_engine
    async def save(self, step: int, items: Any = None, save_kwargs: Any = None,
                   metrics: Any = None, force: bool = False,
                   args: CheckpointArgs | None = None,
                   custom_metadata: dict | None = None) -> CommitFuture | None:
        """Stages ``args`` as ``step``; returns the commit's future, or None when skipped.
        Saves awaited at once run one after the other (their commits still overlap); a save
        whose caller is cancelled while it stages is abandoned, its files removed.

        The parameters are Orbax's, in its order. Its older form, ``save(step, items)`` (and
        ``save_kwargs``), saves each item with the args of its handler (given by
        ``item_handlers`` or Orbax's checkpointers); args given second are args."""
        args = self._legacy("save", step, args, items, save_kwargs)
        try:
            under_way: int | None = _check_step(step)
        except CheckpointError:
            under_way = None  # (refused by _save, in its turn)
        if under_way is not None:
            self._under_way[under_way] = self._under_way.get(under_way, 0) + 1
        try:
            async with self._saving.get():
                return await self._save(step, args, metrics, force, custom_metadata)
        finally:
            if under_way is not None:
                self._under_way[under_way] -= 1
                if not self._under_way[under_way]:
                    del self._under_way[under_way]

    async def _save(self, step: int, args: CheckpointArgs | None, metrics: Any, force: bool,
                    custom_metadata: dict | None) -> CommitFuture | None:
        started = time.time()
        await self._open()
        step = _check_step(step)
        multi = self._roles.multi
        if not multi:  # (with several processes: in precheck below, where all raise at once)
            self._raise_failure()
        composite = self._as_composite(args, step)
        if METRIC_ITEM_NAME in composite and self.options.best_fn is not None:
            # (Orbax puts the metrics in its place when they are given, dropping the item)
            raise InvalidArgumentError(
                f"step {step} of {self.directory}: item {METRIC_ITEM_NAME!r} is the manager's "
                "own when best_fn is set (it holds the metrics passed to save(), which best_fn "
                "ranks, also when the manager reopens the directory); rename the item")
        if not await self._agree(f"decide:{self.directory}:{step}",
                                 force or self.should_save(step)):
            latest = self.latest_step()
            if not self.options.read_only and latest is not None and step < latest:
                # Orbax answers False here; training loops rely on that, so keep it, but say why.
                log.warning("step %d of %s was not saved: it is not after the latest step %d",
                            step, self.directory, latest)
            elif not self.options.read_only and step == latest:
                # (a resumed loop saves the step it restored again: said, not warned about)
                log.info("step %d of %s was not saved: it is the latest step already", step,
                         self.directory)
            else:
                log.debug("step %d of %s: the save decision policy skips it", step,
                          self.directory)
            return None
        if self.options.read_only:
            log.warning("%s is read only: step %d was not saved", self.directory, step)
            return None

        async def precheck() -> None:
            if multi:
                self._raise_failure()
            if step in self.all_steps() or await _commit.is_visible(self._step_path(step),
                                                                    self._marker):
                # (on disk too: another writer may have committed it; the commit's
                # create-once rename is what decides a race, this reports the common case.
                # force=True too: it overrides the save decision policy, it replaces nothing)
                raise StepAlreadyExistsError(f"Checkpoint for step {step} already exists in "
                                             f"{self.directory}.")

        if not multi:
            await precheck()  # (before waiting for a commit in flight)
        stats = SaveStepStatistics(
            step=step, directory=str(self.directory),
            synchronous=not self.options.enable_async_checkpointing,
            checkpoint_manager_blocking_start_time=started,
            time_between_consecutive_saves_sec=(
                None if self._last_save_time is None else started - self._last_save_time))
        self._last_save_time = t = time.time()
        await self._bound_in_flight()
        stats.wait_for_prev_start_time, stats.wait_for_prev_duration_secs = t, time.time() - t
        items = dict(composite.items())
        # (written as JSON: a jitted step's jax scalars as the numbers they hold; best_fn is
        # given the metrics as passed)
        written = fmt.json_values(metrics)
        if metrics is not None and self.options.best_fn is not None and \
                not self.options.prevent_write_metrics:
            items[METRIC_ITEM_NAME] = JsonSave(written)
        meta = fmt.StepMetadata(custom_metadata=dict(custom_metadata or {}))
        if metrics is not None and not self.options.prevent_write_metrics:
            meta.metrics = written if isinstance(written, dict) else {"value": written}
        fmt.require_json([meta.metrics, meta.custom_metadata],
                         f"step {step} of {self.directory}: metrics and custom_metadata")
        info = CheckpointInfo(step, datetime.datetime.now(tz=datetime.UTC), metrics)
        candidates = [*self._checkpoints, info]
        t = time.time()
        keep = self._preservation_policy.should_preserve(candidates, context=PreservationContext())
        to_remove = [c for c, k in zip(candidates, keep, strict=True) if not k]
        stats.get_old_steps_start_time, stats.get_old_steps_duration_secs = t, time.time() - t
        # (the commit in flight of the highest step: each lands after the one before it)
        prev = self._in_flight_steps[max(self._in_flight_steps)] if self._in_flight_steps \
            else None

        async def retain(path: AnyPath, _meta: Any) -> None:
            # Orbax retires the new step too when the policy does not keep it (BestN with a
            # worse metric): unlisted now, deleted once committed.
            if to_remove and self.options.enable_background_delete:
                self._queue_deletion(step, [c.step for c in to_remove])
            elif to_remove:  # Orbax's default: at most max_to_keep + 1 steps on disk at once
                await self._delete_logged(step, [c.step for c in to_remove])
            if multi and not self.options.enable_background_delete:
                # (no process's commit ends before the primary's deletions: each lists, and
                # may restore, only what is on disk)
                try:
                    await self._meet(f"retain:{self.directory}:{step}", "retained")
                except CheckpointError as exc:  # (the step is committed all the same)
                    log.error("step %d of %s is committed, but the processes did not meet "
                              "after its retention: %s", step, self.directory, exc)

        t = time.time()
        fut = await self._checkpointer._save_staged(
            self._step_path(step), Composite(**items), step_metadata=meta, on_commit=retain,
            after=prev, track=False, precheck=precheck if multi else None,
            what=f"the commit of step {step} of {self.directory}")
        stats.checkpointer_blocking_start_time = t
        stats.checkpointer_blocking_duration_secs = time.time() - t
        log.debug("step %d staged in %.3f s", step, stats.checkpointer_blocking_duration_secs)
        self._futures[step] = fut
        self._in_flight_steps[step] = fut
        self._failed_steps.discard(step)  # (saved again: this save's commit decides)
        # (the listing as it is now, not as it was before staging: a delete(), a commit that
        # failed or a reload() meanwhile stays done)
        retired = {c.step for c in to_remove}
        # (what this commit's failure gives back: the retired steps still listed now, not
        # one whose commit failed, or that was deleted, while this save staged)
        listed = {c.step for c in self._checkpoints}
        given_back = [c for c in to_remove if c.step in listed]
        self._checkpoints = [c for c in self._checkpoints if c.step not in retired]
        if step not in retired:
            self._checkpoints.append(info)
        self._forget_retired_futures()
        fut.on_settle(lambda exc: self._on_done(step, fut, exc, given_back))
        if not self.options.enable_async_checkpointing:
            self._checkpointer.hurry()  # (the caller waits for it)
            try:
                await fut
            except BaseException:
                self._told(fut)  # (this save raises it: not again by the next call)
                raise
        stats.checkpoint_manager_blocking_duration_secs = time.time() - started
        self._log_entry(stats)
        return fut

    def _log_entry(self, stats: SaveStepStatistics | RestoreStepStatistics) -> None:
        """Hands ``stats`` to the manager's logger; a logger's failure is logged, not raised
        (the save or restore it describes went through)."""
        if self._logger is None:
            return
        try:
            self._logger.log_entry(dataclasses.asdict(stats))
        except Exception:  # noqa: BLE001 - the user's logger; reported, not raised
            log.exception("the logger of the manager of %s failed on a %s entry",
                          self.directory, stats.event_type)

    def _forget_retired_futures(self) -> None:
        """Drops the completion futures of ended commits whose steps are no longer listed
        (retired, or failed): a manager saving every few minutes for weeks would otherwise
        keep one per save. (Only those of unlisted steps are asked whether they ended.)"""
        listed = {c.step for c in self._checkpoints}
        for step in [s for s in self._futures if s not in listed]:
            if self._futures[step].done():
                del self._futures[step]

    async def _agree(self, what: str, decision: bool) -> bool:
        """``decision`` on one process; the primary's on every process of a multi-process run
        (a time-based policy may decide differently on each)."""
        if not self._roles.multi:
            return decision
        sync = self._sync(what)
        try:
            answer = await sync.broadcast("decision", "save" if decision else "skip")
        finally:  # (its key goes once every process has read it: one a step, for weeks)
            await sync.leave()
        return answer == "save"

    def _sync(self, what: str) -> multihost.Sync:
        return multihost.Sync(what, self._roles, (self.options.async_options or AsyncOptions())
                              .timeout_secs, self.options.multiprocessing_options
                              .barrier_sync_key_prefix)

    async def _meet(self, what: str, phase: str) -> None:
        """A barrier of every process of the run."""
        sync = self._sync(what)
        try:
            await sync.arrive(phase)
        finally:
            await sync.leave()

    def _queue_deletion(self, step: int, steps: list[int]) -> None:
        """``enable_background_delete``: deletes ``steps`` (retired by ``step``'s commit) in
        the background, one deletion at a time, outside every commit, so that a slow deletion
        never holds up a save or a commit (steps may then outnumber ``max_to_keep`` + 1 on
        disk for a while)."""
        self._deletions.append((step, steps))
        if self._deleter is None or self._deleter.done():
            self._deleter = get_runtime().spawn(self._drain_deletions())

    async def _drain_deletions(self) -> None:
        while self._deletions:
            await self._delete_logged(*self._deletions.pop(0))

    async def _delete_logged(self, step: int, steps: list[int]) -> None:
        try:
            await self._delete_steps(steps)
        except Exception as exc:  # noqa: BLE001 - logged; the old steps stay on disk
            # The step is committed: a failed deletion is not a failed save.
            log.error("step %d is committed, but deleting old steps %s of %s failed: %s",
                      step, steps, self.directory, exc)

    def save_waits(self, step: int, force: bool = False) -> bool:
        """Whether ``save(step)`` would wait now for a commit in flight: the save decision
        policy takes the step, and ``max_concurrent_saves`` commits are in flight (any
        thread). The sync face then hurries them, for the thread that saved them. (False with
        several processes: there the policy's preemption check is a sync point, taken once.)"""
        if self._roles.multi or self._in_flight() < self.options.max_concurrent_saves:
            return False
        try:
            return force or self.should_save(step)
        except Exception:  # noqa: BLE001 - save() itself raises it
            return False

    def _in_flight(self) -> int:
        """How many of this manager's commits are in flight (any thread)."""
        return len(self._in_flight_steps)

    async def _bound_in_flight(self) -> None:
        while self._in_flight() >= self.options.max_concurrent_saves:
            oldest = self._in_flight_steps[min(self._in_flight_steps)]
            # (a cancelled caller stops waiting here: its save was not started)
            with contextlib.suppress(Exception):  # (a failure: recorded by _on_done, raised below)
                await oldest
            if not self._roles.multi:  # (with several processes: by the save's precheck)
                self._raise_failure()

    def _on_done(self, step: int, fut: CommitFuture, exc: BaseException | None,
                 removed: list[CheckpointInfo]) -> None:
        """Runs when a commit ends, before its future tells anyone (any thread): it is no
        longer in flight; a failed step leaves the listing, and the steps it would have
        retired come back (they were never deleted), but for those whose own commit failed."""
        if self._in_flight_steps.get(step) is fut:
            del self._in_flight_steps[step]
        if exc is not None:
            with self._failures_lock:
                self._failures.append((exc, fut))
            self._failed_steps.add(step)
            kept = [c for c in self._checkpoints if c.step != step]
            # (not a retired step whose own commit failed before this one: never on disk)
            back = [c for c in removed if c.step not in self._failed_steps
                    and c.step not in {k.step for k in kept}]
            self._checkpoints = sorted(kept + back, key=lambda c: c.step)
        if not self._in_flight_steps:
            self._failed_steps.clear()

    def commit_future(self, step: int) -> CommitFuture:
        """The completion future of ``step``'s commit: a save made by this manager, in flight
        or of a step still listed (those of retired steps are let go)."""
        try:
            return self._futures[step]
        except KeyError:
            raise StepNotFoundError(f"no save of step {step} by this manager is in flight or "
                                    f"still listed (in {self.directory})") from None

    def hurry(self) -> None:
        """Writes the commit in flight at full speed from now on, paced or not
        (:meth:`AsyncCheckpointer.hurry`; any thread): for a caller about to wait for it with
        nothing training meanwhile (the sync face does this when the thread that saved
        waits)."""
        self._checkpointer.hurry()

    @on_engine
    async def wait_until_finished(self) -> None:
        """Waits for every in-flight commit; raises the first failure."""
        for fut in [self._in_flight_steps[s] for s in sorted(self._in_flight_steps)]:
            with contextlib.suppress(Exception):  # (recorded by _on_done; a cancel is raised)
                await fut
        while self._deleter is not None and not self._deleter.done():
            await self._deleter  # (logs its own failures; a deletion queued meanwhile is seen)
        self._raise_failure()

    def check_for_errors(self) -> None:
        """Raises the failure of a finished commit, without waiting."""
        self._raise_failure()

    # -- delete / retain -------------------------------------------------------------------------
    async def _delete_steps(self, steps: list[int]) -> None:
        if not self._roles.is_primary:
            return  # the primary process deletes; the others only unlist
        names = await self._step_names()
        for step in steps:
            name = names.get(step)
            if name is not None:
                await _steps.remove_step(self.directory, name, self.options.todelete_subdir)

    @on_engine
    async def delete(self, step: int) -> None:
        """Deletes a listed step (after its commit, if in flight); unlisted first, then removed."""
        await self._open()
        step = _check_step(step)
        if self.options.read_only:
            log.warning("%s is read only, delete will be skipped", self.directory)
            return
        if step not in self.all_steps():
            raise StepNotFoundError(f"Requested deleting a non-existent step: {step} "
                                    f"(in {self.directory}).")
        fut = self._futures.get(step)
        if fut is not None:
            await asyncio.shield(asyncio.wrap_future(fut))
        await self._delete_steps([step])
        self._checkpoints = [c for c in self._checkpoints if c.step != step]
        if self._roles.multi:  # (as Orbax: every process returns once the step is gone)
            await self._meet(f"delete:{self.directory}:{step}", "deleted")

    # -- restore / metadata ----------------------------------------------------------------------
    async def _resolve_step_dir(self, step: int | None, directory: Any = None) -> tuple[int, AnyPath]:
        await self._open()
        root = as_path(directory) if directory is not None else self.directory
        if step is None:
            if directory is None:
                step = self.latest_step()
            else:
                names = await self._step_names(root)
                step = max(names) if names else None
            if step is None:
                raise StepNotFoundError(f"No steps found in {root}{await _missing(root)}.")
        step = _check_step(step)
        if directory is None and step in self._under_way:
            # A save of this step called before (asyncio.gather(save(5), restore(5)), a save
            # task just started): read once it has staged, as the calls' order says, rather
            # than found missing. (Saves take the lock in turn: those called later wait.)
            async with self._saving.get():
                pass
        fut = self._futures.get(step)
        if fut is not None and not fut.done():
            await fut
        path = self._step_path(step)
        # A step this manager lists is where its name says (one look, where listing the
        # directory costs a round trip that grows with the steps in it); any other is found by
        # listing (a name of another format, another directory, a step deleted meanwhile).
        if not (directory is None and any(c.step == step for c in self._checkpoints)
                and await _commit.is_visible(path, self._marker)):
            names = await self._step_names(root)
            if step not in names:
                named = root / self._name_format.build_name(step)
                if await storage.is_file(named):  # (no step, as in Orbax, but not missing)
                    raise InvalidArgumentError(
                        f"step {step} of {root}: {named} is a file, not a step directory")
                if self._marker and storage.has_rename(named) and await storage.is_dir(named):
                    raise InvalidArgumentError(  # (as Orbax: "Found incomplete checkpoint")
                        f"step {step} of {root} is an incomplete checkpoint: {named} has no "
                        f"{fmt.COMMIT_SUCCESS} (a save that did not finish, in the commit-file "
                        "mode the options name)")
                raise StepNotFoundError(
                    f"step {step} does not exist in {root} "
                    + (f"(steps: {sorted(names)[-10:]})" if names else
                       f"(no steps{await _missing(root)})"))
            path = root / names[step]
        if self._default_item is None:
            self._default_item = await storage.is_dir(path / DEFAULT_ITEM_NAME)
            self._mode_by = (f"step {step}, the first it read, "
                             f"{'holds' if self._default_item else 'has no'} item "
                             f"{DEFAULT_ITEM_NAME!r}")
        return step, path

    def _legacy(self, kind: str, step: Any, args: Any, items: Any, kwargs: Any) -> Any:
        """``args``, or the args Orbax's older ``items`` (and their kwargs) stand for."""
        if isinstance(items, CheckpointArgs) and kwargs is None:
            if args is not None:
                raise InvalidArgumentError(f"{kind}: args given twice")
            return items  # (args given second, where Orbax has its items)
        if items is None and kwargs is None:
            return args
        if args is not None:
            raise InvalidArgumentError(f"{kind}: give args= or Orbax's older items=, not both")
        default = self._default_item
        if default is None:
            default = not isinstance(items, dict) or self._registry.locked(DEFAULT_ITEM_NAME) \
                is not None
        where = f"step {step} of {self.directory}" if step is not None else \
            f"the latest step of {self.directory}"
        return legacy_args(self._registry, default, kind, items, kwargs, where)

    @on_engine
    async def restore(self, step: int | None = None, items: Any = None,
                      restore_kwargs: Any = None, directory: Any = None,
                      args: CheckpointArgs | None = None) -> Any:
        """Restores ``step`` (default: the latest): every item as saved, or as ``args`` ask.
        The parameters are Orbax's, in its order: its older form, ``restore(step, items)``
        (and ``restore_kwargs``), restores each item with the args of its handler."""
        args = self._legacy("restore", step, args, items, restore_kwargs)
        started = time.time()
        step, path = await self._resolve_step_dir(step, directory)
        if args is not None:
            refuse_non_args(args, "restore", f"step {step} of {self.directory}",
                            several=self._default_item is False)
        if args is not None and self._default_item == isinstance(args, Composite):
            raise self._mode_error("restore", step, args)
        bare = self._default_item and args is None  # (the step decides what is read)
        if self._default_item:
            args = Composite(**{DEFAULT_ITEM_NAME: args})
        t = time.time()
        async with reading(path, f"step {step} of {self.directory}", StepNotFoundError):
            try:
                result = await call_handler(self._checkpointer.handler.restore, path, args)
            except ItemNotFoundError as exc:  # (with args: Orbax's KeyError, as it is)
                if not bare:
                    raise
                raise self._no_default_item(step, path) from exc
        now = time.time()
        self._log_entry(RestoreStepStatistics(
            step=step, directory=str(self.directory), checkpointer_start_time=t,
            checkpointer_duration_secs=now - t, checkpoint_manager_start_time=started,
            checkpoint_manager_duration_secs=now - started))
        return result[DEFAULT_ITEM_NAME] if self._default_item else result

    def _no_default_item(self, step: int, path: AnyPath) -> InvalidArgumentError:
        """A step of named items read by a manager of one unnamed item (a ``ValueError``, as
        Orbax raises; not a missing checkpoint)."""
        return InvalidArgumentError(
            f"step {step} of {self.directory} holds no {DEFAULT_ITEM_NAME!r} item (it was "
            f"saved with named items, in {path}), but this manager is in single-item mode "
            f"({self._mode_by}): read it with a manager of named items (item_names=(...)) "
            "and Composite args")

    @on_engine
    async def item_metadata(self, step: int) -> Any:
        """The metadata of ``step``'s items (None for an item whose handler is unknown)."""
        if step is None:
            raise InvalidArgumentError(
                "`step` must be provided: item metadata exists for a step, not for the root "
                f"{self.directory}")
        meta = await self.metadata(step)
        assert isinstance(meta, StepMetadata)
        return meta.item_metadata

    @on_engine
    async def metadata(self, step: int | None = None) -> StepMetadata | RootMetadata:
        """Step metadata (metrics, timestamps, items) for ``step``; root metadata for None."""
        if step is None:
            await self._open()
            path = self.directory / fmt.ROOT_METADATA_DIR / fmt.ROOT_METADATA
            if not await storage.exists(path):
                legacy = path.parent / fmt.LEGACY_ROOT_METADATA  # (Orbax before 0.10)
                data = await storage.read_optional(legacy)
                if data is not None:
                    return RootMetadata(custom_metadata=fmt.legacy_root_custom_metadata(
                        data, where=str(legacy)))
                # (not written: read-only, not saved, or still on its way from the primary)
                unsaved = self.options.read_only or self.options.save_root_metadata
                return RootMetadata(
                    custom_metadata=dict(self._root_metadata or {}) if unsaved else {})
            doc = fmt.decode_root_metadata(await storage.read_bytes(path), where=str(path))
            return RootMetadata(custom_metadata=doc.custom_metadata)
        step, path = await self._resolve_step_dir(step)
        async with reading(path, f"step {step} of {self.directory}", StepNotFoundError):
            meta = await self._checkpointer.metadata(path)
            metrics = await self._read_metrics(path, await self._read_step_doc(path))
        if self._default_item and meta.item_metadata is not None:
            if DEFAULT_ITEM_NAME not in meta.item_metadata:
                raise self._no_default_item(step, path)
            meta.item_metadata = meta.item_metadata.get(DEFAULT_ITEM_NAME)
        if metrics is not None:
            meta.metrics = metrics
        return meta

    @on_engine
    async def metrics(self, step: int) -> Any:
        """The metrics saved with ``step`` (Orbax's ``metrics`` item, written when ``best_fn``
        is set); None when it has none."""
        await self._open()
        name = (await self._step_names()).get(_check_step(step))
        return None if name is None else await self._metrics_item(self.directory / name)

    # -- lifecycle -------------------------------------------------------------------------------
    @on_engine
    async def close(self) -> None:
        """Waits for in-flight commits and retention, then closes the items' handlers (as
        Orbax's, once); raises a commit's failure. Interrupted while it waits (its caller
        cancelled, Ctrl-C on the sync face), it refuses new saves already, and the next
        ``close()`` waits for the commits still in flight."""
        if self._close_done:
            return
        self._closed = True
        # (a save under way puts its commit among those waited for; those queued behind it
        # find the manager closed)
        async with self._saving.get():
            pass
        try:
            await self.wait_until_finished()
        except asyncio.CancelledError:
            raise  # (interrupted: not closed yet)
        except BaseException:
            self._close_done = True
            self._checkpointer._close_handler()
            raise
        self._close_done = True
        self._checkpointer._close_handler()

    @on_engine
    async def __aenter__(self) -> AsyncCheckpointManager:
        await self._ensure_init()
        return self

    @on_engine
    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncCheckpointManager"]
