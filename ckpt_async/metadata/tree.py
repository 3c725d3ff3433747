"""The entries of a pytree item's ``_METADATA`` document (Orbax's ``ocp.metadata.tree``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["ValueMetadataEntry"]


@dataclasses.dataclass
class ValueMetadataEntry:
    """What ``_METADATA`` records of one leaf: its type name (``'jax.Array'``, ``'np.ndarray'``,
    ``'scalar'``, ``'string'``, or an empty container's ``'Dict'``, ``'List'``, ...), whether a
    restore skips it, and the shape it was written with (see ``docs/format.md``)."""

    value_type: str
    skip_deserialize: bool = False
    write_shape: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as ``_METADATA`` writes it (``write_shape`` only where there is one)."""
        doc: dict[str, Any] = {"value_type": self.value_type,
                               "skip_deserialize": self.skip_deserialize}
        if self.write_shape is not None:
            doc["write_shape"] = list(self.write_shape)
        return doc

    @classmethod
    def from_json(cls, json_dict: Mapping[str, Any],
                  pytree_metadata_options: Any = None) -> ValueMetadataEntry:
        """The entry of a ``value_metadata`` object read from ``_METADATA``. An empty named
        tuple's ``'NamedTuple'`` reads as ``'None'`` unless ``pytree_metadata_options`` (Orbax's
        ``PyTreeMetadataOptions``) has ``support_rich_types``, as in Orbax."""
        value_type = json_dict["value_type"]
        if value_type == "NamedTuple" and not getattr(pytree_metadata_options,
                                                      "support_rich_types", False):
            value_type = "None"
        shape = json_dict.get("write_shape")
        return cls(value_type=value_type,
                   skip_deserialize=json_dict["skip_deserialize"],
                   write_shape=tuple(shape) if shape is not None else None)
