"""Fuzzing of every binding in mars_native._core and of the public wrappers.

Random shapes (0-5 dims, zero-size dims), strides (steps, transposes, negative strides,
misaligned and byte-swapped views), dtypes (float16/32/64, ints, bool, complex, object), values
(NaN, +-Inf, subnormals, huge) and parameters (including junk of the wrong type) must give a
result, a ValueError or a TypeError: never a crash, never another exception. This file also runs
under AddressSanitizer + UndefinedBehaviorSanitizer in CI (.ci/run), which turns any memory error
or undefined behaviour behind those calls into a failure.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mars_native as mn
from mars_native import _core
from mars_native.aggregation import weighted_mean

ALLOWED = (ValueError, TypeError)
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_,
          np.complex64]
SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 5e-324, 1e-310, 1e300, -1e300, 3.0e38]


def _cast(value, dtype) -> np.ndarray:
    """``value`` as ``dtype`` (overflow to inf and underflow to 0 are intended here)."""
    with np.errstate(all="ignore"):
        return np.array(value).astype(dtype)


@st.composite
def raw_arrays(draw, dtypes=DTYPES, max_dims=5, min_dims=0):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=5))
    if dtype.kind == "f":
        elements = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, width=8 * min(dtype.itemsize, 8)))
        return draw(hnp.arrays(dtype, shape, elements=elements.map(lambda v: _cast(v, dtype))))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def views(draw, base=None):
    """An array, then possibly a strided / transposed / reversed / misaligned / swapped view."""
    arr = draw(base if base is not None else raw_arrays())
    kind = draw(st.sampled_from(["plain", "step", "reverse", "transpose", "misaligned", "swapped",
                                 "fortran", "readonly"]))
    if kind == "step" and arr.ndim:
        axis = draw(st.integers(0, arr.ndim - 1))
        index = [slice(None)] * arr.ndim
        index[axis] = slice(None, None, draw(st.integers(2, 3)))
        arr = arr[tuple(index)]
    elif kind == "reverse" and arr.ndim:
        arr = arr[::-1]
    elif kind == "transpose":
        arr = arr.T
    elif kind == "misaligned" and arr.dtype.itemsize > 1:
        buf = np.zeros(arr.nbytes + 1, np.uint8)
        mis = np.frombuffer(buf.data, dtype=arr.dtype, count=arr.size, offset=1).reshape(arr.shape)
        mis[...] = arr
        arr = mis
    elif kind == "swapped" and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder())
    elif kind == "fortran":
        arr = np.asfortranarray(arr)
    elif kind == "readonly":
        arr = arr.copy()
        arr.flags.writeable = False
    return arr


junk = st.one_of(
    st.none(), st.text(max_size=3), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.floats(allow_nan=True), max_size=4),
    st.just([[1.0, 2.0], [3.0]]),  # ragged
    st.just({"a": 1}), st.just(object()),
    st.just(np.array([object(), 1.0], dtype=object)),
    views(),
)

floats_any = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True))
threads = st.integers(-2, 8)
float_views = views(raw_arrays([np.float32, np.float64], max_dims=2, min_dims=1))
vec = views(raw_arrays([np.float32, np.float64, np.int32, np.float16], max_dims=1, min_dims=1))
mat = views(raw_arrays([np.float32, np.float64, np.int64], max_dims=2, min_dims=2))
# the kernel's typical inputs, equal-shaped, sometimes with junk mixed in
same_shape_lists = st.integers(1, 4).flatmap(
    lambda n: hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4).flatmap(
        lambda shape: st.lists(st.sampled_from([np.float32, np.float64]).flatmap(
            lambda d: hnp.arrays(d, shape, elements=st.sampled_from(SPECIAL).map(lambda v: _cast(v, d)))),
            min_size=n, max_size=n)))

#: binding name -> strategies for its positional arguments (each may be swapped for junk)
SPECS: dict[str, list[st.SearchStrategy]] = {
    "build_info": [],
    "buffer_cache_info": [],
    "set_buffer_cache_limit": [st.sampled_from([0, 1, 512 << 20, -1, 2**63, 10**30])],
    "cached_zeros": [st.integers(-3, 5000), threads],
    "get_num_threads": [],
    "set_num_threads": [st.integers(-3, 4)],
    "channel_spectral_norms": [views(raw_arrays([np.float32, np.float64, np.float16, np.int32], min_dims=1)),
                               st.one_of(st.none(), vec), threads],
    "channel_spectral_norms_batch": [
        st.lists(views(raw_arrays([np.float32, np.float64, np.float16, np.int32], min_dims=1)), max_size=3),
        st.lists(st.one_of(st.none(), vec), max_size=3), threads,
        st.one_of(st.none(), junk, st.lists(st.one_of(st.integers(-(2**70), 2**70), junk), max_size=3))],
    "top_k_energy": [vec, floats_any, st.sampled_from(["ceil", "quantile", "", "CEIL"])],
    "top_k_concat": [st.one_of(st.lists(vec, max_size=4), vec), floats_any,
                     st.sampled_from(["ceil", "quantile", "", "CEIL"])],
    "top_k_count": [floats_any, st.integers(-(2**63), 2**63 - 1)],
    "linear_quantile": [vec, floats_any],
    "wasserstein_1d": [vec, vec, floats_any],
    "pairwise_wasserstein": [mat, floats_any, threads],
    "kwmeans_fit": [mat, st.integers(-1, 5), st.sampled_from([1.0, 2.0, 0.5, 3.0, np.nan]),
                    st.integers(-1, 3), st.integers(-1, 5), floats_any, st.integers(-1, 2**64 - 1),
                    st.sampled_from(["paper", "official", "bogus"]), threads],
    "kwmeans_predict": [mat, mat, st.sampled_from([1.0, 2.0, 0.5]),
                        st.sampled_from(["paper", "official", "x"]), st.one_of(st.none(), mat),
                        threads],
    "splitmix64_stream": [st.integers(-1, 2**64), st.integers(-2, 64)],
    "aggregate": [st.one_of(same_shape_lists, st.lists(views(), max_size=3)),
                  st.one_of(st.lists(floats_any, max_size=4), vec),
                  st.sampled_from([None, np.float32, np.float64, "float32", np.int8, "bogus"]),
                  threads, st.one_of(st.none(), float_views), floats_any],
    "aggregate_many": [st.lists(st.one_of(same_shape_lists, st.lists(views(), max_size=3), junk), max_size=3),
                       st.one_of(st.lists(floats_any, max_size=4), vec),
                       st.one_of(st.none(), junk, st.lists(st.sampled_from(
                           [None, np.float32, np.float64, "float32", np.int8, "bogus"]), max_size=3)),
                       threads,
                       st.one_of(st.none(), junk, st.lists(st.one_of(st.none(), float_views), max_size=3)),
                       floats_any],
    "accumulate": [views(raw_arrays([np.float64, np.float32])), views(), floats_any, threads],
    "stream_sum": [st.one_of(st.lists(views(), max_size=4), views()), threads],
    "first_non_finite": [st.one_of(st.lists(views(), max_size=4), views())],
    "finalize_mean": [views(raw_arrays([np.float64, np.float32])), floats_any,
                      st.sampled_from([None, np.float32, np.float64, np.int64]), threads,
                      st.one_of(st.none(), views()), floats_any],
}


def _bindings() -> list[str]:
    return sorted(n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n)))


def test_every_binding_is_fuzzed():
    missing = set(_bindings()) - set(SPECS)
    assert not missing, f"bindings without a fuzz spec (add them to SPECS): {sorted(missing)}"


@contextlib.contextmanager
def _restore_globals():
    """The default thread count and the buffer cache limit as they were (fuzzed setters)."""
    before = _core.get_num_threads()
    limit = _core.buffer_cache_info()["limit_bytes"]
    try:
        yield
    finally:
        _core.set_num_threads(0)
        if before != _core.get_num_threads():
            _core.set_num_threads(before)
        _core.set_buffer_cache_limit(limit)


#: bindings that allocate what their arguments ask for: a MemoryError is their clean answer to
#: a request this machine cannot hold (as numpy.zeros gives)
ALLOCATORS = {"cached_zeros"}


def _call(fn, args, allowed=ALLOWED) -> None:
    with np.errstate(all="ignore"):
        try:
            fn(*args)
        except allowed:
            pass


@pytest.mark.parametrize("name", sorted(SPECS))
@FUZZ
@given(data=st.data())
def test_binding_gives_a_result_or_a_clean_error(name, data):
    if not hasattr(_core, name):
        pytest.skip(f"{name} is not compiled into this build")
    specs = SPECS[name]
    args = [data.draw(s, label=f"arg{i}") for i, s in enumerate(specs)]
    mode = data.draw(st.sampled_from(["as is", "junk one", "fewer", "more"]), label="mode")
    if mode == "junk one" and args:
        args[data.draw(st.integers(0, len(args) - 1), label="junk at")] = data.draw(junk, label="junk")
    elif mode == "fewer" and args:
        args = args[: data.draw(st.integers(0, len(args) - 1), label="keep")]
    elif mode == "more":
        args.append(data.draw(junk, label="extra"))
    with _restore_globals():
        _call(getattr(_core, name), args,
              (*ALLOWED, MemoryError) if name in ALLOCATORS else ALLOWED)


# ---------------------------------------------------------------------------------- wrappers
def _public_calls(data) -> list[tuple[str, object, tuple]]:
    a, b = data.draw(views(), label="a"), data.draw(views(), label="b")
    x = data.draw(st.one_of(views(), junk), label="x")
    k = data.draw(floats_any, label="k")
    t = data.draw(st.one_of(st.none(), threads), label="threads")
    return [
        ("channel_spectral_norms", mn.channel_spectral_norms, (a, data.draw(st.one_of(st.none(), views())), t)),
        ("top_k_energy", mn.top_k_energy, (x, k, data.draw(st.sampled_from(["ceil", "quantile", "z"])))),
        ("wasserstein_1d", mn.wasserstein_1d, (a, b, data.draw(st.sampled_from([1, 2, 0.5, np.nan])))),
        ("pairwise_wasserstein", mn.pairwise_wasserstein, (x, 1, t)),
        ("KWMeans.fit", lambda X, n: mn.KWMeans(n_clusters=n, n_init=2, max_iter=5).fit(X),
         (x, data.draw(st.integers(-1, 4)))),
        ("weighted_mean", weighted_mean, (data.draw(st.one_of(st.lists(views(), max_size=3), junk)),
                                          data.draw(st.one_of(st.none(), junk)), None)),
    ]


@FUZZ
@given(data=st.data())
def test_public_wrappers_give_a_result_or_a_clean_error(data):
    for _, fn, args in _public_calls(data):
        _call(fn, args)


@st.composite
def junk_states(draw):
    keys = st.sampled_from(["conv.weight", "bn.weight", "bn.bias", "bn.running_var",
                            "bn.running_mean", "bn.num_batches_tracked", "fc.weight", "x"])
    values = st.one_of(views(raw_arrays(max_dims=4)), junk)
    return draw(st.one_of(st.dictionaries(keys, values, max_size=6), junk))


@FUZZ
@given(states=st.lists(junk_states(), min_size=1, max_size=4),
       weights=st.one_of(st.none(), st.lists(floats_any, min_size=1, max_size=4)),
       global_state=st.one_of(st.none(), junk_states()))
def test_mars_on_junk_states_gives_a_report_or_a_clean_error(states, weights, global_state):
    mars = mn.MARS(n_init=2)
    with np.errstate(all="ignore"):
        try:
            new, report = mars.aggregate(states, weights=weights, global_state=global_state)
        except ALLOWED:
            return
    assert report.n_clients == len(states)
    if new is not None:
        for v in new.values():
            arr = np.asarray(v)
            if arr.dtype.kind == "f":
                assert np.isfinite(arr).all()
    rnd = mars.round(global_state=global_state if report is not None else None)
    for s in states:
        with contextlib.suppress(*ALLOWED):
            rnd.add(s)
    with contextlib.suppress(*ALLOWED), np.errstate(all="ignore"):
        rnd.finish()


def test_fuzz_specs_match_the_signatures():
    # each spec gives at most as many arguments as the binding accepts
    for name, specs in SPECS.items():
        if not hasattr(_core, name):
            continue
        doc = (getattr(_core, name).__doc__ or "").splitlines()[0]
        n_params = 0 if "()" in doc.split("->")[0] else doc.split("->")[0].count(",") + 1
        assert len(specs) == n_params, (name, doc)
        assert inspect.isbuiltin(getattr(_core, name))


@st.composite
def aggregate_calls(draw):
    """Arguments that match in count and shape (so the kernels run), with views and specials."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    n = draw(st.integers(1, 4))
    base_arrays = raw_arrays([dtype], max_dims=0).flatmap(
        lambda _: hnp.arrays(dtype, shape, elements=st.sampled_from(SPECIAL).map(lambda v: _cast(v, dtype))))
    bufs = [draw(views(base_arrays)) for _ in range(n)]
    weights = draw(st.lists(st.one_of(st.floats(0, 1e6), st.sampled_from([0.0, 1e308])),
                            min_size=n, max_size=n))
    base = draw(st.one_of(st.none(), views(base_arrays)))
    return bufs, weights, base, draw(floats_any), draw(threads)


@FUZZ
@given(aggregate_calls(), st.sampled_from([None, np.float32, np.float64]))
def test_aggregate_kernels_with_matching_arguments(call, out_dtype):
    bufs, weights, base, lr, n_threads = call
    _call(_core.aggregate, (bufs, weights, out_dtype, n_threads, base, lr))
    acc = np.zeros(bufs[0].size)
    for b, w in zip(bufs, weights):
        _call(_core.accumulate, (acc, b.reshape(-1) if b.flags.c_contiguous else b, w, n_threads))
    _call(_core.finalize_mean, (acc, sum(weights), out_dtype, n_threads,
                                None if base is None else base.reshape(-1), lr))
    _call(weighted_mean, (bufs, weights, out_dtype))
