"""Side-by-side checkpoint benchmark: ckpt_async vs Orbax, NumPy and safetensors.

    python benchmarks/run.py [--quick] [--repeats 3] [--dir DIR] [--update-docs]

Every measurement runs in a fresh subprocess (benchmarks/worker.py, one JSON line each);
implementations are interleaved (A B C D, then reordered) and each figure is the median of
the repeats. The physical limits (sequential write+fsync, cold sequential read, memcpy)
are measured in the same run, on the same filesystem, with the same byte counts.

Writes benchmarks/results/latest.json and latest.md; --update-docs also rewrites the
results section of docs/performance.md. Exits non-zero when any restore is not bit-exact
or any cell failed (the failures are in the report).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import workloads as wls

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMPLS = ["ckpt_async", "orbax", "numpy", "safetensors"]
INTERFERENCE_IMPLS = ["ckpt_async", "orbax"]
WORKLOADS = ["large", "large_bf16", "many_small", "mixed"]
MiB = 1 << 20

METRICS = [
    "block_s", "commit_s", "flush_after_s", "durable_s", "warm_restore_s", "cold_restore_s",
    "save_extra_rss_mib", "warm_restore_extra_rss_mib", "cold_restore_extra_rss_mib",
    "files", "bytes_on_disk", "budget_mib", "budget_save_extra_rss_mib", "budget_durable_s",
]
PHYS_METRICS = ["write_gbps", "read_gbps", "memcpy_gbps", "memcpy_s", "memcpy_fresh_gbps"]
INTERF_METRICS = ["interference", "step_base_ms", "step_during_ms", "steps_during", "commit_s",
                  "block_s"]
DOCS_BEGIN = "<!-- bench:begin -->"
DOCS_END = "<!-- bench:end -->"


# ----------------------------------------------------------------------------- running


def interleaved(names: list[str], rep: int) -> list[str]:
    """Repeat ``rep``'s order of ``names``: every ``stride``-th from a start, both changing
    with the repeat, so that no name always runs first or last and none always runs right
    after the same one. (A plain rotation kept the cycle: ckpt_async ran after the
    physical-limits worker in two repeats of three, and every slow full-mode repeat of round
    15 was there.)"""
    n = len(names)
    strides = [s for s in range(1, n) if math.gcd(s, n) == 1] or [1]
    stride = strides[rep % len(strides)]
    start = rep * 3 % n
    return [names[(start + i * stride) % n] for i in range(n)]


#: Imported once by the fork server, so that each worker, a fresh process forked from it,
#: starts in ~0.1 s rather than the ~1 s of importing jax and the libraries itself. Nothing
#: here starts a thread or a jax backend (a fork is safe).
PRELOAD = ["worker", "jax", "jax.numpy", "tensorstore", "ckpt_async", "orbax.checkpoint",
           "safetensors.numpy", "psutil"]


def worker_process(argv: list[str], out: str) -> None:
    """A worker's body in a process forked from the server: its stdout and stderr go to
    ``out``; it exits with the worker's status."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(REPO)
    import worker

    code = worker.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_server(spawn: bool) -> Any:
    """The fork server workers start from (None with ``spawn``: each worker is a new
    interpreter, as up to round 16)."""
    os.environ.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    if spawn:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_worker(impl: str, workload: str, mode: str, args: argparse.Namespace,
               work: Path) -> dict[str, Any]:
    argv = ["--impl", impl, "--workload", workload, "--mode", mode, "--dir", str(work)]
    if args.quick:
        argv.append("--quick")
    if args.workload_cache:
        argv += ["--workload-cache", str(args.workload_cache / workload)]
    t0 = time.perf_counter()
    if args.server is None:
        try:
            p = subprocess.run([sys.executable, str(HERE / "worker.py"), *argv],
                               capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            p = None
        output, code = (p.stdout + p.stderr, p.returncode) if p else ("", None)
    else:
        with tempfile.NamedTemporaryFile("r", prefix="worker_", suffix=".out") as out:
            proc = args.server.Process(target=worker_process, args=(argv, out.name))
            proc.start()
            proc.join(args.timeout)
            timed_out = proc.is_alive()
            if timed_out:
                proc.kill()
                proc.join()
            output, code = out.read(), None if timed_out else proc.exitcode
    if code is None:
        return {"impl": impl, "workload": workload, "mode": mode,
                "error": f"timeout after {args.timeout}s"}
    res: dict[str, Any] | None = None
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                res = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if res is None:
        tail = output.strip().splitlines()[-3:]
        res = {"impl": impl, "workload": workload, "mode": mode,
               "error": f"worker exited {code} without a result: {' | '.join(tail)}"}
    res["wall_s"] = time.perf_counter() - t0
    return res


def log_line(res: dict[str, Any]) -> str:
    name = f"{res['mode'][:6]:6} {res['workload']:11} {res['impl']:11}"
    if "error" in res:
        return f"{name} ERROR {res['error'][:150]}"
    if res["impl"] == "physical":
        return (f"{name} write {res['write_gbps']:.2f} GB/s  read {res['read_gbps']:.2f} GB/s  "
                f"memcpy {res['memcpy_gbps']:.1f} GB/s")
    if res["mode"] == "interference":
        return (f"{name} step {res.get('step_base_ms', 0):.1f} -> "
                f"{res.get('step_during_ms', float('nan')):.1f} ms "
                f"({res.get('steps_during', 0)} steps during commit)")
    bad = f"  MISMATCH {res['mismatch']}" if "mismatch" in res else ""
    return (f"{name} block {res['block_s'] * 1e3:8.1f} ms  durable {res['durable_s']:.3f} s  "
            f"warm {res['warm_restore_s']:.3f} s  cold {res['cold_restore_s']:.3f} s{bad}")


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r and "error" not in r]
    return statistics.median(vals) if vals else None


