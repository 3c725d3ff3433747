"""The public map: what ``ckpt_async`` and ``ckpt_async.aio`` export, and the exception tree.

Every exported name exists and is documented; each sync facade holds its async object and
forwards to it (no behaviour written twice); every error derives from ``CheckpointError``,
has a one-line "raised when" docstring and mixes in exactly the builtins it declares, so code
written against Orbax that catches ``ValueError`` or ``FileNotFoundError`` keeps working.
"""

from __future__ import annotations

import builtins
import inspect
import re
import types
from pathlib import Path

import pytest

import ckpt_async
import ckpt_async as ocp
from ckpt_async import aio, errors


def _documented(obj: object) -> bool:
    # __doc__ directly: inspect.getdoc would borrow a parent class's docstring.
    doc = obj.__doc__
    return bool(doc and doc.strip())


@pytest.mark.parametrize("module", [ckpt_async, aio, errors], ids=lambda m: m.__name__)
def test_all_names_exist_are_unique_and_documented(module: types.ModuleType) -> None:
    names = module.__all__
    assert len(names) == len(set(names)), "duplicate names in __all__"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{module.__name__}.__all__ names that do not exist: {missing}"
    # (PLACEHOLDER is the Ellipsis object: documented where type_handlers defines it)
    undocumented = [n for n in names
                    if getattr(module, n) is not ... and not _documented(getattr(module, n))]
    assert not undocumented, f"{module.__name__}: undocumented public names {undocumented}"


@pytest.mark.parametrize("module", [ckpt_async, aio], ids=lambda m: m.__name__)
def test_star_import_gives_exactly_all(module: types.ModuleType) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import *", namespace)  # noqa: S102 - the point of the test
    namespace.pop("__builtins__")
    assert set(namespace) == set(module.__all__)


def test_orbax_names_of_the_api_overview_are_exported() -> None:
    # The names Orbax's "API Overview" reaches through ``ocp.`` (a sample, not Orbax's whole map).
    orbax_names = {
        "CheckpointManager", "CheckpointManagerOptions", "AsyncCheckpointer", "Checkpointer",
        "StandardCheckpointer", "PyTreeCheckpointer", "StandardCheckpointHandler",
        "PyTreeCheckpointHandler", "JsonCheckpointHandler", "CompositeCheckpointHandler",
        "args", "tree", "checkpoint_managers", "test_utils", "RestoreArgs", "ArrayRestoreArgs",
        "SaveArgs", "type_handlers", "metadata", "handlers",
    }
    assert orbax_names <= set(ckpt_async.__all__)


def test_the_reference_page_covers_every_public_name() -> None:
    # docs/reference.md names its members (top level) and modules (each with its own names).
    ref = (Path(__file__).resolve().parent.parent / "docs" / "reference.md").read_text()
    members = set(re.findall(r"^\s+- (\w+)$", ref, re.M))
    sections = set(re.findall(r"^::: ckpt_async\.([\w.]+)$", ref, re.M))
    for name in ckpt_async.__all__:
        obj = getattr(ckpt_async, name)
        if isinstance(obj, types.ModuleType):
            assert any(m == name or m.startswith(f"{name}.") for m in sections), \
                f"no section for ckpt_async.{name}"
        else:
            assert name in members or any(
                name in getattr(getattr(ckpt_async, m, None), "__all__", ())
                for m in sections), f"{name} is in no section of docs/reference.md"


def test_aio_exports_the_async_classes_and_the_future() -> None:
    assert set(aio.__all__) >= {"AsyncCheckpointManager", "AsyncCheckpointer", "CommitFuture"}
    assert ocp.aio.AsyncCheckpointManager is ocp.AsyncCheckpointManager
    assert ocp.aio.CommitFuture is ocp.CommitFuture
    # The sync ocp.AsyncCheckpointer (Orbax's name) and the async one are different classes.
    assert ocp.aio.AsyncCheckpointer is not ocp.AsyncCheckpointer
    for name in ("save", "restore", "wait_until_finished", "close", "metadata"):
        assert inspect.iscoroutinefunction(getattr(aio.AsyncCheckpointer, name)), name
    for name in ("save", "restore", "wait_until_finished", "close", "metadata", "delete",
                 "reload", "item_metadata", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(aio.AsyncCheckpointManager, name)), name


# -- each sync facade holds its async object and forwards ------------------------------------
def _public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


