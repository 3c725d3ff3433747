"""Checkpoint paths (Orbax's ``ocp.path``): :mod:`ckpt_async.path.step`, how step directories
are named."""

from . import step

__all__ = ["step"]
