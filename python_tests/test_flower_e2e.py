"""End to end: Flower's in-process simulation (Ray backend) with the Mars strategy.

Five SuperNodes train a small conv/BN CNN on scikit-learn's bundled digits for two rounds; the
nodes holding partitions 3 and 4 scale their update by 20 before replying (model-replacement
style). Node ids are random per run, so every reply reports its ``partition-id`` as a metric and
the test maps rejections back through it.

The simulation runs in a child Python process (this file is its script). Ray leaves open
``/dev/null`` handles and not-yet-reaped helper processes behind when it shuts down; in the pytest
process those surface as ``ResourceWarning``s at random garbage-collection points, which the
project's ``filterwarnings = error`` turns into failures of whatever test runs next. The child
treats every warning raised by ``mars_native`` itself as an error (``-W error:::mars_native``)
and reports a JSON summary that the test checks. One simulation, about 15-60 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flwr")
pytest.importorskip("ray", reason="Flower's simulation backend (ray) is not installed")
pytest.importorskip("sklearn")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

NUM_NODES = 5
NUM_ROUNDS = 2
ATTACKER_PARTITIONS = (3, 4)
BOOST = 20.0
RESULTS: dict = {}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def partition(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = torch.arange(pid, x.shape[0], NUM_NODES)[:200]
    return x[idx], y[idx]


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    torch.manual_seed(100 * rnd + pid)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = partition(pid)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for start in range(0, x.shape[0], 32):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
        loss.backward()
        opt.step()
    sd = model.state_dict()
    if pid in ATTACKER_PARTITIONS:  # scale the update: theta + BOOST * (w - theta)
        sd = {
            k: (g + BOOST * (v - g)) if v.is_floating_point() else v
            for (k, v), g in zip(sd.items(), global_sd.values())
        }
    metrics = MetricRecord(
        {"train_loss": float(loss.item()), "num-examples": int(x.shape[0]), "partition-id": pid}
    )
    return Message(
        content=RecordDict({"arrays": ArrayRecord(sd), "metrics": metrics}), reply_to=msg
    )


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from mars_native.flower import Mars

    random.seed(0)
    torch.manual_seed(0)
    strategy = Mars(
        fraction_evaluate=0.0,
        min_train_nodes=NUM_NODES,
        min_available_nodes=NUM_NODES,
        report_path=RESULTS["report_path"],
    )
    RESULTS["strategy"] = strategy
    RESULTS["result"] = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=NUM_ROUNDS
    )


def run_and_summarize(workdir: Path) -> dict:
    """Run the simulation (in this process) and summarise what the strategy saw, JSON-ready."""
    import logging

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    RESULTS.clear()
    RESULTS["report_path"] = workdir / "mars.jsonl"
    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=NUM_NODES,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": False},
        },
    )
    summary: dict = {"seconds": time.perf_counter() - t0, "finished": "result" in RESULTS}
    if not summary["finished"]:
        return summary
    strategy, result = RESULTS["strategy"], RESULTS["result"]
    summary["rounds"] = [
        {
            "round": rec.server_round,
            "partitions": [int(m["partition-id"]) for m in rec.client_metrics],
            "accepted": rec.accepted,
            "reasons": rec.reasons,
        }
        for rec in strategy.history
    ]
    summary["final_finite"] = all(
        bool(np.isfinite(a).all()) for a in result.arrays.to_numpy_ndarrays() if a.dtype.kind == "f"
    )
    summary["num_rejected"] = {
        str(r): m["mars-num-rejected"] for r, m in result.train_metrics_clientapp.items()
    }
    summary["global_recorded"] = strategy.current_arrays is not None
    summary["report_lines"] = len(RESULTS["report_path"].read_text().splitlines())
    return summary


@pytest.mark.slow
def test_flower_simulation_rejects_the_boosted_partitions(tmp_path):
    out = tmp_path / "summary.json"
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
    )
    import mars_native  # the child imports the same mars_native as this process

    home = str(Path(mars_native.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-W", "error:::mars_native", __file__, str(tmp_path), str(out)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["finished"], "the ServerApp did not finish:\n" + proc.stderr[-4000:]
    assert len(summary["rounds"]) == NUM_ROUNDS
    for rec in summary["rounds"]:
        assert sorted(rec["partitions"]) == list(range(NUM_NODES)), "every node replied"
        rejected = sorted(p for p, ok in zip(rec["partitions"], rec["accepted"]) if not ok)
        assert rejected == list(ATTACKER_PARTITIONS), rec
        for ok, reason in zip(rec["accepted"], rec["reasons"]):
            assert ok or reason.startswith("high_energy_cluster:"), reason
    assert summary["final_finite"]
    assert summary["num_rejected"] == {"1": 2, "2": 2}
    assert summary["global_recorded"]  # configure_train recorded the global model
    assert summary["report_lines"] == NUM_ROUNDS
    # The rejections are logged with node ids and reasons (Flower's logger, WARNING).
    assert proc.stderr.count("rejected node") == 2 * NUM_ROUNDS
    print(
        f"flower simulation: {NUM_NODES} nodes x {NUM_ROUNDS} rounds in {summary['seconds']:.1f} s"
    )


if __name__ == "__main__":  # the child process of the test above
    workdir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    out_path.write_text(json.dumps(run_and_summarize(workdir)))
