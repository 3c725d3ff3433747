"""Two processes under jax.distributed save and restore one sharded state (on one machine).

    python docs/examples/multihost.py

This script plays the cluster: it starts itself twice, each process with two CPU devices and
the coordinator on 127.0.0.1. On real hosts, run ``worker`` on every host after
``jax.distributed.initialize()`` (which finds the coordinator from the cluster's environment).
Every process calls the same ckpt_async methods in the same order; each writes the shards it
holds, the primary (process 0) commits, and restore reshards onto the target's layout. A
single-replica restore then reads on one replica's process only and broadcasts to the other.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

PROCESSES, DEVICES_EACH = 2, 2


def worker(process_id: int, port: int, directory: str,
           report: Callable[[str], None] = print) -> None:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=PROCESSES,
                               process_id=process_id)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt_async as ocp

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    full = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    saved_as = NamedSharding(mesh, P("data", "model"))
    state = {"w": jax.make_array_from_callback(full.shape, saved_as, lambda i: full[i]),
             "step": 7}

    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()

        # Restore onto another layout: rows split over all four devices of both processes.
        rows = NamedSharding(mesh, P(("data", "model"), None))
        target = {"w": jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=rows), "step": 0}
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
        exact = all(np.array_equal(np.asarray(s.data), full[s.index])
                    for s in restored["w"].addressable_shards)
        if jax.process_index() == 0:
            report(f"steps kept: {mngr.all_steps()}")
        report(f"process {jax.process_index()}: restored its "
               f"{len(restored['w'].addressable_shards)} shards, bit-exact: {exact}")

    # MaxText's single-replica restore: the mesh's "data" axis holds two replicas of a model
    # split over "model"; only replica 0's process reads, and the other replica gets the
    # arrays by broadcast. (PyTreeRestore: a manager of its own, as the one above has its
    # item locked to StandardSave's handler.)
    with ocp.CheckpointManager(directory) as mngr:
        th = ocp.type_handlers
        original = th.get_type_handler(jax.Array)
        th.register_type_handler(jax.Array, th.SingleReplicaArrayHandler(replica_axis_index=0),
                                 override=True)
        replicated = NamedSharding(mesh, P(None, "model"))
        read = []
        with ocp.progress(lambda event: read.append(event.done_bytes)):
            restored = mngr.restore(mngr.latest_step(), args=ocp.args.PyTreeRestore(
                {"w": jax.ShapeDtypeStruct(full.shape, full.dtype), "step": 0},
                restore_args={"w": th.SingleReplicaArrayRestoreArgs(
                    sharding=replicated, global_shape=full.shape, dtype=full.dtype),
                    "step": ocp.RestoreArgs(restore_type=int)}))
        th.register_type_handler(jax.Array, original, override=True)
        exact = all(np.array_equal(np.asarray(s.data), full[s.index])
                    for s in restored["w"].addressable_shards)
        report(f"process {jax.process_index()}: single-replica restore read "
               f"{max(read, default=0) // 1024} KiB, bit-exact: {exact}")
    jax.distributed.shutdown()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_EACH}"}
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "run")
        # Each worker reports into a file of its own: on stdout its lines could be cut by
        # what jax's CPU collectives (gloo) log there from C++, part of a line at a time.
        reports = [os.path.join(tmp, f"report-{i}.txt") for i in range(PROCESSES)]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port),
                                   directory, reports[i]], env=env,
                                  stdout=subprocess.DEVNULL) for i in range(PROCESSES)]
        try:
            for p in procs:
                p.wait(timeout=120)
        finally:
            for p in procs:  # one failed or hung: stop the others too
                if p.poll() is None:
                    p.kill()
        if any(p.returncode for p in procs):
            print("a process failed:", [p.returncode for p in procs], file=sys.stderr)
            return 1
        for path in reports:
            with open(path) as f:
                print(f.read(), end="")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        with open(sys.argv[5], "w") as lines:
            worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                   lambda text: print(text, file=lines, flush=True))
    else:
        sys.exit(main())
