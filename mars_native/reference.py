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
    "SplitMix64",
    "channel_spectral_norms",
    "kwmeans",
    "layer_top_values",
    "pairwise_wasserstein",
    "restart_seed",
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

    Twin of :func:`mars_native.channel_spectral_norms` (Gram matrix + Householder/Laguerre): equal
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


def layer_top_values(
    weight: ArrayLike, scale: ArrayLike | None, keep: int
) -> NDArray[np.float64]:
    """The ``keep`` largest values of :func:`channel_spectral_norms` for one layer, descending
    (all of them for ``keep < 1`` or ``keep >= out``). NaN channels count as larger than any
    number, like ``np.sort`` puts them last.

    Twin of ``_core.channel_spectral_norms_batch(..., keep=...)`` (the CBE's pruned kernel):
    these are the values that kernel guarantees exact; its other entries are upper bounds below
    the ``keep``-th largest value. Equal within ~1e-13 relative.
    """
    values = channel_spectral_norms(weight, scale)
    out = values.size
    k = out if keep < 1 or keep >= out else int(keep)
    return np.sort(values)[::-1][:k].copy() if k else values[:0]


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


def top_k_concat(layers: list[ArrayLike], kappa: float = 0.05, rule: str = "ceil") -> NDArray[np.float64]:
    """Twin of ``_core.top_k_concat`` (bit-identical): :func:`top_k_energy` of every layer's
    values, concatenated in layer order (a model's CBE from its BE values)."""
    return np.concatenate([top_k_energy(v, kappa, rule) for v in layers])


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


# =============================================================================================
# Aggregation (owned by the aggregation module; twins of _core.aggregate / accumulate /
# finalize_mean, csrc/mars/aggregate.*)
# =============================================================================================
__all__ += ["accumulate", "aggregate", "buffer_checksum", "finalize_mean", "stream_sum"]

_CHECKSUM_K1 = np.uint64(0x9E3779B97F4A7C15)
_CHECKSUM_K2 = np.uint64(0xBF58476D1CE4E5B9)


def _base_step(
    mean: NDArray[np.float64], base: ArrayLike | None, server_lr: float
) -> NDArray[np.float64]:
    if base is None:
        return mean
    g = np.asarray(base).astype(np.float64).reshape(mean.shape)
    return g + server_lr * (mean - g)


def aggregate(
    buffers: list[ArrayLike],
    weights: ArrayLike,
    out_dtype: type | np.dtype | None = None,
    base: ArrayLike | None = None,
    server_lr: float = 1.0,
) -> np.ndarray:
    """``sum_i w_i x_i / sum_i w_i`` of equally shaped float arrays, accumulated in float64 in
    buffer order (zero-weight buffers skipped); with ``base``: ``base + server_lr * (mean - base)``.

    Twin of ``_core.aggregate``: equal within a few float64 ulps of ``sum_i |w_i x_i| / sum_i w_i``
    (the compiled loop may fuse each multiply-add into one FMA); bit-identical when every product
    ``w_i * x_i`` is exact (e.g. integer weights and float32 data). ``out_dtype`` None = the
    buffers' dtype.
    """
    xs = [np.asarray(b) for b in buffers]
    w = np.asarray(weights, dtype=np.float64)
    acc = np.zeros(xs[0].shape, dtype=np.float64)
    total = 0.0
    for x, wi in zip(xs, w):
        total += float(wi)
        if wi != 0.0:
            acc += wi * x.astype(np.float64)
    out = _base_step(acc / total, base, server_lr)
    return out.astype(out_dtype if out_dtype is not None else xs[0].dtype)


