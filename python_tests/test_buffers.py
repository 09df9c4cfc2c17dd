"""The core's buffer cache: the large arrays the core returns (means, the streaming round's
running sum) reuse the blocks of arrays Python has freed, up to a limit."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import mars_native as mn
from mars_native import _core, reference


@pytest.fixture(autouse=True)
def _default_limit():
    mn.set_buffer_cache_limit(512 << 20)
    yield
    mn.set_buffer_cache_limit(512 << 20)


def test_freed_output_block_is_reused_and_results_stay_right():
    rng = np.random.default_rng(0)
    bufs = [rng.standard_normal(100_003).astype(np.float32) for _ in range(3)]
    w = np.array([1.0, 2.0, 3.0])
    first = _core.aggregate(bufs, w)
    expected = first.copy()
    address = first.ctypes.data
    assert first.flags.c_contiguous and first.flags.writeable and first.flags.aligned
    assert address % 64 == 0
    before = mn.buffer_cache_info()
    del first
    gc.collect()
    after_free = mn.buffer_cache_info()
    assert after_free["cached_blocks"] == before["cached_blocks"] + 1
    assert after_free["cached_bytes"] >= before["cached_bytes"] + 100_003 * 4
    second = _core.aggregate(bufs, w)
    info = mn.buffer_cache_info()
    assert info["hits"] == before["hits"] + 1
    assert second.ctypes.data == address  # the same block, no fresh pages
    assert second.tobytes() == expected.tobytes()
    second[:] = 7.0  # writeable, and its own memory
    assert _core.aggregate(bufs, w).tobytes() == expected.tobytes()


def test_cached_zeros_are_zero_even_in_a_reused_block():
    for threads in (1, 2, 3):
        a = _core.cached_zeros(300_001, threads)
        np.testing.assert_array_equal(a, reference.cached_zeros(300_001))
        assert a.dtype == np.float64 and a.shape == (300_001,)
        a[:] = np.nan
        address = a.ctypes.data
        del a
        b = _core.cached_zeros(300_001, threads)
        assert b.ctypes.data == address
        assert not b.any()
        del b
    assert _core.cached_zeros(0).shape == (0,)
    with pytest.raises(ValueError, match="n must be >= 0"):
        _core.cached_zeros(-1)
    with pytest.raises(MemoryError, match=r"float64 array of shape \(4611686018427387904,\).*bytes of memory"):
        _core.cached_zeros(2**62)
    with pytest.raises(ValueError, match="n_threads"):
        _core.cached_zeros(3, -2)


def test_limit_bounds_the_cache_and_zero_turns_it_off():
    arrays = [_core.cached_zeros(50_000) for _ in range(4)]  # 400 KB each
    mn.set_buffer_cache_limit(1_000_000)
    del arrays
    gc.collect()
    info = mn.buffer_cache_info()
    assert info["limit_bytes"] == 1_000_000 and info["cached_bytes"] <= 1_000_000
    mn.set_buffer_cache_limit(0)
    info = mn.buffer_cache_info()
    assert info["cached_bytes"] == 0 and info["cached_blocks"] == 0
    a = _core.cached_zeros(1000)
    del a
    assert mn.buffer_cache_info()["cached_blocks"] == 0  # freed, not kept
    live = _core.cached_zeros(10)  # blocks of live arrays are untouched by the limit
    live[3] = 5.0
    mn.set_buffer_cache_limit(0)
    assert live.sum() == 5.0
    with pytest.raises(ValueError, match=">= 0"):
        mn.set_buffer_cache_limit(-1)
    with pytest.raises(TypeError, match="integer"):
        mn.set_buffer_cache_limit(1.5)
    with pytest.raises(TypeError, match="integer"):
        mn.set_buffer_cache_limit(True)


def test_a_torch_tensor_keeps_the_block_alive():
    torch = pytest.importorskip("torch")
    bufs = [np.full(4096, float(i), np.float32) for i in range(4)]
    mean = _core.aggregate(bufs, np.ones(4))
    t = torch.from_numpy(mean)
    blocks = mn.buffer_cache_info()["cached_blocks"]
    del mean
    gc.collect()
    assert mn.buffer_cache_info()["cached_blocks"] == blocks  # still in use by the tensor
    assert float(t.sum()) == 4096 * 1.5
    fresh = _core.cached_zeros(4096 // 2)  # same byte size: must not get the tensor's block
    assert fresh.ctypes.data != t.data_ptr() and not fresh.any()
    del t
    gc.collect()
    assert mn.buffer_cache_info()["cached_blocks"] == blocks + 1


def test_rounds_reuse_their_memory():
    from mars_native.defense import MARS

    rng = np.random.default_rng(1)
    base = {"conv.weight": rng.standard_normal((64, 16, 3, 3)).astype(np.float32),
            "bn.weight": np.ones(64, np.float32), "bn.bias": np.zeros(64, np.float32),
            "bn.running_mean": np.zeros(64, np.float32), "bn.running_var": np.ones(64, np.float32)}
    states = [{k: v + np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32)
               for k, v in base.items()} for _ in range(6)]
    mars = MARS(n_threads=2)
    want, _ = mars.aggregate(states)
    want = {k: v.copy() for k, v in want.items()}
    for _ in range(3):
        hits = mn.buffer_cache_info()["hits"]
        got, _ = mars.aggregate(states)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)
        del got
        rnd = mars.round()
        for s in states:
            rnd.add(s)
        streamed, _ = rnd.finish()
        np.testing.assert_allclose(streamed["conv.weight"], want["conv.weight"], rtol=1e-6, atol=1e-7)
        del streamed, rnd
        gc.collect()
        assert mn.buffer_cache_info()["hits"] > hits
