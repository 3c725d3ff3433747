"""moto's S3 server on 127.0.0.1 for the tests, and an environment that reaches only it.

``with moto_s3("bucket") as env:`` starts the server on a free port, creates the buckets, and
sets (then restores) the AWS variables: test credentials, the endpoint, no profile files and
no cloud metadata service. ``env`` is what was set (``env["AWS_ENDPOINT_URL"]`` included), for
subprocesses that need the same. ``moto_s3_server`` gives the server as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import boto3
import moto.server as moto_server  # test dependency: missing is a failure, not a skip
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
