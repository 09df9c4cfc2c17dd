"""Simulation defenses with history or pruning (FLDetector, FedCLP) and the shared helpers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from _sim_defense_cases import (
    global_state,
    layout_of,
    make_round,
    out_vector,
    random_deltas,
    states_from_deltas,
)

from mars_native.sim.defenses import make_defense
from mars_native.sim.defenses.common import (
    RoundVectors,
    cosine_distance_matrix,
    gap_statistic,
    hdbscan_labels,
)
from mars_native.sim.defenses.fldetector import lbfgs_hvp

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- helpers
def test_lbfgs_hvp_equals_dense_bfgs_updates():
    rng = np.random.default_rng(0)
    d, m = 6, 3
    a = rng.normal(size=(d, d))
    hess = a @ a.T + d * np.eye(d)
    s = rng.normal(size=(m, d))
    y = s @ hess  # exact curvature pairs of a quadratic
    sigma = y[-1] @ s[-1] / (s[-1] @ s[-1])
    b = sigma * np.eye(d)
    for si, yi in zip(s, y):
        bs = b @ si
        b = b - np.outer(bs, bs) / (si @ bs) + np.outer(yi, yi) / (yi @ si)
    v = rng.normal(size=d)
    np.testing.assert_allclose(lbfgs_hvp(s, y, v), b @ v, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lbfgs_hvp(s, y, s[-1]), y[-1], rtol=1e-9)  # secant condition


def test_gap_statistic_counts_obvious_clusters():
    rng = np.random.default_rng(1)
    one = rng.normal(size=(40, 2))
    two = np.r_[rng.normal(size=(20, 2)), rng.normal(size=(20, 2)) + 10]
    three = np.r_[
        rng.normal(size=(15, 2)),
        rng.normal(size=(15, 2)) + [20, 0],
        rng.normal(size=(15, 2)) + [0, 20],
    ]
    assert gap_statistic(one, np.random.default_rng(2)).k == 1
    assert gap_statistic(two, np.random.default_rng(2)).k == 2
    assert gap_statistic(three, np.random.default_rng(2)).k == 3
    assert gap_statistic(np.ones((5, 1)), np.random.default_rng(2)).k == 1  # one distinct point
    scores = np.r_[np.full(16, 0.01), np.full(4, 0.25)] + np.random.default_rng(3).normal(
        0, 1e-3, 20
    )
    assert gap_statistic(scores, np.random.default_rng(2), n_refs=20).k >= 2


def test_cosine_distances_and_hdbscan_wrapper():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    d = cosine_distance_matrix(x)
    assert (
        d[0, 1] == pytest.approx(0.0)
        and d[0, 2] == pytest.approx(1.0)
        and d[0, 3] == pytest.approx(1.0)
    )
    assert np.all(np.diag(d) == 0) and np.array_equal(d, d.T)
    assert hdbscan_labels(np.zeros((1, 1)), precomputed=True).tolist() == [0]
    pts = np.r_[np.zeros((5, 2)), np.full((5, 2), 10.0)] + np.random.default_rng(0).normal(
        0, 0.01, (10, 2)
    )
    labels = hdbscan_labels(pts, min_cluster_size=3)
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1 and labels[0] != labels[5]


# ----------------------------------------------------------------------------- FLDetector
def _fl_run(defense, rounds: int, attackers=(0, 1, 2, 3), n: int = 20, seed: int = 0):
    """Drive the defense like the loop does; benign clients follow a consistent quadratic descent,
    attackers upload fresh random models every round. Returns (outputs, global vectors used)."""
    g0 = global_state(seed=seed)
    layout = layout_of(g0)
    rng = np.random.default_rng(seed)
    h = rng.uniform(0.5, 1.5, layout.size)
    opt = rng.normal(0, 0.05, (n, layout.size))
    w = layout.flatten(g0)
    outs, globals_ = [], []
    for t in range(rounds):
        gstate = {k: v.clone() for k, v in g0.items()}
        gstate.update(layout.to_state(w))
        local = w - 0.1 * h * (w - opt) + rng.normal(0, 1e-4, (n, layout.size))
        for i in attackers:
            local[i] = w + rng.normal(0, 0.05, layout.size)
        out = defense(
            make_round(gstate, states_from_deltas(gstate, local - w), round_idx=t, seed=seed + t)
        )
        outs.append(out)
        globals_.append(w.copy())
        if out.reset_state is not None:
            w = layout.flatten(out.reset_state)
        elif out.weight_total > 0:
            w = w + out_vector(out, gstate) / out.weight_total
    return outs, globals_


def test_fldetector_excludes_consistently_inconsistent_clients_after_the_window():
    fld = make_defense("fldetector", window=10)
    outs, globals_ = _fl_run(fld, 14)
    attackers = [True] * 4 + [False] * 16
    for t in range(11):  # the window fills (10 pairs need 11 rounds): plain FedAvg, nobody flagged
        assert (
            not outs[t].flagged.any() and outs[t].reset_state is None and outs[t].weight_total == 20
        )
    det = outs[11]
    assert det.flagged.tolist() == attackers
    assert det.weight_total == 0 and det.info["detected"] == [0, 1, 2, 3]
    reset = layout_of(det.reset_state).flatten(det.reset_state)
    np.testing.assert_allclose(reset, globals_[11], atol=1e-6)  # the model at detection start
    for t in (12, 13):  # permanent exclusion; FedAvg over the rest
        assert outs[t].flagged.tolist() == attackers and outs[t].weight_total == 16
        assert outs[t].reset_state is None
    fld.reset()
    assert fld.excluded == set()


def test_fldetector_can_reset_to_the_run_start_and_stays_quiet_without_attack():
    fld = make_defense("fldetector", window=4, reset_to="run_start")
    outs, globals_ = _fl_run(fld, 7)
    det = next(o for o in outs if o.reset_state is not None)
    np.testing.assert_allclose(
        layout_of(det.reset_state).flatten(det.reset_state), globals_[0], atol=1e-6
    )
    quiet = make_defense("fldetector", window=4)
    outs, _ = _fl_run(quiet, 8, attackers=())
    assert all(o.reset_state is None and not o.flagged.any() for o in outs)
    assert "scores" in outs[-1].info


# --------------------------------------------------------------------------------- FedCLP
def _uclc(w: np.ndarray, gamma: np.ndarray, var: np.ndarray) -> np.ndarray:
    mats = w.reshape(w.shape[0], w.shape[1], -1)
    smax = np.array([np.linalg.norm(m, 2) for m in mats])
    return smax * np.abs(gamma) / np.sqrt(np.maximum(var, 0) + 1e-5)


def test_fedclp_zeroes_gamma_and_beta_of_an_exploded_channel():
    widths = (8, 16)
    g = global_state(widths)
    deltas = random_deltas(g, 6, scale=0.002, seed=20)
    states = states_from_deltas(g, deltas)
    w = states[0]["conv2.weight"].clone()
    w[5] *= 50.0
    states[0]["conv2.weight"] = w
    rin = make_round(g, states, widths=widths)
    out = make_defense("fedclp")(rin)
    assert out.flagged is None
    assert out.info["pruned_channels"]["conv2"][0] >= 1
    # expected: every local model pruned by the rule, computed here with NumPy's SVD
    rv = RoundVectors.from_round(rin)
    local = rv.locals_.copy()
    lay = rv.layout
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        shape = lay.shapes[lay.keys.index(f"{conv}.weight")]
        counts = []
        for i in range(rv.n):
            u = _uclc(
                local[i, lay.slice(f"{conv}.weight")].reshape(shape),
                local[i, lay.slice(f"{bn}.weight")],
                local[i, lay.slice(f"{bn}.running_var")],
            )
            idx = np.flatnonzero(u > u.mean() + 3 * u.std(ddof=1))
            counts.append(idx.size)
            local[i, lay.slice(f"{bn}.weight").start + idx] = 0.0
            local[i, lay.slice(f"{bn}.bias").start + idx] = 0.0
        assert out.info["pruned_channels"][conv] == counts
    assert local[0, lay.slice("bn2.weight").start + 5] == 0.0
    assert local[0, lay.slice("bn2.bias").start + 5] == 0.0
    np.testing.assert_allclose(out_vector(out, g), (local - rv.global_vec).sum(axis=0), atol=1e-5)
    assert out.weight_total == 6
    g_bn2 = g["bn2.weight"][5].item()
    expect = sum(deltas[i, lay.slice("bn2.weight").start + 5] for i in range(1, 6)) - g_bn2
    assert out.update_sum["bn2.weight"][5].item() == pytest.approx(expect, abs=1e-5)
