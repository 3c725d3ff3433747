"""The ckpt-async command line on ``s3://`` locations, against a real S3-compatible server
(moto's) on 127.0.0.1.

The CLI runs in-process (``cli.main(argv)``) and reaches the bucket only through the library
(TensorStore's s3 kvstore); boto3 is used only to set up the bucket and to look behind the
CLI's back (list, damage and remove objects).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _moto import (
    WRONG_KEYS,
    client_for,
    iam_keys,
    keys_checked,
    list_keys,
    moto_s3,
    profile,
)
from test_cli import run, run_json

import ckpt_async as ocp

BUCKET = "ckpt-async-cli-test"


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on loopback, in an environment that reaches only it."""
    with moto_s3(BUCKET) as env:
        yield env["AWS_ENDPOINT_URL"]


@pytest.fixture(scope="module")
def s3(endpoint):
    return client_for({"AWS_ENDPOINT_URL": endpoint})


def keys(s3, prefix: str) -> list[str]:
    return list_keys(s3, BUCKET, prefix)




def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)),
                   "b": np.arange(6).astype(ml_dtypes.bfloat16)},
        "big": rng.standard_normal(1 << 18).astype(np.float32),  # 1 MiB: most of the data
        "step": step,
    }


def save_run(url_or_path, steps=(1, 2)) -> None:
    with ocp.CheckpointManager(url_or_path) as mngr:
        for step in steps:
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state(step)),
                extra=ocp.args.JsonSave({"data_index": step * 2})),
                metrics={"loss": 1.0 / (step + 1)})
        mngr.wait_until_finished()


def make_run(s3) -> tuple[str, str]:
    """A manager directory on S3: committed steps 1 and 2, step 3 written but never committed
    (its marker removed: a save cut short), and unrelated data ``notes_7/`` beside them."""
    prefix = f"cli-{uuid.uuid4().hex[:12]}"
    url = f"s3://{BUCKET}/{prefix}"
    save_run(url, steps=(1, 2, 3))
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/3/commit_success.txt")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/notes_7/readme.txt", Body=b"not a checkpoint")
    return prefix, url


@pytest.fixture(scope="module")
def s3_run(s3):
    """A run the tests only read."""
    return make_run(s3)


# -- ls ----------------------------------------------------------------------------------------


def test_ls_json_committed_steps_and_uncommitted_leftover(capsys, s3_run):
    _prefix, url = s3_run
    code, doc, _ = run_json(capsys, "ls", url)
    assert code == 0
    assert doc["directory"] == url
    assert [s["step"] for s in doc["steps"]] == [1, 2]
    s2 = doc["steps"][1]
    assert s2["path"] == f"{url}/2" and s2["items"] == ["extra", "state"]
    assert s2["committed"] is True and s2["metrics"] == {"loss": pytest.approx(1 / 3)}
    assert s2["commit_time"].endswith("Z") and s2["commit_timestamp_nsecs"] > 0
    assert s2["bytes"] is None  # object listings here carry no sizes
    # the step without its marker is a leftover, never a step; notes_7/ is neither
    assert doc["leftovers"] == [{"name": "3", "path": f"{url}/3", "kind": "uncommitted",
                                 "bytes": None, "mtime": None}]


