"""Machine information, result tables (terminal and Markdown), targets and scaling of a run."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["machine_info", "markdown_report", "scaling", "targets", "text_tables"]

#: Columns of each group: (implementation key, header).
COLUMNS = {
    "cbe": [("mars_native", "mars_native"), ("per_model", "one call per model"), ("numpy", "NumPy ref"),
            ("torch_batched", "torch batched"),
            ("authors", "authors' approach"), ("floor", "read floor")],
    "cluster": [("mars_native", "KWMeans"), ("mars_native_official", "KWMeans official"),
                ("numpy", "NumPy twin"), ("authors", "scipy + sklearn (authors)")],
    "aggregate": [("mars_native", "mars_native"), ("numpy", "NumPy fp64 sum"),
                  ("torch_stack_mean", "torch stack().mean()"), ("floor", "floor")],
    "round": [("batch", "batch"), ("streaming", "streaming"), ("floor", "read states once")],
}
#: (numerator impl, label) ratios shown per group: numerator time / the group's main time.
RATIOS = {
    "cbe": [("numpy", "vs NumPy"), ("torch_batched", "vs torch"), ("authors", "vs authors"),
            ("floor", "native / floor")],
    "cluster": [("numpy", "vs NumPy"), ("authors", "vs authors"), ("mars_native_official", "vs official")],
    "aggregate": [("numpy", "vs NumPy"), ("torch_stack_mean", "vs torch"), ("floor", "native / floor")],
    "round": [("floor", "batch / floor"), ("floor", "streaming / floor")],
}
TITLES = {
    "cbe": "CBE of N client models",
    "cluster": "Clustering of N CBEs (2 clusters, 10 restarts)",
    "aggregate": "Aggregation (mean of N models, every float tensor)",
    "round": "A whole MARS round (validate + CBE + cluster + aggregate)",
}


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - optional packages
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load, library versions and the mars_native build."""
    from mars_native import build_info
    from mars_native.bench.baselines import cpu_count

    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cpus_available": cpu_count(),
        "memory_gb": _mem_total_gb(),
        "load_average": load,
        "python": platform.python_version(),
        "numpy": _version("numpy"), "torch": _version("torch"), "scipy": _version("scipy"),
        "sklearn": _version("sklearn"),
        "mars_native": build_info(),
        "git_commit": _git_commit(),
    }


# ---------------------------------------------------------------------------------- helpers
def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.0f}x" if x >= 100 else (f"{x:.1f}x" if x >= 10 else f"{x:.2f}x")


def best(case: dict[str, Any], impl: str) -> float:
    fig = case["impls"].get(impl)
    return float(fig["best_s"]) if fig and fig["k"] else float("nan")


def main_impl(group: str) -> str:
    return "batch" if group == "round" else "mars_native"


def _label(case: dict[str, Any]) -> str:
    if case["group"] == "cluster":
        return f"N = {case['clients']:,}"
    return f"{case['model']}, N = {case['clients']}"


def _cell(case: dict[str, Any], impl: str) -> str:
    fig = case["impls"].get(impl)
    if fig is None:
        return "-"
    if not fig["k"]:
        return "n/a"
    mark = "*" if fig["estimated"] else ""
    return f"{fmt_time(fig['best_s'])}{mark} (k={fig['k']})"


def _ratios(case: dict[str, Any]) -> list[str]:
    g = case["group"]
    main = best(case, main_impl(g))
    if g == "round":
        floor = best(case, "floor")
        return [fmt_ratio(main / floor), fmt_ratio(best(case, "streaming") / floor)]
    out = []
    for impl, _ in RATIOS[g]:
        other = best(case, impl)
        out.append(fmt_ratio(main / other if impl == "floor" else other / main))
    return out


def table_rows(cases: Sequence[dict[str, Any]], group: str) -> tuple[list[str], list[list[str]]]:
    header = ["case", *[h for _, h in COLUMNS[group]], *[lab for _, lab in RATIOS[group]]]
    if group == "round":
        header.append("peak memory batch / streaming")
    rows = []
    for case in cases:
        if case["group"] != group:
            continue
        row = [_label(case), *[_cell(case, impl) for impl, _ in COLUMNS[group]], *_ratios(case)]
        if group == "round":
            mem = case.get("peak_memory_bytes") or {}
            row.append(" / ".join("-" if mem.get(k) is None else f"{mem[k] / 2**20:.0f} MiB"
                                  for k in ("batch", "streaming")))
        rows.append(row)
    return header, rows


def text_tables(results: dict[str, Any]) -> str:
    """The result tables for a terminal."""
    out = []
    for group in COLUMNS:
        header, rows = table_rows(results["cases"], group)
        if not rows:
            continue
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        out.append(f"== {TITLES[group]}")
        for r in [header, *rows]:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- analysis
