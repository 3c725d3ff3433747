"""Every script in docs/examples runs, exits 0 and ends with the lines it promises.

``api_overview.py`` has its own side-by-side test against Orbax (test_api_overview.py). Each
other script runs in a fresh interpreter, in an empty working directory, with a timeout; its
expected last lines are listed in ``EXPECTED_LAST_LINES`` (a new example must add its entry).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
HAS_OWN_TEST = {"api_overview.py"}

#: script -> regular expressions its last output lines must match, in order.
EXPECTED_LAST_LINES: dict[str, list[str]] = {
    "async_trainer.py": [
        r"trained 60 steps; 6 saves blocked the loop [\d.]+ ms in total",
        r"durable: \[10, 20, 30, 40, 50, 60\]",
        r"evaluated: \[10, 20, 30, 40, 50, 60\]",
        r"kept on disk: \[40, 50, 60\]",
        r"restored step 60: bit-exact",
    ],
    "data_iterator_and_evaluator.py": [
        r"evaluated, each as it was committed: 60 last, in order: True",
        r"kept on disk: \[40, 50, 60\]",
        r"resumed at step 60: data position 60, w\[0\] = 18\.30",
    ],
    "model_surgery.py": [
        r"layers: \['0', '1'\] embed: \(10, 4\) head kept: True step: 0",
        r"renamed layers, old embedding rows and std bit-exact: True",
    ],
    "resume_random_state.py": [
        r"resumed at step 6: key threefry2x32, 6 losses, lr 0\.1",
        r"saved steps: \[3, 6\]",
        r"resumed run matches the uninterrupted one bit-exactly: True",
    ],
    "multihost.py": [
        r"steps kept: \[2, 3\]",
        r"process 0: restored its 2 shards, bit-exact: True",
        r"process 0: single-replica restore read 8 KiB, bit-exact: True",
        r"process 1: restored its 2 shards, bit-exact: True",
        r"process 1: single-replica restore read 0 KiB, bit-exact: True",
    ],
}

SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in HAS_OWN_TEST)


def test_the_examples_are_found() -> None:
    assert "async_trainer.py" in SCRIPTS
    assert set(SCRIPTS) == set(EXPECTED_LAST_LINES), (
        "every docs example needs its expected last lines in EXPECTED_LAST_LINES")


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_prints_its_result(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[:6000] + out.stderr[-6000:]
    expected = EXPECTED_LAST_LINES[script]
    lines = out.stdout.splitlines()
    assert len(lines) >= len(expected), out.stdout
    for pattern, line in zip(expected, lines[-len(expected):], strict=True):
        assert re.fullmatch(pattern, line), (
            f"{line!r} does not match {pattern!r}; the output's end:\n{out.stdout[-3000:]}")
    # The script cleans up after itself: nothing is left in the temporary directory.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt_async_")]