def aggregate_many(
    groups: list[list[ArrayLike]],
    weights: ArrayLike,
    out_dtypes: list[type | np.dtype | None] | None = None,
    bases: list[ArrayLike | None] | None = None,
    server_lr: float = 1.0,
) -> list[np.ndarray]:
    """Twin of ``_core.aggregate_many``: :func:`aggregate` of every group (the tensors of one
    model, ``groups[k]`` one array per client) with the same weights; ``out_dtypes[k]`` and
    ``bases[k]`` as ``aggregate``'s ``out_dtype`` and ``base`` (None: every out_dtype None, no
    base)."""
    n = len(groups)
    out_dtypes = [None] * n if out_dtypes is None else out_dtypes
    bases = [None] * n if bases is None else bases
    return [aggregate(g, weights, d, b, server_lr) for g, d, b in zip(groups, out_dtypes, bases)]


def cached_zeros(n: int) -> NDArray[np.float64]:
    """Twin of ``_core.cached_zeros``: ``n`` float64 zeros (the core's come from its buffer
    cache)."""
    return np.zeros(n, dtype=np.float64)


def stream_sum(arrays: list[ArrayLike]) -> float:
    """Sum of every element of every float array (each of shape anything), in float64.

    Twin of ``_core.stream_sum`` (the benchmarks' stream-read floor). The compiled kernel sums
    blocks of 16,384 elements in 16 float32 (or 8 float64) lanes of the input dtype, so it agrees
    within ``~1e-4 * sum |x|`` for float32 input and ``~1e-12 * sum |x|`` for float64 (as long as
    a lane's 1,024 float32 values do not overflow float32; it is a benchmark floor, not a reducer).
    """
    return float(sum(float(np.sum(np.asarray(a), dtype=np.float64)) for a in arrays))


def first_non_finite(arrays: list[ArrayLike]) -> int:
    """Index of the first array holding a NaN or an infinity, or -1 when every value is finite.

    Twin of ``_core.first_non_finite`` (which tests the exponent bits of float32/float64 values
    in place); the arrays may have any shapes.
    """
    for i, a in enumerate(arrays):
        if not np.isfinite(np.asarray(a)).all():
            return i
    return -1


def buffer_checksum(x: ArrayLike) -> int:
    """The 64-bit checksum ``_core.accumulate`` returns: ``sum_j (bits_j ^ (j * K1)) * K2`` mod
    2**64 over the flat bit patterns of a float32/float64 array (bit-identical twin)."""
    a = np.ascontiguousarray(x).reshape(-1)
    bits = a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64).astype(np.uint64)
    j = np.arange(a.size, dtype=np.uint64)
    return int(np.sum(((bits ^ (j * _CHECKSUM_K1)) * _CHECKSUM_K2), dtype=np.uint64))


def accumulate(acc: np.ndarray, x: ArrayLike, weight: float) -> tuple[float, int]:
    """``acc += weight * x`` in place (float64 ``acc``); returns ``(max |x|, checksum of x)``.

    Twin of ``_core.accumulate``: ``acc`` within one float64 rounding per element (FMA), the
    returned statistics bit-identical (``max |x|`` is NaN when x holds a NaN; 0.0 when empty).
    """
    xa = np.asarray(x)
    flat = acc.reshape(-1)
    flat += weight * xa.reshape(-1).astype(np.float64)
    if xa.size == 0:
        max_abs = 0.0
    else:
        mags = np.abs(xa.astype(np.float64))
        max_abs = math.nan if np.isnan(mags).any() else float(mags.max())
    return max_abs, buffer_checksum(xa)


def finalize_mean(
    acc: ArrayLike,
    total_weight: float,
    out_dtype: type | np.dtype | None = None,
    base: ArrayLike | None = None,
    server_lr: float = 1.0,
) -> np.ndarray:
    """``acc / total_weight`` (or ``base + server_lr * (acc / total_weight - base)``) cast to
    ``out_dtype`` (None = float64). Twin of ``_core.finalize_mean``: within one float64 rounding
    per element (the compiled ``base`` step may use an FMA); bit-identical without ``base``."""
    a = np.asarray(acc, dtype=np.float64)
    out = _base_step(a / total_weight, base, server_lr)
    return out.astype(out_dtype if out_dtype is not None else np.float64)


