"""Run every (attack, defense) pair of a config and report: results.json, CSV, terminal table.

``results.json`` = ``{"config": {...}, "results": [row, ...], "meta": {...}}`` where a row is
``{"attack", "defense", "acc", "asr", "tpr", "fpr", "cad", "rounds": [per-round records], ...}``
(DESIGN.md layout; extra fields: window means, the pretrained start, timings, the ASR rule...).
``results.csv`` has the same rows without the per-round records; ``rounds.csv`` has one line per
(attack, defense, round). All rates are fractions in [0, 1]; the terminal table shows percent.
"""

from __future__ import annotations

import contextlib
import csv
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._json import json_safe
from .config import SimConfig
from .data import load_dataset
from .loop import RunResult, prepare_start, run_simulation

__all__ = [
    "RichProgress",
    "markdown_table",
    "print_table",
    "resolve_jobs",
    "results_payload",
    "results_table",
    "run_experiments",
    "run_pairs",
    "write_results",
]

SUMMARY_COLUMNS = [
    "attack", "defense", "acc", "asr", "tpr", "fpr", "cad", "acc_mean", "asr_mean", "cad_mean",
    "acc_start", "asr_start", "detect_seconds", "wall_seconds", "num_clients", "num_attackers",
    "rounds_run", "asr_rule", "global_rule", "attacker_protocol", "needs_server_data",
]
ROUND_COLUMNS = [
    "round", "acc", "asr", "tpr", "fpr", "n_uploads", "n_attackers", "n_decoys", "weight_total",
    "reset", "detect_seconds", "defense_seconds", "train_seconds",
]


# -- running -------------------------------------------------------------------------------------
def _worker(config_dict: dict, attack: str, defense: str, cache_dir: str | None, queue,
            data) -> RunResult:
    """One run in a worker process (spawned: a fresh interpreter, torch threads per config)."""
    config = SimConfig.from_dict(config_dict)
    progress = queue.put if queue is not None else None
    return run_simulation(config, attack, defense, data=data, progress=progress,
                          cache_dir=cache_dir)


def run_pairs(
    runs: Sequence[tuple[SimConfig, str, str]],
    *,
    jobs: int = 1,
    data=None,
    make_model=None,
    progress: Callable[[dict], None] | None = None,
    cache_dir: str | Path | None = None,
) -> list[RunResult]:
    """Run ``(config, attack, defense)`` triples; returns results in input order.

    The pretrained start of every distinct config is computed first (once, in this process).
    With ``jobs > 1`` the runs then execute in ``jobs`` spawned worker processes that load the
    start from ``cache_dir`` (a temporary directory when None) and receive the dataset (pickled)
    from this process; every run is a pure function of its config, so the results are the same
    for any ``jobs``. A custom ``make_model`` or an unpicklable ``data`` runs sequentially.
    """
    runs = list(runs)
    if not runs:
        return []
    parallel = jobs > 1 and len(runs) > 1 and make_model is None and _picklable(data)
    with contextlib.ExitStack() as stack:
        if parallel and cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mars-sim-"))
        cache = None if cache_dir is None else str(cache_dir)
        pool = None
        if parallel:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            pool = stack.enter_context(ProcessPoolExecutor(
                max_workers=min(jobs, len(runs)), mp_context=mp.get_context("spawn")))
        seen: set[str] = set()
        for cfg, _, _ in runs:  # pretraining once per distinct config, before any run
            key = json.dumps(cfg.to_dict(), sort_keys=True)
            if key not in seen:
                seen.add(key)
                prepare_start(cfg, data=data, make_model=make_model, cache_dir=cache,
                              progress=progress, executor=pool, n_workers=jobs)
        if not parallel:
            return [run_simulation(cfg, a, d, data=data, make_model=make_model,
                                   progress=progress, cache_dir=cache) for cfg, a, d in runs]
        return _run_parallel(pool, runs, cache, progress, data)


def _picklable(obj) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - anything unpicklable means "run sequentially"
        return False
    return True


