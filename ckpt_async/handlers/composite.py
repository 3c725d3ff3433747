"""CompositeCheckpointHandler: several named items, one folder each, in one checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .. import _format as fmt
from .. import _integrity
from .. import _storage as storage
from .._paths import AnyPath
from .._stage import cancel_all
from ..args import (
    CheckpointArgs,
    Composite,
    args_classes_for,
    refuse_non_args,
    register_with_handler,
)
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HandlerError,
    InvalidArgumentError,
    ItemNotFoundError,
)
from ..metadata import StepMetadata, step_metadata_of
from ..multihost import current_roles
from .base import (
    AsyncCheckpointHandler,
    CheckpointHandler,
    Writer,
    adapt,
    engine_method,
    is_native,
    typestr_of,
)
from .registry import DefaultCheckpointHandlerRegistry, handler_for_typestr

log = logging.getLogger("ckpt_async")


@dataclasses.dataclass
class CompositeOptions:
    """Orbax's options of a composite handler (``composite_options=``), accepted without
    effect: a checkpointer's or manager's own options govern its saves."""

    multiprocessing_options: Any = None
    temporary_path_class: Any = None
    file_options: Any = None
    atomicity_options: Any = None
    async_options: Any = None


def _default_restore_args(handler: CheckpointHandler) -> Any:
    """The args an item restored without any gets: for a handler of Orbax's interface, its
    restore args class built with no arguments, as Orbax builds them (None where there is
    none such); ckpt_async's own take None."""
    cls = None if is_native(handler) else args_classes_for(type(handler)).get("restore")
    try:
        return cls() if cls is not None else None
    except TypeError:  # (not default-constructible: the handler gets None)
        return None


