"""Checkpoints on an S3-compatible object store: moto's server, on 127.0.0.1.

    python benchmarks/object_store.py [--workloads many_small,mixed] [--full] [--repeats 3]
        [--impls ckpt_async,ckpt_async_per_chunk,orbax] [--out FILE]

Starts ``moto_server`` (``moto[server]``) on a free loopback port in a process of its own, with
its request log in a file, and creates a bucket. Each measurement is a fresh process
(``--child``): it builds the quick (or ``--full``) workload as jax arrays, then times a
``CheckpointManager`` save + ``wait_until_finished()`` to ``s3://bucket/...`` (durable: the
commit marker is written) and, with a new manager, a restore into an abstract target, checked
bit-exact; it counts the requests the server logged during each phase. Implementations are
interleaved (a different order each repeat); figures are medians.

- ``ckpt_async``: as shipped. A restore reads the database's index, then the chunks of the
  arrays of up to 8 MiB in a few ranged reads of the data files
  (``ItemReader._read_remote``); larger arrays through TensorStore's zarr driver.
- ``ckpt_async_per_chunk``: the same with the index switched off (``_ocdbt.dumped_index``
  refuses), so every small array's chunk is a request of its own through TensorStore's OCDBT
  kvstore: ckpt_async before round 30.
- ``orbax``: orbax-checkpoint's ``CheckpointManager`` with its defaults, given the same URL
  as an ``etils.epath.Path``. orbax-checkpoint 0.12.8 does not save there: without ``s3fs``
  epath refuses the URL ("Install s3fs to access S3"); with it, Orbax's TensorStore spec
  builder wants an absolute path and gets ``s3:/bucket/...``. The table says so rather than
  leave it out.

moto serves requests from one Python process: the figures measure the number of requests and
what each costs the client as much as the transfer, and a real store's first-byte latency
(tens of milliseconds on S3) makes every request saved worth more there.

Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker import (  # noqa: E402
    abstract_of,
    block,
    build_tree,
    check_exact,
    interleaved,
    median_of,
    run_child,
    side_main,
    side_parser,
)

IMPLS = ("ckpt_async", "ckpt_async_per_chunk", "orbax")
BUCKET = "ckpt-bench"
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) ')


def _requests(log: Path, since: int) -> tuple[dict[str, int], int]:
    """The requests the server logged after byte ``since`` of its log, by method; and the
    log's size now (the server logs each request once it has answered it)."""
    time.sleep(0.2)  # (the last answers' lines)
    text = log.read_bytes()
    return dict(collections.Counter(_REQUEST.findall(text[since:].decode(errors="replace")))), \
        len(text)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (runs in a fresh process, with the server's environment)."""
    log = Path(args.log)
    if args.child == "orbax":
        import orbax.checkpoint as ocp
        from etils import epath

        url: Any = epath.Path(args.url)
    else:
        import ckpt_async as ocp

        url = args.url
        if args.child == "ckpt_async_per_chunk":
            from ckpt_async import _ocdbt

            def refuse(*_args: Any, **_kwargs: Any) -> Any:
                raise ValueError("the index is switched off")

            _ocdbt.dumped_index = refuse  # type: ignore[assignment]
    tree, expected, nbytes, count = build_tree(args.workload, not args.full)
    out: dict[str, Any] = {"impl": args.child, "workload": args.workload, "bytes": nbytes,
                           "arrays": count}
    _, at = _requests(log, 0)
    try:
        mngr = ocp.CheckpointManager(url, options=ocp.CheckpointManagerOptions())
        start = time.perf_counter()
        mngr.save(0, args=ocp.args.StandardSave(tree))
        mngr.wait_until_finished()
        out["save_s"] = time.perf_counter() - start
        mngr.close()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out["failed"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return out
    out["save_requests"], at = _requests(log, at)
    mngr = ocp.CheckpointManager(url, options=ocp.CheckpointManagerOptions())
    start = time.perf_counter()
    restored = block(mngr.restore(0, args=ocp.args.StandardRestore(abstract_of(tree))))
    out["restore_s"] = time.perf_counter() - start
    mngr.close()
    out["restore_requests"], _ = _requests(log, at)
    bad = check_exact(expected, restored)
    out.update(bit_exact=bad is None, mismatch=bad)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    impls = args.impls.split(",")
    port = _free_port()
    scratch = Path(tempfile.mkdtemp(prefix="objstore-"))
    log = scratch / "moto.log"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=sink, stderr=subprocess.STDOUT,
                                  env=env)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                             aws_access_key_id="testing", aws_secret_access_key="testing"
                             ).create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for workload in args.workloads.split(","):
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
            for r, impl in interleaved(impls, args.repeats):
                cmd = [sys.executable, __file__, "--child", impl, "--workload", workload,
                       "--url", f"s3://{BUCKET}/{workload}-{impl}-{r}", "--log", str(log)
                       ] + (["--full"] if args.full else [])
                runs[impl].append(run_child(cmd, env, args.timeout))
            results[workload] = runs
    finally:
        server.terminate()
        server.wait()
    return {"repeats": args.repeats, "mode": "full" if args.full else "quick",
            "results": results}



def _calls(requests: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {m}" for m, n in sorted(requests.items())) if requests else ""


def table(report: dict[str, Any]) -> str:
    lines = [f"moto's S3 server on 127.0.0.1, {report['mode']} workloads, medians of "
             f"{report['repeats']}; requests of the last repeat.", ""]
    for workload, runs in report["results"].items():
        first = next(r for rs in runs.values() for r in rs if "bytes" in r)
        lines += [f"#### {workload}: {first['bytes'] / 2**20:.0f} MiB in {first['arrays']} "
                  "arrays", "",
                  "| impl | save + wait s | restore s | restore vs per-chunk | save requests "
                  "| restore requests | bit-exact |", "|---|---:|---:|---:|---|---|---|"]
        base = median_of(runs.get("ckpt_async_per_chunk", []), "restore_s")
        for impl, rs in runs.items():
            if any("failed" in r for r in rs):
                lines.append(f"| {impl} | failed: `{rs[0].get('failed', '')}` | | | | | |")
                continue
            save, restore = median_of(rs, "save_s"), median_of(rs, "restore_s")
            vs = f"{restore / base:.2f}x" if restore and base else ""
            exact = "yes" if all(r.get("bit_exact") for r in rs) else "NO"
            lines.append(f"| {impl} | {save:.3f} | {restore:.3f} | {vs} | "
                         f"{_calls(rs[-1].get('save_requests'))} | "
                         f"{_calls(rs[-1].get('restore_requests'))} | {exact} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = side_parser(__doc__, IMPLS, "many_small,mixed", 600.0)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    return side_main(p.parse_args(argv), child, run, table)


if __name__ == "__main__":
    sys.exit(main())
