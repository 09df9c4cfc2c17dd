"""The CUDA backend: the MARS kernels on GPU arrays, without copies to the host.

Inputs are torch CUDA tensors, CuPy arrays, or any object exposing ``__cuda_array_interface__``
(wrapped zero-copy by torch, else CuPy). Results are allocated by the input's library on the
input's device and returned there; the kernels are enqueued on that library's current stream of
that device (no synchronisation, except where a result's size or a validity check needs a value
on the host: that is said per function). float16/bfloat16 weights are converted to float32 and
non-contiguous arrays are made contiguous, both on the device.

Everything here is deterministic: repeated runs on the same GPU give bit-identical results. The
results agree with the CPU kernels to floating-point tolerance (spectral norms ~1e-13 relative:
different summation order; top-k, quantile thresholds and W_1 distances bit for bit).

torch and CuPy are never imported unless an array of theirs is passed. Without the CUDA backend
compiled in, or without a device, :func:`cuda_available` is False and every ``*_cuda`` function
raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mars_native import _core
from mars_native._cuda_arrays import (
    Arrays,
    TorchArrays,
    _module_root,
    check_kappa,
    check_p,
    dtype_name,
    float_input,
    is_cuda_array,
    is_cuda_state,
    library,
    real_number,
    require_backend,
    require_finite,
)

__all__ = [
    "channel_spectral_norms_batched_cuda",
    "channel_spectral_norms_cuda",
    "cuda_available",
    "cuda_compiled",
    "cuda_info",
    "is_cuda_array",
    "is_cuda_state",
    "kwmeans_assign_cuda",
    "pairwise_wasserstein_cuda",
    "sort_rows_cuda",
    "to_device_state",
    "to_host",
    "top_k_energy_cuda",
    "trim_memory",
    "weighted_mean_cuda",
]

# ---------------------------------------------------------------------------- capability

def cuda_compiled() -> bool:
    """True when the CUDA backend was compiled into ``mars_native._core``."""
    return bool(_core.cuda.info()["compiled"])


def cuda_available() -> bool:
    """True when the CUDA backend is compiled in and at least one CUDA device is usable."""
    return bool(_core.cuda.available())


def trim_memory() -> None:
    """Release the scratch device memory the CUDA backend keeps reserved between calls (its own
    memory pool per device; e.g. a CBE batch reserves 8 * n^2 bytes per channel of n x n Grams,
    648 bytes per 3x3-conv channel). No-op without the backend."""
    _core.cuda.trim_memory()


def cuda_info() -> dict[str, Any]:
    """``compiled``, ``devices``, ``device_names``, ``reason`` (why there is no device),
    ``runtime_version``, ``driver_version``, ``architectures`` (compiled GPU targets)."""
    return dict(_core.cuda.info())


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a device array (torch CUDA tensor, CuPy array); synchronises. For the
    small results that go on to the CPU (e.g. the CBE matrix before clustering)."""
    return library(x, "x").to_host(x)


def to_device_state(state: Any, device: int = 0) -> dict[str, Any]:
    """The state_dict on ``cuda:<device>`` as torch tensors, in key order (host-to-device copies
    of CPU tensors and NumPy arrays; CUDA tensors already on that device are kept as they are).
    For ``MARS(device="cuda")`` given CPU models. Needs torch with CUDA and a device."""
    require_backend()
    import torch

    from mars_native._arrays import to_numpy

    dev = torch.device("cuda", int(device))
    out: dict[str, Any] = {}
    keys = state.keys()
    for key in keys:
        v = state[key]
        if _module_root(v) == "torch":
            out[key] = v.detach().to(dev)
        elif is_cuda_array(v):
            out[key] = torch.as_tensor(v, device=dev)
        else:
            a = to_numpy(v, name=str(key))
            if not (a.flags.c_contiguous and a.dtype.isnative):
                a = a.astype(a.dtype.newbyteorder("="), order="C")  # keeps 0-d arrays 0-d
            out[key] = torch.from_numpy(a).to(dev)
    return out


# ---------------------------------------------------------------------------- kernels

