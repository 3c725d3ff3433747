"""Device-to-host overlap on an accelerator: a save of arrays that live on a GPU (or TPU),
ckpt_async and Orbax side by side, against the machine's own limits measured in the same run.

    python benchmarks/device_overlap.py [--large-mib 4096] [--mixed full|quick|none]
        [--repeats 3] [--impls ckpt_async,orbax] [--dir DIR] [--out results.json]

A save of device arrays has two transfers to make: device to host (D2H), then host to disk.
ckpt_async starts every array's D2H copy at once and hands each batch of arrays to a writer as
soon as it reaches the host, so the disk is busy while the later arrays are still coming over.
This script measures, per workload:

- the limits: D2H of the whole state alone (``copy_to_host_async`` on every array, then each
  one read), a sequential write + fsync of the same bytes alone, a cold sequential read, and
  host-to-device (H2D) of the state;
- per implementation (interleaved, fresh device arrays for every save, so no host copy jax
  cached earlier is reused): blocking time (until ``save()`` returns: the state is then on the
  host), durable time (``save()`` + ``wait_until_finished()`` + an fsync of every file), and a
  cold restore into a target tree placed on the device (every array checked bit-exact there);
- for ckpt_async, the timeline: when each array reached the host (the staging thread) and how
  many bytes had been written by then (the library's progress events), giving the share of
  the state already written when the last array reached the host, and the overlap
  efficiency ``(d2h + write - durable) / min(d2h, write)``: 1 when the shorter transfer is
  hidden entirely under the longer, 0 when they run one after the other.

On a CPU-only machine the script runs too (its arrays are host-resident, so there is no D2H
to overlap: the figures only check the script). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import flatten, unflatten  # noqa: E402

MiB = 1 << 20
CHUNK = 8 * MiB


# ----------------------------------------------------------------------------- the state


def shapes(workload: str, large_mib: int, mixed: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"a.b.c": (shape, dtype name)} of a workload: ``large`` float32 arrays of 128 MiB (or
    fewer bytes each when the state is smaller), ``mixed`` the benchmark suite's transformer
    train state (float32 params and two bfloat16 Adam moments)."""
    if workload == "large":
        count = max(1, large_mib // 128)
        cols = 1024
        rows = large_mib * MiB // count // 4 // cols
        return {f"w.large_{i:05d}": ((rows, cols), "float32") for i in range(count)}
    layers, d, vocab, max_len = (6, 512, 8192, 512) if mixed == "quick" else (24, 768, 32768, 1024)
    out: dict[str, tuple[tuple[int, ...], str]] = {"step": ((), "int32")}
    for part, dtype in (("params", "float32"), ("opt_state.mu", "bfloat16"),
                        ("opt_state.nu", "bfloat16")):
        out[f"{part}.embed.embedding"] = ((vocab, d), dtype)
        out[f"{part}.pos_embed.embedding"] = ((max_len, d), dtype)
        out[f"{part}.final_ln.scale"] = ((d,), dtype)
        out[f"{part}.final_ln.bias"] = ((d,), dtype)
        for i in range(layers):
            p = f"{part}.layer_{i:02d}"
            for proj in ("q", "k", "v", "o"):
                out[f"{p}.{proj}.kernel"] = ((d, d), dtype)
                out[f"{p}.{proj}.bias"] = ((d,), dtype)
            for ln in ("ln1", "ln2"):
                out[f"{p}.{ln}.scale"] = ((d,), dtype)
                out[f"{p}.{ln}.bias"] = ((d,), dtype)
            out[f"{p}.mlp_in.kernel"] = ((d, 4 * d), dtype)
            out[f"{p}.mlp_in.bias"] = ((4 * d,), dtype)
            out[f"{p}.mlp_out.kernel"] = ((4 * d, d), dtype)
            out[f"{p}.mlp_out.bias"] = ((d,), dtype)
    return out


class State:
    """Makes the workload's arrays on the device, the same values every time (seeded per
    array), each time in fresh device buffers, and checks a restored tree bit-exactly."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], str]], device: Any) -> None:
        import jax
        import jax.numpy as jnp

        self.spec = spec
        self.device = device
        self.sharding = jax.sharding.SingleDeviceSharding(device)
        self.nbytes = sum(jnp.dtype(dt).itemsize * math.prod(shape) for shape, dt in spec.values())

        def make(key: Any, shape: tuple[int, ...], dtype: str) -> Any:
            if dtype == "int32":
                return jax.random.randint(key, shape, 0, 1 << 30, dtype=jnp.int32)
            return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

        self._make = jax.jit(make, static_argnums=(1, 2), out_shardings=self.sharding)

        def same_bits(a: Any, b: Any) -> Any:
            if a.dtype != b.dtype or a.shape != b.shape:
                return jnp.bool_(False)
            width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[a.dtype.itemsize]
            return jnp.array_equal(jax.lax.bitcast_convert_type(a, width),
                                   jax.lax.bitcast_convert_type(b, width))

        self._same = jax.jit(same_bits)

    def fresh(self) -> dict[str, Any]:
        import jax

        flat = {name: self._make(jax.random.key(i), shape, dt)
                for i, (name, (shape, dt)) in enumerate(self.spec.items())}
        return unflatten(jax.block_until_ready(flat))

    def abstract(self) -> dict[str, Any]:
        import jax

        return unflatten({name: jax.ShapeDtypeStruct(shape, dt, sharding=self.sharding)
                     for name, (shape, dt) in self.spec.items()})

    def check(self, restored: Any) -> str | None:
        """None when every array is bit-exact and on the device, else what differs first."""
        got = flatten(restored)
        if set(got) != set(self.spec):
            return f"keys differ: {sorted(set(self.spec) ^ set(got))[:3]}"
        want = flatten(self.fresh())
        for name in self.spec:
            g = got[name]
            if getattr(g, "devices", lambda: set())() != {self.device}:
                return f"{name}: restored on {getattr(g, 'devices', lambda: '?')()}"
            if not bool(self._same(g, want[name])):
                return f"{name}: values differ"
        return None


# ----------------------------------------------------------------------------- limits


def limits(state: State, root: Path) -> dict[str, Any]:
    """D2H, write + fsync, cold read and H2D of the state's bytes, each alone."""
    import jax
    import numpy as np
    from worker import disk_limits

    out: dict[str, Any] = {}
    flat = list(flatten(state.fresh()).values())
    # How much a Python thread gets done while this one waits for the transfers (against
    # the same time asleep): near 1 when the wait lets go of the GIL.
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    probe = threading.Thread(target=spin, daemon=True)
    probe.start()
    t0 = time.perf_counter()
    for a in flat:
        a.copy_to_host_async()
    host = [np.asarray(a) for a in flat]
    out["d2h_s"] = time.perf_counter() - t0
    during = count[0]
    time.sleep(out["d2h_s"])
    out["gil_free_during_d2h"] = during / max(1, count[0] - during)
    stop.set()
    probe.join()
    del flat
    pinned_to = state.sharding.with_memory_kind("pinned_host")
    flat = list(flatten(state.fresh()).values())
    t0 = time.perf_counter()
    moved = jax.device_put(flat, [pinned_to] * len(flat))
    pinned_host = [np.asarray(a) for a in moved]
    out["d2h_pinned_s"] = time.perf_counter() - t0
    out["pinned_asarray_is_a_view"] = bool(
        pinned_host[0].__array_interface__["data"][0] == moved[0].unsafe_buffer_pointer())
    del flat, moved, pinned_host
    t0 = time.perf_counter()
    back = jax.block_until_ready(jax.device_put(host, state.sharding))
    out["h2d_s"] = time.perf_counter() - t0
    del back
    out.update(h2d_variants(host, state.sharding, pinned_to))
    del host
    gc.collect()

    out.update(disk_limits(root, state.nbytes))
    return out


def h2d_variants(host: list[Any], sharding: Any, pinned_to: Any) -> dict[str, float]:
    """Other ways to bring host arrays to the device, for a restore to choose from: the same
    pageable copy again (is the first one's cost a one-time one?), through pinned host memory
    (two hops), and in pieces of at most 16 MiB joined on the device."""
    import jax
    import jax.numpy as jnp

    out = {}
    t0 = time.perf_counter()
    jax.block_until_ready(jax.device_put(host, sharding))
    out["h2d_again_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pinned = jax.device_put(host, [pinned_to] * len(host))
    jax.block_until_ready(jax.device_put(pinned, [sharding] * len(host)))
    out["h2d_via_pinned_s"] = time.perf_counter() - t0
    del pinned
    join = jax.jit(lambda parts: jnp.concatenate(parts, axis=0))
    t0 = time.perf_counter()
    done = []
    for a in host:
        rows = max(1, (16 * MiB) // max(1, a[:1].nbytes)) if a.ndim else 0
        if a.ndim == 0 or a.shape[0] <= rows:
            done.append(jax.device_put(a, sharding))
            continue
        parts = jax.device_put([a[i:i + rows] for i in range(0, a.shape[0], rows)],
                               [sharding] * -(-a.shape[0] // rows))
        done.append(join(parts))
    jax.block_until_ready(done)
    out["h2d_in_pieces_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- saves


class Timeline:
    """For ckpt_async: when each array reached the host (its staging thread's host copies)
    and how many bytes were written when (its progress events), relative to ``t0``."""

    def __init__(self) -> None:
        self.staged: list[tuple[float, int]] = []
        self.write_starts: list[float] = []
        self.written: list[tuple[float, int]] = []
        self.t0 = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> Timeline:
        import ckpt_async
        from ckpt_async import _stage

        self._orig = _stage.host_copy

        def timed_host_copy(*args: Any, **kwargs: Any) -> Any:
            out = self._orig(*args, **kwargs)
            with self._lock:
                self.staged.append((time.perf_counter() - self.t0, out.nbytes))
            return out

        _stage.host_copy = timed_host_copy
        from ckpt_async import _serialize

        self._orig_write = orig_write = _serialize.ItemWriter.write
        starts = self.write_starts

        async def timed_write(writer: Any, batch: Any) -> Any:
            starts.append(time.perf_counter() - self.t0)
            return await orig_write(writer, batch)

        _serialize.ItemWriter.write = timed_write  # type: ignore[method-assign]
        self._progress = ckpt_async.progress(self._on_progress)
        self._progress.__enter__()
        return self

    def _on_progress(self, ev: Any) -> None:
        if ev.kind == "save":
            self.written.append((time.perf_counter() - self.t0, ev.done_bytes))

    def __exit__(self, *exc: Any) -> None:
        from ckpt_async import _serialize, _stage

        _stage.host_copy = self._orig
        _serialize.ItemWriter.write = self._orig_write  # type: ignore[method-assign]
        self._progress.__exit__(*exc)

    def summary(self, nbytes: int) -> dict[str, Any]:
        if not self.staged:
            return {}
        staged_end = max(t for t, _ in self.staged)
        before = [b for t, b in self.written if t <= staged_end]
        return {
            "first_on_host_s": min(t for t, _ in self.staged),
            "all_on_host_s": staged_end,
            "first_write_started_s": min(self.write_starts, default=None),
            "first_written_s": min((t for t, _ in self.written), default=None),
            "all_written_s": max((t for t, _ in self.written), default=None),
            "written_when_all_on_host": (max(before) / nbytes) if before else 0.0,
        }


#: ckpt_async_budget's host-memory budget, bytes (--budget-mib).
BUDGET_BYTES = 512 * MiB


def make_manager(impl: str, root: Path) -> Any:
    if impl.startswith("ckpt_async"):
        import ckpt_async as ocp
        from ckpt_async import _stage

        # ckpt_async_pageable: the plain copy_to_host_async path, for comparison.
        _stage.PINNED_HOST_TRANSFER = impl != "ckpt_async_pageable"
        if impl == "ckpt_async_budget":
            handler = ocp.StandardCheckpointHandler(host_memory_budget_bytes=BUDGET_BYTES)
            return ocp, ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(),
                                              item_handlers=handler)
    else:
        import orbax.checkpoint as ocp
    return ocp, ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions())


def one_save_restore(impl: str, state: State, root: Path) -> dict[str, Any]:
    """A save of fresh device arrays and a cold restore onto the device, in this process."""
    from worker import RssSampler, drop_cache, fsync_tree

    res: dict[str, Any] = {"impl": impl}
    shutil.rmtree(root, ignore_errors=True)
    ocp, mgr = make_manager(impl, root)
    tree = state.fresh()
    gc.collect()
    timeline = Timeline() if impl.startswith("ckpt_async") else None
    rss = RssSampler()
    try:
        if timeline is not None:
            timeline.__enter__()
        with rss:
            t0 = time.perf_counter()
            if timeline is not None:
                timeline.t0 = t0
            mgr.save(1, args=ocp.args.StandardSave(tree))
            res["blocking_s"] = time.perf_counter() - t0
            mgr.wait_until_finished()
            fsync_tree(root)
            res["durable_s"] = time.perf_counter() - t0
    finally:
        if timeline is not None:
            timeline.__exit__(None, None, None)
    res["save_rss_mib"] = rss.extra_mib
    if timeline is not None:
        res["timeline"] = timeline.summary(state.nbytes)
    del tree
    mgr.close()
    gc.collect()
    res["cold_method"] = drop_cache(root)
    ocp, mgr = make_manager(impl, root)
    t0 = time.perf_counter()
    restored = mgr.restore(1, args=ocp.args.StandardRestore(state.abstract()))
    import jax

    jax.block_until_ready(restored)
    res["restore_s"] = time.perf_counter() - t0
    res["mismatch"] = state.check(restored)
    mgr.close()
    del restored
    gc.collect()
    shutil.rmtree(root, ignore_errors=True)
    return res


def warm_up(impl: str, device: Any, root: Path) -> None:
    """A tiny save and restore: one-time initialisation is not timed."""
    tiny = State({"a": ((256,), "float32"), "b": ((4, 8), "bfloat16")}, device)
    one_save_restore(impl, tiny, root)


# ----------------------------------------------------------------------------- report


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def report(results: dict[str, Any]) -> str:
    lines = [f"Device: {results['device']}; jax {results['jax']}; "
             f"orbax-checkpoint {results.get('orbax_version', 'n/a')}; "
             f"{results['repeats']} repeats (medians).", ""]
    for wl, w in results["workloads"].items():
        lim = w["limits"]
        gb = w["bytes"] / 1e9
        lines += [
            f"### {wl}: {w['bytes'] / MiB:,.0f} MiB in {w['arrays']} arrays",
            "",
            f"Limits, each alone: D2H {lim['d2h_s']:.3f} s ({gb / lim['d2h_s']:.1f} GB/s), "
            f"write + fsync {lim['write_s']:.3f} s ({gb / lim['write_s']:.2f} GB/s), "
            f"cold read {lim['read_s']:.3f} s ({gb / lim['read_s']:.2f} GB/s, "
            f"{lim['cold_method']}), H2D {lim['h2d_s']:.3f} s ({gb / lim['h2d_s']:.1f} GB/s); "
            f"D2H through pinned host memory {lim['d2h_pinned_s']:.3f} s "
            f"({gb / lim['d2h_pinned_s']:.1f} GB/s; np.asarray of a pinned array "
            f"{'is a view' if lim['pinned_asarray_is_a_view'] else 'copies'}); a Python thread "
            f"ran at {lim['gil_free_during_d2h']:.0%} of its speed while another waited for "
            f"the pageable D2H. "
            + (f"H2D again {lim['h2d_again_s']:.3f} s, through pinned host memory "
               f"{lim['h2d_via_pinned_s']:.3f} s, in pieces of 16 MiB "
               f"{lim['h2d_in_pieces_s']:.3f} s. " if "h2d_again_s" in lim else "") +
            f"D2H then write, one after the other: {lim['d2h_s'] + lim['write_s']:.3f} s; "
            f"the longer alone: {max(lim['d2h_s'], lim['write_s']):.3f} s.",
            "",
            "| impl | blocking s | durable s | durable vs D2H + write | durable vs the longer "
            "| overlap efficiency | first write starts / all on host s "
            "| written when all on host | save +RSS MiB | cold restore s | restore vs read + H2D "
            "| bit-exact |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        serial = lim["d2h_s"] + lim["write_s"]
        for impl, cell in w["impls"].items():
            if "error" in cell:
                lines.append(f"| {impl} | error: {cell['error'][:80]} |" + " |" * 10)
                continue
            d = cell["durable_s"]
            eff = (serial - d) / min(lim["d2h_s"], lim["write_s"])
            written = cell.get("written_when_all_on_host")
            starts = ("" if cell.get("first_write_started_s") is None else
                      f"{cell['first_write_started_s']:.3f} / {cell['all_on_host_s']:.3f}")
            lines.append(
                f"| {impl} | {cell['blocking_s']:.3f} "
                f"({cell['blocking_s'] / lim['d2h_s']:.2f}x D2H) | {d:.3f} | {d / serial:.2f}x "
                f"| {d / max(lim['d2h_s'], lim['write_s']):.2f}x | {eff:.2f} | {starts} "
                f"| {'' if written is None else f'{written:.0%}'} | {cell['save_rss_mib']:.0f} "
                f"| {cell['restore_s']:.3f} "
                f"| {cell['restore_s'] / (lim['read_s'] + lim['h2d_s']):.2f}x "
                f"| {'yes' if cell['exact'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large-mib", type=int, default=4096)
    ap.add_argument("--mixed", choices=("full", "quick", "none"), default="full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default="ckpt_async,ckpt_async_pageable,orbax",
                    help="ckpt_async_pageable: ckpt_async without pinned host transfers; "
                         "ckpt_async_budget: under a host-memory budget (--budget-mib)")
    ap.add_argument("--limits-after", action="store_true",
                    help="measure the limits after the saves: the first save is then the "
                         "process's first large transfer, as a trainer's first checkpoint is")
    ap.add_argument("--budget-mib", type=int, default=512,
                    help="host-memory budget of the ckpt_async_budget impl")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax

    global BUDGET_BYTES
    BUDGET_BYTES = args.budget_mib * MiB
    device = jax.devices()[0]
    impls = args.impls.split(",")
    work = Path(args.dir or tempfile.mkdtemp(prefix="device_overlap_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__,
        "repeats": args.repeats, "workloads": {}, "cpus": os.cpu_count()}
    if "orbax" in impls:
        try:
            import orbax.checkpoint as ocp_orbax
            results["orbax_version"] = ocp_orbax.__version__
        except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
            results["orbax_version"] = f"not importable: {exc!r}"
            impls.remove("orbax")
    for impl in list(impls):
        try:
            warm_up(impl, device, work / f"warm_{impl}")
        except Exception as exc:  # noqa: BLE001 - reported, the other impl still runs
            traceback.print_exc()
            results.setdefault("warm_up_errors", {})[impl] = repr(exc)
            impls.remove(impl)
    workloads = ["large"] + ([] if args.mixed == "none" else ["mixed"])
    failed = False
    for wl in workloads:
        state = State(shapes(wl, args.large_mib, args.mixed), device)
        entry: dict[str, Any] = {"bytes": state.nbytes, "arrays": len(state.spec), "runs": []}
        if not args.limits_after:
            entry["limits"] = limits(state, work / "limits")
            print(f"{wl}: limits {entry['limits']}", flush=True)
        for rep in range(args.repeats):
            order = impls if rep % 2 == 0 else impls[::-1]
            for impl in order:
                try:
                    run = one_save_restore(impl, state, work / f"{wl}_{impl}")
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    traceback.print_exc()
                    run = {"impl": impl, "error": repr(exc)}
                print(f"{wl} {impl} #{rep}: {json.dumps(run)}", flush=True)
                entry["runs"].append(run)
                results["workloads"][wl] = entry
                if args.out:  # what is done so far survives a run cut short
                    Path(args.out).write_text(json.dumps(results, indent=1))
        if args.limits_after:
            entry["limits"] = limits(state, work / "limits")
            print(f"{wl}: limits {entry['limits']}", flush=True)
        entry["impls"] = {}
        for impl in impls:
            runs = [r for r in entry["runs"] if r["impl"] == impl]
            ok = [r for r in runs if "error" not in r]
            if not ok:
                entry["impls"][impl] = {"error": runs[0]["error"]}
                failed = True
                continue
            cell = {k: med(ok, k) for k in ("blocking_s", "durable_s", "restore_s",
                                            "save_rss_mib")}
            cell["exact"] = all(r["mismatch"] is None for r in ok)
            failed |= not cell["exact"]
            if impl.startswith("ckpt_async"):
                tl = [r["timeline"] for r in ok if r.get("timeline")]
                for k in ("first_on_host_s", "all_on_host_s", "first_write_started_s",
                          "first_written_s",
                          "all_written_s", "written_when_all_on_host"):
                    cell[k] = med(tl, k)
            entry["impls"][impl] = cell
        results["workloads"][wl] = entry
    shutil.rmtree(work, ignore_errors=True)
    md = report(results)
    print(md)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        Path(args.out).with_suffix(".md").write_text(md + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
