"""The CBE's pruned spectral kernel: ``_core.channel_spectral_norms_batch(..., keep=...)``.

Only each layer's ``keep`` largest values reach the CBE. The kernel computes every channel's
Gram, the exact top eigenvalue of the ``keep`` channels with the largest estimates (T = the
smallest of those values), certifies the others below T with one LDL^T factorisation each, and
solves the ones it cannot certify. Contract, checked here against the unpruned kernel (bit for
bit) and NumPy's SVD (reference.layer_top_values): every value >= the keep-th largest is exact;
every other entry is an upper bound of its channel's value, below the keep-th largest. So the
top-k (both rules) and the CBE are the same bits with and without pruning.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mars_native as mn
from mars_native import _core, reference
from mars_native._native import top_k_count
from mars_native.energy import cbe_keep, concentrate

RTOL = 1e-12


def _check_layer(full: np.ndarray, top: np.ndarray, keep: int) -> int:
    """Asserts the contract for one layer; returns how many entries hold a bound."""
    out = full.size
    nan = np.isnan(full)
    assert np.array_equal(np.isnan(top), nan)
    if keep < 1 or keep >= out:
        assert np.array_equal(top, full, equal_nan=True)
        return 0
    finite = full[~nan]
    if finite.size <= keep:  # the NaN channels are exact; everything else must be too
        assert np.array_equal(top, full, equal_nan=True)
        return 0
    kth = np.sort(finite)[-keep]
    exact = nan | (full >= kth)
    assert np.array_equal(top[exact], full[exact], equal_nan=True)
    bounded = ~exact & (top != full)
    assert np.all(top[~exact] < kth)
    assert np.all(top[bounded] >= full[bounded] * (1 - 1e-12))
    if not nan.any():
        for rule in ("ceil", "quantile"):
            for kappa in (0.05, 0.1, 0.3):
                if cbe_keep(out, kappa) <= keep:
                    assert np.array_equal(_core.top_k_energy(top, kappa, rule),
                                          _core.top_k_energy(full, kappa, rule))
    return int(bounded.sum())


@st.composite
def batches(draw):
    """Several layers of one shape (16 or more: one task per layer; fewer: Gram and finishing
    tasks where the channels are large enough, else every value exact), channels of different
    sizes, duplicates (ties), zero and negative scales, NaN channels, float32 or float64 (huge or
    tiny magnitudes: the prescaled path)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    out = draw(st.integers(1, 48))
    # (36 or more input channels: one model's 3x3 float32 layers are pruned in two phases)
    rows = draw(st.integers(1, 20) | st.sampled_from([36, 40, 64, 72]))
    kernel = draw(st.sampled_from([(3, 3), (2, 2), (4, 4), (3,), (1, 1)]))
    # >= 16 layers of one shape: one task per layer (fewer: split, or every value exact)
    n_layers = draw(st.sampled_from([1, 3, 16, 17, 20]))
    magnitude = draw(st.sampled_from([1.0, 1e-3, 1e150, 1e-150])) if dtype == np.float64 else 1.0
    weights, scales, keeps = [], [], []
    for _ in range(n_layers):
        w = rng.standard_normal((out, rows, *kernel)) * (1 + 3 * rng.random((out,) + (1,) * (1 + len(kernel))))
        if out > 2 and draw(st.booleans()):
            w[1] = w[0]  # a tie
        if draw(st.integers(0, 9)) == 0:
            w[rng.integers(out)].flat[0] = np.nan
        weights.append((w * magnitude).astype(dtype))
        kind = draw(st.sampled_from(["none", "positive", "zeros", "negative"]))
        if kind == "none":
            scales.append(None)
        else:
            s = 0.5 + rng.random(out)
            if kind == "zeros":
                s[rng.random(out) < 0.3] = 0.0
            if kind == "negative":
                s[rng.random(out) < 0.2] *= -1
            scales.append(s)
        keeps.append(draw(st.integers(-1, out + 1)))
    return weights, scales, keeps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), threads=st.integers(1, 3))
def test_pruned_values_keep_the_top_exact(batch, threads):
    weights, scales, keeps = batch
    full = _core.channel_spectral_norms_batch(weights, scales, threads)
    top = _core.channel_spectral_norms_batch(weights, scales, threads, keeps)
    for w, s, k, f, t in zip(weights, scales, keeps, full, top):
        _check_layer(f, t, k)
        want = reference.layer_top_values(w, s, k)
        got = np.sort(t)[::-1][: want.size]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-300)


def _resnet_like_layers(n_models: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3),
              (128, 64, 1, 1)]
    weights, scales = [], []
    for _ in range(n_models):
        for shape in shapes:
            weights.append((rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32))
            scales.append(np.abs(1 + 0.1 * rng.standard_normal(shape[0])))
    return weights, scales


