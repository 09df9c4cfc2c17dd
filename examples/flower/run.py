"""MARS in a Flower simulation, in one command: ``python examples/flower/run.py``.

Ten Flower SuperNodes train the arena's DigitsCNN on scikit-learn's bundled digits (Dirichlet
non-IID split, no download); partitions 0-2 run the model-replacement attack (MRA) of
``mars_native.sim``. The server aggregates with ``mars_native.flower.Mars`` and prints, per round,
which partitions MARS rejected, the clean accuracy (ACC) and the backdoor success rate (ASR).
``--strategy fedavg`` runs the same federation without the defense, for comparison.

Needs the extras ``flower`` and ``sim`` (``pip install 'mars-native[flower,sim]'``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reporting
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Ray's workers import the ClientApp from mars_flower_app.py: put this folder on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)
sys.path.insert(0, str(HERE))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--strategy", choices=("mars", "mars-star", "fedavg"), default="mars")
    p.add_argument("--clients", type=int, default=10, help="Flower SuperNodes (default 10)")
    p.add_argument("--attackers", type=int, default=3, help="MRA attackers (partitions 0..k-1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gamma", type=float, default=5.0, help="MRA scale factor (arena default 5)")
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=2,
        help="centralised pretraining epochs of the starting model",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--report",
        default=None,
        help="JSONL file for the per-round MARS reports (default: a temp file)",
    )
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--verbose", action="store_true", help="show Flower's INFO log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mars_flower_app as app
    import torch
    from flwr.simulation import run_simulation

    from mars_native.sim.config import SimConfig

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="mars-flower-"))
    os.environ.setdefault("FLWR_HOME", str(tmp / "flwr-home"))
    report = Path(args.report) if args.report else tmp / "mars-report.jsonl"
    config = SimConfig(
        num_clients=args.clients,
        num_attackers=args.attackers,
        seed=args.seed,
        threads=1,
    )
    app.SETTINGS.update(
        config=config,
        strategy=args.strategy,
        rounds=args.rounds,
        gamma=args.gamma,
        report=str(report) if args.strategy != "fedavg" else None,
        pretrain_epochs=args.pretrain_epochs,
    )
    print(
        f"Flower simulation: {args.clients} clients ({args.attackers} MRA attackers: partitions "
        f"{list(range(args.attackers))}, gamma {args.gamma}), {args.rounds} rounds, "
        f"strategy {args.strategy}"
    )
    t0 = time.perf_counter()
    run_simulation(
        server_app=app.server,
        client_app=app.client,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )
    elapsed = time.perf_counter() - t0
    if "result" not in app.RESULTS:
        print("the ServerApp did not finish; rerun with --verbose to see Flower's log")
        return 1
    evaluations = app.RESULTS["evaluations"]
    strategy = app.RESULTS["strategy"]
    history = getattr(strategy, "history", None)
    acc0, asr0 = evaluations[0]
    print(
        f"\nround  rejected partitions       ACC     ASR   (start: ACC {acc0:.3f}, ASR {asr0:.3f})"
    )
    for rnd in range(1, args.rounds + 1):
        acc, asr = evaluations.get(rnd, (float("nan"), float("nan")))
        rejected = "-"
        if history is not None:
            rec = history[rnd - 1]
            parts = [int(m.get("partition-id", -1)) for m in rec.client_metrics]
            rejected = str(sorted(p for p, ok in zip(parts, rec.accepted) if not ok))
        print(f"{rnd:>5}  {rejected:<24} {acc:6.3f}  {asr:6.3f}")
    acc, asr = evaluations[args.rounds]
    print(f"\nfinal: ACC {acc:.3f}, ASR {asr:.3f} ({elapsed:.1f} s)")
    if history is not None:
        print(f"per-round MARS reports (JSONL): {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
