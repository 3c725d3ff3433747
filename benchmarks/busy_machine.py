"""A checkpoint the trainer waits for while other processes keep every core busy.

    python benchmarks/busy_machine.py [--busy N] [--workloads mixed,many_small] [--full]
        [--repeats 3] [--impls ckpt_async,ckpt_async_lowered,orbax] [--budget-mib M]
        [--dir DIR] [--out FILE]

A training job's input pipeline often runs in processes of its own (data loader workers) that
keep the machine's cores busy while the trainer waits for a checkpoint: at the end of a run,
before an evaluation, or in ``save()`` when ``max_concurrent_saves`` commits are in flight.
ckpt_async runs a commit's work at ``SCHED_IDLE`` so that it does not slow the training
loop; that must not leave the trainer waiting behind processes that take every core.

Each measurement is a fresh process (``--child``): it builds the workload as jax arrays,
warms the library up, starts ``N`` busy processes (``while True: pass``, at the normal
priority; N defaults to the number of usable CPUs), then times ``save()`` +
``wait_until_finished()`` (the durable commit) with them running, stops them, and restores
the checkpoint into an abstract target, checked bit-exact. The same save is also timed with
no busy process (``quiet``), in the same process, before. Implementations are interleaved
(a different order each repeat); figures are medians.

- ``ckpt_async``: as shipped. The thread that saved waits, so the commit is boosted until it
  is done (``Runtime.boost``): its threads run at the normal priority where the process may
  raise a thread's priority (root, ``CAP_SYS_NICE`` or ``RLIMIT_NICE``), and elsewhere its
  work moves to threads that were never lowered (run the script under
  ``capsh --drop=cap_sys_nice --`` to see that case as root).
- ``ckpt_async_lowered``: the same with the boost switched off, i.e. the commit stays at the
  background priority (ckpt_async before round 29). Each child gives up after
  ``--timeout`` seconds (a commit at ``SCHED_IDLE`` behind busy processes may wait that long).
- ``orbax``: orbax-checkpoint's ``CheckpointManager`` with its defaults.

``--budget-mib M``: ckpt_async saves under a host-memory budget of ``M`` MiB
(``StandardCheckpointHandler(host_memory_budget_bytes=...)``), so that ``save()`` itself waits
for the commit's first writes; the table then also gives the time until ``save()`` returned.
Orbax keeps its defaults (its ``save_concurrent_gb`` counts whole GB).

Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker import (  # noqa: E402
    abstract_of,
    block,
    build_tree,
    check_exact,
    interleaved,
    make_impl,
    median_of,
    run_child,
    side_main,
    side_parser,
    warm_up,
)

IMPLS = ("ckpt_async", "ckpt_async_lowered", "orbax")


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _durable(impl_name: str, tree: Any, root: Path, budget_mib: int | None
             ) -> tuple[float, float]:
    """Seconds until ``save()`` returned and until the commit was durable."""
    impl = make_impl("orbax" if impl_name == "orbax" else "ckpt_async", root)
    if budget_mib and impl_name != "orbax":
        import ckpt_async as ocp

        impl.close()
        impl.mgr = ocp.CheckpointManager(  # type: ignore[attr-defined]
            root, item_handlers=ocp.StandardCheckpointHandler(
                host_memory_budget_bytes=budget_mib << 20))
    start = time.perf_counter()
    impl.save(tree)
    returned = time.perf_counter() - start
    impl.wait()
    took = time.perf_counter() - start
    impl.close()
    return returned, took


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (runs in a fresh process)."""
    work = Path(args.dir)
    base = "orbax" if args.child == "orbax" else "ckpt_async"
    if args.child == "ckpt_async_lowered":
        from ckpt_async import _runtime

        _runtime.get_runtime().boost = lambda commit: None  # type: ignore[method-assign]
    tree, expected, nbytes, count = build_tree(args.workload, not args.full)
    warm_up(base, work)
    _, quiet = _durable(args.child, tree, work / "quiet", args.budget_mib)
    shutil.rmtree(work / "quiet", ignore_errors=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        time.sleep(0.3)  # (they are running)
        returned, took = _durable(args.child, tree, work / "busy", args.budget_mib)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    impl = make_impl(base, work / "busy")
    bad = check_exact(expected, block(impl.restore(abstract_of(tree))))
    impl.close()
    return {"impl": args.child, "workload": args.workload, "bytes": nbytes, "arrays": count,
            "quiet_s": quiet, "busy_s": took, "busy_save_s": returned, "bit_exact": bad is None,
            "mismatch": bad}


def run(args: argparse.Namespace) -> dict[str, Any]:
    impls = args.impls.split(",")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="busy-"))
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        for workload in args.workloads.split(","):
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
            for r, impl in interleaved(impls, args.repeats):
                work = scratch / f"{workload}-{impl}-{r}"
                cmd = [sys.executable, __file__, "--child", impl, "--workload", workload,
                       "--busy", str(args.busy), "--dir", str(work)] + (
                           ["--full"] if args.full else []) + (
                       ["--budget-mib", str(args.budget_mib)] if args.budget_mib else [])
                try:
                    out = run_child(cmd, env, args.timeout)
                except subprocess.TimeoutExpired:
                    out = {"impl": impl, "workload": workload, "timed_out": args.timeout}
                runs[impl].append(out)
                shutil.rmtree(work, ignore_errors=True)
            results[workload] = runs
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"busy_processes": args.busy, "cpus": _usable_cpus(), "repeats": args.repeats,
            "mode": "full" if args.full else "quick", "budget_mib": args.budget_mib,
            "results": results}



