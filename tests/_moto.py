"""moto's S3 server on 127.0.0.1 for the tests, and an environment that reaches only it.

``with moto_s3("bucket") as env:`` starts the server on a free port, creates the buckets, and
sets (then restores) the AWS variables: test credentials, the endpoint, no profile files and
no cloud metadata service. ``env`` is what was set (``env["AWS_ENDPOINT_URL"]`` included), for
subprocesses that need the same. ``moto_s3_server`` gives the server as well.

moto takes any request, signed or not, until told to check them: :func:`keys_checked` has it
check every request's signature and its IAM user's policy (the server runs in this process),
for keys of :func:`iam_keys` a test puts where the AWS chain finds them (:func:`profile`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import moto.server as moto_server  # test dependency: missing is a failure, not a skip
import moto.settings
import pytest

REGION = "us-east-1"


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[dict[str, str]]:
    with moto_s3_server(*buckets) as (_server, env):
        yield env


@contextlib.contextmanager
def moto_s3_server(*buckets: str) -> Iterator[tuple[moto_server.ThreadedMotoServer,
                                                    dict[str, str]]]:
    """:func:`moto_s3`, with the server too (a test may ``stop()`` it: its port then refuses
    connections)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {
        "AWS_EC2_METADATA_DISABLED": "true",  # never probe a cloud metadata service
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    try:
        with pytest.MonkeyPatch.context() as mp:  # the environment is restored on exit
            for k in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                      "AWS_DEFAULT_REGION"):
                mp.delenv(k, raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            client = client_for(env)
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
            yield server, env
    finally:
        server.stop()  # (again, if the test stopped it: a no-op)


def client_for(env: dict[str, str]):  # noqa: ANN201 - boto3's client type is generated
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION)


def list_keys(client, bucket: str, prefix: str) -> list[str]:  # noqa: ANN001
    """Every key under ``prefix/`` ("": the whole bucket), relative to it, sorted (all pages)."""
    out, token = [], None
    start = prefix + "/" if prefix else ""
    while True:
        kw = {"Bucket": bucket, "Prefix": start}
        if token:
            kw["ContinuationToken"] = token
        page = client.list_objects_v2(**kw)
        out += [o["Key"][len(start):] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(out)
        token = page["NextContinuationToken"]


# -- credentials checked ------------------------------------------------------------------------
ALLOW_S3 = json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
#: Keys of no IAM user (moto: InvalidAccessKeyId).
WRONG_KEYS = {"AccessKeyId": "AKIAIOSFODNN7EXAMPLE", "SecretAccessKey": "not-a-key"}


def keys_checked(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """No keys in the environment, no profile files (an empty ``home`` as ``$HOME``), and
    moto checking every request's signature and IAM policy. Retries are few, so that a
    request moto cannot take (an unsigned one: HTTP 500 from moto, 403 from AWS) fails in
    seconds."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CKPT_ASYNC_STORE_RETRIES", "1")
    monkeypatch.setenv("CKPT_ASYNC_STORE_FIRST_CONTACT_SECS", "5")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # (0: checked)


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """moto taking every request unchecked meanwhile (a test's own IAM requests)."""
    before = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    try:
        yield
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def iam_client(endpoint: str):  # noqa: ANN201 - boto3's client type is generated
    return boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def iam_keys(endpoint: str) -> dict[str, str]:
    """The keys (``AccessKeyId``, ``SecretAccessKey``, ``UserName``) of a new IAM user of the
    moto server at ``endpoint``, allowed everything on S3."""
    client, user = iam_client(endpoint), f"user-{uuid.uuid4().hex[:8]}"
    with unchecked():
        client.create_user(UserName=user)
        client.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=ALLOW_S3)
        return client.create_access_key(UserName=user)["AccessKey"]


def profile(name: str, keys: dict[str, str], *, config: bool = False) -> str:
    """A profile's section with ``keys``, as in a credentials file (``config``: a config
    file, where a profile other than the default is ``[profile name]``)."""
    header = f"profile {name}" if config and name != "default" else name
    return (f"[{header}]\naws_access_key_id = {keys['AccessKeyId']}\n"
            f"aws_secret_access_key = {keys['SecretAccessKey']}\n\n")
