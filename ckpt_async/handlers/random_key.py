"""JaxRandomKeyCheckpointHandler and NumpyRandomKeyCheckpointHandler: a random state per item,
in Orbax's layout.

An item's folder holds two parts: ``<key_name>/``, the key's data (an array item, as
:class:`ArrayCheckpointHandler` writes it, for a JAX key; a pytree item for a NumPy state),
and ``<key_name>_metadata/metadata``, a JSON document saying how to rebuild the key
(``{"typed": ...}`` or ``{"legacy": ...}``). ckpt_async adds what Orbax's documents lack, in
keys Orbax ignores: a typed JAX key's implementation (Orbax restores every typed key with the
default one), and which integers of a NumPy bit generator's state were stored as decimal
strings (PCG64's 128-bit state and increment, which no array dtype holds: Orbax cannot save
such a state).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .. import _format as fmt
from .._paths import AnyPath, coerce
from ..args import (
    ArrayRestore,
    ArraySave,
    Composite,
    JaxRandomKeyRestore,
    JaxRandomKeySave,
    JsonRestore,
    JsonSave,
    NumpyRandomKeyRestore,
    NumpyRandomKeySave,
    PyTreeRestore,
    PyTreeSave,
    register_with_handler,
)
from ..errors import UnsupportedLeafError
from .array import ArrayCheckpointHandler
from .base import AsyncCheckpointHandler, CheckpointHandler, Writer, engine_method
from .composite import CompositeCheckpointHandler
from .json_handler import JsonCheckpointHandler
from .pytree import PyTreeCheckpointHandler
from .registry import DefaultCheckpointHandlerRegistry


class _RandomKeyHandler(AsyncCheckpointHandler):
    """The two parts of a random key item, as a composite of them (as Orbax has it): the key
    (``key_handler``'s item) and its JSON description."""

    def __init__(self, key_name: str, key_handler: CheckpointHandler) -> None:
        self._key_name = key_name
        self._key_handler = key_handler
        self._metadata_name = f"{key_name}_metadata"
        parts = DefaultCheckpointHandlerRegistry()
        parts.add(self._key_name, None, key_handler)
        parts.add(self._metadata_name, None, JsonCheckpointHandler())
        self._parts = CompositeCheckpointHandler(handler_registry=parts)
        self._parts.within_item = True

    async def _stage_parts(self, directory: AnyPath, key_args: Any,
                           description: dict[str, Any]) -> Writer:
        return await self._parts.stage(directory, Composite(**{
            self._key_name: key_args, self._metadata_name: JsonSave(description)}))

    async def existing_item(self, directory: AnyPath, args: Any) -> AnyPath | None:
        return await self._key_handler.existing_item(coerce(directory) / self._key_name, None)

    async def _restore_parts(self, directory: AnyPath, key_args: Any
                             ) -> tuple[Any, Mapping[str, Any]]:
        parts = await self._parts.restore(coerce(directory), Composite(**{
            self._key_name: key_args, self._metadata_name: JsonRestore()}))
        return parts[self._key_name], parts[self._metadata_name]

    @engine_method
    async def metadata(self, directory: AnyPath) -> None:
        return None


class JaxRandomKeyCheckpointHandler(_RandomKeyHandler):
    """Saves and restores a JAX PRNG key (``JaxRandomKeySave`` / ``JaxRandomKeyRestore``): a
    typed key (``jax.random.key``) comes back typed, with its implementation; a raw
    ``uint32`` key (``jax.random.PRNGKey``) as that array."""

    typestr = fmt.JAX_RANDOM_KEY_TYPESTR

    def __init__(self, key_name: str | None = None) -> None:
        super().__init__(key_name or "jax_random_key", ArrayCheckpointHandler())

    async def stage(self, directory: AnyPath, args: JaxRandomKeySave) -> Writer:
        item = args.item
        if not isinstance(item, jax.Array):
            raise UnsupportedLeafError(
                f"{directory}: JaxRandomKeySave takes a jax.Array key, not {type(item).__name__}")
        description: dict[str, Any] = {"typed": False}
        if jax.dtypes.issubdtype(item.dtype, jax.dtypes.prng_key):
            description = {"typed": True, "impl": str(jax.random.key_impl(item))}
            item = jax.random.key_data(item)
        return await self._stage_parts(directory, ArraySave(item, args.save_args),
                                       description)

    @engine_method
    async def restore(self, directory: AnyPath, args: JaxRandomKeyRestore | None = None
                      ) -> jax.Array:
        restore_args = args.restore_args if args is not None else None
        data, description = await self._restore_parts(
            directory, ArrayRestore(restore_args=restore_args))
        if not description.get("typed"):
            return data
        impl = description.get("impl")  # (absent in Orbax's: its default implementation)
        return jax.random.wrap_key_data(data, impl=impl) if impl else \
            jax.random.wrap_key_data(data)


#: Key of a NumPy state's description listing the integers stored as decimal strings.
_INTS_AS_STRINGS = "ckpt_async_ints_as_strings"
_INT64 = np.iinfo(np.int64)


def _big_ints_as_strings(state: Any, path: tuple[str, ...] = ()
                         ) -> tuple[Any, list[list[str]]]:
    """A bit generator's state dict with each Python int outside int64 as its decimal string,
    and the key paths of those ints."""
    if isinstance(state, dict):
        out, found = {}, []
        for key, value in state.items():
            out[key], inner = _big_ints_as_strings(value, (*path, str(key)))
            found += inner
        return out, found
    if isinstance(state, int) and not isinstance(state, bool) and \
            not _INT64.min <= state <= _INT64.max:
        return str(state), [list(path)]
    return state, []


def _strings_as_ints(state: Any, paths: list[list[str]]) -> Any:
    for path in paths:
        parent = state
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = int(parent[path[-1]])
    return state


class NumpyRandomKeyCheckpointHandler(_RandomKeyHandler):
    """Saves and restores a NumPy random state (``NumpyRandomKeySave`` /
    ``NumpyRandomKeyRestore``): the legacy tuple of ``np.random.get_state()`` comes back as a
    tuple (for ``np.random.set_state``), a bit generator's ``state`` dict as a dict (for
    ``bit_generator.state = ...``)."""

    typestr = fmt.NUMPY_RANDOM_KEY_TYPESTR

    def __init__(self, key_name: str | None = None) -> None:
        super().__init__(key_name or "np_random_key", PyTreeCheckpointHandler())

    async def stage(self, directory: AnyPath, args: NumpyRandomKeySave) -> Writer:
        item = args.item
        if isinstance(item, tuple):
            description: dict[str, Any] = {"legacy": True}
        elif isinstance(item, dict):
            item, as_strings = _big_ints_as_strings(item)
            description = {"legacy": False}
            if as_strings:
                description[_INTS_AS_STRINGS] = as_strings
        else:
            raise UnsupportedLeafError(
                f"{directory}: NumpyRandomKeySave takes the tuple of np.random.get_state() or "
                f"a bit generator's state dict, not {type(item).__name__}")
        return await self._stage_parts(directory, PyTreeSave(item), description)

    @engine_method
    async def restore(self, directory: AnyPath, args: NumpyRandomKeyRestore | None = None
                      ) -> Any:
        state, description = await self._restore_parts(directory, PyTreeRestore())
        if description.get("legacy"):
            return tuple(state)
        return _strings_as_ints(state, description.get(_INTS_AS_STRINGS, []))


register_with_handler(JaxRandomKeyCheckpointHandler, for_save=True)(JaxRandomKeySave)
register_with_handler(JaxRandomKeyCheckpointHandler, for_restore=True)(JaxRandomKeyRestore)
register_with_handler(NumpyRandomKeyCheckpointHandler, for_save=True)(NumpyRandomKeySave)
register_with_handler(NumpyRandomKeyCheckpointHandler, for_restore=True)(NumpyRandomKeyRestore)