def _run_parallel(pool, runs, cache, progress, data) -> list[RunResult]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, wait

    with contextlib.ExitStack() as stack:
        queue = None
        if progress is not None:
            queue = stack.enter_context(mp.get_context("spawn").Manager()).Queue()
        datasets = {}
        for cfg, _, _ in runs:  # one dataset per distinct (dataset, test_size)
            key = (cfg.dataset, cfg.test_size)
            if key not in datasets:
                datasets[key] = data if data is not None else load_dataset(cfg)
        futures = [pool.submit(_worker, cfg.to_dict(), a, d, cache, queue,
                               datasets[(cfg.dataset, cfg.test_size)])
                   for cfg, a, d in runs]
        pending = set(futures)
        while pending:
            _done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(queue, progress)
        _drain(queue, progress)
        return [f.result() for f in futures]


def _drain(queue, progress) -> None:
    if queue is None:
        return
    import queue as queue_mod

    while True:
        try:
            event = queue.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        progress(event)


def resolve_jobs(config: SimConfig, jobs: int | None, n_runs: int) -> int:
    """Python-API rule: explicit ``jobs`` (0 = one per core), else ``config.jobs`` when > 0,
    else sequential."""
    if jobs is None:
        return config.resolved_jobs(n_runs) if config.jobs > 0 else 1
    return config.replace(jobs=max(0, jobs)).resolved_jobs(n_runs)


def run_experiments(
    config: SimConfig,
    *,
    attacks: Sequence[str] | None = None,
    defenses: Sequence[str] | None = None,
    data=None,
    make_model=None,
    out_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    plots: bool = True,
    cache_dir: str | Path | None = None,
    jobs: int | None = None,
) -> list[RunResult]:
    """Run ``attacks x defenses`` (default: the config's lists), attack-major, and write the
    results (and plots) to ``out_dir`` if given. The pretrained start is computed once (and
    cached on disk in ``out_dir/cache``).

    ``jobs`` worker processes share the runs (default: ``config.jobs`` when set, else 1; 0 = one
    per core). Workers are *spawned*: a script that asks for ``jobs > 1`` must guard its entry
    point with ``if __name__ == "__main__":``. Results do not depend on ``jobs``."""
    attacks = list(attacks if attacks is not None else config.attacks)
    defenses = list(defenses if defenses is not None else config.defenses)
    if cache_dir is None and out_dir is not None:
        cache_dir = Path(out_dir) / "cache"
    runs = [(config, a, d) for a in attacks for d in defenses]
    n_jobs = resolve_jobs(config, jobs, len(runs))
    t0 = time.perf_counter()
    results = run_pairs(runs, jobs=n_jobs, data=data, make_model=make_model, progress=progress,
                        cache_dir=cache_dir)
    if out_dir is not None:
        write_results(out_dir, config, results, wall_seconds=time.perf_counter() - t0,
                      jobs=n_jobs)
        if plots:
            from .plots import plot_all

            plot_all(results, out_dir)
    return results


