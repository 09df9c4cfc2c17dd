"""FLDetector (Zhang et al., KDD 2022), spec §3.6.

Every round the server records each participant's vector g_i^t (the authors' baseline: the
client's full local parameter vector, ``vector="local"``; FLDetector's paper: its update,
``vector="update"``) and the global weights w_t, and keeps the last N_w = 10 pairs
(Delta w, Delta g_bar) with g_bar the mean of the (non-excluded) g_i. Once the window is full:

1. Hessian-vector product H v with v = w_t - w_{t-1}, by the compact L-BFGS representation
   (Byrd, Nocedal & Schnabel 1994; the FLDetector code): with S, Y the stacked pairs,
   sigma = y_m's_m / s_m's_m, L = strictly lower triangle of S'Y, D = diag(S'Y),
   H v = sigma v - [sigma S, Y] [[sigma S'S, L], [L', -D]]^-1 [sigma S'v; Y'v].
2. Prediction g_hat_i = g_i^{t-1} + H v; d_i = ||g_hat_i - g_i^t|| / sum_j ||g_hat_j - g_j^t||;
   a client's score is the sum of its last N_w d's.
3. If the gap statistic on the scores (min-max normalised, 20 reference sets, K_max = 10) finds
   >= 2 clusters: KMeans(2) on the scores; the cluster with the larger mean score is malicious and
   excluded permanently (until :meth:`reset`); the global model is reset to the model saved when
   detection started (``reset_state``; ``reset_to="run_start"``: the first global model this
   detector saw), every buffer is cleared and the round aggregates nothing.
   Otherwise FedAvg over the non-excluded clients.

History is keyed by client id; a client absent from the previous round gets no d this round.
Flagged: the excluded clients (cumulative).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput, StateDict
from mars_native.sim.defenses.common import (
    RoundVectors,
    VectorDefense,
    gap_statistic,
    gram_matrix,
    kmeans_labels,
    matmul,
    seed_from,
)


def lbfgs_hvp(s_list: np.ndarray, y_list: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Compact L-BFGS approximation of H v from pairs s_list, y_list of shape (m, d)."""
    s, y = np.asarray(s_list, dtype=np.float64), np.asarray(y_list, dtype=np.float64)
    m = s.shape[0]
    sy = np.concatenate([s, y])  # (2m, d)
    prods = gram_matrix(sy)
    sts, sty = prods[:m, :m], prods[:m, m:]  # (S'Y)_ij = s_i . y_j
    lower = np.tril(sty, k=-1)
    diag = np.diag(np.diag(sty))
    sigma = float(sty[-1, -1]) / float(sts[-1, -1])
    mat = np.block([[sigma * sts, lower], [lower.T, -diag]])
    sv_yv = matmul(sy, v)
    p = np.concatenate([sigma * sv_yv[:m], sv_yv[m:]])
    try:
        q = np.linalg.solve(mat, p)
    except np.linalg.LinAlgError:
        q = np.linalg.lstsq(mat, p, rcond=None)[0]
    return sigma * v - matmul(np.concatenate([sigma * q[:m], q[m:]]), sy)


