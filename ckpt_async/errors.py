"""One exception tree for ckpt_async.

Every error the library raises derives from :class:`CheckpointError`. The categories follow
the pipeline (plan, stage/serialize, commit, restore) and mix in the builtin that fits, so code
written against Orbax that catches ``ValueError`` or ``FileNotFoundError`` keeps working.
Foreign errors (TensorStore, OS, msgspec) are mapped at one boundary with ``__cause__`` kept.
"""

from __future__ import annotations

import re


class CheckpointError(Exception):
    """Raised for any failure of ckpt_async; the base of every other error here."""


# --- plan: bad input, caught before anything is written -------------------------------------
class InvalidArgumentError(CheckpointError, ValueError):
    """Raised when arguments, options or a tree are invalid, before anything is written."""


class InvalidTypeError(InvalidArgumentError, TypeError):
    """Raised when an argument is of a type that is not accepted (a step that is no integer)."""


class UnsupportedLeafError(InvalidTypeError):
    """Raised when a tree holds a leaf that cannot be checkpointed (objects, object arrays)."""


class StructureMismatchError(InvalidArgumentError):
    """Raised when a restore target's tree differs from the stored one, or processes' trees do."""


class ShapeMismatchError(InvalidArgumentError):
    """Raised when a restore target's shape differs from the stored array's."""


class ShardingMismatchError(InvalidArgumentError):
    """Raised when a restore's sharding does not split an array's shape evenly (jax's error)."""


class PathNotADirectoryError(InvalidArgumentError, NotADirectoryError):
    """Raised when a path to save into is a file, or lies under one, before anything is written."""


class MissingKeyError(InvalidArgumentError, KeyError):
    """Raised when a tree or its restore args lack a key that is needed (Orbax: KeyError)."""

    def __str__(self) -> str:  # (a KeyError's would quote the message)
        return str(self.args[0]) if self.args else ""


class MissingIndexError(InvalidArgumentError, IndexError):
    """Raised when a tree's list is too short for an index that is needed (Orbax: IndexError)."""


class HandlerError(InvalidArgumentError):
    """Raised when an item's handler is unknown, or args do not match its locked-in handler."""


class StepAlreadyExistsError(CheckpointError, FileExistsError, ValueError):
    """Raised when saving to a path or step that already exists without ``force``."""


class ReadOnlyError(CheckpointError, PermissionError):
    """Raised when a write is attempted through a read-only manager."""


class NotWritableError(CheckpointError, PermissionError):
    """Raised when the checkpoint's directory cannot be written (permissions, read-only FS)."""


class StoreUnreachableError(CheckpointError, ConnectionError):
    """Raised when an object store's endpoint does not answer the first request to a bucket."""


# --- restore ----------------------------------------------------------------------------------
class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Raised when a checkpoint path, item or key does not exist."""


class StepNotFoundError(CheckpointNotFoundError):
    """Raised when a step is not among a manager's committed steps."""


class ItemNotFoundError(CheckpointNotFoundError, KeyError):
    """Raised when a restore names an item the checkpoint does not hold (Orbax: KeyError)."""


class CorruptCheckpointError(CheckpointError):
    """Raised when stored data or metadata fails to decode or verify."""


class UnreadableCheckpointError(CorruptCheckpointError, OSError):
    """Raised when a checkpoint's file exists but cannot be read (an I/O error, no access)."""


class CheckpointReplacedError(CheckpointError):
    """Raised when a forced save replaces a checkpoint while it is being read."""


class OutOfMemoryError(CheckpointError, MemoryError):
    """Raised when a restore finds no host memory for an array, naming it and its bytes."""


# --- serialize / commit (background) -----------------------------------------------------------
class CommitError(CheckpointError):
    """Raised when writing or committing a checkpoint failed; no step was made visible."""


class CommitTimeoutError(CommitError, TimeoutError):
    """Raised when a background commit exceeded ``AsyncOptions.timeout_secs``."""


# --- several processes ----------------------------------------------------------------------------
class ProcessFailedError(CommitError):
    """Raised on every process of a multi-process save when one of them failed; names it."""


class BarrierTimeoutError(CommitTimeoutError):
    """Raised on every waiting process when others did not reach a barrier in time; names them."""


# --- runtime ------------------------------------------------------------------------------------
class RuntimeUsageError(CheckpointError, RuntimeError):
    """Raised when a call would deadlock on the engine thread, comes at exit, or is not asyncio's."""