def aggregate(raw: list[dict[str, Any]]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for r in raw:
        key = f"{r['mode']}/{r['workload']}/{r['impl']}"
        cells.setdefault(key, []).append(r)
    out: dict[str, Any] = {}
    for key, runs in cells.items():
        mode, workload, impl = key.split("/")
        metrics = (PHYS_METRICS if impl == "physical"
                   else INTERF_METRICS if mode == "interference" else METRICS)
        agg: dict[str, Any] = {"mode": mode, "workload": workload, "impl": impl,
                               "runs": len(runs),
                               "ok_runs": sum("error" not in r for r in runs)}
        for k in ("bytes", "arrays", "api", "cold_method"):
            vals = [r[k] for r in runs if k in r]
            if vals:
                agg[k] = vals[0]
        for m in metrics:
            v = median(runs, m)
            if v is not None:
                agg[m] = v
        errors = sorted({r["error"] for r in runs if "error" in r})
        if errors:
            agg["errors"] = errors
        mismatches = sorted({r["mismatch"] for r in runs if "mismatch" in r})
        if mismatches:
            agg["mismatches"] = mismatches
        out[key] = agg
    return out


# ----------------------------------------------------------------------------- ratios


def ratios(cells: dict[str, Any], workloads: list[str], impls: list[str]) -> dict[str, Any]:
    """Per (workload, impl): each figure vs Orbax, vs the best other impl, vs physics."""
    out: dict[str, Any] = {}
    for wl in workloads:
        phys = cells.get(f"save_restore/{wl}/physical", {})
        for impl in impls:
            c = cells.get(f"save_restore/{wl}/{impl}")
            if not c or "durable_s" not in c:
                continue
            r: dict[str, Any] = {}
            nbytes = c["bytes"]
            for m in ("block_s", "durable_s", "warm_restore_s", "cold_restore_s",
                      "save_extra_rss_mib", "warm_restore_extra_rss_mib"):
                if m not in c:
                    continue
                o = cells.get(f"save_restore/{wl}/orbax", {}).get(m)
                peers = [cells.get(f"save_restore/{wl}/{p}", {}).get(m) for p in impls if p != impl]
                peers = [p for p in peers if p is not None]
                r[m] = {
                    "value": c[m],
                    "vs_orbax": c[m] / o if o else None,
                    "vs_best_peer": c[m] / min(peers) if peers and min(peers) > 0 else None,
                }
            if "write_gbps" in phys:
                r["durable_s"]["vs_limit"] = nbytes / c["durable_s"] / 1e9 / phys["write_gbps"]
            if "read_gbps" in phys and "cold_restore_s" in c:
                r["cold_restore_s"]["vs_limit"] = (nbytes / c["cold_restore_s"] / 1e9
                                                   / phys["read_gbps"])
            if "memcpy_gbps" in phys and "warm_restore_s" in r:
                r["warm_restore_s"]["vs_limit"] = (nbytes / c["warm_restore_s"] / 1e9
                                                   / phys["memcpy_gbps"])
            if "memcpy_s" in phys:
                budget = 1.2 * phys["memcpy_s"] + 20e-6 * c["arrays"]
                r["block_s"]["vs_limit"] = c["block_s"] / phys["memcpy_s"]
                r["block_s"]["budget_s"] = budget
            intf = cells.get(f"interference/{wl}/{impl}", {})
            if "interference" in intf:
                o = cells.get(f"interference/{wl}/orbax", {}).get("interference")
                r["interference"] = {"value": intf["interference"], "orbax": o}
            out[f"{wl}/{impl}"] = r
    return out


def targets(cells: dict[str, Any], rat: dict[str, Any], workloads: list[str]) -> list[dict]:
    """The performance issue's targets, checked for ckpt_async."""
    out = []

    def add(name: str, wl: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "workload": wl, "ok": ok, "detail": detail})

    for wl in workloads:
        r = rat.get(f"{wl}/ckpt_async")
        c = cells.get(f"save_restore/{wl}/ckpt_async", {})
        if not r:
            err = "; ".join(c.get("errors", ["no result"]))
            add("all", wl, False, f"ckpt_async failed: {err}")
            continue
        d = r["durable_s"]
        if wl in ("large", "large_bf16", "mixed") and "vs_limit" in d:
            add("durable commit >= 85% of write bw", wl, d["vs_limit"] >= 0.85,
                f"{d['vs_limit']:.0%} of write bw")
        if d.get("vs_best_peer") is not None:
            add("durable commit faster than fastest peer", wl, d["vs_best_peer"] < 1.0,
                f"{d['vs_best_peer']:.2f}x the fastest peer's time")
        cr = r.get("cold_restore_s", {})
        if wl in ("large", "large_bf16") and "vs_limit" in cr:
            add("cold restore >= 85% of read bw", wl, cr["vs_limit"] >= 0.85,
                f"{cr['vs_limit']:.0%} of cold read bw")
        if cr.get("vs_best_peer") is not None:
            add("cold restore faster than fastest peer", wl, cr["vs_best_peer"] < 1.0,
                f"{cr['vs_best_peer']:.2f}x the fastest peer's time")
        state_mib = c["bytes"] / 2**20
        for key, what in (("save_extra_rss_mib", "save"), ("warm_restore_extra_rss_mib",
                                                             "restore")):
            if key in c and state_mib > 0:
                ratio = c[key] / state_mib
                add(f"{what} +RSS <= 1.1x the state", wl, ratio <= 1.1,
                    f"{c[key]:.0f} MiB, {ratio:.2f}x the state")
        if "budget_save_extra_rss_mib" in c:
            extra, limit = c["budget_save_extra_rss_mib"], c["budget_mib"]
            add("save +RSS <= 1.1x a host-memory budget", wl, extra <= 1.1 * limit,
                f"{extra:.0f} MiB under a budget of {limit:.0f} MiB (NumPy leaves)")
        b = r["block_s"]
        if "budget_s" in b:
            add("blocking <= 1.2x memcpy + 20 us/array", wl, b["value"] <= b["budget_s"],
                f"{b['value'] * 1e3:.1f} ms vs budget {b['budget_s'] * 1e3:.1f} ms")
        if "interference" in r:
            v = r["interference"]["value"]
            add("interference <= 10%", wl, v <= 0.10, f"{v:+.0%} step time during commit")
    return out


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    versions = {}
    for mod in ("jax", "numpy", "orbax.checkpoint", "safetensors", "ckpt_async"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"unavailable ({type(e).__name__})"
    try:  # (which crc32 ckpt_async's checksums take: the fast extra's zlib-ng, else zlib)
        from ckpt_async import _crc

        versions["ckpt_async crc32"] = _crc.IMPLEMENTATION
    except Exception as e:  # noqa: BLE001
        versions["ckpt_async crc32"] = f"unavailable ({type(e).__name__})"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "versions": versions}


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout
        dev, fstype = out.splitlines()[1].split()[:2]
        return f"{fstype} on {dev}"
    except Exception:  # noqa: BLE001
        return "unknown"


def fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if v is None else format(v * scale, spec)


def render(report: dict[str, Any]) -> str:
    cells, rat = report["cells"], report["ratios"]
    L: list[str] = []
    m = report["machine"]
    L.append(f"Mode: **{'quick' if report['quick'] else 'full'}**, {report['repeats']} repeats "
             f"(medians), {report['date']}, {report['elapsed_s'] / 60:.1f} min; workloads "
             + ("generated once, read from /dev/shm by each worker.  " if
                report.get("workload_cache") else "generated by each worker.  "))
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, kernel {m['kernel']}, "
             f"Python {m['python']}; benchmark dir on {report['filesystem']}.  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".")
    L.append("")
    for wl in report["workloads"]:
        phys = cells.get(f"save_restore/{wl}/physical", {})
        any_c = next((cells[k] for k in cells if k.startswith(f"save_restore/{wl}/")
                      and "bytes" in cells[k]), {})
        nbytes, narr = any_c.get("bytes", 0), any_c.get("arrays", 0)
        L.append(f"### {wl}: {nbytes / MiB:.0f} MiB in {narr} arrays")
        L.append("")
        L.append(f"Limits: write+fsync {fmt(phys.get('write_gbps'), '.2f')} GB/s, cold read "
                 f"{fmt(phys.get('read_gbps'), '.2f')} GB/s, memcpy "
                 f"{fmt(phys.get('memcpy_gbps'), '.1f')} GB/s "
                 f"({fmt(phys.get('memcpy_s'), '.1f', 1e3)} ms for the workload), memcpy into "
                 f"fresh memory {fmt(phys.get('memcpy_fresh_gbps'), '.1f')} GB/s (page cache "
                 f"dropped with {phys.get('cold_method', '?')}).")
        L.append("")
        L.append("| impl | blocking ms | durable s | durable GB/s (% write bw) | vs Orbax | "
                 "vs best peer | warm restore s | cold restore s (% read bw) | cold vs Orbax | "
                 "save +RSS MiB | restore +RSS MiB | files | interference |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for impl in report["impls"]:
            c = cells.get(f"save_restore/{wl}/{impl}", {})
            r = rat.get(f"{wl}/{impl}")
            intf = cells.get(f"interference/{wl}/{impl}", {})
            istr = fmt(intf.get("interference"), "+.0%") if impl in INTERFERENCE_IMPLS else "n/a"
            if "interference" not in intf and intf.get("errors"):
                istr = "error"
            if r is None:
                err = "; ".join(c.get("errors", ["no result"]))
                L.append(f"| {impl} | **failed**: {err[:200].replace('|', '/')} |||||||||||| "
                         f"{istr} |")
                continue
            d, cr = r["durable_s"], r.get("cold_restore_s", {})
            gbps = nbytes / c["durable_s"] / 1e9
            L.append(
                f"| {impl}{' ⚠ MISMATCH' if c.get('mismatches') else ''} "
                f"| {c['block_s'] * 1e3:.1f} | {c['durable_s']:.3f} "
                f"| {gbps:.2f} ({fmt(d.get('vs_limit'), '.0%')}) "
                f"| {fmt(d.get('vs_orbax'), '.2f')}x | {fmt(d.get('vs_best_peer'), '.2f')}x "
                f"| {fmt(c.get('warm_restore_s'), '.3f')} "
                f"| {fmt(c.get('cold_restore_s'), '.3f')} ({fmt(cr.get('vs_limit'), '.0%')}) "
                f"| {fmt(cr.get('vs_orbax'), '.2f')}x "
                f"| {fmt(c.get('save_extra_rss_mib'), '.0f')} "
                f"| {fmt(c.get('warm_restore_extra_rss_mib'), '.0f')} "
                f"| {fmt(c.get('files'), '.0f')} | {istr} |")
        L.append("")
    L.append("Time ratios (`vs Orbax`, `vs best peer`) are this impl's time over the other's: "
             "below 1.00x is faster. `durable` = save() + wait_until_finished() + an fsync "
             "of every file written (which costs ~0 when the library already made it durable). "
             "`+RSS` is peak RSS above the pre-call baseline; restore includes the restored "
             "tree itself (1x the workload). Interference: mean train-step time while the "
             "background commit runs vs without (a ~25 ms jitted matmul step + Python work).")
    L.append("")
    L.append("#### ckpt_async against the targets")
    L.append("")
    L.append("| target | workload | met | measured |")
    L.append("|---|---|---|---|")
    for t in report["targets"]:
        ok = "yes" if t["ok"] else "**no**"
        L.append(f"| {t['target']} | {t['workload']} | {ok} | {t['detail']} |")
    L.append("")
    fails = report["failures"]
    if fails:
        L.append("#### Failures")
        L.append("")
        for f in fails:
            L.append(f"- {f}")
        L.append("")
    return "\n".join(L)


def update_docs(md: str, cmd: str) -> None:
    path = REPO / "docs" / "performance.md"
    block = f"{DOCS_BEGIN}\n\nCommand: `{cmd}`\n\n{md}\n{DOCS_END}"
    if path.exists() and DOCS_BEGIN in path.read_text():
        text = path.read_text()
        head, rest = text.split(DOCS_BEGIN, 1)
        tail = rest.split(DOCS_END, 1)[1] if DOCS_END in rest else ""
        path.write_text(head + block + tail)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Performance\n\n{block}\n")
    print(f"updated {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="scaled-down workloads (minutes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="benchmark scratch dir (default: a tempdir under /tmp)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--no-interference", action="store_true")
    p.add_argument("--timeout", type=float, help="per-worker timeout, s")
    p.add_argument("--spawn", action="store_true",
                   help="start each worker as a new interpreter rather than forking it from a "
                   "server that has imported jax and the libraries (slower; same figures)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--update-docs", action="store_true",
                   help="rewrite the results section of docs/performance.md")
    args = p.parse_args(argv)
    args.timeout = args.timeout or (300.0 if args.quick else 1800.0)
    workloads = args.workloads.split(",")
    impls = args.impls.split(",")

    made_tmp = args.dir is None
    scratch = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir="/tmp") if made_tmp else args.dir)
    scratch.mkdir(parents=True, exist_ok=True)
    work = scratch / f"run_{os.getpid()}"
    raw: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    args.workload_cache = wls.cache_directory(workloads, args.quick)
    args.server = start_server(args.spawn)
    try:
        if args.workload_cache:
            for wl in workloads:
                wls.write_cache(wl, args.quick, args.workload_cache / wl)
            print(f"[{time.perf_counter() - t_start:6.0f}s] workloads written to "
                  f"{args.workload_cache}", flush=True)
        for rep in range(args.repeats):
            for wl in workloads:
                order = interleaved(["physical", *impls], rep)
                jobs = [(i, "save_restore") for i in order]
                if not args.no_interference:
                    iorder = [i for i in INTERFERENCE_IMPLS if i in impls]
                    if rep % 2:
                        iorder.reverse()
                    jobs += [(i, "interference") for i in iorder]
                for impl, mode in jobs:
                    res = run_worker(impl, wl, mode, args, work)
                    res["repeat"] = rep
                    raw.append(res)
                    print(f"[{time.perf_counter() - t_start:6.0f}s r{rep}] {log_line(res)}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.workload_cache:
            shutil.rmtree(args.workload_cache, ignore_errors=True)
        if made_tmp:
            shutil.rmtree(scratch, ignore_errors=True)

    cells = aggregate(raw)
    rat = ratios(cells, workloads, impls)
    failures = []
    for key, c in sorted(cells.items()):
        for e in c.get("errors", []):
            failures.append(f"{key}: {e}")
        for mm in c.get("mismatches", []):
            failures.append(f"{key}: NOT BIT-EXACT: {mm}")
    cmd = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    report = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": cmd,
        "quick": args.quick,
        "repeats": args.repeats,
        "workloads": workloads,
        "impls": impls,
        "machine": machine(),
        "filesystem": filesystem(scratch if scratch.exists() else Path("/tmp")),
        "elapsed_s": time.perf_counter() - t_start,
        "workload_cache": str(args.workload_cache) if args.workload_cache else None,
        "cells": cells,
        "ratios": rat,
        "targets": targets(cells, rat, workloads),
        "failures": failures,
        "raw": raw,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    md = render(report)
    (out / "latest.md").write_text(md + "\n")
    print()
    print(md)
    print(f"\nwrote {out / 'latest.json'} and {out / 'latest.md'} "
          f"({report['elapsed_s']:.0f} s)")
    if args.update_docs:
        update_docs(md, cmd)
    mismatched = any("NOT BIT-EXACT" in f for f in failures)
    if mismatched:
        print("FAILED: a restore was not bit-exact", file=sys.stderr)
        return 1
    if failures:
        print(f"FAILED: {len(failures)} failing cell(s), see the report", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
