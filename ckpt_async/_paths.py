"""Checkpoint paths: a local :class:`~pathlib.Path`, or a :class:`StorePath` in an object store.

``StorePath`` is the object-store twin of ``Path`` for what the rest of the code uses
(``path / name``, ``.name``, ``.parent``, ``str(path)``), so handlers, the checkpointer and the
manager build paths the same way for both; ``_storage`` and ``_serialize`` decide by type how to
reach them. It deliberately has no ``__fspath__``: no object-store path can reach ``open`` or
``os`` by accident.

Endpoint, region and credentials of S3 come from the standard environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, or a profile), or
from :func:`set_s3_options`, which wins over the environment.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError

SCHEMES = ("s3",)


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
                "are not supported (gs:// is not implemented)")
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


def is_store(path: Any) -> bool:
    return isinstance(path, StorePath)


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


def s3_endpoint_region() -> tuple[str | None, str | None]:
    endpoint = (_s3_options["endpoint"] or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    region = (_s3_options["region"] or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or None)
    return endpoint, region


def kvstore_base(path: AnyPath) -> dict[str, Any]:
    """TensorStore kvstore spec of the "directory" ``path`` (its key prefix, ending in "/")."""
    if not isinstance(path, StorePath):
        return {"driver": "file", "path": str(path) + "/"}
    spec: dict[str, Any] = {"driver": "s3", "bucket": path.bucket,
                            "path": path.key + "/" if path.key else ""}
    endpoint, region = s3_endpoint_region()
    if endpoint:
        spec["endpoint"] = endpoint
    if region:
        spec["aws_region"] = region
    return spec
