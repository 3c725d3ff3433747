"""``s3://`` checkpoints against a real S3-compatible server (moto's) on 127.0.0.1.

Objects are written in place; a step becomes visible when its ``commit_success.txt`` (written
last) exists; a step without it is never listed or restored and is cleaned up like a temporary
directory; deletion removes the marker first. Every listing and byte here goes through
TensorStore's s3 kvstore; boto3 is used only to set up the bucket and to look behind the
library's back (list, damage and remove objects).
"""

from __future__ import annotations

import logging
import os
import uuid

import boto3  # noqa: E402
import jax.numpy as jnp
import ml_dtypes
import moto.server as moto_server  # noqa: E402 - test dependencies: missing is a failure
import numpy as np
import pytest

import ckpt_async as ocp
from ckpt_async._paths import StorePath
from ckpt_async.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    StepAlreadyExistsError,
    StepNotFoundError,
)

BUCKET = "ckpt-async-test"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._server.server_port}"
    env = {
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe a cloud metadata service
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION, "AWS_ENDPOINT_URL": url,
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                                             "AWS_PROFILE", "AWS_DEFAULT_REGION"]}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=url, region_name=REGION).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


@pytest.fixture
def prefix(endpoint):
    return f"t-{uuid.uuid4().hex[:12]}"


def keys(s3, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix + "/"}
        if token:
            kw["ContinuationToken"] = token
        page = s3.list_objects_v2(**kw)
        out += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(out)
        token = page["NextContinuationToken"]


def state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)),
        "big": rng.standard_normal(3 << 20).astype(np.float32),  # 12 MiB: the zarr driver path
        "bf": rng.standard_normal(100).astype(ml_dtypes.bfloat16),
        "i": np.arange(10, dtype=np.int64) * seed,
        "step": seed,
    }


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.dtype == np.asarray(v).dtype, k
        assert g.tobytes() == np.asarray(v).tobytes(), k  # bit-exact


def test_store_path_is_a_path_for_the_rest_of_the_code():
    p = StorePath.parse("s3://bucket/run//1/")
    assert str(p) == "s3://bucket/run/1" and p.name == "1" and p.parent == StorePath.parse(
        "s3://bucket/run")
    assert p / "default" / "_METADATA" == StorePath("bucket", "run/1/default/_METADATA")
    assert not hasattr(p, "__fspath__")
    with pytest.raises(InvalidArgumentError):
        StorePath.parse("gs://bucket/run")
    with pytest.raises(InvalidArgumentError):
        StorePath.parse("s3://bucket/../x")


def test_manager_save_restore_retention_delete_reload(s3, prefix):
    url = f"s3://{BUCKET}/{prefix}"
    opts = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(2))
    states = {s: state(s) for s in range(4)}
    with ocp.CheckpointManager(url, options=opts, metadata={"run": "s3"}) as mngr:
        for s, st in states.items():
            assert mngr.save(s, args=ocp.args.StandardSave(st), metrics={"loss": 1.0 / (s + 1)})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3] and mngr.latest_step() == 3
        for s in (2, 3):
            assert_same(mngr.restore(s), states[s])
        meta = mngr.metadata(3)
        assert meta.metrics == {"loss": 0.25}
        assert mngr.item_metadata(3)["w"].shape == (64, 32)
        assert mngr.metadata().custom_metadata == {"run": "s3"}
    stored = keys(s3, prefix)
    # old steps' objects are really gone; committed steps carry their marker
    assert not [k for k in stored if k.split("/")[0] in ("0", "1")]
    assert {"2/commit_success.txt", "3/commit_success.txt", "3/_CHECKPOINT_METADATA",
            "3/default/_METADATA", "3/default/manifest.ocdbt"} <= set(stored)
    assert not [k for k in stored if ".orbax-checkpoint-tmp" in k]

    with ocp.CheckpointManager(url) as mngr:  # a fresh manager lists what is committed
        assert mngr.all_steps() == [2, 3]
        assert_same(mngr.restore(), states[3])
        mngr.delete(2)
        assert mngr.all_steps() == [3]
        mngr.reload()
        assert mngr.all_steps() == [3]
    assert not [k for k in keys(s3, prefix) if k.startswith("2/")]


