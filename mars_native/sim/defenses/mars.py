"""MARS, MARS* and the authors' mode, wrapping the package's own detector :class:`mars_native.MARS`.

``flagged = ~accepted``; ``update_sum = sum over accepted Delta_i`` (every float entry, BN running
statistics included), ``weight_total`` = number accepted; ``info`` = the detection report
(``Detection.to_dict()``, CBE rows dropped when the report is large).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import RoundVectors, VectorDefense

#: above this many CBE entries (clients x length) the per-client CBE rows are left out of ``info``.
MAX_INFO_CBE = 4096


class MarsDefense(VectorDefense):
    """MARS (``selection="norm"``, paper mode by default).

    Args: those of :class:`mars_native.MARS` (kappa, epsilon, selection, mode, include_linear, p,
    random_state, n_init, bn_eps, ...). The global state's key order drives the conv -> BN pairing.
    ``detect_seconds`` is the wall time of the whole call; ``info["detect_only_seconds"]`` the
    detector's own time.
    """

    name = "mars"
    default_params: ClassVar[dict[str, Any]] = {"selection": "norm", "mode": "paper"}

    def __init__(self, **params: Any) -> None:
        import mars_native as mn

        self.params = {"kappa": 0.05, "epsilon": 0.03, **self.default_params, **params}
        self.detector = mn.MARS(**self.params)

    def config(self) -> dict[str, Any]:
        return dict(self.detector.params())

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        t0 = time.perf_counter()
        report = self.detector.detect(rin.client_states, global_state=rin.global_state)
        seconds = time.perf_counter() - t0
        accepted = np.asarray(report.accepted, dtype=bool)
        info = report.to_dict()
        if np.asarray(report.cbe).size > MAX_INFO_CBE:
            info.pop("cbe", None)
        info["detect_only_seconds"] = seconds
        return self.output(rv, rv.weighted_sum(accepted), accepted.sum(), ~accepted, info)


class MarsStar(MarsDefense):
    """MARS*: majority selection (keeps the larger cluster), against the adaptive attack."""

    name = "mars-star"
    default_params: ClassVar[dict[str, Any]] = {"selection": "majority", "mode": "paper"}


class MarsOfficial(MarsDefense):
    """MARS in the authors' code's mode (quantile top-k, K-Means on W1 rows, <= epsilon)."""

    name = "mars-official"
    default_params: ClassVar[dict[str, Any]] = {"selection": "norm", "mode": "official"}