# ----------------------------------------------------------------------------- K-WMeans
_MASK64 = (1 << 64) - 1


class SplitMix64:
    """The deterministic generator of the compiled core (csrc/mars/rng.hpp), in pure Python.

    ``next()`` returns 64-bit integers; ``uniform()`` returns ``(next() >> 11) * 2**-53`` in
    [0, 1). Same seed, same stream as the C++ generator.
    """

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0**-53


def restart_seed(random_state: int, restart: int) -> int:
    """Seed of restart ``restart`` (0-based): the ``restart + 1``-th output of
    ``SplitMix64(random_state)``."""
    master = SplitMix64(random_state)
    seed = 0
    for _ in range(restart + 1):
        seed = master.next()
    return seed


def _serial_sum(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Left-to-right sum along ``axis`` (``np.sum`` uses pairwise summation, the compiled core
    sums serially; the K-Means twin must round exactly like it so that ties break the same)."""
    return np.take(np.cumsum(a, axis=axis), -1, axis=axis)


def _nan_to_inf(costs: np.ndarray) -> np.ndarray:
    """Costs that overflowed to NaN (inf - inf, for values near the float64 limit) count as
    infinitely far, as in the compiled core."""
    return np.where(np.isnan(costs), np.inf, costs)


def _kmeans_pp(points, k, rng, cost, seed_weight):
    """k-means++: first center uniform, then probability proportional to ``seed_weight`` (the
    squared distance to the nearest chosen center); lowest unchosen index if all weights are 0."""
    n = points.shape[0]
    first = min(int(rng.uniform() * n), n - 1)
    chosen = [first]
    weight = _nan_to_inf(seed_weight(cost(points, points[first])))
    for c in range(1, k):
        cumulative = np.cumsum(weight)
        total = cumulative[-1]
        if total > 0 and np.isfinite(total):
            target = rng.uniform() * total
            above = np.flatnonzero(cumulative > target)
            idx = int(above[0]) if above.size else int(np.flatnonzero(weight > 0)[-1])
        elif total > 0:  # the sum overflowed: the first largest weight
            idx = int(np.argmax(weight))
        else:
            idx = min(set(range(n)) - set(chosen))
        chosen.append(idx)
        if c + 1 < k:
            weight = np.minimum(weight, _nan_to_inf(seed_weight(cost(points, points[idx]))))
    return points[chosen].copy()


def _assign(points, centers, cost):
    """Nearest center of every point (lowest cluster index on ties) and its cost."""
    costs = _nan_to_inf(np.stack([cost(points, c) for c in centers], axis=1))
    labels = np.argmin(costs, axis=1)
    return labels, costs[np.arange(points.shape[0]), labels]


def _fill_empty_clusters(points, centers, labels, costs):
    """An empty cluster takes the point farthest from its center among clusters with >= 2 members
    (lowest index among equals); its center moves onto that point. In place."""
    k = centers.shape[0]
    count = np.bincount(labels, minlength=k)
    for c in range(k):
        if count[c] > 0:
            continue
        eligible = count[labels] > 1
        far = int(np.flatnonzero(eligible)[np.argmax(costs[eligible])])
        count[labels[far]] -= 1
        labels[far] = c
        count[c] = 1
        costs[far] = 0.0
        centers[c] = points[far]


def _barycenters(points, labels, k, median):
    """Coordinate-wise median (W_1 barycenter of quantile functions) or mean of every cluster."""
    if median:
        return np.stack([np.median(points[labels == c], axis=0) for c in range(k)])
    return np.stack(
        [_serial_sum(points[labels == c], axis=0) / np.count_nonzero(labels == c) for c in range(k)]
    )


def _lloyd(points, k, max_iter, tol, seed, cost, seed_weight, median):
    rng = SplitMix64(seed)
    centers = _kmeans_pp(points, k, rng, cost, seed_weight)
    labels, costs = _assign(points, centers, cost)
    _fill_empty_clusters(points, centers, labels, costs)
    n_iter = 0
    for it in range(max_iter):
        new_centers = _barycenters(points, labels, k, median)
        shift = _serial_sum(((new_centers - centers) ** 2).ravel())
        centers = new_centers
        new_labels, costs = _assign(points, centers, cost)
        _fill_empty_clusters(points, centers, new_labels, costs)
        n_iter = it + 1
        changed = bool(np.any(new_labels != labels))
        labels = new_labels
        if not changed or (tol > 0 and shift <= tol):
            break
    return labels, centers, float(_serial_sum(costs)), n_iter


def kwmeans(
    X: ArrayLike,
    n_clusters: int = 2,
    p: float = 1,
    n_init: int = 10,
    max_iter: int = 100,
    tol: float = 0.0,
    random_state: int = 0,
    mode: str = "paper",
) -> dict:
    """K-WMeans, the NumPy twin of :class:`mars_native.KWMeans` (same generator, same tie rules,
    same summation order, hence the same labels as the compiled core).

    ``mode="paper"``: sort every row (its quantile function); k-means++ with probability
    proportional to the squared W_p distance; Lloyd iterations assigning each row to the center of
    smallest ``W_p^p = mean(|x - c|^p)`` and moving each center to the coordinate-wise median
    (p = 1) or mean (p = 2) of its members. ``mode="official"`` (the authors' code): Euclidean
    K-Means on the rows of the pairwise W_p matrix ``D``; centers reported as the element-wise means
    of the members' unsorted rows. Restart ``r`` is seeded with ``restart_seed(random_state, r)``;
    the lowest inertia wins (first on ties).

    Returns a dict: ``labels`` (n,), ``centers`` (k, d), ``inertia``, ``n_iter``, ``best_init``
    and, in official mode, ``distances`` (n, n) and ``embedding_centers`` (k, n).
    """
    X = np.asarray(X, dtype=np.float64)
    d = X.shape[1]
    sorted_rows = np.sort(X, axis=1)

    def mean_abs(pts, c):  # W_1 between sorted rows
        return _serial_sum(np.abs(pts - c)) / d

    def mean_square(pts, c):  # W_2^2 between sorted rows
        return _serial_sum((pts - c) ** 2) / d

    def sum_square(pts, c):  # squared Euclidean distance
        return _serial_sum((pts - c) ** 2)

    def identity(w):
        return w

    if mode == "paper":
        points = sorted_rows
        cost, seed_weight = (mean_abs, np.square) if p == 1 else (mean_square, identity)
        median = p == 1
    elif mode == "official":
        # D[i, j] = W_p(X_i, X_j), summed serially like the compiled pairwise kernel.
        diff = np.abs(sorted_rows[:, None, :] - sorted_rows[None, :, :])
        points = _serial_sum(diff) / d if p == 1 else (_serial_sum(diff**p) / d) ** (1.0 / p)
        cost, seed_weight, median = sum_square, identity, False
    else:
        raise ValueError(f'mode must be "paper" or "official", got {mode!r}')
    runs = [
        _lloyd(
            points,
            n_clusters,
            max_iter,
            tol,
            restart_seed(random_state, r),
            cost,
            seed_weight,
            median,
        )
        for r in range(n_init)
    ]
    best = min(range(n_init), key=lambda r: (runs[r][2], r))
    labels, centers, inertia, n_iter = runs[best]
    result = {
        "labels": labels,
        "centers": centers,
        "inertia": inertia,
        "n_iter": n_iter,
        "best_init": best,
    }
    if mode == "official":
        result["distances"] = points
        result["embedding_centers"] = centers
        result["centers"] = np.stack(
            [
                _serial_sum(X[labels == c], axis=0) / np.count_nonzero(labels == c)
                for c in range(n_clusters)
            ]
        )
    return result
