"""Step directory names, and which entries of a manager directory are what (pure functions;
:func:`scan_dir` lists a directory through ``_commit.scan``).

Orbax's standard naming: ``<step>``, or ``<prefix>_<step>``, the step zero-padded to
``step_format_fixed_length`` digits. Temporary (``*.orbax-checkpoint-tmp*``) and to-delete
(``*.orbax-checkpoint-todelete*``) entries are leftovers, never steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from .. import _commit
from .. import _format as fmt
from .. import _storage as storage
from .._paths import AnyPath, as_path
from .._runtime import get_runtime
from ..errors import InvalidArgumentError

TODELETE_MARK = ".orbax-checkpoint-todelete"


@dataclasses.dataclass(frozen=True)
class Metadata:
    """A step found in a directory (Orbax's ``ocp.step.Metadata``): its number and path, and
    the times its ``_CHECKPOINT_METADATA`` records (read once, when first asked for)."""

    step: int
    path: Any

    @functools.cached_property
    def _checkpoint_metadata(self) -> fmt.StepMetadata | None:
        from .._integrity import read_step_metadata
        from ..errors import CheckpointError

        try:
            doc, _ext = get_runtime().call(read_step_metadata, as_path(self.path))
        except CheckpointError as exc:  # (damaged: no times known, as Orbax reads it)
            logging.getLogger("ckpt_async").warning("%s; its times are unknown", exc)
            return None
        return doc

    @property
    def init_timestamp_nsecs(self) -> int | None:
        """When the step's save began (ns since the epoch), or None when it records none."""
        doc = self._checkpoint_metadata
        return None if doc is None else doc.init_timestamp_nsecs

    @property
    def commit_timestamp_nsecs(self) -> int | None:
        """When the step was committed (ns since the epoch), or None when it records none."""
        doc = self._checkpoint_metadata
        return None if doc is None else doc.commit_timestamp_nsecs

    @property
    def commit_timestamp(self) -> datetime.datetime:
        """When the step was committed, in UTC: the recorded time, else (as in Orbax) the
        modification time of its directory."""
        ns = self.commit_timestamp_nsecs
        if ns is not None:
            secs = ns / 1e9
        else:
            secs = get_runtime().call(storage.mtime, as_path(self.path))
        return datetime.datetime.fromtimestamp(secs, tz=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class NameFormat:
    """Builds and parses step directory names (Orbax's ``standard_name_format``).

    A subclass naming steps otherwise (Orbax's ``NameFormat`` protocol, as Pax writes one)
    overrides :meth:`build_name` and :meth:`find_all` (or :meth:`parse`): managers then list
    a directory's steps through its ``find_all``, keeping those committed."""

    step_prefix: str | None = None
    step_format_fixed_length: int | None = None
    #: Orbax's: list steps on one process and broadcast them (accepted, without effect: each
    #: process lists them; checked against the manager option of that name, as in Orbax).
    single_host_load_and_broadcast: bool = False
    #: Orbax's ``temporary_path_cls`` and ``atomicity_options``: naming the commit-file mode
    #: (``CommitFileTemporaryPath``, ``AtomicityMode.COMMIT_FILE``), a local step is found
    #: once its ``commit_success.txt`` is there, as in Orbax (a run of that mode writes steps
    #: in place: one killed mid-save leaves a directory without it).
    temporary_path_cls: Any = None
    atomicity_options: Any = None

    def __str__(self) -> str:
        if is_custom(self):
            return repr(self)
        return f'StandardNameFormat("{self.build_name(1234)}")'  # (Orbax's)

    def find_all(self, base_path: Any) -> Iterator[Metadata]:
        """Every committed step under ``base_path`` in this format."""
        root = as_path(base_path)
        # (parsed as the standard format parses, whatever a subclass's find_all adds: it may
        # call this one)
        try:
            found = get_runtime().call(standard_steps, root, self)
        except NotADirectoryError:  # (a file: no steps under it, as Orbax finds none)
            return
        for step, name in found.items():
            yield Metadata(step, root / name)

    def find_step(self, base_path: Any, step: int) -> Metadata:
        """``step`` under ``base_path``; ``ValueError`` when it is not committed there."""
        for found in self.find_all(base_path):
            if found.step == step:
                return found
        raise InvalidArgumentError(f"no committed step {step} in {base_path} named as {self}")

    def build_name(self, step: int) -> str:
        digits = f"{step:0{self.step_format_fixed_length}d}" if self.step_format_fixed_length else str(step)
        # (Orbax's: a prefix of "" still takes its underscore, "_12")
        return digits if self.step_prefix is None else f"{self.step_prefix}_{digits}"

    def parse(self, name: str) -> int | None:
        """The step a directory name denotes, or None when it is no step of this format."""
        if is_leftover(name):
            return None
        prefix = "" if self.step_prefix is None else re.escape(self.step_prefix) + "_"
        n = self.step_format_fixed_length
        # Orbax's: padded to exactly n digits, or longer without a leading zero; unpadded,
        # no leading zero at all
        digits = rf"0\d{{{n - 1}}}|[1-9]\d{{{n - 1}}}\d*" if n and n > 0 else r"0|[1-9]\d*"
        m = re.fullmatch(f"{prefix}({digits})", name)
        return None if m is None else int(m.group(1))


def standard_name_format(step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None,
                         single_host_load_and_broadcast: bool = False,
                         temporary_path_cls: Any = None,
                         atomicity_options: Any = None) -> NameFormat:
    """Steps named ``<step>``, or ``<step_prefix>_<step>``, the step zero-padded to
    ``step_format_fixed_length`` digits (Orbax's; ``single_host_load_and_broadcast`` is
    accepted and has no effect; ``temporary_path_cls`` / ``atomicity_options`` naming the
    commit-file mode find only the steps holding ``commit_success.txt``, as Orbax's)."""
    return NameFormat(step_prefix, step_format_fixed_length, single_host_load_and_broadcast,
                      temporary_path_cls, atomicity_options)


def is_custom(name_format: Any) -> bool:
    """Whether ``name_format`` names steps its own way: its steps are listed through its
    ``find_all`` (a subclass of ours overriding it, or another object with one)."""
    if isinstance(name_format, NameFormat):
        return type(name_format).find_all is not NameFormat.find_all
    return True


def name_format_of(given: Any) -> Any:
    """``CheckpointManagerOptions.step_name_format`` as a name format: one of ours (a
    subclass included), Orbax's ``standard_name_format`` (same fields, same names, taken as
    ours), or any other object with ``build_name(step)`` and ``find_all(base_path)``, as
    Orbax's ``NameFormat`` protocol has them."""
    where = "CheckpointManagerOptions.step_name_format"
    if isinstance(given, NameFormat):
        cls = type(given)
        if cls.build_name is not NameFormat.build_name and not is_custom(given) and \
                cls.parse is NameFormat.parse:
            raise InvalidArgumentError(
                f"{where}: {cls.__qualname__} overrides build_name but neither find_all nor "
                "parse, so the steps it names could not be found again")
        return given
    build = getattr(given, "build_name", None)
    if not callable(build):
        raise InvalidArgumentError(f"{where}: {given!r} has no build_name(step)")
    ours = NameFormat(getattr(given, "step_prefix", None),
                      getattr(given, "step_format_fixed_length", None),
                      bool(getattr(given, "single_host_load_and_broadcast", False)),
                      getattr(given, "temporary_path_cls", None),
                      getattr(given, "atomicity_options", None))
    if hasattr(given, "step_prefix") and all(build(s) == ours.build_name(s)
                                             for s in (0, 7, 123456)):
        return ours
    if not callable(getattr(given, "find_all", None)):
        raise InvalidArgumentError(
            f"{where}: {given!r} is not a standard name format and has no find_all(base_path) "
            "to list its steps; use ckpt_async.path.step.standard_name_format(step_prefix=..., "
            "step_format_fixed_length=...), or a NameFormat subclass")
    return given


def name_format_for(step_name_format: Any, step_prefix: str | None = None,
                    step_format_fixed_length: int | None = None) -> NameFormat:
    """The name format options give: ``step_name_format`` when set (it overrides the other
    two, as in Orbax), else ``<step_prefix>_<step>`` padded to the fixed length."""
    if step_name_format is not None:
        return name_format_of(step_name_format)
    return standard_name_format(step_prefix, step_format_fixed_length)


def format_requires_marker(name_format: Any) -> bool:
    """Whether ``name_format``'s ``temporary_path_cls`` / ``atomicity_options`` name Orbax's
    commit-file mode: its steps count once their ``commit_success.txt`` is there
    (:func:`ckpt_async._commit.requires_marker`)."""
    return _commit.requires_marker(getattr(name_format, "temporary_path_cls", None),
                                   getattr(name_format, "atomicity_options", None))


async def standard_steps(directory: AnyPath, name_format: NameFormat,
                         marker: bool = False) -> dict[int, str]:
    """The committed steps of ``directory`` whose names ``name_format.parse`` takes (with
    ``marker``, or a format naming the commit-file mode, those holding ``commit_success.txt``)."""
    _names, visible = await _commit.scan(
        directory, marker=marker or format_requires_marker(name_format))
    return steps_in(sorted(visible), name_format)


async def committed_steps(directory: AnyPath, name_format: Any,
                          marker: bool = False) -> dict[int, str]:
    """The committed steps of ``directory`` in ``name_format``: step -> entry name (with
    ``marker``, locally too only those holding ``commit_success.txt``)."""
    if not is_custom(name_format):
        return await standard_steps(directory, name_format, marker)
    _names, visible = await _commit.scan(directory, marker=marker)
    if not visible:
        return {}
    # Its find_all, in a thread of its own: it lists the directory itself, as Orbax's formats
    # do, and may wait on the engine loop (a standard format's find_all) meanwhile.
    base = directory if isinstance(directory, Path) else str(directory)
    found = await get_runtime().to_own_thread(lambda: list(name_format.find_all(base)))
    steps: dict[int, str] = {}
    for m in found:  # (the first of a step's names found, as Orbax's find_step takes it)
        name = PurePosixPath(str(m.path)).name
        if name in visible and not is_leftover(name):
            steps.setdefault(int(m.step), name)
    return dict(sorted(steps.items()))


def parses_as_step(name_format: Any, name: str) -> bool:
    """Whether ``name`` is a step's name in ``name_format`` (custom formats: as far as their
    own ``parse``, where they have one, tells)."""
    parse = getattr(name_format, "parse", None)
    if not callable(parse) or (is_custom(name_format)
                               and type(name_format).parse is NameFormat.parse):
        return False
    return parse(name) is not None


def is_leftover(name: str) -> bool:
    """A temporary or half-deleted entry, left by a save or delete that did not finish."""
    return fmt.TMP_SUFFIX in name or TODELETE_MARK in name


def steps_in(names: list[str], name_format: NameFormat) -> dict[int, str]:
    """Committed steps among directory entry names: step -> name."""
    out: dict[int, str] = {}
    for name in names:
        step = name_format.parse(name)
        if step is not None:
            out[step] = name
    return out


_ANY_STEP = re.compile(r"(?:(.+)_)?(\d+)")


def parse_step(name: str, prefix: str | None) -> tuple[str | None, int] | None:
    """(prefix, step) of a step directory's name; ``prefix`` None accepts any prefix and any
    padding (Orbax's legacy rule: ``12``, ``ckpt_0012``)."""
    if is_leftover(name):
        return None
    if prefix is not None:  # (that prefix, any padding)
        m = re.fullmatch((re.escape(prefix) + "_" if prefix else "") + r"(\d+)", name)
        return None if m is None else (prefix or None, int(m.group(1)))
    m = _ANY_STEP.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


def leftover_kind(name: str) -> str | None:
    if _commit.is_tmp_name(name):
        return "tmp"
    if TODELETE_MARK in name:
        return "todelete"
    return None


async def remove_step(directory: AnyPath, name: str, todelete_subdir: str | None = None,
                      dest_name: str | None = None) -> None:
    """Deletes the entry ``name`` of ``directory`` (a step), unlisting it first: locally it is
    renamed to a to-delete leftover and then removed, or, with ``todelete_subdir``, moved to
    ``<directory>/<todelete_subdir>/<dest_name or name>``, so that a kill in between leaves a
    leftover, never a listed step with missing files; on an object store its commit marker is
    deleted before its objects (``todelete_subdir`` is not honoured there: moving means
    copying every object). One already gone (deleted by another manager) is no error."""
    if not isinstance(directory, Path) or not storage.has_rename(directory):
        await storage.rmtree(directory / name)
        return
    path = directory / name
    if todelete_subdir:
        dest_dir = directory / todelete_subdir
        await storage.makedirs(dest_dir)
        with contextlib.suppress(FileNotFoundError):
            await storage.rename_durable(path, dest_dir / (dest_name or name))
        return
    doomed = directory / f"{name}{TODELETE_MARK}-{time.time_ns()}"
    try:
        await storage.rename_durable(path, doomed)
    except FileNotFoundError:
        return
    await storage.rmtree(doomed)


@dataclasses.dataclass
class DirView:
    """A manager directory: its committed steps (step -> entry name) and its leftovers
    ((name, kind), kind "tmp", "todelete" or "uncommitted")."""

    steps: dict[int, str]
    leftovers: list[tuple[str, str]]


async def scan_dir(directory: AnyPath, prefix: str | None) -> DirView:
    """The steps and leftovers of ``directory`` as the library sees them (``_commit.scan``).

    Locally a step is a directory (not a stray file) without a temporary name, and the
    leftovers are the temporary and to-delete entries. On an object store a step is committed
    iff its ``commit_success.txt`` exists; a step-named entry without one is a save that never
    finished ("uncommitted"), as the manager's ``cleanup_tmp_directories`` sees it. Without
    ``prefix`` such an entry counts only when it is a bare number or shares the prefix of a
    committed step, so that no other data under the prefix is taken for a leftover."""
    names, visible = await _commit.scan(directory)
    parsed = {n: p for n in sorted(names) if (p := parse_step(n, prefix)) is not None}
    candidates = [n for n in parsed if n in visible]
    steps: dict[int, str] = {}
    for name in candidates:
        steps.setdefault(parsed[name][1], name)
    used = {parsed[n][0] for n in steps.values()} | {None}
    leftovers = []
    for name in sorted(names):
        kind = leftover_kind(name)
        if kind is None and name in parsed and name not in visible and (
                prefix is not None or parsed[name][0] in used):
            kind = "uncommitted"
        if kind is not None:
            leftovers.append((name, kind))
    return DirView(dict(sorted(steps.items())), leftovers)
