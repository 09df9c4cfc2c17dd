"""Simulation defenses on constructed rounds: FLAME, FoolsGold, RFLBAT, DeepSight."""

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
from mars_native.sim.defenses.common import RoundVectors, is_bn_buffer
from mars_native.sim.defenses.foolsgold import foolsgold_weights

torch.set_num_threads(1)


def _final_mask(g):
    layout = layout_of(g)
    return layout.mask(lambda k: k.startswith("fc2."))


def _flame_round(seed: int = 0):
    """10 clients; 0-2 push the final layer in one large shared direction (cosine outliers)."""
    g = global_state(seed=seed)
    deltas = random_deltas(g, 10, scale=0.002, seed=seed + 7)
    fm = _final_mask(g)
    rng = np.random.default_rng(seed + 8)
    push = rng.normal(0.0, 0.5, fm.sum())
    for i in range(3):
        deltas[i, fm] += push * (1.0 + 0.01 * i)
    return g, deltas


def test_flame_rejects_a_cosine_outlier_group_and_clips_to_the_median_norm():
    g, deltas = _flame_round()
    rin = make_round(g, states_from_deltas(g, deltas))
    out = make_defense("flame", lam=0.0)(rin)
    # the group is rejected; HDBSCAN's single-cluster labelling may also drop the benign point that
    # joins the cluster last (FLAME's benign false positives), never more than a couple here
    assert out.flagged[:3].all()
    assert out.flagged[3:].sum() <= 2
    assert out.info["labels"][:3] == [-1, -1, -1]
    accepted = ~out.flagged
    assert out.weight_total == accepted.sum()
    rv = RoundVectors.from_round(rin)
    trainable = rv.layout.mask(lambda k: not is_bn_buffer(k))
    norms = np.linalg.norm(rv.deltas[:, trainable], axis=1)
    s = np.median(norms)
    assert out.info["median_norm"] == pytest.approx(s)
    expect = sum(min(1.0, s / norms[i]) * rv.deltas[i] for i in np.flatnonzero(accepted))
    np.testing.assert_allclose(out_vector(out, g), expect, atol=1e-6)
    # some accepted updates really were shrunk, and none is left above the median norm
    clipped = np.array([min(1.0, s / e) for e in norms[accepted]])
    assert (clipped < 1).any()
    assert np.all(clipped * norms[accepted] <= s * (1 + 1e-12))


def test_flame_single_cluster_labelling_matches_sklearn_directly():
    from sklearn.cluster import HDBSCAN

    from mars_native.sim.defenses.common import cosine_distance_matrix

    g, deltas = _flame_round(seed=3)
    rin = make_round(g, states_from_deltas(g, deltas))
    out = make_defense("flame", lam=0.0)(rin)
    rv = RoundVectors.from_round(rin)
    feats = rv.locals_[:, _final_mask(g)]
    u = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    dist = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    np.testing.assert_allclose(cosine_distance_matrix(feats), dist, atol=1e-12)
    ref = HDBSCAN(
        metric="precomputed",
        min_cluster_size=6,
        min_samples=1,
        allow_single_cluster=True,
        copy=True,
    ).fit_predict((dist + dist.T) / 2)
    assert out.info["labels"] == ref.tolist()


def test_flame_noise_has_std_lambda_times_median_norm_on_trainable_entries_only():
    g = global_state(widths=(16, 32))  # more entries for a tight std estimate
    deltas = random_deltas(g, 8, scale=0.01, seed=9)
    states = states_from_deltas(g, deltas)
    lam = 0.001
    quiet = make_defense("flame", lam=0.0)(make_round(g, states))
    noisy = make_defense("flame", lam=lam)(make_round(g, states))
    assert noisy.weight_total == quiet.weight_total
    diff = out_vector(noisy, g) - out_vector(quiet, g)
    layout = layout_of(g)
    buffers = layout.mask(is_bn_buffer)
    assert np.all(np.abs(diff[buffers]) < 1e-9)
    sigma = lam * noisy.info["median_norm"]
    assert noisy.info["noise_std"] == pytest.approx(sigma)
    # float32 storage of update_sum adds ~1e-8 rounding; sigma is ~1e-4
    assert np.std(diff[~buffers]) == pytest.approx(sigma, rel=0.05)
    assert abs(np.mean(diff[~buffers])) < 5 * sigma / np.sqrt((~buffers).sum())


def test_foolsgold_weights_hand_example():
    # two identical sybils, two orthogonal honest clients
    h = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    w = foolsgold_weights(h)
    assert w[0] == 0 and w[1] == 0
    assert w[2] == 1 and w[3] == 1


def test_foolsgold_gives_sybils_low_weight_across_rounds():
    g = global_state()
    fm = _final_mask(g)
    d = layout_of(g).size
    rng = np.random.default_rng(10)
    sybil_dir = rng.normal(0, 0.05, fm.sum())
    fg = make_defense("foolsgold")
    fg.reset()
    ids = [7, 3, 11, 0, 1, 2, 4, 5, 6, 8]  # sybils are ids 7, 3, 11 (first three uploads)
    for rnd in range(3):
        deltas = rng.normal(0, 0.01, (10, d))
        for i in range(3):
            deltas[i, fm] = sybil_dir + rng.normal(0, 0.002, fm.sum())
        out = fg(make_round(g, states_from_deltas(g, deltas), ids=ids, round_idx=rnd, seed=rnd))
    w = np.asarray(out.info["weights"])
    assert np.all(w[:3] < 0.1) and np.all(w[3:] > 0.9)
    assert out.flagged.tolist() == [True] * 3 + [False] * 7
    assert out.weight_total == pytest.approx(w.sum(), rel=1e-5)
    rv = RoundVectors.from_round(make_round(g, states_from_deltas(g, deltas)))
    np.testing.assert_allclose(out_vector(out, g), w @ rv.deltas, atol=1e-5)
    # history is per run
    fg.reset()
    assert fg._history == {}