# -- files ----------------------------------------------------------------------------------------
def results_payload(config: SimConfig, results: Iterable[RunResult], **meta: Any) -> dict:
    import torch

    return json_safe({
        "config": config.to_dict(),
        "results": [r.row(with_rounds=True) for r in results],
        "meta": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": config.resolved_threads(),
            "rates": "fractions in [0, 1]",
            "asr_rule": config.asr_rule,
            "headline": "acc/asr at the final round; tpr/fpr averaged over the attack rounds; "
                        "cad = (acc + 1 - asr + tpr + 1 - fpr)/4 (2 terms without tpr/fpr)",
            **meta,
        },
    })


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def write_results(out_dir: str | Path, config: SimConfig, results: Sequence[RunResult],
                  **meta: Any) -> dict[str, Path]:
    """Write results.json, results.csv, rounds.csv, results.md and config.toml into
    ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "rounds_csv": out / "rounds.csv",
        "config": out / "config.toml",
        "markdown": out / "results.md",
    }
    payload = results_payload(config, results, **meta)
    paths["json"].write_text(json.dumps(payload, indent=1))
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SUMMARY_COLUMNS)
        for r in results:
            row = r.row(with_rounds=False)
            w.writerow([_csv_value(row.get(c)) for c in SUMMARY_COLUMNS])
    with open(paths["rounds_csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["attack", "defense", *ROUND_COLUMNS, "flagged_ids", "attacker_ids"])
        for r in results:
            for rec in r.rounds:
                w.writerow([r.attack, r.defense, *[_csv_value(rec.get(c)) for c in ROUND_COLUMNS],
                            _csv_value(rec.get("flagged_ids")), _csv_value(rec.get("attacker_ids"))])
    paths["config"].write_text(config.to_toml())
    paths["markdown"].write_text(markdown_table(payload["results"]) + "\n")
    return paths


def markdown_table(rows: Sequence[dict], extra: Sequence[str] = ()) -> str:
    """A Markdown table of result rows (``RunResult.row()`` dicts or results.json rows): one line
    per (attack, defense), ACC/ASR (final and window mean), TPR/FPR (means), CAD, in percent."""
    cols = ["attack", "defense", *extra, "ACC", "ASR", "TPR", "FPR", "CAD", "ACC mean",
            "ASR mean", "rounds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [str(r["attack"]), str(r["defense"]) + (" †" if r.get("needs_server_data") else "")]
        vals += [str(r.get(e, "")) for e in extra]
        vals += [_pct(r.get(k)) for k in ("acc", "asr", "tpr", "fpr", "cad", "acc_mean",
                                           "asr_mean")]
        vals.append(str(r.get("rounds_run", len(r.get("rounds", [])))))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


# -- terminal ---------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def results_table(results: Sequence[RunResult], title: str | None = None):
    """A rich Table: one row per defense, one column per attack; each cell shows CAD and
    ACC/ASR/TPR/FPR (percent)."""
    from rich.table import Table

    attacks = list(dict.fromkeys(r.attack for r in results))
    defenses = list(dict.fromkeys(r.defense for r in results))
    cell = {(r.attack, r.defense): r for r in results}
    best = {}
    for a in attacks:
        cads = [cell[(a, d)].summary["cad"] for d in defenses if (a, d) in cell]
        best[a] = max((c for c in cads if c is not None), default=None)
    table = Table(title=title or "CAD %  (ACC/ASR/TPR/FPR %)", show_lines=True)
    table.add_column("defense", style="bold")
    for a in attacks:
        table.add_column(a, justify="center")
    for d in defenses:
        row = []
        for a in attacks:
            r = cell.get((a, d))
            if r is None:
                row.append("")
                continue
            s = r.summary
            cad_txt = _pct(s["cad"])
            if s["cad"] is not None and best[a] is not None and s["cad"] >= best[a] - 1e-12:
                cad_txt = f"[bold green]{cad_txt}[/]"
            row.append(f"{cad_txt}\n{_pct(s['acc'])}/{_pct(s['asr'])}/"
                       f"{_pct(s['tpr'])}/{_pct(s['fpr'])}")
        name = d + (" †" if any(cell[(a, d)].needs_server_data for a in attacks
                                 if (a, d) in cell) else "")
        table.add_row(name, *row)
    return table


def print_table(results: Sequence[RunResult], console=None, config: SimConfig | None = None) -> None:
    from rich.console import Console

    console = console or Console()
    console.print(results_table(results))
    notes = [("ACC/ASR at the final round; TPR/FPR averaged over the attack rounds; "
              "– = not defined (the defense flags no clients).")]
    if config is not None:
        rule = ("triggered test samples whose true label is not the target"
                if config.asr_rule == "exclude-target" else
                "every triggered test sample, target class included (authors' code)")
        notes.append(f"ASR counts {rule}; global rule: {config.global_rule}; attackers: "
                     f"{config.num_attackers}/{config.num_clients} ({config.attacker_protocol}).")
    if any(r.needs_server_data for r in results):
        notes.append("† needs data at the server.")
    for n in notes:
        console.print(f"[dim]{n}[/]")


class RichProgress:
    """A ``progress`` callback that drives a rich progress bar over all rounds of all runs,
    showing the current pair and its ACC/ASR. Use as a context manager."""

    def __init__(self, total_rounds: int, console=None, disable: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=disable,
            transient=False,
        )
        self.total = total_rounds
        self.task = None
        self.pre_task = None

    def __enter__(self) -> RichProgress:  # noqa: PYI034
        self.progress.__enter__()
        self.task = self.progress.add_task("rounds", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        if event.get("phase") == "pretrain":
            if self.pre_task is None:
                self.pre_task = self.progress.add_task("pretraining (clean FedAvg)",
                                                       total=event["total"])
            self.progress.update(self.pre_task, completed=event["round"])
            return
        desc = (f"{event['attack']:>8} vs {event['defense']:<13} round "
                f"{event['round']:>2}/{event['total']}  ACC {100 * event['acc']:5.1f}%  "
                f"ASR {100 * event['asr']:5.1f}%")
        self.progress.update(self.task, advance=1, description=desc)


def _stdout_is_tty() -> bool:
    return sys.stdout.isatty()
