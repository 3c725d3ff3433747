"""Step directory names, and which entries of a manager directory are what. Pure functions.

Orbax's standard naming: ``<step>``, or ``<prefix>_<step>``, the step zero-padded to
``step_format_fixed_length`` digits. Temporary (``*.orbax-checkpoint-tmp*``) and to-delete
(``*.orbax-checkpoint-todelete*``) entries are leftovers, never steps.
"""

from __future__ import annotations

import dataclasses
import re

from .. import _format as fmt

TODELETE_MARK = ".orbax-checkpoint-todelete"


@dataclasses.dataclass(frozen=True)
class NameFormat:
    """Builds and parses step directory names (Orbax's ``standard_name_format``)."""

    step_prefix: str | None = None
    step_format_fixed_length: int | None = None

    def build_name(self, step: int) -> str:
        digits = f"{step:0{self.step_format_fixed_length}d}" if self.step_format_fixed_length else str(step)
        return f"{self.step_prefix}_{digits}" if self.step_prefix else digits

    def parse(self, name: str) -> int | None:
        """The step a directory name denotes, or None when it is no step of this format."""
        if is_leftover(name):
            return None
        prefix = re.escape(self.step_prefix) + "_" if self.step_prefix else ""
        m = re.fullmatch(prefix + r"(\d+)", name)
        if m is None:
            return None
        if self.step_format_fixed_length and len(m.group(1)) < self.step_format_fixed_length:
            return None
        return int(m.group(1))


def standard_name_format(step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None) -> NameFormat:
    return NameFormat(step_prefix, step_format_fixed_length)


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
