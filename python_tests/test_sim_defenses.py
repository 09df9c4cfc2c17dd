"""Simulation defenses: registry, well-formed outputs, FedAvg, robust statistics, MARS."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from _sim_defense_cases import (
    generic_round,
    global_state,
    layout_of,
    make_round,
    out_vector,
    random_deltas,
    states_from_deltas,
)

from mars_native.sim.defenses import DEFENSES, make_defense
from mars_native.sim.defenses.base import Defense, DefenseOutput
from mars_native.sim.defenses.common import FlatLayout, RoundVectors, is_float_key

torch.set_num_threads(1)

NAMES = [
    "fedavg",
    "mars",
    "mars-star",
    "mars-official",
    "multikrum",
    "median",
    "trimmed-mean",
    "flame",
    "foolsgold",
    "rflbat",
    "fedclp",
    "fldetector",
    "deepsight",
]
FAST = {"deepsight": {"n_noise": 32}}


def test_registry_names_and_flags():
    assert sorted(DEFENSES) == sorted(NAMES)
    for name, cls in DEFENSES.items():
        assert issubclass(cls, Defense)
        d = make_defense(name, **FAST.get(name, {}))
        assert d.name == name
        assert d.needs_server_data is False
        assert d.flags_clients is (name != "fedclp")
        json.dumps(d.config())
    with pytest.raises(ValueError, match="unknown defense"):
        make_defense("nope")


@pytest.mark.parametrize("name", NAMES)
def test_every_defense_returns_a_well_formed_output(name):
    g, states, _ = generic_round()
    d = make_defense(name, **FAST.get(name, {}))
    d.reset()
    out = d(make_round(g, states))
    assert isinstance(out, DefenseOutput)
    float_keys = [k for k, v in g.items() if is_float_key(k, v)]
    assert list(out.update_sum) == float_keys
    for k in float_keys:
        assert out.update_sum[k].shape == g[k].shape and out.update_sum[k].dtype == g[k].dtype
        assert torch.isfinite(out.update_sum[k]).all()
    assert np.isfinite(out.weight_total) and out.weight_total >= 0
    if d.flags_clients:
        assert (
            out.flagged is not None
            and out.flagged.shape == (len(states),)
            and out.flagged.dtype == bool
        )
    else:
        assert out.flagged is None
    assert out.reset_state is None
    assert out.detect_seconds > 0
    json.dumps(out.info)


def test_flat_layout_round_trip_and_errors():
    g = global_state()
    layout = FlatLayout.from_state(g)
    assert "bn1.num_batches_tracked" not in layout.keys and "bn1.running_var" in layout.keys
    vec = layout.flatten(g)
    back = layout.to_state(vec)
    for k in layout.keys:
        assert torch.equal(back[k], g[k])
    bad = dict(g)
    bad["fc2.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"fc2\.bias"):
        layout.flatten(bad)
    del bad["fc2.bias"]
    with pytest.raises(ValueError, match=r"fc2\.bias"):
        layout.flatten(bad)


def test_fedavg_is_the_plain_mean():
    g, states, deltas = generic_round()
    out = make_defense("fedavg")(make_round(g, states))
    assert out.weight_total == len(states) and not out.flagged.any()
    np.testing.assert_allclose(
        out_vector(out, g) / out.weight_total, deltas.mean(axis=0), atol=1e-6
    )
    ex = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    out = make_defense("fedavg", weighting="examples")(make_round(g, states, num_examples=ex))
    assert out.weight_total == sum(ex)
    np.testing.assert_allclose(out_vector(out, g), np.asarray(ex, float) @ deltas, atol=1e-5)


def test_multikrum_drops_the_f_outliers():
    g = global_state()
    deltas = random_deltas(g, 12, seed=3)
    rng = np.random.default_rng(4)
    outliers = [2, 5, 7, 11]
    for i in outliers:
        deltas[i] += rng.normal(0, 1.0, deltas.shape[1])
    out = make_defense("multikrum", f=4)(make_round(g, states_from_deltas(g, deltas)))
    assert np.flatnonzero(out.flagged).tolist() == outliers
    assert out.weight_total == 8
    kept = np.setdiff1d(np.arange(12), outliers)
    np.testing.assert_allclose(out_vector(out, g), deltas[kept].sum(axis=0), atol=1e-5)


def test_multikrum_scores_match_a_direct_computation():
    from mars_native.sim.defenses.robust import krum_scores

    x = np.random.default_rng(0).normal(size=(7, 5))
    f = 2
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    expect = [np.sort(np.delete(d[i], i))[: 7 - f - 2].sum() for i in range(7)]
    np.testing.assert_allclose(krum_scores(x, f), expect, rtol=1e-10)
    np.testing.assert_allclose(
        krum_scores(x, f, squared=True),
        [np.sort(np.delete(d[i] ** 2, i))[:3].sum() for i in range(7)],
        rtol=1e-10,
    )


def test_median_and_trimmed_mean_equal_numpy_and_scipy():
    from scipy.stats import trim_mean

    g = global_state()
    deltas = random_deltas(g, 11, seed=5)
    deltas[:3] *= 100.0  # outliers move neither statistic much
    rin = make_round(g, states_from_deltas(g, deltas))
    rv = RoundVectors.from_round(rin)  # the float32 round trip of the states
    out = make_defense("median")(rin)
    assert out.weight_total == 11 and not out.flagged.any()
    np.testing.assert_allclose(
        out_vector(out, g) / 11, np.median(rv.deltas, axis=0), rtol=1e-6, atol=1e-7
    )
    out = make_defense("trimmed-mean", beta=0.2)(rin)
    assert out.weight_total == 11 and not out.flagged.any()
    np.testing.assert_allclose(
        out_vector(out, g) / 11, trim_mean(rv.deltas, 0.2, axis=0), rtol=1e-6, atol=1e-7
    )


def _amplified_bn_round(n: int = 12, attackers: tuple[int, ...] = (0, 1, 2)):
    widths = (16, 32)
    g = global_state(widths)
    deltas = random_deltas(g, n, scale=0.003, seed=6)
    states = states_from_deltas(g, deltas)
    for i in attackers:
        for bn in ("bn1", "bn2"):
            w = states[i][f"{bn}.weight"].clone()
            w[:2] *= 8.0  # a few channels with an exploded Lipschitz constant
            states[i][f"{bn}.weight"] = w
    return g, states, widths


@pytest.mark.parametrize("name", ["mars", "mars-star", "mars-official"])
def test_mars_flags_amplified_bn_clients(name):
    g, states, widths = _amplified_bn_round()
    d = make_defense(name)
    out = d(make_round(g, states, widths=widths))
    assert np.flatnonzero(out.flagged).tolist() == [0, 1, 2]
    assert out.weight_total == 9
    rv = RoundVectors.from_round(make_round(g, states, widths=widths))
    np.testing.assert_allclose(out_vector(out, g), rv.deltas[3:].sum(axis=0), atol=1e-5)
    assert out.info["accepted"] == [False] * 3 + [True] * 9
    assert "detect_only_seconds" in out.info
    json.dumps(out.info)


def test_mars_accepts_everybody_without_attack():
    g, states, widths = _amplified_bn_round(attackers=())
    out = make_defense("mars")(make_round(g, states, widths=widths))
    assert not out.flagged.any() and out.weight_total == 12
    assert layout_of(g).size == out_vector(out, g).size


def test_a_rejected_non_finite_upload_never_reaches_the_sum():
    g, states, widths = _amplified_bn_round(attackers=())
    states[4] = {k: v.clone() for k, v in states[4].items()}
    states[4]["fc1.weight"][0, 0] = float("nan")
    out = make_defense("mars")(make_round(g, states, widths=widths))
    assert out.flagged[4] and out.info["reason_codes"][4] == "non_finite"
    for v in out.update_sum.values():
        assert torch.isfinite(v).all()
