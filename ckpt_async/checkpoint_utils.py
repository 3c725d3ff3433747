"""Orbax's ``ocp.checkpoint_utils``: restore args built from a target tree, and waiting for
the steps a trainer writes (an evaluator's loop).

``construct_restore_args`` is Orbax's: each leaf of ``target`` (a ``jax.Array``, a
``jax.ShapeDtypeStruct``, a NumPy array, a scalar, a string, a metadata leaf or
:data:`~ckpt_async.type_handlers.PLACEHOLDER`) gives the restore args that restore it as it
is: a ``jax.Array`` on its sharding (or the one ``sharding_tree`` gives), a NumPy array or a
scalar of its dtype (NumPy scalars, ml_dtypes' too, and ``complex``, which Orbax's refuses).

``wait_for_new_checkpoint`` and ``checkpoints_iterator`` watch a manager's directory for
committed steps. Orbax's snapshots (a copy of the step kept from the trainer's retention
while it is evaluated) are not made: ``snapshot_dir`` and ``set_immutable`` are refused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from . import _serialize as ser
from . import metadata as value_metadata
from ._paths import as_path
from ._runtime import get_runtime
from .errors import InvalidArgumentError
from .manager import _steps
from .multihost import Sync, roles_for
from .type_handlers import PLACEHOLDER, ArrayRestoreArgs, RestoreArgs

log = logging.getLogger("ckpt_async")

__all__ = ["STANDARD_ARRAY_TYPES", "checkpoints_iterator", "construct_restore_args",
           "wait_for_new_checkpoint"]

#: The leaf types Orbax's standard handler takes as arrays or scalars.
STANDARD_ARRAY_TYPES = (int, float, np.ndarray, jax.Array)


def _python_type(dtype: Any) -> type:
    return type(np.dtype(dtype).type(0).item())


def construct_restore_args(target: Any, sharding_tree: Any = None, set_global_shape: bool = True,
                           support_layout: bool = False, strict: bool = True) -> Any:
    """Restore args matching ``target``'s structure, restoring each leaf as it is (Orbax's).

    >>> restore_args = construct_restore_args(abstract_state)                # doctest: +SKIP
    >>> ckptr.restore(path, args=ocp.args.PyTreeRestore(abstract_state,
    ...                                                 restore_args=restore_args))  # doctest: +SKIP
    """
    def array_args(value: Any, sharding: Any, dtype: Any) -> ArrayRestoreArgs:
        shape = tuple(value.shape) if set_global_shape else None
        return ArrayRestoreArgs(restore_type=jax.Array, sharding=sharding, global_shape=shape,
                                dtype=dtype, strict=strict)

    def one(value: Any, sharding: Any) -> Any:
        if value is PLACEHOLDER:
            return RestoreArgs(restore_type=type(PLACEHOLDER))
        if isinstance(value, jax.ShapeDtypeStruct):
            if sharding is None:
                return RestoreArgs(restore_type=np.ndarray, dtype=value.dtype)
            return array_args(value, sharding, value.dtype)
        if isinstance(value, value_metadata.StringMetadata):
            return RestoreArgs(restore_type=str)
        if isinstance(value, value_metadata.ScalarMetadata):
            return RestoreArgs(restore_type=_python_type(value.dtype), dtype=value.dtype)
        if isinstance(value, value_metadata.ArrayMetadata):
            if sharding is None:
                return RestoreArgs(restore_type=np.ndarray, dtype=value.dtype)
            return array_args(value, sharding, value.dtype)
        if isinstance(value, jax.Array):
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)  # (as stored, as Orbax's args say)
            return array_args(value, sharding, value.dtype)
        if isinstance(value, np.ndarray):
            return RestoreArgs(restore_type=np.ndarray, dtype=value.dtype)
        if isinstance(value, str):  # (np.str_ too, as in Orbax)
            return RestoreArgs(restore_type=str)
        if isinstance(value, (int, float, complex)) or (
                isinstance(value, np.generic) and ser.is_storable(value.dtype)):
            # (NumPy scalars, ml_dtypes' bfloat16 and float8 among them: as they are saved)
            return RestoreArgs(restore_type=type(value))
        raise InvalidArgumentError(f"construct_restore_args: unsupported leaf type {type(value)}")

    def sharding_of(value: Any) -> Any:
        return getattr(value, "sharding", None) if isinstance(
            value, (jax.Array, jax.ShapeDtypeStruct, value_metadata.ArrayMetadata)) else None

    def leaf(x: Any) -> bool:
        return x is PLACEHOLDER

    tree = getattr(target, "tree", target) if isinstance(
        target, value_metadata.TreeMetadata) else target
    if sharding_tree is None:
        sharding_tree = jax.tree.map(sharding_of, tree, is_leaf=leaf)
    elif isinstance(sharding_tree, value_metadata.TreeMetadata):
        sharding_tree = sharding_tree.tree
    # (sharding_tree has None where target has a leaf without sharding: map over target)
    flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=leaf)
    shardings = treedef.flatten_up_to(sharding_tree)  # type: ignore[attr-defined]
    out = treedef.unflatten([one(v, s) for v, s in zip(flat, shardings, strict=True)])  # type: ignore[attr-defined]
    if isinstance(target, value_metadata.TreeMetadata):
        return value_metadata.TreeMetadata(out, target.custom_metadata, target.use_zarr3)
    return out


def _no_snapshots(snapshot_dir: Any, set_immutable: Any) -> None:
    if snapshot_dir is not None or set_immutable:
        raise InvalidArgumentError(
            "wait_for_new_checkpoint / checkpoints_iterator: snapshots (snapshot_dir, "
            "set_immutable) are not supported by ckpt_async")


def _wait(directory: Any, name_format: _steps.NameFormat, until_step: int | None,
          seconds_to_sleep: float, timeout: float | None,
          timeout_fn: Callable[[], bool] | None) -> int:
    """The latest committed step once it is at least ``until_step`` (any step without it);
    -1 on a timeout. With several processes, the primary's answer is every process's."""
    directory = as_path(directory)
    stop = None if timeout is None else time.time() + timeout
    result = -1
    roles = roles_for()
    if roles.is_primary:
        while True:
            step = max(get_runtime().call(_steps.committed_steps, directory, name_format),
                       default=None)
            if step is not None and (until_step is None or step >= until_step):
                result = step
                break
            if stop is not None and time.time() + seconds_to_sleep > stop and (
                    timeout_fn is None or timeout_fn()):
                break
            time.sleep(seconds_to_sleep)
    if roles.multi:
        # (the others wait as long as the primary may: its timeout, or 20 days)
        sync = Sync(f"wait_for_new_checkpoint:{directory}:{until_step}", roles,
                    2e6 if timeout is None else timeout + 60)
        try:
            result = int(get_runtime().call(sync.broadcast, "step", str(result)))
        finally:
            get_runtime().call(sync.leave)
    if result == -1:
        log.info("timed out waiting for a new checkpoint in %s", directory)
    return result


@contextlib.contextmanager
def wait_for_new_checkpoint(checkpoint_dir: Any, *, until_step: int | None = None,
                            seconds_to_sleep: float = 1, timeout: float | None = None,
                            timeout_fn: Callable[[], bool] | None = None,
                            step_prefix: str | None = None,
                            step_format_fixed_length: int | None = None,
                            step_name_format: Any = None, snapshot_dir: Any = None,
                            set_immutable: bool | None = None,
                            ignore_snapshot_errors: bool | None = True) -> Iterator[int]:
    """Yields the latest committed step of ``checkpoint_dir`` once there is one (at least
    ``until_step`` when given), or -1 when ``timeout`` seconds pass first (and
    ``timeout_fn``, if given, returns True)."""
    _no_snapshots(snapshot_dir, set_immutable)
    yield _wait(checkpoint_dir, _steps.name_format_for(step_name_format, step_prefix,
                                                       step_format_fixed_length),
                until_step, seconds_to_sleep, timeout, timeout_fn)


def checkpoints_iterator(checkpoint_dir: Any, *, min_interval_secs: float = 0,
                         seconds_to_sleep: float = 1, timeout: float | None = None,
                         timeout_fn: Callable[[], bool] | None = None,
                         step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None,
                         step_name_format: Any = None, snapshot_dir: Any = None,
                         set_immutable: bool | None = None,
                         ignore_snapshot_errors: bool | None = True) -> Iterator[int]:
    """Yields each new latest step of ``checkpoint_dir`` as it is committed, at most one
    every ``min_interval_secs`` (steps committed meanwhile are skipped: the latest is
    yielded). Ends when ``timeout`` seconds pass without a new step, unless ``timeout_fn``
    returns False (more steps may come).

    >>> for step in checkpoints_iterator('/ckpts/run1', timeout=3600):    # doctest: +SKIP
    ...     evaluate(mngr.restore(step))
    """
    _no_snapshots(snapshot_dir, set_immutable)
    name_format = _steps.name_format_for(step_name_format, step_prefix, step_format_fixed_length)
    step: int | None = None
    while True:
        found = _wait(checkpoint_dir, name_format, None if step is None else step + 1,
                      seconds_to_sleep, timeout, timeout_fn)
        if found == -1:
            if timeout_fn is None or timeout_fn():
                return
            continue
        started, step = time.time(), found
        yield step
        time.sleep(max(0.0, started + min_interval_secs - time.time()))
