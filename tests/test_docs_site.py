"""The documentation site builds with `mkdocs build --strict` (broken links and references fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_strict(site: Path) -> None:
    for page in ("index.html", "guide/index.html", "migration/index.html", "scaling/index.html"):
        assert (site / page).is_file(), page


def test_reference_is_generated_from_docstrings(site: Path) -> None:
    html = (site / "reference" / "index.html").read_text()
    for name in ("CheckpointManager", "StandardCheckpointer", "AsyncCheckpointManager"):
        assert name in html, name
    assert 'id="ckpt_async.CheckpointManager"' in html
    assert 'id="ckpt_async.StandardCheckpointer"' in html