def channel_spectral_norms_cuda(weight: Any, scale: Any = None, *, check_finite: bool = True) -> Any:
    """GPU twin of :func:`mars_native.channel_spectral_norms`: float64 ``(out,)`` on the weight's
    device, ``sigma_max(weight[k] as (in, prod(kernel))) * scale[k]``.

    ``scale`` may be a device array or a small host array (copied to the device). With
    ``check_finite`` a non-finite ``scale`` raises ``ValueError`` like the CPU function (one
    device synchronisation); a channel holding NaN/Inf gives NaN, as on the CPU.
    """
    return channel_spectral_norms_batched_cuda([weight], None if scale is None else [scale],
                                               check_finite=check_finite)[0]


def channel_spectral_norms_batched_cuda(weights: Sequence[Any], scales: Sequence[Any] | None = None,
                                        *, check_finite: bool = True) -> list[Any]:
    """Spectral norms of many weight tensors (all on one device) in one batch of launches."""
    return _spectral_launch(weights, scales, check_finite)[0]


def _spectral_launch(weights: Sequence[Any], scales: Sequence[Any] | None,
                     check_finite: bool, scale_descs: Sequence[tuple | None] | None = None,
                     views: bool = True) -> tuple[Any, list[tuple]]:
    """:func:`channel_spectral_norms_batched_cuda` and the descriptors of its results (views of
    one float64 buffer). Torch tensors the kernels can read as they are skip the validating,
    converting path (``TorchArrays.fast_desc``); anything else takes it.

    ``scale_descs[i]`` (when given and not None): the descriptor of weight i's scale, already
    known to be a float64 C-contiguous ``(out,)`` run of device memory that the caller keeps
    alive (e.g. a row of a stacked array, by address arithmetic); ``scales[i]`` is then not
    read. ``views=False``: the one result buffer in place of the list of views (the caller keeps
    it alive for as long as it uses the descriptors)."""
    weights = list(weights)
    if not weights:
        return ([] if views else None), []
    scales = [None] * len(weights) if scales is None else list(scales)
    if len(scales) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(scales)} scales")
    lib = library(weights[0], "weights[0]")
    fast = isinstance(lib, TorchArrays) and not check_finite
    wd, sd, sizes, keep = [], [], [], []
    for i, (w, s) in enumerate(zip(weights, scales)):
        d = lib.fast_desc(w) if fast else None
        if d is None or len(d[1]) < 2:
            w = float_input(lib, w, f"weights[{i}]")
            if w.ndim < 2:
                raise ValueError(f"weights[{i}] must have ndim >= 2, shape (out, in, *kernel) or (out, in) "
                                 f"for a Linear layer; got shape {tuple(w.shape)}")
            keep.append(w)  # a converted copy must outlive the launches
            d = lib.desc(w)
        n_out = int(d[1][0])
        e = None if scale_descs is None else scale_descs[i]
        if e is not None:
            if e[1] != (n_out,) or e[3] != lib.index:
                raise ValueError(f"the scale of weights[{i}] (shape {e[1]}, device {e[3]}) does not "
                                 f"match it (({n_out},) on device {lib.index})")
        elif s is not None:
            e = lib.fast_desc(s, f64_only=True) if fast else None
            if e is None or e[1] != (n_out,):
                s = float_input(lib, s, f"scales[{i}]", allow_int=True, to64=True)
                if tuple(s.shape) != (n_out,):
                    raise ValueError(f"scale must have shape ({n_out},) to match weight of shape "
                                     f"{tuple(d[1])}, got {tuple(s.shape)}")
                if check_finite:
                    require_finite(lib, s, "scale")
                keep.append(s)
                e = lib.desc(s)
        wd.append(d)
        sd.append(e)
        sizes.append(n_out)
    # One allocation for all results; each result is a view of it.
    buf = lib.empty((sum(sizes),), "float64")
    outs = lib.split(buf, sizes) if views else None
    rd = lib.segment_descs(buf, sizes)
    _core.cuda.channel_spectral_norms(wd, sd, rd, lib.index, lib.stream())
    del keep  # (the launches are enqueued; stream order protects the memory from now on)
    return (outs if views else buf), rd


def _values_1d(lib: Arrays, values: Any, name: str, check_finite: bool) -> Any:
    v = float_input(lib, values, name, allow_int=True, to64=True)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(v.shape)}")
    if v.shape[0] == 0:
        raise ValueError(f"{name} must not be empty (shape (0,))")
    if check_finite:
        require_finite(lib, v, name)
    return v


