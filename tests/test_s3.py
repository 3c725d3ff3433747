"""``s3://`` checkpoints against a real S3-compatible server (moto's) on 127.0.0.1.

The shared object-store tests (``_objstore_suite.py``) run here through TensorStore's s3
kvstore; boto3 is used only to set up the bucket and to look behind the library's back (list,
damage and remove objects). Below them, what is S3's own: the path type, the options, errors,
and a race of writers on one commit marker decided by the server (``If-None-Match: *``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid

import boto3
import moto.settings
import numpy as np
import pytest
import tensorstore as ts
from _moto import (
    REGION,
    WRONG_KEYS,
    client_for,
    iam_client,
    iam_keys,
    keys_checked,
    list_keys,
    moto_s3,
    moto_s3_server,
    profile,
    unchecked,
)
from _objstore_suite import Bucket, ObjectStoreSuite, small_round_trip

import ckpt_async as ocp
from ckpt_async import _commit, _objstore, _paths
from ckpt_async import _serialize as ser
from ckpt_async._paths import RETRIES_ENV, StorePath, kvstore_base
from ckpt_async.errors import (
    CheckpointError,
    CommitError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StoreUnreachableError,
    UnreadableCheckpointError,
)

BUCKET = "ckpt-async-test"


class S3Bucket(Bucket):
    scheme = "s3"

    def __init__(self, env: dict[str, str]) -> None:
        self.endpoint = env["AWS_ENDPOINT_URL"]
        self.name = BUCKET
        self.client = client_for(env)

    def keys(self, prefix: str) -> list[str]:
        return list_keys(self.client, BUCKET, prefix)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=BUCKET, Key=key)

    def size(self, key: str) -> int:
        return self.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]


@pytest.fixture(scope="module")
def store():
    """moto's S3 server on loopback, in an environment that reaches only it."""
    with moto_s3(BUCKET) as env:
        yield S3Bucket(env)


