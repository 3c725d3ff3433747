"""Step directory names (Orbax's ``ocp.path.step``).

``CheckpointManagerOptions(step_name_format=standard_name_format(step_prefix='ckpt',
step_format_fixed_length=6))`` names steps ``ckpt_000100``, as the options' ``step_prefix``
and ``step_format_fixed_length`` do; Orbax's own ``standard_name_format`` objects are taken
too.
"""

from typing import Any

from .._paths import AnyPath, as_path
from ..manager._steps import NameFormat, name_format_of, standard_name_format


def build_step_path(base_path: Any, name_format: Any, step: int) -> AnyPath:
    """Where ``step`` goes under ``base_path`` in ``name_format`` (ours or Orbax's)."""
    return as_path(base_path) / name_format_of(name_format).build_name(step)


__all__ = ["NameFormat", "build_step_path", "standard_name_format"]
