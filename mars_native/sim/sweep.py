"""Parameter sweeps of the paper's sensitivity studies.

- ``ratio``: the attacker ratio study (paper Table 5): 0, 10, 20, 30, 50, 70 and 95% of the
  clients are attackers (0, 2, 4, 6, 10, 14, 19 of 20);
- ``kappa``: MARS's top-kappa share (Table 9): 1, 2, 5, 10, 20, 40, 60, 80, 100%;
- ``epsilon``: MARS's all-benign threshold (Table 8): 0.01 ... 5.

Every point is a full run of each (attack, defense) pair; kappa/epsilon are written into the
defense parameters of every swept defense (defenses that do not take them are run unchanged).
Results: ``sweep-<param>.json`` (rows carry a ``"value"`` field), ``sweep-<param>.csv`` and
``sweep-<param>.png`` in ``out_dir``.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .._json import json_safe
from .config import SimConfig
from .loop import RunResult
from .report import SUMMARY_COLUMNS, _csv_value, resolve_jobs, run_pairs

__all__ = ["SWEEPS", "run_sweep", "sweep_configs", "sweep_values"]

RATIO_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.95)
KAPPA_VALUES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
EPSILON_VALUES = (0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.5, 1.0, 3.0, 5.0)
SWEEPS = ("ratio", "kappa", "epsilon")
#: defenses whose parameters include kappa and epsilon
MARS_FAMILY = ("mars", "mars-star", "mars-official")


def sweep_values(kind: str, config: SimConfig) -> list[float]:
    """Default values of a sweep (attacker counts for ``ratio``)."""
    if kind == "ratio":
        n = config.num_clients
        return sorted({min(n - 1, round(f * n)) if f < 1 else n - 1
                       for f in RATIO_FRACTIONS})
    if kind == "kappa":
        return list(KAPPA_VALUES)
    if kind == "epsilon":
        return list(EPSILON_VALUES)
    raise ValueError(f"unknown sweep {kind!r}; choose one of {SWEEPS}")


def sweep_configs(kind: str, config: SimConfig, values: Sequence[float],
                  defenses: Sequence[str]) -> list[tuple[float, SimConfig]]:
    """One config per sweep value."""
    out = []
    for v in values:
        if kind == "ratio":
            out.append((v, config.replace(num_attackers=int(v))))
        elif kind in ("kappa", "epsilon"):
            params = copy.deepcopy(config.defense_params)
            for d in defenses:
                if d in MARS_FAMILY:
                    params.setdefault(d, {})[kind] = float(v)
            out.append((v, config.replace(defense_params=params)))
        else:
            raise ValueError(f"unknown sweep {kind!r}; choose one of {SWEEPS}")
    return out


def run_sweep(
    config: SimConfig,
    kind: str,
    *,
    values: Sequence[float] | None = None,
    attacks: Sequence[str] | None = None,
    defenses: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    data=None,
    make_model=None,
    plots: bool = True,
    jobs: int | None = None,
) -> list[tuple[float, RunResult]]:
    """Run the sweep and (with ``out_dir``) write its JSON, CSV and PNG."""
    attacks = list(attacks if attacks is not None else config.attacks)
    defenses = list(defenses if defenses is not None else config.defenses)
    values = list(values) if values is not None else sweep_values(kind, config)
    cache = None if out_dir is None else str(Path(out_dir) / "cache")
    runs, point_values = [], []
    for value, cfg in sweep_configs(kind, config, values, defenses):
        for a in attacks:
            for d in defenses:
                runs.append((cfg, a, d))
                point_values.append(value)
    n_jobs = resolve_jobs(config, jobs, len(runs))
    results = run_pairs(runs, jobs=n_jobs, data=data, make_model=make_model, progress=progress,
                        cache_dir=cache)
    points: list[tuple[float, RunResult]] = list(zip(point_values, results))
    if out_dir is not None:
        write_sweep(out_dir, kind, config, points)
        if plots:
            from .plots import plot_sweep

            xlabel = {"ratio": f"attackers (of {config.num_clients})"}.get(kind, kind)
            plot_sweep(points, kind, out_dir, xlabel=xlabel)
    return points


def write_sweep(out_dir: str | Path, kind: str, config: SimConfig,
                points: Sequence[tuple[float, RunResult]]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for value, r in points:
        row = r.row(with_rounds=True)
        row["value"] = value
        row["sweep"] = kind
        rows.append(row)
    paths = {"json": out / f"sweep-{kind}.json", "csv": out / f"sweep-{kind}.csv"}
    paths["json"].write_text(json.dumps(json_safe(
        {"config": config.to_dict(), "sweep": kind, "results": rows}), indent=1))
    cols = ["sweep", "value", *SUMMARY_COLUMNS]
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in rows:
            w.writerow([_csv_value(row.get(c)) for c in cols])
    return paths