def test_foolsgold_history_is_keyed_by_client_id():
    g = global_state()
    d = layout_of(g).size
    rng = np.random.default_rng(11)
    fg = make_defense("foolsgold")
    a = rng.normal(0, 0.01, (4, d))
    fg(make_round(g, states_from_deltas(g, a), ids=[0, 1, 2, 3]))
    b = rng.normal(0, 0.01, (4, d))
    fg(make_round(g, states_from_deltas(g, b), ids=[3, 2, 1, 0]))
    fm = _final_mask(g)
    rv_a = RoundVectors.from_round(make_round(g, states_from_deltas(g, a)))
    rv_b = RoundVectors.from_round(make_round(g, states_from_deltas(g, b)))
    np.testing.assert_allclose(fg._history[0], rv_a.deltas[0, fm] + rv_b.deltas[3, fm])


def _rflbat_round(seed: int):
    """16 benign updates spread in a plane, 4 near-identical attackers far away in that plane."""
    g = global_state()
    d = layout_of(g).size
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(d, 2)))[0].T * 0.1
    deltas = rng.normal(size=(20, 2)) @ u + rng.normal(0, 0.0005, (20, d))
    for i in range(4):
        deltas[i] = 11.0 * (u[0] + u[1]) / np.sqrt(2) + rng.normal(0, 0.0005, d)
    return g, deltas


@pytest.mark.parametrize("seed", [0, 2, 7])
def test_rflbat_removes_an_aligned_far_away_group(seed):
    g, deltas = _rflbat_round(seed)
    rin = make_round(g, states_from_deltas(g, deltas), seed=seed)
    out = make_defense("rflbat")(rin)
    assert out.info["k"] >= 2
    assert out.flagged[:4].all()
    # a benign cluster is kept; with 20 points the gap statistic tends to split the benign group too
    assert (~out.flagged[4:]).sum() >= 8
    kept = ~out.flagged
    rv = RoundVectors.from_round(rin)
    np.testing.assert_allclose(out_vector(out, g), rv.deltas[kept].sum(axis=0), atol=1e-5)
    assert out.weight_total == kept.sum()


def test_rflbat_coarse_filter_drops_a_single_far_point():
    g = global_state()
    d = layout_of(g).size
    rng = np.random.default_rng(13)
    deltas = rng.normal(0, 0.01, (12, d))
    deltas[5] = rng.normal(0, 10.0, d)
    out = make_defense("rflbat")(make_round(g, states_from_deltas(g, deltas)))
    assert out.flagged[5]
    assert out.flagged.sum() <= 3


def _deepsight_round():
    """16 benign clients (shared direction + noise); 4 attackers with fc2 updates on class 8."""
    g = global_state()
    layout = layout_of(g)
    d = layout.size
    rng = np.random.default_rng(14)
    deltas = rng.normal(0, 0.005, d) + rng.normal(0, 0.005, (20, d))
    w8 = layout.slice("fc2.weight")
    b8 = layout.slice("fc2.bias")
    row = np.zeros((10, 16))
    row[8] = 0.3
    for i in range(4):
        deltas[i, w8] = (row + rng.normal(0, 0.001, row.shape)).ravel()
        deltas[i, b8] = 0.0
        deltas[i, b8.start + 8] = 0.3
    return g, deltas


def test_deepsight_flags_updates_concentrated_on_one_class():
    g, deltas = _deepsight_round()
    rin = make_round(g, states_from_deltas(g, deltas))
    out = make_defense("deepsight", n_noise=200)(rin)
    assert out.info["suspicious"][:4] == [True] * 4
    assert out.info["te"][:4] == [1] * 4
    assert out.flagged[:4].all() and not out.flagged[4:].any()
    rv = RoundVectors.from_round(rin)
    norms = np.linalg.norm(rv.deltas, axis=1)
    s = np.median(norms)
    expect = sum(min(1.0, s / norms[i]) * rv.deltas[i] for i in range(4, 20))
    np.testing.assert_allclose(out_vector(out, g), expect, atol=1e-5)
    assert out.weight_total == 16


def test_deepsight_ddif_sees_the_target_class():
    from mars_native.sim.defenses.deepsight import division_differences

    g, deltas = _deepsight_round()
    ddif = division_differences(
        make_round(g, states_from_deltas(g, deltas)), n_noise=100, n_seeds=3
    )
    assert ddif.shape == (3, 20, 10)
    assert np.all(ddif[:, :4, 8] > 1.05 * ddif[:, 4:, 8].max())


def test_rflbat_pca_matches_scikit_learn_up_to_signs():
    from sklearn.decomposition import PCA

    from mars_native.sim.defenses.rflbat import pca_2d

    x = np.random.default_rng(15).normal(size=(12, 300))
    np.testing.assert_allclose(np.abs(pca_2d(x)), np.abs(PCA(2).fit_transform(x)), atol=1e-9)
