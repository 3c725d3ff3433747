"""Checkpoint paths (Orbax's ``ocp.path``): :mod:`ckpt_async.path.step`, how step directories
are named; :mod:`ckpt_async.path.atomicity` (with :mod:`~ckpt_async.path.atomicity_types` and
:mod:`~ckpt_async.path.atomicity_defaults`), how a save becomes visible."""

from . import atomicity, atomicity_defaults, atomicity_types, step

__all__ = ["atomicity", "atomicity_defaults", "atomicity_types", "step"]