def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the cases that exist in ``results``."""
    cases = results["cases"]

    def find(group: str, model: str | None, n: int) -> dict[str, Any] | None:
        for c in cases:
            if c["group"] == group and c["clients"] == n and (model is None or c.get("model") == model):
                return c
        return None

    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, higher_is_better: bool, unit: str = "x") -> None:
        ok = math.isfinite(value) and (value >= limit if higher_is_better else value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                    "met": bool(ok), "direction": ">=" if higher_is_better else "<="})

    c = find("cbe", "resnet18", 20)
    if c:
        nat = best(c, "mars_native")
        add("CBE, 20 ResNet-18 clients: time / stream-read floor", nat / best(c, "floor"), 2.0, False)
        add("CBE, 20 ResNet-18 clients: speed-up vs the authors' approach", best(c, "authors") / nat, 50.0, True)
        add("CBE, 20 ResNet-18 clients: speed-up vs batched torch", best(c, "torch_batched") / nat, 10.0, True)
    c = find("cluster", None, 1000)
    if c:
        add("Clustering 1,000 CBEs: KWMeans time", best(c, "mars_native") * 1e3, 50.0, False, "ms")
        add("Clustering 1,000 CBEs: speed-up vs the authors' approach",
            best(c, "authors") / best(c, "mars_native"), 100.0, True)
    for c in cases:
        if c["group"] == "aggregate":
            add(f"Aggregation, {c['model']}, N = {c['clients']}: time / floor",
                best(c, "mars_native") / best(c, "floor"), 1.5, False)
    c = find("round", "resnet18", 20)
    if c:
        add("Round, 20 ResNet-18 clients (batch): time / read-states-once",
            best(c, "batch") / best(c, "floor"), 3.0, False)
        add("Round, 20 ResNet-18 clients (streaming): time / read-states-once",
            best(c, "streaming") / best(c, "floor"), 3.0, False)
    return out


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def scaling(results: dict[str, Any]) -> list[str]:
    """Sentences on how mars_native's time grows with clients and model size (log-log slopes)."""
    cases = results["cases"]
    lines = []
    for group, impl in (("cbe", "mars_native"), ("aggregate", "mars_native"), ("round", "batch")):
        by_model: dict[str, list[tuple[int, float]]] = {}
        for c in cases:
            if c["group"] == group and math.isfinite(best(c, impl)):
                by_model.setdefault(c["model"], []).append((c["clients"], best(c, impl)))
        for model, pts in by_model.items():
            if len(pts) >= 2:
                pts.sort()
                b = _slope([p[0] for p in pts], [p[1] for p in pts])
                lines.append(f"{group}, {model}: time ~ N^{b:.2f} over N = {pts[0][0]}..{pts[-1][0]} "
                             f"({fmt_time(pts[0][1])} -> {fmt_time(pts[-1][1])})")
        by_n: dict[int, list[tuple[int, float]]] = {}
        for c in cases:
            if c["group"] == group and math.isfinite(best(c, impl)):
                by_n.setdefault(c["clients"], []).append((c["params"], best(c, impl)))
        for n, pts in sorted(by_n.items()):
            if len(pts) >= 2:
                pts.sort()
                b = _slope([p[0] for p in pts], [p[1] for p in pts])
                lines.append(f"{group}, N = {n}: time ~ params^{b:.2f} over {pts[0][0] / 1e6:.1f}M.."
                             f"{pts[-1][0] / 1e6:.1f}M parameters")
    pts = [(c["clients"], best(c, "mars_native")) for c in cases
           if c["group"] == "cluster" and math.isfinite(best(c, "mars_native"))]
    if len(pts) >= 2:
        pts.sort()
        lines.append(f"cluster: KWMeans time ~ N^{_slope([p[0] for p in pts], [p[1] for p in pts]):.2f} "
                     f"over N = {pts[0][0]:,}..{pts[-1][0]:,}")
    return lines


# ---------------------------------------------------------------------------------- Markdown
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(results: dict[str, Any], command: str | None = None, plot_path: str | None = None) -> str:
    """The README section: where/when, how, the tables, the targets, scaling and notes."""
    m = results["machine"]
    cfg = results["config"]
    build = m.get("mars_native", {})
    load = m.get("load_average")
    load_end = results.get("load_average_end")
    lines = [
        "## Benchmark results",
        "",
        f"Run on {m['date_utc']}: {m['cpu']}, {m['cpus_available']} CPUs available, "
        f"{m['memory_gb']:.0f} GiB RAM, {m['host_os']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in load) if load else '?'}"
        + (f", at end {', '.join(f'{x:.2f}' for x in load_end)}" if load_end else "") + ".",
        f"mars_native {build.get('version')} ({build.get('simd')}, OpenMP {build.get('openmp')})"
        + (f", commit {m['git_commit']}" if m.get("git_commit") else "")
        + f"; Python {m['python']}, NumPy {m['numpy']}, torch {m['torch']}, SciPy {m['scipy']}, "
        f"scikit-learn {m['sklearn']}.",
        (f"Threads: {results['threads']} for mars_native, torch and the read floor; the NumPy "
        "reference and scipy run single-threaded as they ship."),
    ]
    if command:
        lines += ["", f"Command: `{command}` ({cfg['mode']} mode, {results['wall_s']:.0f} s)."]
    lines += [
        "",
        (f"Each figure is the best of k timed runs (k in parentheses, up to {cfg['repeat']}), after one "
        "untimed warm-up run of every implementation, with the implementations interleaved "
        "round-robin; * = extrapolated from a subset (see the JSON for how). Ratios: baseline time / "
        "mars_native time, and mars_native time / floor."),
    ]
    for group in COLUMNS:
        header, rows = table_rows(results["cases"], group)
        if rows:
            lines += ["", f"### {TITLES[group]}", "", _md_table(header, rows)]
    tg = targets(results)
    if tg:
        lines += ["", "### Targets", ""]
        rows = [[t["target"], f"{t['value']:.3g} {t['unit']}" if t["unit"] != "x" else fmt_ratio(t["value"]),
                 f"{t['direction']} {t['limit']:g} {t['unit']}", "met" if t["met"] else "**missed**"]
                for t in tg]
        lines.append(_md_table(["target", "measured", "goal", ""], rows))
    sc = scaling(results)
    if sc:
        lines += ["", "### Scaling", ""] + [f"- {s}" for s in sc]
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    if plot_path:
        lines += ["", f"![time vs clients and model size]({plot_path})"]
    return "\n".join(lines) + "\n"
