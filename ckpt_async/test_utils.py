"""Helpers used by Orbax's examples and tests (``ocp.test_utils``), for tests of code that
checkpoints: a small tree to save, sharded arrays, tree comparisons, and the temporary
directories an interrupted save leaves."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ._commit import tmp_path_for
from .errors import InvalidArgumentError
from .tree import to_flat_dict

log = logging.getLogger("ckpt_async")

__all__ = ["assert_array_equal", "assert_tree_equal", "assert_tree_same_structure",
           "create_sharded_array", "empty_directory", "erase_and_create_empty",
           "print_directory", "save_fake_tmp_dir", "setup_pytree"]


def erase_and_create_empty(directory: Any) -> Path:
    """Removes ``directory`` if it exists and creates it empty."""
    path = Path(directory)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def empty_directory(directory: Any) -> bool:
    """Removes everything in ``directory``; False if it does not exist."""
    path = Path(directory)
    if not path.exists():
        return False
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return True


def print_directory(directory: Any, level: int = 0) -> None:
    """Logs the tree of files under ``directory`` (INFO, ``ckpt_async`` logger), as Orbax's
    does: a folder as ``..name/``, each level two dots deeper."""
    path = Path(directory)
    if not path.is_dir():
        raise InvalidArgumentError(f"{path} is not a directory")
    log.info("Printing directory tree: %s/" if level == 0 else "%s%s/",
             *((path,) if level == 0 else (".." * level, path.name)))
    for entry in sorted(path.iterdir()):
        if entry.is_dir():
            print_directory(entry, level + 1)
        else:
            log.info("%s%s", ".." * (level + 1), entry.name)


def save_fake_tmp_dir(directory: Any, step: int, item: str, subdirs: list[str] | None = None,
                      step_prefix: str | None = None) -> Path:
    """The temporary directories a save of ``step`` leaves when it is interrupted (the step's,
    with ``item``'s inside and ``subdirs`` in that), as a manager finds them: to test
    ``cleanup_tmp_directories``. Returns the item's, as Orbax's does."""
    step_dir = tmp_path_for(Path(directory) / f"{step_prefix or ''}{step}")
    item_dir = tmp_path_for(step_dir / item)
    item_dir.mkdir(parents=True)
    for sub in subdirs or []:
        (item_dir / sub).mkdir(parents=True)
    return item_dir


def setup_pytree(add: int = 0) -> dict[str, Any]:
    """Orbax's small test tree of NumPy arrays (each plus ``add``)."""
    return {"a": np.arange(8) + add, "b": np.arange(16) * 2 + add,
            "c": {"a": np.arange(8).reshape((2, 4)) * 3 + add,
                  "e": np.arange(16).reshape((4, 4)) * 4 + add}}


def create_sharded_array(arr: Any, mesh: jax.sharding.Mesh, mesh_axes: Any) -> jax.Array:
    """``arr`` (a NumPy array or a Python number) as a ``jax.Array`` placed by
    ``NamedSharding(mesh, mesh_axes)``."""
    arr = np.asarray(arr)
    return jax.make_array_from_callback(arr.shape, jax.sharding.NamedSharding(mesh, mesh_axes),
                                        lambda index: arr[index])


def assert_array_equal(testclass: Any, v_expected: Any, v_actual: Any) -> None:
    """``v_actual`` is ``v_expected``: its type and dtype, and equal values (shard by shard
    for a ``jax.Array``; a random key's data and implementation). ``testclass`` is the
    ``unittest.TestCase`` that asserts."""
    if hasattr(v_expected, "dtype"):
        testclass.assertEqual(v_expected.dtype, v_actual.dtype)
    testclass.assertIsInstance(v_actual, type(v_expected))
    if isinstance(v_expected, jax.Array) and jax.dtypes.issubdtype(
            v_expected.dtype, jax.dtypes.prng_key):
        testclass.assertEqual(str(jax.random.key_impl(v_expected)),
                              str(jax.random.key_impl(v_actual)))
        assert_array_equal(testclass, jax.random.key_data(v_expected),
                           jax.random.key_data(v_actual))
    elif isinstance(v_expected, jax.Array):
        pairs = list(zip(v_expected.addressable_shards, v_actual.addressable_shards))
        testclass.assertEqual(len(v_expected.addressable_shards),
                              len(v_actual.addressable_shards))
        for want, got in pairs:
            np.testing.assert_array_equal(got.data, want.data)
    else:
        np.testing.assert_array_equal(v_actual, v_expected)


def assert_tree_equal(testclass: Any, expected: Any, actual: Any) -> None:
    """The same keys, and each leaf as :func:`assert_array_equal` asks (None leaves of
    ``expected`` are not compared)."""
    testclass.assertCountEqual(to_flat_dict(expected).keys(), to_flat_dict(actual).keys())

    def same(x: Any, y: Any) -> None:
        if x is not None:
            assert_array_equal(testclass, x, y)

    jax.tree.map(same, expected, actual, is_leaf=lambda x: x is None)


def assert_tree_same_structure(testclass: Any, expected: Any, actual: Any) -> None:
    """``actual`` has ``expected``'s tree structure."""
    testclass.assertEqual(jax.tree.structure(expected), jax.tree.structure(actual))
