"""Draws the benchmark's bar chart for the docs from `benchmarks/results/latest.json`.

    python benchmarks/chart.py                      # -> docs/img/performance.svg
    python benchmarks/chart.py --input R.json --output chart.svg

Two panels of grouped horizontal bars, one group per workload and one bar per implementation:
durable-commit seconds (save + wait_until_finished + fsync of every file) and blocking
milliseconds (until `save()` returns); shorter is better. The SVG is written by hand (no
plotting dependency). Exits 1 with a message when the results file is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT / "benchmarks" / "results" / "latest.json"
DEFAULT_OUTPUT = ROOT / "docs" / "img" / "performance.svg"

COLORS = {
    "ckpt_async": "#1f77b4",
    "orbax": "#ff7f0e",
    "numpy": "#2ca02c",
    "safetensors": "#9467bd",
}
FALLBACK_COLORS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

# (cell key, title, scale to the shown unit, unit, number format)
PANELS = [
    ("durable_s", "Durable commit (s)", 1.0, "s", "{:.3f}"),
    ("block_s", "Blocking: until save() returns (ms)", 1000.0, "ms", "{:.1f}"),
]

BAR_H = 14
BAR_GAP = 3
GROUP_GAP = 16
LABEL_W = 96  # workload labels, left of the first panel
PANEL_W = 330
PANEL_GAP = 70
TOP = 78
FONT = "font-family='Helvetica, Arial, sans-serif'"


def load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(
            f"chart.py: {path} not found. Run the benchmark first "
            "(`python benchmarks/run.py --quick` or `nox -s bench -- --quick`), "
            "then rerun `python benchmarks/chart.py`."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"chart.py: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict):
        raise SystemExit(f"chart.py: {path} has no 'cells': not a benchmarks/run.py result")
    return data


def value(data: dict[str, Any], workload: str, impl: str, key: str) -> float | None:
    cell = data["cells"].get(f"save_restore/{workload}/{impl}")
    if not cell or not cell.get("ok_runs"):
        return None
    v = cell.get(key)
    return float(v) if isinstance(v, int | float) else None


def nice_max(v: float) -> float:
    """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k) at or above v."""
    if v <= 0:
        return 1.0
    k = 1.0
    while k * 10 < v:
        k *= 10
    while k > v:
        k /= 10
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if k * m >= v:
            return k * m
    return k * 10


def fmt_tick(v: float) -> str:
    return f"{v:g}"


def render(data: dict[str, Any]) -> str:
    workloads: list[str] = list(data.get("workloads") or [])
    impls: list[str] = list(data.get("impls") or [])
    if not workloads or not impls:
        raise SystemExit("chart.py: the results list no workloads or no implementations")
    colors = dict(COLORS)
    extra = iter(FALLBACK_COLORS * 4)
    for impl in impls:
        colors.setdefault(impl, next(extra))

    group_h = len(impls) * (BAR_H + BAR_GAP) - BAR_GAP
    plot_h = len(workloads) * (group_h + GROUP_GAP) - GROUP_GAP
    width = LABEL_W + len(PANELS) * PANEL_W + (len(PANELS) - 1) * PANEL_GAP + 60
    legend_y = TOP + plot_h + 42
    height = legend_y + 30

    out: list[str] = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {FONT} font-size='11'>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
    ]
    mode = "quick" if data.get("quick") else "full"
    machine = data.get("machine") or {}
    title = f"ckpt_async vs Orbax, NumPy, safetensors ({mode} mode, medians; shorter is better)"
    sub = ", ".join(
        str(x)
        for x in (
            data.get("date"),
            machine.get("cpu"),
            f"{machine.get('cores')} cores" if machine.get("cores") else None,
            data.get("filesystem"),
        )
        if x
    )
    out.append(f"<text x='10' y='20' font-size='14' font-weight='bold'>{escape(title)}</text>")
    out.append(f"<text x='10' y='38' fill='#555'>{escape(sub)}</text>")

    for p, (key, ptitle, scale, unit, numfmt) in enumerate(PANELS):
        x0 = LABEL_W + p * (PANEL_W + PANEL_GAP)
        vals = [
            v * scale for w in workloads for i in impls if (v := value(data, w, i, key)) is not None
        ]
        vmax = nice_max(max(vals, default=1.0))
        out.append(f"<text x='{x0}' y='{TOP - 18}' font-weight='bold'>{escape(ptitle)}</text>")
        # grid and ticks
        for t in range(5):
            tv = vmax * t / 4
            tx = x0 + PANEL_W * t / 4
            out.append(
                f"<line x1='{tx:.1f}' y1='{TOP - 6}' x2='{tx:.1f}' y2='{TOP + plot_h + 4}' "
                "stroke='#ddd'/>"
            )
            out.append(
                f"<text x='{tx:.1f}' y='{TOP + plot_h + 18}' text-anchor='middle' fill='#555'>"
                f"{fmt_tick(tv)}</text>"
            )
        out.append(
            f"<line x1='{x0}' y1='{TOP - 6}' x2='{x0}' y2='{TOP + plot_h + 4}' stroke='#333'/>"
        )
        for g, w in enumerate(workloads):
            gy = TOP + g * (group_h + GROUP_GAP)
            if p == 0:
                out.append(
                    f"<text x='{LABEL_W - 8}' y='{gy + group_h / 2 + 4:.1f}' text-anchor='end' "
                    f"font-weight='bold'>{escape(w)}</text>"
                )
            for b, impl in enumerate(impls):
                y = gy + b * (BAR_H + BAR_GAP)
                v = value(data, w, impl, key)
                if v is None:
                    out.append(
                        f"<text x='{x0 + 4}' y='{y + BAR_H - 3}' fill='#b00'>"
                        f"{escape(impl)}: no result</text>"
                    )
                    continue
                v *= scale
                bw = max(PANEL_W * v / vmax, 1.0)
                out.append(
                    f"<rect x='{x0}' y='{y}' width='{bw:.1f}' height='{BAR_H}' "
                    f"fill='{colors[impl]}'><title>{escape(f'{w} / {impl}: ')}"
                    f"{numfmt.format(v)} {unit}</title></rect>"
                )
                out.append(
                    f"<text x='{x0 + bw + 4:.1f}' y='{y + BAR_H - 3}' fill='#333'>"
                    f"{numfmt.format(v)}</text>"
                )
    # legend
    lx = LABEL_W
    for impl in impls:
        out.append(
            f"<rect x='{lx}' y='{legend_y - 10}' width='12' height='12' fill='{colors[impl]}'/>"
        )
        out.append(f"<text x='{lx + 16}' y='{legend_y}'>{escape(impl)}</text>")
        lx += 24 + 7 * len(impl) + 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="benchmark results JSON")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="SVG to write")
    a = ap.parse_args(argv)
    svg = render(load(a.input))
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(svg)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
