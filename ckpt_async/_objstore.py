"""The object-store backend of ``_storage`` (``s3://`` and ``gs://``): small documents and
"directories" (key prefixes) through TensorStore's kvstore (``ts.KvStore.read/write/list/
delete_range``), with the per-scheme kvstore spec from :func:`_paths.kvstore_base`.

An object store has no directories, no rename and no fsync: a "directory" exists while some
object's key starts with its prefix, a completed PUT is durable, and visibility is decided by
the commit marker (see ``_commit``), written create-once by :func:`write_new`. TensorStore
The first request to a bucket (per configuration, per process) checks that the endpoint answers,
with a few quick retries and a deadline (``CKPT_ASYNC_STORE_FIRST_CONTACT_SECS``, 30 s by
default): a wrong endpoint, an unknown host or no network raise
:class:`~ckpt_async.errors.StoreUnreachableError` then, rather than after TensorStore's retries
of every later request (about a quarter of an hour by default, ``CKPT_ASYNC_STORE_RETRIES``),
which are there for a store that stops answering for a while during a run. TensorStore
failures are mapped to ckpt_async errors that name the ``s3://`` / ``gs://`` path and the
endpoint, with the store's answer made readable (its error code and message, the HTTP status:
:func:`errors.describe`) and TensorStore's own error, raw response included, kept as the
``__cause__``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Any

import tensorstore as ts

from . import _paths
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitError,
    StoreUnreachableError,
    UnreadableCheckpointError,
    describe,
    gave_up,
    not_read,
    refused,
)

log = logging.getLogger("ckpt_async")

#: The bucket kvstores opened, by configuration: each with the digest of the credentials
#: source it was opened under (:func:`_credentials_source`).
_roots: dict[tuple[str, ...], tuple[str, ts.KvStore]] = {}
os.register_at_fork(after_in_child=_roots.clear)  # TensorStore handles do not survive a fork

#: What TensorStore's s3 driver (the AWS default chain, :func:`_paths.s3_credentials`) takes
#: its credentials from, read when a kvstore is opened and never again: keys in the
#: environment, else the profile in the shared credentials and config files (their paths from
#: these variables or ``$HOME``), neither of which expire, else web identity, container or
#: instance credentials (those expire, and the driver fetches them again when they do).
_AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "HOME", "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED")


def _file_version(path: str) -> tuple[int, ...] | None:
    """What changes when ``path`` is written or replaced (None: no such file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _credentials_source(scheme: str) -> str:
    """A digest of where an ``s3://`` kvstore opened now would take its credentials from
    (the variables above, and the versions of the profile files): one keeps the credentials
    it was opened with, so rotated ones (new session keys in the environment, another
    profile, keys written anew into a profile file) need a new one. A digest: the keys
    themselves are not kept. ``gs://``: "" (TensorStore's gcs driver takes Google's
    credentials from one provider shared by the whole process, whichever kvstore asks)."""
    if scheme != "s3":
        return ""
    env = repr([os.environ.get(var) for var in _AWS_CREDENTIAL_VARS]
               + [_file_version(f) for f in _paths.aws_profile_files()])
    return hashlib.sha256(env.encode()).hexdigest()


async def _root(path: _paths.StorePath) -> ts.KvStore:
    """The bucket's kvstore (keys are relative to the bucket), opened once per bucket and
    configuration, after its :func:`_first_contact`; a changed endpoint, region, project or
    retry policy opens a new one, and so do changed credentials (:func:`_credentials_source`;
    without a first contact again)."""
    spec = _paths.kvstore_base(_paths.StorePath(path.bucket, "", path.scheme))
    endpoint = (_paths.gcs_endpoint_project()[0] if path.scheme == "gs"
                else spec.get("endpoint"))
    # (its credentials, the profile's name, are the source's: a change opens it anew below)
    cache_key = (path.scheme, path.bucket, str(endpoint),
                 repr(sorted((k, v) for k, v in spec.items() if k != "aws_credentials")))
    source = _credentials_source(path.scheme)
    cached = _roots.get(cache_key)
    if cached is not None and cached[0] == source:
        return cached[1]
    if cached is None:
        await _first_contact(path, spec)
    try:
        # Its own context: TensorStore reuses an open driver for an equal spec within one
        # context, and the gcs driver's endpoint (an environment variable) is not in it.
        kv = await ts.KvStore.open(spec, context=ts.Context())
    except Exception as exc:
        raise _failed(CheckpointError, "open", path, exc) from exc
    _roots[cache_key] = (source, kv)
    return kv


FIRST_CONTACT_ENV = "CKPT_ASYNC_STORE_FIRST_CONTACT_SECS"
FIRST_CONTACT_SECS = 30.0
#: What the first request to a bucket reads: any answer will do, "no such key" the likeliest.
PROBE_KEY = ".ckpt_async-first-contact"


def first_contact_secs() -> float:
    """How long the first request to a bucket may take, retries included
    (``CKPT_ASYNC_STORE_FIRST_CONTACT_SECS``; 0: no such check)."""
    value = os.environ.get(FIRST_CONTACT_ENV, "").strip()
    if not value:
        return FIRST_CONTACT_SECS
    try:
        secs = float(value)
        if not secs >= 0:
            raise ValueError(value)
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %g", FIRST_CONTACT_ENV, value,
                    FIRST_CONTACT_SECS)
        return FIRST_CONTACT_SECS
    return secs


