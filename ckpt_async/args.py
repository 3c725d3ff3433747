"""Checkpoint args: what to save or restore for one item, and which handler does it.

The names and fields are Orbax's. Each args class is registered with the handler class that
handles it (:func:`register_with_handler`); a manager uses that to resolve the handler of an
item from the first args it sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .errors import HandlerError, InvalidArgumentError, InvalidTypeError

A = TypeVar("A", bound=type)

#: args class -> handler class; filled by register_with_handler.
_HANDLER_FOR_ARGS: dict[type, type] = {}
#: handler class -> (save args class, restore args class)
_ARGS_FOR_HANDLER: dict[type, dict[str, type]] = {}


class CheckpointArgs:
    """Base of every args class."""


def register_with_handler(
    handler_cls: type, *, for_save: bool = False, for_restore: bool = False
) -> Callable[[A], A]:
    """Class decorator: ``args_cls`` is handled by ``handler_cls`` (Orbax's name and meaning):
    ``ValueError`` unless it is for save, restore or both, ``TypeError`` for a class that
    is no :class:`CheckpointArgs`, as in Orbax."""
    if not for_save and not for_restore:
        raise InvalidArgumentError(
            f"register_with_handler({handler_cls.__name__}): for_save and for_restore cannot "
            "both be False")

    def deco(args_cls: A) -> A:
        if not (isinstance(args_cls, type) and issubclass(args_cls, CheckpointArgs)):
            raise InvalidTypeError(f"{args_cls} must subclass CheckpointArgs in order to be "
                                   f"registered with {handler_cls.__name__}")
        _HANDLER_FOR_ARGS[args_cls] = handler_cls
        # (the first args class registered for each kind stays the handler's, as in Orbax:
        # another registered later, e.g. one's own for a built-in handler, does not replace it)
        pair = _ARGS_FOR_HANDLER.setdefault(handler_cls, {})
        if for_save:
            pair.setdefault("save", args_cls)
        if for_restore:
            pair.setdefault("restore", args_cls)
        return args_cls

    return deco


def handler_class_for(args: CheckpointArgs | type) -> type | None:
    cls = args if isinstance(args, type) else type(args)
    for klass in cls.__mro__:
        if klass in _HANDLER_FOR_ARGS:
            return _HANDLER_FOR_ARGS[klass]
    return None


def refuse_non_args(given: Any, kind: str, where: str, *, several: bool = False) -> None:
    """``InvalidTypeError`` unless ``given`` is checkpoint args (an instance): an args class
    given for its instance, or a tree given for its args, named with the call to make.
    ``kind``: ``"save"`` or ``"restore"``; ``several``: the args of several items (a
    ``Composite``) are expected."""
    if isinstance(given, CheckpointArgs):
        return

    item = f"ocp.args.Standard{kind.capitalize()}(state)"
    if isinstance(given, type) and issubclass(given, CheckpointArgs):
        fix = (f"ocp.args.Composite(name={item}, ...)" if issubclass(given, Composite)
               else f"ocp.args.{given.__name__}({'state' if kind == 'save' else ''})")
        raise InvalidTypeError(
            f"{where}: args is the class ocp.args.{given.__name__}, not an instance of it; "
            f"pass {fix}")
    fix = f"ocp.args.Composite(name={item}, ...)" if several else item
    raise InvalidTypeError(
        f"{where}: args is a {type(given).__module__}.{type(given).__qualname__}, not "
        f"checkpoint args; wrap the item in its handler's args, e.g. {fix}")


def registered_handler_classes() -> list[type]:
    """Every handler class some args class is registered with, each once."""
    return list(dict.fromkeys(_HANDLER_FOR_ARGS.values()))


def args_classes_for(handler_cls: type) -> dict[str, type]:
    for klass in handler_cls.__mro__:
        if klass in _ARGS_FOR_HANDLER:
            return _ARGS_FOR_HANDLER[klass]
    return {}


def get_registered_handler_cls(arg: CheckpointArgs | type) -> type:
    """The handler class ``arg`` (an args class or instance) is registered with (Orbax's
    name): ``TypeError`` for what is not an args class, ``ValueError`` for one registered
    with none."""
    cls = arg if isinstance(arg, type) else type(arg)
    if not issubclass(cls, CheckpointArgs):
        raise InvalidTypeError(f"{cls} must be a subclass of CheckpointArgs")
    handler = _HANDLER_FOR_ARGS.get(cls)
    if handler is None:
        raise HandlerError(f"no CheckpointHandler is registered for {cls.__name__}; use "
                           "register_with_handler")
    return handler


def get_registered_args_cls(handler: Any) -> tuple[type, type]:
    """The (save, restore) args classes registered with ``handler`` (a handler class or
    instance), as Orbax gives them; ``ValueError`` where either is missing."""
    cls = handler if isinstance(handler, type) else type(handler)
    pair = _ARGS_FOR_HANDLER.get(cls, {})
    for kind in ("save", "restore"):
        if kind not in pair:
            raise HandlerError(f"no CheckpointArgs are registered for {kind} with {cls.__name__}")
    return pair["save"], pair["restore"]


def has_registered_args(handler: Any) -> bool:
    """Whether ``handler`` (a class or instance) has save and restore args registered."""
    try:
        get_registered_args_cls(handler)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class StandardSave(CheckpointArgs):
    """Save a pytree of arrays and scalars (StandardCheckpointHandler)."""

    item: Any
    save_args: Any = None
    custom_metadata: Any = None


@dataclasses.dataclass
class StandardRestore(CheckpointArgs):
    """Restore a pytree, optionally into a target tree of abstract or concrete arrays."""

    item: Any = None
    strict: bool = True
    support_layout: bool = False
    fallback_sharding: Any = None  # (accepted; a restore places arrays as its target says)


@dataclasses.dataclass
class PyTreeSave(CheckpointArgs):
    """Save a pytree that may also hold strings (PyTreeCheckpointHandler)."""

    item: Any
    save_args: Any = None
    ocdbt_target_data_file_size: int | None = None
    custom_metadata: Any = None
    # (in Orbax's order above; these two only by keyword)
    enable_pinned_host_transfer: bool | None = None
    partial_update: bool = False


@dataclasses.dataclass
class PyTreeRestore(CheckpointArgs):
    """Restore a pytree; ``partial_restore`` allows a target holding a subset of the keys."""

    item: Any = None
    restore_args: Any = None
    transforms: Any = None
    transforms_default_to_original: bool = True
    legacy_transform_fn: Any = None
    partial_restore: bool = False


@dataclasses.dataclass
class JsonSave(CheckpointArgs):
    """Save a JSON-serializable document (JsonCheckpointHandler)."""

    item: Any


@dataclasses.dataclass
class JsonRestore(CheckpointArgs):
    """Restore a JSON document."""

    item: Any = None


@dataclasses.dataclass
class ArraySave(CheckpointArgs):
    """Save one array or scalar (ArrayCheckpointHandler): a ``jax.Array``, a NumPy array, a
    Python or NumPy number; ``save_args``: its :class:`~ckpt_async.SaveArgs`."""

    item: Any
    save_args: Any = None


@dataclasses.dataclass
class ArrayRestore(CheckpointArgs):
    """Restore one array or scalar; ``restore_args``: its :class:`~ckpt_async.RestoreArgs`
    (``ArrayRestoreArgs(sharding=...)``, ``RestoreArgs(restore_type=np.ndarray, dtype=...)``).
    ``item`` is accepted and unused, as in Orbax."""

    item: Any = None
    restore_args: Any = None


@dataclasses.dataclass
class JaxRandomKeySave(CheckpointArgs):
    """Save a JAX PRNG key (JaxRandomKeyCheckpointHandler): a typed key
    (``jax.random.key``) or a raw ``uint32`` one (``jax.random.PRNGKey``)."""

    item: Any
    save_args: Any = None


@dataclasses.dataclass
class JaxRandomKeyRestore(CheckpointArgs):
    """Restore a JAX PRNG key, typed if it was saved typed."""

    restore_args: Any = None


@dataclasses.dataclass
class NumpyRandomKeySave(CheckpointArgs):
    """Save a NumPy random state (NumpyRandomKeyCheckpointHandler): the legacy tuple of
    ``np.random.get_state()``, or a bit generator's ``state`` dict."""

    item: Any


@dataclasses.dataclass
class NumpyRandomKeyRestore(CheckpointArgs):
    """Restore a NumPy random state, as the tuple or dict it was saved as."""


@dataclasses.dataclass
class ProtoSave(CheckpointArgs):
    """Save a protocol buffer message (ProtoCheckpointHandler), in its text format."""

    item: Any


@dataclasses.dataclass
class ProtoRestore(CheckpointArgs):
    """Restore a protocol buffer message; ``item``: its class."""

    item: Any


class _NoItem(AttributeError, KeyError):
    """An item a Composite lacks, asked for as an attribute: ``except KeyError`` (Orbax's
    error) catches it, and ``hasattr`` is False."""


class Composite(CheckpointArgs, Mapping[str, Any]):
    """Several named items, each with its own args (or ``None``): ``Composite(state=..., ...)``.

    Also the type of a multi-item restore's result: ``result.state`` and ``result['state']``.
    """

    def __init__(self, **items: Any) -> None:
        for name in items:
            if not name or "/" in name or name in (".", ".."):
                raise InvalidArgumentError(f"invalid item name {name!r}: it names a directory")
            if name.startswith("__"):  # (kept for options, as Orbax keeps them)
                raise InvalidArgumentError(
                    f'Composite keys cannot start with "__": {name!r} (as in Orbax)')
        object.__setattr__(self, "_items", dict(items))  # (in the order given, as Orbax's)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_items"][name]
        except KeyError:
            raise _NoItem(f"Composite has no item {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Composite is immutable")

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Composite({self._items!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):  # (equal to a mapping of the same items, as Orbax's)
            return NotImplemented
        return self._items == dict(other.items())

    __hash__ = None  # type: ignore[assignment]  # (equal by contents, so unhashable, as Orbax's)
