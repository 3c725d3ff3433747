"""Launches real multi-process JAX runs on this machine for the multi-host tests.

``launch(scenario, processes, devices, config)`` starts ``processes`` Python processes running
``tests/multihost_worker.py``: each one initializes ``jax.distributed`` against a coordinator on
127.0.0.1 (a free port) with ``devices`` CPU devices of its own, runs ``scenario`` and writes
what it found to ``<workdir>/<scenario>.<process>.json``. The workers import this checkout's
``ckpt_async`` (its root comes first on their ``PYTHONPATH``), not one installed elsewhere. As soon as one process fails, every
sibling is killed, and the whole run has a deadline, so no test can hang CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("multihost_worker.py")
#: The checkout the tests run from: first on the workers' path, so that they import its
#: ``ckpt_async`` (a worker's own path starts with ``tests/``, and an installed copy would win)
ROOT = WORKER.resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultihostFailure(AssertionError):
    pass


def launch(scenario: str, processes: int, devices: int, config: dict[str, Any],
           workdir: Path, *, deadline_s: float = 300) -> list[dict[str, Any]]:
    """Runs ``scenario`` on ``processes`` x ``devices``; returns each process's results."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    })
    cfg = workdir / f"{scenario}.config.json"
    cfg.write_text(json.dumps(config))
    procs = []
    logs = []
    for i in range(processes):
        log = open(workdir / f"{scenario}.{i}.log", "w+b")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(i), str(processes), str(port), str(cfg)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    end = time.monotonic() + deadline_s
    failed: tuple[int, str] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = (bad[0][0], f"exited with status {bad[0][1]}")
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > end:
                failed = (next(i for i, c in enumerate(codes) if c is None),
                          f"still running after {deadline_s:g} s")
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read().decode(errors="replace"))
        log.close()
    if failed is not None:
        i, why = failed
        raise MultihostFailure(f"{scenario}: process {i} {why}; its output:\n{outputs[i][-6000:]}")
    results = []
    for i in range(processes):
        path = workdir / f"{scenario}.{i}.json"
        if not path.exists():
            raise MultihostFailure(f"{scenario}: process {i} wrote no results:\n{outputs[i][-4000:]}")
        results.append(json.loads(path.read_text()))
    return results
