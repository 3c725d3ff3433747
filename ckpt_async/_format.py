"""Every on-disk document, as msgspec Structs (Orbax 0.12's layout; see shared ORBAX_FORMAT.md).

Decoders are built once. Unknown fields on disk are tolerated (newer writers may add some);
sizes are checked before decoding; a document that fails to decode raises
:class:`~ckpt_async.errors.CorruptCheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import msgspec

from .errors import CorruptCheckpointError, UnsupportedLeafError

log = logging.getLogger("ckpt_async")

# File and directory names, as Orbax writes them.
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
STEP_EXTENSION = "_CKPT_ASYNC"
PYTREE_METADATA = "_METADATA"
SHARDING = "_sharding"
STRINGS = "_strings.json"
ARRAY_METADATAS = "array_metadatas"
COMMIT_SUCCESS = "commit_success.txt"
JSON_ITEM = "metadata"
ROOT_METADATA_DIR = "metadata"
ROOT_METADATA = "_ROOT_METADATA"
#: Where Orbax before 0.10 kept a manager's metadata (a JSON item's file), read when there is
#: no ``ROOT_METADATA``: ``metadata/metadata``.
LEGACY_ROOT_METADATA = "metadata"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
#: The files a step's directory holds beside its items' folders (no item may take their names).
STEP_FILES = (CHECKPOINT_METADATA, STEP_EXTENSION, COMMIT_SUCCESS)

#: Largest small document read (metadata files); a bigger one is treated as corrupt.
MAX_DOCUMENT_BYTES = 1 << 30

# Handler type strings written into _CHECKPOINT_METADATA (Orbax's, so each side resolves them).
_ORBAX = "orbax.checkpoint._src.handlers."
STANDARD_TYPESTR = _ORBAX + "standard_checkpoint_handler.StandardCheckpointHandler"
PYTREE_TYPESTR = _ORBAX + "pytree_checkpoint_handler.PyTreeCheckpointHandler"
JSON_TYPESTR = _ORBAX + "json_checkpoint_handler.JsonCheckpointHandler"
COMPOSITE_TYPESTR = _ORBAX + "composite_checkpoint_handler.CompositeCheckpointHandler"
ARRAY_TYPESTR = _ORBAX + "array_checkpoint_handler.ArrayCheckpointHandler"
JAX_RANDOM_KEY_TYPESTR = _ORBAX + "random_key_checkpoint_handler.JaxRandomKeyCheckpointHandler"
NUMPY_RANDOM_KEY_TYPESTR = _ORBAX + "random_key_checkpoint_handler.NumpyRandomKeyCheckpointHandler"
PROTO_TYPESTR = _ORBAX + "proto_checkpoint_handler.ProtoCheckpointHandler"

KEY_SEQUENCE = 1
KEY_DICT = 2


class StepMetadata(msgspec.Struct):
    """``_CHECKPOINT_METADATA``: what a step holds and when it was written."""

    item_handlers: dict[str, str] | str | None = None
    metrics: dict[str, Any] = {}
    performance_metrics: dict[str, Any] = {}
    init_timestamp_nsecs: int | None = None
    commit_timestamp_nsecs: int | None = None
    custom_metadata: dict[str, Any] = {}


def _fold_unknown_keys(doc: dict[str, Any], fields: tuple[str, ...],
                       defaults: tuple[str, ...], where: str) -> dict[str, Any]:
    """``doc`` (a decoded step or root document) as Orbax 0.12 reads it: the fields in
    ``defaults`` given as ``null`` are empty objects, and keys it does not know go into
    ``custom_metadata`` (what Orbax 0.10 and 0.11 wrote: ``custom``, ``format``,
    ``item_metadata``). Where ``custom_metadata`` is set already, Orbax refuses the document
    (from ``all_steps()`` too); here the unknown keys are left out, with a warning."""
    doc = {**doc, **{name: {} for name in defaults if doc.get(name) is None}}
    unknown = [key for key in doc if key not in fields]
    if unknown:
        if doc["custom_metadata"]:
            log.warning("%s: unknown keys %s are left out (custom_metadata is set)", where,
                        ", ".join(unknown))
        elif isinstance(doc["custom_metadata"], dict):
            doc["custom_metadata"] = {key: doc[key] for key in unknown}
        for key in unknown:
            del doc[key]
    return doc


def _decode_folded(data: bytes, type_: Any, defaults: tuple[str, ...], where: str) -> Any:
    doc = decode(data, dict[str, Any], where=where)
    doc = _fold_unknown_keys(doc, type_.__struct_fields__, defaults, where)
    try:
        return msgspec.convert(doc, type_)
    except msgspec.ValidationError as exc:
        raise CorruptCheckpointError(f"{where}: cannot decode ({exc})") from exc


def decode_step_metadata(data: bytes, *, where: str) -> StepMetadata:
    """A step's ``_CHECKPOINT_METADATA``, read as Orbax 0.12 reads it (unknown keys of older
    Orbax in ``custom_metadata``, ``null`` metrics as none)."""
    return _decode_folded(data, StepMetadata,
                          ("metrics", "performance_metrics", "custom_metadata"), where)


class StepExtension(msgspec.Struct):
    """``_CKPT_ASYNC`` beside ``_CHECKPOINT_METADATA``: what ckpt_async adds to a step, kept
    out of Orbax's document (Orbax folds unknown keys into ``custom_metadata``, or rejects them
    when that is set). The crc32 catches damage to ``_CHECKPOINT_METADATA`` that still parses;
    the statistics are the save's bytes, arrays and phase durations."""

    version: int = 1
    checkpoint_metadata_crc32: int | None = None
    statistics: dict[str, Any] | None = None