class ClosedError(CheckpointError, RuntimeError):
    """Raised when an operation is attempted on a closed checkpointer or manager."""


#: TensorStore's status codes of a read that did not happen (denied, or the store did not
#: answer), as opposed to one that found the data damaged.
_NOT_READ = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
#: How TensorStore reports a request it gave up retrying (a refused connection, an unknown
#: host, 5xx answers): ``ABORTED: All 32 retry attempts failed: ...``, also inside the error
#: of what needed it (``ABORTED: Error opening "zarr" driver: ...: All 32 retry ...``).
_RETRIES_EXHAUSTED = re.compile(r"\bAll \d+ retry attempts failed\b")


def gave_up(exc: BaseException) -> bool:
    """Whether a TensorStore error says the store never answered usefully: it could not be
    reached, or kept failing, until TensorStore stopped retrying."""
    return (str(exc).startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            or _RETRIES_EXHAUSTED.search(str(exc)) is not None)


def not_read(exc: BaseException) -> bool:
    """Whether a TensorStore error says the data was not read at all (no access, the store
    did not answer): :class:`UnreadableCheckpointError`, not damage."""
    return str(exc).startswith(_NOT_READ) or gave_up(exc)


def refused(exc: BaseException) -> bool:
    """Whether a TensorStore error is the store refusing the request: no access, or
    credentials it does not accept (HTTP 401 or 403)."""
    text = str(exc)
    return (text.startswith(("PERMISSION_DENIED", "UNAUTHENTICATED"))
            or re.search(r"\[http_response_code='40[13]'\]", text) is not None)


#: The payloads TensorStore appends to an HTTP request's error: `` [name='value']``.
_PAYLOAD = re.compile(r" \[([\w.-]+)='((?:[^'\\]|\\.)*)'\]")
_XML_CODE = re.compile(r"<Code>([^<]+)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]+)</Message>")
_JSON_MESSAGE = re.compile(r'"message\\?"\s*:\s*\\?"(.+?)\\?"')


def describe(exc: BaseException, endpoint: str | None = None) -> str:
    """TensorStore's error ``exc`` as one readable line. An object store's answer comes
    with the raw response attached (``[http_response_body='<?xml ...']``, request ids, curl
    codes): those are left out (``exc``, kept as the ``__cause__``, has them), the store's
    error code and message are taken from the body where the text lacks them, and the HTTP
    status and ``endpoint`` (where the request went) are named. Any other error: its text."""
    text = str(exc)
    payloads = dict(_PAYLOAD.findall(text))
    if not payloads.keys() & {"http_response_code", "http_response_body", "curl_code"}:
        return text
    head = _PAYLOAD.sub("", text).replace("CURL error ", "").strip().rstrip(":")
    body = payloads.get("http_response_body", "")
    code = _XML_CODE.search(body)
    message = _XML_MESSAGE.search(body) or _JSON_MESSAGE.search(body)
    if code and code.group(1) not in head:
        head += f": {code.group(1)}"
    if message and message.group(1) not in head:
        head += f": {message.group(1)}"
    where = [f"HTTP {payloads['http_response_code']}"] if "http_response_code" in payloads else []
    if endpoint:
        where.append(f"endpoint {endpoint}")
    return head + (f" ({'; '.join(where)})" if where else "")


def read_failure(message: str, exc: BaseException) -> CheckpointError:
    """The error for a read of stored data that failed with TensorStore's ``exc``."""
    cls = UnreadableCheckpointError if not_read(exc) else CorruptCheckpointError
    return cls(f"{message} ({describe(exc)})")


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "ClosedError",
    "BarrierTimeoutError",
    "CommitError",
    "CommitTimeoutError",
    "CorruptCheckpointError",
    "HandlerError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "ItemNotFoundError",
    "MissingIndexError",
    "MissingKeyError",
    "NotWritableError",
    "OutOfMemoryError",
    "PathNotADirectoryError",
    "ProcessFailedError",
    "ReadOnlyError",
    "RuntimeUsageError",
    "ShapeMismatchError",
    "ShardingMismatchError",
    "StepAlreadyExistsError",
    "StepNotFoundError",
    "StoreUnreachableError",
    "StructureMismatchError",
    "UnreadableCheckpointError",
    "UnsupportedLeafError",
]