def _clone_state(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


class FLDetector(VectorDefense):
    """FLDetector: model-consistency scores over a sliding window, permanent exclusion.

    Args:
        window: N_w (10).
        n_refs: gap-statistic reference sets (20).
        k_max: largest k tried by the gap statistic (10).
        vector: "local" (local parameter vectors, the authors' baseline) or "update".
        reset_to: "detection_start" or "run_start" (see the module docstring).
    """

    name = "fldetector"

    def __init__(
        self,
        window: int = 10,
        n_refs: int = 20,
        k_max: int = 10,
        vector: str = "local",
        reset_to: str = "detection_start",
    ) -> None:
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        if vector not in ("local", "update"):
            raise ValueError(f"vector must be 'local' or 'update', got {vector!r}")
        if reset_to not in ("detection_start", "run_start"):
            raise ValueError(f"reset_to must be 'detection_start' or 'run_start', got {reset_to!r}")
        self.window = int(window)
        self.n_refs = int(n_refs)
        self.k_max = int(k_max)
        self.vector = vector
        self.reset_to = reset_to
        self.reset()

    def reset(self) -> None:
        self.excluded: set[int] = set()
        self._run_start: StateDict | None = None
        self._clear_buffers()

    def _clear_buffers(self) -> None:
        self._s: deque[np.ndarray] = deque(maxlen=self.window)
        self._y: deque[np.ndarray] = deque(maxlen=self.window)
        self._scores: dict[int, deque[float]] = {}
        self._prev_w: np.ndarray | None = None
        self._prev_gbar: np.ndarray | None = None
        self._prev_g: dict[int, np.ndarray] = {}
        self._detection_start: StateDict | None = None

    def config(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "n_refs": self.n_refs,
            "k_max": self.k_max,
            "vector": self.vector,
            "reset_to": self.reset_to,
        }

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        ids = [int(c) for c in rin.client_ids]
        if len(ids) != rv.n or len(set(ids)) != rv.n:
            raise ValueError(f"FLDetector needs {rv.n} distinct client ids, got {rin.client_ids!r}")
        if self._run_start is None:
            self._run_start = _clone_state(rin.global_state)
        g = rv.locals_ if self.vector == "local" else rv.deltas
        w = rv.global_vec
        active = np.array([c not in self.excluded for c in ids])
        info: dict[str, Any] = {"window_pairs": len(self._s)}

        v = None if self._prev_w is None else w - self._prev_w
        if len(self._s) == self.window and v is not None and np.any(v):
            if self._detection_start is None:
                self._detection_start = _clone_state(rin.global_state)
            hvp = lbfgs_hvp(np.stack(self._s), np.stack(self._y), v)
            rows = [i for i in range(rv.n) if active[i] and ids[i] in self._prev_g]
            dist = np.array([np.linalg.norm(self._prev_g[ids[i]] + hvp - g[i]) for i in rows])
            total = dist.sum()
            for i, d in zip(rows, dist / total if total > 0 else dist):
                self._scores.setdefault(ids[i], deque(maxlen=self.window)).append(float(d))
            scored = [i for i in rows if ids[i] in self._scores]
            scores = np.array([sum(self._scores[ids[i]]) for i in scored])
            info["scores"] = {str(ids[i]): float(s) for i, s in zip(scored, scores)}
            if len(scored) >= 2:
                gap = gap_statistic(scores, rin.rng, k_max=self.k_max, n_refs=self.n_refs)
                info["gap_k"] = int(gap.k)
                if gap.k >= 2:
                    labels = kmeans_labels(scores, 2, seed_from(rin.rng))[0]
                    bad = int(np.argmax([scores[labels == c].mean() for c in (0, 1)]))
                    newly = [ids[i] for i, lab in zip(scored, labels) if lab == bad]
                    self.excluded.update(newly)
                    reset = (
                        self._detection_start
                        if self.reset_to == "detection_start"
                        else self._run_start
                    )
                    self._clear_buffers()
                    flagged = np.array([c in self.excluded for c in ids])
                    info.update({"detected": newly, "excluded": sorted(self.excluded)})
                    return self.output(
                        rv,
                        np.zeros(rv.layout.size),
                        0.0,
                        flagged,
                        info,
                        reset_state=_clone_state(reset) if reset is not None else None,
                    )

        update = rv.weighted_sum(active)
        if active.any():
            gbar = g[active].mean(axis=0)
            if self._prev_w is not None and self._prev_gbar is not None and np.any(v):
                self._s.append(v)
                self._y.append(gbar - self._prev_gbar)
            self._prev_w, self._prev_gbar = w.copy(), gbar
            self._prev_g = {ids[i]: g[i].copy() for i in range(rv.n) if active[i]}
        info["excluded"] = sorted(self.excluded)
        return self.output(rv, update, active.sum(), ~active, info)