def table(report: dict[str, Any]) -> str:
    budget = report.get("budget_mib")
    lines = [f"{report['busy_processes']} busy processes on {report['cpus']} CPUs, "
             f"{report['mode']} workloads, medians of {report['repeats']}"
             + (f"; ckpt_async under a {budget} MiB host-memory budget." if budget else ".")
             + " Save() and wait: durable; save() returns: its blocking part.", ""]
    for workload, runs in report["results"].items():
        first = next(r for rs in runs.values() for r in rs if "bytes" in r)
        lines += [f"#### {workload}: {first['bytes'] / 2**20:.0f} MiB in {first['arrays']} "
                  "arrays", "",
                  "| impl | durable, quiet s | durable, busy s | busy / quiet | vs Orbax, busy "
                  "| save() returns, busy s | bit-exact |", "|---|---:|---:|---:|---:|---:|---|"]
        orbax = median_of(runs.get("orbax", []), "busy_s")
        for impl, rs in runs.items():
            quiet, busy = median_of(rs, "quiet_s"), median_of(rs, "busy_s")
            timed_out = sum("timed_out" in r for r in rs)
            busy_text = (f"{busy:.3f}" if busy is not None
                         else f"> {rs[0].get('timed_out', '?')} ({timed_out} timed out)")
            ratio = f"{busy / quiet:.1f}x" if busy and quiet else ""
            vs = f"{busy / orbax:.2f}x" if busy and orbax else ""
            returned = median_of(rs, "busy_save_s")
            returned_text = f"{returned:.3f}" if returned is not None else ""
            exact = "yes" if all(r.get("bit_exact") for r in rs if "bit_exact" in r) else "NO"
            lines.append(f"| {impl} | {quiet:.3f} | {busy_text} | {ratio} | {vs} | "
                         f"{returned_text} | {exact} |" if quiet is not None
                         else f"| {impl} | | {busy_text} | | | | {exact} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = side_parser(__doc__, IMPLS, "mixed,many_small", 120.0)
    p.add_argument("--busy", type=int, default=_usable_cpus())
    p.add_argument("--budget-mib", type=int, default=None,
                   help="ckpt_async saves under this host-memory budget")
    p.add_argument("--dir", default=None)
    return side_main(p.parse_args(argv), child, run, table)


if __name__ == "__main__":
    sys.exit(main())
