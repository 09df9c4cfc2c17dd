"""PNG figure of a benchmark run: time vs clients, vs model size, vs number of CBEs."""

from __future__ import annotations

import math
from typing import Any

from mars_native.bench.report import COLUMNS, best

__all__ = ["plot_results"]

_STYLE = {
    "mars_native": {"color": "C3", "marker": "o", "lw": 2.2},
    "batch": {"color": "C3", "marker": "o", "lw": 2.2},
    "streaming": {"color": "C1", "marker": "s"},
    "mars_native_official": {"color": "C1", "marker": "s"},
    "numpy": {"color": "C0", "marker": "^"},
    "torch_batched": {"color": "C2", "marker": "v"},
    "torch_stack_mean": {"color": "C2", "marker": "v"},
    "authors": {"color": "C4", "marker": "D"},
    "floor": {"color": "k", "marker": "", "ls": "--"},
}


def _series(cases: list[dict[str, Any]], group: str, impl: str, x_key: str, **match: Any) -> tuple[list, list]:
    pts = []
    for c in cases:
        if c["group"] != group or any(c.get(k) != v for k, v in match.items()):
            continue
        t = best(c, impl)
        if math.isfinite(t):
            pts.append((c[x_key], t))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax: Any, cases: list, group: str, x_key: str, title: str, xlabel: str, **match: Any) -> bool:
    drawn = False
    for impl, label in COLUMNS[group]:
        xs, ys = _series(cases, group, impl, x_key, **match)
        if xs:
            ax.plot(xs, ys, label=label, **_STYLE.get(impl, {}))
            drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time (s, best of k)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return drawn


def plot_results(results: dict[str, Any], path: str) -> str:
    """Draws up to four log-log panels and writes them to ``path`` (PNG); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    models = sorted({c["model"] for c in cases if "model" in c},
                    key=lambda m: min(c["params"] for c in cases if c.get("model") == m))
    main = "resnet18" if "resnet18" in models else (models[-1] if models else None)
    sizes = sorted({c["clients"] for c in cases if c["group"] == "cbe"})
    n_fixed = 20 if 20 in sizes else (sizes[-1] if sizes else None)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    drawn = [
        main is not None and _panel(axes[0, 0], cases, "cbe", "clients",
                                    f"CBE vs clients ({main})", "clients N", model=main),
        n_fixed is not None and _panel(axes[0, 1], cases, "cbe", "params",
                                       f"CBE vs model size (N = {n_fixed})", "parameters", clients=n_fixed),
        _panel(axes[1, 0], cases, "cluster", "clients", "Clustering vs number of CBEs", "CBEs N"),
        main is not None and (_panel(axes[1, 1], cases, "aggregate", "clients",
                                     f"Aggregation vs clients ({main})", "clients N", model=main)
                              or _panel(axes[1, 1], cases, "round", "clients",
                                        f"Round vs clients ({main})", "clients N", model=main)),
    ]
    for ax, ok in zip(axes.flat, drawn):
        if not ok:
            ax.set_axis_off()
    m = results.get("machine", {})
    n = results.get("threads")
    fig.suptitle(f"mars_native benchmarks - {m.get('cpu', '')}, {n} thread{'' if n == 1 else 's'}, "
                 f"{m.get('date_utc', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