def test_checkpoint_manager_exposes_its_async_manager(tmp_path: Path) -> None:
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        assert isinstance(mngr.async_manager, aio.AsyncCheckpointManager)
        assert mngr.directory == mngr.async_manager.directory
        # Every sync method has its async counterpart: behaviour lives on the async side.
        lacking = {n for n in _public_methods(ocp.CheckpointManager)
                   if not hasattr(mngr.async_manager, n)}
        assert not lacking, f"sync-only methods of CheckpointManager: {lacking}"


@pytest.mark.parametrize("make", [
    lambda: ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()),
    lambda: ocp.Checkpointer(ocp.PyTreeCheckpointHandler()),
    ocp.StandardCheckpointer,
    ocp.PyTreeCheckpointer,
], ids=["AsyncCheckpointer", "Checkpointer", "StandardCheckpointer", "PyTreeCheckpointer"])
def test_checkpointers_expose_their_async_checkpointer(make) -> None:
    ckptr = make()
    try:
        assert isinstance(ckptr.async_checkpointer, aio.AsyncCheckpointer)
        assert ckptr.handler is ckptr.async_checkpointer.handler
        lacking = {n for n in _public_methods(type(ckptr)) | _public_methods(ocp.AsyncCheckpointer)
                   if not hasattr(ckptr.async_checkpointer, n)}
        assert not lacking, f"sync-only methods of {type(ckptr).__name__}: {lacking}"
    finally:
        ckptr.close()


def test_sync_save_semantics_follow_orbax_names(tmp_path: Path) -> None:
    import numpy as np

    # Checkpointer: durable when save() returns; AsyncCheckpointer: staged, commit pending.
    sync = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    sync.save(tmp_path / "s", args=ocp.args.StandardSave({"a": np.zeros(4)}))
    assert (tmp_path / "s" / "commit_success.txt").exists()
    assert sync.last_commit is not None and sync.last_commit.done()
    sync.close()
    asyn = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    asyn.save(tmp_path / "a", args=ocp.args.StandardSave({"a": np.zeros(4)}))
    assert isinstance(asyn.last_commit, ocp.CommitFuture)
    asyn.wait_until_finished()
    assert asyn.last_commit.done() and (tmp_path / "a" / "commit_success.txt").exists()
    asyn.close()


# -- the exception tree -----------------------------------------------------------------------
#: Each error and the builtin exceptions it declares (beyond Exception). A new error must be
#: added here, so its mix-ins are a decision, not an accident.
EXPECTED_BUILTINS: dict[str, set[type[BaseException]]] = {
    "CheckpointError": set(),
    "InvalidArgumentError": {ValueError},
    "UnsupportedLeafError": {ValueError, TypeError},
    "InvalidTypeError": {ValueError, TypeError},
    "StructureMismatchError": {ValueError},
    "ShapeMismatchError": {ValueError},
    "ShardingMismatchError": {ValueError},
    "PathNotADirectoryError": {ValueError, NotADirectoryError, OSError},
    "HandlerError": {ValueError},
    "StepAlreadyExistsError": {FileExistsError, OSError, ValueError},
    "ReadOnlyError": {PermissionError, OSError},
    "NotWritableError": {PermissionError, OSError},
    "CheckpointNotFoundError": {FileNotFoundError, OSError},
    "StepNotFoundError": {FileNotFoundError, OSError},
    "ItemNotFoundError": {FileNotFoundError, OSError, KeyError, LookupError},
    "MissingKeyError": {ValueError, KeyError, LookupError},
    "MissingIndexError": {ValueError, IndexError, LookupError},
    "CorruptCheckpointError": set(),
    "UnreadableCheckpointError": {OSError},
    "StoreUnreachableError": {ConnectionError, OSError},
    "CheckpointReplacedError": set(),
    "OutOfMemoryError": {MemoryError},
    "CommitError": set(),
    "CommitTimeoutError": {TimeoutError, OSError},
    "ProcessFailedError": set(),
    "BarrierTimeoutError": {TimeoutError, OSError},
    "RuntimeUsageError": {RuntimeError},
    "ClosedError": {RuntimeError},
}


def _error_classes() -> dict[str, type[BaseException]]:
    return {n: c for n, c in vars(errors).items()
            if isinstance(c, type) and issubclass(c, BaseException)
            and c.__module__ == errors.__name__}


def test_every_error_is_exported_and_listed_here() -> None:
    classes = _error_classes()
    assert set(classes) == set(errors.__all__)
    assert set(classes) == set(EXPECTED_BUILTINS)
    assert ocp.CheckpointError is errors.CheckpointError


