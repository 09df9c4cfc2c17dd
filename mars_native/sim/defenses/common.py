"""Helpers shared by the simulation defenses: flat update vectors, similarity matrices, clustering.

Every baseline works on flattened float64 vectors of the round's deltas
``Delta_i = theta_i - theta`` over every floating-point key of the global state except
``num_batches_tracked`` (BatchNorm running statistics included), in the global state's key order.
:class:`FlatLayout` owns that flattening and its inverse (back to a dict of torch tensors with the
global state's dtypes). One copy of the clustering helpers (HDBSCAN wrapper, gap statistic,
seeded k-means) lives here too.
"""

from __future__ import annotations

import time
import warnings
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mars_native.sim.defenses.base import Defense, DefenseOutput, RoundInput, StateDict

#: suffixes of BatchNorm buffers (excluded from FLAME's norms; never "trained").
BN_BUFFER_SUFFIXES = ("running_mean", "running_var")


def is_bn_buffer(key: str) -> bool:
    """True for a BatchNorm running statistic (``*.running_mean``, ``*.running_var``)."""
    return key.rpartition(".")[2] in BN_BUFFER_SUFFIXES


def is_float_key(key: str, value: torch.Tensor) -> bool:
    """True for the keys a defense aggregates: floating dtype and not ``num_batches_tracked``."""
    return key.rpartition(".")[2] != "num_batches_tracked" and torch.is_floating_point(value)


