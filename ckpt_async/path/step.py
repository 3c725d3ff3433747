"""Step directory names (Orbax's ``ocp.path.step``).

``CheckpointManagerOptions(step_name_format=standard_name_format(step_prefix='ckpt',
step_format_fixed_length=6))`` names steps ``ckpt_000100``, as the options' ``step_prefix``
and ``step_format_fixed_length`` do; Orbax's own ``standard_name_format`` objects are taken
too.
"""

from ..manager._steps import NameFormat, standard_name_format

__all__ = ["NameFormat", "standard_name_format"]