class TestS3(ObjectStoreSuite):
    def test_store_path_is_a_path_for_the_rest_of_the_code(self):
        p = StorePath.parse("s3://bucket/run//1/")
        assert str(p) == "s3://bucket/run/1" and p.name == "1" and p.parent == StorePath.parse(
            "s3://bucket/run")
        assert p / "default" / "_METADATA" == StorePath("bucket", "run/1/default/_METADATA")
        assert not hasattr(p, "__fspath__")
        with pytest.raises(InvalidArgumentError, match="az://"):
            StorePath.parse("az://bucket/run")
        with pytest.raises(InvalidArgumentError):
            StorePath.parse("s3://bucket/../x")
        with pytest.raises(InvalidArgumentError):
            StorePath.parse("s3:///run")

    def test_set_s3_options_instead_of_the_environment(self, store, prefix, monkeypatch):
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        monkeypatch.delenv("AWS_REGION")
        ocp.set_s3_options(endpoint=store.endpoint, region=REGION)
        try:
            small_round_trip(store, prefix)
        finally:
            ocp.set_s3_options()

    def test_unknown_scheme_and_missing_bucket(self, store):
        with pytest.raises(InvalidArgumentError, match="hdfs://"):
            ocp.CheckpointManager("hdfs://bucket/run")
        # a missing bucket fails the save when it checks the path, before anything is written:
        # S3's error code and message, not its XML answer (which stays in __cause__)
        with ocp.StandardCheckpointer() as ckptr:
            with pytest.raises(ocp.errors.CheckpointError) as caught:
                ckptr.save("s3://no-such-bucket-here/run", {"x": np.arange(3)})
        assert_store_error(caught.value, "cannot list s3://no-such-bucket-here/run/"
                           "commit_success.txt: NOT_FOUND: "
                           "NoSuchBucket: The specified bucket does not exist (HTTP 404; "
                           f"endpoint {store.endpoint} set by AWS_ENDPOINT_URL)",
                           "<Code>NoSuchBucket</Code>")

    def test_access_denied_is_readable(self, store, prefix, monkeypatch):
        """A request the store refuses (moto checking IAM, for a user with no policy): the
        error names the URL, S3's code and message, the HTTP status and the endpoint."""
        bucket = f"denied-{uuid.uuid4().hex[:8]}"  # (a bucket not opened yet by this process)
        store.client.create_bucket(Bucket=bucket)
        iam = boto3.client("iam", endpoint_url=store.endpoint, region_name=REGION)
        iam.create_user(UserName=bucket)
        key = iam.create_access_key(UserName=bucket)["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # IAM checked
        with pytest.raises(ocp.errors.CheckpointError) as caught:
            ocp.CheckpointManager(f"s3://{bucket}/{prefix}")
        assert_store_error(caught.value, f"cannot list s3://{bucket}/{prefix}: "
                           "PERMISSION_DENIED: AccessDenied: Access Denied (HTTP 403; "
                           f"endpoint {store.endpoint} set by AWS_ENDPOINT_URL; credentials: "
                           "keys from the environment (AWS_ACCESS_KEY_ID, "
                           "AWS_SECRET_ACCESS_KEY))", "<Code>AccessDenied</Code>")

    def test_a_checkpoint_at_the_root_of_an_empty_bucket(self, store):
        # A save clears its prefix first; at a bucket's root that refused (CommitError
        # "refusing to delete a whole bucket") even with nothing there to delete.
        bucket = f"root-{uuid.uuid4().hex[:8]}"
        store.client.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, {"x": np.arange(3)})
            ckptr.wait_until_finished()
            np.testing.assert_array_equal(ckptr.restore(url)["x"], np.arange(3))
            # force=True would delete every object in the bucket: refused, nothing removed
            before = list_keys(store.client, bucket, "")
            with pytest.raises(ocp.errors.CommitError, match=f"s3://{bucket}/: refusing"):
                ckptr.save(url, {"x": np.arange(4)}, force=True)
            assert list_keys(store.client, bucket, "") == before
            assert "commit_success.txt" in before
        assert ocp.verify(url).ok

    def test_rotated_credentials_are_taken_by_the_next_request(self, store, prefix,
                                                               monkeypatch):
        """A process whose keys are rotated mid-run (new ones in the environment, the old
        ones revoked) goes on reading and writing with the new ones. The bucket's kvstore,
        opened once, kept the keys it was opened with: every request was then refused
        (InvalidAccessKeyId). The cache holds no key."""
        iam = boto3.client("iam", endpoint_url=store.endpoint, region_name=REGION)
        user = f"rotated-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        old, new = (iam.create_access_key(UserName=user)["AccessKey"] for _ in range(2))

        def use(key: dict[str, str], *, checked: bool) -> None:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT",
                                0 if checked else float("inf"))  # (0: IAM checked)

        path = StorePath.parse(store.url(f"{prefix}/doc"))
        use(old, checked=True)
        asyncio.run(_objstore.write_bytes(path, b"before"))
        use(old, checked=False)
        iam.delete_access_key(UserName=user, AccessKeyId=old["AccessKeyId"])
        use(new, checked=True)
        assert asyncio.run(_objstore.read_bytes(path)) == b"before"
        asyncio.run(_objstore.write_bytes(path, b"after"))
        use(new, checked=False)
        assert store.get(f"{prefix}/doc") == b"after"
        assert not any(k["SecretAccessKey"] in repr(_objstore._roots) for k in (old, new))

    def test_racing_writers_of_one_marker_exactly_one_wins(self, store, prefix):
        """Eight writers create one marker at once, twenty times over: exactly one is let in
        (the others get FileExistsError), and the object holds that writer's bytes."""

        async def race(key: str) -> list[int]:
            path = StorePath.parse(store.url(key))

            async def one(i: int) -> int | None:
                try:
                    await _objstore.write_new(path, f"writer {i}".encode())
                except FileExistsError:
                    return None
                return i

            return [i for i in await asyncio.gather(*(one(i) for i in range(8)))
                    if i is not None]

        for trial in range(20):
            key = f"{prefix}/{trial}/commit_success.txt"
            winners = asyncio.run(race(key))
            assert len(winners) == 1, (trial, winners)
            assert store.get(key) == f"writer {winners[0]}".encode()

    def test_the_server_decides_with_if_none_match(self, store, prefix):
        """What decides a race that gets past every check: TensorStore's PUT with
        ``If-None-Match: *`` (the condition write_new asks for). Sent here without TensorStore's
        HEAD check first (``use_conditional_write``), eight PUTs issued together after one
        read: the server accepts exactly one, every time."""

        async def race(key: str) -> list[int]:
            spec = {**kvstore_base(StorePath(BUCKET, "", "s3")), "use_conditional_write": True}
            kv = await ts.KvStore.open(spec, context=ts.Context())
            no_value = (await kv.read(key)).stamp.generation
            stamps = await asyncio.gather(
                *(kv.write(key, f"writer {i}".encode(), if_equal=no_value) for i in range(8)))
            return [i for i, stamp in enumerate(stamps) if stamp.generation]

        for trial in range(20):
            key = f"{prefix}/{trial}/commit_success.txt"
            winners = asyncio.run(race(key))
            assert len(winners) == 1, (trial, winners)
            assert store.get(key) == f"writer {winners[0]}".encode()

    @pytest.mark.parametrize("damage", ["cut short", "deleted", "denied"])
    def test_a_ranged_read_of_small_arrays_that_fails_names_them(self, store, prefix,
                                                                 monkeypatch, damage):
        """The data file is damaged, or the store refuses it, after the database's index was
        read and before the ranged read of the small arrays' chunks: the error names the
        arrays and the file, damage as CorruptCheckpointError, a refusal as
        UnreadableCheckpointError. (A read past the end of the object raised TensorStore's
        bare ValueError.)"""
        url = store.url(prefix)
        tree = {"a": np.arange(4000, dtype=np.float32), "b": np.arange(3000, dtype=np.int32)}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(url, tree)
        real = ts.KvStore.read

        class Refused:
            def result(self):
                raise ValueError("PERMISSION_DENIED: AccessDenied: Access Denied")

        def damaging(kv, key, *args, **kwargs):
            if kwargs.get("byte_range") is None or not key.startswith("d/"):
                return real(kv, key, *args, **kwargs)
            if damage == "denied":
                return Refused()
            if damage == "deleted":
                store.delete(f"{prefix}/{key}")
            else:
                store.put(f"{prefix}/{key}", b"short")
            return real(kv, key, *args, **kwargs)

        monkeypatch.setattr(ts.KvStore, "read", damaging)
        with ocp.StandardCheckpointer() as ckptr, pytest.raises(CorruptCheckpointError) as caught:
            ckptr.restore(url)
        message = str(caught.value)
        assert message.startswith(f"{url}: key 'a' (and 1 other arrays read with it): data "
                                  "file d/"), message
        assert ({"cut short": "cannot be read (bytes 0 to ", "deleted": "is missing",
                 "denied": "cannot be read (bytes 0 to "}[damage] in message), message
        if damage != "deleted":
            assert ("OUT_OF_RANGE" if damage == "cut short" else "PERMISSION_DENIED") in message
        assert isinstance(caught.value, UnreadableCheckpointError) == (damage == "denied")


