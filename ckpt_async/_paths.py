"""Checkpoint paths: a local :class:`~pathlib.Path`, or a :class:`StorePath` in an object store.

``StorePath`` is the object-store twin of ``Path`` for what the rest of the code uses
(``path / name``, ``.name``, ``.parent``, ``str(path)``), so handlers, the checkpointer and the
manager build paths the same way for both; ``_storage`` and ``_serialize`` decide by type how to
reach them. It deliberately has no ``__fspath__``: no object-store path can reach ``open`` or
``os`` by accident.

:func:`kvstore_base` turns a path into the TensorStore kvstore spec every byte goes through:
``file`` locally, ``s3`` for ``s3://`` and ``gcs`` (the JSON API over HTTP) for ``gs://``.

S3: endpoint and region come from the standard environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``), or
from :func:`set_s3_options`, which wins over the environment; credentials from the AWS default
chain (:func:`s3_credentials`: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, else the profile ``AWS_PROFILE`` or ``default`` in the shared
credentials and config files, else web identity, container or instance credentials).

GCS: TensorStore takes the endpoint only from ``TENSORSTORE_GCS_HTTP_URL`` (process-wide; unset:
``https://storage.googleapis.com``), so :func:`set_gcs_options` ``(endpoint=...)`` sets that
variable; credentials come from Google's default chain as TensorStore implements it
(``GOOGLE_AUTH_TOKEN_FOR_TESTING``, ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
application-default credentials, then the GCE metadata server at ``GCE_METADATA_ROOT``); a
requester-pays billing project is set with ``set_gcs_options(user_project=...)``.

Both: TensorStore retries a request that failed for want of an answer (a refused connection, an
unknown host, 5xx, 429) with backoff, 32 times from 1 s up to 32 s apart by default (about a
quarter of an hour); ``CKPT_ASYNC_STORE_RETRIES`` sets that policy (:func:`request_retries`).
The first request to a bucket is bounded far tighter (``_objstore``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError, InvalidArgumentError

SCHEMES = ("s3", "gs")


@dataclasses.dataclass(frozen=True, slots=True)
class StorePath:
    """An object-store location ``<scheme>://<bucket>/<key>`` (immutable, like ``PurePath``)."""

    bucket: str
    key: str = ""  # no leading or trailing "/"; "" is the bucket's root
    scheme: str = "s3"

    @classmethod
    def parse(cls, url: str) -> StorePath:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise InvalidArgumentError(
                f"{url}: object stores other than {', '.join(s + '://' for s in SCHEMES)} "
                "are not supported")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InvalidArgumentError(f"{url}: no bucket name")
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidArgumentError(f"{url}: '.' and '..' are not allowed in object keys")
        return cls(bucket, "/".join(parts), scheme)

    def __truediv__(self, name: Any) -> StorePath:
        parts = [p for p in str(name).split("/") if p]
        return StorePath(self.bucket, "/".join([self.key, *parts] if self.key else parts),
                         self.scheme)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> StorePath:
        return StorePath(self.bucket, self.key.rpartition("/")[0], self.scheme)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


AnyPath = Path | StorePath


def escapes(name: str) -> bool:
    """Whether ``directory / name`` would not lie inside ``directory``: an empty or absolute
    ``name``, or one with a ``..`` part (or a NUL character)."""
    parts = name.replace("\\", "/").split("/")
    return not name or parts[0] == "" or ".." in parts or "\0" in name


def below(directory: Any, name: str, what: str) -> Any:
    """``directory / name`` for a ``name`` a checkpoint's documents give (a leaf stored in a
    folder of its own); ``CorruptCheckpointError`` where it would lie outside ``directory``:
    an empty or absolute name, or one with a ``..`` part. A tampered ``_METADATA`` would
    otherwise have a restore read arrays from elsewhere on the machine or in the bucket."""
    if escapes(name):
        raise CorruptCheckpointError(
            f"{directory}: {what} {name!r} names a path outside the checkpoint (empty, "
            "absolute or with '..'); refusing to read it")
    return directory / name


def is_store(path: Any) -> bool:
    return isinstance(path, StorePath)


def as_path(directory: Any) -> AnyPath:
    """A checkpoint location: an absolute local Path (a leading ``~`` or ``~user`` expanded
    to the home directory, as the shell does), or a StorePath for ``s3://`` URLs."""
    if isinstance(directory, StorePath):
        return directory
    if isinstance(directory, str) and "://" in directory:
        return StorePath.parse(directory)
    return Path(os.path.expanduser(os.fspath(directory))).absolute()


def as_given(path: Any) -> AnyPath:
    """``path`` as a path object, as it is given: a Path (a relative one stays relative, a
    ``~`` stays as it is), or a StorePath for ``s3://`` and ``gs://`` URLs. For functions
    that build names and resolve nothing, as Orbax's ``epath.Path(path)``."""
    if isinstance(path, StorePath) or (isinstance(path, str) and "://" in path):
        return as_path(path)
    return Path(os.fspath(path))