def first_contact_retries(secs: float) -> dict[str, Any]:
    """TensorStore's retry policy for the first request to a bucket: from a quarter of a
    second (at most a sixteenth of ``secs``), doubling up to 4 s (at most a quarter of
    ``secs``), as many retries as fit in three quarters of ``secs`` even with TensorStore's
    jitter (up to the initial delay added to each), so that they run out before the deadline
    and the error can say why."""
    initial, longest = min(0.25, secs / 16), min(4.0, secs / 4)
    retries, waited = 0, 0.0
    while True:
        delay = min(initial * 2 ** retries + initial, longest)
        if waited + delay > 0.75 * secs:
            break
        waited += delay
        retries += 1
    return {"max_retries": retries, "initial_delay": f"{initial:g}s",
            "max_delay": f"{longest:g}s"}


async def _first_contact(path: _paths.StorePath, spec: dict[str, Any]) -> None:
    """One read from the bucket with few quick retries (:func:`first_contact_retries`) and a
    deadline: :class:`StoreUnreachableError` naming ``path`` and the endpoint when the store
    does not answer (a wrong endpoint or port, an unknown host, no network, a server that
    accepts and never replies), instead of TensorStore's retries of a quarter of an hour. Any
    answer will do, a refusal included: the request that needs what is refused reports it."""
    secs = first_contact_secs()
    if not secs:
        return
    resource = _paths.retries_resource(path.scheme)
    probe = {**spec, "context": {**spec.get("context", {}),
                                 resource: first_contact_retries(secs)}}
    where = f"cannot reach {path} at endpoint {_paths.endpoint_of(path)}"
    bound = (f"the first request to a bucket may take {secs:g} s: {FIRST_CONTACT_ENV}; "
             "check the endpoint, its port and the network")

    async def ask() -> None:
        kv = await ts.KvStore.open(probe, context=ts.Context())
        await kv.read(PROBE_KEY)

    try:
        await asyncio.wait_for(ask(), secs)
    except TimeoutError as exc:
        raise StoreUnreachableError(f"{where}: no answer within {secs:g} s ({bound})") from exc
    except Exception as exc:
        if gave_up(exc):
            raise StoreUnreachableError(f"{where}: {describe(exc)} ({bound})") from exc


def _failed(cls: type[CheckpointError], what: str, path: _paths.StorePath,
            exc: BaseException) -> CheckpointError:
    """The error for a request on ``path`` that failed with TensorStore's ``exc``; one S3
    refused names the credentials it was sent with (:func:`_paths.aws_credentials_source`)."""
    where = _paths.endpoint_of(path)
    if path.scheme == "s3" and refused(exc):
        where += f"; credentials: {_paths.aws_credentials_source()}"
    return cls(f"cannot {what} {path}: {describe(exc, where)}")


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """Every key starting with ``prefix`` ("" : the whole bucket)."""
    if not prefix:
        return ts.KvStore.KeyRange()
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _dir_prefix(path: _paths.StorePath) -> str:
    return path.key + "/" if path.key else ""


async def list_keys(path: _paths.StorePath) -> list[str]:
    """Keys under the "directory" ``path``, relative to it."""
    prefix = _dir_prefix(path)
    kv = await _root(path)
    try:
        keys = await kv.list(_prefix_range(prefix))
    except Exception as exc:
        raise _failed(CheckpointError, "list", path, exc) from exc
    return sorted(k.decode()[len(prefix):] for k in keys)


