"""KWMeans (paper and official modes) vs the NumPy twin, invariants, the paper's toy example and
input validation.

The compiled core and reference.kwmeans use the same generator (SplitMix64), the same tie rules
and the same left-to-right sums without fused multiply-adds, so labels, n_iter and best_init are
compared exactly; inertia and centers with rtol = 1e-12 (identical on this platform, the margin
only absorbs libm differences elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mars_native import _core, reference
from mars_native.cluster import KWMeans, NotFittedError

MODES = [("paper", 1), ("paper", 2), ("official", 1), ("official", 2)]


def partition(labels) -> set[frozenset[int]]:
    """The clusters as sets of sample indices: equal partitions up to a relabelling."""
    labels = np.asarray(labels)
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


@st.composite
def datasets(draw):
    n = draw(st.integers(1, 18))
    d = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.gamma(2.0, size=(n, d)) * draw(st.sampled_from([1.0, 1e30, 1e-30]))
    if draw(st.booleans()):  # ties and duplicated rows
        X = np.round(X / X.max() * 3.0)
    k = draw(st.integers(1, min(n, 4)))
    return X, k


@given(datasets(), st.sampled_from(MODES), st.integers(0, 2**64 - 1), st.integers(1, 4))
def test_matches_reference(data, mode_p, seed, n_init):
    X, k = data
    mode, p = mode_p
    km = KWMeans(k, p=p, n_init=n_init, max_iter=30, random_state=seed, mode=mode).fit(X)
    ref = reference.kwmeans(X, k, p, n_init, 30, 0.0, seed, mode)
    np.testing.assert_array_equal(km.labels_, ref["labels"])
    assert km.n_iter_ == ref["n_iter"] and km.best_init_ == ref["best_init"]
    assert km.inertia_ == pytest.approx(ref["inertia"], rel=1e-12, abs=0)
    np.testing.assert_allclose(km.cluster_centers_, ref["centers"], rtol=1e-12)
    assert km.labels_.shape == (X.shape[0],) and km.cluster_centers_.shape == (k, X.shape[1])
    assert set(km.labels_.tolist()) == set(range(k))  # no empty cluster
    if mode == "official":
        np.testing.assert_allclose(km.distances_, ref["distances"], rtol=1e-12)
        np.testing.assert_allclose(km.embedding_centers_, ref["embedding_centers"], rtol=1e-12)


@given(st.integers(0, 2**64 - 1), st.integers(0, 20))
def test_rng_twin_streams_match(seed, restart):
    raw, uniform, derived = _core.splitmix64_stream(seed, 8 + restart)
    a, b = reference.SplitMix64(seed), reference.SplitMix64(seed)
    assert raw.tolist() == [a.next() for _ in range(len(raw))]
    assert uniform.tolist() == [b.uniform() for _ in range(len(uniform))]
    assert derived == reference.restart_seed(seed, 8 + restart)
    assert np.all((uniform >= 0.0) & (uniform < 1.0))


def test_rng_known_values():
    gen = reference.SplitMix64(0)
    assert gen.next() == 0xE220A8397B1DCDAF  # the published first output of SplitMix64(0)
    master = reference.SplitMix64(7)
    assert reference.restart_seed(7, 2) == [master.next() for _ in range(3)][-1]


def three_groups(rng, per_group=(6, 5, 7), d=12):
    # Well separated distributions: W_1 between groups ~ 10, within groups ~ 1.
    X = np.vstack([rng.gamma(2.0, size=(m, d)) + 10.0 * g for g, m in enumerate(per_group)])
    truth = np.repeat(np.arange(len(per_group)), per_group)
    return X, truth


@pytest.mark.parametrize(("mode", "p"), MODES)
def test_finds_well_separated_clusters(mode, p):
    X, truth = three_groups(np.random.default_rng(0))
    km = KWMeans(3, p=p, mode=mode).fit(X)
    assert partition(km.labels_) == partition(truth)
    # the partition does not depend on the order of the samples ...
    perm = np.random.default_rng(1).permutation(len(X))
    labels_perm = KWMeans(3, p=p, mode=mode).fit_predict(X[perm])
    assert partition(labels_perm[np.argsort(perm)]) == partition(truth)
    # ... nor on the order of the values inside each sample (rows are distributions)
    shuffled = np.random.default_rng(2).permuted(X, axis=1)
    assert partition(KWMeans(3, p=p, mode=mode).fit_predict(shuffled)) == partition(truth)


def test_official_mode_agrees_with_sklearn_kmeans_on_the_distance_matrix():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    X, truth = three_groups(np.random.default_rng(3), per_group=(8, 5), d=20)
    km = KWMeans(2, mode="official").fit(X)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):  # a 13 x 13 problem: threads only add overhead
        sk = sklearn_cluster.KMeans(2, random_state=0, n_init=10).fit(km.distances_)
    assert partition(km.labels_) == partition(sk.labels_) == partition(truth)
    np.testing.assert_allclose(km.inertia_, sk.inertia_, rtol=1e-9)


def test_paper_table1_toy_example():
    # L1, L2: backdoor CBEs, L3: benign (paper, Table 1). True W1 distances: W1(L1, L2) = 0.4,
    # W1(L1, L3) = W1(L2, L3) = 2.8 (the paper prints 2.00 and 2.40 for the last two; see
    # test_wasserstein.py). Either way K-WMeans must put the two backdoor CBEs together.
    X = np.array([[1, 3, 4, 5, 6], [5, 5, 4, 3, 2], [1, 1, 1, 1, 1]], dtype=float)
    for mode, p in MODES:
        km = KWMeans(2, p=p, mode=mode).fit(X)
        assert partition(km.labels_) == {frozenset({0, 1}), frozenset({2})}, (mode, p)
    km = KWMeans(2).fit(X)
    # center of {L1, L2} = coordinate-wise median of the sorted rows [1,3,4,5,6], [2,3,4,5,5]
    np.testing.assert_array_equal(km.cluster_centers_[km.labels_[0]], [1.5, 3, 4, 5, 5.5])
    assert km.inertia_ == pytest.approx(0.4)  # W1(L1, c) + W1(L2, c) = 0.2 + 0.2


@pytest.mark.parametrize(("mode", "p"), MODES)
def test_determinism_and_sklearn_protocol(mode, p):
    X, _ = three_groups(np.random.default_rng(4))
    a = KWMeans(3, p=p, mode=mode, random_state=42)
    assert a.fit(X) is a
    b = KWMeans(3, p=p, mode=mode, random_state=42).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_ and a.n_iter_ == b.n_iter_
    np.testing.assert_array_equal(
        KWMeans(3, p=p, mode=mode).fit_predict(X), KWMeans(3, p=p, mode=mode).fit(X).labels_
    )
    np.testing.assert_array_equal(a.predict(X), a.labels_)
    # predict on new samples: a jittered copy of the data lands in the same clusters
    jitter = X + np.random.default_rng(5).normal(0, 0.01, X.shape)
    np.testing.assert_array_equal(a.predict(jitter), a.labels_)


def test_random_state_none_uses_numpy_global_generator():
    X, _ = three_groups(np.random.default_rng(6))
    np.random.seed(1)
    a = KWMeans(3, random_state=None).fit(X)
    np.random.seed(1)
    b = KWMeans(3, random_state=None).fit(X)
    assert a.seed_ == b.seed_
    np.testing.assert_array_equal(a.labels_, b.labels_)
    g = KWMeans(3, random_state=np.random.default_rng(0)).fit(X)
    assert 0 <= g.seed_ < 2**63


def test_get_set_params_and_sklearn_clone():
    km = KWMeans(3, p=2, mode="official", n_init=4)
    assert km.get_params()["n_init"] == 4 and km.set_params(n_init=5) is km and km.n_init == 5
    with pytest.raises(ValueError, match="invalid parameter"):
        km.set_params(colour="red")
    base = pytest.importorskip("sklearn.base")
    assert base.clone(km).get_params() == km.get_params()
    assert "KWMeans(n_clusters=3" in repr(km)


def test_edge_cases():
    X, _ = three_groups(np.random.default_rng(7))
    one = KWMeans(1).fit(X)
    np.testing.assert_array_equal(one.labels_, 0)
    np.testing.assert_array_equal(one.cluster_centers_[0], np.median(np.sort(X, axis=1), axis=0))
    each = KWMeans(len(X)).fit(X)
    assert each.inertia_ == 0.0 and sorted(each.labels_) == list(range(len(X)))
    # identical samples: every cluster still gets a member, nothing crashes
    same = KWMeans(3, mode="paper").fit(np.ones((5, 4)))
    assert same.inertia_ == 0.0 and set(same.labels_.tolist()) == {0, 1, 2}
    assert set(KWMeans(2, mode="official").fit_predict(np.ones((4, 2))).tolist()) == {0, 1}
    single = KWMeans(1).fit([[3.0, 1.0]])
    np.testing.assert_array_equal(single.cluster_centers_, [[1.0, 3.0]])
    # max_iter / tol stop early
    assert KWMeans(3, max_iter=1).fit(X).n_iter_ == 1
    assert KWMeans(3, tol=1e300).fit(X).n_iter_ == 1


def test_torch_and_integer_input():
    X, truth = three_groups(np.random.default_rng(8))
    expected = KWMeans(3).fit_predict(X)
    np.testing.assert_array_equal(KWMeans(3).fit_predict(torch.from_numpy(X)), expected)
    ints = np.round(X * 100).astype(np.int64)
    assert partition(KWMeans(3).fit_predict(ints)) == partition(truth)


def test_validation_errors():
    X = np.random.default_rng(9).random((4, 3))
    with pytest.raises(ValueError, match=r"n_clusters=5 must be <= n_samples=4"):
        KWMeans(5).fit(X)
    with pytest.raises(ValueError, match=r"n_clusters=5.*n_samples=4"):
        _core.kwmeans_fit(X, 5, 1.0, 1, 10, 0.0, 0, "paper", 0)
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        KWMeans(0).fit(X)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        KWMeans(2, p=3).fit(X)
    with pytest.raises(ValueError, match="p must be a finite real number >= 1"):
        KWMeans(2, p=0.5, mode="official").fit(X)
    with pytest.raises(ValueError, match="n_init"):
        KWMeans(2, n_init=0).fit(X)
    with pytest.raises(ValueError, match="max_iter"):
        KWMeans(2, max_iter=0).fit(X)
    with pytest.raises(ValueError, match="tol"):
        KWMeans(2, tol=-1.0).fit(X)
    with pytest.raises(ValueError, match="mode"):
        KWMeans(2, mode="sklearn").fit(X)
    with pytest.raises(ValueError, match="random_state"):
        KWMeans(2, random_state=-1).fit(X)
    with pytest.raises(TypeError, match="random_state"):
        KWMeans(2, random_state="seed").fit(X)
    with pytest.raises(TypeError, match="n_clusters"):
        KWMeans(2.5).fit(X)
    bad = X.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN at index \(1, 2\)"):
        KWMeans(2).fit(bad)
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        KWMeans(2).fit(np.ones(3))
    with pytest.raises(ValueError, match="empty"):
        KWMeans(1).fit(np.ones((0, 3)))
    with pytest.raises(TypeError, match="complex"):
        KWMeans(2).fit(X.astype(complex))


def test_predict_errors():
    with pytest.raises(NotFittedError):
        KWMeans(2).predict(np.ones((2, 3)))
    km = KWMeans(2).fit(np.random.default_rng(10).random((5, 3)))
    with pytest.raises(ValueError, match="fitted with 3"):
        km.predict(np.ones((2, 4)))
    with pytest.raises(ValueError, match="Inf"):
        km.predict(np.full((1, 3), np.inf))


@pytest.mark.parametrize(("mode", "p"), MODES)
def test_overflowing_distances_do_not_crash(mode, p):
    # Finite inputs near the float64 limit make differences overflow (inf, then inf - inf = NaN in
    # the official mode's Euclidean step). Such costs count as infinitely far: no crash, valid
    # labels, the same result as the reference.
    X = np.array([[1e308, -1e308, 0.0], [-1e308, 1e308, 5.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    km = KWMeans(2, p=p, mode=mode).fit(X)
    with np.errstate(all="ignore"):
        ref = reference.kwmeans(X, 2, p, 10, 100, 0.0, 0, mode)
    np.testing.assert_array_equal(km.labels_, ref["labels"])
    assert set(km.labels_.tolist()) == {0, 1}
    assert set(km.predict(X).tolist()) <= {0, 1}