def test_most_eigen_solves_are_skipped_and_threads_do_not_matter():
    weights, scales = _resnet_like_layers(10)
    keeps = [cbe_keep(w.shape[0], 0.05) for w in weights]
    full = _core.channel_spectral_norms_batch(weights, scales, 1)
    tops = [_core.channel_spectral_norms_batch(weights, scales, t, keeps) for t in (1, 2, 4)]
    for other in tops[1:]:
        for a, b in zip(tops[0], other):
            assert np.array_equal(a, b)
    bounded = sum(_check_layer(f, t, k) for f, t, k in zip(full, tops[0], keeps))
    prunable = sum(w.shape[0] for w in weights if w.shape[2] * w.shape[3] > 1)
    assert bounded > 0.7 * prunable  # the pruning runs (about 90% certified here)


def test_one_model_is_pruned_in_two_phases_with_the_same_values():
    """One model's layers are too few for whole-layer tasks: the Grams of those with 36 or more
    input channels are computed by several tasks into shared buffers, then each layer is
    finished. The same values for any thread count, and the same top values as the whole-layer
    path (the same model inside a round)."""
    weights, scales = _resnet_like_layers(1)
    keeps = [cbe_keep(w.shape[0], 0.05) for w in weights]
    full = _core.channel_spectral_norms_batch(weights, scales, 1)
    tops = [_core.channel_spectral_norms_batch(weights, scales, t, keeps) for t in (1, 2, 3, 8)]
    for other in tops[1:]:
        for a, b in zip(tops[0], other):
            assert np.array_equal(a, b)
    bounded = sum(_check_layer(f, t, k) for f, t, k in zip(full, tops[0], keeps))
    prunable = sum(w.shape[0] for w in weights if w.shape[2] * w.shape[3] > 1)
    assert bounded > 0.7 * prunable
    # The same model among 16 other models: whole-layer tasks. The top values are the same bits;
    # so is every entry of the layers pruned both ways (36 or more input channels: the first
    # layer, 3 input channels, is pruned only in the batch).
    others, other_scales = _resnet_like_layers(16, seed=1)
    batch = _core.channel_spectral_norms_batch(weights + others, scales + other_scales, 2,
                                               keeps + [cbe_keep(w.shape[0], 0.05) for w in others])
    for w, a, b, f, k in zip(weights, tops[0], batch[: len(weights)], full, keeps):
        _check_layer(f, b, k)
        if w.shape[1] >= 36 or w.shape[2] * w.shape[3] == 1:
            assert np.array_equal(a, b)
        else:
            assert np.array_equal(a, f)  # not pruned alone


def test_all_equal_channels_are_all_exact():
    """Ties with T cannot be certified below T: they are solved."""
    w = np.tile(np.random.default_rng(1).standard_normal((1, 16, 3, 3)), (40, 1, 1, 1)).astype(np.float32)
    weights = [w] * 4
    full = _core.channel_spectral_norms_batch(weights, [None] * 4, 1)
    top = _core.channel_spectral_norms_batch(weights, [None] * 4, 1, [3] * 4)
    for a, b in zip(full, top):
        assert np.array_equal(a, b)


