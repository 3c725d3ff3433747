"""Orbax's ``ocp.serialization``: one ``jax.Array`` to and from a TensorStore spec, for code
that drives TensorStore itself (a spec of its own, a layout of its own). Checkpoints go
through the handlers instead, which batch many arrays into one database."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import jax

# (imported as Orbax imports it, so that ``jax.experimental.array_serialization`` is an
# attribute after ``import ckpt_async``: Orbax's format guide parents its TensorStore context
# on ``jax.experimental.array_serialization.serialization.TS_CONTEXT``)
import jax.experimental.array_serialization.serialization  # noqa: F401
import numpy as np
import tensorstore as ts
from jax.experimental.layout import Format

from .._serialize import check_sharding, fit
from ..errors import InvalidArgumentError, ShapeMismatchError
from . import tensorstore_utils
from . import tensorstore_utils as ts_utils
from .tensorstore_utils import get_ts_context

__all__ = ["async_deserialize", "async_serialize", "get_ts_context", "tensorstore_utils",
           "ts_utils"]


async def async_serialize(arr_inp: jax.Array, tensorstore_spec: dict[str, Any],
                          context: ts.Context | None = None, primary_host: int | None = 0,
                          replica_id: int = 0, use_replica_parallel: bool = True,
                          transaction: ts.Transaction | None = None,
                          byte_limiter: Any = None) -> None:
    """Writes ``arr_inp`` to the array ``tensorstore_spec`` names (created with the array's
    shape and dtype, a shard a chunk, unless the spec says otherwise): each of this
    process's shards of replica ``replica_id``. ``primary_host``, ``use_replica_parallel``
    and ``byte_limiter`` are accepted for Orbax's signature."""
    shards = [s for s in arr_inp.addressable_shards if s.replica_id == replica_id]
    chunk = arr_inp.sharding.shard_shape(arr_inp.shape) if arr_inp.ndim else ()
    store = await ts.open(
        ts.Spec(tensorstore_spec), create=True, open=True, context=context or get_ts_context(),
        dtype=ts.dtype(np.dtype(arr_inp.dtype).name), shape=arr_inp.shape,
        chunk_layout=ts.ChunkLayout(chunk_shape=[max(1, c) for c in chunk]) if chunk else None)
    if transaction is not None:
        store = store.with_transaction(transaction)
    await asyncio.gather(*(store[s.index].write(np.asarray(s.data)) for s in shards))


async def async_deserialize(user_sharding: jax.sharding.Sharding | Format,
                            tensorstore_spec: ts.Spec | dict[str, Any],
                            global_shape: tuple[int, ...] | None = None, dtype: Any = None, *,
                            byte_limiter: Any = None, context: ts.Context | None = None,
                            assume_metadata: bool = False, strict: bool = True,
                            ) -> tuple[jax.Array, int]:
    """The array ``tensorstore_spec`` names, placed by ``user_sharding`` (each distinct part
    read once, for all the devices that hold it), cast to ``dtype``, and the bytes read (the
    stored chunks each read touches, as Orbax counts them). ``global_shape`` other than the
    stored one: ``ValueError`` when ``strict``, else the array cut or padded with zeros.
    ``user_sharding`` may be a ``jax.experimental.layout.Format`` (a layout and a sharding):
    each device's part is then placed with that layout, as Orbax places it."""
    layout = None
    given: Any = user_sharding
    if isinstance(given, Format):
        layout, given = given.layout, given.sharding
    if not isinstance(given, jax.sharding.Sharding):
        raise InvalidArgumentError(
            f"async_deserialize: {user_sharding!r} is no jax.sharding.Sharding (nor a Format "
            "of one)")
    sharding: jax.sharding.Sharding = given
    spec = tensorstore_spec if isinstance(tensorstore_spec, ts.Spec) else ts.Spec(
        tensorstore_spec)
    store = await ts.open(spec, open=True, assume_metadata=assume_metadata,
                          context=context or get_ts_context())
    stored = tuple(store.shape)
    shape = stored if global_shape is None else tuple(global_shape)
    if strict and shape != stored:
        raise ShapeMismatchError(f"{spec}: the stored shape {stored} is not the requested {shape} "
                                 "(strict=False cuts or pads it)")
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(store.dtype.numpy_dtype)
    # (jax's bare IndivisibleError named no array)
    check_sharding(spec.kvstore.url if spec.kvstore is not None else str(spec), None, shape,
                   sharding)
    # Each distinct part is read once and put on every device that holds it (a replicated
    # array is read once, not once a device), as Orbax's reads.
    parts: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index or (), shape))
        parts.setdefault(bounds, []).append(device)

    async def part(bounds: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, int]:
        within = tuple(slice(min(a, n), min(z, n)) for (a, z), n in zip(bounds, stored))
        got = await store[within].read() if stored else await store.read()
        return (fit(got.astype(out_dtype, copy=False), tuple(z - a for a, z in bounds)),
                _read_footprint(store, within))

    read = await asyncio.gather(*(part(b) for b in parts))

    def place(device: jax.Device) -> Any:
        if layout is None:
            return device
        return Format(layout, jax.sharding.SingleDeviceSharding(
            device, memory_kind=sharding.memory_kind))

    arrays = [jax.device_put(data, place(d)) for (data, _n), devices in zip(read, parts.values())
              for d in devices]
    devices = [d for group in parts.values() for d in group]
    by_device = dict(zip(devices, arrays))
    ordered = [by_device[d] for d in sharding.addressable_devices_indices_map(shape)]
    return (jax.make_array_from_single_device_arrays(shape, sharding, ordered),
            sum(n for _data, n in read))


def _read_footprint(store: ts.TensorStore, within: tuple[slice, ...]) -> int:
    """The bytes a read of ``within`` takes from the store, as Orbax counts them: whole
    chunks (of the stored dtype) along each dimension, or the region itself where the store
    is not chunked (an in-memory ``array`` spec)."""
    size = np.dtype(store.dtype.numpy_dtype).itemsize
    template = store.chunk_layout.read_chunk_template
    if not all(template[i].finite for i in range(store.rank)):
        return size * math.prod(s.stop - s.start for s in within)
    for i, sl in enumerate(within):
        chunk, origin = template.shape[i], template.origin[i]
        lower, upper = sl.start - origin, sl.stop - origin
        size *= -(-upper // chunk) * chunk - lower // chunk * chunk
    return size
