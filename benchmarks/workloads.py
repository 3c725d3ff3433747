"""Deterministic, weight-like benchmark workloads (seeded normal * 0.02).

Each workload is a nested dict of NumPy arrays; the worker turns it into jax arrays for
the checkpoint libraries. Sizes come in a full and a ``quick`` (scaled-down) flavour.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
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
