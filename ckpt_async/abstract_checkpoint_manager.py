"""``AbstractCheckpointManager`` under the module name Orbax also gives it
(``orbax.checkpoint.abstract_checkpoint_manager``)."""

from collections.abc import Mapping
from typing import Any

from .checkpoint_managers import AbstractCheckpointManager

PyTree = Any
SaveParams = Mapping[str, Any]
RestoreParams = SaveParams

__all__ = ["AbstractCheckpointManager", "PyTree", "RestoreParams", "SaveParams"]
