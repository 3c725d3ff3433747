"""Checkpoint paths (Orbax's ``ocp.path``): :mod:`ckpt_async.path.step`, how step directories
are named, and :mod:`ckpt_async.path.atomicity`, how a save becomes visible."""

from . import atomicity, step

__all__ = ["atomicity", "step"]