def assert_store_error(exc: BaseException, message: str, raw: str) -> None:
    """``exc`` is a plain CheckpointError reading ``message``, its cause the store's ``raw``
    answer."""
    assert type(exc) is ocp.errors.CheckpointError and str(exc) == message, str(exc)
    assert raw in str(exc.__cause__) and "<" not in str(exc)


@pytest.mark.parametrize("status, unreadable", [
    ("PERMISSION_DENIED", True), ("UNAUTHENTICATED", True), ("UNAVAILABLE", True),
    ("ABORTED: All 32 retry attempts failed", True), ("DATA_LOSS", False)])
def test_a_read_the_store_refused_is_unreadable_not_damage(monkeypatch, status, unreadable):
    # An object the store denies (403) or does not serve is no damaged checkpoint: code that
    # deletes what it finds damaged must not delete a good step over a policy change. (Such
    # reads raised CorruptCheckpointError, or a plain CheckpointError; until round 40 also
    # those TensorStore gave up retrying, the store not answering.)
    refusal = ValueError(f"{status}: AccessDenied: Access Denied")

    class Refusing:
        async def read(self, key=None):
            raise refusal

    async def root(path):
        return Refusing()

    async def refused_open(*args, **kwargs):
        raise refusal

    async def refusing_store(*args, **kwargs):
        return Refusing()

    monkeypatch.setattr(_objstore, "_root", root)
    monkeypatch.setattr(ser.ts, "open", refused_open)
    item = StorePath.parse("s3://bucket/run/1/default")

    async def read_array():
        monkeypatch.setattr(ser, "_open_for_reading", refusing_store)
        return await ser.read_array(None, item, "x", use_ocdbt=True, use_zarr3=False)

    for call in (lambda: _objstore.read_bytes(item / "_METADATA"),
                 lambda: ser.open_array(None, item, "x", use_ocdbt=True, use_zarr3=False),
                 read_array):
        with pytest.raises(ocp.errors.CheckpointError) as caught:
            asyncio.run(call())
        assert isinstance(caught.value, UnreadableCheckpointError) == unreadable
        assert str(item) in str(caught.value) and status in str(caught.value)
    assert isinstance(caught.value, CorruptCheckpointError)  # (open_array's, either way)


