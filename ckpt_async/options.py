"""Orbax's ``ocp.options``: the option classes shared by checkpointers and managers."""

from ._checkpointer import AsyncOptions
from .manager.options import FileOptions, MultiprocessingOptions

__all__ = ["AsyncOptions", "FileOptions", "MultiprocessingOptions"]
