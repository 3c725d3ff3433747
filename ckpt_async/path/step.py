"""Step directory names (Orbax's ``ocp.path.step``, also ``ocp.step``).

``CheckpointManagerOptions(step_name_format=standard_name_format(step_prefix='ckpt',
step_format_fixed_length=6))`` names steps ``ckpt_000100``, as the options' ``step_prefix``
and ``step_format_fixed_length`` do; Orbax's own ``standard_name_format`` objects are taken
too. A format of one's own subclasses :class:`NameFormat` (or follows Orbax's protocol):
``build_name(step)`` names a step, ``find_all(base_path)`` yields the :class:`Metadata` of
the steps found, and managers keep those committed.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .. import _format as fmt
from .._paths import AnyPath, as_given, as_path
from ..errors import InvalidArgumentError
from ..manager._steps import (
    Metadata,
    NameFormat,
    is_custom,
    name_format_of,
    standard_name_format,
)
from ..utils import (
    TMP_DIR_SUFFIX,
    all_temporary_paths,
    any_checkpoint_step,
    checkpoint_steps,
    checkpoint_steps_paths,
    is_checkpoint_finalized,
    is_tmp_checkpoint,
    step_from_checkpoint_name,
    tmp_checkpoints,
)

ALLOWED_STEP_NAME_PATTERN = r"(.+)_(\d+)"
TMP_DIR_STEP_PATTERN = r".*?_*?(\d+)\.orbax-checkpoint-tmp"


def build_step_path(base_path: Any, name_format: Any, step: int) -> AnyPath:
    """Where ``step`` goes under ``base_path`` in ``name_format`` (ours or Orbax's)."""
    return as_given(base_path) / name_format_of(name_format).build_name(step)


@dataclasses.dataclass(frozen=True)
class _CompositeNameFormat(NameFormat):
    write_name_format: Any = None
    read_name_formats: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.write_name_format not in self.read_name_formats:
            raise InvalidArgumentError(f"write_name_format: {self.write_name_format} must be "
                                       f"present in read_name_formats: "
                                       f"{list(self.read_name_formats)}")

    def __str__(self) -> str:
        return f"Composite([{','.join(str(f) for f in self.read_name_formats)}])"  # (Orbax's)

    def build_name(self, step: int) -> str:
        return str(self.write_name_format.build_name(step))

    def find_all(self, base_path: Any) -> Iterator[Metadata]:
        seen: set[str] = set()
        for nf in self.read_name_formats:
            for found in name_format_of(nf).find_all(base_path):
                if str(found.path) not in seen:
                    seen.add(str(found.path))
                    yield found

    def find_step(self, base_path: Any, step: int) -> Metadata:
        errors = []
        for nf in self.read_name_formats:
            try:
                return name_format_of(nf).find_step(base_path, step)  # type: ignore[no-any-return]
            except ValueError as exc:
                errors.append(str(exc))
        raise InvalidArgumentError("\n".join(errors))


def composite_name_format(write_name_format: Any, read_name_formats: Iterable[Any]) -> NameFormat:
    """A format writing step names as ``write_name_format`` does and finding steps named as
    any of ``read_name_formats`` (which must include it; the first to find a step wins)."""
    return _CompositeNameFormat(write_name_format=write_name_format,
                                read_name_formats=tuple(read_name_formats))


def build_step_metadatas(step_paths: Iterable[Any],
                         build_metadata: Callable[[Any], Metadata | None]) -> Iterator[Metadata]:
    """The metadata ``build_metadata`` makes of each of ``step_paths``, skipping None (what a
    format's ``find_all`` yields)."""
    for path in step_paths:
        found = build_metadata(path)
        if found is not None:
            yield found


def step_prefix_with_underscore(step_prefix: str | None) -> str:
    return "" if step_prefix is None else f"{step_prefix}_"


def is_standard_name_format(name_format: Any) -> bool:
    """Whether ``name_format`` is a standard one (``<prefix>_<step>``, padded or not)."""
    return isinstance(name_format, NameFormat) and not is_custom(name_format)


def single_host_load_and_broadcast_name_format(name_format: Any) -> NameFormat:
    """``name_format`` (a standard one) with ``single_host_load_and_broadcast=True``, as a
    manager with that option wants it; ``ValueError`` for any other format (as in Orbax)."""
    if not is_standard_name_format(name_format):
        raise InvalidArgumentError("single_host_load_and_broadcast is only supported for "
                                   f"standard name formats. Got {name_format}.")
    return dataclasses.replace(name_format, single_host_load_and_broadcast=True)


#: Orbax's names of :func:`is_checkpoint_finalized` and :func:`is_tmp_checkpoint`.
is_path_finalized = is_checkpoint_finalized
is_path_temporary = is_tmp_checkpoint


def latest_step_metadata(root_path: Any, name_format: Any) -> Metadata | None:
    """The :class:`Metadata` of the latest committed step under ``root_path``, or None."""
    return max(name_format_of(name_format).find_all(root_path), key=lambda m: m.step,
               default=None)


def find_step_path(base_path: Any, name_format: Any, *, step: int,
                   include_uncommitted: bool = False) -> AnyPath:
    """The directory of ``step`` under ``base_path``; ``ValueError`` when there is none.
    ``include_uncommitted``: a save of it still in flight (or abandoned) is found first."""
    nf = name_format_of(name_format)
    if include_uncommitted:
        root = as_path(base_path)
        prefix = nf.build_name(step) + fmt.TMP_SUFFIX
        tmp = [n for n in tmp_checkpoints(root) if n.startswith(prefix)]
        if tmp:
            return root / sorted(tmp)[-1]
    return nf.find_step(base_path, step).path


def maybe_find_step_metadata(base_path: Any, name_format: Any, *, step: int
                             ) -> Metadata | None:
    """The :class:`Metadata` of committed ``step`` under ``base_path``, or None."""
    try:
        return name_format_of(name_format).find_step(base_path, step)
    except ValueError:
        return None


def step_metadata_of_checkpoint_path(checkpoint_path: Any, name_format: Any) -> Metadata:
    """The :class:`Metadata` of the committed step at ``checkpoint_path``."""
    path = as_path(checkpoint_path)
    for found in name_format_of(name_format).find_all(path.parent):
        if found.path.name == path.name:
            return found
    raise InvalidArgumentError(f"{path} is no committed step of {name_format}")


def get_save_directory(step: int, directory: Any, name: str | None = None,
                       step_prefix: str | None = None, override_directory: Any = None,
                       step_format_fixed_length: int | None = None,
                       step_name_format: Any = None) -> AnyPath:
    """The directory of ``step`` (and item ``name`` in it) under ``directory``, as Orbax
    names it; ``override_directory`` instead of the step's, when given."""
    if directory is None:
        raise InvalidArgumentError("Directory cannot be None.")
    if override_directory is not None:
        result = as_given(override_directory)
    else:
        result = build_step_path(directory, step_name_format or standard_name_format(
            step_prefix=step_prefix, step_format_fixed_length=step_format_fixed_length), step)
    return result / name if name is not None else result


__all__ = [
    "ALLOWED_STEP_NAME_PATTERN", "TMP_DIR_STEP_PATTERN", "TMP_DIR_SUFFIX", "Metadata",
    "all_temporary_paths",
    "NameFormat", "any_checkpoint_step", "build_step_metadatas", "build_step_path",
    "checkpoint_steps", "checkpoint_steps_paths", "composite_name_format", "find_step_path", "get_save_directory",
    "is_checkpoint_finalized", "is_path_finalized", "is_path_temporary",
    "is_standard_name_format", "is_tmp_checkpoint", "latest_step_metadata",
    "maybe_find_step_metadata", "single_host_load_and_broadcast_name_format",
    "standard_name_format", "step_from_checkpoint_name",
    "step_metadata_of_checkpoint_path", "step_prefix_with_underscore", "tmp_checkpoints",
]
