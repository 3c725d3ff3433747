"""The demo (`python -m ckpt_async.demo`, README's `scripts/demo.sh`) runs, and its --dir is safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_async import demo


def test_demo_runs_into_an_empty_dir_and_keeps_the_run(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert demo.main(["--dir", str(run), "--steps", "30", "--width", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("restored step 10 in ") and out[-2].endswith(": 14 arrays bit-exact")
    assert out[-1] == "resumed from step 10 to 30: identical to the uninterrupted run"
    assert sorted(p.name for p in run.iterdir()) == ["10", "20", "30"]


def test_demo_refuses_a_dir_that_is_not_empty_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("a run of the user's own")
    proc = subprocess.run([sys.executable, "-m", "ckpt_async.demo", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"--dir {tmp_path} is not empty" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "a run of the user's own"