def test_composite_with_a_json_item(s3, prefix):
    url = f"s3://{BUCKET}/{prefix}"
    st = state(7)
    with ocp.CheckpointManager(url) as mngr:
        mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(st),
                                             extra=ocp.args.JsonSave({"lr": 0.1, "tags": ["a"]})))
        mngr.wait_until_finished()
        got = mngr.restore(7)
        assert_same(got.state, st)
        assert got.extra == {"lr": 0.1, "tags": ["a"]}
        partial = mngr.restore(7, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        assert partial.extra == {"lr": 0.1, "tags": ["a"]}
    assert {"7/extra/metadata", "7/state/_METADATA", "7/commit_success.txt"} <= set(
        keys(s3, prefix))


def test_step_without_marker_is_not_listed_and_is_cleaned_up(s3, prefix):
    url = f"s3://{BUCKET}/{prefix}"
    with ocp.CheckpointManager(url) as mngr:
        for s in (1, 2):
            mngr.save(s, args=ocp.args.StandardSave({"x": np.full(5, s)}))
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/2/commit_success.txt")  # a save cut short
    with ocp.CheckpointManager(url) as mngr:
        assert mngr.all_steps() == [1]
        with pytest.raises(StepNotFoundError):
            mngr.restore(2)
    assert any(k.startswith("2/") for k in keys(s3, prefix))  # left alone without cleanup
    opts = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True)
    with ocp.CheckpointManager(url, options=opts) as mngr:
        assert mngr.all_steps() == [1]
        assert not any(k.startswith("2/") for k in keys(s3, prefix))
        mngr.save(2, args=ocp.args.StandardSave({"x": np.full(5, 22)}))  # the step again
        mngr.wait_until_finished()
        np.testing.assert_array_equal(mngr.restore(2)["x"], np.full(5, 22))
    with ocp.StandardCheckpointer() as ckptr:  # nor does a checkpointer restore one
        s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/1/commit_success.txt")
        with pytest.raises(ocp.errors.CheckpointNotFoundError):
            ckptr.restore(f"{url}/1")


def test_checkpointers(s3, prefix):
    url = f"s3://{BUCKET}/{prefix}"
    st = state(3)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(f"{url}/std", st)
        ckptr.wait_until_finished()
        assert_same(ckptr.restore(f"{url}/std"), st)
        abstract = {k: v if isinstance(v, int) else ocp.tree.to_shape_dtype_struct(v)
                    for k, v in st.items()}
        assert_same(ckptr.restore(f"{url}/std", abstract), st)
        meta = ckptr.metadata(f"{url}/std")
        assert meta.item_metadata["big"].shape == st["big"].shape
        with pytest.raises(StepAlreadyExistsError):
            ckptr.save(f"{url}/std", st)
        ckptr.save(f"{url}/std", {"only": np.ones(2)}, force=True)
        ckptr.wait_until_finished()
        assert list(ckptr.restore(f"{url}/std")) == ["only"]
    assert not [k for k in keys(s3, prefix) if k.startswith("std/") and "big" in k]
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(f"{url}/pt", {"s": "text", "a": np.arange(4)})
        got = ckptr.restore(f"{url}/pt")
        assert got["s"] == "text"
        np.testing.assert_array_equal(got["a"], np.arange(4))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(f"{url}/comp", ocp.args.Composite(
            a=ocp.args.StandardSave(st), b=ocp.args.JsonSave({"k": 1})))
        got = ckptr.restore(f"{url}/comp", ocp.args.Composite(
            a=ocp.args.StandardRestore(), b=ocp.args.JsonRestore()))
        assert_same(got.a, st)
        assert got.b == {"k": 1}


def test_verify_and_corrupt_object(s3, prefix):
    url = f"s3://{BUCKET}/{prefix}"
    st = state(5)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(url, st)
    report = ocp.verify(url)
    assert report.ok, report.problems
    assert report.arrays_checked == 5 and report.bytes_checked >= st["big"].nbytes
    data_keys = [k for k in keys(s3, prefix) if k.startswith("d/")]
    largest = max(data_keys, key=lambda k: s3.head_object(
        Bucket=BUCKET, Key=f"{prefix}/{k}")["ContentLength"])
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/{largest}")["Body"].read())
    body[len(body) // 2] ^= 0x40
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{largest}", Body=bytes(body))
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError, match="big"):
        ckptr.restore(url)
    report = ocp.verify(url)
    assert not report.ok and any("big" in p for p in report.problems)
    # a damaged document is named too
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/_METADATA", Body=b"{not json")
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError):
        ckptr.restore(url)


def test_set_s3_options_instead_of_the_environment(endpoint, prefix, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_REGION")
    ocp.set_s3_options(endpoint=endpoint, region=REGION)
    try:
        url = f"s3://{BUCKET}/{prefix}"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, {"x": np.arange(3)})
            np.testing.assert_array_equal(ckptr.restore(url)["x"], np.arange(3))
    finally:
        ocp.set_s3_options()


def test_unknown_scheme_and_missing_bucket(endpoint):
    with pytest.raises(InvalidArgumentError, match="gs://"):
        ocp.CheckpointManager("gs://bucket/run")
    # a missing bucket fails the save when it checks the path, before anything is written
    with ocp.StandardCheckpointer() as ckptr:
        with pytest.raises(ocp.errors.CheckpointError, match="no-such-bucket-here"):
            ckptr.save("s3://no-such-bucket-here/run", {"x": np.arange(3)})
