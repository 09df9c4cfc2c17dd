"""top_k_energy: the "ceil" (paper) and "quantile" (authors' code) rules vs the NumPy reference.

Both rules only select and copy input values, so every comparison here is exact (bit equality),
including the quantile threshold, which must reproduce np.quantile's arithmetic exactly.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mars_native._native as mn
from mars_native import _core, reference

kappas = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
# Values with many ties (a few distinct values) or spread over magnitudes, incl. zeros and
# subnormals (bounded by 1e300 so that b - a in numpy's lerp cannot overflow).
tied_values = st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, 1e30, 1e-30]), min_size=1, max_size=60)
spread_values = st.lists(
    st.floats(min_value=-1e300, max_value=1e300, allow_subnormal=True, width=64),
    min_size=1,
    max_size=80,
)
any_values = st.one_of(tied_values, spread_values)


@given(any_values, kappas)
def test_ceil_rule_matches_reference(values, kappa):
    got = mn.top_k_energy(values, kappa, "ceil")
    expected = reference.top_k_energy(values, kappa, "ceil")
    np.testing.assert_array_equal(got, expected)
    assert got.size == reference.top_k_count(len(values), kappa)
    assert np.all(got[:-1] >= got[1:])  # descending


@given(any_values, kappas)
def test_quantile_rule_matches_reference(values, kappa):
    got = mn.top_k_energy(values, kappa, "quantile")
    np.testing.assert_array_equal(got, reference.top_k_energy(values, kappa, "quantile"))
    # input (channel) order: the kept values appear in the order of the input
    threshold = np.quantile(np.asarray(values, dtype=np.float64), 1 - kappa)
    np.testing.assert_array_equal(got, [v for v in values if v >= threshold])


@given(spread_values, st.floats(min_value=0.0, max_value=1.0))
def test_quantile_threshold_is_bit_identical_to_numpy(values, q):
    got = _core.linear_quantile(np.asarray(values), q)
    expected = np.quantile(np.asarray(values, dtype=np.float64), q)
    assert np.float64(got).tobytes() == np.float64(expected).tobytes() or got == expected == 0.0


@pytest.mark.parametrize("q", [0.95, 0.5, 0.25, 0.999, 0.0, 1.0, 1 - 0.07, 0.3])
def test_quantile_threshold_lerp_branches(q):
    # gamma >= 0.5 and gamma < 0.5 take different formulas in numpy's _lerp
    rng = np.random.default_rng(int(q * 1000))
    for n in (1, 2, 3, 8, 33, 100, 513):
        v = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, size=n)
        got = _core.linear_quantile(v, q)
        assert np.float64(got).tobytes() == np.quantile(v, q).tobytes()


@pytest.mark.parametrize(("n", "count"), [(8, 1), (32, 2), (64, 4), (128, 7), (256, 13), (512, 26)])
def test_quantile_counts_of_the_authors_code(n, count):
    values = np.random.default_rng(n).permutation(np.arange(n, dtype=np.float64))
    got = mn.top_k_energy(values, 0.05, "quantile")
    assert got.size == count
    # ceil rule: ceil(0.05 n) = 1, 2, 4, 7, 13, 26 as well for these n
    assert mn.top_k_energy(values, 0.05, "ceil").size == math.ceil(Fraction("0.05") * n)


def test_quantile_keeps_ties():
    values = np.array([1.0, 5.0, 5.0, 2.0, 5.0, 0.0, 5.0, 3.0])
    np.testing.assert_array_equal(mn.top_k_energy(values, 0.05, "quantile"), [5.0, 5.0, 5.0, 5.0])
    np.testing.assert_array_equal(mn.top_k_energy(values, 0.05, "ceil"), [5.0])
    constant = np.full(10, 7.0)
    assert mn.top_k_energy(constant, 0.1, "quantile").size == 10


@pytest.mark.parametrize("kappa_text", ["0.01", "0.05", "0.07", "0.1", "0.15", "0.2", "0.3", "0.7"])
def test_ceil_count_is_robust_to_rounding(kappa_text):
    # k = ceil(kappa * n) computed exactly with fractions: 0.07 * 100 is 7.000000000000001 in
    # floating point but must give 7.
    kappa = float(kappa_text)
    for n in range(1, 301):
        exact = max(1, math.ceil(Fraction(kappa_text) * n))
        assert mn.top_k_count(n, kappa) == exact
        assert reference.top_k_count(n, kappa) == exact
    assert mn.top_k_energy(np.arange(100.0), 0.07).size == 7


def test_kappa_one_keeps_everything():
    values = np.array([3.0, -1.0, 2.0])
    np.testing.assert_array_equal(mn.top_k_energy(values, 1.0, "ceil"), [3.0, 2.0, -1.0])
    np.testing.assert_array_equal(mn.top_k_energy(values, 1.0, "quantile"), values)


def test_single_value_and_integer_and_torch_input():
    np.testing.assert_array_equal(mn.top_k_energy([4.0], 0.05), [4.0])
    np.testing.assert_array_equal(mn.top_k_energy(np.array([1, 9, 3]), 0.5), [9.0, 3.0])
    t = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float32)
    got = mn.top_k_energy(t, 0.3)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [2.0])


@pytest.mark.parametrize("kappa", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_kappa_out_of_range_is_value_error(kappa):
    with pytest.raises(ValueError, match="kappa"):
        mn.top_k_energy([1.0, 2.0], kappa)
    with pytest.raises(ValueError, match="kappa"):
        mn.top_k_count(10, kappa)


def test_bad_values_are_value_errors():
    with pytest.raises(ValueError, match=r"values contains NaN at index 1"):
        mn.top_k_energy([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match=r"values contains Inf at index 2"):
        mn.top_k_energy([1.0, 0.0, -float("inf")], rule="quantile")
    with pytest.raises(ValueError, match="empty"):
        mn.top_k_energy(np.array([]))
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        mn.top_k_energy(np.ones((2, 2)))
    with pytest.raises(ValueError, match="rule"):
        mn.top_k_energy([1.0], 0.5, "median")


def test_bad_types_are_type_errors():
    with pytest.raises(TypeError, match="complex128"):
        mn.top_k_energy(np.ones(3, np.complex128))
    with pytest.raises(TypeError, match="bool"):
        mn.top_k_energy(np.ones(3, bool))
    with pytest.raises(TypeError, match="kappa"):
        mn.top_k_energy([1.0], "0.5")
    with pytest.raises(TypeError, match="rule"):
        mn.top_k_energy([1.0], 0.5, None)


@given(st.lists(any_values, min_size=1, max_size=6), kappas, st.sampled_from(["ceil", "quantile"]))
def test_top_k_concat_matches_reference(layers, kappa, rule):
    arrays = [np.asarray(v, dtype=np.float64) for v in layers]
    got = _core.top_k_concat(arrays, kappa, rule)
    np.testing.assert_array_equal(got, reference.top_k_concat(arrays, kappa, rule))
    np.testing.assert_array_equal(got, np.concatenate([mn.top_k_energy(a, kappa, rule) for a in arrays]))


def test_top_k_concat_names_the_bad_layer():
    good = np.arange(5.0)
    with pytest.raises(ValueError, match=r"layers\[1\] contains NaN at index 2"):
        _core.top_k_concat([good, np.array([1.0, 2.0, np.nan])], 0.5, "ceil")
    with pytest.raises(ValueError, match=r"layers\[2\] must not be empty"):
        _core.top_k_concat([good, good, np.array([])], 0.5, "ceil")
    with pytest.raises(ValueError, match=r"layers\[0\] must be 1-D"):
        _core.top_k_concat([np.ones((2, 2))], 0.5, "quantile")
    with pytest.raises(ValueError, match="layers must not be empty"):
        _core.top_k_concat([], 0.5, "ceil")
    with pytest.raises(ValueError, match="kappa"):
        _core.top_k_concat([good], 0.0, "ceil")
    with pytest.raises(ValueError, match="rule"):
        _core.top_k_concat([good], 0.5, "median")
    with pytest.raises(TypeError, match="list or tuple"):
        _core.top_k_concat(good, 0.5, "ceil")
    with pytest.raises(TypeError, match="complex128"):
        _core.top_k_concat([np.ones(3, np.complex128)], 0.5, "ceil")
