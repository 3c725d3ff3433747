"""Deterministic, weight-like benchmark workloads (seeded normal * 0.02).

Each workload is a nested dict of NumPy arrays; the worker turns it into jax arrays for
the checkpoint libraries. Sizes come in a full and a ``quick`` (scaled-down) flavour.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

MiB = 1 << 20
BF16 = np.dtype(ml_dtypes.bfloat16)


def _normal(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(0.02)
    if np.dtype(dtype) != np.float32:
        a = a.astype(dtype)
    return a


def _flat_arrays(prefix: str, total_bytes: int, count: int, dtype: Any) -> dict[str, Any]:
    itemsize = np.dtype(dtype).itemsize
    n = total_bytes // count // itemsize
    # 2-D shapes, like real weight matrices.
    cols = 1024 if n % 1024 == 0 and n >= 1024 else n
    shape = (n // cols, cols)
    return {f"{prefix}{i:05d}": _normal(f"{prefix}{i}", shape, dtype) for i in range(count)}


def large(quick: bool) -> dict[str, Any]:
    total, count = (256 * MiB, 16) if quick else (2048 * MiB, 16)
    return {"w": _flat_arrays("large_", total, count, np.float32)}


def large_bf16(quick: bool) -> dict[str, Any]:
    total, count = (256 * MiB, 16) if quick else (2048 * MiB, 16)
    return {"w": _flat_arrays("large_bf16_", total, count, BF16)}


def many_small(quick: bool) -> dict[str, Any]:
    total, count = (32 * MiB, 512) if quick else (256 * MiB, 4096)
    return {"w": _flat_arrays("small_", total, count, np.float32)}


def _transformer_params(layers: int, d: int, vocab: int, max_len: int, dtype: Any,
                        tag: str) -> dict[str, Any]:
    def p(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return _normal(f"{tag}/{name}", shape, dtype)

    params: dict[str, Any] = {
        "embed": {"embedding": p("embed", (vocab, d))},
        "pos_embed": {"embedding": p("pos", (max_len, d))},
        "final_ln": {"scale": p("fln_s", (d,)), "bias": p("fln_b", (d,))},
    }
    for i in range(layers):
        layer: dict[str, Any] = {}
        for proj in ("q", "k", "v", "o"):
            layer[proj] = {"kernel": p(f"l{i}/{proj}/k", (d, d)), "bias": p(f"l{i}/{proj}/b", (d,))}
        layer["ln1"] = {"scale": p(f"l{i}/ln1/s", (d,)), "bias": p(f"l{i}/ln1/b", (d,))}
        layer["ln2"] = {"scale": p(f"l{i}/ln2/s", (d,)), "bias": p(f"l{i}/ln2/b", (d,))}
        layer["mlp_in"] = {"kernel": p(f"l{i}/mi/k", (d, 4 * d)), "bias": p(f"l{i}/mi/b", (4 * d,))}
        layer["mlp_out"] = {"kernel": p(f"l{i}/mo/k", (4 * d, d)), "bias": p(f"l{i}/mo/b", (d,))}
        params[f"layer_{i:02d}"] = layer
    return params


def mixed(quick: bool) -> dict[str, Any]:
    """Transformer train state: f32 params + two bf16 Adam moments (+ a step counter)."""
    layers, d, vocab, max_len = (6, 512, 8192, 512) if quick else (24, 768, 32768, 1024)
    return {
        "step": np.asarray(1000, dtype=np.int32),
        "params": _transformer_params(layers, d, vocab, max_len, np.float32, "p"),
        "opt_state": {
            "mu": _transformer_params(layers, d, vocab, max_len, BF16, "mu"),
            "nu": _transformer_params(layers, d, vocab, max_len, BF16, "nu"),
        },
    }


WORKLOADS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "large": large,
    "large_bf16": large_bf16,
    "many_small": many_small,
    "mixed": mixed,
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}, in sorted key order."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k in sorted(tree):
            out.update(flatten(tree[k], f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


# ----------------------------------------------------------------------------- cache
# Generating a workload's values takes longer than most measurements of it (quick
# ``large_bf16``: 1.4 s per worker), so a run makes each workload once, in memory-backed
# /dev/shm, and every worker reads its arrays from there into fresh memory, as generating them
# would have left them.

_INDEX = "index.json"
#: Each workload's size, quick and full, in MiB (rounded up).
_SIZES_MIB = {"large": (256, 2048), "large_bf16": (256, 2048), "many_small": (32, 256),
              "mixed": (179, 1496)}
_DATA = "data.bin"


def write_cache(workload: str, quick: bool, directory: Path) -> None:
    """Generates ``workload`` and writes its flat arrays to ``directory``."""
    flat = flatten(WORKLOADS[workload](quick))
    directory.mkdir(parents=True)
    with open(directory / _DATA, "wb") as f:
        for a in flat.values():
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    index = [(name, str(a.dtype), list(a.shape)) for name, a in flat.items()]
    (directory / _INDEX).write_text(json.dumps(index))


def read_cache(directory: Path) -> dict[str, np.ndarray]:
    """The flat arrays :func:`write_cache` wrote, each read into an array of its own."""
    out: dict[str, np.ndarray] = {}
    with open(directory / _DATA, "rb", buffering=0) as f:
        for name, dtype, shape in json.loads((directory / _INDEX).read_text()):
            a = np.empty(shape, BF16 if dtype == "bfloat16" else np.dtype(dtype))
            view = a.reshape(-1).view(np.uint8).data
            if f.readinto(view) != len(view):
                raise OSError(f"{directory / _DATA}: short read for {name}")
            out[name] = a
    return out


def cache_directory(workloads: list[str], quick: bool, root: str = "/dev/shm"
                    ) -> Path | None:
    """Where to cache the workloads: a fresh folder in ``root`` when it is there and the
    cache takes at most a quarter of the memory available and of ``root``'s free space;
    None (every worker generates its workload) otherwise."""
    if not os.path.isdir(root):
        return None
    need = sum(_SIZES_MIB[wl][0 if quick else 1] for wl in workloads) * MiB
    st = os.statvfs(root)
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    if 4 * need > min(available, st.f_bavail * st.f_frsize):
        return None
    return Path(root) / f"ckpt_bench_workloads_{os.getpid()}"

