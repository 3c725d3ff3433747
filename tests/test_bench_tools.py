"""The benchmark's profiling tool still finds the save steps it times (a renamed function in
the save path would otherwise break ``save_timeline.py --phases`` unnoticed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_save_timeline_times_every_step_of_a_save(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "save_timeline.py"), "--workload", "many_small", "--quick",
         "--repeats", "1", "--phases"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sys.path.insert(0, str(BENCH))
    try:
        from save_timeline import PHASES
    finally:
        sys.path.remove(str(BENCH))
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    timed = {row[1] for row in rows}
    # (every step runs once or more in a local save, as does each data writev and fsync)
    assert timed >= {attr for _, attr in PHASES} | {"writev", "fsync"}, timed
    median = proc.stdout.splitlines()[-1].split()
    figures = dict(zip(median[1::2], map(float, median[2::2]), strict=True))
    assert 0 < figures["returned_ms"] < figures["first_write_ms"] <= figures["last_write_ms"] \
        < figures["done_ms"]
    assert figures["cpu_ms"] > 0
    assert not list(tmp_path.iterdir())  # (its checkpoint removed)