async def write_bytes(path: _paths.StorePath, data: bytes) -> None:
    kv = await _root(path)
    try:
        await kv.write(path.key, data)
    except Exception as exc:
        raise _failed(CommitError, "write", path, exc) from exc


async def write_new(path: _paths.StorePath, data: bytes) -> None:
    """Writes ``data`` at ``path`` only when no object is there: FileExistsError (and nothing
    written) when one is. The read gives the key's "no value" generation, and the write is
    conditional on it: TensorStore sends it as ``ifGenerationMatch=0`` to GCS and as
    ``If-None-Match: *`` to S3 (after a HEAD check on endpoints other than AWS's), so the
    store decides a race between two writers atomically where it honours the precondition."""
    kv = await _root(path)
    try:
        current = await kv.read(path.key)
        if current.state == "value":
            raise FileExistsError(f"{path} exists")
        stamp = await kv.write(path.key, data, if_equal=current.stamp.generation)
    except FileExistsError:
        raise
    except Exception as exc:
        raise _failed(CommitError, "write", path, exc) from exc
    if not stamp.generation:  # the precondition failed: another writer created it first
        raise FileExistsError(f"{path} exists")


async def read_bytes(path: _paths.StorePath) -> bytes:
    kv = await _root(path)
    try:
        result = await kv.read(path.key)
    except Exception as exc:
        cls = UnreadableCheckpointError if not_read(exc) else CheckpointError
        raise _failed(cls, "read", path, exc) from exc
    if result.state != "value":
        raise CheckpointNotFoundError(f"{path} does not exist")
    return bytes(result.value)


async def exists(path: _paths.StorePath) -> bool:
    """An object at ``path``, or any object under it (a "directory"; a bucket's root: any
    object in the bucket)."""
    if not path.key:
        return bool(await list_keys(path))
    kv = await _root(path)
    try:
        keys = await kv.list(ts.KvStore.KeyRange(path.key, path.key + "0"))
    except Exception as exc:
        raise _failed(CheckpointError, "list", path, exc) from exc
    own, below = path.key.encode(), path.key.encode() + b"/"
    return any(k == own or k.startswith(below) for k in keys)


async def is_dir(path: _paths.StorePath) -> bool:
    return bool(await list_keys(path))


async def listdir(path: _paths.StorePath) -> list[str]:
    """The first component of every key under ``path`` (files and "directories" alike)."""
    return sorted({k.split("/", 1)[0] for k in await list_keys(path)})


async def delete(path: _paths.StorePath) -> None:
    """Deletes the one object at ``path`` (missing is fine)."""
    kv = await _root(path)
    try:
        await kv.delete_range(ts.KvStore.KeyRange(path.key, path.key + "\x00"))
    except Exception as exc:
        raise _failed(CommitError, "delete", path, exc) from exc


async def delete_keys(path: _paths.StorePath, names: list[str]) -> None:
    """Deletes the objects ``names`` (relative to the "directory" ``path``, as
    :func:`list_keys` gives them; missing is fine), concurrently; none at a bucket's root
    (as :func:`delete_prefix`, which refuses to empty a bucket)."""
    if not names:
        return
    if not path.key:
        raise CommitError(f"{path}: refusing to delete every object in the bucket (a "
                          "checkpoint at a bucket's root is not replaced; save under a prefix)")
    kv = await _root(path)
    prefix = _dir_prefix(path)
    try:
        await asyncio.gather(*(kv.delete_range(ts.KvStore.KeyRange(prefix + n, prefix + n + "\x00"))
                               for n in names))
    except Exception as exc:
        raise _failed(CommitError, "delete", path, exc) from exc


async def delete_prefix(path: _paths.StorePath) -> None:
    """Deletes every object under ``path`` (missing is fine; a bucket's root only when the
    bucket is empty). TensorStore lists the prefix and
    issues the deletions concurrently, at most its request-concurrency limit at once (32 by
    default: ``TENSORSTORE_S3_REQUEST_CONCURRENCY`` / ``TENSORSTORE_GCS_REQUEST_CONCURRENCY``)."""
    if not path.key:  # (a checkpoint at a bucket's root: a save there clears it first)
        if await list_keys(path):
            raise CommitError(f"{path}: refusing to delete every object in the bucket (a "
                              "checkpoint at a bucket's root is not replaced; save under a "
                              "prefix)")
        return  # an empty bucket: nothing to delete
    kv = await _root(path)
    try:
        await kv.delete_range(_prefix_range(_dir_prefix(path)))
    except Exception as exc:
        raise _failed(CommitError, "delete", path, exc) from exc