class KeyEntry(msgspec.Struct):
    key: str
    key_type: int


class ValueMetadata(msgspec.Struct, omit_defaults=True):
    value_type: str
    skip_deserialize: bool  # no default: Orbax requires the field, omit_defaults would drop it
    write_shape: list[int] | None = None


class TreeEntry(msgspec.Struct):
    key_metadata: list[KeyEntry]
    value_metadata: ValueMetadata


class TreeMetadata(msgspec.Struct):
    """``_METADATA`` of a pytree item. ``ckpt_async`` is our extension, ignored by Orbax: the
    exact container types and key types, so a tree restores as it was saved."""

    tree_metadata: dict[str, TreeEntry]
    use_ocdbt: bool = True
    use_zarr3: bool = False
    # (every chunk stored, a missing one damage: ckpt_async writes True; absent, as before
    # Orbax 0.5, which could leave out chunks equal to the fill value, False, as Orbax reads it)
    store_array_data_equal_to_fill_value: bool = False
    custom_metadata: Any = None  # any JSON value, as Orbax takes it (not only an object)
    ckpt_async: dict[str, Any] | None = None


class ArrayMetadataEntry(msgspec.Struct):
    param_name: str
    write_shape: list[int]
    chunk_shape: list[int]
    ext_metadata: Any = None


class ArrayMetadataWrapper(msgspec.Struct):
    array_metadata: ArrayMetadataEntry


class ArrayMetadatas(msgspec.Struct):
    """``array_metadatas/process_<i>``: the write and chunk shapes of one process's arrays."""

    array_metadatas: list[ArrayMetadataWrapper]


class RootMetadata(msgspec.Struct):
    """``metadata/_ROOT_METADATA`` of a manager directory."""

    internal_metadata: dict[str, Any] | None = {}
    custom_metadata: dict[str, Any] | None = None


def decode_root_metadata(data: bytes, *, where: str) -> RootMetadata:
    """A manager's ``_ROOT_METADATA``, read as Orbax 0.12 reads it: ``custom_metadata``
    (``{}`` where absent or ``null``), and the keys Orbax 0.10 and 0.11 wrote (``custom``,
    ``format``) in it."""
    return _decode_folded(data, RootMetadata, ("internal_metadata", "custom_metadata"), where)


def legacy_root_custom_metadata(data: bytes, *, where: str) -> dict[str, Any]:
    """The custom metadata of Orbax's older root metadata file (``LEGACY_ROOT_METADATA``):
    the document's ``custom_metadata``, or its other keys (the user's dict, as older Orbax
    wrote it), as Orbax reads it; both at once is refused, as Orbax refuses it."""
    doc = decode(data, dict[str, Any], where=where)
    custom = doc.pop("custom_metadata", None) or {}
    doc.pop("internal_metadata", None)
    if not isinstance(custom, dict):
        raise CorruptCheckpointError(f"{where}: custom_metadata is not a JSON object")
    if custom and doc:
        raise CorruptCheckpointError(f"{where}: holds custom_metadata and other keys besides "
                                     f"({', '.join(sorted(doc))})")
    return dict(custom or doc)


def _builtin(value: Any) -> Any:
    """A value of a subclass of a JSON type (``np.float64``, which ``np.mean`` returns, a
    ``str`` enum) as that type, as Python's ``json`` module writes it; msgspec takes the exact
    types only."""
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    raise TypeError(f"Object of type {type(value).__module__}.{type(value).__qualname__} is "
                    "not JSON serializable")


