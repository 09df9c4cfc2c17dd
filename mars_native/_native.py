"""Validated Python wrappers of the compiled kernels in :mod:`mars_native._core`.

Every function accepts NumPy arrays, anything :func:`numpy.asarray` understands, and PyTorch
tensors (read without a copy when they are CPU float32/float64 tensors; tensors on another device
are copied to the CPU; ``requires_grad`` tensors are detached). The kernels run in C++ with the
GIL released; sums are accumulated in float64. Bad input raises ``TypeError`` (wrong dtype) or
``ValueError`` (wrong shape, NaN/Inf, out-of-range parameter) with a message naming the argument.

Thread count: ``n_threads=None`` uses the library default (all hardware threads, or what
:func:`set_num_threads` set). Results never depend on the thread count (bit-identical).
"""

from __future__ import annotations

import numbers
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mars_native import _core, _cuda
from mars_native._arrays import to_numpy

__all__ = [
    "buffer_cache_info",
    "channel_spectral_norms",
    "get_num_threads",
    "pairwise_wasserstein",
    "set_buffer_cache_limit",
    "set_num_threads",
    "top_k_count",
    "top_k_energy",
    "wasserstein_1d",
]

_HALF_DTYPES = ("float16", "bfloat16")


def _as_numpy(x: Any, name: str = "array") -> np.ndarray:
    """NumPy view of ``x`` (torch CPU tensors without a copy), see :func:`_arrays.to_numpy`."""
    return to_numpy(x, name=name)


def _describe(a: np.ndarray) -> str:
    return f"dtype {a.dtype} and shape {tuple(a.shape)}"


def _float_weight(x: Any, name: str) -> np.ndarray:
    """float32/float64 array for the spectral kernel; float16/bfloat16 become float32.

    No copy for float32/float64 input in native byte order (C-contiguity is handled by the
    compiled core, which copies non-contiguous arrays).
    """
    a = _as_numpy(x, name)
    if a.dtype.name in _HALF_DTYPES:
        return a.astype(np.float32)
    if a.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or float64), "
            f"got {_describe(a)}"
        )
    if a.dtype.itemsize > 8:  # long double: no kernel, fp64 loses nothing that matters here
        return a.astype(np.float64)
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def _real_array(x: Any, name: str) -> np.ndarray:
    """float64 array from any real numeric input (float or integer dtypes); no copy when the
    input already is native float64. bool, complex, object and string arrays are a TypeError."""
    a = _as_numpy(x, name)
    if a.dtype.name in _HALF_DTYPES:
        return a.astype(np.float64)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (float or int), got {_describe(a)}")
    return np.asarray(a, dtype=np.float64)


def _real_number(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    return float(x)


def _threads(n_threads: int | None) -> int:
    """0 (the library default) for None, otherwise a validated positive int."""
    if n_threads is None:
        return 0
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1 (or None for the default), got {n_threads}")
    return int(n_threads)


def set_num_threads(n: int | None) -> None:
    """Set the default number of threads of every kernel (None or 0: all hardware threads)."""
    _core.set_num_threads(0 if n is None or n == 0 else _threads(n))


def get_num_threads() -> int:
    """The default number of threads of every kernel."""
    return int(_core.get_num_threads())


def buffer_cache_info() -> dict[str, int]:
    """The core's cache of host memory blocks behind the large arrays it returns (the means of
    :meth:`MARS.aggregate` and of a streaming round, the round's float64 running sum).

    A block whose array Python frees is kept and handed out again for an array of the same
    size, so that a server that drops last round's model (or running sum) does not page-fault
    the next one in. On the 2-core benchmark VM, 20 ResNet-18 clients, cache on vs off in one
    process (medians of 9, interleaved): streaming round 0.42-0.47x the time (its 90 MB float64
    sum), batch round 0.94-0.99x. Arrays from the cache are ordinary writeable NumPy arrays
    whose ``base`` is the capsule that gives the block back.

    Returns:
        ``limit_bytes``, ``cached_bytes`` and ``cached_blocks`` (freed blocks kept for reuse),
        ``hits`` and ``misses`` (requests served from the cache / allocated).
    """
    return {str(k): int(v) for k, v in _core.buffer_cache_info().items()}


def set_buffer_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed blocks for reuse (default 512 MiB); blocks beyond the new
    limit are freed at once, and ``0`` frees them all and turns the cache off. Blocks held by
    live arrays are not affected. See :func:`buffer_cache_info`.

    Raises ``ValueError`` for a negative size and ``TypeError`` for a non-integer.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"nbytes must be an integer number of bytes, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    _core.set_buffer_cache_limit(min(int(nbytes), 2**62))


def channel_spectral_norms(
    weight: ArrayLike, scale: ArrayLike | None = None, n_threads: int | None = None
) -> NDArray[np.float64]:
    """Largest singular value of every output channel of a convolution or linear weight.

    Parameters
    ----------
    weight:
        Array or torch tensor of shape ``(out, in, *kernel)`` (Conv1d/2d/3d; grouped and
        depthwise convolutions have ``in = weight.shape[1]`` input channels per group) or
        ``(out, in)`` (Linear). Channel ``k``'s matrix is ``weight[k]`` reshaped to
        ``(weight.shape[1], prod(kernel))``; for a Linear weight it is the column vector
        ``weight[k, :]``, so the result is the row's L2 norm. float32 and float64 are read
        without a copy when C-contiguous (other layouts are copied to a contiguous buffer);
        float16 and bfloat16 are converted to float32. Integer, bool and complex dtypes raise
        ``TypeError``.
    scale:
        Optional per-channel factor, shape ``(out,)``, finite (e.g. the folded BatchNorm
        ``|gamma| / sqrt(var + eps)``). Default 1.
    n_threads:
        Threads for this call (None: library default). Results do not depend on it.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(out,)``: ``sigma_max(M_k) * scale[k]`` (unitless, the channel's
        Lipschitz constant). Computed from the float64 Gram matrix of the smaller side of
        ``M_k`` and its top eigenvalue (Householder + Laguerre); relative error ~1e-15. Zero-size ``in`` or
        kernel gives zeros; a channel containing NaN/Inf gives NaN.

    A torch CUDA tensor or CuPy array runs on its GPU (CUDA backend) and the result stays there.
    """
    if _cuda.is_cuda_array(weight):
        return _cuda.channel_spectral_norms_cuda(weight, scale)
    w = _float_weight(weight, "weight")
    s = None if scale is None else _real_array(scale, "scale")
    return _core.channel_spectral_norms(w, s, _threads(n_threads))


def top_k_count(n: int, kappa: float = 0.05) -> int:
    """Number of values the "ceil" rule keeps from a layer of ``n`` neurons.

    ``k = max(1, ceil(kappa * n))``, where ``kappa * n`` within 1e-9 (relative) of an integer
    counts as that integer (``kappa = 0.07, n = 100`` gives 7, not 8).
    """
    kappa = _real_number(kappa, "kappa")
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa!r}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(_core.top_k_count(kappa, int(n)))


