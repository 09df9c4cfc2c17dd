"""``mars-native simulate``: the command-line front end of the arena.

``mars_native.cli`` (the ``mars-native`` console script) calls :func:`add_arguments` to build the
``simulate`` sub-parser and :func:`run` to execute it; ``python -m mars_native.sim`` runs the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "build_config", "main", "run"]

DESCRIPTION = """\
Federated backdoor arena: attacks against defenses on scikit-learn's bundled digits
(no download), non-IID Dirichlet clients, a Conv+BatchNorm CNN pretrained with clean FedAvg,
then an attack window. Prints a defense x attack table (CAD and ACC/ASR/TPR/FPR), writes
results.json, results.csv, rounds.csv, config.toml and PNG plots to --out."""

EPILOG = """\
presets (--preset; flags and --config override them):
  default  what runs with no arguments: attacks mra,cerp,3dfed x defenses fedavg,mars, 3 attack
           rounds after 30 clean FedAvg rounds, 20 clients / 4 attackers, digits, 64-128-256 CNN
           (a few minutes on 2 CPU cores; the pretrained start is cached in OUT/cache, so a
           second run skips the clean rounds).
  paper    the spec's full scaled-down protocol: 30 pretraining rounds, 20 attack rounds, every
           attack and every defense (hours on 2 cores; pick subsets with --attack/--defense).
  quick    smoke test in seconds (tiny model; numbers are not meaningful).

examples:
  mars-native simulate                                  # the default comparison
  mars-native simulate --attack all --defense all --preset paper --out full-run
  mars-native simulate --attack 3dfed --defense mars,mars-star,flame --rounds 20
  mars-native simulate --attack adaptive --defense mars,mars-star --set attack_params.adaptive.lam=0.05
  mars-native simulate --sweep ratio --attack 3dfed --defense mars,multikrum --rounds 5
  mars-native simulate --sweep epsilon --attack none,3dfed --defense mars
  mars-native simulate --config my.toml --seed 3        # TOML keys = SimConfig fields
  mars-native simulate --list                           # attacks, defenses, datasets, models

