"""The vectorised spectral kernel (4 channels per SIMD lane group, Householder + Laguerre top
eigenvalue, register-tiled Gram): hard spectra, every Gram order from 2 to 64, group tails, and
independence from the lane a channel lands in. Compared with ``np.linalg.svd`` (reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from mars_native import _core, reference

RTOL = 1e-12  # as in test_spectral.py: both sides are fp64 from exact inputs


def _check(w: np.ndarray) -> np.ndarray:
    got = _core.channel_spectral_norms(w, None, 1)
    np.testing.assert_allclose(got, reference.channel_spectral_norms(w), rtol=RTOL, atol=0)
    return got


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 11, 16, 25, 33, 49, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_gram_order(n, dtype):
    rng = np.random.default_rng(n)
    # Gram of the columns (kernel side n <= in) and of the rows (in = n < kernel side).
    _check(rng.standard_normal((6, n + 3, n)).astype(dtype))
    _check(rng.standard_normal((6, n, n + 5)).astype(dtype))


@pytest.mark.parametrize("out", [1, 2, 3, 4, 5, 7, 8, 9, 13])
def test_group_tails_and_lane_independence(out):
    """A channel's value does not depend on its neighbours (lane, group, thread chunk)."""
    rng = np.random.default_rng(out)
    w = rng.standard_normal((out, 16, 3, 3)).astype(np.float32)
    got = _check(w)
    for k in range(out):
        alone = _core.channel_spectral_norms(w[k : k + 1].copy(), None, 1)
        assert alone[0] == got[k]
        rolled = _core.channel_spectral_norms(np.roll(w, 1, axis=0).copy(), None, 1)
        assert rolled[(k + 1) % out] == got[k]
    for threads in (2, 3, 5):
        assert np.array_equal(_core.channel_spectral_norms(w, None, threads), got)


def _with_spectrum(rng, rows, cols, singular_values):
    u, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    return (u * np.asarray(singular_values)) @ v.T


@pytest.mark.parametrize(
    "spectrum",
    [
        [1.0] * 9,  # all singular values equal
        [1.0, 1.0 - 1e-9] + [0.5] * 7,  # a near-double top value
        [1.0] + [0.0] * 8,  # rank one
        [1e-3] * 8 + [1.0],  # one dominant value
        [3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # rank three
        list(np.linspace(1.0, 0.9, 9)),  # tight cluster
    ],
)
def test_hard_spectra(spectrum):
    rng = np.random.default_rng(0)
    w = np.stack([_with_spectrum(rng, 64, 9, spectrum) for _ in range(6)]).reshape(6, 64, 3, 3)
    got = _check(w)
    np.testing.assert_allclose(got, max(spectrum), rtol=1e-12)


def test_zero_nan_and_inf_channels_in_one_group():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 32, 3, 3)).astype(np.float32)
    w[1] = 0.0
    w[2, 5, 1, 1] = np.nan
    w[4, 0, 0, 0] = np.inf
    w[5, 3, 2, 2] = -np.inf
    got = _core.channel_spectral_norms(w, None, 1)
    assert got[1] == 0.0
    assert np.isnan(got[[2, 4, 5]]).all()
    ok = [0, 3, 6]
    np.testing.assert_allclose(got[ok], reference.channel_spectral_norms(w[ok]), rtol=RTOL)


def test_float32_extreme_magnitudes_in_one_group():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 20, 3, 3))
    w *= np.array([3e37, 1e-38, 1e-44 / 3, 1.0])[:, None, None, None]
    _check(w.astype(np.float32))


def test_batch_equals_one_call_per_layer_bit_for_bit():
    rng = np.random.default_rng(5)
    shapes = [((64, 3, 3, 3), np.float32), ((37, 64, 3, 3), np.float32), ((16, 64, 1, 1), np.float64),
              ((9, 3, 7, 7), np.float32), ((0, 4, 3, 3), np.float32), ((5, 0, 3), np.float64),
              ((8, 16, 5, 5), np.float64), ((12, 4, 3, 3), np.float32), ((7, 20), np.float32)]
    weights = [rng.standard_normal(s).astype(d) for s, d in shapes]
    weights[1][3, 0, 0, 0] = np.nan
    weights.append(np.asfortranarray(rng.standard_normal((6, 5, 3))))  # copied to C order
    scales = [None if i % 3 else 0.5 + rng.random(w.shape[0]) for i, w in enumerate(weights)]
    for threads in (1, 2, 3):
        got = _core.channel_spectral_norms_batch(weights, scales, threads)
        assert len(got) == len(weights)
        for w, s, g in zip(weights, scales, got):
            assert np.array_equal(g, _core.channel_spectral_norms(w, s, 1), equal_nan=True)


def test_batch_validates_like_the_single_call():
    w = np.ones((4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="one entry"):
        _core.channel_spectral_norms_batch([w], [], 1)
    with pytest.raises(TypeError, match=r"weights\[1\]"):
        _core.channel_spectral_norms_batch([w, w.astype(np.int32)], [None, None], 1)
    with pytest.raises(ValueError, match=r"scales\[0\]"):
        _core.channel_spectral_norms_batch([w], [np.array([1.0, np.inf, 1.0, 1.0])], 1)
    with pytest.raises(ValueError, match=r"scales\[0\] must have shape \(4,\)"):
        _core.channel_spectral_norms_batch([w], [np.ones(3)], 1)
    assert _core.channel_spectral_norms_batch([], [], 1) == []
