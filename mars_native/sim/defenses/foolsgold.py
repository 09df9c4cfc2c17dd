"""FoolsGold (Fung et al., RAID 2020), spec §3.5.

History: H_i = running sum of client i's final-layer update (weight and bias), over every round
the client took part in since :meth:`FoolsGold.reset`, keyed by client id. Per round, over the
participants' histories:

    cs = cosine(H) - I;  v_i = max_j cs_ij
    pardoning: cs_ij <- cs_ij * v_i / v_j  where v_i < v_j
    w_i = 1 - max_j cs_ij, clipped to [0, 1];  w <- w / max(w);  w == 1 -> 0.99
    w <- ln(w / (1 - w) + 1e-5) + 0.5, clipped to [0, 1] (inf -> 1)

Aggregate: sum_i w_i * Delta_i over all entries, ``weight_total = sum_i w_i``. Flagged:
w_i <= 0.5 (the paper's rule). Sybils that push the same direction round after round end up with
weights near 0. When every w is 0 before rescaling (all histories identical), every weight is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import (
    RoundVectors,
    VectorDefense,
    as_list,
    cosine_similarity_matrix,
)


def foolsgold_weights(histories: np.ndarray, confidence: float = 1.0) -> np.ndarray:
    """FoolsGold learning-rate weights (n,) in [0, 1] from the clients' history vectors (n, d)."""
    n = histories.shape[0]
    cs = cosine_similarity_matrix(histories)
    np.fill_diagonal(cs, 0.0)  # cs - I; the zero diagonal takes part in the maxima, as in the paper
    v = cs.max(axis=1)  # >= 0
    vi, vj = v[:, None], v[None, :]
    pardon = vi < vj  # implies vj > 0
    cs = np.where(pardon, cs * vi / np.where(pardon, vj, 1.0), cs)
    w = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    if w.max() <= 0:
        return np.zeros(n)
    w = w / w.max()
    w[w == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        w = confidence * (np.log(w / (1.0 - w) + 1e-5) + 0.5)
    w[np.isinf(w) & (w > 0)] = 1.0
    return np.clip(w, 0.0, 1.0)


class FoolsGold(VectorDefense):
    """FoolsGold with per-client history on the final layer.

    Args:
        threshold: weights <= threshold are flagged (0.5).
        confidence: the kappa of the logit (1 in the authors' code).
    """

    name = "foolsgold"

    def __init__(self, threshold: float = 0.5, confidence: float = 1.0) -> None:
        self.threshold = float(threshold)
        self.confidence = float(confidence)
        self._history: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        self._history = {}

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "confidence": self.confidence}

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        if len(rin.client_ids) != rv.n or len(set(rin.client_ids)) != rv.n:
            raise ValueError(f"FoolsGold needs {rv.n} distinct client ids, got {rin.client_ids!r}")
        final = rv.deltas[:, rv.final_layer_mask(rin.final_layer)]
        for cid, upd in zip(rin.client_ids, final):
            h = self._history.get(int(cid))
            if h is not None and h.shape != upd.shape:
                raise ValueError(
                    f"client {cid}: final-layer size changed from {h.size} to {upd.size}"
                )
            self._history[int(cid)] = upd.copy() if h is None else h + upd
        hist = np.stack([self._history[int(c)] for c in rin.client_ids])
        w = foolsgold_weights(hist, self.confidence)
        return self.output(
            rv, rv.weighted_sum(w), w.sum(), w <= self.threshold, {"weights": as_list(w)}
        )
