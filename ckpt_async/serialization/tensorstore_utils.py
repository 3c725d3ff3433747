"""Orbax's ``ocp.serialization.ts_utils``: the TensorStore context ckpt_async reads and writes
with."""

from __future__ import annotations

from ..type_handlers import get_ts_context

__all__ = ["get_ts_context"]
