"""Orbax's ``ocp.aggregate_handlers``: a whole tree in one file, the ``checkpoint`` file of
Orbax's first format (its values, or ``PLACEHOLDER://<name>`` for those TensorStore wrote).

ckpt_async's handlers read such files (see the migration guide, "Orbax's older
checkpoints") and never write them; :class:`MsgpackHandler` is here for code of Orbax's that
reads or writes one itself.
"""

from __future__ import annotations

import abc
from typing import Any

from . import _storage as storage
from ._paths import AnyPath, coerce
from ._runtime import get_runtime
from .errors import CheckpointNotFoundError
from .future import CommitFutureAwaitingContractedSignals
from .msgpack_utils import msgpack_serialize, read_tree
from .multihost import is_primary_host
from .tree import serialize_tree

__all__ = ["AggregateHandler", "MsgpackHandler"]


class AggregateHandler(abc.ABC):
    """Writes and reads a whole tree in one file of some format."""

    @abc.abstractmethod
    async def serialize(self, path: Any, item: Any) -> Any:
        """Starts writing ``item`` to the file ``path``; returns a future whose ``result()``
        waits for the write (no atomicity of its own: the caller's commit gives it)."""

    @abc.abstractmethod
    def deserialize(self, path: Any) -> Any:
        """The tree in the file ``path``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases what the handler holds."""


class MsgpackHandler(AggregateHandler):
    """A tree in one msgpack file (:mod:`ckpt_async.msgpack_utils`), written by the primary
    process only. ``pytree_metadata_options`` is accepted for Orbax's signature; rich types
    (``support_rich_types=True``) have no msgpack form and raise ``NotImplementedError``."""

    def __init__(self, primary_host: int | None = 0, pytree_metadata_options: Any = None
                 ) -> None:
        self._primary_host = primary_host
        self._rich = bool(getattr(pytree_metadata_options, "support_rich_types", False))

    async def serialize(self, path: Any, item: Any) -> CommitFutureAwaitingContractedSignals:
        if self._rich:
            raise NotImplementedError(
                "rich typed tree metadata has no form in the msgpack format: set "
                "PyTreeMetadataOptions(support_rich_types=False)")
        target = coerce(path)
        data = msgpack_serialize(serialize_tree(item, keep_empty_nodes=True))

        async def write() -> None:
            if is_primary_host(self._primary_host):
                await storage.write_bytes(target, data)

        return CommitFutureAwaitingContractedSignals(write(), name=f"msgpack {target}")

    def deserialize(self, path: Any) -> Any:
        target: AnyPath = coerce(path)
        data = get_runtime().call(storage.read_optional, target)
        if data is None:
            raise CheckpointNotFoundError(f"{target}: no such file (a msgpack checkpoint was "
                                          "expected)")
        return read_tree(data, target)

    def close(self) -> None:
        pass