class CompositeCheckpointHandler(AsyncCheckpointHandler):
    """Saves ``Composite(name=args, ...)``: each item with its own handler, in ``<dir>/<name>``.

    Handlers come from the registry (eager configuration) or are locked in by the first args
    seen for an item; ``Composite(name=None)`` on restore uses the locked-in handler, or the
    handler recorded in the checkpoint's ``_CHECKPOINT_METADATA``.
    """

    typestr = fmt.COMPOSITE_TYPESTR
    #: True for a composite of one item's parts (the random key handlers'): its directory is
    #: the item's, whose ``_CHECKPOINT_METADATA`` (if any) records the item's handler.
    within_item = False

    def __init__(
        self,
        *item_names: str,
        handler_registry: DefaultCheckpointHandlerRegistry | None = None,
        composite_options: CompositeOptions | None = None,
        **item_handlers: CheckpointHandler,
    ) -> None:
        for given, what in ((item_handlers, "item handlers"), (item_names, "item names")):
            if given and handler_registry is not None:  # (as Orbax refuses them)
                raise InvalidArgumentError(
                    f"CompositeCheckpointHandler: handler_registry and {what} were both given; "
                    "register the items' handlers in the registry")
        # (a copy, as Orbax's: lock-ins of this handler's items do not reach the caller's)
        self.registry = DefaultCheckpointHandlerRegistry(handler_registry)
        for name, handler in item_handlers.items():
            if handler is not None:  # (None: an item name, its handler locked in by args)
                self.registry.add(name, None, handler)
        self.item_names = tuple(item_names)
        if item_names or item_handlers:
            self.registry.limit_to([*item_names, *item_handlers, *self.registry.locked_items()])

    def close(self) -> None:
        """Closes each item's handler, as Orbax's (once per handler, however many items or
        args types it is registered for)."""
        for handler in self.registry.handlers():
            if callable(getattr(handler, "close", None)):
                handler.close()

    def handler_for_save(self, name: str, args: CheckpointArgs) -> CheckpointHandler:
        return self.registry.resolve(name, args)

    def _none_args(self, name: str, directory: AnyPath) -> tuple[CheckpointHandler, Any]:
        """An item given as ``None`` to save, as Orbax saves it: its configured (or locked-in)
        handler is handed no item (a JSON item is written as ``null``; a pytree item refuses
        it), and without one the save is refused."""
        handler = self.registry.locked(name)
        if handler is None:
            raise HandlerError(
                f"{directory}: item {name!r} is None and no handler is configured for it; "
                f"pass its save args (e.g. Composite({name}=JsonSave(...))) or configure its "
                "handler (item_handlers=)")
        if not is_native(handler):
            return handler, None  # (a handler written to Orbax's interface gets args=None)
        cls = args_classes_for(type(handler)).get("save")
        if cls is None:
            raise HandlerError(f"{directory}: item {name!r} is None and its handler, "
                               f"{type(handler).__name__}, has no save args to take it")
        return handler, cls(None)

    async def stage(self, directory: AnyPath, args: Composite) -> Writer:
        if not args.items():
            raise HandlerError(f"{directory}: Composite holds no item to save")
        for name, a in args.items():
            if a is not None:
                refuse_non_args(a, "save", f"{directory}: item {name!r}")
            if name in fmt.STEP_FILES:  # (the commit failed writing the file: "Is a directory")
                raise InvalidArgumentError(
                    f"{directory}: item name {name!r} is reserved: the checkpoint's own file "
                    f"of that name is written beside the items' folders; rename the item")
        # (in the order of their names, whatever order each process gave them in)
        handlers = {name: (self.handler_for_save(name, a), a) if a is not None
                    else self._none_args(name, directory) for name, a in sorted(args.items())}
        writers: dict[str, Writer] = {}

        async def abort() -> None:
            await asyncio.gather(*(w.abort() for w in writers.values()))

        try:
            for name, (handler, a) in handlers.items():
                writers[name] = await adapt(handler).stage(directory / name, a)
        except BaseException:
            await abort()  # (the items staged before this one have started writing)
            raise

        async def every(step: Callable[[Writer], Awaitable[None]]) -> None:
            # Each item to its end before a failure is raised: the checkpointer then removes
            # the directory, which no item may still be writing into.
            for outcome in await asyncio.gather(*map(step, writers.values()),
                                                return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

        async def write() -> None:
            await every(Writer.write)

        async def finalize() -> None:
            await every(Writer.finalize)

        async def discard() -> None:
            await every(Writer.discard)

        self.last_item_handlers = {n: typestr_of(h) for n, (h, _a) in handlers.items()}
        return Writer(write, sum(w.nbytes for w in writers.values()),
                      sum(w.arrays for w in writers.values()), finalize, abort, discard)

    async def existing_item(self, directory: AnyPath, args: Any) -> AnyPath | None:
        """The first of ``args``'s items whose folder already holds an item its handler
        would have to write over (an Orbax composite refuses it when finalizing)."""
        if not isinstance(args, Composite):
            return None  # (stage refuses it)
        for name, a in sorted(args.items()):
            if isinstance(a, CheckpointArgs) and name not in fmt.STEP_FILES:
                found = await adapt(self.handler_for_save(name, a)).existing_item(
                    directory / name, a)
                if found is not None:
                    return found
        return None

    async def _recorded(self, directory: AnyPath) -> dict[str, str]:
        """The item handlers a checkpoint's ``_CHECKPOINT_METADATA`` records."""
        if self.within_item:
            return {}
        meta, _ = await _integrity.read_step_metadata(directory)
        if meta is not None and isinstance(meta.item_handlers, str):
            # (its folders are one item's: OCDBT's `d`, `array_metadatas`, taken for items)
            raise HandlerError(
                f"{directory}: the checkpoint was saved by one handler, "
                f"{meta.item_handlers.rsplit('.', 1)[-1]}, not by a composite handler; read "
                "it with a checkpointer of that handler (as Orbax refuses it)")
        if meta is not None and isinstance(meta.item_handlers, dict):
            return meta.item_handlers
        return {}

    async def _stored_items(self, directory: AnyPath) -> tuple[dict[str, str | None], dict[str, str]]:
        """Item names in a checkpoint, with the handler typestr its metadata records; and every
        item the metadata records (an item saved as ``None`` has no directory)."""
        recorded, names = await asyncio.gather(self._recorded(directory),
                                               storage.listdirs(directory))
        return {n: recorded.get(n) for n in names}, recorded

    def _handler_for_restore(self, name: str, args: Any, typestr: str | None,
                             directory: AnyPath) -> CheckpointHandler:
        if args is not None:
            return self.registry.resolve(name, args)
        handler = self.registry.locked(name)
        if handler is not None:
            return handler
        handler = handler_for_typestr(typestr) if typestr else None
        if handler is None:
            raise HandlerError(
                f"{directory}: no handler is configured for item {name!r}; pass its restore args "
                f"(e.g. Composite({name}=StandardRestore())) or register one with "
                f"handlers.DefaultCheckpointHandlerRegistry().add({name!r}, StandardRestore)"
            )
        self.registry.add(name, None, handler)  # (locked in, as Orbax locks the handler the
        return handler                           # checkpoint records when it restores so)

    @engine_method
    async def restore(self, directory: AnyPath, args: Composite | None = None) -> Composite:
        """Restores the items ``args`` names; with no args, every stored item, and ``None`` for
        an item the step records without a folder (ckpt_async before round 36 saved
        ``Composite(x=None)`` so; an item only registered here, never saved, is left out).

        When ``args`` give every item's restore args, the items' handlers are known from them:
        the items start reading while the step's listing and metadata are read (on a cold
        disk or an object store, each a round trip of its own), and are cancelled if the
        step turns out not to hold them or its metadata is damaged."""
        given = dict(args.items()) if args is not None else {}
        for name, a in given.items():
            if a is not None:
                refuse_non_args(a, "restore", f"{directory}: item {name!r}")
        early: dict[str, asyncio.Future[Any]] = {}
        # With several processes an item's restore may run collectives (single-replica
        # broadcasts), which every process must run in the same order: the items are
        # restored one at a time, in the order of their names (as Orbax does).
        one_by_one = current_roles().multi
        if given and all(a is not None for a in given.values()) and not one_by_one:
            # (not locked in before the step is known to hold them; a mismatch is raised below)
            with contextlib.suppress(HandlerError):
                handlers = {n: self.registry.resolve(n, a, lock=False) for n, a in given.items()}
                early = {n: asyncio.ensure_future(adapt(h).restore(directory / n, given[n]))
                         for n, h in handlers.items()}
        try:
            stored, recorded = await self._stored_items(directory)
            for name in [n for n in given or recorded if n not in stored]:
                if await storage.is_file(directory / name):  # (it came back None, or missing)
                    raise CorruptCheckpointError(
                        f"{directory / name}: item {name!r} is a file, not the item's directory")
            for name in given:
                if name not in stored:
                    raise ItemNotFoundError(
                        f"{directory}: item {name!r} is not in the checkpoint (it holds "
                        f"{sorted(stored)})")
            wanted = given or {n: None for n in sorted(set(stored) | set(recorded))}
            present = [n for n in wanted if n in stored]
            handlers = {n: self._handler_for_restore(n, wanted[n], stored.get(n), directory)
                        for n in present}
            if not given:  # (a handler of Orbax's interface gets its default restore args)
                wanted.update({n: _default_restore_args(handlers[n]) for n in present})
            if one_by_one:
                by_name = {n: await adapt(handlers[n]).restore(directory / n, wanted[n])
                           for n in sorted(present)}
                results = [by_name[n] for n in present]
            else:
                results = await asyncio.gather(*(
                    early[n] if n in early else adapt(handlers[n]).restore(directory / n,
                                                                            wanted[n])
                    for n in present))
        except BaseException:
            await cancel_all(list(early.values()))
            raise
        out = dict.fromkeys(sorted(wanted))  # (in the order of their names, as Orbax's)
        out.update(zip(present, results))
        return Composite(**out)

    @engine_method
    async def metadata(self, directory: AnyPath) -> StepMetadata:
        """Orbax's: the step's metadata (``_CHECKPOINT_METADATA``), each item's metadata in
        its ``item_metadata`` (:meth:`items_metadata`); a directory that is not there raises
        CheckpointNotFoundError (a FileNotFoundError, as Orbax's)."""
        (doc, ext), items, there = await asyncio.gather(
            _integrity.read_step_metadata(directory), self.items_metadata(directory),
            storage.is_dir(directory))
        if not there:
            raise CheckpointNotFoundError(f"{directory} does not exist: no checkpoint there")
        return step_metadata_of(doc, ext, items)

    async def items_metadata(self, directory: AnyPath) -> Composite:
        """Each item's metadata (None for an item whose handler is unknown)."""
        stored, _recorded = await self._stored_items(directory)
        out = {}
        for name, typestr in stored.items():
            handler = self.registry.locked(name)
            if handler is None and typestr:
                handler = handler_for_typestr(typestr)
            out[name] = (await self._item_metadata(handler, directory, name)
                         if handler is not None else None)
        return Composite(**out)

    @staticmethod
    async def _item_metadata(handler: CheckpointHandler, directory: AnyPath, name: str) -> Any:
        """An item's metadata; None, as Orbax gives it, where its files are missing (a pytree
        item without ``_METADATA``): the other items' metadata is still given."""
        try:
            return await adapt(handler).metadata(directory / name)
        except CheckpointNotFoundError as exc:
            if not await storage.is_dir(directory / name):
                raise  # (the item, or the step, went while it was read)
            log.warning("%s: item %r is in the checkpoint, but its metadata cannot be read "
                        "(%s); its metadata is None", directory, name, exc)
            return None


register_with_handler(CompositeCheckpointHandler, for_save=True, for_restore=True)(Composite)
