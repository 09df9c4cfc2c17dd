"""K-WMeans: K-Means for 1-D empirical distributions under the Wasserstein metric.

The estimator follows scikit-learn's conventions: the constructor only stores parameters,
``fit`` returns ``self``, learned attributes end in ``_``. The work is done in C++
(``csrc/mars/kwmeans.cpp``, GIL released); :func:`mars_native.reference.kwmeans` is its NumPy twin
and reproduces the same labels.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from mars_native import _core
from mars_native._native import _real_array, _real_number, _threads

__all__ = ["KWMeans", "NotFittedError"]

_PARAM_NAMES = ("n_clusters", "p", "n_init", "max_iter", "tol", "random_state", "mode", "n_threads")


class NotFittedError(ValueError, AttributeError):
    """``predict`` (or a learned attribute) was used before ``fit``."""


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _seed(random_state: Any) -> int:
    """A 64-bit seed: an int in [0, 2**64) is used as is; None draws one from NumPy's global
    generator (so ``np.random.seed`` makes it reproducible); a ``np.random.Generator`` or
    ``RandomState`` is asked for one."""
    if random_state is None:
        return int(np.random.randint(0, 2**63, dtype=np.int64))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**63, dtype=np.int64))
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            "random_state must be an int, None, a numpy Generator or RandomState, got "
            f"{type(random_state).__name__}"
        )
    if not 0 <= random_state < 2**64:
        raise ValueError(f"random_state must be in [0, 2**64), got {random_state}")
    return int(random_state)


class KWMeans:
    """K-Means whose points are empirical distributions (the rows of ``X``), compared with the
    1-D p-Wasserstein distance (MARS's "K-WMeans").

    Parameters
    ----------
    n_clusters:
        Number of clusters, ``1 <= n_clusters <= n_samples``.
    p:
        Wasserstein order. Paper mode: 1 (barycenter = coordinate-wise median of the sorted
        rows) or 2 (mean). Official mode: any real ``>= 1`` for the distance matrix (the
        authors use 1).
    n_init:
        Number of k-means++ restarts; the one with the lowest inertia is kept (first on ties).
    max_iter:
        Maximum Lloyd iterations per restart.
    tol:
        Stop early when the squared shift of the centers (summed over clusters and coordinates)
        is ``<= tol``; 0 (default) stops only when the labels stop changing.
    random_state:
        int in ``[0, 2**64)`` for reproducible results; None draws a seed from NumPy's global
        generator (``np.random.seed`` controls it); a ``np.random.Generator`` / ``RandomState``
        is asked for a seed. The seed used is stored in ``seed_``.
    mode:
        ``"paper"``: K-Means in Wasserstein space. Each row is sorted once (its quantile
        function); ``W_p(a, b) = mean(|sort(a) - sort(b)|^p)^(1/p)``; k-means++ seeding with
        probability proportional to the squared W_p distance; Lloyd assignment to the center of
        smallest W_p (ties: lowest cluster index); an empty cluster receives the sample farthest
        from its center. ``"official"``: the authors' code, Euclidean K-Means (same seeding,
        Lloyd and restarts) on the rows of the pairwise W_p matrix.
    n_threads:
        Threads (None: library default). Results never depend on it.

    Attributes
    ----------
    labels_ : ndarray of int64, shape (n_samples,)
    cluster_centers_ : ndarray of float64, shape (n_clusters, d)
        Paper mode: the barycenters, sorted vectors (quantile functions). Official mode: the
        element-wise mean of the members' original (unsorted) rows.
    inertia_ : float
        Paper mode: ``sum_i W_p(x_i, center)^p``. Official mode: the sum of squared Euclidean
        distances between the rows of ``distances_`` and ``embedding_centers_``.
    n_iter_ : int
        Lloyd iterations of the kept restart.
    best_init_ : int
        Index of the kept restart.
    seed_ : int
        The 64-bit seed that was used.
    n_features_in_ : int
        ``d``.
    distances_ : ndarray (n_samples, n_samples), official mode only
        The pairwise W_p matrix that was clustered.
    embedding_centers_ : ndarray (n_clusters, n_samples), official mode only
        The K-Means centers among the rows of ``distances_``.
    """

    def __init__(
        self,
        n_clusters: int = 2,
        *,
        p: float = 1,
        n_init: int = 10,
        max_iter: int = 100,
        tol: float = 0.0,
        random_state: int | np.random.Generator | np.random.RandomState | None = 0,
        mode: Literal["paper", "official"] = "paper",
        n_threads: int | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.p = p
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.mode = mode
        self.n_threads = n_threads

    # ------------------------------------------------------------------ scikit-learn protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (scikit-learn protocol)."""
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def set_params(self, **params: Any) -> KWMeans:
        """Set constructor parameters (scikit-learn protocol); returns self."""
        for name, value in params.items():
            if name not in _PARAM_NAMES:
                raise ValueError(f"invalid parameter {name!r} for KWMeans")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"KWMeans({args})"

    # ------------------------------------------------------------------ validation
    def _checked_params(self) -> tuple[int, float, int, int, float, str, int]:
        n_clusters = _positive_int(self.n_clusters, "n_clusters")
        n_init = _positive_int(self.n_init, "n_init")
        max_iter = _positive_int(self.max_iter, "max_iter")
        if self.mode not in ("paper", "official"):
            raise ValueError(f'mode must be "paper" or "official", got {self.mode!r}')
        p = _real_number(self.p, "p")
        if self.mode == "paper" and p not in (1.0, 2.0):
            raise ValueError(f"p must be 1 or 2 in paper mode, got {self.p!r}")
        if not (p >= 1.0 and np.isfinite(p)):
            raise ValueError(f"p must be a finite real number >= 1, got {self.p!r}")
        tol = _real_number(self.tol, "tol")
        if not (tol >= 0.0 and np.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        return n_clusters, p, n_init, max_iter, tol, self.mode, _threads(self.n_threads)

    @staticmethod
    def _samples(X: ArrayLike) -> np.ndarray:
        x = _real_array(X, "X")
        if x.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, d), got shape {tuple(x.shape)}")
        return x

    # ------------------------------------------------------------------ fitting
    def fit(self, X: ArrayLike, y: Any = None) -> KWMeans:
        """Cluster the rows of ``X`` (``(n_samples, d)``, finite, real; torch tensors accepted).

        ``y`` is ignored (scikit-learn protocol). Returns ``self``.
        """
        n_clusters, p, n_init, max_iter, tol, mode, n_threads = self._checked_params()
        x = self._samples(X)
        if x.shape[0] >= 1 and n_clusters > x.shape[0]:
            raise ValueError(
                f"n_clusters={n_clusters} must be <= n_samples={x.shape[0]} "
                f"(X has shape {tuple(x.shape)})"
            )
        seed = _seed(self.random_state)
        r = _core.kwmeans_fit(x, n_clusters, p, n_init, max_iter, tol, seed, mode, n_threads)
        self.labels_: NDArray[np.int64] = r["labels"]
        self.cluster_centers_: NDArray[np.float64] = r["centers"]
        self.inertia_ = float(r["inertia"])
        self.n_iter_ = int(r["n_iter"])
        self.best_init_ = int(r["best_init"])
        self.seed_ = seed
        self.n_features_in_ = int(x.shape[1])
        self._fit_p = p
        self._fit_mode = mode
        if mode == "official":
            self.distances_: NDArray[np.float64] = r["distances"]
            self.embedding_centers_: NDArray[np.float64] = r["embedding_centers"]
            self._fit_X = np.array(x, dtype=np.float64, order="C")  # needed by predict
        return self

    def fit_predict(self, X: ArrayLike, y: Any = None) -> NDArray[np.int64]:
        """``fit(X).labels_``."""
        return self.fit(X).labels_

    def predict(self, X: ArrayLike) -> NDArray[np.int64]:
        """Nearest cluster of each row of ``X`` (``(m, d)`` with the training ``d``).

        Paper mode: the center of smallest W_p. Official mode: the W_p distances of the row to
        the training rows, then the nearest embedding center. On the training data this returns
        ``labels_`` (unless the final Lloyd step had to refill an empty cluster, which only
        happens with duplicated samples).
        """
        if not hasattr(self, "labels_"):
            raise NotFittedError("this KWMeans instance is not fitted yet; call fit(X) first")
        x = self._samples(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features per sample (shape {tuple(x.shape)}) but KWMeans "
                f"was fitted with {self.n_features_in_}"
            )
        n_threads = _threads(self.n_threads)
        if self._fit_mode == "paper":
            return _core.kwmeans_predict(
                x, self.cluster_centers_, self._fit_p, "paper", None, n_threads
            )
        return _core.kwmeans_predict(
            x, self.embedding_centers_, self._fit_p, "official", self._fit_X, n_threads
        )
