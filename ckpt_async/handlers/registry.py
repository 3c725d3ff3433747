"""Which handler serves which item: the registry and its lock-in rules.

An item's handler is fixed by the first of: an ``add`` to the registry (eager), or the first
args seen for the item (lazy). Args of another handler for a locked item raise HandlerError.
"""

from __future__ import annotations

from typing import Any

from ..args import (
    CheckpointArgs,
    args_classes_for,
    get_registered_args_cls,
    handler_class_for,
    registered_handler_classes,
)
from ..errors import HandlerError, MissingKeyError
from .base import CheckpointHandler, class_typestr


def _construct(cls: type, item: str | None, args: type | None) -> CheckpointHandler:
    """``cls()`` for a registry entry: HandlerError (a ValueError, as Orbax raises) where the
    class needs arguments, saying to register an instance."""
    try:
        return cls()
    except TypeError as exc:
        raise HandlerError(
            f"cannot register item={item!r}, args_type={getattr(args, '__name__', args)}: "
            f"{cls.__name__} cannot be made without arguments ({exc}); register an instance "
            "of it as the handler") from exc


def handler_for_typestr(typestr: str) -> CheckpointHandler | None:
    """A fresh handler for a type string recorded in ``_CHECKPOINT_METADATA``."""
    from .array import ArrayCheckpointHandler
    from .json_handler import JsonCheckpointHandler
    from .proto import ProtoCheckpointHandler
    from .pytree import PyTreeCheckpointHandler, StandardCheckpointHandler
    from .random_key import JaxRandomKeyCheckpointHandler, NumpyRandomKeyCheckpointHandler

    known: dict[str, type] = {cls.typestr: cls for cls in (
        StandardCheckpointHandler, PyTreeCheckpointHandler, JsonCheckpointHandler,
        ArrayCheckpointHandler, JaxRandomKeyCheckpointHandler,
        NumpyRandomKeyCheckpointHandler, ProtoCheckpointHandler)}
    cls = known.get(typestr)
    if cls is None:  # Orbax's public aliases and ours, by class name
        tail = typestr.rsplit(".", 1)[-1]
        cls = {c.__name__: c for c in known.values()}.get(tail)
    if cls is None:  # a handler of one's own, its args registered with it (as Orbax finds it)
        cls = next((c for c in registered_handler_classes() if class_typestr(c) == typestr),
                   None)
    try:
        return cls() if cls is not None else None
    except TypeError:  # (not default-constructible: its args must name it)
        return None


class AlreadyExistsError(HandlerError):
    """An ``add`` of an (item, args type) pair the registry already holds (Orbax's; a
    ``ValueError``)."""


class NoEntryError(HandlerError, MissingKeyError):
    """A ``get`` of what the registry does not hold (Orbax's; a ``KeyError``)."""