@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTINS))
def test_error_derives_from_checkpoint_error_with_its_builtins(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.CheckpointError)
    builtin_bases = {b for b in cls.__mro__
                     if b.__module__ == "builtins" and b not in (Exception, BaseException, object)}
    assert builtin_bases == EXPECTED_BUILTINS[name]
    # Each is catchable as each of its builtins, and constructible with just a message.
    exc = cls("message naming the path")
    for builtin in EXPECTED_BUILTINS[name]:
        assert isinstance(exc, builtin)
    assert str(exc) == "message naming the path"


@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTINS))
def test_error_has_a_one_line_raised_when_docstring(name: str) -> None:
    doc = getattr(errors, name).__doc__
    assert doc, f"{name} has no docstring"
    lines = doc.strip().splitlines()
    assert len(lines) == 1, f"{name}: docstring is {len(lines)} lines"
    assert lines[0].startswith("Raised "), lines[0]
    assert lines[0].endswith("."), lines[0]


def test_orbax_compatible_catches() -> None:
    # What Orbax code catches keeps catching ckpt_async's errors.
    assert issubclass(errors.StepNotFoundError, FileNotFoundError)
    assert issubclass(errors.StepNotFoundError, errors.CheckpointNotFoundError)
    assert issubclass(errors.StepAlreadyExistsError, FileExistsError)
    assert issubclass(errors.UnsupportedLeafError, errors.InvalidArgumentError)
    assert issubclass(errors.CommitTimeoutError, errors.CommitError)
    assert not issubclass(errors.CheckpointError, (ValueError, OSError, RuntimeError))
    # No error shadows a builtin name (``StepAlreadyExistsError`` is defined once, here).
    assert not set(_error_classes()) & set(dir(builtins))


def test_step_not_found_is_raised_as_file_not_found(tmp_path: Path) -> None:
    with ocp.CheckpointManager(tmp_path / "m") as mngr:
        with pytest.raises(FileNotFoundError) as ei:
            mngr.restore(3)
    assert type(ei.value) is errors.StepNotFoundError


def test_managers_and_checkpointers_have_orbax_abstract_interfaces() -> None:
    members = [n for n in vars(ocp.AbstractCheckpointManager)
               if not n.startswith("_") and callable(getattr(ocp.AbstractCheckpointManager, n))]
    assert "save" in members and "metrics" in members
    for cls in (ocp.CheckpointManager,):
        for name in members:
            theirs = inspect.signature(getattr(ocp.AbstractCheckpointManager, name)).parameters
            ours = inspect.signature(getattr(cls, name)).parameters
            assert list(ours) == list(theirs), (cls.__name__, name)
    for cls in (ocp.Checkpointer, ocp.AsyncCheckpointer, ocp.StandardCheckpointer,
                ocp.PyTreeCheckpointer):
        assert issubclass(cls, ocp.AbstractCheckpointer)
    assert ocp.checkpoint_managers.CheckpointManager is ocp.CheckpointManager


def test_standard_checkpointer_takes_orbaxs_signatures_and_args() -> None:
    # Its save and restore took anything (save(path, *args, **kwargs)): restore(path, tree,
    # True) dropped the True, restore(path, item=tree) worked. Now Orbax's parameters, in
    # Orbax's order, and args= beside them (Orbax's refuses it); misuse raises before any I/O.
    import orbax.checkpoint as orbax

    for name, extra in (("save", ["args"]), ("restore", ["args"])):
        theirs = list(inspect.signature(getattr(orbax.StandardCheckpointer, name)).parameters)
        ours = list(inspect.signature(getattr(ocp.StandardCheckpointer, name)).parameters)
        assert ours == theirs + extra, name
    tree = {"w": 1.0}
    for lib in (ocp, orbax):
        ckptr = lib.StandardCheckpointer()
        with pytest.raises(TypeError):
            ckptr.restore("/nowhere", tree, True)  # (strict is keyword-only)
        with pytest.raises(TypeError):
            ckptr.restore("/nowhere", item=tree)
        with pytest.raises(TypeError):
            ckptr.save("/nowhere", tree, None)  # (save_args is keyword-only)
        ckptr.close()
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(
            errors.InvalidArgumentError, match="not both"):
        ckptr.restore("/nowhere", tree, args=ocp.args.StandardRestore(tree))


