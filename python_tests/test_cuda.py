"""The CUDA backend (mars_native._cuda and the _core.cuda submodule).

Two groups:
* tests that run everywhere: build_info / cuda_info report what is compiled and how many devices
  exist (0 here without a driver), CPU arrays never take the CUDA path, a CUDA entry point without
  a device (or without the backend) raises a clear RuntimeError, the bindings validate CUDA array
  descriptors before touching a device, and layer discovery for device states reads only shapes.
* tests marked ``gpu`` that need a CUDA device and torch with CUDA (skipped with the reason
  otherwise): every CUDA kernel against the CPU kernel and mars_native.reference on
  hypothesis-generated inputs, bit-identical repeated runs, results on the input's device.

Tolerances (GPU vs CPU): spectral norms rtol 1e-11 (fp64 Gram summed in another order, same
Jacobi code), 1e-9 against the NumPy SVD reference; top-k (both rules), W_1 pairwise distances,
K-WMeans labels and W_1/W_2 costs bit for bit; W_2 pairwise rtol 1e-13 (the CPU compiler may fuse
the square into an FMA), other p rtol 1e-12 (CUDA pow vs libm pow); weighted mean rtol 1e-14 in
float64, 1 float32 ulp in float32.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mars_native as mn
from mars_native import _core, _cuda, _cuda_states
from mars_native import reference as ref

INFO = _core.cuda.info()
COMPILED = bool(INFO["compiled"])


def _gpu_skip_reason() -> str | None:
    if not COMPILED:
        return "the CUDA backend is not compiled in (no nvcc at build time, or MARS_NATIVE_CUDA=OFF)"
    if INFO["devices"] == 0:
        return f"no CUDA device on this machine ({INFO['reason']})"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "this torch build has no CUDA support (torch.cuda.is_available() is False)"
    return None


GPU_SKIP = _gpu_skip_reason()


class FakeCudaArray:
    """An object exposing __cuda_array_interface__ with a made-up device pointer (never read:
    every test using it expects an error before any device access)."""

    def __init__(self, shape, typestr="<f4", ptr=0x7F0000000000, strides=None, readonly=False,
                 mask=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": typestr, "data": (ptr, readonly), "version": 3,
            "strides": strides, "mask": mask, "stream": None,
        }


# =============================================================================== everywhere

def test_build_info_reports_cuda_fields():
    info = mn.build_info()
    assert isinstance(info["cuda_compiled"], bool)
    assert info["cuda_compiled"] == COMPILED
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    assert info["cuda_devices"] == _core.cuda.device_count()
    if not COMPILED:
        assert info["cuda_devices"] == 0
    assert _cuda.cuda_available() == (COMPILED and info["cuda_devices"] > 0)
    assert _cuda.cuda_compiled() == COMPILED


def test_cuda_info_describes_the_backend():
    info = _cuda.cuda_info()
    assert set(info) >= {"compiled", "devices", "device_names", "reason", "runtime_version",
                         "driver_version", "architectures"}
    assert len(info["device_names"]) == info["devices"]
    if COMPILED:
        assert info["runtime_version"] >= 11000
        assert info["architectures"]  # e.g. "75-virtual,80-real,90-real"
    if info["devices"] == 0:
        assert info["reason"]  # says why (no driver, no device, backend not compiled)


@pytest.mark.skipif(not (COMPILED and INFO["devices"] == 0),
                    reason="needs the CUDA backend compiled in and no CUDA device")
def test_compiled_without_device_reports_zero_devices_and_raises_runtime_error():
    assert mn.build_info()["cuda_compiled"] is True
    assert mn.build_info()["cuda_devices"] == 0
    assert _core.cuda.available() is False
    w = (0x7F0000000000, (2, 3, 3, 3), "<f4", 0)  # a descriptor tuple: device 0
    out = (0x7F0000100000, (2,), "<f8", 0)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        _core.cuda.channel_spectral_norms([w], [None], [out], 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        _core.cuda.pairwise_wasserstein((0x7F0000000000, (4, 3), "<f8", 0), 1.0, False,
                                        (0x7F0000100000, (4, 4), "<f8", 0), 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _core.cuda.pointer_device(0x7F0000000000)
    # Through the Python layer: a CUDA-looking array fails with a clear message, no crash.
    for call in (
        lambda: _cuda.channel_spectral_norms_cuda(FakeCudaArray((2, 3, 3, 3))),
        lambda: _cuda.top_k_energy_cuda(FakeCudaArray((8,), "<f8")),
        lambda: _cuda.pairwise_wasserstein_cuda(FakeCudaArray((4, 3), "<f8")),
        lambda: _cuda.kwmeans_assign_cuda(FakeCudaArray((4, 3)), FakeCudaArray((2, 3))),
        lambda: _cuda.weighted_mean_cuda([FakeCudaArray((5,)), FakeCudaArray((5,))]),
        lambda: _cuda.to_host(FakeCudaArray((5,))),
        lambda: _cuda.to_device_state({"w": np.zeros(3)}),
        lambda: _cuda.concentrated_backdoor_energy_cuda({"conv.weight": FakeCudaArray((4, 3, 3, 3))}),
    ):
        with pytest.raises(RuntimeError, match="no CUDA device is available"):
            call()


@pytest.mark.skipif(COMPILED, reason="the CUDA backend is compiled in")
def test_not_compiled_entry_points_raise_runtime_error():
    assert _core.cuda.device_count() == 0
    with pytest.raises(RuntimeError, match="built without the CUDA backend"):
        _core.cuda.channel_spectral_norms([], [], [], 0, 0)
    with pytest.raises(RuntimeError, match="built without the CUDA backend"):
        _cuda.channel_spectral_norms_cuda(FakeCudaArray((2, 3, 3, 3)))


@pytest.mark.skipif(not COMPILED, reason="the CUDA backend is not compiled in")
def test_bindings_validate_cuda_arrays_before_touching_a_device():
    out = FakeCudaArray((2,), "<f8")
    spectral = _core.cuda.channel_spectral_norms
    with pytest.raises(TypeError, match="float32 or float64"):
        spectral([FakeCudaArray((2, 3, 3), "<i4")], [None], [out], 0, 0)
    with pytest.raises(TypeError, match="__cuda_array_interface__"):
        spectral([np.zeros((2, 3, 3), np.float32)], [None], [out], 0, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        spectral([FakeCudaArray((2, 3, 3), strides=(4, 24, 8))], [None], [out], 0, 0)
    with pytest.raises(ValueError, match="ndim >= 2"):
        spectral([FakeCudaArray((6,))], [None], [out], 0, 0)
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        spectral([FakeCudaArray((2, 3, 3))], [None], [FakeCudaArray((3,), "<f8")], 0, 0)
    with pytest.raises(TypeError, match="float64"):
        spectral([FakeCudaArray((2, 3, 3))], [None], [FakeCudaArray((2,), "<f4")], 0, 0)
    with pytest.raises(ValueError, match="read-only"):
        spectral([FakeCudaArray((2, 3, 3))], [None], [FakeCudaArray((2,), "<f8", readonly=True)], 0, 0)
    with pytest.raises(ValueError, match="masked"):
        spectral([FakeCudaArray((2, 3, 3), mask=object())], [None], [out], 0, 0)
    with pytest.raises(ValueError, match="same length"):
        spectral([FakeCudaArray((2, 3, 3))], [], [out], 0, 0)
    with pytest.raises(ValueError, match="aligned"):
        spectral([FakeCudaArray((2, 3, 3), ptr=0x7F0000000002)], [None], [out], 0, 0)
    with pytest.raises(ValueError, match="kappa"):
        _core.cuda.top_k_ceil([FakeCudaArray((4,), "<f8")], 0.0, [FakeCudaArray((1,), "<f8")], 0, 0)
    with pytest.raises(ValueError, match=r"must have shape \(4, 4\)"):
        _core.cuda.pairwise_wasserstein(FakeCudaArray((4, 3)), 1.0, False, FakeCudaArray((3, 3), "<f8"), 0, 0)
    with pytest.raises(ValueError, match="as many columns"):
        _core.cuda.kwmeans_assign(FakeCudaArray((4, 3)), FakeCudaArray((2, 5)), 1.0, False,
                                  FakeCudaArray((4,), "<i8"), FakeCudaArray((4,), "<f8"), 0, 0)
    with pytest.raises(ValueError, match="one entry per buffer"):
        _core.cuda.weighted_mean([FakeCudaArray((5,))], [1.0, 1.0], None, 1.0, FakeCudaArray((5,)), 0, 0)
    with pytest.raises(TypeError, match="share one dtype"):
        _core.cuda.weighted_mean([FakeCudaArray((5,)), FakeCudaArray((5,), "<f8")], [1.0, 1.0],
                                 None, 1.0, FakeCudaArray((5,)), 0, 0)


def test_cpu_arrays_never_take_the_cuda_path():
    for x in (np.zeros((2, 3, 3, 3), np.float32), [1.0, 2.0], 3.0, np.float64(1.0), None, "x"):
        assert not _cuda.is_cuda_array(x)
    assert _cuda.is_cuda_array(FakeCudaArray((3,)))
    with pytest.raises(TypeError, match="must be a CUDA array"):
        _cuda.channel_spectral_norms_cuda(np.ones((2, 3, 3, 3), np.float32))
    state = {"conv.weight": np.ones((2, 3, 3, 3), np.float32)}
    assert not _cuda.is_cuda_state(state)
    assert _cuda.is_cuda_state({**state, "other": FakeCudaArray((3,))})
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 3, 3, requires_grad=True)
    assert not _cuda.is_cuda_array(t)
    assert not _cuda.is_cuda_state({"w": t.detach(), "b": torch.zeros(4)})
    # ...and the public CPU function still answers (CUDA compiled in or not).
    got = mn.channel_spectral_norms(t)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, ref.channel_spectral_norms(t.detach().numpy()), rtol=1e-9)


class _Recorder:
    """Stands in for _core.cuda: records what the launchers are handed."""

    def __init__(self):
        self.calls = []

    def channel_spectral_norms(self, weights, scales, results, device, stream):
        self.calls.append(("spectral", weights, scales, results))

    def top_k_ceil(self, values, kappa, outs, device, stream):
        self.calls.append(("top_k", values, outs))


@pytest.fixture
def emulated_device(monkeypatch):
    """CPU torch tensors stand in for device memory (device index -1) and the kernel entry
    points record their descriptors: the Python launch path runs on any machine."""
    torch = pytest.importorskip("torch")
    from mars_native import _cuda_arrays

    class EmulatedTorch(_cuda_arrays.TorchArrays):
        def __init__(self):
            super().__init__(torch.device("cpu", 0))
            self.device, self.index = torch.device("cpu"), -1

        def owns(self, x):
            return isinstance(x, torch.Tensor)

        def stream(self):
            return 0

    lib = EmulatedTorch()
    recorder = _Recorder()
    core = type("core", (), {"cuda": recorder, "top_k_count": staticmethod(_core.top_k_count)})
    for module in (_cuda, _cuda_states):
        monkeypatch.setattr(module, "library", lambda x, name: lib)
        monkeypatch.setattr(module, "require_backend", lambda: None)
        monkeypatch.setattr(module, "_core", core)
    monkeypatch.setattr(_cuda_states, "is_torch_cuda", lambda x: isinstance(x, torch.Tensor))
    return torch, lib, recorder


def test_fast_launch_path_hands_the_kernels_what_the_validating_path_does(emulated_device, monkeypatch):
    """The kernels see nothing but descriptors. Tensors the kernels can read as they are skip
    the validating, converting path (TorchArrays.fast_desc); the descriptors must be the ones
    that path builds: the same weights and scales, results that are exactly the returned views,
    top-k targets that are exactly the rows and columns of the returned CBE matrix."""
    torch, lib, recorder = emulated_device
    g = torch.Generator().manual_seed(0)
    readable = [torch.randn(8, 4, 3, 3, generator=g), torch.randn(6, 5, 3, 3, dtype=torch.float64,
                                                                   generator=g),
                torch.randn(5, 7, generator=g)]
    converted = [torch.randn(4, 3, 3, 3, generator=g).half(),
                 torch.randn(3, 4, 3, 3, generator=g).transpose(0, 1),
                 torch._neg_view(torch.randn(4, 2, 3, 3, generator=g))]
    for x in readable:
        assert lib.fast_desc(x) == lib.desc(x)
    for x in converted:
        assert lib.fast_desc(x) is None
    weights = readable + converted
    scales = [torch.rand(8, dtype=torch.float64, generator=g), None, torch.rand(5, generator=g),
              None, torch.rand(4, dtype=torch.float64, generator=g), None]
    assert lib.fast_desc(scales[2], f64_only=True) is None  # float32 scale: converted

    def launch():
        recorder.calls.clear()
        outs, descs = _cuda._spectral_launch(weights, scales, check_finite=False)
        (_, wd, sd, rd), = recorder.calls
        assert rd == descs == [lib.desc(o) for o in outs]
        assert [tuple(o.shape) for o in outs] == [(int(w.shape[0]),) for w in weights]
        return wd, sd

    fast_wd, fast_sd = launch()
    for x, d in zip(readable, fast_wd):
        assert d == lib.desc(x)  # read in place
    assert fast_sd[0] == lib.desc(scales[0]) and fast_sd[4] == lib.desc(scales[4])
    monkeypatch.setattr(type(lib), "fast_desc", lambda self, x, f64_only=False: None)
    slow_wd, slow_sd = launch()
    assert slow_wd[:3] == fast_wd[:3] and slow_sd[0] == fast_sd[0] and slow_sd[4] == fast_sd[4]
    assert [d[1:] for d in slow_wd] == [d[1:] for d in fast_wd]
    assert [None if d is None else d[1:] for d in slow_sd] == [None if d is None else d[1:] for d in fast_sd]


def test_cbe_batch_top_k_targets_are_the_rows_of_the_result(emulated_device, monkeypatch):
    """The batch CBE's launches: weights read in place, each BN scale a row of its layer's
    stacked scales (by address; the row equals the model's own scale), the top-k reading the
    spectral results and writing exactly the rows and columns of the returned matrix."""
    torch, lib, recorder = emulated_device
    from _torch_models import SmallCNN

    states = _random_states(torch, SmallCNN, 3)
    stacks = {}
    stacked_of = _cuda_states.bn_scales_stacked

    def spy(states_, prefix, *args):
        stacks[prefix] = stacked_of(states_, prefix, *args)
        return stacks[prefix]

    monkeypatch.setattr(_cuda_states, "bn_scales_stacked", spy)
    cbe = _cuda_states.concentrated_backdoor_energy_batch_cuda(states, kappa=0.1)
    (_, wd, sd, rd), (_, values, targets) = recorder.calls
    layers = _cuda_states.find_layers_from_shapes(states[0], None, False, "paper")
    assert wd == [lib.desc(s[layer.weight_key]) for s in states for layer in layers]
    expected_sd = []
    for i, s in enumerate(states):
        for layer in layers:
            if layer.bn_prefix is None:
                expected_sd.append(None)
                continue
            stack = stacks[layer.bn_prefix]
            assert torch.equal(stack[i], _cuda_states.bn_scale_cuda(s, layer.bn_prefix))
            expected_sd.append(lib.desc(stack[i]))
    assert any(d is not None for d in expected_sd) and sd == expected_sd
    assert values == rd
    counts = [int(_core.top_k_count(0.1, int(states[0][layer.weight_key].shape[0]))) for layer in layers]
    expected, offsets = [], list(itertools.accumulate(counts, initial=0))
    for i in range(len(states)):
        expected += [lib.desc(cbe[i, a:b]) for a, b in itertools.pairwise(offsets)]
    assert tuple(cbe.shape) == (3, sum(counts)) and targets == expected


def test_cupy_split_gives_consecutive_views():
    """CuPyArrays.split slices one buffer into consecutive views (checked with a NumPy buffer:
    the method only slices)."""
    from mars_native._cuda_arrays import CuPyArrays

    buf = np.arange(10.0)
    parts = CuPyArrays.split(object.__new__(CuPyArrays), buf, [3, 0, 7])
    assert [p.tolist() for p in parts] == [[0.0, 1.0, 2.0], [], [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]]
    assert all(np.shares_memory(p, buf) for p in parts if p.size)


def test_stacked_bn_scales_decline_host_arrays():
    state = {"bn.running_var": np.ones(4, np.float32), "bn.weight": np.ones(4, np.float32)}
    assert _cuda_states.bn_scales_stacked([state, state], "bn") is None


def test_layers_of_a_device_state_are_found_from_shapes_only():
    pytest.importorskip("torch")
    from _torch_models import ResNet18

    state = ResNet18().state_dict()
    proxy = _cuda_states.shape_proxy(state)
    assert all(v.strides == (0,) * v.ndim for v in proxy.values())  # nothing allocated or copied
    for mode, linear in (("paper", False), ("paper", True), ("official", False)):
        got = _cuda_states.find_layers_from_shapes(state, None, linear, mode)
        want = mn.find_layers(state, include_linear=linear and mode == "paper",
                              require_bn=mode == "official")
        assert got == want


# =============================================================================== on a GPU

@pytest.fixture(scope="module")
def torch_cuda():
    import torch

    return torch, torch.device("cuda", 0)


def _random_states(torch, model_cls, n: int) -> list[dict]:
    """n state_dicts (CPU tensors) of ``model_cls()`` with seeds 0..n-1: random weights and
    non-trivial BatchNorm statistics."""
    from _torch_models import randomize_bn

    states = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = randomize_bn(model_cls(), torch.Generator().manual_seed(seed))
        states.append({k: v.detach() for k, v in model.state_dict().items()})
    return states


def _bits(a) -> bytes:
    a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    return np.ascontiguousarray(a).tobytes()


_KERNELS = [(), (1,), (3,), (1, 1), (3, 3), (5, 5), (2, 7), (7, 7), (3, 3, 3), (11, 11)]


@st.composite
def weights(draw):
    out = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 70))
    kernel = draw(st.sampled_from(_KERNELS))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    exponent = draw(st.sampled_from([0, -3, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, rows, *kernel)) * 10.0**exponent).astype(dtype)
    scale = rng.uniform(0.1, 2.0, out) if draw(st.booleans()) else None
    return w, scale


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@given(weights())
def test_spectral_norms_match_cpu_and_reference(torch_cuda, case):
    torch, dev = torch_cuda
    w, scale = case
    wt = torch.from_numpy(w).to(dev)
    got = _cuda.channel_spectral_norms_cuda(wt, None if scale is None else torch.from_numpy(scale).to(dev))
    assert got.device == dev and got.dtype == torch.float64 and tuple(got.shape) == (w.shape[0],)
    again = _cuda.channel_spectral_norms_cuda(wt, None if scale is None else torch.from_numpy(scale).to(dev))
    assert _bits(got) == _bits(again)  # bit-identical repeated runs
    cpu = mn.channel_spectral_norms(w, scale)
    np.testing.assert_allclose(got.cpu().numpy(), cpu, rtol=1e-11, atol=0)
    np.testing.assert_allclose(got.cpu().numpy(), ref.channel_spectral_norms(w, scale), rtol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_spectral_norms_edge_cases(torch_cuda):
    torch, dev = torch_cuda
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 20, 3, 3))
    w[1] *= 1e-200  # float64 channels rescaled like the CPU (squares would underflow)
    w[2] *= 1e200   # ...or overflow
    w[3, 0, 0, 0] = np.nan
    w[4, 5, 1, 1] = np.inf
    w[5] = 0.0
    for dtype in (np.float64,):
        got = _cuda.channel_spectral_norms_cuda(torch.from_numpy(w.astype(dtype)).to(dev)).cpu().numpy()
        cpu = mn.channel_spectral_norms(w.astype(dtype))
        assert np.isnan(got[3]) and np.isnan(got[4]) and got[5] == 0.0
        np.testing.assert_allclose(got, cpu, rtol=1e-11)
    # the generic path (rows < cols, solver in global memory for n = 64) and n = 1 paths
    for shape in ((3, 64, 11, 11), (3, 2, 5, 5), (4, 1, 3, 3), (5, 300, 1, 1), (5, 300)):
        w = rng.standard_normal(shape).astype(np.float32)
        got = _cuda.channel_spectral_norms_cuda(torch.from_numpy(w).to(dev)).cpu().numpy()
        np.testing.assert_allclose(got, mn.channel_spectral_norms(w), rtol=1e-11)
    # zero-size channels give zeros, no channels give an empty result
    assert _cuda.channel_spectral_norms_cuda(torch.zeros(3, 0, 3, 3, device=dev)).cpu().tolist() == [0, 0, 0]
    assert tuple(_cuda.channel_spectral_norms_cuda(torch.zeros(0, 4, 3, 3, device=dev)).shape) == (0,)
    # half precision is converted on the device; non-contiguous input is made contiguous there
    h = torch.randn(8, 16, 3, 3, device=dev, dtype=torch.float16)
    np.testing.assert_allclose(_cuda.channel_spectral_norms_cuda(h).cpu().numpy(),
                               mn.channel_spectral_norms(h.float().cpu().numpy()), rtol=1e-11)
    nc = torch.randn(16, 8, 3, 3, device=dev).transpose(0, 1)
    np.testing.assert_allclose(_cuda.channel_spectral_norms_cuda(nc).cpu().numpy(),
                               mn.channel_spectral_norms(nc.contiguous().cpu().numpy()), rtol=1e-11)
    with pytest.raises(ValueError, match="smaller side"):
        _cuda.channel_spectral_norms_cuda(torch.zeros(1, 300, 17, 17, device=dev))
    with pytest.raises(ValueError, match="NaN or Inf"):
        _cuda.channel_spectral_norms_cuda(torch.ones(2, 3, 3, 3, device=dev),
                                          torch.tensor([1.0, float("nan")], device=dev))
    with pytest.raises(TypeError, match="floating-point"):
        _cuda.channel_spectral_norms_cuda(torch.ones(2, 3, 3, 3, device=dev, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_spectral_batch_mixes_dtypes_and_equals_single_calls(torch_cuda):
    torch, dev = torch_cuda
    ws = [torch.randn(64, 32, 3, 3, device=dev), torch.randn(16, 8, 5, 5, device=dev, dtype=torch.float64),
          torch.randn(10, 7, device=dev), torch.randn(32, 16, 1, 1, device=dev)]
    scales = [torch.rand(64, device=dev, dtype=torch.float64), None, None, np.linspace(0.5, 1, 32)]
    batched = _cuda.channel_spectral_norms_batched_cuda(ws, scales)
    for w, s, b in zip(ws, scales, batched):
        assert _bits(b) == _bits(_cuda.channel_spectral_norms_cuda(w, s))


def _values(draw_n, rng, ties):
    return (rng.integers(0, 5, draw_n).astype(np.float64) if ties
            else rng.standard_normal(draw_n))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@given(st.integers(1, 600) | st.sampled_from([4096, 4097, 9000]), st.floats(0.001, 1.0),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_top_k_matches_cpu_bit_for_bit(torch_cuda, n, kappa, ties, seed):
    torch, dev = torch_cuda
    v = _values(n, np.random.default_rng(seed), ties)
    vt = torch.from_numpy(v).to(dev)
    for rule in ("ceil", "quantile"):
        got = _cuda.top_k_energy_cuda(vt, kappa, rule)
        assert got.device == dev
        cpu = mn.top_k_energy(v, kappa, rule=rule)
        assert _bits(got) == cpu.tobytes(), rule
        assert _bits(got) == ref.top_k_energy(v, kappa, rule).tobytes(), rule
        assert _bits(got) == _bits(_cuda.top_k_energy_cuda(vt, kappa, rule))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@given(st.integers(1, 40), st.integers(1, 300) | st.just(5000), st.sampled_from([1.0, 2.0, 1.5]),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31 - 1))
def test_pairwise_wasserstein_matches_cpu(torch_cuda, n, d, p, dtype, seed):
    torch, dev = torch_cuda
    X = np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)
    got_t = _cuda.pairwise_wasserstein_cuda(torch.from_numpy(X).to(dev), p)
    assert got_t.device == dev
    got = got_t.cpu().numpy()
    cpu = mn.pairwise_wasserstein(X, p)
    assert np.array_equal(got, got.T) and np.all(np.diag(got) == 0)
    if p == 1.0:
        assert got.tobytes() == cpu.tobytes()
    else:
        np.testing.assert_allclose(got, cpu, rtol=1e-13 if p == 2.0 else 1e-12, atol=0)
    np.testing.assert_allclose(got, ref.pairwise_wasserstein(X, p), rtol=1e-11, atol=1e-14)
    assert _bits(got_t) == _bits(_cuda.pairwise_wasserstein_cuda(torch.from_numpy(X).to(dev), p))
    sorted_rows = _cuda.sort_rows_cuda(torch.from_numpy(X).to(dev))
    assert sorted_rows.cpu().numpy().tobytes() == np.sort(X.astype(np.float64), axis=1).tobytes()
    pre = _cuda.pairwise_wasserstein_cuda(sorted_rows, p, rows_sorted=True)
    assert _bits(pre) == _bits(got_t)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@given(st.integers(2, 50), st.integers(1, 200), st.integers(1, 4), st.sampled_from([1.0, 2.0]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_kwmeans_assign_matches_serial_numpy(torch_cuda, n, d, k, p, ties, seed):
    torch, dev = torch_cuda
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, (n, d)).astype(np.float64) if ties else rng.standard_normal((n, d))
    C = X[rng.choice(n, size=min(k, n), replace=False)] + (0 if ties else 0.01)
    labels, costs = _cuda.kwmeans_assign_cuda(torch.from_numpy(X).to(dev), torch.from_numpy(C).to(dev), p)
    assert labels.device == dev and labels.dtype == torch.int64
    xs, cs = np.sort(X, axis=1), np.sort(C, axis=1)
    # the CPU K-WMeans cost: serial left-to-right sums, no FMA (reference._serial_sum)
    all_costs = np.stack([np.cumsum(np.abs(xs - c) if p == 1 else (xs - c) ** 2, axis=1)[:, -1] / d
                          for c in cs], axis=1)
    want = np.argmin(all_costs, axis=1)
    assert labels.cpu().numpy().tolist() == want.tolist()
    assert costs.cpu().numpy().tobytes() == all_costs[np.arange(n), want].tobytes()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@given(st.integers(1, 12), st.integers(0, 5000), st.sampled_from([np.float32, np.float64]),
       st.sampled_from(["float32", "float64"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_weighted_mean_matches_cpu_aggregate(torch_cuda, n_buf, size, dtype, out_dtype, with_base, seed):
    torch, dev = torch_cuda
    rng = np.random.default_rng(seed)
    bufs = [rng.standard_normal(size).astype(dtype) for _ in range(n_buf)]
    w = rng.uniform(0, 3, n_buf)
    w[0] = 0.0 if n_buf > 1 else 1.0  # zero weights skip their buffer
    base = rng.standard_normal(size).astype(dtype) if with_base else None
    lr = 0.7 if with_base else 1.0
    got_t = _cuda.weighted_mean_cuda([torch.from_numpy(b).to(dev) for b in bufs], w,
                                     base=None if base is None else torch.from_numpy(base).to(dev),
                                     server_lr=lr, out_dtype=out_dtype)
    assert got_t.device == dev and str(got_t.dtype) == f"torch.{out_dtype}"
    got = got_t.cpu().numpy()
    cpu = _core.aggregate(bufs, w, np.dtype(out_dtype), 0, base, lr)
    if out_dtype == "float64":
        np.testing.assert_allclose(got, cpu, rtol=1e-14, atol=1e-300)
    else:
        assert np.all(np.abs(got.astype(np.float64) - cpu) <= np.spacing(np.abs(cpu)))
    again = _cuda.weighted_mean_cuda([torch.from_numpy(b).to(dev) for b in bufs], w,
                                     base=None if base is None else torch.from_numpy(base).to(dev),
                                     server_lr=lr, out_dtype=out_dtype)
    assert _bits(again) == _bits(got_t)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_cbe_of_resnet18_states_on_the_gpu_matches_cpu(torch_cuda, mode):
    torch, dev = torch_cuda
    from _torch_models import ResNet18

    states = _random_states(torch, ResNet18, 3)
    states_cpu = [{k: v.numpy() for k, v in sd.items()} for sd in states]
    states_gpu = [{k: v.to(dev) for k, v in sd.items()} for sd in states]
    batch = _cuda.concentrated_backdoor_energy_batch_cuda(states_gpu, kappa=0.05, mode=mode)
    again = _cuda.concentrated_backdoor_energy_batch_cuda(states_gpu, kappa=0.05, mode=mode)
    rows = list(batch) if mode == "paper" else batch
    assert [_bits(r) for r in rows] == [_bits(r) for r in (list(again) if mode == "paper" else again)]
    for state_cpu, state_gpu, row in zip(states_cpu, states_gpu, rows):
        assert row.device == dev
        cpu = mn.concentrated_backdoor_energy(state_cpu, kappa=0.05, mode=mode)
        np.testing.assert_allclose(row.cpu().numpy(), cpu, rtol=1e-11)
        single = _cuda.concentrated_backdoor_energy_cuda(state_gpu, kappa=0.05, mode=mode)
        assert _bits(single) == _bits(row)
        be = _cuda.backdoor_energy_cuda(state_gpu, mode=mode)
        be_cpu = mn.backdoor_energy(state_cpu, mode=mode)
        assert list(be) == list(be_cpu)
        for name in be:
            np.testing.assert_allclose(be[name].cpu().numpy(), be_cpu[name], rtol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_stacked_bn_scales_equal_per_model_and_fall_back(torch_cuda):
    torch, dev = torch_cuda
    from _torch_models import ResNet18

    states = [{k: v.to(dev) for k, v in sd.items()} for sd in _random_states(torch, ResNet18, 3)]
    layers = _cuda_states.find_layers_from_shapes(states[0], None, False, "paper")
    for mode in ("paper", "official"):
        for layer in layers:
            if layer.bn_prefix is None:
                continue
            stacked = _cuda_states.bn_scales_stacked(states, layer.bn_prefix, 1e-5, mode)
            assert tuple(stacked.shape) == (3, int(states[0][layer.weight_key].shape[0]))
            for i, state in enumerate(states):
                per_model = _cuda_states.bn_scale_cuda(state, layer.bn_prefix, 1e-5, mode)
                assert _bits(stacked[i]) == _bits(per_model)
    # one model's running_var in float64: the stacked path declines, the per-model path scores it
    prefix = layers[0].bn_prefix
    mixed = [dict(s) for s in states]
    mixed[1][f"{prefix}.running_var"] = mixed[1][f"{prefix}.running_var"].double()
    assert _cuda_states.bn_scales_stacked(mixed, prefix) is None
    batch = _cuda.concentrated_backdoor_energy_batch_cuda(mixed)
    for state, row in zip(mixed, batch):
        assert _bits(row) == _bits(_cuda.concentrated_backdoor_energy_cuda(state))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_detect_on_the_gpu_matches_the_cpu(torch_cuda, mode):
    """MARS.detect with GPU clients (scored in one batch) against the same clients on the CPU,
    with one client that has NaN in a scored weight (rejected on both)."""
    torch, dev = torch_cuda
    from _torch_models import SmallCNN

    states = _random_states(torch, SmallCNN, 7)
    key = next(k for k, v in states[2].items() if v.ndim == 4)
    states[2][key][0, 0, 0, 0] = float("nan")
    gpu = mn.MARS(mode=mode).detect([{k: v.to(dev) for k, v in s.items()} for s in states])
    cpu = mn.MARS(mode=mode).detect([{k: v.numpy() for k, v in s.items()} for s in states])
    np.testing.assert_array_equal(gpu.accepted, cpu.accepted)
    assert [r is None for r in gpu.reasons] == [r is None for r in cpu.reasons]
    assert gpu.reasons[2].startswith("non_finite")
    valid = [i for i, r in enumerate(cpu.reasons) if r is None]
    np.testing.assert_allclose(gpu.cbe[valid], cpu.cbe[valid], rtol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_cupy_arrays_stay_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    got = _cuda.channel_spectral_norms_cuda(cupy.asarray(w))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), mn.channel_spectral_norms(w), rtol=1e-11)
    X = rng.standard_normal((10, 30))
    D = _cuda.pairwise_wasserstein_cuda(cupy.asarray(X))
    assert isinstance(D, cupy.ndarray)
    assert cupy.asnumpy(D).tobytes() == mn.pairwise_wasserstein(X).tobytes()
    v = _cuda.top_k_energy_cuda(cupy.asarray(rng.standard_normal(100)), 0.05, "quantile")
    assert isinstance(v, cupy.ndarray)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_aggregate_states_and_finiteness_on_the_gpu(torch_cuda):
    torch, dev = torch_cuda
    from _torch_models import SmallCNN

    from mars_native.aggregation import weighted_mean

    states = []
    for seed, sd in enumerate(_random_states(torch, SmallCNN, 4)):
        sd = {k: v.to(dev) for k, v in sd.items()}
        sd["bn1.num_batches_tracked"] = torch.tensor(10 * seed, device=dev)
        states.append(sd)
    w = [1.0, 2.0, 0.0, 3.0]
    agg = _cuda.aggregate_states_cuda(states, w)
    assert list(agg) == list(states[0])
    for key, value in agg.items():
        assert value.device == dev and value.dtype == states[0][key].dtype
        if value.is_floating_point():
            want = weighted_mean([s[key].cpu().numpy() for s in states], w)
            np.testing.assert_allclose(value.cpu().numpy(), want, rtol=1e-6, atol=1e-7)
    assert int(agg["bn1.num_batches_tracked"]) == 30  # integers: element-wise max, never averaged
    glob = {k: v.clone() for k, v in states[0].items()}
    stepped = _cuda.aggregate_states_cuda(states[1:], None, global_state=glob, server_lr=0.5)
    assert int(stepped["bn1.num_batches_tracked"]) == 0  # copied from the global model
    assert _cuda.non_finite_keys(states[0]) == []
    states[1]["conv2.weight"][0, 0, 0, 0] = float("nan")
    states[1]["bn1.running_var"][3] = float("inf")
    assert _cuda.non_finite_keys(states[1]) == [k for k in states[1]
                                                if k in ("conv2.weight", "bn1.running_var")]


def test_device_template_reads_metadata_only():
    from mars_native.validation import state_template

    state = {"w": FakeCudaArray((4, 3, 3, 3)), "n": FakeCudaArray((), "<i8"),
             "b": np.zeros(4, np.float64)}
    assert _cuda.device_template(state) == {"w": ((4, 3, 3, 3), np.dtype(np.float32)),
                                            "n": ((), np.dtype(np.int64)),
                                            "b": ((4,), np.dtype(np.float64))}
    torch = pytest.importorskip("torch")
    cpu = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "x": torch.zeros(5, dtype=torch.int32)}
    assert _cuda.device_template(cpu) == state_template(cpu)


def test_trim_memory_is_safe_without_a_device():
    _cuda.trim_memory()  # no pool was ever created here: nothing to release, no error
    assert _core.cuda.device_count() == _cuda.cuda_info()["devices"]


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_to_device_state_and_to_host_round_trip(torch_cuda):
    torch, dev = torch_cuda
    host = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.int64(7),
            "t": torch.ones(2, dtype=torch.bfloat16)}
    on_gpu = _cuda.to_device_state(host, dev.index)
    assert list(on_gpu) == list(host) and all(v.device == dev for v in on_gpu.values())
    assert on_gpu["t"].dtype == torch.bfloat16 and on_gpu["n"].dtype == torch.int64
    assert tuple(on_gpu["n"].shape) == () and tuple(on_gpu["w"].shape) == (3, 4)
    assert _cuda.to_host(on_gpu["w"]).tobytes() == host["w"].tobytes()
    assert _cuda.is_cuda_state(on_gpu) and _cuda.non_finite_keys(on_gpu) == []


def test_cbe_batch_names_a_model_whose_weight_shape_differs(emulated_device):
    torch, _, recorder = emulated_device
    from _torch_models import SmallCNN

    states = _random_states(torch, SmallCNN, 3)
    layers = _cuda_states.find_layers_from_shapes(states[0], None, False, "paper")
    key = layers[-1].weight_key
    states[2] = dict(states[2])
    states[2][key] = torch.zeros(tuple(states[2][key].shape[:-1]) + (1,))
    with pytest.raises(ValueError, match=rf"states\[2\]\['{key}'\] has shape .* but states\[0\] has"):
        _cuda_states.concentrated_backdoor_energy_batch_cuda(states, layers)
    assert recorder.calls == []  # nothing was launched


def test_given_scale_descriptors_must_match_their_weights(emulated_device):
    """A scale handed over as a descriptor (a row of a stack) is checked against its weight's
    channel count and device before anything is launched."""
    torch, lib, recorder = emulated_device
    w = torch.zeros(4, 2, 3, 3)
    stack = torch.ones(2, 4, dtype=torch.float64)
    rows = lib.segment_descs(stack, [4, 4])
    _cuda._spectral_launch([w, w], [stack, stack], check_finite=False, scale_descs=rows, views=False)
    assert recorder.calls[-1][2] == rows
    recorder.calls.clear()
    for bad in ((rows[0][0], (3,), "<f8", lib.index), (rows[0][0], (4,), "<f8", lib.index + 1)):
        with pytest.raises(ValueError, match="does not match it"):
            _cuda._spectral_launch([w], [stack], check_finite=False, scale_descs=[bad])
    assert recorder.calls == []
