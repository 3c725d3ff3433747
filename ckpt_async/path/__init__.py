"""Checkpoint paths (Orbax's ``ocp.path``): :mod:`ckpt_async.path.step`, how step directories
are named; :mod:`ckpt_async.path.atomicity` (with :mod:`~ckpt_async.path.atomicity_types` and
:mod:`~ckpt_async.path.atomicity_defaults`), how a save becomes visible;
:mod:`ckpt_async.path.format_utils`, telling a checkpoint's directory by its files;
:mod:`ckpt_async.path.deleter`, deleting steps as a manager does."""

from . import atomicity, atomicity_defaults, atomicity_types, deleter, format_utils, step

__all__ = ["atomicity", "atomicity_defaults", "atomicity_types", "deleter", "format_utils",
           "step"]
