"""End to end through the real attack/defense registries: runs, files, plots, sweep."""

from __future__ import annotations

import csv
import json

import pytest
from _sim_helpers import small_data, tiny_config

from mars_native.sim.report import print_table, results_table, run_experiments
from mars_native.sim.sweep import run_sweep, sweep_configs, sweep_values


@pytest.fixture(scope="module")
def data():
    return small_data()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("sim-out")
    cfg = tiny_config(attacks=["none", "mra"], defenses=["fedavg", "mars", "fedclp"],
                      record_energy=True, rounds=2)
    results = run_experiments(cfg, data=data, out_dir=out)
    return cfg, results, out


def test_every_pair_runs_with_metrics_in_range(experiment):
    cfg, results, _ = experiment
    assert [(r.attack, r.defense) for r in results] == [
        (a, d) for a in cfg.attacks for d in cfg.defenses]
    for r in results:
        assert len(r.rounds) == cfg.rounds
        for key in ("acc", "asr", "acc_mean", "asr_mean", "cad"):
            assert 0.0 <= r.summary[key] <= 1.0
        for rec in r.rounds:
            # ground truth: "none" has honest clients only, "mra" the configured attackers
            expected = 0 if r.attack == "none" else cfg.num_attackers
            assert rec["n_attackers"] == expected == len(rec["attacker_ids"])
            assert rec["n_uploads"] == cfg.num_clients
            assert sorted(rec["upload_ids"]) == list(range(cfg.num_clients))
            assert len(rec["cbe"]) == cfg.num_clients
            assert len(rec["energy_terms"]) == cfg.num_clients
            assert set(rec["energy_terms"][0]) == {"conv1", "conv2", "conv3"}
            if r.defense == "fedclp":
                assert rec["tpr"] is None
            else:
                assert 0.0 <= rec["tpr"] <= 1.0 and 0.0 <= rec["fpr"] <= 1.0
                flagged = set(rec["flagged_ids"])
                att = set(rec["attacker_ids"])
                n_ben = rec["n_uploads"] - len(att)
                assert rec["fpr"] == pytest.approx(len(flagged - att) / n_ben)
                assert rec["tpr"] == pytest.approx(len(flagged & att) / len(att) if att else 1.0)
        if r.defense == "fedavg":
            assert r.tpr == (1.0 if r.attack == "none" else 0.0) and r.fpr == 0.0
    # the same pretrained start for every pair
    assert len({(r.start["acc"], r.start["asr"]) for r in results}) == 1


def test_results_files_follow_the_design_layout(experiment):
    cfg, results, out = experiment
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["rounds"] == cfg.rounds
    assert payload["meta"]["asr_rule"] == "exclude-target"
    rows = payload["results"]
    assert len(rows) == len(results)
    for row in rows:
        for key in ("attack", "defense", "acc", "asr", "tpr", "fpr", "cad", "rounds",
                    "asr_rule", "needs_server_data", "acc_start"):
            assert key in row
        assert len(row["rounds"]) == cfg.rounds
    with open(out / "results.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(r["attack"], r["defense"]) for r in csv_rows] == [
        (r["attack"], r["defense"]) for r in rows]
    assert float(csv_rows[0]["cad"]) == pytest.approx(rows[0]["cad"], rel=1e-5)
    with open(out / "rounds.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(results) * cfg.rounds
    assert "rounds = 2" in (out / "config.toml").read_text()
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| attack | defense |") and len(md) == 2 + len(results)
    assert "| mra | fedclp |" in "\n".join(md) and "| – | – |" in md[-1]
    for name in ("rounds-none.png", "rounds-mra.png", "cad.png", "energy-mra-mars.png"):
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_terminal_table(experiment):
    from rich.console import Console

    _, results, _ = experiment
    console = Console(record=True, width=140)
    print_table(results, console=console, config=experiment[0])
    text = console.export_text()
    for word in ("fedavg", "mars", "fedclp", "none", "mra", "ASR counts"):
        assert word in text
    assert results_table(results).row_count == 3


def test_sweep_ratio_and_kappa(tmp_path, data):
    cfg = tiny_config(rounds=1, num_clients=6, num_attackers=2)
    assert sweep_values("ratio", cfg.replace(num_clients=20)) == [0, 2, 4, 6, 10, 14, 19]
    assert [c.num_attackers for _, c in sweep_configs("ratio", cfg, [0, 3], ["mars"])] == [0, 3]
    kcfgs = sweep_configs("kappa", cfg, [0.1], ["mars", "fedavg"])
    assert kcfgs[0][1].defense_params == {"mars": {"kappa": 0.1}}
    points = run_sweep(cfg, "ratio", values=[0, 3], attacks=["mra"], defenses=["mars"],
                       data=data, out_dir=tmp_path)
    assert [(v, r.config["num_attackers"]) for v, r in points] == [(0, 0), (3, 3)]
    assert points[0][1].tpr == 1.0  # no attacker: TPR := 1
    assert (tmp_path / "sweep-ratio.png").exists()
    rows = json.loads((tmp_path / "sweep-ratio.json").read_text())["results"]
    assert [r["value"] for r in rows] == [0, 3]
    with pytest.raises(ValueError, match="sweep"):
        sweep_values("lr", cfg)