def json_values(value: Any) -> Any:
    """``value`` with every jax or NumPy array and NumPy scalar in it (the loss a jitted step
    returns) as its Python number, or nested lists of them, through dicts, lists and tuples:
    what a training loop passes as metrics, made JSON."""
    if isinstance(value, dict):
        return {k: json_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_values(v) for v in value]
    if hasattr(value, "dtype") and callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value


_encoder = msgspec.json.Encoder(enc_hook=_builtin)
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def _non_finite(value: Any) -> bool:
    """Whether ``value`` (builtins: dicts, lists, tuples, scalars) holds a NaN or infinity;
    a set in it raises ``TypeError``, as Python's ``json`` module does (msgspec would write
    it as a list, which reads back as one)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any([_non_finite(v) for v in value.values()])
    if isinstance(value, (list, tuple)):
        return any([_non_finite(v) for v in value])
    if isinstance(value, (set, frozenset)):
        raise TypeError("Object of type set is not JSON serializable")
    return False


def _pointer_tokens(name: str) -> list[str]:
    """A string leaf's name as the JSON Pointer Orbax reads and writes ``_strings.json``
    through (``'/' + name``): split at ``/``, then ``~1`` -> ``/`` and ``~0`` -> ``~``."""
    return [t.replace("~1", "/").replace("~0", "~") for t in name.split("/")]


def strings_document(strings: dict[str, str]) -> dict[str, Any]:
    """``_strings.json`` as Orbax writes it: each string at its name's JSON Pointer (a name
    ``x/y`` is member ``y`` of member ``x``). Raises ``ValueError`` when one name's place
    is inside another's string."""
    doc: dict[str, Any] = {}
    for name, value in strings.items():
        *parents, last = _pointer_tokens(name)
        node = doc
        for token in parents:
            node = node.setdefault(token, {})
            if not isinstance(node, dict):
                raise ValueError(f"string leaf {name!r}: its JSON Pointer passes through "
                                 "another string leaf")
        if isinstance(node.get(last), dict):
            raise ValueError(f"string leaf {name!r}: its JSON Pointer holds other string leaves")
        node[last] = value
    return doc


def string_in(doc: dict[str, Any], name: str, *, flat: bool = False) -> Any:
    """The string named ``name`` in a decoded ``_strings.json`` (at its JSON Pointer;
    ``flat``: a plain member, as ckpt_async wrote it before it wrote Orbax's layout).
    Raises ``KeyError``."""
    if flat:
        return doc[name]
    node: Any = doc
    for token in _pointer_tokens(name):
        if not isinstance(node, dict):
            raise KeyError(name)
        node = node[token]
    return node


def encode(doc: Any, *, values: Any = None) -> bytes:
    """``doc`` as JSON. ``values``: the caller's values inside it (metrics, custom metadata, a
    JSON item; ``doc`` itself when it is one): a NaN or infinity among them is written as
    Python's ``json`` module writes it (``NaN``, ``Infinity``), as Orbax does, rather than
    as ``null`` (msgspec), so that it reads back as it was."""
    if values is not None and _non_finite(values):
        return json.dumps(msgspec.to_builtins(doc, str_keys=True, enc_hook=_builtin)).encode()
    return _encoder.encode(doc)


def require_json(values: Any, what: str) -> None:
    """Raises UnsupportedLeafError (a TypeError) saying that ``what`` must be a JSON document
    when ``values`` is none (custom metadata, metrics): refused when they are given, not by
    the commit in the background once the arrays are written."""
    try:
        encode(values, values=values)
    except (TypeError, ValueError) as exc:
        raise UnsupportedLeafError(f"{what} must be a JSON document: {exc}") from exc


def decode(data: bytes, type_: type[Any], *, where: str) -> Any:
    """Decodes ``data`` as ``type_``; ``where`` names the file in the error. A document with
    ``NaN`` or ``Infinity`` (not JSON, but what Python's ``json`` writes for them: Orbax's
    metrics and custom metadata, :func:`encode`'s ``values``) is read too."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes is larger than any valid document")
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        return dec.decode(data)
    except msgspec.DecodeError as exc:
        try:  # (the rare document with NaN or Infinity)
            return msgspec.convert(json.loads(data), type_)
        except (ValueError, msgspec.ValidationError):
            raise CorruptCheckpointError(f"{where}: cannot decode ({exc})") from exc
    except msgspec.ValidationError as exc:
        raise CorruptCheckpointError(f"{where}: cannot decode ({exc})") from exc
