"""channel_spectral_norms: compiled kernel vs the np.linalg.svd reference, shapes, dtypes, errors.

Tolerance: the largest singular value is perfectly conditioned (a perturbation E of M moves it by
at most ||E||_2), and both sides compute in float64 from the same (exactly converted) inputs, so
they agree to a few ulps times the matrix size. We use rtol = 1e-12 (observed: ~5e-16).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mars_native._native as mn
from mars_native import _core, reference

RTOL = 1e-12  # see module docstring

# Magnitudes per dtype: normal, huge, tiny, subnormal (and, for float64, squares that would
# overflow or underflow without the kernel's power-of-two rescaling).
MAGNITUDES = {
    np.float32: [1.0, 1e30, 1e-30, 1e-40],
    np.float64: [1.0, 1e30, 1e-30, 1e200, 1e-200, 1e-310],
}


@st.composite
def weights(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    out = draw(st.integers(1, 5))
    n_in = draw(st.integers(1, 10))
    n_kernel_dims = draw(st.integers(0, 3))  # 0: Linear (out, in); 1-3: conv1d/2d/3d
    kernel = tuple(draw(st.sampled_from([1, 2, 3, 5, 7])) for _ in range(n_kernel_dims))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (out, n_in, *kernel)
    w = rng.standard_normal(shape)
    if draw(st.booleans()):  # ties: a few distinct values only
        w = np.round(w * 2.0)
    zero_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    w[rng.random(shape) < zero_fraction] = 0.0
    w = (w * draw(st.sampled_from(MAGNITUDES[dtype]))).astype(dtype)
    return w


@given(weights())
def test_matches_svd_reference(w):
    got = mn.channel_spectral_norms(w)
    assert got.dtype == np.float64 and got.shape == (w.shape[0],)
    np.testing.assert_allclose(got, reference.channel_spectral_norms(w), rtol=RTOL, atol=0)


@given(weights(), st.integers(0, 2**32 - 1))
def test_scale_multiplies_each_channel(w, seed):
    scale = np.random.default_rng(seed).uniform(-3.0, 3.0, size=w.shape[0])
    got = mn.channel_spectral_norms(w, scale)
    np.testing.assert_allclose(got, reference.channel_spectral_norms(w, scale), rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "shape",
    [
        (8, 4, 5),  # conv1d
        (6, 5, 1, 1),  # 1x1 conv
        (16, 8, 3, 3),  # the hot case: 3x3 conv, cols=9 <= rows
        (4, 3, 7, 7),  # 7x7 stem conv: rows < cols, Gram of the rows
        (70, 130, 3, 3),  # more rows than one 64-row block, odd tail
        (4, 3, 3, 3, 3),  # conv3d
        (8, 1, 3, 3),  # depthwise: a single row per channel
        (8, 2, 3, 3),  # grouped, 2 inputs per group
        (10, 7),  # Linear: per-row L2 norm
        (1, 3, 3, 3),  # a single channel
        (5, 1, 1, 1),  # 1-element channels
        (3, 40, 5, 5),  # 25 x 25 Gram via cyclic Jacobi
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_shapes(shape, dtype):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    got = mn.channel_spectral_norms(w)
    np.testing.assert_allclose(got, reference.channel_spectral_norms(w), rtol=RTOL, atol=0)


def test_linear_rows_are_l2_norms():
    w = np.random.default_rng(1).standard_normal((6, 11))
    np.testing.assert_allclose(mn.channel_spectral_norms(w), np.linalg.norm(w, axis=1), rtol=1e-14)


def test_invariances():
    # sigma(c M) = |c| sigma(M); permuting the rows of a channel leaves sigma unchanged.
    w = np.random.default_rng(2).standard_normal((5, 6, 3, 3))
    base = mn.channel_spectral_norms(w)
    np.testing.assert_allclose(mn.channel_spectral_norms(-2.0 * w), 2.0 * base, rtol=1e-14)
    np.testing.assert_allclose(mn.channel_spectral_norms(w[:, ::-1]), base, rtol=1e-13)


def test_zero_size_dimensions():
    assert mn.channel_spectral_norms(np.zeros((0, 3, 3, 3), np.float32)).shape == (0,)
    np.testing.assert_array_equal(mn.channel_spectral_norms(np.zeros((4, 0, 3, 3))), np.zeros(4))
    np.testing.assert_array_equal(mn.channel_spectral_norms(np.zeros((4, 3, 0, 3))), np.zeros(4))
    np.testing.assert_array_equal(mn.channel_spectral_norms(np.zeros((3, 4, 3, 3))), np.zeros(3))


def test_non_finite_channel_gives_nan_only_there():
    w = np.ones((3, 2, 3, 3), np.float32)
    w[1, 0, 1, 1] = np.nan
    w[2, 1, 0, 0] = np.inf
    got = mn.channel_spectral_norms(w)
    assert got[0] == pytest.approx(np.sqrt(18.0), rel=1e-14)
    assert np.isnan(got[1]) and np.isnan(got[2])


def test_non_contiguous_input_equals_contiguous():
    w = np.random.default_rng(3).standard_normal((4, 6, 3, 3)).astype(np.float32)
    view = np.transpose(np.ascontiguousarray(np.transpose(w, (1, 0, 2, 3))), (1, 0, 2, 3))
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(mn.channel_spectral_norms(view), mn.channel_spectral_norms(w))
    strided = np.random.default_rng(4).standard_normal((8, 6, 3, 3))[::2]
    np.testing.assert_array_equal(
        mn.channel_spectral_norms(strided), mn.channel_spectral_norms(strided.copy())
    )


def test_float32_and_float64_are_read_without_copy():
    for dtype in (np.float32, np.float64):
        w = np.ones((2, 3, 3, 3), dtype)
        assert mn._float_weight(w, "weight") is w
    t = torch.ones(2, 3, 3, 3)
    assert np.shares_memory(mn._float_weight(t, "weight"), t.numpy())


def test_half_precision_is_converted_to_float32():
    w32 = np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w16 = w32.astype(np.float16)
    expected = mn.channel_spectral_norms(w16.astype(np.float32))
    np.testing.assert_array_equal(mn.channel_spectral_norms(w16), expected)
    np.testing.assert_array_equal(mn.channel_spectral_norms(torch.from_numpy(w16)), expected)
    tb = torch.from_numpy(w32).to(torch.bfloat16)
    np.testing.assert_array_equal(
        mn.channel_spectral_norms(tb), mn.channel_spectral_norms(tb.float().numpy())
    )


def test_torch_tensors():
    t = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    got = mn.channel_spectral_norms(t, scale=torch.full((6,), 0.5))
    expected = reference.channel_spectral_norms(t.detach().numpy()) * 0.5
    np.testing.assert_allclose(got, expected, rtol=RTOL)


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint16, np.bool_, np.complex128])
def test_non_float_dtype_is_type_error(dtype):
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        mn.channel_spectral_norms(np.ones((2, 3, 3, 3), dtype))
    with pytest.raises(TypeError, match="float32 or float64"):  # the core checks too
        _core.channel_spectral_norms(np.ones((2, 3, 3, 3), dtype))


def test_core_rejects_float16_directly():
    with pytest.raises(TypeError, match="float16"):
        _core.channel_spectral_norms(np.ones((2, 3), np.float16))


def test_torch_integer_tensor_is_type_error():
    with pytest.raises(TypeError, match="int64"):
        mn.channel_spectral_norms(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(5,), ()])
def test_ndim_below_two_is_value_error(shape):
    with pytest.raises(ValueError, match=r"ndim >= 2.*" + re.escape(str(shape))):
        mn.channel_spectral_norms(np.ones(shape))


def test_scale_validation():
    w = np.ones((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\).*got \(3,\)"):
        mn.channel_spectral_norms(w, np.ones(3))
    with pytest.raises(ValueError, match=r"scale contains NaN at index 2"):
        mn.channel_spectral_norms(w, np.array([1.0, 1.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"scale contains Inf"):
        mn.channel_spectral_norms(w, np.array([1.0, np.inf, 1.0, 1.0]))
    with pytest.raises(TypeError, match="scale"):
        mn.channel_spectral_norms(w, np.ones(4, np.complex64))


def test_n_threads_validation():
    w = np.ones((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="n_threads"):
        mn.channel_spectral_norms(w, n_threads=0)
    with pytest.raises(TypeError, match="n_threads"):
        mn.channel_spectral_norms(w, n_threads="2")
    with pytest.raises(ValueError, match="n_threads"):
        _core.channel_spectral_norms(w, None, -1)


def test_non_array_input_is_type_error():
    with pytest.raises(TypeError):
        mn.channel_spectral_norms("not an array")
    with pytest.raises(TypeError):
        mn.channel_spectral_norms([[1, 2], [3, 4]])  # an int64 array: ints are rejected