# -- an endpoint that does not answer ---------------------------------------------------------
@contextlib.contextmanager
def dead_endpoint(kind: str):
    """An endpoint on 127.0.0.1 that never answers: a port nothing listens on (refused), a
    socket that never accepts (the kernel completes the connection; no reply ever comes), or a
    host name that does not resolve."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == "silent":
            sock.listen(8)
        port = sock.getsockname()[1]
        if kind == "closed port":
            sock.close()
        yield (f"http://{uuid.uuid4().hex[:8]}.invalid:9000" if kind == "unknown host"
               else f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("kind", ["closed port", "silent", "unknown host"])
def test_an_endpoint_that_does_not_answer_fails_the_first_request(store, monkeypatch, kind):
    """A wrong endpoint raised nothing for a quarter of an hour (TensorStore's retries of
    every request); the first request to a bucket now gives up within its own bound (here
    1 s: the default is 30) with StoreUnreachableError naming the URL and the endpoint."""
    monkeypatch.setenv(_objstore.FIRST_CONTACT_ENV, "1")
    with dead_endpoint(kind) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(StoreUnreachableError) as caught:
            ocp.CheckpointManager(f"s3://{BUCKET}/run")
    message = str(caught.value)
    assert message.startswith(f"cannot reach s3://{BUCKET}/run at endpoint {endpoint} set by "
                              "AWS_ENDPOINT_URL: "), message
    assert _objstore.FIRST_CONTACT_ENV in message and "curl_code" not in message
    if kind == "closed port":
        assert "Could not connect to server" in message, message
    if kind == "silent":
        assert "no answer within 1 s" in message, message
    with pytest.raises(StoreUnreachableError):  # (nothing cached: asked again, and again refused)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.restore(f"s3://{BUCKET}/run")


def test_the_first_request_is_bounded_by_default(monkeypatch):
    """Without CKPT_ASYNC_STORE_FIRST_CONTACT_SECS the first request to a bucket gives up
    within 30 s (retries running out before it, so that the error says why); TensorStore's
    own policy for every request would retry for a quarter of an hour."""
    monkeypatch.delenv(_objstore.FIRST_CONTACT_ENV, raising=False)
    secs = _objstore.first_contact_secs()
    policy = _objstore.first_contact_retries(secs)
    ts.Context({"s3_request_retries": policy, "gcs_request_retries": policy})  # (valid)
    initial, longest = (float(policy[k].rstrip("s")) for k in ("initial_delay", "max_delay"))
    worst = sum(min(initial * 2 ** i + initial, longest) for i in range(policy["max_retries"]))
    assert secs == 30 and policy["max_retries"] >= 5 and worst <= 0.75 * secs, (policy, worst)
    monkeypatch.setenv(_objstore.FIRST_CONTACT_ENV, "soon")
    assert _objstore.first_contact_secs() == 30  # (warned: not a number)


def test_a_store_that_stops_answering_during_a_run(monkeypatch):
    """Past the first request, TensorStore's retries apply (set short here by
    CKPT_ASYNC_STORE_RETRIES: the default retries for about a quarter of an hour). Once they
    run out: a restore raises UnreadableCheckpointError (not damage: it was never read) and a
    save fails, each naming the step's URL and why."""
    monkeypatch.setenv(RETRIES_ENV, '{"max_retries": 1, "initial_delay": "10ms", '
                                    '"max_delay": "10ms"}')
    with moto_s3_server("stops") as (server, env):
        mngr = ocp.CheckpointManager("s3://stops/run")
        try:
            mngr.save(1, args=ocp.args.StandardSave({"a": np.arange(8)}))
            mngr.wait_until_finished()
            read_small = ser.ItemReader.read_small

            async def stop_then_read(self, *args):  # (the step listed, its documents read)
                server.stop()
                return await read_small(self, *args)

            monkeypatch.setattr(ser.ItemReader, "read_small", stop_then_read)
            with pytest.raises(UnreadableCheckpointError) as caught:
                mngr.restore(1)
            assert type(caught.value) is UnreadableCheckpointError
            assert str(caught.value).startswith("s3://stops/run/1/default: array 'a' cannot be "
                                                "opened"), caught.value
            assert "All 1 retry attempts failed: Could not connect" in str(caught.value)
            with pytest.raises(CheckpointError) as caught:  # (save() looks for the step)
                mngr.save(2, args=ocp.args.StandardSave({"a": np.arange(8)}))
            assert type(caught.value) is CheckpointError and str(caught.value).startswith(
                "cannot list s3://stops/run/2/commit_success.txt: ABORTED: All 1 retry "
                f"attempts failed: Could not connect to server: Failed to connect to "
                f"{env['AWS_ENDPOINT_URL'][7:].replace(':', ' port ')}"), caught.value
        finally:
            with contextlib.suppress(CheckpointError):
                mngr.close()


