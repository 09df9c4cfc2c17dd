"""FedCLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022) of every local model.

Spec §3.8.

For every local model and every conv layer directly followed by a BatchNorm (paired by
:func:`mars_native.find_layers` on the global state's key order), the upper bound of each
channel's Lipschitz constant is

    UCLC_k = sigma_max(W_k reshaped (C_in, kh * kw)) * |gamma_k| / sqrt(var_k + 1e-5)

(``var_k`` NaN or negative -> 0), computed by :func:`mars_native.channel_spectral_norms`. Channels
with UCLC_k > mean + u * std of their layer (u = 3; std with Bessel's correction, as
``torch.Tensor.std`` in the CLP code) are pruned by zeroing gamma_k and beta_k of the BN in that
local model. The pruned models' deltas are then averaged with FedAvg (w_i = 1).

Data-free. FedCLP does not identify clients: ``flagged`` is None and ``flags_clients`` False.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import RoundVectors, VectorDefense


def prune_thresholds(uclc: np.ndarray, u: float) -> np.ndarray:
    """bool (channels,): UCLC_k > mean + u * std (ddof=1) over the layer's finite values."""
    finite = np.isfinite(uclc)
    if finite.sum() < 2:
        return np.zeros(uclc.shape, dtype=bool)
    vals = uclc[finite]
    bound = vals.mean() + u * vals.std(ddof=1)
    return finite & (uclc > bound)


class FedCLP(VectorDefense):
    """Prune high-Lipschitz channels in every local model, then FedAvg.

    Args:
        u: the pruning threshold in standard deviations (3).
        bn_eps: epsilon under the square root (1e-5).
    """

    name = "fedclp"
    flags_clients = False

    def __init__(self, u: float = 3.0, bn_eps: float = 1e-5) -> None:
        self.u = float(u)
        self.bn_eps = float(bn_eps)

    def config(self) -> dict[str, Any]:
        return {"u": self.u, "bn_eps": self.bn_eps}

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        import mars_native as mn

        layout = rv.layout
        layers = [
            ly
            for ly in mn.find_layers(rin.global_state, reference=rin.global_state, require_bn=True)
            if ly.bn_prefix is not None and f"{ly.bn_prefix}.weight" in layout.keys
        ]
        local = rv.locals_.copy()
        pruned: dict[str, list[int]] = {}
        for ly in layers:
            wkey, bn = ly.weight_key, ly.bn_prefix
            shape = layout.shapes[layout.keys.index(wkey)]
            sw, sg, sv = (
                layout.slice(wkey),
                layout.slice(f"{bn}.weight"),
                layout.slice(f"{bn}.running_var"),
            )
            sb = layout.slice(f"{bn}.bias") if f"{bn}.bias" in layout.keys else None
            counts = []
            for i in range(rv.n):
                var = local[i, sv]
                var = np.where(np.isfinite(var) & (var > 0), var, 0.0)
                scale = np.abs(local[i, sg]) / np.sqrt(var + self.bn_eps)
                weight = np.ascontiguousarray(local[i, sw].reshape(shape))
                uclc = np.asarray(mn.channel_spectral_norms(weight, scale), dtype=np.float64)
                idx = np.flatnonzero(prune_thresholds(uclc, self.u))
                counts.append(int(idx.size))
                if idx.size:
                    local[i, sg.start + idx] = 0.0
                    if sb is not None:
                        local[i, sb.start + idx] = 0.0
            pruned[ly.name] = counts
        update = (local - rv.global_vec).sum(axis=0)
        return self.output(rv, update, rv.n, None, {"pruned_channels": pruned})