def top_k_energy(
    values: ArrayLike,
    kappa: float = 0.05,
    rule: Literal["ceil", "quantile"] = "ceil",
) -> NDArray[np.float64]:
    """Concentrate one layer's backdoor energies: keep the largest ones.

    Parameters
    ----------
    values:
        1-D, non-empty, finite real values (the BE of every neuron of one layer). Integer
        dtypes are accepted and converted to float64.
    kappa:
        Fraction to keep, ``0 < kappa <= 1``.
    rule:
        ``"ceil"`` (the paper): the ``k = max(1, ceil(kappa * n))`` largest values (see
        :func:`top_k_count`), sorted in DESCENDING order.
        ``"quantile"`` (the authors' code): every value ``>=`` NumPy's default ("linear")
        quantile at ``q = 1 - kappa`` (bit-identical to ``np.quantile``), in the ORIGINAL
        (channel) order; ties can keep more than ``ceil(kappa * n)`` values (for distinct values
        it keeps 1, 2, 4, 7, 13, 26 of 8, 32, 64, 128, 256, 512 at kappa = 0.05).

    Returns
    -------
    numpy.ndarray
        float64, 1-D, a new array.
    """
    if _cuda.is_cuda_array(values):  # GPU input: GPU kernel, result on the same device
        return _cuda.top_k_energy_cuda(values, kappa, rule)
    kappa = _real_number(kappa, "kappa")
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str, got {type(rule).__name__}")
    return _core.top_k_energy(_real_array(values, "values"), kappa, rule)


def wasserstein_1d(u: ArrayLike, v: ArrayLike, p: float = 1) -> float:
    """p-Wasserstein distance between the empirical distributions of two 1-D samples.

    ``W_p(u, v) = (integral_0^1 |F_u^-1(t) - F_v^-1(t)|^p dt)^(1/p)`` with uniform weights on
    the samples; ``u`` and ``v`` may have different lengths (the two quantile step functions
    are merged exactly at the breakpoints ``i/len(u)`` and ``j/len(v)``). For ``p = 1`` this
    equals ``scipy.stats.wasserstein_distance(u, v)``. Same unit as the values.

    Parameters
    ----------
    u, v:
        1-D, non-empty, finite real samples (any real dtype; converted to float64).
    p:
        Order, a real number ``>= 1``.
    """
    p = _real_number(p, "p")
    return float(_core.wasserstein_1d(_real_array(u, "u"), _real_array(v, "v"), p))


def pairwise_wasserstein(
    X: ArrayLike, p: float = 1, n_threads: int | None = None
) -> NDArray[np.float64]:
    """Matrix of p-Wasserstein distances between the rows of ``X``.

    Each row (e.g. a client's CBE) is an empirical distribution of ``d`` values. Rows are
    sorted once; ``W_p(a, b) = mean(|sort(a) - sort(b)|^p)^(1/p)``, summed in float64.

    Parameters
    ----------
    X:
        ``(n, d)`` finite real array, ``n >= 1``, ``d >= 1``.
    p:
        Order, a real number ``>= 1``.
    n_threads:
        Threads for this call (None: library default). Results do not depend on it.

    Returns
    -------
    numpy.ndarray
        float64 ``(n, n)``, symmetric (bit for bit) with a zero diagonal;
        ``D[i, j] == wasserstein_1d(X[i], X[j], p)`` exactly.
    """
    if _cuda.is_cuda_array(X):  # GPU input: GPU kernel, result on the same device
        return _cuda.pairwise_wasserstein_cuda(X, p)
    p = _real_number(p, "p")
    return _core.pairwise_wasserstein(_real_array(X, "X"), p, _threads(n_threads))
