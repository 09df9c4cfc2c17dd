"""wasserstein_1d / pairwise_wasserstein vs scipy (p = 1), the NumPy reference and W_p invariants.

Tolerances: all implementations sum |x - y|^p in float64 in different orders (and scipy
integrates |F_u - F_v| over the gaps between sorted values instead), so they agree to ~n ulps of
the largest term. We use rtol = 1e-9 plus atol = 1e-12 * (largest |value|) to cover results
that are tiny compared to the inputs (e.g. W of two close samples of 1e30-sized values).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import wasserstein_distance

import mars_native._native as mn
from mars_native import reference

RTOL = 1e-9


def atol_for(*arrays) -> float:
    return 1e-12 * max(float(np.max(np.abs(np.asarray(a, dtype=np.float64)))) for a in arrays)


finite = st.floats(min_value=-1e30, max_value=1e30, allow_subnormal=True)
small_ints = st.integers(-5, 5).map(float)
element = st.one_of(finite, small_ints, st.sampled_from([0.0, 1e-30, -1e-30, 5e-324]))
samples = st.lists(element, min_size=1, max_size=40)
orders = st.sampled_from([1.0, 1.5, 2.0, 3.0])


@given(samples, samples)
def test_p1_matches_scipy_for_unequal_lengths(u, v):
    got = mn.wasserstein_1d(u, v)
    assert got == pytest.approx(wasserstein_distance(u, v), rel=RTOL, abs=atol_for(u, v))


@given(samples, samples, orders)
def test_matches_reference(u, v, p):
    got = mn.wasserstein_1d(u, v, p)
    assert got == pytest.approx(reference.wasserstein_1d(u, v, p), rel=RTOL, abs=atol_for(u, v))


@given(samples, samples, orders)
def test_symmetry_and_identity(u, v, p):
    assert mn.wasserstein_1d(u, v, p) == mn.wasserstein_1d(v, u, p)  # exactly
    assert mn.wasserstein_1d(u, u, p) == 0.0
    assert mn.wasserstein_1d(u, u[::-1], p) == 0.0


@given(samples, samples, st.randoms(use_true_random=False))
def test_permutation_invariance(u, v, rnd):
    shuffled = list(u)
    rnd.shuffle(shuffled)
    assert mn.wasserstein_1d(shuffled, v) == mn.wasserstein_1d(u, v)  # exactly: sorted inside


@given(samples, samples, samples, orders)
def test_triangle_inequality(a, b, c, p):
    ab, bc, ac = mn.wasserstein_1d(a, b, p), mn.wasserstein_1d(b, c, p), mn.wasserstein_1d(a, c, p)
    assert ac <= (ab + bc) * (1 + RTOL) + atol_for(a, b, c)


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30),
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30),
    st.floats(-1e6, 1e6),
    orders,
)
def test_translation_invariance(u, v, c, p):
    u, v = np.asarray(u), np.asarray(v)
    shifted = mn.wasserstein_1d(u + c, v + c, p)
    # u + c rounds to ~1 ulp of |c| + |u|: tolerance relative to the magnitudes involved
    scale = abs(c) + max(np.max(np.abs(u)), np.max(np.abs(v)))
    assert shifted == pytest.approx(mn.wasserstein_1d(u, v, p), rel=RTOL, abs=1e-9 * scale)


@given(samples, samples)
def test_repeating_a_sample_does_not_change_its_distribution(u, v):
    doubled = list(u) + list(u)
    expected = mn.wasserstein_1d(u, v)
    assert mn.wasserstein_1d(doubled, v) == pytest.approx(expected, rel=RTOL, abs=atol_for(u, v))


def test_hand_computed_values():
    # Two point masses: W_p = |a - b| for every p.
    assert mn.wasserstein_1d([0.0], [3.0], 1) == 3.0
    assert mn.wasserstein_1d([0.0], [3.0], 2) == 3.0
    # u = {0, 1} vs v = {0, 0, 1}: quantile functions differ on (1/2, 2/3], by 1 -> W_1 = 1/6.
    assert mn.wasserstein_1d([0.0, 1.0], [0.0, 0.0, 1.0]) == pytest.approx(1 / 6, rel=1e-15)
    w2 = mn.wasserstein_1d([0.0, 1.0], [0.0, 0.0, 1.0], 2)
    assert w2 == pytest.approx(np.sqrt(1 / 6), rel=1e-15)


def test_paper_table1_toy_example():
    # The paper's Table 1 (L1, L2 backdoor CBEs; L3 benign). True W1 values, by hand:
    #   sorted L1 = [1,3,4,5,6], sorted L2 = [2,3,4,5,5], L3 = [1,1,1,1,1]
    #   W1(L1,L2) = (1+0+0+0+1)/5 = 0.4 ; W1(L1,L3) = (0+2+3+4+5)/5 = 2.8 ;
    #   W1(L2,L3) = (1+2+3+4+4)/5 = 2.8.
    # The paper prints 0.40, 2.00 and 2.40; the last two are not the W1 distances of these
    # vectors (scipy agrees with the values above).
    L1, L2, L3 = [1, 3, 4, 5, 6], [5, 5, 4, 3, 2], [1, 1, 1, 1, 1]
    for (a, b), expected in [((L1, L2), 0.4), ((L1, L3), 2.8), ((L2, L3), 2.8)]:
        assert mn.wasserstein_1d(a, b) == pytest.approx(expected, rel=1e-15)
        assert wasserstein_distance(a, b) == pytest.approx(expected, rel=1e-15)
    D = mn.pairwise_wasserstein([L1, L2, L3])
    np.testing.assert_allclose(D, [[0, 0.4, 2.8], [0.4, 0, 2.8], [2.8, 2.8, 0]], rtol=1e-15)


@st.composite
def matrices(draw):
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 25))
    rows = draw(st.lists(st.lists(element, min_size=d, max_size=d), min_size=n, max_size=n))
    return np.asarray(rows)


@given(matrices(), orders)
def test_pairwise_matches_reference_and_1d(X, p):
    D = mn.pairwise_wasserstein(X, p)
    assert D.shape == (X.shape[0], X.shape[0]) and D.dtype == np.float64
    np.testing.assert_allclose(D, reference.pairwise_wasserstein(X, p), rtol=RTOL, atol=atol_for(X))
    np.testing.assert_array_equal(D, D.T)  # bit-for-bit symmetric
    np.testing.assert_array_equal(np.diag(D), 0.0)
    for i in range(X.shape[0]):
        for j in range(X.shape[0]):
            assert D[i, j] == mn.wasserstein_1d(X[i], X[j], p)  # same routine, same bits


def test_pairwise_large_and_torch():
    X = np.random.default_rng(0).gamma(2.0, size=(60, 130))
    D = mn.pairwise_wasserstein(X, 1)
    np.testing.assert_allclose(D, reference.pairwise_wasserstein(X, 1), rtol=1e-12)
    np.testing.assert_array_equal(mn.pairwise_wasserstein(torch.from_numpy(X)), D)


@pytest.mark.parametrize("p", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_bad_order_is_value_error(p):
    with pytest.raises(ValueError, match="p must be"):
        mn.wasserstein_1d([1.0], [2.0], p)
    with pytest.raises(ValueError, match="p must be"):
        mn.pairwise_wasserstein([[1.0]], p)


def test_bad_samples():
    with pytest.raises(ValueError, match=r"u must not be empty"):
        mn.wasserstein_1d([], [1.0])
    with pytest.raises(ValueError, match=r"v contains NaN at index 1"):
        mn.wasserstein_1d([1.0], [0.0, float("nan")])
    with pytest.raises(ValueError, match=r"u contains Inf"):
        mn.wasserstein_1d([float("inf")], [1.0])
    with pytest.raises(ValueError, match=r"u must be 1-D.*\(2, 1\)"):
        mn.wasserstein_1d([[1.0], [2.0]], [1.0])
    with pytest.raises(TypeError, match="complex"):
        mn.wasserstein_1d(np.ones(2, complex), [1.0])
    with pytest.raises(TypeError, match="p must be a real number"):
        mn.wasserstein_1d([1.0], [1.0], "2")


def test_bad_matrices():
    with pytest.raises(ValueError, match=r"X must be 2-D.*\(3,\)"):
        mn.pairwise_wasserstein(np.ones(3))
    with pytest.raises(ValueError, match=r"X must not be empty.*\(0, 3\)"):
        mn.pairwise_wasserstein(np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"X must not be empty.*\(2, 0\)"):
        mn.pairwise_wasserstein(np.ones((2, 0)))
    X = np.ones((3, 4))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN at index \(2, 1\)"):
        mn.pairwise_wasserstein(X)
    with pytest.raises(TypeError, match="bool"):
        mn.pairwise_wasserstein(np.ones((2, 2), bool))
