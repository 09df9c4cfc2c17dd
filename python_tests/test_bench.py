"""The benchmark code itself (mars_native.bench): tiny sizes, correct outputs, no timing assertions.

Every implementation a benchmark times must compute the same thing as mars_native on the same
data; the runner must produce its table, JSON, Markdown and PNG.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")
pytest.importorskip("sklearn")

from mars_native.bench import baselines as bl
from mars_native.bench import cases, cli, report, timing
from mars_native.bench import models as bm
from mars_native.layers import find_layers


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with bl.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_resnet():
    model = bm.build_model("tiny-resnet", seed=3)
    base = bm.base_state(model)
    states, attackers = bm.make_clients(base, 5, seed=3)
    return model, base, states, attackers, find_layers(base)


# ---------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name,params", [("resnet18", 11_183_562), ("cnn", 503_946)])
def test_model_sizes(name, params):
    base = bm.base_state(bm.build_model(name))
    assert sum(v.size for v in base.values() if v.dtype.kind == "f") == params


def test_wide_model_has_the_advertised_layer_shapes():
    base = bm.base_state(bm.build_model("tiny-resnext"))
    kernels = {v.shape[2:] for v in base.values() if v.ndim == 4}
    assert {(7, 7), (3, 3), (1, 1)} <= kernels
    grouped = [v for k, v in base.items() if k.endswith("conv2.weight")]
    assert grouped and all(v.shape[1] < v.shape[0] for v in grouped)  # in-per-group < out


def test_clients_are_distinct_deterministic_and_valid(tiny_resnet):
    _, base, states, attackers, _ = tiny_resnet
    again, _ = bm.make_clients(base, 5, seed=3)
    assert attackers.tolist() == [True, False, False, False, False]
    # every prefix of a population has the same attacker share
    assert bm.make_clients(base, 10)[1].tolist() == [i % 5 == 0 for i in range(10)]
    assert cases.synthetic_cbes(10, 4)[1].tolist() == [i % 5 == 0 for i in range(10)]
    for s, t in zip(states, again):
        assert list(s) == list(base)
        for k in base:
            assert s[k].dtype == base[k].dtype and s[k].shape == base[k].shape
            np.testing.assert_array_equal(s[k], t[k])
        assert all((s[k] > 0).all() for k in s if k.endswith("running_var"))
    key = "layer1.0.conv1.weight"
    assert not np.array_equal(states[1][key], states[2][key])
    assert np.abs(states[1][key] - base[key]).max() < 0.1 * np.abs(base[key]).max()


# ---------------------------------------------------------------------------------- CBE
@pytest.mark.parametrize("name", ["tiny-cnn", "tiny-resnext"])
def test_cbe_baselines_agree_on_other_layer_shapes(name):
    model = bm.build_model(name)
    base = bm.base_state(model)
    states, _ = bm.make_clients(base, 2)
    layers = find_layers(base)
    native = bl.cbe_native(states, layers, n_threads=1)
    np.testing.assert_allclose(bl.cbe_numpy(states, layers), native, rtol=1e-12)
    np.testing.assert_allclose(bl.cbe_torch(states, layers), native, rtol=1e-5)
    official = bl.cbe_native(states, layers, mode="official", n_threads=1)
    np.testing.assert_allclose(bl.cbe_authors(states[:1], model)[0], official[0], rtol=1e-5)


def test_cbe_baselines_agree_with_native(tiny_resnet):
    model, _, states, _, layers = tiny_resnet
    native = bl.cbe_native(states, layers, n_threads=1)
    assert native.shape == (5, sum(_k(states[0], la) for la in layers))
    np.testing.assert_array_equal(bl.cbe_native_per_model(states, layers, n_threads=2), native)
    np.testing.assert_allclose(bl.cbe_numpy(states, layers), native, rtol=1e-12)
    np.testing.assert_allclose(bl.cbe_torch(states, layers), native, rtol=1e-5)
    official = bl.cbe_native(states, layers, mode="official", n_threads=1)
    for got, want in zip(bl.cbe_authors(states, model), official):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def _k(state, layer):
    from mars_native import reference

    return reference.top_k_count(state[layer.weight_key].shape[0], 0.05)


def test_authors_pairs_follow_module_order(tiny_resnet):
    model, _, _, _, layers = tiny_resnet
    pairs = bl.authors_pairs(model)
    assert len(pairs) == len(layers) == 20
    assert all(conv.out_channels == bn.num_features for conv, bn in pairs)


def test_read_floor_reads_every_element_once(tiny_resnet):
    _, _, states, _, layers = tiny_resnet
    # plus what the native floor cannot read (integer buffers, strided views): read by NumPy
    arrays = bl.scored_arrays(states, layers) + [np.arange(7), np.ones((6, 6), np.float32)[:, ::2]]
    want = sum(float(a.astype(np.float64).sum()) for a in arrays)
    for threads in (1, 3):
        with bl.Reader(threads) as reader:
            assert math.isclose(bl.read_floor(arrays, reader), want, rel_tol=1e-4, abs_tol=1e-3)


# ---------------------------------------------------------------------------------- clustering
def test_cluster_baselines_find_the_same_partition():
    X, attackers = cases.synthetic_cbes(40, 30, seed=1)
    for labels in (bl.cluster_native(X, n_threads=1), bl.cluster_native(X, mode="official"),
                   bl.cluster_numpy(X), bl.cluster_authors(X)):
        labels = np.asarray(labels)
        assert len(set(labels[attackers])) == 1 and len(set(labels[~attackers])) == 1
        assert labels[attackers][0] != labels[~attackers][0]


def test_scipy_pairwise_matches_native():
    from mars_native._native import pairwise_wasserstein

    X, _ = cases.synthetic_cbes(9, 12, seed=2)
    np.testing.assert_allclose(bl.pairwise_scipy(X), pairwise_wasserstein(X), rtol=1e-10, atol=1e-12)
    partial = bl.pairwise_scipy(X, [(0, 3)])
    assert partial[0, 3] == partial[3, 0] > 0 and np.count_nonzero(partial) == 2


# ---------------------------------------------------------------------------------- aggregation
def test_aggregation_baselines_agree(tiny_resnet):
    _, base, states, _, _ = tiny_resnet
    keys = bl.float_keys(base)
    assert "layer1.0.bn1.num_batches_tracked" not in keys
    native = bl.aggregate_native(states, keys, n_threads=1)
    numpy_ = bl.aggregate_numpy(states, keys)
    torch_ = bl.aggregate_torch(states, keys)
    exact = {k: np.mean([s[k].astype(np.float64) for s in states], axis=0) for k in keys}
    for k in keys:
        assert native[k].dtype == np.float32
        np.testing.assert_allclose(native[k], exact[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(numpy_[k], exact[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(torch_[k], exact[k], rtol=1e-5, atol=1e-6)
    with bl.Reader(1) as reader:
        floor = bl.aggregate_floor(states, keys, reader)
        assert set(floor) == set(keys) and all(floor[k].shape == base[k].shape for k in keys)
        again = bl.aggregate_floor(states, keys, reader, out=floor)  # into the caller's buffers
    assert again is floor and all(not floor[k].any() for k in keys)


# ---------------------------------------------------------------------------------- timing
def test_measure_protocol():
    calls = []
    figs = timing.measure({"a": lambda: calls.append("a"), "b": lambda: timing.Estimate(2.0, "x2"),
                           "c": lambda: 1 / 0}, repeat=3,
                          warmups={"a": lambda: calls.append("warm")})
    assert calls == ["warm", "a", "a", "a"]
    assert figs["a"].k == 3 and figs["a"].best <= figs["a"].median
    assert figs["b"].k == 1 and figs["b"].best == 2.0 and figs["b"].estimated == "x2"
    assert figs["c"].k == 0 and "ZeroDivisionError" in figs["c"].error
    assert math.isnan(figs["c"].best)
    assert json.dumps(figs["a"].to_dict())


def test_budget_limits_repeats():
    figs = timing.measure({"slow": lambda: None}, repeat=5, budget_s=0.0)
    assert figs["slow"].k == 1


def test_peak_rss_delta_sees_an_allocation():
    delta = timing.peak_rss_delta(lambda: np.ones(8 << 20))  # 64 MiB
    if delta is not None:
        assert delta > 32 << 20


def test_peak_rss_delta_sees_memory_the_buffer_cache_would_hide():
    from mars_native import _core

    def filled():
        a = _core.cached_zeros(8 << 20)  # 64 MiB
        a[:] = 1.0
        return a

    filled()  # (dropped at once: its block is cached, a second call would reuse mapped pages)
    assert _core.buffer_cache_info()["cached_bytes"] >= 64 << 20
    delta = timing.peak_rss_delta(filled)
    if delta is not None:
        assert delta > 32 << 20
    assert _core.buffer_cache_info()["limit_bytes"] == 512 << 20  # (restored)


# ---------------------------------------------------------------------------------- the runner
def _tiny_args(tmp_path, **extra):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = ["--models", "tiny-cnn", "--clients", "2,3", "--cluster-sizes", "8,12",
            "--repeat", "1", "--threads", "1", "--out", str(tmp_path), "--quiet"]
    for k, v in extra.items():
        argv += [f"--{k}", v]
    return parser.parse_args(argv)


def test_runner_writes_table_json_markdown_and_plot(tmp_path, capsys):
    assert cli.run(_tiny_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "CBE of N client models" in out and "read floor" in out
    results = json.loads((tmp_path / "results.json").read_text())
    groups = {c["group"] for c in results["cases"]}
    assert groups == {"cbe", "cluster", "aggregate", "round"}
    assert [c["clients"] for c in results["cases"] if c["group"] == "cbe"] == [2, 3]
    for c in results["cases"]:
        for name, fig in c["impls"].items():
            assert fig["error"] is None or c["group"] == "cluster", (c["group"], name, fig["error"])
        if c["group"] == "cbe":
            assert c["check"]["numpy_max_rel_diff"] < 1e-12
            assert c["check"]["torch_max_rel_diff"] < 1e-5
            assert c["check"]["authors_vs_official_max_rel_diff"] < 1e-5
            assert {"mars_native", "per_model", "numpy", "torch_batched", "authors", "floor"} == set(c["impls"])
        if c["group"] == "round":
            assert set(c["peak_memory_bytes"]) == {"batch", "streaming"}
    assert results["machine"]["cpus_available"] >= 1
    assert results["threads"] == 1
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("## Benchmark results") and "| case |" in md and "bench.png" in md
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_estimates_are_flagged(tmp_path):
    config = cases.Config.quick(models=["tiny-resnet"], clients=[3], groups=["cbe", "cluster"],
                                cluster_sizes=[30], repeat=1, threads=1, slow_budget_s=0.0,
                                max_pairs=10)
    results = cases.Suite(config).run()
    cbe = next(c for c in results["cases"] if c["group"] == "cbe")
    assert cbe["impls"]["authors"]["estimated"].startswith("1 of 3 clients")
    assert cbe["impls"]["mars_native"]["estimated"] is None
    clus = next(c for c in results["cases"] if c["group"] == "cluster")
    assert "pairs timed" in clus["impls"]["authors"]["estimated"]


def test_targets_and_scaling_from_synthetic_results():
    def case(group, clients, t_main, **impls):
        main = "batch" if group == "round" else "mars_native"
        figs = {main: {"best_s": t_main, "k": 1, "estimated": None}}
        figs.update({k: {"best_s": v, "k": 1, "estimated": None} for k, v in impls.items()})
        return {"group": group, "model": "resnet18", "clients": clients, "params": 11e6, "impls": figs}

    results = {"cases": [
        case("cbe", 20, 0.1, floor=0.06, authors=10.0, torch_batched=0.5),
        case("cbe", 10, 0.05, floor=0.03, authors=5.0, torch_batched=0.25),
        case("cluster", 1000, 0.02, authors=3.0),
        case("aggregate", 20, 0.1, floor=0.08),
        case("round", 20, 0.5, floor=0.1, streaming=0.6),
    ]}
    got = {t["target"]: t["met"] for t in report.targets(results)}
    assert got["CBE, 20 ResNet-18 clients: time / stream-read floor"] is True
    assert got["CBE, 20 ResNet-18 clients: speed-up vs batched torch"] is False
    assert got["Clustering 1,000 CBEs: KWMeans time"] is True
    assert got["Round, 20 ResNet-18 clients (batch): time / read-states-once"] is False
    assert any("N^1.00" in line for line in report.scaling(results))


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        cli.run(_tiny_args(tmp_path, models="nope"))
    with pytest.raises(ValueError, match="unknown group"):
        cli.run(_tiny_args(tmp_path, groups="cbe,nope"))


def test_console_script_routes_bench(tmp_path, capsys):
    from mars_native.cli import main

    code = main(["bench", "--models", "tiny-cnn", "--clients", "2", "--groups", "aggregate",
                 "--repeat", "1", "--threads", "1", "--quiet", "--json", str(tmp_path / "r.json")])
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["cases"][0]["group"] == "aggregate"


def test_command_line_is_reconstructed_once_for_every_entry_point():
    from mars_native.bench.cli import _command_line

    want = "mars-native bench --full --out 'a b'"
    assert _command_line(["/venv/bin/mars-native", "bench", "--full", "--out", "a b"]) == want
    assert _command_line(["/src/mars_native/cli.py", "bench", "--full", "--out", "a b"]) == want
    assert _command_line(["/src/mars_native/bench/cli.py", "--full", "--out", "a b"]) == want
    assert _command_line(["/usr/bin/pytest", "-q"]) is None
    assert _command_line([]) is None