def test_a_commit_the_store_stops_answering_in_names_the_step(monkeypatch):
    """The commit's requests fail (the server stopped as it begins): CommitError saying which
    save failed, then why (the commit's listing raised a plain CheckpointError)."""
    monkeypatch.setenv(RETRIES_ENV, "0")
    with moto_s3_server("commit-stops") as (server, _env):
        commit = _commit.commit

        async def stop_then_commit(*args, **kwargs):
            server.stop()
            return await commit(*args, **kwargs)

        monkeypatch.setattr(_commit, "commit", stop_then_commit)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save("s3://commit-stops/run/7", {"a": np.arange(8)})
            with pytest.raises(CommitError) as caught:
                ckptr.wait_until_finished()
    assert type(caught.value) is CommitError and str(caught.value).startswith(
        "saving s3://commit-stops/run/7 failed: cannot list "
        "s3://commit-stops/run/7/commit_success.txt: ABORTED: All 0 retry attempts failed: "
        "Could not connect to server"), caught.value


def test_a_retry_policy_that_is_not_one_is_ignored_with_a_warning(monkeypatch, caplog):
    path = StorePath.parse("s3://bucket/run")
    monkeypatch.setenv(RETRIES_ENV, "3")
    assert kvstore_base(path)["context"] == {"s3_request_retries": {"max_retries": 3}}
    monkeypatch.setenv(RETRIES_ENV, '{"max_retries": 3, "max_delay": "2s"}')
    assert kvstore_base(StorePath("b", "k", "gs"))["context"] == {
        "gcs_request_retries": {"max_retries": 3, "max_delay": "2s"}}
    for bad in ("-1", '{"retries": 3}', '{"max_delay": "soon"}'):
        monkeypatch.setenv(RETRIES_ENV, bad)
        caplog.clear()
        assert "context" not in kvstore_base(path), bad
        assert RETRIES_ENV in caplog.text, bad


# -- credentials from the AWS profile files ---------------------------------------------------
@pytest.fixture
def prefix() -> str:
    return f"cred-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def no_env_keys(store, monkeypatch, tmp_path):
    """:func:`_moto.keys_checked`: credentials must come from where a test puts them."""
    keys_checked(monkeypatch, tmp_path / "home")
    return tmp_path


def round_trip_checked(url: str) -> None:
    """A save and a restore at ``url``, bit-exact, through a manager (its listing, metadata,
    marker and arrays)."""
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.int64(7)}
    with ocp.CheckpointManager(url) as mngr:
        mngr.save(1, args=ocp.args.StandardSave(tree))
        mngr.wait_until_finished()
    with ocp.CheckpointManager(url) as mngr:
        assert mngr.all_steps() == [1]
        got = mngr.restore(1, args=ocp.args.StandardRestore())
    np.testing.assert_array_equal(got["w"], tree["w"])
    assert got["n"] == 7


@pytest.mark.parametrize("where", ["~/.aws/credentials", "AWS_SHARED_CREDENTIALS_FILE",
                                   "~/.aws/config", "AWS_CONFIG_FILE"])
