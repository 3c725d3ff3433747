"""Orbax's ``ocp.utils``: the tree helpers, multi-process helpers and step-directory queries
that training scripts call through it.

Step directories follow Orbax's rules: a committed step is ``<step>`` or ``<prefix>_<step>``
(any padding), on a local filesystem a directory without the temporary suffix, on an object
store a prefix holding ``commit_success.txt``.
"""

from __future__ import annotations

import re
from typing import Any

from . import _commit
from . import _format as fmt
from . import _storage as storage
from ._checkpointer import as_path
from ._runtime import get_runtime
from .errors import InvalidArgumentError
from .multihost import is_primary_host, sync_global_processes
from .tree import (
    deserialize_tree,
    from_flat_dict,
    serialize_tree,
    to_flat_dict,
    to_shape_dtype_struct,
)

__all__ = [
    "TMP_DIR_SUFFIX",
    "any_checkpoint_step",
    "checkpoint_steps",
    "deserialize_tree",
    "from_flat_dict",
    "is_checkpoint_finalized",
    "is_primary_host",
    "is_tmp_checkpoint",
    "serialize_tree",
    "step_from_checkpoint_name",
    "sync_global_processes",
    "tmp_checkpoints",
    "to_flat_dict",
    "to_shape_dtype_struct",
]

TMP_DIR_SUFFIX = fmt.TMP_SUFFIX

_PREFIXED_STEP = re.compile(r"(.+)_(\d+)")
_TMP_STEP = re.compile(r".*?_*?(\d+)" + re.escape(fmt.TMP_SUFFIX))


def step_from_checkpoint_name(name: str) -> int:
    """The step of a step directory's name: ``12``, ``ckpt_0012``, or a temporary
    ``12.orbax-checkpoint-tmp-<ns>``. Raises ``ValueError`` for any other name."""
    if name.isdigit():
        return int(name)
    if m := _PREFIXED_STEP.fullmatch(name):
        return int(m.group(2))
    if m := _TMP_STEP.match(name):
        return int(m.group(1))
    raise InvalidArgumentError(f"{name!r} is not a step directory's name")


def _step_or_none(name: str) -> int | None:
    if _commit.is_tmp_name(name) or not (name.isdigit() or _PREFIXED_STEP.fullmatch(name)):
        return None
    return step_from_checkpoint_name(name)


async def _committed_steps(directory: Any) -> dict[str, int]:
    """name -> step of every committed step directory in ``directory`` (none if it is absent)."""
    names, visible = await _commit.scan(directory)
    named = {n: s for n in names if n in visible and (s := _step_or_none(n)) is not None}
    out = {}
    for name, step in named.items():
        if await _commit.is_visible(directory / name):  # a directory, not a stray file
            out[name] = step
    return out


def checkpoint_steps(checkpoint_dir: Any) -> list[int]:
    """The committed steps in ``checkpoint_dir``, ascending (``[]`` when it does not exist)."""
    named = get_runtime().call(_committed_steps, as_path(checkpoint_dir))
    return sorted(named.values())


def any_checkpoint_step(checkpoint_dir: Any) -> int | None:
    """One committed step of ``checkpoint_dir`` (the latest), or None when it has none."""
    return max(checkpoint_steps(checkpoint_dir), default=None)


def is_checkpoint_finalized(path: Any) -> bool:
    """Whether ``path`` is a committed checkpoint: a directory without the temporary suffix
    locally, a prefix holding ``commit_success.txt`` on an object store."""
    p = as_path(path)
    return not _commit.is_tmp_name(p.name) and get_runtime().call(_commit.is_visible, p)


def is_tmp_checkpoint(path: Any) -> bool:
    """Whether ``path`` is a save that has not committed (yet or ever): a temporary directory
    locally, a prefix without ``commit_success.txt`` on an object store."""
    p = as_path(path)
    if _commit.is_tmp_name(p.name):
        return True
    return not storage.has_rename(p) and not get_runtime().call(_commit.is_visible, p)


def tmp_checkpoints(checkpoint_dir: Any) -> list[str]:
    """The names of the uncommitted step directories in ``checkpoint_dir``."""
    directory = as_path(checkpoint_dir)
    names, visible = get_runtime().call(_commit.scan, directory)
    return sorted(n for n in names
                  if _commit.is_tmp_name(n) or (n not in visible and _step_or_none(n) is not None))