def coerce(path: Any) -> AnyPath:
    """``path`` as a Path or StorePath (a StorePath is kept; anything else becomes a Path)."""
    return path if isinstance(path, StorePath) else Path(path)


# -- S3 options -----------------------------------------------------------------------------------
_s3_options: dict[str, str | None] = {"endpoint": None, "region": None}


def set_s3_options(*, endpoint: str | None = None, region: str | None = None) -> None:
    """Sets the S3 endpoint (e.g. ``http://127.0.0.1:9000`` for MinIO) and region used for
    ``s3://`` paths; ``None`` falls back to the environment (``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL``; ``AWS_REGION``, ``AWS_DEFAULT_REGION``). Credentials always come from
    the standard AWS chain (environment variables, profile files, instance metadata).

    >>> ckpt_async.set_s3_options(endpoint='http://127.0.0.1:9000', region='us-east-1')
    """
    _s3_options["endpoint"] = endpoint
    _s3_options["region"] = region


def _s3_endpoint() -> tuple[str | None, str]:
    """The S3 endpoint (None: AWS's) and what set it."""
    if _s3_options["endpoint"]:
        return _s3_options["endpoint"], "set_s3_options"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, ""


def s3_endpoint_region() -> tuple[str | None, str | None]:
    region = (_s3_options["region"] or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or None)
    return _s3_endpoint()[0], region


# -- S3 credentials -------------------------------------------------------------------------------
def aws_profile() -> str:
    """The AWS profile the credentials are taken from: ``AWS_PROFILE``, else ``default``."""
    return os.environ.get("AWS_PROFILE") or "default"


def aws_profile_files() -> tuple[str, str]:
    """The shared credentials file and the config file, as the AWS SDKs find them:
    ``AWS_SHARED_CREDENTIALS_FILE`` (else ``~/.aws/credentials``) and ``AWS_CONFIG_FILE`` (else
    ``~/.aws/config``), a leading ``~`` being ``$HOME``."""
    return (os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
                               or "~/.aws/credentials"),
            os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"))


def s3_credentials() -> dict[str, Any]:
    """TensorStore's ``aws_credentials`` for an s3 kvstore: the AWS default chain (keys in the
    environment, the profile in the shared credentials and config files, web identity,
    container, instance metadata; unsigned requests when none gives any), with the profile
    named. Named because TensorStore (0.1.86, and its sources since) passes the chain an empty
    profile name where none is given, not "none": the chain then looks for a profile called ""
    and never reads the profile files, so keys kept only there were never used (every request
    went out unsigned)."""
    return {"type": "default", "profile": aws_profile()}


