"""The ``mars-native`` console script, run as a subprocess: the installed script of the Python
environment running the tests when there is one (CI installs the package), else
``python -m mars_native.cli`` on the same ``mars_native`` the tests import (a developer tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_aggregation import assert_state_close, expected_state, make_clients, make_model

import mars_native
from mars_native import io

SCRIPT = Path(sys.executable).with_name("mars-native")
PACKAGE_PARENT = Path(mars_native.__file__).resolve().parents[1]


def _command() -> list[str]:
    if SCRIPT.is_file() and os.access(SCRIPT, os.X_OK):
        return [str(SCRIPT)]
    return [sys.executable, "-m", "mars_native.cli"]


def run_cli(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if _command()[0] == sys.executable:  # not installed: run the package the tests import
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")])
    return subprocess.run([*_command(), *map(str, args)], capture_output=True, text=True, check=False,
                          cwd=cwd, env=env, timeout=300)


def test_the_installed_script_runs_the_tested_package():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"mars-native {mars_native.build_info()['version']}"


@pytest.fixture(scope="module")
def client_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clients")
    base = make_model(0)
    states, attacker = make_clients(base, 6, 2, seed=21)
    paths = []
    for i, s in enumerate(states):
        suffix = (".npz", ".safetensors")[i % 2]
        paths.append(d / f"client{i}{suffix}")
        io.save_state_dict(s, paths[-1])
    io.save_state_dict(base, d / "global.npz")
    return d, base, states, attacker, paths


def test_detect_writes_the_aggregate_and_the_report(client_files, tmp_path):
    _, _, states, attacker, paths = client_files
    out, report_path = tmp_path / "agg.safetensors", tmp_path / "report.json"
    weights = [str(w) for w in range(1, len(paths) + 1)]
    r = run_cli("detect", *paths, "--weights", *weights, "--out", out, "--json", report_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:7] == ["client", "cbe_len", "cbe_min", "cbe_median", "cbe_max",
                                    "cluster", "accepted"]
    for path, is_attacker, line in zip(paths, attacker, lines[1:]):
        assert line.startswith(str(path))
        assert ("high_energy_cluster:" in line) == is_attacker
        assert (" no " in line) == is_attacker
    report = json.loads(report_path.read_text())
    assert report["clients"] == [str(p) for p in paths]
    assert report["aggregated"] == str(out)
    assert report["report"]["accepted"] == [not a for a in attacker]
    new = io.load_state_dict(out)
    expected = expected_state(states, ~attacker, [float(w) for w in weights])
    assert_state_close({k: new[k] for k in expected}, expected)


def test_detect_with_global_model_and_options(client_files, tmp_path):
    d, base, _, _, paths = client_files
    out = tmp_path / "agg.npz"
    r = run_cli("detect", *paths, "--global", d / "global.npz", "--server-lr", "0.5",
                "--kappa", "0.1", "--selection", "majority", "--mode", "official", "--out", out)
    assert r.returncode == 0, r.stderr
    new = io.load_state_dict(out)
    assert list(new) == list(base)
    assert new["bn1.num_batches_tracked"] == base["bn1.num_batches_tracked"]


def test_bad_client_file_stops_or_is_rejected(client_files, tmp_path):
    _, _, _, _, paths = client_files
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    r = run_cli("detect", *paths[:4], corrupt)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("mars-native detect: error: ") and "corrupt.pt" in r.stderr
    report = tmp_path / "r.json"
    r = run_cli("detect", *paths[:4], corrupt, "--skip-unreadable", "--json", report)
    assert r.returncode == 0, r.stderr
    data = json.loads(report.read_text())
    assert data["report"]["reason_codes"][-1] == "invalid_type"
    assert "cannot read the file" in data["report"]["reasons"][-1]


def test_non_finite_client_is_rejected_with_its_reason(client_files, tmp_path):
    _, _, states, _, paths = client_files
    bad = dict(states[0])
    bad["bn2.running_mean"] = np.full_like(bad["bn2.running_mean"], np.inf)
    io.save_state_dict(bad, tmp_path / "bad.npz")
    r = run_cli("detect", *paths, tmp_path / "bad.npz")
    assert r.returncode == 0, r.stderr
    last = [line for line in r.stdout.splitlines() if line.startswith(str(tmp_path / "bad.npz"))]
    assert len(last) == 1 and "non_finite: 'bn2.running_mean'" in last[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no model files given"),
        (("missing.npz",), "missing.npz: no such file"),
        (("{c0}", "{c1}", "--weights", "1"), "--weights has 1 values for 2 model files"),
        (("{c0}", "--out", "agg.txt"), "unsupported file type '.txt'"),
        (("{c0}", "--kappa", "2"), "kappa must be in (0, 1]"),
        (("{c0}", "--global", "{c0}", "--server-lr", "nan"), "server_lr must be finite"),
    ],
)
def test_unusable_input_exits_2_with_one_line(client_files, tmp_path, args, message):
    _, _, _, _, paths = client_files
    args = [a.format(c0=paths[0], c1=paths[1]) for a in args]
    r = run_cli("detect", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("mars-native detect: error: ")
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_no_valid_client_exits_2_but_writes_the_report(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        io.save_state_dict({"fc.weight": rng.standard_normal((3, 2))}, tmp_path / f"m{i}.npz")
    r = run_cli("detect", tmp_path / "m0.npz", tmp_path / "m1.npz", "--json", tmp_path / "r.json",
                "--out", tmp_path / "agg.npz")
    assert r.returncode == 2
    assert "no client model is valid" in r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["aggregated"] is None
    assert not (tmp_path / "agg.npz").exists()


def test_malicious_client_file_is_refused_and_not_executed(client_files, tmp_path):
    torch = pytest.importorskip("torch")
    from test_io import _CreatesAFile

    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "x": _CreatesAFile(str(marker))}, tmp_path / "evil.pt")
    _, _, _, _, paths = client_files
    r = run_cli("detect", *paths[:3], tmp_path / "evil.pt")
    assert r.returncode == 2 and "pickle code execution" in r.stderr
    assert not marker.exists()


def test_help_and_plugin_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("simulate", "detect", "bench"):
        assert command in r.stdout
    r = run_cli("detect", "--help")
    assert r.returncode == 0 and "--global" in r.stdout and "--json" in r.stdout
    for command in ("simulate", "bench"):
        r = run_cli(command, "--help")
        # either the plugin's own help, or a one-line "unavailable" error with exit code 2
        if r.returncode == 0:
            assert f"mars-native {command}" in r.stdout
        else:
            assert r.returncode == 2
            assert r.stderr.startswith(f"mars-native {command}: error: {command} is unavailable")
            assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli()
    assert r.returncode == 2 and "usage:" in r.stdout