# Names Orbax 0.12.8's public modules export that ckpt_async does not, each for a reason the
# migration guide gives (docs/migration.md "Not implemented"). Anything else Orbax exports
# must exist here under the same module path.
_NOT_PROVIDED = {
    "": {"BasePyTreeCheckpointHandler"},  # Orbax's internal base of PyTreeCheckpointHandler
    "logging.step_statistics": {"EmergencyRestoreStepStatistics"},  # no emergency checkpointing
    "metadata": {"MetadataStore", "metadata_store"},  # Orbax's internal document store
    "tree": {"tree_trim"},
    "type_handlers": {  # Orbax's TensorStore spec builders and per-process OCDBT merging
        "register_standard_handlers_with_options", "check_input_arguments",
        "merge_ocdbt_per_process_files", "get_cast_tspec_deserialize",
        "get_cast_tspec_serialize", "get_json_tspec_write",
    },
}
# Orbax modules with no counterpart: Pathways, the experimental v1 API, multislice, and the
# packages of Orbax's experimental APIs (emergency checkpointing, ...) and its own tests.
_MODULES_NOT_PROVIDED = {"pathways", "v1", "multihost.multislice", "experimental", "testing"}
# Names of Orbax's public submodules (``ocp.path.atomicity``, ...: modules of Orbax's own code
# that a public module re-exports) that ckpt_async does not provide, each for a reason the
# migration guide gives (docs/migration.md, "Every name Orbax's public modules export").
_SUBMODULE_NAMES_NOT_PROVIDED = {
    # Orbax's deferred temporary paths and the commit helpers of its own checkpointers
    "path.atomicity": {"AsyncMakeDirFunc", "DeferredPath", "DeferredWritableTemporaryPath",
                       "create_all_async", "on_commit_callback", "record_saved_duration",
                       "validate_atomic_rename_final_path",
                       "validate_atomic_rename_temporary_path"},
}


def _orbax_public_exports() -> dict[str, list[str]]:
    """Each public module of the installed Orbax (dotted path under ``orbax.checkpoint``) and
    the non-module names it re-exports from Orbax's own code."""
    import ast
    import importlib

    orbax = pytest.importorskip("orbax.checkpoint")
    root = Path(orbax.__file__).parent
    exports: dict[str, list[str]] = {}
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if rel.parts[0] in ("_src", "experimental", "testing") or rel.name in (
                "conftest.py", "version.py"):
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module in _MODULES_NOT_PROVIDED:
            continue
        theirs = importlib.import_module("orbax.checkpoint" + (f".{module}" if module else ""))
        names = [alias.asname or alias.name
                 for node in ast.parse(file.read_text()).body
                 if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orbax")
                 for alias in node.names]
        exports[module] = [n for n in names if not n.startswith("_") and n != "*"
                           and n not in _MODULES_NOT_PROVIDED and hasattr(theirs, n)
                           and not isinstance(getattr(theirs, n), types.ModuleType)]
    return exports


def _orbax_public_submodules() -> dict[str, types.ModuleType | None]:
    """Orbax's public submodules (dotted path under ``orbax.checkpoint``) that are modules of
    its own code: those a re-exporting module (a file that defines nothing itself, as
    ``path.py``) imports, and its subpackages. Modules that define code of their own import
    others as implementation details (``checkpoint_manager.py``'s ``step_lib``): not API."""
    import ast
    import importlib

    orbax = pytest.importorskip("orbax.checkpoint")
    root = Path(orbax.__file__).parent
    found: dict[str, types.ModuleType | None] = {}
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if rel.parts[0] in ("_src", "experimental", "testing") or rel.name in (
                "conftest.py", "version.py"):
            continue
        if rel.name == "__init__.py" and len(rel.parts) == 2:
            found[rel.parts[0]] = importlib.import_module(f"orbax.checkpoint.{rel.parts[0]}")
        body = ast.parse(file.read_text()).body
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in body):
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        theirs = importlib.import_module("orbax.checkpoint" + (f".{module}" if module else ""))
        for node in body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orbax"):
                for alias in node.names:
                    name = alias.asname or alias.name
                    value = getattr(theirs, name, None)
                    if not name.startswith("_") and isinstance(value, types.ModuleType):
                        found[f"{module}.{name}" if module else name] = value
    for package in root.iterdir():  # (subpackages no file imports: not imported here, as
        # Orbax's testing package needs what its tests need)
        if package.name != "_src" and (package / "__init__.py").exists():
            found.setdefault(package.name, None)
    return found