def _top_k_many(lib: Arrays, values: list[Any], kappa: float, rule: str) -> list[Any]:
    """Top-k of several float64 1-D device arrays in one launch (``values`` already validated)."""
    if rule == "ceil":
        outs = [lib.empty((int(_core.top_k_count(kappa, int(v.shape[0]))),), "float64") for v in values]
        _core.cuda.top_k_ceil([lib.desc(v) for v in values], kappa, [lib.desc(o) for o in outs],
                              lib.index, lib.stream())
        return outs
    if rule == "quantile":
        outs = [lib.empty((int(v.shape[0]),), "float64") for v in values]
        counts = lib.empty((len(values),), "int64")
        _core.cuda.top_k_quantile([lib.desc(v) for v in values], kappa, [lib.desc(o) for o in outs],
                                  lib.desc(counts), lib.index, lib.stream())
        n_kept = lib.to_host(counts)  # synchronises: the lengths are data-dependent
        return [o[: int(c)] for o, c in zip(outs, n_kept)]
    raise ValueError(f'rule must be "ceil" or "quantile", got {rule!r}')


def top_k_energy_cuda(values: Any, kappa: float = 0.05, rule: str = "ceil", *,
                      check_finite: bool = True) -> Any:
    """GPU twin of :func:`mars_native.top_k_energy` (float64 1-D on the input's device).

    ``"ceil"``: the ``max(1, ceil(kappa*n))`` largest values, descending. ``"quantile"``: every
    value ``>=`` NumPy's linear ``1 - kappa`` quantile (bit-identical threshold), in input order;
    its length is data-dependent, so this rule synchronises. ``check_finite`` raises
    ``ValueError`` on NaN/Inf like the CPU function (one synchronisation).
    """
    kappa = check_kappa(kappa)
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str, got {type(rule).__name__}")
    if rule not in ("ceil", "quantile"):
        raise ValueError(f'rule must be "ceil" or "quantile", got "{rule}"')
    lib = library(values, "values")
    v = _values_1d(lib, values, "values", check_finite)
    return _top_k_many(lib, [v], kappa, rule)[0]


def _matrix(lib: Arrays, X: Any, name: str, check_finite: bool) -> Any:
    x = float_input(lib, X, name, allow_int=True)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D with n >= 1 rows and d >= 1 columns, got shape "
                         f"{tuple(x.shape)}")
    if check_finite:
        require_finite(lib, x, name)
    return x


def sort_rows_cuda(X: Any) -> Any:
    """Every row of the (n, d) device array ``X`` sorted ascending, float64, on its device."""
    lib = library(X, "X")
    x = _matrix(lib, X, "X", False)
    out = lib.empty(tuple(int(s) for s in x.shape), "float64")
    _core.cuda.sort_rows(lib.desc(x), lib.desc(out), lib.index, lib.stream())
    return out


def pairwise_wasserstein_cuda(X: Any, p: float = 1, *, rows_sorted: bool = False,
                              check_finite: bool = True) -> Any:
    """GPU twin of :func:`mars_native.pairwise_wasserstein`: float64 ``(n, n)`` on X's device,
    ``W_p`` between the rows of ``X`` (``(n, d)``), symmetric bit for bit, zero diagonal; equal to
    the CPU result bit for bit for ``p = 1`` and ``p = 2``."""
    p = check_p(p)
    lib = library(X, "X")
    x = _matrix(lib, X, "X", check_finite)
    n = int(x.shape[0])
    out = lib.empty((n, n), "float64")
    _core.cuda.pairwise_wasserstein(lib.desc(x), p, bool(rows_sorted), lib.desc(out), lib.index,
                                    lib.stream())
    return out


