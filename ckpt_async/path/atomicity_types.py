"""The temporary-path interface (Orbax's ``ocp.path.atomicity_types``): how a directory is
written where no reader takes it for a checkpoint, and then made one. The implementations are
in :mod:`ckpt_async.path.atomicity`."""

from __future__ import annotations

import abc
from typing import Any

from .. import _format as fmt
from ..errors import InvalidArgumentError

#: The suffix of a save's temporary directory (``<step>.orbax-checkpoint-tmp...``).
TMP_DIR_SUFFIX = fmt.TMP_SUFFIX
#: The marker a save written in place writes last.
COMMIT_SUCCESS_FILE = fmt.COMMIT_SUCCESS


class ValidationError(InvalidArgumentError):
    """A path is not what a :class:`TemporaryPath` class takes it for (a ``ValueError``, as
    Orbax's)."""


class TemporaryPath(abc.ABC):
    """A directory being written (:meth:`get`) and the one it becomes (:meth:`get_final`).
    ``create`` makes it and ``finalize`` commits it (both coroutines, on the primary process);
    the class's ``validate`` and ``validate_final`` tell a temporary path from a final one."""

    @classmethod
    @abc.abstractmethod
    async def validate(cls, temporary_path: Any) -> None:
        """Raises :class:`ValidationError` unless ``temporary_path`` is a temporary one."""

    @classmethod
    @abc.abstractmethod
    async def validate_final(cls, final_path: Any) -> None:
        """Raises :class:`ValidationError` unless ``final_path`` is a committed one."""

    @classmethod
    @abc.abstractmethod
    def from_temporary(cls, temporary_path: Any, *, file_options: Any = None,
                       snapshot_type: Any = None) -> TemporaryPath:
        """The temporary path ``temporary_path`` is."""

    @classmethod
    @abc.abstractmethod
    def from_final(cls, final_path: Any, *, checkpoint_metadata_store: Any = None,
                   file_options: Any = None, snapshot_type: Any = None) -> TemporaryPath:
        """The temporary path that becomes ``final_path``."""

    @abc.abstractmethod
    def get(self) -> Any:
        """The temporary path (not made)."""

    @abc.abstractmethod
    def get_final(self) -> Any:
        """The final path (not made)."""

    @abc.abstractmethod
    async def create(self) -> Any:
        """Makes the temporary path; returns it."""

    @abc.abstractmethod
    async def finalize(self) -> None:
        """Makes the temporary path the final one."""


__all__ = ["COMMIT_SUCCESS_FILE", "TMP_DIR_SUFFIX", "TemporaryPath", "ValidationError"]