def _profile_in(path: str, section: str) -> bool | None:
    """Whether the INI file ``path`` has a ``[section]`` (None: no such file, or unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(" ".join(line.strip()[1:-1].split()) == section for line in f
                       if line.strip().startswith("[") and line.strip().endswith("]"))
    except OSError:
        return None


def aws_credentials_source() -> str:
    """Where the AWS default chain takes its credentials from now, in words, for the error of a
    request the store refused: the environment's keys, or the profile and the file it is in,
    or what the chain would try after those (never the keys themselves)."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "keys from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    profile, (credentials, config) = aws_profile(), aws_profile_files()
    by = " (AWS_PROFILE)" if env.get("AWS_PROFILE") else ""
    sections = [(credentials, profile), (config, f"profile {profile}")]
    if profile == "default":
        sections.append((config, "default"))
    for path, section in sections:
        if _profile_in(path, section):
            return f"profile {profile!r}{by} of {path}"
    missing = f"no keys in the environment, no profile {profile!r}{by} in {credentials} or {config}"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        return f"{missing}: web identity (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN)"
    if (env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return f"{missing}: the container's (AWS_CONTAINER_CREDENTIALS_*)"
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return f"none ({missing}, instance metadata disabled): requests are sent unsigned"
    return (f"{missing}: the instance metadata service's on an EC2 instance, else none "
            "(requests are sent unsigned)")


# -- GCS options ----------------------------------------------------------------------------------
GCS_ENDPOINT_ENV = "TENSORSTORE_GCS_HTTP_URL"
_gcs_options: dict[str, str | None] = {"endpoint": None, "user_project": None}
_gcs_env_before: list[str | None] = []  # TENSORSTORE_GCS_HTTP_URL before set_gcs_options set it


def set_gcs_options(*, endpoint: str | None = None, user_project: str | None = None) -> None:
    """Sets the Google Cloud Storage endpoint and billing project used for ``gs://`` paths.

    ``endpoint`` (e.g. ``http://127.0.0.1:4443`` for an emulator): TensorStore reads it only
    from the ``TENSORSTORE_GCS_HTTP_URL`` environment variable, so this sets that variable for
    the whole process (every TensorStore ``gcs`` kvstore opened afterwards uses it);
    ``None`` puts back the value it had before. ``user_project``: the project billed for
    requests (needed for requester-pays buckets); ``None``: the bucket's owner pays.
    Credentials always come from Google's default chain (``GOOGLE_APPLICATION_CREDENTIALS``,
    gcloud's application-default credentials, the GCE metadata server).

    >>> ckpt_async.set_gcs_options(endpoint='http://127.0.0.1:4443')
    """
    if endpoint is not None:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidArgumentError(f"GCS endpoint {endpoint!r} must be an http:// or "
                                       "https:// URL")
        if not _gcs_env_before:
            _gcs_env_before.append(os.environ.get(GCS_ENDPOINT_ENV))
        os.environ[GCS_ENDPOINT_ENV] = endpoint.rstrip("/")
    elif _gcs_env_before:
        before = _gcs_env_before.pop()
        if before is None:
            os.environ.pop(GCS_ENDPOINT_ENV, None)
        else:
            os.environ[GCS_ENDPOINT_ENV] = before
    _gcs_options["endpoint"] = endpoint
    _gcs_options["user_project"] = user_project


def gcs_endpoint_project() -> tuple[str | None, str | None]:
    """The endpoint TensorStore's gcs driver will use (None: Google's) and the billing project."""
    return os.environ.get(GCS_ENDPOINT_ENV) or None, _gcs_options["user_project"]


def endpoint_of(path: StorePath) -> str:
    """Where the requests for ``path`` go, and what set that, for error messages."""
    if path.scheme == "gs":
        endpoint = gcs_endpoint_project()[0]
        if endpoint is None:
            return "https://storage.googleapis.com (Google's; TENSORSTORE_GCS_HTTP_URL unset)"
        by = ("set_gcs_options" if _gcs_options["endpoint"] and
              endpoint == _gcs_options["endpoint"].rstrip("/") else GCS_ENDPOINT_ENV)
        return f"{endpoint} set by {by}"
    endpoint, by = _s3_endpoint()
    if endpoint is None:
        return ("AWS S3's own (set_s3_options, AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL "
                "unset)")
    return f"{endpoint} set by {by}"


# -- retries (both) -------------------------------------------------------------------------------
RETRIES_ENV = "CKPT_ASYNC_STORE_RETRIES"
_RETRY_MEMBERS = ("max_retries", "initial_delay", "max_delay")


def request_retries() -> dict[str, Any] | None:
    """TensorStore's retry policy for object-store requests from ``CKPT_ASYNC_STORE_RETRIES``:
    a number of retries, or a JSON object of TensorStore's ``max_retries``, ``initial_delay``
    and ``max_delay`` (e.g. ``{"max_retries": 8, "max_delay": "8s"}``); None (TensorStore's
    own: 32 retries, 1 s doubling to 32 s) when unset, and, with a warning, when invalid."""
    return _parse_retries(os.environ.get(RETRIES_ENV, "").strip())


@functools.lru_cache(maxsize=8)
def _parse_retries(value: str) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        policy = {"max_retries": int(value)} if value.isdigit() else json.loads(value)
        if not isinstance(policy, dict) or not set(policy) <= set(_RETRY_MEMBERS):
            raise ValueError(f"not an object of {', '.join(_RETRY_MEMBERS)}")
        import tensorstore as ts  # (checks the values: a negative count, a bad duration)

        ts.Context({"s3_request_retries": policy})
    except ValueError as exc:
        logging.getLogger("ckpt_async").warning(
            "%s=%r is not a number of retries or a JSON object of %s (%s); using TensorStore's "
            "retry policy", RETRIES_ENV, value, ", ".join(_RETRY_MEMBERS), exc)
        return None
    return policy


def retries_resource(scheme: str) -> str:
    """The name of TensorStore's context resource for the retries of ``scheme``'s driver."""
    return "gcs_request_retries" if scheme == "gs" else "s3_request_retries"


def kvstore_base(path: AnyPath) -> dict[str, Any]:
    """TensorStore kvstore spec of the "directory" ``path`` (its key prefix, ending in "/")."""
    spec: dict[str, Any]
    if not isinstance(path, StorePath):
        return {"driver": "file", "path": str(path) + "/"}
    key_prefix = path.key + "/" if path.key else ""
    if path.scheme == "gs":
        spec = {"driver": "gcs", "bucket": path.bucket, "path": key_prefix}
        _endpoint, project = gcs_endpoint_project()
        if project:
            spec["gcs_user_project"] = {"project_id": project}
    else:
        spec = {"driver": "s3", "bucket": path.bucket, "path": key_prefix}
        endpoint, region = s3_endpoint_region()
        if endpoint:
            spec["endpoint"] = endpoint
        if region:
            spec["aws_region"] = region
        spec["aws_credentials"] = s3_credentials()
    retries = request_retries()
    if retries is not None:
        spec["context"] = {retries_resource(path.scheme): retries}
    return spec
