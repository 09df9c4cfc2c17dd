"""The aggregate kernels (_core.aggregate / accumulate / finalize_mean) and weighted_mean.

Against the NumPy twins in reference.py: the compiled loop may fuse ``acc += w * x`` into one
FMA, so sums agree within a few float64 ulps of ``sum_i |w_i x_i| / sum_i w_i`` (tolerance
below), not bit for bit; the statistics of accumulate (max |x|, checksum) are exact. The thread
count never changes a bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mars_native import _core, reference
from mars_native.aggregation import weighted_mean

EPS64 = np.finfo(np.float64).eps
float_dtypes = st.sampled_from([np.float32, np.float64])
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)
weight_values = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e3))


def _values(dtype):
    bound = float(np.float32(1e30)) if dtype == np.float32 else 1e200
    return st.floats(min_value=-bound, max_value=bound, width=32 if dtype == np.float32 else 64,
                     allow_subnormal=True)


@st.composite
def rounds(draw, with_base=False):
    """(buffers, weights, base, server_lr): N same-shape, same-dtype arrays and valid weights."""
    dtype = draw(float_dtypes)
    shape = draw(shapes)
    n = draw(st.integers(1, 6))
    bufs = [draw(hnp.arrays(dtype, shape, elements=_values(dtype))) for _ in range(n)]
    weights = draw(st.lists(weight_values, min_size=n, max_size=n))
    assume(sum(weights) > 0)
    base = draw(hnp.arrays(dtype, shape, elements=_values(dtype))) if with_base else None
    lr = draw(st.floats(min_value=-2.0, max_value=2.0)) if with_base else 1.0
    return bufs, np.asarray(weights), base, lr


def _tolerance(bufs, weights, base, lr):
    """Error bound of a weighted mean computed in float64 in two ways (FMA or not)."""
    scale = sum(w * np.abs(b.astype(np.float64)) for w, b in zip(weights, bufs)) / weights.sum()
    n = len(bufs) + 2
    if base is not None:
        g = np.abs(base.astype(np.float64))
        scale = (1 + abs(lr)) * (scale + g) + g
    return 4 * n * EPS64 * scale + np.finfo(np.float64).tiny


@given(st.booleans().flatmap(lambda with_base: rounds(with_base=with_base)))
def test_aggregate_matches_reference_float64_output(case):
    bufs, w, base, lr = case
    got = _core.aggregate(bufs, w, np.float64, 0, base, lr)
    expected = reference.aggregate(bufs, w, np.float64, base, lr)
    assert got.shape == bufs[0].shape and got.dtype == np.float64
    assert np.all(np.abs(got - expected) <= _tolerance(bufs, w, base, lr))


@given(rounds(), st.booleans())
def test_aggregate_float32_output_is_the_rounded_float64_mean(case, with_base):
    bufs, w, _, _ = case
    base = bufs[0] if with_base else None
    got32 = _core.aggregate(bufs, w, np.float32, 0, base, 0.5)
    got64 = _core.aggregate(bufs, w, np.float64, 0, base, 0.5)
    assert got32.dtype == np.float32
    with np.errstate(over="ignore"):  # float64 data may exceed float32's range: +-inf, as numpy
        np.testing.assert_array_equal(got32, got64.astype(np.float32))


@given(rounds())
def test_integer_data_and_weights_are_exact(case):
    # integer-valued data and weights: every product and partial sum is an integer below 2**53,
    # exact in float64 with or without FMA, so the kernel and the twin agree bit for bit.
    bufs, w, _, _ = case
    bufs = [np.asarray(np.clip(b, -1e6, 1e6).round(), dtype=np.float32) for b in bufs]
    w = np.floor(w)
    assume(w.sum() > 0)
    got = _core.aggregate(bufs, w, np.float32)
    np.testing.assert_array_equal(got, reference.aggregate(bufs, w, np.float32))


def test_equal_weights_give_the_plain_mean():
    rng = np.random.default_rng(0)
    bufs = [rng.standard_normal((7, 5)).astype(np.float32) for _ in range(4)]
    got = _core.aggregate(bufs, [2.0, 2.0, 2.0, 2.0], np.float64)
    np.testing.assert_allclose(got, np.mean(np.stack(bufs).astype(np.float64), axis=0), rtol=1e-15)


def test_zero_weight_buffers_are_not_read():
    good = np.ones(5, np.float32)
    poisoned = np.full(5, np.nan, np.float32)
    got = _core.aggregate([good, poisoned], [1.0, 0.0])
    np.testing.assert_array_equal(got, good)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_never_changes_a_bit(dtype):
    rng = np.random.default_rng(1)
    n = 300_007  # several chunks of the parallel loop and a ragged tail
    bufs = [(rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)).astype(dtype) for _ in range(5)]
    w = rng.random(5) * 100
    base = rng.standard_normal(n).astype(dtype)
    ref = _core.aggregate(bufs, w, np.float64, 1, base, 0.8)
    acc1 = np.zeros(n)
    stats1 = [_core.accumulate(acc1, b, wi, 1) for b, wi in zip(bufs, w)]
    fin1 = _core.finalize_mean(acc1, w.sum(), np.float64, 1, base, 0.8)
    for threads in (2, 3, 7):
        assert _core.aggregate(bufs, w, np.float64, threads, base, 0.8).tobytes() == ref.tobytes()
        acc = np.zeros(n)
        stats = [_core.accumulate(acc, b, wi, threads) for b, wi in zip(bufs, w)]
        assert stats == stats1
        assert acc.tobytes() == acc1.tobytes()
        fin = _core.finalize_mean(acc, w.sum(), np.float64, threads, base, 0.8)
        assert fin.tobytes() == fin1.tobytes()


@st.composite
def models(draw):
    """(groups, weights, out_dtypes, bases, server_lr): the tensors of N clients' models (a few
    keys of their own shape and dtype, some with a base), weights as in rounds()."""
    n = draw(st.integers(1, 6))
    weights = draw(st.lists(weight_values, min_size=n, max_size=n))
    assume(sum(weights) > 0)
    groups, out_dtypes, bases = [], [], []
    for _ in range(draw(st.integers(0, 4))):
        dtype = draw(float_dtypes)
        shape = draw(shapes)
        groups.append([draw(hnp.arrays(dtype, shape, elements=_values(dtype))) for _ in range(n)])
        out_dtypes.append(draw(st.sampled_from([None, np.float32, np.float64])))
        bases.append(draw(st.none() | hnp.arrays(dtype, shape, elements=_values(dtype))))
    lr = draw(st.floats(min_value=-2.0, max_value=2.0))
    return groups, np.asarray(weights), out_dtypes, bases, lr


@given(models())
def test_aggregate_many_is_aggregate_per_group(case):
    groups, w, out_dtypes, bases, lr = case
    got = _core.aggregate_many(groups, w, out_dtypes, 0, bases, lr)
    assert len(got) == len(groups)
    for g, d, b, mean in zip(groups, out_dtypes, bases, got):
        one = _core.aggregate(g, w, d, 0, b, lr)  # the same values, bit for bit
        assert mean.dtype == one.dtype and mean.shape == one.shape == g[0].shape
        assert mean.tobytes() == one.tobytes()
    # and the NumPy twin, in float64 (the float32 outputs are these rounded, tested above)
    wide = _core.aggregate_many(groups, w, [np.float64] * len(groups), 0, bases, lr)
    expected = reference.aggregate_many(groups, w, [np.float64] * len(groups), bases, lr)
    for g, b, mean, ref in zip(groups, bases, wide, expected):
        assert np.all(np.abs(mean - ref) <= _tolerance(g, w, b, lr))


def test_aggregate_many_threads_and_zero_weights():
    rng = np.random.default_rng(3)
    sizes = [300_007, 1, 0, 70_000, 5]  # many tasks, a ragged tail, an empty tensor
    groups = [[rng.standard_normal(s).astype(np.float32 if k % 2 else np.float64) for _ in range(6)]
              for k, s in enumerate(sizes)]
    groups[0][2][:] = np.nan  # a zero-weight client is not read
    w = np.array([1.0, 2.0, 0.0, 3.5, 1e-3, 7.0])
    bases = [None, g := groups[1][0] * 2, None, None, groups[4][1]]
    assert g is bases[1]
    ref = _core.aggregate_many(groups, w, None, 1, bases, 0.7)
    for k, mean in enumerate(ref):
        assert mean.tobytes() == _core.aggregate(groups[k], w, None, 1, bases[k], 0.7).tobytes()
        assert np.isfinite(mean).all()
    for threads in (2, 3, 7):
        got = _core.aggregate_many(groups, w, None, threads, bases, 0.7)
        assert [m.tobytes() for m in got] == [m.tobytes() for m in ref]
    assert _core.aggregate_many([], w) == []


def test_aggregate_many_rejects_bad_input_with_clear_errors():
    a = np.ones((2, 3), np.float32)
    w = np.ones(2)
    with pytest.raises(TypeError, match="groups must be a list or tuple"):
        _core.aggregate_many(a, w)
    with pytest.raises(TypeError, match=r"groups\[0\] must be a list or tuple"):
        _core.aggregate_many([a], w)
    with pytest.raises(ValueError, match=r"groups\[1\] has 1 arrays but groups\[0\] has 2"):
        _core.aggregate_many([[a, a], [a]], w)
    with pytest.raises(ValueError, match=r"groups\[1\]\[1\] has shape \(3, 2\) but groups\[1\]\[0\] has shape \(2, 3\)"):
        _core.aggregate_many([[a, a], [a, a.reshape(3, 2)]], w)
    with pytest.raises(TypeError, match=r"groups\[0\]\[1\] has dtype float64.*groups\[0\]\[0\] has dtype float32"):
        _core.aggregate_many([[a, a.astype(np.float64)]], w)
    with pytest.raises(TypeError, match=r"groups\[0\]\[0\] must be float32 or float64"):
        _core.aggregate_many([[a.astype(np.int32), a]], w)
    with pytest.raises(ValueError, match=r"groups\[0\]\[1\] must be C-contiguous"):
        _core.aggregate_many([[a, np.ones((3, 2), np.float32).T]], w)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        _core.aggregate_many([[a, a]], np.ones(3))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        _core.aggregate_many([[a, a]], [1.0, -1.0])
    with pytest.raises(ValueError, match="positive, finite sum"):
        _core.aggregate_many([[a, a]], [0.0, 0.0])
    with pytest.raises(ValueError, match="out_dtypes has 2 entries but there are 1 groups"):
        _core.aggregate_many([[a, a]], w, [None, None])
    with pytest.raises(TypeError, match="out_dtype must be float32 or float64"):
        _core.aggregate_many([[a, a]], w, [np.int64])
    with pytest.raises(ValueError, match="bases has 0 entries but there are 1 groups"):
        _core.aggregate_many([[a, a]], w, None, 0, [])
    with pytest.raises(TypeError, match=r"bases\[0\] has dtype float64.*groups\[0\] has dtype float32"):
        _core.aggregate_many([[a, a]], w, None, 0, [a.astype(np.float64)])
    with pytest.raises(ValueError, match=r"bases\[0\] has shape \(6,\) but groups\[0\] has shape \(2, 3\)"):
        _core.aggregate_many([[a, a]], w, None, 0, [a.ravel()])
    with pytest.raises(ValueError, match="server_lr must be finite"):
        _core.aggregate_many([[a, a]], w, None, 0, None, float("nan"))
    with pytest.raises(ValueError, match="n_threads"):
        _core.aggregate_many([[a, a]], w, None, -1)


@given(float_dtypes.flatmap(lambda d: hnp.arrays(d, shapes, elements=_values(d))),
       st.floats(min_value=-1e3, max_value=1e3))
def test_accumulate_matches_reference(x, weight):
    acc0 = np.random.default_rng(x.size).standard_normal(x.size)
    got_acc, ref_acc = acc0.copy(), acc0.copy()
    got = _core.accumulate(got_acc, x, weight)
    expected = reference.accumulate(ref_acc, x, weight)
    assert got == expected  # max |x| and checksum: exact
    tol = 4 * EPS64 * (np.abs(acc0) + abs(weight) * np.abs(x.astype(np.float64).reshape(-1)))
    assert np.all(np.abs(got_acc - ref_acc) <= tol + np.finfo(np.float64).tiny)


def test_accumulate_statistics():
    x = np.array([1.0, -3.0, 2.0], np.float32)
    max_abs, checksum = _core.accumulate(np.zeros(3), x, 0.0)
    assert max_abs == 3.0
    assert checksum == reference.buffer_checksum(x)
    assert _core.accumulate(np.zeros(0), np.zeros(0, np.float32), 1.0) == (0.0, 0)
    assert np.isnan(_core.accumulate(np.zeros(2), np.array([np.nan, 1.0]), 1.0)[0])
    # the checksum sees a swap of two values and a sign flip
    assert reference.buffer_checksum(x[[1, 0, 2]]) != checksum
    assert reference.buffer_checksum(-x) != checksum
    acc = np.zeros(3)
    _core.accumulate(acc, x, 2.0)
    _core.accumulate(acc, x, -2.0)
    np.testing.assert_array_equal(acc, 0.0)


@given(st.integers(0, 40), st.floats(min_value=1e-3, max_value=1e6), st.booleans(),
       st.floats(min_value=-2, max_value=2), float_dtypes)
def test_finalize_matches_reference(n, total, with_base, lr, out_dtype):
    rng = np.random.default_rng(n)
    acc = rng.standard_normal(n) * 1e3
    base = rng.standard_normal(n).astype(np.float32) if with_base else None
    got = _core.finalize_mean(acc, total, out_dtype, 0, base, lr)
    expected = reference.finalize_mean(acc, total, out_dtype, base, lr)
    assert got.dtype == out_dtype
    if base is None:
        np.testing.assert_array_equal(got, expected)
    else:
        m = np.abs(acc / total)
        tol = 4 * EPS64 * ((1 + abs(lr)) * (m + np.abs(base)) + np.abs(base))
        if out_dtype == np.float32:
            tol = tol + np.spacing(np.abs(expected).astype(np.float32))
        assert np.all(np.abs(got.astype(np.float64) - expected) <= tol)


# ---------------------------------------------------------------------------------- errors
def test_aggregate_rejects_bad_input_with_clear_errors():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="buffers must not be empty"):
        _core.aggregate([], [])
    with pytest.raises(TypeError, match="list or tuple"):
        _core.aggregate(a, [1.0])
    with pytest.raises(ValueError, match=r"buffers\[1\] has shape \(3, 2\)"):
        _core.aggregate([a, np.ones((3, 2), np.float32)], [1, 1])
    with pytest.raises(TypeError, match=r"buffers\[1\] has dtype float64"):
        _core.aggregate([a, a.astype(np.float64)], [1, 1])
    with pytest.raises(TypeError, match=r"buffers\[0\] must be float32 or float64, got dtype int64"):
        _core.aggregate([np.ones(3, np.int64)], [1])
    with pytest.raises(TypeError, match="numpy.ndarray"):
        _core.aggregate([[1.0, 2.0]], [1])
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.aggregate([a, np.ones((3, 2), np.float32).T], [1, 1])
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        _core.aggregate([a, a], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        _core.aggregate([a, a], [1.0, -1.0])
    with pytest.raises(ValueError, match="NaN"):
        _core.aggregate([a, a], [1.0, np.nan])
    with pytest.raises(ValueError, match="positive, finite sum"):
        _core.aggregate([a, a], [0.0, 0.0])
    with pytest.raises(ValueError, match="positive, finite sum"):
        _core.aggregate([a, a], [1e308, 1e308])
    with pytest.raises(TypeError, match="out_dtype must be float32 or float64"):
        _core.aggregate([a], [1.0], np.int32)
    with pytest.raises(ValueError, match="n_threads"):
        _core.aggregate([a], [1.0], None, -1)
    with pytest.raises(ValueError, match="server_lr must be finite"):
        _core.aggregate([a], [1.0], None, 0, a, np.inf)
    with pytest.raises(ValueError, match=r"base has shape \(3,\)"):
        _core.aggregate([a], [1.0], None, 0, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="base has dtype float64"):
        _core.aggregate([a], [1.0], None, 0, a.astype(np.float64))
    big_endian = np.ones(3, ">f4")
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.aggregate([big_endian], [1.0])
    misaligned = np.frombuffer(b"\0" + np.ones(3, np.float32).tobytes(), np.float32, 3, offset=1)
    with pytest.raises(ValueError, match="aligned"):
        _core.aggregate([misaligned], [1.0])


def test_accumulate_and_finalize_reject_bad_input():
    acc = np.zeros(4)
    with pytest.raises(TypeError, match="acc must be float64"):
        _core.accumulate(np.zeros(4, np.float32), np.ones(4), 1.0)
    with pytest.raises(ValueError, match="x has 3 elements"):
        _core.accumulate(acc, np.ones(3), 1.0)
    readonly = np.zeros(4)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.accumulate(readonly, np.ones(4), 1.0)
    with pytest.raises(ValueError, match="weight must be finite"):
        _core.accumulate(acc, np.ones(4), np.nan)
    big = np.zeros(8)
    with pytest.raises(ValueError, match="overlap"):
        _core.accumulate(big[:4], big[2:6], 1.0)
    same = np.ones(4)
    _core.accumulate(same, same, 1.0)  # exact aliasing is element-wise, allowed: acc = 2 acc
    np.testing.assert_array_equal(same, 2.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.accumulate(np.zeros(2), np.ones(4)[::2], 1.0)
    with pytest.raises(ValueError, match="total_weight must be positive"):
        _core.finalize_mean(acc, 0.0)
    with pytest.raises(ValueError, match="total_weight must be positive"):
        _core.finalize_mean(acc, np.nan)
    with pytest.raises(ValueError, match="base has 3 elements"):
        _core.finalize_mean(acc, 1.0, None, 0, np.ones(3))


# ---------------------------------------------------------------------------------- wrapper
def test_weighted_mean_converts_what_the_kernel_does_not_read():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal((6, 4)).astype(np.float32).T  # strided
    expected = reference.aggregate([a, np.ascontiguousarray(b)], [1.0, 3.0], np.float32)
    np.testing.assert_array_equal(weighted_mean([a, b], [1.0, 3.0]), expected)
    np.testing.assert_array_equal(weighted_mean([torch.from_numpy(a), b], [1, 3]), expected)
    # float16 and bfloat16 are computed from float32; mixed precision is computed in float64
    half = weighted_mean([a.astype(np.float16), b.astype(np.float16)], [1, 3])
    assert half.dtype == np.float32
    bf = weighted_mean([torch.from_numpy(a).bfloat16(), torch.from_numpy(a).bfloat16()])
    assert bf.dtype == np.float32
    mixed = weighted_mean([a, b.astype(np.float64)], [1.0, 3.0])
    assert mixed.dtype == np.float64
    np.testing.assert_allclose(mixed, expected, rtol=1e-6)
    step = weighted_mean([a, b], [1.0, 3.0], base=np.zeros_like(a), server_lr=0.5)
    np.testing.assert_allclose(step, 0.5 * expected, rtol=1e-6)


def test_weighted_mean_errors():
    a = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="at least one array"):
        weighted_mean([])
    with pytest.raises(TypeError, match="sequence of arrays"):
        weighted_mean(a)
    with pytest.raises(ValueError, match=r"arrays\[1\] has shape \(2,\)"):
        weighted_mean([a, np.ones(2)])
    with pytest.raises(TypeError, match="expected a float tensor"):
        weighted_mean([np.ones(3, np.int32)])
    with pytest.raises(ValueError, match="one entry per client: 2 clients"):
        weighted_mean([a, a], [1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] = -1.0"):
        weighted_mean([a, a], [1.0, -1.0])
    with pytest.raises(ValueError, match="weights sum to 0"):
        weighted_mean([a, a], [0, 0])
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        weighted_mean([a], n_threads=0)


# ---------------------------------------------------------------------------------- stream_sum
@given(st.lists(float_dtypes.flatmap(lambda d: hnp.arrays(d, st.integers(0, 40_000), elements=_values(d))),
                max_size=6))
def test_stream_sum_matches_reference(arrays):
    want = reference.stream_sum(arrays)
    scale = sum(float(np.abs(a.astype(np.float64)).sum()) for a in arrays)
    got = [_core.stream_sum(arrays, t) for t in (1, 2, 5)]
    assert got[0] == got[1] == got[2]  # bit-identical for any thread count
    assert abs(got[0] - want) <= 1e-4 * scale + 1e-300


def test_stream_sum_reads_everything_once():
    x = np.ones(100_003, np.float32)
    y = np.full((3, 7), 2.0)
    assert _core.stream_sum([x, y, x[:0]], 2) == 100_003 + 42
    assert _core.stream_sum([], 1) == 0.0


def test_stream_sum_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match=r"arrays\[1\] must be float32 or float64"):
        _core.stream_sum([np.ones(3, np.float32), np.arange(3)])
    with pytest.raises(ValueError, match=r"arrays\[0\] must be C-contiguous"):
        _core.stream_sum([np.ones((4, 4))[:, ::2]])
    with pytest.raises(TypeError, match="list or tuple"):
        _core.stream_sum(np.ones(3))
    with pytest.raises(ValueError, match="n_threads"):
        _core.stream_sum([np.ones(3)], -1)


# ---------------------------------------------------------------------------- first_non_finite
def _with_specials(dtype):
    return st.one_of(_values(dtype), st.sampled_from([np.nan, np.inf, -np.inf]))


@given(st.lists(float_dtypes.flatmap(lambda d: hnp.arrays(d, st.integers(0, 9000), elements=_with_specials(d))),
                max_size=6))
def test_first_non_finite_matches_reference(arrays):
    assert _core.first_non_finite(arrays) == reference.first_non_finite(arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "nan-payload"])
def test_first_non_finite_finds_one_value_anywhere(dtype, bad):
    arrays = [np.zeros(5, dtype), np.ones(10_000, dtype), np.zeros((3, 4), dtype)]
    assert _core.first_non_finite(arrays) == -1
    for where in (0, 4095, 4096, 9_999):
        x = arrays[1].copy()
        if bad == "nan-payload":  # a NaN with a non-default payload and the sign bit set
            x.view(np.uint32 if dtype == np.float32 else np.uint64)[where] = (
                0xFF800001 if dtype == np.float32 else 0xFFF0000000000001)
        else:
            x[where] = bad
        assert _core.first_non_finite([arrays[0], x, x]) == 1
    # The largest finite values and subnormals are finite.
    info = np.finfo(dtype)
    assert _core.first_non_finite([np.array([info.max, -info.max, info.tiny / 2], dtype)]) == -1


def test_first_non_finite_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match=r"arrays\[1\] must be float32 or float64"):
        _core.first_non_finite([np.ones(3, np.float32), np.arange(3)])
    with pytest.raises(ValueError, match=r"arrays\[0\] must be C-contiguous"):
        _core.first_non_finite([np.ones((4, 4))[:, ::2]])
    assert _core.first_non_finite([]) == -1


@given(rounds(with_base=True))
def test_weighted_mean_fast_path_equals_the_general_path(case):
    """NumPy arrays go straight to the kernel when no out_dtype is asked; the result is the
    general path's (which validates and converts each array first), bit for bit."""
    bufs, weights, base, lr = case
    dtype = bufs[0].dtype

    class Sub(np.ndarray):  # not a plain ndarray: forces the validating, converting path
        pass

    fast = weighted_mean(bufs, weights, base=base, server_lr=lr, n_threads=2)
    general = weighted_mean([b.view(Sub) for b in bufs], weights, base=base, server_lr=lr,
                            n_threads=1)
    assert type(general) is np.ndarray
    assert fast.dtype == general.dtype == dtype and fast.shape == bufs[0].shape
    np.testing.assert_array_equal(fast, general)
    # Mixed dtypes and a strided view are not for the kernel as they are: converted, same values.
    if bufs[0].ndim and bufs[0].size:
        mixed = [b.astype(np.float64) for b in bufs[:1]] + list(bufs[1:])
        want = weighted_mean([b.astype(np.float64) for b in bufs], weights, n_threads=1)
        np.testing.assert_array_equal(weighted_mean(mixed, weights), want)
        strided = [np.repeat(b[..., None], 2, axis=-1)[..., 0] for b in bufs]
        np.testing.assert_array_equal(weighted_mean(strided, weights),
                                      weighted_mean(bufs, weights, dtype))
        # With out_dtype too (the batch aggregate asks for it per key), fast == general.
        other = np.float64 if dtype == np.float32 else np.float32
        np.testing.assert_array_equal(weighted_mean(bufs, weights, other),
                                      weighted_mean([b.view(Sub) for b in bufs], weights, other))