def test_ls_text_marks_the_leftover(capsys, s3_run):
    _prefix, url = s3_run
    code, out, _ = run(capsys, "ls", url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["STEP", "COMMITTED", "(UTC)", "SIZE", "ITEMS", "METRICS"]
    assert any(line.split()[:4] == ["3", "leftover", "(uncommitted)", "-"] for line in lines)
    assert "notes_7" not in out
    assert lines[-1] == "2 step(s), 1 leftover(s) (remove with: ckpt-async gc)"


def test_missing_prefix_and_bucket_are_one_line_errors_naming_the_url(capsys, endpoint):
    code, _, err = run(capsys, "ls", f"s3://{BUCKET}/no-such-prefix")
    assert code == 1
    assert err.strip() == f"ckpt-async ls: error: s3://{BUCKET}/no-such-prefix does not exist"
    code, _, err = run(capsys, "show", "s3://no-such-bucket-here/run")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "s3://no-such-bucket-here/run" in err and "NoSuchBucket" in err
    assert "http_response_body" not in err  # TensorStore's annotations are tidied away
    code, _, err = run(capsys, "verify", "nosuch://bucket/run")
    assert code == 2 and "nosuch://bucket/run" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_at_a_bucket_root(capsys, s3):
    # (the root of a bucket was said not to exist: its existence check found no key)
    bucket = f"cli-root-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(url, state(4))
    code, out, _ = run(capsys, "show", url)
    assert code == 0 and out.startswith(f"{url}/  committed ")
    assert "params.w  float32[64,32]" in out
    code, out, _ = run(capsys, "verify", url, "-q")
    assert code == 0 and out.startswith(f"OK  {url}/: 4 arrays")


# -- show --------------------------------------------------------------------------------------


def test_show_latest_step_and_an_item(capsys, s3_run):
    _prefix, url = s3_run
    code, out, _ = run(capsys, "show", url)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{url}/2  (step 2)  committed ")
    assert "params.w  float32[64,32]" in out and '{"data_index": 4}' in out
    code, doc, _ = run_json(capsys, "show", url, "--step", "1", "--item", "state")
    assert code == 0 and doc["step"] == 1 and doc["path"] == f"{url}/1"
    leaves = {r["key"]: r for r in doc["items"][0]["leaves"]}
    assert (leaves["big"]["shape"], leaves["big"]["dtype"]) == ([1 << 18], "float32")
    assert leaves["params.b"]["dtype"] == "bfloat16" and leaves["step"]["kind"] == "scalar"
    code, doc, _ = run_json(capsys, "show", f"{url}/1/extra")  # an item folder
    assert code == 0 and doc["items"][0]["document"] == {"data_index": 2}


def test_show_refuses_an_uncommitted_step(capsys, s3_run):
    _prefix, url = s3_run
    code, _, err = run(capsys, "show", f"{url}/3")
    assert code == 1 and f"{url}/3 is not committed" in err
    code, _, err = run(capsys, "show", url, "--step", "3")
    assert code == 1 and "step 3 is not in" in err


# -- verify ------------------------------------------------------------------------------------


def test_verify_every_committed_step(capsys, s3_run):
    _prefix, url = s3_run
    code, doc, _ = run_json(capsys, "verify", url)
    assert code == 0 and doc["ok"]
    assert [(c["step"], c["path"]) for c in doc["checkpoints"]] == [(1, f"{url}/1"),
                                                                     (2, f"{url}/2")]
    assert all(c["arrays_checked"] == 4 and c["bytes_checked"] >= 4 << 18
               for c in doc["checkpoints"])
    code, out, _ = run(capsys, "verify", f"{url}/2", "-q")
    assert code == 0 and out.startswith(f"OK  {url}/2: 4 arrays")


def test_keys_from_the_profile_aws_profile_names(capsys, endpoint, s3_run, monkeypatch,
                                                 tmp_path):
    """The command line signs its requests with the keys of ``AWS_PROFILE``'s profile in
    ``~/.aws/credentials`` (moto checking every request): they were never read, and requests
    went out unsigned. Keys the store refuses: a one-line error naming the URL, S3's refusal
    and the profile they came from."""
    _prefix, url = s3_run
    keys = iam_keys(endpoint)
    keys_checked(monkeypatch, tmp_path / "home")
    credentials = tmp_path / "home" / ".aws" / "credentials"
    credentials.parent.mkdir()
    credentials.write_text(profile("default", WRONG_KEYS) + profile("ci", keys))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    code, doc, _ = run_json(capsys, "ls", url)
    assert code == 0 and [s["step"] for s in doc["steps"]] == [1, 2]
    code, doc, _ = run_json(capsys, "verify", f"{url}/2")
    assert code == 0 and doc["ok"]
    monkeypatch.setenv("AWS_PROFILE", "default")
    code, _, err = run(capsys, "ls", url)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"cannot list {url}" in err and "InvalidAccessKeyId" in err, err
    assert f"credentials: profile 'default' (AWS_PROFILE) of {credentials})" in err, err


def test_verify_names_the_key_of_a_damaged_object(capsys, s3):
    prefix = f"cli-{uuid.uuid4().hex[:12]}"
    url = f"s3://{BUCKET}/{prefix}"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(url, state(5))
    assert run(capsys, "verify", url, "-q")[0] == 0
    data = [k for k in keys(s3, prefix) if k.startswith("d/")]
    largest = max(data, key=lambda k: s3.head_object(
        Bucket=BUCKET, Key=f"{prefix}/{k}")["ContentLength"])
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/{largest}")["Body"].read())
    body[len(body) // 2] ^= 0x40  # one bit, inside "big"
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{largest}", Body=bytes(body))
    code, out, err = run(capsys, "verify", url, "-q")
    assert code == 1, out
    assert out.startswith(f"FAIL  {url}:")
    problems = [line for line in out.splitlines() if line.startswith("  problem:")]
    assert problems and all("'big'" in p for p in problems), out
    assert err.strip() == "verify: 1 of 1 checkpoint(s) failed"


# -- diff --------------------------------------------------------------------------------------


def test_diff_between_s3_and_local(capsys, s3_run, tmp_path):
    _prefix, url = s3_run
    local = tmp_path / "run"
    save_run(local, steps=(2,))
    code, out, _ = run(capsys, "diff", f"{url}/2", local / "2", "--values")
    assert code == 0 and out.strip() == "identical (values compared)"
    code, doc, _ = run_json(capsys, "diff", f"{url}/1", local, "--values")  # local: latest, 2
    assert code == 1 and doc["a"] == f"{url}/1" and doc["b"] == str(local / "2")
    assert doc["added"] == doc["removed"] == []
    assert [c["key"] for c in doc["changed"]] == ["extra"]
    assert {v["key"] for v in doc["values"]} == {"state/params.w", "state/big", "state/step"}


# -- gc ----------------------------------------------------------------------------------------


def test_gc_dry_run_then_gc_removes_only_the_leftover(capsys, s3):
    prefix, url = make_run(s3)
    before = keys(s3, prefix)
    committed = [k for k in before if k.split("/")[0] in ("1", "2")]
    assert any(k.startswith("3/") for k in before)
    code, out, _ = run(capsys, "gc", url, "--dry-run")
    assert code == 0
    assert out.splitlines() == ["would remove 3  (uncommitted)", "1 leftover(s)"]
    assert keys(s3, prefix) == before
    code, _, err = run(capsys, "gc", url, "--older-than", "60")
    assert code == 2 and "--older-than" in err and keys(s3, prefix) == before
    code, doc, _ = run_json(capsys, "gc", url)
    assert code == 0 and doc["removed"] == ["3"] and not doc["dry_run"]
    after = keys(s3, prefix)
    assert not [k for k in after if k.startswith("3/")]
    assert [k for k in after if k.split("/")[0] in ("1", "2")] == committed  # untouched
    assert "notes_7/readme.txt" in after  # not a step: never a leftover
    code, doc, _ = run_json(capsys, "ls", url)
    assert [s["step"] for s in doc["steps"]] == [1, 2] and doc["leftovers"] == []
    assert run(capsys, "verify", url, "-q")[0] == 0
    code, out, _ = run(capsys, "gc", url)
    assert code == 0 and out.strip() == f"{url}: no leftovers"


# -- export / import ---------------------------------------------------------------------------


def assert_same_tree(a, b, path=()):
    """Same containers and key order, same leaf types, same bits."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same_tree(a[k], b[k], (*path, k))
    else:
        assert type(a) is type(b), (path, type(a), type(b))
        x, y = np.asarray(a), np.asarray(b)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), path
        assert x.tobytes() == y.tobytes(), path


def test_export_import_round_trip_bit_exact(capsys, s3, s3_run, tmp_path):
    _prefix, url = s3_run
    f32 = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    f32[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    prefix = f"cli-{uuid.uuid4().hex[:12]}"
    src = f"s3://{BUCKET}/{prefix}/src"
    tree = {"w": jax.device_put(f32), "b": np.arange(6).astype(ml_dtypes.bfloat16),
            "c": np.complex128(1 + 2j), "n": 7, "s": "name"}
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(src, args=ocp.args.PyTreeSave(tree))
    # s3:// checkpoint -> local file -> s3:// checkpoint
    code, out, _ = run(capsys, "export", src, "--to", tmp_path / "m.safetensors")
    assert code == 0 and out.strip().endswith(f"(from {src})")
    back = f"s3://{BUCKET}/{prefix}/back"
    code, out, _ = run(capsys, "import", tmp_path / "m.safetensors", "--to", back)
    assert code == 0 and out.startswith(f"wrote {back}: ")
    assert "commit_success.txt" in keys(s3, f"{prefix}/back")
    with ocp.PyTreeCheckpointer() as ckptr:
        original, restored = ckptr.restore(src), ckptr.restore(back)
    assert_same_tree(restored, original)
    assert isinstance(restored["w"], jax.Array) and type(restored["n"]) is int
    assert run(capsys, "diff", src, back, "--values")[0] == 0
    code, _, err = run(capsys, "import", tmp_path / "m.safetensors", "--to", back)
    assert code == 1 and "--force" in err
    assert run(capsys, "import", tmp_path / "m.safetensors", "--to", back, "--force")[0] == 0
    # a prefix with objects but no checkpoint of its own (a manager directory) is not cleared
    run_prefix, _ = s3_run
    before = keys(s3, run_prefix)
    code, _, err = run(capsys, "import", tmp_path / "m.safetensors", "--to", url)
    assert code == 1 and f"{url} exists; pass --force" in err
    assert keys(s3, run_prefix) == before

    # a step of the manager run, into a local checkpoint, compared with the s3 original
    code, _, _ = run(capsys, "export", url, "--item", "state", "--to", tmp_path / "s.safetensors")
    assert code == 0
    assert run(capsys, "import", tmp_path / "s.safetensors", "--to", tmp_path / "local")[0] == 0
    code, out, _ = run(capsys, "diff", f"{url}/2/state", tmp_path / "local", "--values")
    assert code == 0, out


def test_safetensors_files_are_local_only(capsys, s3_run, tmp_path):
    _prefix, url = s3_run
    code, _, err = run(capsys, "export", url, "--item", "state", "--to", f"{url}/x.safetensors")
    assert code == 2 and "must be a local path" in err
    code, _, err = run(capsys, "import", f"{url}/x.safetensors", "--to", tmp_path / "c")
    assert code == 2 and "must be a local path" in err


# -- the entry point ---------------------------------------------------------------------------


@pytest.mark.slow
def test_python_dash_m_on_s3(s3_run):
    _prefix, url = s3_run
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the fixture's AWS_* environment
    proc = subprocess.run([sys.executable, "-m", "ckpt_async", "ls", "--json", url],
                          capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [s["step"] for s in doc["steps"]] == [1, 2]
    assert [lo["name"] for lo in doc["leftovers"]] == ["3"]
