"""RFLBAT (Wang et al., 2022), spec §3.3.

1. Vectors: the whole flattened update (small CNN), or only the entries of keys containing one of
   ``key_filter``'s substrings (the authors used ``("fc", "layer4.1.conv")`` for ResNet-18).
2. PCA to 2-D (centred data, numpy SVD): z_i.
3. Coarse outlier removal: s_i = sum_j ||z_i - z_j||; keep s_i < eps1 * median(s), eps1 = 10.
4. Number of clusters by the gap statistic on the kept points (min-max normalised, K_max = 10,
   5 uniform reference sets; Tibshirani's W_k = within-cluster sum of squares. The authors' code
   sums plain distances, each measured to the cluster's first member - a bug not reproduced);
   scikit-learn KMeans (k-means++, 10 starts, seeded from ``rin.rng``).
5. Per cluster: for each member, its mean cosine similarity (original space) to the cluster's
   members, itself included (as in the authors' code); the cluster's value is the median of these
   (a singleton scores 1). The cluster with the smallest value is kept (poisoned updates are
   mutually more similar than benign ones).

With ~20 uploads the gap statistic often splits the benign group too (k = 3-5 when a tight
attacker group sits far away); only one benign sub-cluster is then kept, which is RFLBAT's benign
false-positive rate, not a bug of this implementation.
6. Fine removal inside the kept cluster: recompute s_i on its z's; keep s_i < eps2 * median,
   eps2 = 4.

FedAvg over the kept uploads; flagged: everything not kept. Rounds with fewer than 3 uploads are
accepted whole (nothing to project or cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import (
    RoundVectors,
    VectorDefense,
    as_list,
    cosine_similarity_matrix,
    euclidean_distance_matrix,
    gap_statistic,
    gram_matrix,
    kmeans_labels,
    seed_from,
)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection of the rows of ``x`` on its first two principal components (n, 2).

    Computed from the SVD of the small (n, n) Gram matrix of the centred rows (C C' = U S U',
    principal coordinates U sqrt(S)): the same coordinates as the SVD of C (up to signs), without
    a LAPACK call on a 20 x 500 000 matrix.
    """
    c = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(gram_matrix(c), hermitian=True)
    z = u[:, :2] * np.sqrt(np.maximum(s[:2], 0.0))
    if z.shape[1] < 2:
        z = np.pad(z, ((0, 0), (0, 2 - z.shape[1])))
    return z


def distance_sums(z: np.ndarray) -> np.ndarray:
    """s_i = sum_j ||z_i - z_j|| (n,)."""
    return euclidean_distance_matrix(z).sum(axis=1)


def below_median_multiple(s: np.ndarray, eps: float) -> np.ndarray:
    """bool: s_i < eps * median(s); everything is kept when every s_i is 0."""
    med = float(np.median(s))
    if med <= 0:
        return np.ones(s.shape[0], dtype=bool)
    return s < eps * med


class RFLBAT(VectorDefense):
    """RFLBAT: PCA + distance-sum outlier removal + gap-statistic k-means + cosine cluster choice.

    Args:
        eps1, eps2: the coarse and fine outlier thresholds (10, 4).
        k_max: largest number of clusters tried by the gap statistic (10).
        n_refs: gap-statistic reference sets (5).
        key_filter: substrings selecting the keys used (None: every key).
    """

    name = "rflbat"

    def __init__(
        self,
        eps1: float = 10.0,
        eps2: float = 4.0,
        k_max: int = 10,
        n_refs: int = 5,
        key_filter: Sequence[str] | None = None,
    ) -> None:
        self.eps1 = float(eps1)
        self.eps2 = float(eps2)
        self.k_max = int(k_max)
        self.n_refs = int(n_refs)
        self.key_filter = None if key_filter is None else tuple(key_filter)

    def config(self) -> dict[str, Any]:
        return {
            "eps1": self.eps1,
            "eps2": self.eps2,
            "k_max": self.k_max,
            "n_refs": self.n_refs,
            "key_filter": None if self.key_filter is None else list(self.key_filter),
        }

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        n = rv.n
        x = rv.deltas
        if self.key_filter is not None:
            mask = rv.layout.mask(lambda k: any(sub in k for sub in self.key_filter))
            if not mask.any():
                raise ValueError(f"RFLBAT key_filter {self.key_filter} matches no key")
            x = x[:, mask]
        kept = np.ones(n, dtype=bool)
        info: dict[str, Any] = {}
        if n >= 3:
            z = pca_2d(x)
            idx = np.flatnonzero(below_median_multiple(distance_sums(z), self.eps1))
            if idx.size >= 2:
                gap = gap_statistic(z[idx], rin.rng, k_max=self.k_max, n_refs=self.n_refs)
                k = gap.k
                labels = (
                    np.zeros(idx.size, dtype=np.int64)
                    if k == 1
                    else kmeans_labels(z[idx], k, seed_from(rin.rng))[0]
                )
                scores = {}
                for c in np.unique(labels):
                    members = idx[labels == c]
                    if members.size == 1:
                        scores[int(c)] = 1.0
                        continue
                    cs = cosine_similarity_matrix(x[members])
                    scores[int(c)] = float(np.median(cs.mean(axis=1)))
                best = min(scores, key=lambda c: (scores[c], c))
                idx = idx[labels == best]
                info = {"k": int(k), "cluster_scores": {str(c): v for c, v in scores.items()}}
            if idx.size >= 2:
                idx = idx[below_median_multiple(distance_sums(z[idx]), self.eps2)]
            kept = np.zeros(n, dtype=bool)
            kept[idx] = True
            info["pca"] = [as_list(row) for row in z]
        return self.output(rv, rv.weighted_sum(kept), kept.sum(), ~kept, info)
