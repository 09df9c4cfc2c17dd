"""Distance- and statistics-based robust aggregation: Multi-Krum (§3.2), median, trimmed mean.

Coordinate-wise median and trimmed mean do not identify clients: they flag nobody
(``flagged`` all False) and express their aggregate ``agg`` as ``update_sum = n * agg`` with
``weight_total = n``, so that both global rules apply it unchanged (the paper rule gives
``theta + eta * agg``; the official rule ``theta + eta * n / N * agg``, which is ``eta * agg``
when every client participates).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import (
    RoundVectors,
    VectorDefense,
    as_list,
    euclidean_distance_matrix,
)


def krum_scores(x: np.ndarray, f: int, squared: bool = False) -> np.ndarray:
    """Krum score of each row: sum of its distances to its ``n - f - 2`` nearest other rows.

    At least one neighbour is used (Krum's n > 2f + 2 guarantee does not hold for small rounds).
    ``squared=True`` sums squared distances (Blanchard et al.); the spec's baseline sums plain
    Euclidean distances.
    """
    n = x.shape[0]
    d = euclidean_distance_matrix(x)
    if squared:
        d = d * d
    m = int(min(max(1, n - f - 2), n - 1))
    if n == 1:
        return np.zeros(1)
    others = np.sort(d + np.diag(np.full(n, np.inf)), axis=1)[:, :m]
    return others.sum(axis=1)


class MultiKrum(VectorDefense):
    """Multi-Krum: keep the ``n - f`` uploads with the lowest Krum scores, FedAvg over them.

    Args:
        f: assumed number of attackers per round (4 in the spec; Multi-Krum needs to know it).
        squared: score with squared distances (original Krum) instead of Euclidean distances.

    Distances use the whole flattened update (BN running statistics included). Flagged: the
    not-kept uploads, always ``min(f, n - 1)`` of them.
    """

    name = "multikrum"

    def __init__(self, f: int = 4, squared: bool = False) -> None:
        if int(f) < 0:
            raise ValueError(f"f must be >= 0, got {f!r}")
        self.f = int(f)
        self.squared = bool(squared)

    def config(self) -> dict[str, Any]:
        return {"f": self.f, "squared": self.squared}

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        scores = krum_scores(rv.deltas, self.f, self.squared)
        keep_n = max(1, rv.n - self.f)
        kept = np.zeros(rv.n, dtype=bool)
        kept[np.argsort(scores, kind="stable")[:keep_n]] = True
        return self.output(
            rv, rv.weighted_sum(kept), kept.sum(), ~kept, {"scores": as_list(scores)}
        )


class Median(VectorDefense):
    """Coordinate-wise median of the updates (Yin et al. 2018). Flags nobody."""

    name = "median"

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        agg = np.median(rv.deltas, axis=0)
        return self.output(rv, rv.n * agg, rv.n, np.zeros(rv.n, dtype=bool))


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` largest and smallest values."""
    n = x.shape[0]
    k = int(np.floor(beta * n))
    if 2 * k >= n:
        raise ValueError(f"trimmed mean with beta={beta} removes all {n} values")
    srt = np.sort(x, axis=0)
    return srt[k : n - k].mean(axis=0)


class TrimmedMean(VectorDefense):
    """Coordinate-wise trimmed mean (Yin et al. 2018), ``beta`` trimmed at each end. Flags nobody.

    Args:
        beta: share removed at each end per coordinate, in [0, 0.5); floor(beta * n) values
            (as ``scipy.stats.trim_mean``); beta < 0.5 always leaves at least one value.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.2) -> None:
        if not 0.0 <= float(beta) < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def config(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        agg = trimmed_mean(rv.deltas, self.beta)
        return self.output(rv, rv.n * agg, rv.n, np.zeros(rv.n, dtype=bool))
