"""Pure NumPy twins of every compiled function: the oracle of the tests and the "pure Python"
side of the benchmarks.

Written for clarity, not speed. Each function states how it relates to its compiled twin
(same results within floating-point tolerance, or bit-identical where noted). Inputs are NumPy
arrays (or anything ``np.asarray`` accepts); no validation beyond what the algorithm needs.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "channel_spectral_norms",
    "pairwise_wasserstein",
    "top_k_count",
    "top_k_energy",
    "wasserstein_1d",
]


# ----------------------------------------------------------------------------- spectral norms
def channel_spectral_norms(
    weight: ArrayLike, scale: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Largest singular value of each ``weight[k]`` reshaped to ``(weight.shape[1], -1)``, times
    ``scale[k]``, via ``np.linalg.svd`` in float64.

    Twin of :func:`mars_native.channel_spectral_norms` (which uses a Gram matrix + Jacobi): equal
    within ~1e-13 relative. Channels containing NaN/Inf give NaN, zero-size channels give 0.
    """
    w = np.asarray(weight, dtype=np.float64)
    out = w.shape[0]
    m = w.reshape(out, w.shape[1], -1)
    sigma = np.zeros(out)
    if m.size > 0:
        finite = np.isfinite(m).all(axis=(1, 2))
        sigma[~finite] = np.nan
        if finite.any():
            sigma[finite] = np.linalg.svd(m[finite], compute_uv=False)[:, 0]
    if scale is not None:
        sigma = sigma * np.asarray(scale, dtype=np.float64)
    return sigma


# ----------------------------------------------------------------------------- top-k
def top_k_count(n: int, kappa: float) -> int:
    """``max(1, ceil(kappa * n))``, where ``kappa * n`` within 1e-9 (relative) of an integer
    counts as that integer, so that ``kappa = 0.07, n = 100`` gives 7 (``0.07 * 100`` is
    ``7.000000000000001`` in binary floating point). Clamped to ``n``."""
    x = kappa * n
    nearest = round(x)
    k = nearest if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else math.ceil(x)
    return int(min(max(k, 1), n))


def top_k_energy(values: ArrayLike, kappa: float = 0.05, rule: str = "ceil") -> NDArray[np.float64]:
    """Twin of :func:`mars_native.top_k_energy` (bit-identical results).

    ``"ceil"``: the ``top_k_count(n, kappa)`` largest values, sorted descending.
    ``"quantile"``: the values ``>= np.quantile(values, 1 - kappa)`` in their original order.
    """
    v = np.asarray(values, dtype=np.float64)
    if rule == "ceil":
        k = top_k_count(v.size, kappa)
        return np.sort(v)[::-1][:k].copy()
    if rule == "quantile":
        threshold = np.quantile(v, 1.0 - kappa)
        return v[v >= threshold]
    raise ValueError(f'rule must be "ceil" or "quantile", got {rule!r}')


# ----------------------------------------------------------------------------- Wasserstein
def wasserstein_1d(u: ArrayLike, v: ArrayLike, p: float = 1) -> float:
    """W_p between the empirical distributions of two 1-D samples of any lengths.

    The quantile function of a sample of size ``m`` is a step function that takes its i-th
    smallest value on ``((i)/m, (i+1)/m]``. Both step functions are merged on a common integer
    grid of ``L = lcm(m, n)`` units, so every segment length is exact:
    ``W_p^p = sum(length * |u_(i) - v_(j)|^p) / L``. Twin of the compiled function within ~1e-13
    relative; equals ``scipy.stats.wasserstein_distance`` for ``p = 1`` (without calling scipy).
    """
    us = np.sort(np.asarray(u, dtype=np.float64))
    vs = np.sort(np.asarray(v, dtype=np.float64))
    m, n = us.size, vs.size
    L = math.lcm(m, n)
    # Every breakpoint of either quantile function, in units of 1/L.
    edges = np.union1d(np.arange(0, L + 1, L // m), np.arange(0, L + 1, L // n))
    left, lengths = edges[:-1], np.diff(edges)
    iu = left // (L // m)  # the step of u that covers the segment [left, left + length)
    iv = left // (L // n)
    total = np.sum(lengths * np.abs(us[iu] - vs[iv]) ** p) / L
    return float(total ** (1.0 / p))


def pairwise_wasserstein(X: ArrayLike, p: float = 1) -> NDArray[np.float64]:
    """``D[i, j] = mean(|sort(X[i]) - sort(X[j])|^p)^(1/p)`` for equal-length rows.

    Twin of :func:`mars_native.pairwise_wasserstein` within ~1e-13 relative.
    """
    s = np.sort(np.asarray(X, dtype=np.float64), axis=1)
    diff = np.abs(s[:, None, :] - s[None, :, :])
    return np.mean(diff**p, axis=2) ** (1.0 / p)
