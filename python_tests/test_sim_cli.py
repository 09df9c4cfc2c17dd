"""``mars-native simulate``: the installed console script (or its module entry point)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mars_native

# the directory that holds the mars_native being tested (the source tree after a developer build,
# site-packages after pip install): the child process must import the same package
PKG_PARENT = Path(mars_native.__file__).resolve().parents[1]

TINY = """\
attacks = ["mra"]
defenses = ["fedavg", "mars"]
num_clients = 6
num_attackers = 2
model_widths = [8, 8, 16]
fc_width = 8
pretrain_rounds = 1
rounds = 2
local_epochs = 1
attacker_epochs = 1
batch_size = 64
threads = 1
"""


def _cmd() -> list[str]:
    exe = shutil.which("mars-native")
    if exe is not None:
        return [exe]
    # not pip-installed (development tree): the console script's entry point, same code path
    return [sys.executable, "-m", "mars_native.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PKG_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "160"
    return subprocess.run([*_cmd(), "simulate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_simulate_tiny_config_writes_results(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    p = _run("--config", str(cfg), "--seed", "2", "--out", str(out), "--no-progress",
             "--defense", "fedavg,mars", "--set", "defense_params.mars.epsilon=0.05",
             "--jobs", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "fedavg" in p.stdout and "mars" in p.stdout and "CAD" in p.stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["seed"] == 2  # the flag overrides the file
    assert payload["config"]["rounds"] == 2  # the file overrides the defaults
    assert payload["config"]["defense_params"] == {"mars": {"epsilon": 0.05}}
    assert [(r["attack"], r["defense"]) for r in payload["results"]] == [
        ("mra", "fedavg"), ("mra", "mars")]
    assert payload["results"][1]["defense_params"]["epsilon"] == 0.05
    assert (out / "results.csv").exists() and (out / "cad.png").exists()
    assert list((out / "cache").glob("pretrain-*.pt"))
    assert payload["meta"]["jobs"] == 2
    # two worker processes give exactly the records of a sequential in-process run
    from mars_native.sim.config import SimConfig
    from mars_native.sim.report import run_experiments

    seq = run_experiments(SimConfig.from_dict(payload["config"]), jobs=1)
    for row, res in zip(payload["results"], seq):
        for a, b in zip(row["rounds"], res.rounds):
            for key in ("acc", "asr", "tpr", "fpr", "flagged_ids", "upload_ids"):
                assert a[key] == b[key]


def test_simulate_errors_help_and_list(tmp_path, capsys):
    from mars_native.cli import main

    assert main(["simulate", "--attack", "nope", "--quick", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().out
    assert main(["simulate", "--quick", "--clients", "3", "--attackers", "5",
                 "--out", str(tmp_path)]) == 2
    assert "num_attackers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "presets" in text and "--sweep" in text and "--attack" in text
    assert main(["simulate", "--list"]) == 0
    text = capsys.readouterr().out
    assert "3dfed" in text and "fldetector" in text and "digits" in text


def test_module_entry_point(capsys):
    import runpy

    with pytest.raises(SystemExit) as exc:
        import sys as _sys

        argv, _sys.argv = _sys.argv, ["mars_native.sim", "--list"]
        try:
            runpy.run_module("mars_native.sim", run_name="__main__")
        finally:
            _sys.argv = argv
    assert exc.value.code == 0 and "mars-star" in capsys.readouterr().out
