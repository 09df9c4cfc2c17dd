"""FLAME (Nguyen et al., USENIX Security 2022), the variant the MARS authors ran (spec §3.4).

1. Cosine distances between the clients' *final-layer local parameters* (theta_i restricted to
   the final layer's weight and bias; original FLAME: the whole update, ``features="update"``).
2. HDBSCAN(metric="precomputed", min_cluster_size = n // 2 + 1, min_samples = 1,
   allow_single_cluster=True): every point labelled -1 (outlier) is rejected. With a minimum
   cluster size above n / 2 at most one cluster exists, so "not an outlier" = "in the majority".
3. Adaptive clipping: e_i = ||Delta_i||_2 over the trainable entries (BatchNorm running statistics
   excluded); S = median of e over *all* uploads; every accepted Delta_i (all entries) is scaled
   by min(1, S / e_i).
4. Adaptive noise: N(0, (lambda * S)^2), lambda = 0.001, drawn with ``rin.generator``, added to
   every trainable entry of the *sum* of the clipped updates (as in the authors' code; the loop then
   divides by the number accepted under the paper rule). ``noise_on="model"`` scales the noise by
   the number accepted instead, so that the global model itself receives std lambda * S (original
   FLAME) under the paper rule with eta = 1.

Flagged: the HDBSCAN outliers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import (
    RoundVectors,
    VectorDefense,
    as_list,
    cosine_distance_matrix,
    hdbscan_labels,
    is_bn_buffer,
    l2_norms,
)


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """min(1, bound / norm) per entry (1 for a zero norm)."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)


class Flame(VectorDefense):
    """FLAME: HDBSCAN on cosine distances, median-norm clipping, Gaussian noise.

    Args:
        lam: noise level lambda (std = lam * median norm).
        features: "final_local" (spec/authors: final-layer local parameters) or "update"
            (original FLAME: the whole flattened update).
        noise_on: "sum" (spec) or "model" (see the module docstring).
    """

    name = "flame"

    def __init__(
        self, lam: float = 0.001, features: str = "final_local", noise_on: str = "sum"
    ) -> None:
        if features not in ("final_local", "update"):
            raise ValueError(f"features must be 'final_local' or 'update', got {features!r}")
        if noise_on not in ("sum", "model"):
            raise ValueError(f"noise_on must be 'sum' or 'model', got {noise_on!r}")
        if float(lam) < 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam = float(lam)
        self.features = features
        self.noise_on = noise_on

    def config(self) -> dict[str, Any]:
        return {"lam": self.lam, "features": self.features, "noise_on": self.noise_on}

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        n = rv.n
        if self.features == "final_local":
            feats = rv.locals_[:, rv.final_layer_mask(rin.final_layer)]
        else:
            feats = rv.deltas
        labels = hdbscan_labels(
            cosine_distance_matrix(feats),
            precomputed=True,
            min_cluster_size=n // 2 + 1,
            min_samples=1,
            allow_single_cluster=True,
        )
        accepted = labels != -1
        trainable = rv.layout.mask(lambda k: not is_bn_buffer(k))
        norms = l2_norms(rv.deltas, trainable)
        bound = float(np.median(norms))
        factors = clip_factors(norms, bound)
        update = rv.weighted_sum(np.where(accepted, factors, 0.0))
        sigma = self.lam * bound
        n_acc = int(accepted.sum())
        if sigma > 0 and n_acc > 0:
            scale = sigma * (n_acc if self.noise_on == "model" else 1.0)
            noise = torch.randn(int(trainable.sum()), generator=rin.generator, dtype=torch.float64)
            update[trainable] += scale * noise.numpy()
        info = {
            "labels": as_list(labels),
            "median_norm": bound,
            "noise_std": sigma,
            "clip_factors": as_list(factors),
        }
        return self.output(rv, update, n_acc, ~accepted, info)