def test_keep_is_validated():
    w = np.ones((4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="one count per weight"):
        _core.channel_spectral_norms_batch([w], [None], 1, [1, 2])
    with pytest.raises(TypeError, match=r"keep\[0\] must be an int"):
        _core.channel_spectral_norms_batch([w], [None], 1, [1.5])
    with pytest.raises(TypeError, match="sequence of ints"):
        _core.channel_spectral_norms_batch([w], [None], 1, 3)
    with pytest.raises(ValueError, match="int64"):
        _core.channel_spectral_norms_batch([w], [None], 1, [2**70])


@pytest.mark.parametrize("kappa", [0.05, 0.1, 0.25, 0.5, 1.0, 0.07])
def test_cbe_keep_covers_both_rules(kappa):
    for out in range(1, 300):
        keep = cbe_keep(out, kappa)
        assert keep >= top_k_count(out, kappa)
        # the quantile rule reads the order statistics from (out - 1) * (1 - kappa) upwards
        lo = math.floor((out - 1) * (1 - kappa))
        assert keep >= out - lo
    assert cbe_keep(10, 0.0) == -1 and cbe_keep(10, float("nan")) == -1 and cbe_keep(10, 2.0) == -1


@pytest.fixture(scope="module")
def cnn_clients():
    from mars_native.bench import models as bm  # (needs torch)

    base = bm.base_state(bm.build_model("cnn", seed=0))
    states, _ = bm.make_clients(base, 8, seed=0)
    return states


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("kappa", [0.05, 0.1, 0.5])
def test_cbe_with_pruning_equals_the_exact_path(cnn_clients, mode, kappa):
    states = cnn_clients
    exact = np.stack([concentrate(mn.backdoor_energy(s, mode=mode), kappa, mode) for s in states])
    for threads in (1, 2):
        np.testing.assert_array_equal(
            mn.concentrated_backdoor_energies(states, kappa, mode, n_threads=threads), exact)
        report = mn.MARS(kappa=kappa, mode=mode, n_threads=threads).detect(states)
        np.testing.assert_array_equal(report.cbe, exact)
    np.testing.assert_array_equal(mn.concentrated_backdoor_energy(states[0], kappa, mode, n_threads=1), exact[0])
    # one client at a time (a streaming round's path): the same CBE
    for i, state in enumerate(states[:3]):
        cbe, reason = mn.MARS(kappa=kappa, mode=mode, n_threads=2).client_cbe(state)
        assert reason is None
        np.testing.assert_array_equal(cbe, exact[i])


# Float32 3x3 layers (Gram order 9, at least 9 input channels) are certified from a Gram summed
# in float32, whose rigorous error bound (about 4e-6 of its trace) is taken off T before the
# LDL^T test; the channels that get solved have their exact fp64 Gram computed again. These
# layers stress that bound: near-ties with T, squares beyond the float32 range, underflow.
def _layers_of(w: np.ndarray, n: int = 16, scale: np.ndarray | None = None):
    return [w] * n, [scale] * n


def _near_tie_weight(rows: int, eps: np.ndarray, seed: int = 0) -> np.ndarray:
    """Channel k = channel 0 times (1 - eps[k]): values a relative eps[k] below the top one,
    then 24 channels well below them."""
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((1, rows, 3, 3))
    near = top * (1.0 - eps.reshape(-1, 1, 1, 1))
    rest = 0.3 * rng.standard_normal((24, rows, 3, 3))
    return np.concatenate([top, near, rest]).astype(np.float32)


# (16 layers: one task per layer; one layer of 36 or more inputs: Gram and finishing tasks)
@pytest.mark.parametrize(("rows", "n_layers"), [(9, 16), (64, 16), (300, 16), (64, 1), (300, 1)])
@pytest.mark.parametrize("keep", [1, 2, 5])
def test_float32_gram_certificate_near_ties(rows, n_layers, keep):
    eps = np.array([1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 1e-3, 1e-2])
    w = _near_tie_weight(rows, eps, seed=rows + keep)
    weights, scales = _layers_of(w, n_layers)
    full = _core.channel_spectral_norms_batch(weights, scales, 2)
    top = _core.channel_spectral_norms_batch(weights, scales, 2, [keep] * len(weights))
    bounded = sum(_check_layer(f, t, keep) for f, t in zip(full, top))
    assert bounded > 0  # the 24 small channels are certified


@pytest.mark.parametrize("rows", [16, 200])
def test_float32_gram_certificate_near_ties_in_the_scale(rows):
    """Equal channels whose BN scales differ by a relative 1e-12 .. 1e-2: values just below T,
    closer than the float32 Gram's error."""
    rng = np.random.default_rng(rows)
    w = np.tile(rng.standard_normal((1, rows, 3, 3)), (40, 1, 1, 1)).astype(np.float32)
    scale = 1.0 - np.concatenate([[0.0], np.geomspace(1e-12, 1e-2, 39)])
    weights, scales = _layers_of(w, scale=scale)
    full = _core.channel_spectral_norms_batch(weights, scales, 1)
    for keep in (1, 3, 10):
        top = _core.channel_spectral_norms_batch(weights, scales, 1, [keep] * len(weights))
        assert sum(_check_layer(f, t, keep) for f, t in zip(full, top)) > 0


@pytest.mark.parametrize("magnitude", [1e19, 3e19, 1e-21, 1e-25, 1e-40])
def test_float32_gram_certificate_extreme_magnitudes(magnitude):
    """Channels whose float32 squares overflow (solved from the exact fp64 Gram, finite values)
    or underflow (the absolute error term), next to ordinary ones."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 20, 3, 3))
    w[::3] *= magnitude
    w = w.astype(np.float32)
    weights, scales = _layers_of(w)
    full = _core.channel_spectral_norms_batch(weights, scales, 2)
    assert all(np.isfinite(f).all() for f in full)
    for keep in (2, 5, 15):
        top = _core.channel_spectral_norms_batch(weights, scales, 2, [keep] * len(weights))
        for f, t in zip(full, top):
            _check_layer(f, t, keep)
            np.testing.assert_allclose(np.sort(t)[::-1][:keep], reference.layer_top_values(w, None, keep),
                                       rtol=RTOL, atol=0)


def test_float32_gram_certificate_all_tiny():
    """Every channel so small that its float32 Gram underflows to zero: nothing can be
    certified against the absolute error term, every value is exact."""
    w = (np.random.default_rng(6).standard_normal((24, 16, 3, 3)) * 1e-30).astype(np.float32)
    weights, scales = _layers_of(w)
    full = _core.channel_spectral_norms_batch(weights, scales, 1)
    top = _core.channel_spectral_norms_batch(weights, scales, 1, [2] * len(weights))
    for a, b in zip(full, top):
        assert np.array_equal(a, b)
