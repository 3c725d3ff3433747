"""Orbax's ``ocp.utils``: the tree helpers, multi-process helpers and step-directory queries
that training scripts call through it.

Step directories follow Orbax's rules: a committed step is ``<step>`` or ``<prefix>_<step>``
(any padding), on a local filesystem a directory without the temporary suffix, on an object
store a prefix holding ``commit_success.txt``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax

from . import _commit
from . import _format as fmt
from . import _storage as storage
from ._paths import as_given, as_path
from ._runtime import get_runtime
from .errors import CheckpointNotFoundError, InvalidArgumentError
from .handlers._legacy import leaf_is_placeholder, leaf_placeholder, name_from_leaf_placeholder
from .manager import _steps
from .multihost import (
    broadcast_one_to_all,
    is_pathways_backend,
    is_primary_host,
    reached_preemption,
    sync_global_devices,
    sync_global_processes,
)
from .tree import (
    PyTree,
    _is_empty_or_leaf,
    _is_sequence_key,
    _key_name,
    deserialize_tree,
    from_flat_dict,
    from_flattened_with_keypath,
    serialize_tree,
    to_flat_dict,
    to_shape_dtype_struct,
)

__all__ = [
    "PyTree",
    "TMP_DIR_SUFFIX",
    "all_leaves_are_placeholders",
    "all_temporary_paths",
    "fully_replicated_host_local_array_to_global_array",
    "any_checkpoint_step",
    "broadcast_one_to_all",
    "checkpoint_steps",
    "checkpoint_steps_paths",
    "deserialize_tree",
    "from_flat_dict",
    "from_flattened_with_keypath",
    "get_key_name",
    "get_save_directory",
    "is_checkpoint_finalized",
    "is_dict_key",
    "is_empty_node",
    "is_empty_or_leaf",
    "is_gcs_path",
    "is_pathways_backend",
    "is_primary_host",
    "is_scalar",
    "is_sequence_key",
    "is_tmp_checkpoint",
    "leaf_is_placeholder",
    "leaf_placeholder",
    "name_from_leaf_placeholder",
    "pytree_structure",
    "reached_preemption",
    "record_saved_duration",
    "serialize_tree",
    "step_from_checkpoint_name",
    "sync_global_devices",
    "sync_global_processes",
    "tmp_checkpoints",
    "to_flat_dict",
    "to_shape_dtype_struct",
    "tuple_path_from_keypath",
]

TMP_DIR_SUFFIX = fmt.TMP_SUFFIX

_TMP_STEP = re.compile(r".*?_*?(\d+)" + re.escape(fmt.TMP_SUFFIX))


def fully_replicated_host_local_array_to_global_array(arr: Any) -> Any:
    """A ``jax.Array`` replicated over every device of the run, from ``arr``, which holds the
    same value on each of this process's devices: ``pmap``'s output (one copy per device
    along a leading axis, which is dropped) or an array replicated over the local devices
    (Orbax's helper, for pmap-era training states)."""
    import jax
    import numpy as np

    pieces = sorted((s.data for s in arr.addressable_shards),
                    key=lambda d: next(iter(d.devices())).id)
    shape = pieces[0].shape
    if shape != arr.shape:  # (pmap: each device holds one slice of the leading axis)
        pieces = [p[0] for p in pieces]
        shape = shape[1:]
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    spec = jax.sharding.PartitionSpec(None) if shape else jax.sharding.PartitionSpec()
    return jax.make_array_from_single_device_arrays(
        shape, jax.sharding.NamedSharding(mesh, spec), pieces)


def is_scalar(x: Any) -> bool:
    """Whether ``x`` is a Python or NumPy number (Orbax's helper)."""
    import numpy as np

    return isinstance(x, int | float | np.number)


def get_key_name(key: Any) -> int | str:
    """A jax key path entry's name: a sequence index, or a dict key or attribute as ``str``."""
    return _key_name(key)


def tuple_path_from_keypath(keypath: tuple[Any, ...]) -> tuple[str, ...]:
    """A jax key path (``tree_map_with_path``'s) as a tuple of its entries' names."""
    return tuple(str(_key_name(k)) for k in keypath)


def get_save_directory(step: int, directory: Any, name: str | None = None,
                       step_prefix: str | None = None, override_directory: Any = None,
                       step_format_fixed_length: int | None = None,
                       step_name_format: Any = None) -> Any:
    """The directory of ``step`` (and of item ``name`` in it) under ``directory``
    (:func:`ckpt_async.path.step.get_save_directory`)."""
    from .path import step as step_names

    return step_names.get_save_directory(step, directory, name, step_prefix,
                                         override_directory, step_format_fixed_length,
                                         step_name_format)


def step_from_checkpoint_name(name: str) -> int:
    """The step of a step directory's name: ``12``, ``ckpt_0012``, or a temporary
    ``12.orbax-checkpoint-tmp-<ns>``. Raises ``ValueError`` for any other name."""
    if parsed := _steps.parse_step(name, None):
        return parsed[1]
    if m := _TMP_STEP.match(name):
        return int(m.group(1))
    raise InvalidArgumentError(f"{name!r} is not a step directory's name")


def _scan(checkpoint_dir: Any) -> _steps.DirView:
    return get_runtime().call(_steps.scan_dir, as_path(checkpoint_dir), None)


def checkpoint_steps(checkpoint_dir: Any) -> list[int]:
    """The committed steps in ``checkpoint_dir``, ascending (``[]`` when it does not exist)."""
    return list(_scan(checkpoint_dir).steps)


def checkpoint_steps_paths(checkpoint_dir: Any) -> list[Any]:
    """The directories of the committed steps in ``checkpoint_dir``, in step order."""
    root = as_path(checkpoint_dir)
    return [root / name for name in _scan(checkpoint_dir).steps.values()]


def any_checkpoint_step(checkpoint_dir: Any) -> int | None:
    """One committed step of ``checkpoint_dir`` (the latest), or None when it has none."""
    return max(checkpoint_steps(checkpoint_dir), default=None)


def _temporary_path_class(path: Any, temporary_path_cls: Any, atomicity_options: Any) -> Any:
    """The temporary-path class that decides for ``path`` (Orbax's classes taken as ours)."""
    from .path import atomicity, atomicity_defaults

    cls = temporary_path_cls or atomicity_defaults.get_default_temporary_path_class(
        path, atomicity_options=atomicity_options)
    if getattr(cls, "__module__", "").startswith("orbax.") and cls.__name__ in (
            "AtomicRenameTemporaryPath", "CommitFileTemporaryPath"):
        cls = getattr(atomicity, cls.__name__)
    return cls


def _validates(check: Any, path: Any) -> bool:
    """Whether the coroutine ``check(path)`` (a temporary-path class's ``validate`` or
    ``validate_final``) passes: a ``ValidationError`` (a ``ValueError``) says it does not."""
    try:
        get_runtime().call(check, path)
    except ValueError:
        return False
    return True


def _legacy_rename_classes(cls: Any, atomicity_options: Any) -> list[Any]:
    from .path import atomicity

    if getattr(atomicity_options, "allow_legacy_atomic_rename", False) and \
            cls is not atomicity.AtomicRenameTemporaryPath:
        return [atomicity.AtomicRenameTemporaryPath]
    return []


def is_checkpoint_finalized(path: Any, *, temporary_path_cls: Any = None,
                            atomicity_options: Any = None) -> bool:
    """Whether ``path`` is a committed checkpoint: a directory without the temporary suffix
    locally, a prefix holding ``commit_success.txt`` on an object store. Given
    ``temporary_path_cls`` (or ``atomicity_options`` naming a mode), as that class's
    ``validate_final`` says (``CommitFileTemporaryPath``: a directory holding
    ``commit_success.txt``), as in Orbax."""
    if temporary_path_cls is None and atomicity_options is None:
        p = as_path(path)
        return not _commit.is_tmp_name(p.name) and get_runtime().call(_commit.is_visible, p)
    p = as_given(path)
    cls = _temporary_path_class(p, temporary_path_cls, atomicity_options)
    return any(_validates(c.validate_final, p)
               for c in [cls, *_legacy_rename_classes(cls, atomicity_options)])


def is_tmp_checkpoint(path: Any, *, temporary_path_cls: Any = None,
                      atomicity_options: Any = None) -> bool:
    """Whether ``path`` is a save that has not committed (yet or ever): a temporary directory
    locally, a prefix without ``commit_success.txt`` on an object store; False where there is
    no directory. Given ``temporary_path_cls`` (or ``atomicity_options`` naming a mode), as
    that class's ``validate`` says (``CommitFileTemporaryPath``: a directory without
    ``commit_success.txt``), as in Orbax."""
    if temporary_path_cls is None and atomicity_options is None:
        return get_runtime().call(_is_tmp, as_path(path))
    p = as_given(path)
    cls = _temporary_path_class(p, temporary_path_cls, atomicity_options)
    if any(_validates(c.validate_final, p) for c in _legacy_rename_classes(
            cls, atomicity_options)):
        return False
    return _validates(cls.validate, p)


def all_temporary_paths(root_directory: Any, *, temporary_path_cls: Any = None,
                        atomicity_options: Any = None) -> list[Any]:
    """The temporary paths (``TemporaryPath`` objects: ``.get()``, ``.get_final()``) of the
    saves in ``root_directory`` that are not committed; ``[]`` where it does not exist."""
    root = as_given(root_directory)
    found = []
    for name in sorted(get_runtime().call(storage.listdirs, root)):
        p = root / name
        if is_tmp_checkpoint(p, temporary_path_cls=temporary_path_cls,
                             atomicity_options=atomicity_options):
            cls = _temporary_path_class(p, temporary_path_cls, atomicity_options)
            found.append(cls.from_temporary(p))
    return found


async def _is_tmp(p: Any) -> bool:
    if not await storage.is_dir(p):  # (nothing there, or a file: no save, as in Orbax)
        return False
    if _commit.is_tmp_name(p.name):
        return True
    return not storage.has_rename(p) and not await _commit.is_visible(p)


def tmp_checkpoints(checkpoint_dir: Any) -> list[str]:
    """The names of the uncommitted step directories in ``checkpoint_dir`` (temporary ones, and
    on an object store step prefixes without ``commit_success.txt``)."""
    return [name for name, kind in _scan(checkpoint_dir).leftovers
            if kind in ("tmp", "uncommitted")]


# -- Orbax's older helpers (t5x's checkpointing calls them) --------------------------------------
def is_dict_key(key: Any) -> bool:
    """Whether a jax key path entry names a dict key or an attribute."""
    return isinstance(key, (jax.tree_util.DictKey, jax.tree_util.GetAttrKey))


def is_sequence_key(key: Any) -> bool:
    """Whether a jax key path entry is a sequence index (or a keyless node's child number)."""
    return _is_sequence_key(key)


def pytree_structure(directory: Any) -> Any:
    """The tree a folder of one array per directory (Orbax's layout without OCDBT) holds, as
    Orbax infers it where nothing records it: nested dicts from the directories' names split
    at dots, each leaf the placeholder of its array (``PLACEHOLDER://params.w``). Only
    directories count (Orbax's counts the item's files too); ``_sharding``, ``_METADATA``
    and ``array_metadatas`` are left out, as in Orbax."""
    path = as_path(directory)
    if not get_runtime().call(storage.is_dir, path):
        raise CheckpointNotFoundError(f"{path}: no such directory")
    tree: dict[str, Any] = {}
    for name in sorted(get_runtime().call(storage.listdirs, path)):
        if name in (fmt.SHARDING, fmt.PYTREE_METADATA, fmt.ARRAY_METADATAS):
            continue
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf_placeholder(name)
    return tree


def all_leaves_are_placeholders(tree: Any) -> bool:
    """Whether every leaf of ``tree`` is a placeholder string."""
    return all(leaf_is_placeholder(leaf) for leaf in jax.tree.leaves(tree))


#: A leaf, or a pytree node without children (``{}``, ``[]``, ``()``, None, an empty
#: dataclass node).
is_empty_or_leaf = _is_empty_or_leaf


def is_empty_node(x: Any) -> bool:
    """A pytree node without children (a leaf is not one)."""
    return not jax.tree_util.all_leaves([x]) and _is_empty_or_leaf(x)


def is_gcs_path(path: Any) -> bool:
    """Whether ``path`` (a string or a path object) names a Google Cloud Storage location."""
    return str(path).startswith("gs://")


#: When the last checkpoint began (the process's start before the first).
_last_checkpoint_start = time.time()


def record_saved_duration(checkpoint_start_time: float) -> None:
    """Records, as jax's monitoring event
    ``/jax/checkpoint/write/duration_since_last_checkpoint_secs``, the time since the last
    checkpoint began (since the process started, for the first): the training a checkpoint
    begun at ``checkpoint_start_time`` (``time.time()``) keeps, as Orbax records it."""
    global _last_checkpoint_start
    jax.monitoring.record_event_duration_secs(
        "/jax/checkpoint/write/duration_since_last_checkpoint_secs",
        checkpoint_start_time - _last_checkpoint_start)
    _last_checkpoint_start = checkpoint_start_time