class DefaultCheckpointHandlerRegistry:
    """Maps item names to handlers: ``add(item, args_type_or_handler)``, ``get``, ``has``.

    An entry of item ``None`` is a general one: the handler of any item not registered
    otherwise whose args are of that type (Orbax's). ``DefaultCheckpointHandlerRegistry(other)``
    starts with ``other``'s entries (the same handlers), as Orbax's does; a composite handler
    (and so a manager) works on such a copy of the registry it is given, whose lock-ins do not
    reach the caller's."""

    def __init__(self, other_registry: Any = None) -> None:
        self._handlers: dict[str | None, CheckpointHandler] = {}
        self._args: dict[tuple[str | None, type], CheckpointHandler] = {}
        #: The only items args may lock in (None: any), once a manager or composite handler
        #: was given its items (``item_names``, ``item_handlers``), as in Orbax.
        self._only: set[str] | None = None
        if isinstance(other_registry, DefaultCheckpointHandlerRegistry):
            self._handlers = dict(other_registry._handlers)
            self._args = dict(other_registry._args)
            self._only = None if other_registry._only is None else set(other_registry._only)
        elif other_registry is not None:  # (any registry of Orbax's protocol)
            for (item, args_type), handler in other_registry.get_all_entries().items():
                self.add(item, args_type, handler)

    def get_all_entries(self) -> dict[tuple[str | None, type], CheckpointHandler]:
        """Every ``(item, args type)`` entry with its handler (Orbax's)."""
        return self._args

    def __repr__(self) -> str:
        return f"DefaultCheckpointHandlerRegistry({self._args})"

    def limit_to(self, items: Any) -> None:
        """Lets args lock in only ``items`` (and the items registered already)."""
        self._only = {*(self._only or ()), *items}

    def add(self, item: str | None, args: type | None, handler: Any = None) -> None:
        """Registers ``handler`` (or the handler class of ``args``) for ``item``;
        :class:`AlreadyExistsError` if the pair is registered already, as in Orbax."""
        if args is not None and not isinstance(args, type):
            args = type(args)  # (an args instance, as Orbax takes it)
        if args is not None and (item, args) in self._args:
            raise AlreadyExistsError(
                f"Entry for item={item} and args_type={args} already exists in the registry.")
        if handler is None:
            cls = handler_class_for(args) if args is not None else None
            if cls is None:
                raise HandlerError(f"no handler is known for args type {args!r}; pass one")
            current = self._handlers.get(item) if item is not None else None
            handler = current if isinstance(current, cls) else _construct(cls, item, args)
        elif isinstance(handler, type):
            handler = _construct(handler, item, args)
        if item is not None:  # (general entries, of item None, lock no item in)
            current = self._handlers.get(item)
            if current is not None and type(current) is not type(handler):
                raise HandlerError(
                    f"item {item!r} is already handled by {type(current).__name__}; cannot "
                    f"also register {type(handler).__name__}")
            self._handlers[item] = handler
        if args is not None:
            self._args[(item, args)] = handler
        else:
            for a in args_classes_for(type(handler)).values():
                self._args[(item, a)] = handler

    def get(self, item: str | None, args: type | None = None) -> CheckpointHandler:
        if args is not None and not isinstance(args, type):
            args = type(args)  # (an args instance, as Orbax takes it)
        if args is None:
            handler = self._handlers.get(item)
        else:
            handler = self._args.get((item, args))
        if handler is None:
            raise NoEntryError(f"no handler registered for item {item!r} and args {args!r}")
        return handler

    def has(self, item: str | None, args: type | None = None) -> bool:
        try:
            self.get(item, args)
        except HandlerError:
            return False
        return True

    def locked_items(self) -> list[str]:
        return [n for n in self._handlers if n is not None]

    def locked(self, item: str) -> CheckpointHandler | None:
        return self._handlers.get(item)

    def handlers(self) -> list[CheckpointHandler]:
        """Every handler registered or locked in, each once (Orbax's
        ``_get_unique_registered_items_and_handlers``)."""
        return list({id(h): h for h in (*self._handlers.values(), *self._args.values())}.values())

    def resolve(self, item: str, args: CheckpointArgs, *, lock: bool = True) -> CheckpointHandler:
        """The handler for ``args`` of ``item``: locked in on first use, enforced afterwards.
        With ``lock=False`` an item not yet locked is not locked in: a fresh handler of the
        class ``args`` calls for is returned (a later ``resolve`` locks the item in)."""
        entry = self._args.get((item, type(args)))
        if entry is not None:  # (registered for the pair, its args class maybe only here)
            return entry
        current = self._handlers.get(item)
        general = self._args.get((None, type(args)))
        if current is None and general is not None:
            # (a general entry's handler, registered for the item as Orbax's composite does)
            if lock:
                self.add(item, type(args), general)
            return general
        cls = handler_class_for(args)
        if cls is None:
            raise HandlerError(f"item {item!r}: {type(args).__name__} is not a checkpoint args type")
        if current is None:
            if self._only is not None and item not in self._only:
                raise HandlerError(
                    f"item {item!r} is not one of this manager's items ({sorted(self._only)}): "
                    "with item_names or item_handlers given, only those can be saved or "
                    "restored with args, as in Orbax")
            if not lock:
                return cls()
            self.add(item, type(args))
            return self._handlers[item]
        # (exactly the args the locked handler's class takes, as Orbax's registry keys them:
        # the standard handler, a PyTree handler here, does not take PyTreeSave/PyTreeRestore)
        if isinstance(args, tuple(args_classes_for(type(current)).values())):
            return current
        raise HandlerError(
            f'Item "{item}" and args "{args!r}" does not match with any registered handler! '
            f"Item {item!r} is locked to {type(current).__name__}, and {type(args).__name__} is "
            f"handled by {cls.__name__}; use a new manager to change an item's type")


#: Orbax's other name of the registry class.
CheckpointHandlerRegistry = DefaultCheckpointHandlerRegistry


def create_default_handler_registry(**items_to_handlers: Any) -> DefaultCheckpointHandlerRegistry:
    """Orbax's ``handlers.create_default_handler_registry``: a registry holding each item's
    handler under both args classes registered with it (``ValueError`` for a handler with
    no save or no restore args registered)."""
    registry = DefaultCheckpointHandlerRegistry()
    for item, handler in items_to_handlers.items():
        for args_cls in get_registered_args_cls(handler):
            registry.add(item, args_cls, handler)
    return registry