def test_keys_from_a_profile_file(store, prefix, no_env_keys, monkeypatch, where):
    """Keys kept only in a profile file sign every request of a save and a restore. They
    were never read (TensorStore's default chain looked for a profile named ""): requests
    went out unsigned, refused by any bucket that is not public."""
    keys, home = iam_keys(store.endpoint), no_env_keys / "home"
    config = "config" in where.lower()
    text = profile("default", keys, config=config)
    if where.startswith("~"):
        (home / ".aws").mkdir()
        (home / ".aws" / where.rsplit("/", 1)[1]).write_text(text)
    else:
        (no_env_keys / "aws-file").write_text(text)
        monkeypatch.setenv(where, str(no_env_keys / "aws-file"))
    round_trip_checked(store.url(prefix))


def test_aws_profile_selects_a_profile_and_keys_in_the_environment_come_first(
        store, prefix, no_env_keys, monkeypatch):
    """``AWS_PROFILE`` names the profile, in the credentials file or the config file (the
    default profile's keys here are refused); keys in the environment win over any profile.
    A change of either is taken by the next request (the bucket's kvstore opened anew)."""
    good, other = iam_keys(store.endpoint), iam_keys(store.endpoint)
    (no_env_keys / "credentials").write_text(profile("default", WRONG_KEYS)
                                             + profile("good", good))
    (no_env_keys / "config").write_text(profile("other", other, config=True))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_env_keys / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(no_env_keys / "config"))
    url = store.url(prefix)
    with pytest.raises(CheckpointError, match="InvalidAccessKeyId"):
        ocp.CheckpointManager(url)  # the default profile
    monkeypatch.setenv("AWS_PROFILE", "good")
    round_trip_checked(url)
    monkeypatch.setenv("AWS_PROFILE", "other")  # (from the config file)
    round_trip_checked(url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WRONG_KEYS["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_KEYS["SecretAccessKey"])
    with pytest.raises(CheckpointError, match="InvalidAccessKeyId"):
        ocp.CheckpointManager(url)


def test_a_profile_file_written_anew_is_taken_by_the_next_request(store, prefix, no_env_keys,
                                                                 monkeypatch):
    """Keys rotated in the credentials file (the old ones revoked) are used by the next
    request to a bucket already in use: its kvstore, which keeps the keys it was opened with,
    is opened anew when the file changes."""
    old = iam_keys(store.endpoint)
    credentials = no_env_keys / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    credentials.write_text(profile("default", old))
    path = StorePath.parse(store.url(f"{prefix}/doc"))
    asyncio.run(_objstore.write_bytes(path, b"before"))
    new = iam_keys(store.endpoint)
    credentials.write_text(profile("default", new))
    with unchecked():
        iam_client(store.endpoint).delete_access_key(UserName=old["UserName"],
                                                     AccessKeyId=old["AccessKeyId"])
    assert asyncio.run(_objstore.read_bytes(path)) == b"before"
    asyncio.run(_objstore.write_bytes(path, b"after"))
    assert not any(k["SecretAccessKey"] in repr(_objstore._roots) for k in (old, new))


@pytest.mark.parametrize("wrong", ["key id", "secret"])
def test_wrong_keys_in_a_profile_are_a_readable_error(store, prefix, no_env_keys, monkeypatch,
                                                      wrong):
    """A save or a restore whose keys the store refuses fails (CheckpointError, from the
    listing each begins with) naming the URL, S3's code and message, the endpoint and where
    the keys came from: the profile and its file. Its objects are never read."""
    keys = iam_keys(store.endpoint)
    url = store.url(prefix)
    credentials = no_env_keys / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "train")
    credentials.write_text(profile("train", keys))
    with ocp.StandardCheckpointer() as ckptr:  # (a checkpoint there, saved with the right keys)
        ckptr.save(url, {"x": np.arange(3)})
    credentials.write_text(profile("train", {
        "AccessKeyId": WRONG_KEYS["AccessKeyId"] if wrong == "key id" else keys["AccessKeyId"],
        "SecretAccessKey": WRONG_KEYS["SecretAccessKey"]}))
    refusal = ("InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our "
               "records." if wrong == "key id" else "SignatureDoesNotMatch: The request "
               "signature we calculated does not match the signature you provided. Check your "
               "key and signing method.")
    where = (f"(HTTP 403; endpoint {store.endpoint} set by AWS_ENDPOINT_URL; credentials: "
             f"profile 'train' (AWS_PROFILE) of {credentials})")
    with ocp.StandardCheckpointer() as ckptr:
        with pytest.raises(CheckpointError) as caught:
            ckptr.save(f"{url}/new", {"x": np.arange(3)})
        assert_store_error(caught.value, f"cannot list {url}/new/commit_success.txt: "
                           f"PERMISSION_DENIED: {refusal} {where}", refusal.split(":")[0])
        with pytest.raises(CheckpointError) as caught:
            ckptr.restore(url)
        assert_store_error(caught.value, f"cannot list {url}/commit_success.txt: "
                           f"PERMISSION_DENIED: {refusal} {where}", refusal.split(":")[0])
    assert keys["SecretAccessKey"] not in str(caught.value)


def test_a_refusal_without_credentials_says_requests_were_unsigned(monkeypatch, tmp_path):
    """With no keys in the environment and no profile in the files the chain would read, a
    refused request says so: it was sent unsigned (moto cannot answer an unsigned request
    when it checks credentials, so the refusal is AWS's answer, made up here)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[other]\naws_access_key_id = A\n")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    path = StorePath.parse("s3://bucket/run/1/_CHECKPOINT_METADATA")
    refusal = ValueError("PERMISSION_DENIED: AccessDenied: Access Denied "
                         "[http_response_code='403'] [http_response_body='<Error/>']")
    files = f"{tmp_path}/.aws/credentials or {tmp_path}/.aws/config"
    assert str(_objstore._failed(UnreadableCheckpointError, "read", path, refusal)) == (
        f"cannot read {path}: PERMISSION_DENIED: AccessDenied: Access Denied (HTTP 403; "
        f"endpoint {_paths.endpoint_of(path)}; credentials: none (no keys in the "
        f"environment, no profile 'default' in {files}, instance metadata disabled): "
        "requests are sent unsigned)")
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    assert _paths.aws_credentials_source() == (
        f"no keys in the environment, no profile 'default' in {files}: the instance metadata "
        "service's on an EC2 instance, else none (requests are sent unsigned)")
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert _paths.aws_credentials_source() == (
        f"profile 'other' (AWS_PROFILE) of {tmp_path}/.aws/credentials")
    # (only a refusal names them: a missing bucket, an unreachable store do not)
    missing = ValueError("NOT_FOUND: NoSuchBucket [http_response_code='404']")
    assert "credentials" not in str(_objstore._failed(CheckpointError, "list", path, missing))


def test_a_public_bucket_is_read_without_credentials(store, monkeypatch, tmp_path):
    """With no credentials anywhere the chain looks, requests go unsigned: a bucket whose
    policy lets anyone read is restored from (bit-exact); one that does not refuses, and the
    error says that no credentials were found and the requests went unsigned."""
    bucket = f"public-{uuid.uuid4().hex[:8]}"
    store.client.create_bucket(Bucket=bucket)
    tree = {"w": np.arange(6, dtype=np.float32)}
    with ocp.StandardCheckpointer() as ckptr:  # (saved with the fixture's keys)
        ckptr.save(f"s3://{bucket}/run", tree)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(RETRIES_ENV, "1")
    with ocp.StandardCheckpointer() as ckptr, pytest.raises(UnreadableCheckpointError) as caught:
        ckptr.restore(f"s3://{bucket}/run")
    assert str(caught.value).startswith(f"cannot read s3://{bucket}/run/"), caught.value
    assert str(caught.value).endswith(
        "PERMISSION_DENIED: Unknown (HTTP 403; endpoint "
        f"{store.endpoint} set by AWS_ENDPOINT_URL; credentials: none (no keys in the "
        f"environment, no profile 'default' in {tmp_path}/.aws/credentials or "
        f"{tmp_path}/.aws/config, instance metadata disabled): requests are sent unsigned)"), (
        caught.value)
    store.client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    with ocp.StandardCheckpointer() as ckptr:
        np.testing.assert_array_equal(ckptr.restore(f"s3://{bucket}/run")["w"], tree["w"])