@dataclass(frozen=True)
class FlatLayout:
    """Where each float key of a state dict lives in a flat float64 vector.

    Attributes:
        keys: the float keys, in the global state's order.
        shapes: each key's tensor shape.
        dtypes: each key's torch dtype (used when a vector is turned back into tensors).
        offsets: int array (len(keys) + 1,); key ``keys[j]`` occupies ``offsets[j]:offsets[j+1]``.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: np.ndarray

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> FlatLayout:
        """The layout of ``state``'s float keys (``num_batches_tracked`` and integers skipped)."""
        keys, shapes, dtypes, sizes = [], [], [], [0]
        for key, value in state.items():
            if is_float_key(key, value):
                keys.append(key)
                shapes.append(tuple(value.shape))
                dtypes.append(value.dtype)
                sizes.append(int(value.numel()))
        return cls(tuple(keys), tuple(shapes), tuple(dtypes), np.cumsum(sizes))

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return int(self.offsets[-1])

    def slice(self, key: str) -> slice:
        """The slice of ``key`` in the flat vector (KeyError when absent)."""
        j = self.keys.index(key)
        return slice(int(self.offsets[j]), int(self.offsets[j + 1]))

    def mask(self, predicate: Callable[[str], bool]) -> np.ndarray:
        """bool (size,): True on the entries of the keys for which ``predicate(key)`` holds."""
        out = np.zeros(self.size, dtype=bool)
        for j, key in enumerate(self.keys):
            if predicate(key):
                out[self.offsets[j] : self.offsets[j + 1]] = True
        return out

    def flatten(self, state: Mapping[str, torch.Tensor], name: str = "state") -> np.ndarray:
        """float64 (size,) copy of ``state``'s float keys (ValueError names a bad key)."""
        parts = []
        for key, shape in zip(self.keys, self.shapes):
            if key not in state:
                raise ValueError(f"{name} has no key {key!r}")
            t = state[key]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}[{key!r}] has shape {tuple(t.shape)}, the global state {shape}"
                )
            parts.append(t.detach().reshape(-1).to(torch.float64))
        if not parts:
            return np.zeros(0)
        return torch.cat(parts).numpy()

    def stack(self, states: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
        """float64 (n, size): one flattened row per state."""
        out = np.empty((len(states), self.size))
        for i, s in enumerate(states):
            out[i] = self.flatten(s, name=f"client_states[{i}]")
        return out

    def to_state(self, vec: np.ndarray) -> StateDict:
        """Torch tensors (the global state's float keys, shapes, dtypes) from ``vec``."""
        vec = np.asarray(vec, dtype=np.float64)
        if vec.shape != (self.size,):
            raise ValueError(f"expected a vector of length {self.size}, got shape {vec.shape}")
        out: StateDict = {}
        for j, (key, shape, dtype) in enumerate(zip(self.keys, self.shapes, self.dtypes)):
            part = vec[self.offsets[j] : self.offsets[j + 1]].reshape(shape)
            out[key] = torch.from_numpy(part.copy()).to(dtype)
        return out


@dataclass
class RoundVectors:
    """The round's states as flat float64 vectors.

    layout: the flattening; global_vec: (d,) theta; locals_: (n, d) theta_i; deltas: (n, d).
    """

    layout: FlatLayout
    global_vec: np.ndarray
    locals_: np.ndarray
    deltas: np.ndarray

    @classmethod
    def from_round(cls, rin: RoundInput) -> RoundVectors:
        """Flatten the global state and every upload (ValueError on key/shape mismatch)."""
        if not rin.client_states:
            raise ValueError("the round has no client uploads")
        layout = FlatLayout.from_state(rin.global_state)
        g = layout.flatten(rin.global_state, name="global_state")
        loc = layout.stack(rin.client_states)
        return cls(layout, g, loc, loc - g)

    @property
    def n(self) -> int:
        """Number of uploads."""
        return int(self.deltas.shape[0])

    def final_layer_mask(self, final_layer: str) -> np.ndarray:
        """bool (d,): the final layer's weight and bias entries (ValueError when absent)."""
        keys = [
            k for k in (f"{final_layer}.weight", f"{final_layer}.bias") if k in self.layout.keys
        ]
        if f"{final_layer}.weight" not in keys:
            raise ValueError(
                f"the global state has no final-layer weight {final_layer + '.weight'!r}"
            )
        return self.layout.mask(lambda k: k in keys)

    def weighted_sum(self, weights: np.ndarray) -> np.ndarray:
        """(d,) sum_i weights[i] * deltas[i] (float64 accumulation).

        Rows with weight 0 are skipped entirely, so a rejected upload holding NaN/Inf never
        reaches the sum.
        """
        w = np.asarray(weights, dtype=np.float64)
        idx = np.flatnonzero(w)
        if idx.size == 0:
            return np.zeros(self.layout.size)
        return matmul(w[idx], self.deltas[idx])


def final_layer_rows(
    rv: RoundVectors, final_layer: str, which: str = "delta"
) -> tuple[np.ndarray, np.ndarray]:
    """Per client, the final layer's weight (n, C, in) and bias (n, C), deltas or local models.

    ``which`` is "delta" (Delta_i) or "local" (theta_i). A missing bias yields zeros.
    """
    src = rv.deltas if which == "delta" else rv.locals_
    wkey, bkey = f"{final_layer}.weight", f"{final_layer}.bias"
    if wkey not in rv.layout.keys:
        raise ValueError(f"the global state has no final-layer weight {wkey!r}")
    shape = rv.layout.shapes[rv.layout.keys.index(wkey)]
    w = src[:, rv.layout.slice(wkey)].reshape(rv.n, shape[0], -1)
    b = src[:, rv.layout.slice(bkey)] if bkey in rv.layout.keys else np.zeros((rv.n, shape[0]))
    return w, b


# ---------------------------------------------------------------------------------- geometry
def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ``a @ b`` computed by torch, so it obeys ``torch.set_num_threads`` (the arena's
    thread setting) instead of NumPy's BLAS pool: on a busy 2-core machine a multi-threaded
    OpenBLAS product of a 20 x 500 000 matrix with its transpose took 9 s instead of 0.1 s."""
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    return (ta @ tb).numpy()


def gram_matrix(x: np.ndarray) -> np.ndarray:
    """(n, n) ``x @ x.T`` in float64, exactly symmetric."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    g = (xt @ xt.T).numpy()
    return (g + g.T) / 2.0


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows of ``x`` (a zero row: similarity 0 to all)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    u = x / safe[:, None]
    sim = np.clip(gram_matrix(u), -1.0, 1.0)
    return (sim + sim.T) / 2.0


def cosine_distance_matrix(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine distances ``1 - cos`` in [0, 2], exactly symmetric, zero diagonal."""
    d = np.clip(1.0 - cosine_similarity_matrix(x), 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def euclidean_distance_matrix(x: np.ndarray) -> np.ndarray:
    """(n, n) Euclidean distances between rows of ``x`` (Gram-matrix form, float64)."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram_matrix(x), 0.0)
    d = np.sqrt((d2 + d2.T) / 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def l2_norms(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(n,) L2 norm of each row of ``x`` (restricted to ``mask``'s entries when given)."""
    return np.linalg.norm(x if mask is None else x[:, mask], axis=1)


# -------------------------------------------------------------------------------- clustering
def seed_from(rng: np.random.Generator) -> int:
    """A fresh int seed for scikit-learn estimators, drawn from the round's generator."""
    return int(rng.integers(0, 2**31 - 1))


def hdbscan_labels(
    x: np.ndarray,
    *,
    precomputed: bool = False,
    min_cluster_size: int = 2,
    min_samples: int = 1,
    allow_single_cluster: bool = True,
) -> np.ndarray:
    """``sklearn.cluster.HDBSCAN`` labels (-1 = noise) of the rows of ``x`` or of a distance matrix.

    ``min_cluster_size`` is clamped to [2, n]; one point is a cluster of its own (label 0).
    A precomputed matrix is symmetrised and its diagonal zeroed.
    """
    from sklearn.cluster import HDBSCAN

    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    if precomputed:
        x = np.maximum((x + x.T) / 2.0, 0.0)
        np.fill_diagonal(x, 0.0)
    model = HDBSCAN(
        min_cluster_size=int(min(max(2, min_cluster_size), n)),
        min_samples=int(max(1, min_samples)),
        metric="precomputed" if precomputed else "euclidean",
        allow_single_cluster=allow_single_cluster,
        copy=True,
    )
    return np.asarray(model.fit_predict(x), dtype=np.int64)


def kmeans_labels(
    x: np.ndarray, k: int, random_state: int, n_init: int = 10
) -> tuple[np.ndarray, float, np.ndarray]:
    """scikit-learn KMeans (k-means++): (labels, inertia, centers) of the rows of ``x``."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    with warnings.catch_warnings():  # fewer distinct points than k: labels are still valid
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(
            n_clusters=int(k), init="k-means++", n_init=n_init, random_state=random_state
        ).fit(x)
    return np.asarray(km.labels_, dtype=np.int64), float(km.inertia_), km.cluster_centers_


def min_max_normalize(x: np.ndarray) -> np.ndarray:
    """Scale every column of ``x`` to [0, 1] (a constant column becomes 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (x - lo) / span


def lloyd_kmeans(
    x: np.ndarray,
    k: int,
    rng: np.random.Generator,
    n_init: int = 10,
    max_iter: int = 100,
    squared: bool = True,
) -> tuple[np.ndarray, float]:
    """Small NumPy k-means (k-means++ seeding, Lloyd iterations, best of ``n_init``): (labels, W_k).

    W_k is the within-cluster sum of squared distances to the centres (KMeans' inertia; the best
    start is the one with the lowest inertia); ``squared=False`` reports the sum of plain Euclidean
    distances of that clustering instead. Used for the many tiny
    fits of :func:`gap_statistic`, where scikit-learn's per-call overhead dominates (tens of ms per
    fit on a loaded machine); the final clusterings of the defenses use scikit-learn's KMeans.
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    k = int(min(k, n))
    best_labels, best_w, best_c = np.zeros(n, dtype=np.int64), np.inf, x[:1].copy()
    for _ in range(max(1, n_init)):
        c = np.empty((k, p))
        c[0] = x[rng.integers(n)]
        d2 = ((x - c[0]) ** 2).sum(axis=1)
        for j in range(1, k):  # k-means++: next centre with probability proportional to d^2
            cum = np.cumsum(d2)
            idx = (
                int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
                if cum[-1] > 0
                else int(rng.integers(n))
            )
            c[j] = x[min(idx, n - 1)]
            d2 = np.minimum(d2, ((x - c[j]) ** 2).sum(axis=1))
        labels = np.full(n, -1)
        for _it in range(max_iter):
            dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
            new = dist.argmin(axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            counts = np.bincount(labels, minlength=k)
            sums = np.zeros((k, p))
            np.add.at(sums, labels, x)
            filled = counts > 0
            c[filled] = sums[filled] / counts[filled, None]
        w = float(((x - c[labels]) ** 2).sum())
        if w < best_w:
            best_labels, best_w, best_c = labels.astype(np.int64), w, c.copy()
    if not squared:
        best_w = float(np.linalg.norm(x - best_c[best_labels], axis=1).sum())
    return best_labels, best_w


@dataclass
class GapResult:
    """Outcome of :func:`gap_statistic`: chosen k, and Gap(k), s_k for k = 1..k_tested."""

    k: int
    gaps: np.ndarray
    s: np.ndarray


def gap_statistic(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    k_max: int = 10,
    n_refs: int = 5,
    normalize: bool = True,
    n_init: int = 10,
    squared: bool = True,
) -> GapResult:
    """Number of clusters by the gap statistic (Tibshirani, Walther & Hastie 2001).

    W_k = within-cluster sum of squared distances to the centres of a k-means clustering
    (:func:`lloyd_kmeans`, best of ``n_init`` k-means++ starts; ``squared=False``: the sum of
    plain distances, as RFLBAT's code does); the reference sets are ``n_refs`` draws of n points
    uniform in the bounding box of the data ([0, 1]^p after min-max normalisation, as in RFLBAT
    and FLDetector); Gap(k) = mean_b log W*_kb - log W_k, s_k = sd_b(log W*_kb) * sqrt(1 + 1/B).
    The answer is the smallest k with Gap(k) >= Gap(k+1) - s_{k+1}, else ``k_max``. ``k_max`` is
    capped at the number of distinct points (one distinct point: k = 1).
    """
    x = min_max_normalize(x) if normalize else np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    distinct = len(np.unique(np.round(x, 12), axis=0))
    k_max = int(max(1, min(k_max, distinct)))
    if k_max == 1:
        return GapResult(1, np.zeros(1), np.zeros(1))
    lo, hi = x.min(axis=0), x.max(axis=0)
    tiny = np.finfo(np.float64).tiny
    gaps, s = np.zeros(k_max), np.zeros(k_max)
    refs = [lo + (hi - lo) * rng.random(x.shape) for _ in range(n_refs)]
    for j, k in enumerate(range(1, k_max + 1)):
        w = lloyd_kmeans(x, k, rng, n_init, squared=squared)[1]
        log_ref = np.array(
            [np.log(max(lloyd_kmeans(r, k, rng, n_init, squared=squared)[1], tiny)) for r in refs]
        )
        gaps[j] = log_ref.mean() - np.log(max(w, tiny))
        s[j] = log_ref.std() * np.sqrt(1.0 + 1.0 / n_refs)
    for j in range(k_max - 1):
        if gaps[j] >= gaps[j + 1] - s[j + 1]:
            return GapResult(j + 1, gaps, s)
    return GapResult(k_max, gaps, s)


# ------------------------------------------------------------------------------ base class
class VectorDefense(Defense):
    """Base of the baselines: flattens the round, calls :meth:`aggregate`, times the whole call.

    ``DefenseOutput.detect_seconds`` is the wall time of the entire server-side call (flattening,
    detection, aggregation), measured the same way for every defense.
    """

    def __call__(self, rin: RoundInput) -> DefenseOutput:
        t0 = time.perf_counter()
        rv = RoundVectors.from_round(rin)
        out = self.aggregate(rin, rv)
        out.detect_seconds = time.perf_counter() - t0
        return out

    @abstractmethod
    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        """The defense proper, on flat vectors."""

    @staticmethod
    def output(
        rv: RoundVectors,
        update: np.ndarray,
        weight_total: float,
        flagged: np.ndarray | None,
        info: dict | None = None,
        reset_state: StateDict | None = None,
    ) -> DefenseOutput:
        """Package a flat update sum into a :class:`DefenseOutput`."""
        return DefenseOutput(
            update_sum=rv.layout.to_state(update),
            weight_total=float(weight_total),
            flagged=None if flagged is None else np.asarray(flagged, dtype=bool),
            reset_state=reset_state,
            info=info or {},
        )


def as_list(x: np.ndarray) -> list:
    """A JSON-ready list of a numpy array (floats rounded to 6 significant digits)."""
    x = np.asarray(x)
    if x.dtype == bool:
        return [bool(v) for v in x.ravel()]
    if np.issubdtype(x.dtype, np.integer):
        return [int(v) for v in x.ravel()]
    return [float(f"{v:.6g}") if np.isfinite(v) else None for v in x.ravel()]
