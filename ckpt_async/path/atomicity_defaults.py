"""Which temporary-path class a path gets by default (Orbax's ``ocp.path.atomicity_defaults``):
:class:`~ckpt_async.path.atomicity.CommitFileTemporaryPath` on an object store,
:class:`~ckpt_async.path.atomicity.AtomicRenameTemporaryPath` elsewhere, unless
``AtomicityOptions(mode=...)`` names one."""

from __future__ import annotations

from typing import Any

from .._paths import as_given, is_store
from ..errors import InvalidArgumentError
from .atomicity import AtomicRenameTemporaryPath, CommitFileTemporaryPath
from .atomicity_types import TemporaryPath

_BY_MODE: dict[str, type[TemporaryPath]] = {"commit_file": CommitFileTemporaryPath,
                                            "atomic_rename": AtomicRenameTemporaryPath}


def get_default_temporary_path_class(path: Any, *, atomicity_options: Any = None
                                     ) -> type[TemporaryPath]:
    """The temporary-path class of a checkpoint at ``path``: the one ``atomicity_options``'
    mode names, else by where ``path`` is."""
    mode = getattr(atomicity_options, "mode", None)
    mode = getattr(mode, "value", mode)
    if mode not in (None, "auto"):
        if mode not in _BY_MODE:
            raise InvalidArgumentError(f"Unsupported atomicity_mode: {mode}.")
        return _BY_MODE[mode]
    return CommitFileTemporaryPath if is_store(as_given(path)) else AtomicRenameTemporaryPath


#: The same for an item's directory inside a step (the same answer, as in Orbax).
get_item_default_temporary_path_class = get_default_temporary_path_class

__all__ = ["get_default_temporary_path_class", "get_item_default_temporary_path_class"]