ASR counts triggered test samples whose true label is not the target (--asr-rule include-target
counts every sample, like the authors' code). Same seed -> same table."""


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    g = parser.add_argument_group("experiment")
    g.add_argument("--config", metavar="FILE.toml", help="TOML file of SimConfig fields")
    g.add_argument("--preset", choices=["default", "paper", "quick"], default=None,
                   help="starting point (default: 'default' without --config, none with it)")
    g.add_argument("--quick", action="store_true", help="same as --preset quick")
    g.add_argument("--attack", action="append", metavar="NAME[,NAME]",
                   help="attack(s): none, mra, cerp, 3dfed, adaptive, or 'all' (repeatable)")
    g.add_argument("--defense", action="append", metavar="NAME[,NAME]",
                   help="defense(s): fedavg, mars, mars-star, mars-official, multikrum, median, "
                        "trimmed-mean, flame, foolsgold, rflbat, fedclp, fldetector, deepsight, "
                        "or 'all' (repeatable)")
    g.add_argument("--rounds", type=int, help="attack rounds after pretraining")
    g.add_argument("--clients", type=int, help="number of clients N")
    g.add_argument("--attackers", type=int, help="number of attackers (client ids 0..A-1)")
    g.add_argument("--per-round", type=int,
                   help="participants per round (0 = all; fewer = sampled, attackers guaranteed)")
    g.add_argument("--alpha", type=float, help="Dirichlet alpha of the non-IID split")
    g.add_argument("--seed", type=int, help="seed of everything (split, init, sampling, attacks)")
    g.add_argument("--pretrain-rounds", type=int, help="clean FedAvg rounds before the attack")
    g.add_argument("--server-lr", type=float, help="server learning rate eta")
    g.add_argument("--global-rule", choices=["paper", "official"],
                   help="paper: theta += eta*mean(accepted deltas); official: eta/N*sum")
    g.add_argument("--attacker-protocol", choices=["independent", "shared"],
                   help="independent (paper): every attacker trains; shared: authors' code")
    g.add_argument("--asr-rule", choices=["exclude-target", "include-target"])
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any SimConfig field, VALUE in TOML syntax; dotted keys reach attack/"
                        "defense params, e.g. defense_params.mars.kappa=0.1")
    g.add_argument("--record-energy", action="store_true",
                   help="store every upload's CBE and plot energy distributions")
    g.add_argument("--threads", type=int,
                   help="torch threads per run (default 1; part of the experiment: the thread "
                        "count can change the last bits of a result)")
    g.add_argument("--jobs", type=int,
                   help="runs in parallel worker processes (default: one per core; results "
                        "do not depend on it)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default="mars-out", metavar="DIR", help="output directory")
    o.add_argument("--sweep", choices=["ratio", "kappa", "epsilon"],
                   help="attacker-ratio (0..95%%) or MARS kappa/epsilon sensitivity sweep")
    o.add_argument("--sweep-values", metavar="V[,V]", help="override the sweep's values")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")
    o.add_argument("--list", action="store_true", help="list attacks, defenses, presets; exit")


def _parse_value(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def _apply_set(data: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    target = data
    for p in parts[:-1]:
        target = target.setdefault(p, {})
    target[parts[-1]] = _parse_value(value.strip())


def _registry_names(kind: str) -> list[str]:
    import importlib

    mod = importlib.import_module(f"mars_native.sim.{kind}")
    reg = getattr(mod, kind.upper(), None)
    if reg is None:
        raise SystemExit(f"error: mars_native.sim.{kind} has no registry yet")
    return list(reg)


def build_config(args: argparse.Namespace):
    """SimConfig from preset -> TOML file -> flags (later wins)."""
    from .config import PRESETS, SimConfig

    preset = "quick" if args.quick else args.preset
    if preset is None and not args.config:
        preset = "default"
    data: dict[str, Any] = {}
    if preset is not None:
        data.update(PRESETS[preset])
    if args.config:
        file_cfg = SimConfig.from_toml(args.config)
        file_keys = _toml_keys(args.config)
        data.update({k: v for k, v in file_cfg.to_dict().items() if k in file_keys})
    flags = {
        "rounds": args.rounds, "num_clients": args.clients, "num_attackers": args.attackers,
        "per_round": args.per_round, "alpha": args.alpha, "seed": args.seed,
        "pretrain_rounds": args.pretrain_rounds, "server_lr": args.server_lr,
        "global_rule": args.global_rule, "attacker_protocol": args.attacker_protocol,
        "asr_rule": args.asr_rule, "threads": args.threads, "jobs": args.jobs,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.record_energy:
        data["record_energy"] = True
    attacks, defenses = _split_list(args.attack), _split_list(args.defense)
    if attacks:
        data["attacks"] = _registry_names("attacks") if attacks == ["all"] else attacks
    if defenses:
        data["defenses"] = _registry_names("defenses") if defenses == ["all"] else defenses
    for item in args.set:
        _apply_set(data, item)
    return SimConfig.from_dict(data), preset


def _toml_keys(path: str) -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as fh:
        return set(tomllib.load(fh))


def _list(console) -> int:
    from .config import PRESETS

    for kind in ("attacks", "defenses"):
        try:
            names = ", ".join(_registry_names(kind))
        except SystemExit as exc:
            names = str(exc)
        console.print(f"[bold]{kind}[/]: {names}")
    from .data import DATASETS
    from .models import MODELS

    console.print(f"[bold]datasets[/]: {', '.join(DATASETS)}")
    console.print(f"[bold]models[/]: {', '.join(MODELS)}")
    console.print(f"[bold]presets[/]: {', '.join(PRESETS)}")
    return 0


def _validate_names(config) -> None:
    for kind, names in (("attacks", config.attacks), ("defenses", config.defenses)):
        known = _registry_names(kind)
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"unknown {kind[:-1]}(s) {bad}; known: {known}")


def run(args: argparse.Namespace) -> int:
    """Execute ``simulate``; returns the process exit code."""
    from rich.console import Console

    console = Console(stderr=False)
    if args.list:
        return _list(console)
    try:
        config, preset = build_config(args)
        _validate_names(config)
        sweep_values = None
        if args.sweep_values:
            sweep_values = [float(v) for v in args.sweep_values.split(",") if v.strip()]
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2

    from .report import RichProgress, print_table, run_experiments

    out = Path(args.out)
    n_pairs = len(config.attacks) * len(config.defenses)
    n_runs = n_pairs * (len(sweep_values) if sweep_values else 1)
    console.print(
        f"[bold]mars-native simulate[/] preset={preset or '-'}  {config.dataset}, "
        f"{config.num_clients} clients / {config.num_attackers} attackers, alpha={config.alpha}, "
        f"{config.rounds} attack rounds after {config.pretrain_rounds} clean rounds, "
        f"seed {config.seed}; {n_pairs} attack x defense pairs, "
        f"{config.resolved_jobs(n_runs if not args.sweep else 10**6)} parallel jobs x "
        f"{config.resolved_threads()} thread(s) -> {out}/"
    )
    t0 = time.perf_counter()
    if args.sweep:
        from .sweep import run_sweep
        from .sweep import sweep_values as default_values

        values = sweep_values or default_values(args.sweep, config)
        total = len(values) * n_pairs * config.rounds
        with RichProgress(total, console=console, disable=args.no_progress) as prog:
            points = run_sweep(config, args.sweep, values=values, out_dir=out,
                               progress=None if args.no_progress else prog,
                               plots=not args.no_plots, jobs=config.jobs)
        from .report import results_table

        for v in values:
            rows = [r for (val, r) in points if val == v]
            console.print(results_table(rows, title=f"{args.sweep} = {v:g}"))
    else:
        total = n_pairs * config.rounds
        with RichProgress(total, console=console, disable=args.no_progress) as prog:
            results = run_experiments(config, out_dir=out,
                                      progress=None if args.no_progress else prog,
                                      plots=not args.no_plots, jobs=config.jobs)
        print_table(results, console=console, config=config)
    console.print(f"done in {time.perf_counter() - t0:.1f} s; results in {out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mars-native simulate")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