def kwmeans_assign_cuda(X: Any, centers: Any, p: float = 1, *, sorted: bool = False,
                        check_finite: bool = True) -> tuple[Any, Any]:
    """K-WMeans assignment step on the GPU (the paper mode of :class:`mars_native.KWMeans`):
    ``(labels int64 (n,), costs float64 (n,))`` with ``labels[i]`` the center of smallest
    ``W_p^p(X[i], centers[c]) = mean(|sort(X[i]) - sort(centers[c])|^p)`` (the first center on
    ties, serial float64 sums without FMA: the CPU's labels and costs bit for bit for p = 1, 2) and
    ``costs[i]`` that ``W_p^p``. Rows are sorted on the device first unless ``sorted`` (then the
    rows of ``X`` and of ``centers`` must already be ascending quantile vectors)."""
    p = check_p(p)
    lib = library(X, "X")
    x = _matrix(lib, X, "X", check_finite)
    c = _matrix(lib, centers, "centers", check_finite)
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"centers must have as many columns as X: X has shape {tuple(x.shape)}, "
                         f"centers {tuple(c.shape)}")
    n = int(x.shape[0])
    labels = lib.empty((n,), "int64")
    costs = lib.empty((n,), "float64")
    _core.cuda.kwmeans_assign(lib.desc(x), lib.desc(c), p, bool(sorted), lib.desc(labels),
                              lib.desc(costs), lib.index, lib.stream())
    return labels, costs


def weighted_mean_cuda(buffers: Sequence[Any], weights: Any = None, *, base: Any = None,
                       server_lr: float = 1.0, out_dtype: Any = None) -> Any:
    """GPU twin of :func:`mars_native.aggregation.weighted_mean`: ``sum_i w_i x_i / sum_i w_i``
    of equally shaped device arrays, accumulated in float64 over the buffers in their order (one
    thread per element: bit-identical across runs), or ``base + server_lr * (mean - base)`` with
    a base (the global model). Buffers with weight 0 are not read.

    ``weights``: one finite number ``>= 0`` per buffer with a positive sum (host values; a device
    array is read back); None = all 1. float16/bfloat16 buffers are read as float32; when any
    buffer (or the base) is float64 all are computed as float64. ``out_dtype``: float32 or
    float64 (None: float64 when any input is float64, else float32). Result on the buffers'
    device, in their library.
    """
    buffers = list(buffers)
    if not buffers:
        raise ValueError("weighted_mean() needs at least one array")
    lib = library(buffers[0], "buffers[0]")
    bufs = [float_input(lib, b, f"buffers[{i}]") for i, b in enumerate(buffers)]
    base_arr = None if base is None else float_input(lib, base, "base")
    wide = any(lib.dtype_name(b) == "float64" for b in bufs) or (
        base_arr is not None and lib.dtype_name(base_arr) == "float64")
    if wide:
        bufs = [lib.convert(b, "float64") for b in bufs]
        base_arr = None if base_arr is None else lib.convert(base_arr, "float64")
    for i, b in enumerate(bufs[1:], 1):
        if tuple(b.shape) != tuple(bufs[0].shape):
            raise ValueError(f"arrays[{i}] has shape {tuple(b.shape)} but arrays[0] has shape "
                             f"{tuple(bufs[0].shape)}")
    if weights is None:
        w = [1.0] * len(bufs)
    else:
        w_arr = lib.to_host(weights) if is_cuda_array(weights) else np.asarray(weights)
        if w_arr.dtype.kind not in "fiu" or w_arr.shape != (len(bufs),):
            raise ValueError(f"weights must be {len(bufs)} real numbers (one per array), got "
                             f"dtype {w_arr.dtype} and shape {w_arr.shape}")
        w = [float(v) for v in w_arr]
    dt = ("float64" if wide else "float32") if out_dtype is None else dtype_name(out_dtype)
    if dt not in ("float32", "float64"):
        raise TypeError(f"out_dtype must be float32 or float64, got {dt}")
    out = lib.empty(tuple(int(s) for s in bufs[0].shape), dt)
    _core.cuda.weighted_mean([lib.desc(b) for b in bufs], w,
                             None if base_arr is None else lib.desc(base_arr),
                             real_number(server_lr, "server_lr"), lib.desc(out), lib.index, lib.stream())
    return out


# State-dict level functions live in _cuda_states (which imports the kernels above); its __all__
# is re-exported here lazily so that either module can be imported first.
def __getattr__(name: str) -> Any:
    if not name.startswith("__"):
        from mars_native import _cuda_states

        if name in getattr(_cuda_states, "__all__", ()):  # () while it is still importing
            return getattr(_cuda_states, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
