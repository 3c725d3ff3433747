"""Helpers used by Orbax's examples and tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def erase_and_create_empty(directory: Any) -> Path:
    """Removes ``directory`` if it exists and creates it empty."""
    path = Path(directory)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
