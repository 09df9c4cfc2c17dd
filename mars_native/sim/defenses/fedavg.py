"""FedAvg (spec §3.1): accept every upload, flag nobody."""

from __future__ import annotations

from typing import Any

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import RoundVectors, VectorDefense


class FedAvg(VectorDefense):
    """Plain federated averaging.

    Args:
        weighting: "uniform" (w_i = 1, the spec's official rule) or "examples"
            (w_i = num_examples_i, McMahan et al.).

    Flags nobody (``flagged`` all False: TPR = FPR = 0 by definition).
    """

    name = "fedavg"
    needs_server_data = False
    flags_clients = True

    def __init__(self, weighting: str = "uniform") -> None:
        if weighting not in ("uniform", "examples"):
            raise ValueError(f"weighting must be 'uniform' or 'examples', got {weighting!r}")
        self.weighting = weighting

    def config(self) -> dict[str, Any]:
        return {"weighting": self.weighting}

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        if self.weighting == "examples":
            w = np.asarray(rin.num_examples, dtype=np.float64)
            if w.shape != (rv.n,) or np.any(w < 0):
                raise ValueError(
                    f"num_examples must be {rv.n} non-negative counts, got {rin.num_examples!r}"
                )
        else:
            w = np.ones(rv.n)
        return self.output(
            rv,
            rv.weighted_sum(w),
            w.sum(),
            np.zeros(rv.n, dtype=bool),
            {"weights": [float(v) for v in w]},
        )