def test_every_submodule_orbax_exports_exists_under_the_same_module_path() -> None:
    """``ocp.path.deleter``, ``ocp.path.format_utils``, ...: each public submodule of Orbax is
    one here too (the comparison of names above leaves modules out), and has the classes and
    functions Orbax's defines."""
    import importlib
    import inspect

    missing_modules, missing_names = [], {}
    for dotted, theirs in _orbax_public_submodules().items():
        if dotted in _MODULES_NOT_PROVIDED:
            continue
        parent, _, name = dotted.rpartition(".")
        ours = getattr(importlib.import_module("ckpt_async" + (f".{parent}" if parent else "")),
                       name, None)
        if not isinstance(ours, types.ModuleType):
            missing_modules.append(dotted)
            continue
        if theirs is None or not theirs.__name__.startswith("orbax.checkpoint._src."):
            continue  # (a re-exporting module: compared name by name above)
        defined = {n for n, v in vars(theirs).items() if not n.startswith("_")
                   and (inspect.isclass(v) or inspect.isfunction(v))
                   and getattr(v, "__module__", None) == theirs.__name__}
        absent = {n for n in defined - _SUBMODULE_NAMES_NOT_PROVIDED.get(dotted, set())
                  if not hasattr(ours, n)}
        if absent:
            missing_names[dotted] = sorted(absent)
    assert not missing_modules, f"Orbax's public submodules missing from ckpt_async: " \
        f"{missing_modules}"
    assert not missing_names, f"Orbax's names missing from ckpt_async's submodules: " \
        f"{missing_names}"
    for dotted, names in _SUBMODULE_NAMES_NOT_PROVIDED.items():  # (still true)
        ours = importlib.import_module(f"ckpt_async.{dotted}")
        assert not [n for n in names if hasattr(ours, n)], dotted


def test_every_name_orbax_exports_exists_under_the_same_module_path() -> None:
    import importlib

    missing = {}
    for module, names in _orbax_public_exports().items():
        ours = importlib.import_module("ckpt_async" + (f".{module}" if module else ""))
        absent = set(names) - set(dir(ours)) - _NOT_PROVIDED.get(module, set())
        absent = {n for n in absent if not hasattr(ours, n)}  # lazy module attributes
        if absent:
            missing[module or "<top>"] = sorted(absent)
    assert not missing, f"Orbax's public names missing from ckpt_async: {missing}"
    # The exclusions are still true (each one names something really absent here).
    for module, names in _NOT_PROVIDED.items():
        ours = importlib.import_module("ckpt_async" + (f".{module}" if module else ""))
        assert not [n for n in names if hasattr(ours, n)], module


def test_value_metadata_entries_read_and_write_the_metadata_document(tmp_path: Path) -> None:
    import json

    import numpy as np

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "c", {"a": np.arange(6).reshape(2, 3), "b": 1.5, "e": {}})
    doc = json.loads((tmp_path / "c" / "_METADATA").read_text())
    entries = {k: ocp.metadata.tree.ValueMetadataEntry.from_json(v["value_metadata"])
               for k, v in doc["tree_metadata"].items()}
    assert entries["('a',)"].value_type == "np.ndarray"
    assert entries["('a',)"].write_shape is None  # as Orbax writes it (no write_shape)
    assert entries["('b',)"].value_type == "scalar"
    assert entries["('e',)"].value_type == "Dict"
    assert all(entries[k].to_json() == v["value_metadata"] for k, v in doc["tree_metadata"].items())
    shaped = ocp.metadata.tree.ValueMetadataEntry("jax.Array", write_shape=(4, 2))
    assert shaped.to_json() == {"value_type": "jax.Array", "skip_deserialize": False,
                                "write_shape": [4, 2]}
    assert ocp.metadata.tree.ValueMetadataEntry.from_json(shaped.to_json()) == shaped
    assert ocp.metadata.value.ArrayMetadata is ocp.metadata.ArrayMetadata


def test_value_metadata_entries_read_with_the_pytree_metadata_options() -> None:
    """An empty named tuple's entry reads as Orbax reads it: of value type "None" unless the
    options support rich types (it stayed "NamedTuple")."""
    import orbax.checkpoint as orbax
    from orbax.checkpoint._src.metadata.pytree_metadata_options import PyTreeMetadataOptions

    for value_type in ("NamedTuple", "None", "Dict", "List", "Tuple", "jax.Array"):
        doc = {"value_type": value_type, "skip_deserialize": True, "write_shape": [2]}
        for rich in (False, True):
            options = PyTreeMetadataOptions(support_rich_types=rich)
            ours = ocp.metadata.tree.ValueMetadataEntry.from_json(doc, options)
            theirs = orbax.metadata.tree.ValueMetadataEntry.from_json(doc, options)
            assert ours.to_json() == theirs.to_json(), (value_type, rich)
        # (without options, as with Orbax's default ones: no rich types)
        assert ocp.metadata.tree.ValueMetadataEntry.from_json(doc).to_json() == \
            orbax.metadata.tree.ValueMetadataEntry.from_json(
                doc, PyTreeMetadataOptions()).to_json()
