"""PNG figures of a simulation (matplotlib, Agg backend; nothing is shown on screen).

- ``rounds-<attack>.png``: ACC and ASR of the global model over the rounds (round 0 = the
  pretrained start), one line per defense;
- ``cad.png``: grouped bar chart of CAD per defense and attack;
- ``sweep-<param>.png``: ACC/ASR/TPR/FPR/CAD against the swept parameter, one line per defense;
- ``energy-<attack>-<defense>.png`` (runs with ``record_energy``): the CBE of every upload of one
  round, attackers vs benign clients, sorted values and pooled histograms — the picture that
  explains why MARS separates (or fails to separate) a round.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_all", "plot_cad", "plot_energy", "plot_rounds", "plot_sweep"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def plot_rounds(results: Sequence, out_dir: str | Path) -> list[Path]:
    """One PNG per attack: ACC and ASR over rounds for every defense."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for attack in dict.fromkeys(r.attack for r in results):
        runs = [r for r in results if r.attack == attack]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for r in runs:
            xs = [0] + [rec["round"] for rec in r.rounds]
            acc = [r.start["acc"]] + [rec["acc"] for rec in r.rounds]
            asr = [r.start["asr"]] + [rec["asr"] for rec in r.rounds]
            axes[0].plot(xs, 100 * np.asarray(acc), marker=".", label=r.defense)
            axes[1].plot(xs, 100 * np.asarray(asr), marker=".", label=r.defense)
        axes[0].set_title(f"clean accuracy under {attack}")
        axes[1].set_title(f"attack success rate under {attack}")
        for ax, lab in zip(axes, ("ACC %", "ASR %")):
            ax.set_xlabel("attack round (0 = pretrained start)")
            ax.set_ylabel(lab)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out / f"rounds-{_slug(attack)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_cad(results: Sequence, out_dir: str | Path) -> Path:
    """Grouped bars: CAD (%) per defense, one bar per attack."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attacks = list(dict.fromkeys(r.attack for r in results))
    defenses = list(dict.fromkeys(r.defense for r in results))
    cell = {(r.attack, r.defense): r.summary.get("cad") for r in results}
    width = 0.8 / max(1, len(attacks))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(defenses) + 2), 4))
    x = np.arange(len(defenses))
    for i, a in enumerate(attacks):
        vals = [np.nan if cell.get((a, d)) is None else 100 * cell[(a, d)] for d in defenses]
        ax.bar(x + (i - (len(attacks) - 1) / 2) * width, vals, width, label=a)
    ax.set_xticks(x)
    ax.set_xticklabels(defenses, rotation=30, ha="right")
    ax.set_ylabel("CAD %")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="attack")
    ax.set_title("comprehensive ability of defense (higher is better)")
    fig.tight_layout()
    path = out / "cad.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(points: Sequence[tuple[float, object]], param: str, out_dir: str | Path,
               xlabel: str | None = None) -> Path:
    """``points`` = [(value, RunResult), ...]; one panel per metric, one line per
    (attack, defense)."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = ["acc", "asr", "tpr", "fpr", "cad"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.4))
    series: dict[str, list[tuple[float, dict]]] = {}
    for value, r in points:
        series.setdefault(f"{r.defense} / {r.attack}", []).append((value, r.summary))
    for label, pts in series.items():
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        for ax, m in zip(axes, metrics):
            ys = [np.nan if p[1].get(m) is None else 100 * p[1][m] for p in pts]
            ax.plot(xs, ys, marker="o", label=label)
    for ax, m in zip(axes, metrics):
        ax.set_title(m.upper() + " %")
        ax.set_xlabel(xlabel or param)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if param in ("kappa", "epsilon"):
            ax.set_xscale("log")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / f"sweep-{_slug(param)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_energy(result, out_dir: str | Path, round_index: int = 0) -> Path | None:
    """CBE of every upload of one round (needs ``record_energy``): left, each client's sorted
    CBE (red = attacker, green = benign); right, pooled histograms of the CBE values."""
    recs = [rec for rec in result.rounds if "cbe" in rec]
    if not recs:
        return None
    rec = recs[min(round_index, len(recs) - 1)]
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cbe = [np.asarray(c, dtype=float) for c in rec["cbe"]]
    is_att = rec["upload_is_attacker"]
    flagged = set(rec.get("flagged_ids") or [])
    ncols = 3 if rec.get("energy_terms") else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4))
    for c, att, cid in zip(cbe, is_att, rec["upload_ids"]):
        style = "-" if cid not in flagged else "--"
        axes[0].plot(np.sort(c)[::-1], style, color="tab:red" if att else "tab:green",
                     alpha=0.8, lw=1.2)
    axes[0].set_title(f"sorted CBE per upload, round {rec['round']} "
                      "(red attacker, green benign, dashed = flagged)", fontsize=9)
    axes[0].set_xlabel("rank")
    axes[0].set_ylabel("backdoor energy")
    axes[0].set_yscale("log")
    att_vals = np.concatenate([c for c, a in zip(cbe, is_att) if a] or [np.empty(0)])
    ben_vals = np.concatenate([c for c, a in zip(cbe, is_att) if not a] or [np.empty(0)])
    allv = np.concatenate([att_vals, ben_vals])
    allv = allv[np.isfinite(allv) & (allv > 0)]
    if allv.size:
        bins = np.logspace(np.log10(allv.min()), np.log10(allv.max()) + 1e-9, 40)
        if ben_vals.size:
            axes[1].hist(ben_vals, bins=bins, alpha=0.6, color="tab:green", density=True,
                         label=f"benign ({sum(not a for a in is_att)})")
        if att_vals.size:
            axes[1].hist(att_vals, bins=bins, alpha=0.6, color="tab:red", density=True,
                         label=f"attacker ({sum(is_att)})")
        axes[1].set_xscale("log")
    axes[1].set_title(f"CBE values: {result.attack} vs {result.defense}", fontsize=9)
    axes[1].set_xlabel("backdoor energy")
    axes[1].legend(fontsize=8)
    terms = rec.get("energy_terms")
    if terms:
        _plot_energy_terms(axes[2], terms, is_att)
    fig.tight_layout()
    path = out / f"energy-{_slug(result.attack)}-{_slug(result.defense)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_energy_terms(ax, terms: list[dict], is_att: list[bool]) -> None:
    """Per layer, attackers' mean / benign mean of the top-k BE and of its two factors."""
    layers = list(terms[0])
    keys = [("be", "BE (top-k)"), ("sigma", "sigma_max(W)"), ("bn_scale", "|gamma|/sqrt(var)")]
    width = 0.8 / len(keys)
    x = np.arange(len(layers))
    for i, (key, label) in enumerate(keys):
        ratios = []
        for layer in layers:
            att = [t[layer][key] for t, a in zip(terms, is_att) if a]
            ben = [t[layer][key] for t, a in zip(terms, is_att) if not a]
            ratios.append(np.mean(att) / np.mean(ben) if att and ben and np.mean(ben) else np.nan)
        ax.bar(x + (i - 1) * width, ratios, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(layers)
    ax.set_ylabel("attackers / benign (mean)")
    ax.set_title("what drives the energy gap", fontsize=9)
    ax.legend(fontsize=7)


def plot_all(results: Sequence, out_dir: str | Path) -> list[Path]:
    """Every figure of a set of runs (rounds per attack, CAD bars, energy when recorded)."""
    paths = list(plot_rounds(results, out_dir))
    paths.append(plot_cad(results, out_dir))
    for r in results:
        p = plot_energy(r, out_dir)
        if p is not None:
            paths.append(p)
    return paths
