"""The defense interface of the simulation arena.

Every defense sees the same thing: the global state and the uploaded local states of the round
(torch CPU tensors, state_dict order), and returns the aggregated *update* as a sum plus the
divisor that turns it into a mean. The loop then applies the configured global rule:

- ``"paper"`` (default; the paper's Algorithm 1 with a server learning rate):
  ``theta <- theta + eta * update_sum / weight_total`` (with eta = 1 this is the mean of the
  accepted models); ``weight_total == 0`` keeps theta.
- ``"official"`` (the authors' code): ``theta <- theta + (eta / N_total) * update_sum``.

Integer buffers (``num_batches_tracked``) are never averaged: the loop keeps the global value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

StateDict = dict  # dict[str, torch.Tensor]


@dataclass
class RoundInput:
    """What a defense sees in one round."""

    global_state: StateDict
    client_states: list[StateDict]  # local models theta_i (not deltas), upload order
    client_ids: list[int]  # stable client ids (history-based defenses key on them)
    num_examples: list[int]
    round_idx: int
    num_clients_total: int
    make_model: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8)
    num_classes: int
    final_layer: str  # prefix of the final linear layer, e.g. "fc2"
    rng: np.random.Generator
    generator: torch.Generator


@dataclass
class DefenseOutput:
    """What a defense returns.

    update_sum: sum_i w_i * Delta_i over the accepted clients (float keys only), after any
        clipping or noise of the defense; Delta_i = theta_i - theta.
    weight_total: sum_i w_i (the divisor that makes ``update_sum`` a weighted mean).
    flagged: bool per upload (True = flagged as malicious), or None when the defense does
        not flag clients (FedCLP; FedAvg flags nobody: all False).
    reset_state: a state that replaces theta before the update is applied (FLDetector's reset).
    info: anything worth logging (JSON-serialisable), e.g. MARS's Detection.to_dict().
    """

    update_sum: StateDict
    weight_total: float
    flagged: np.ndarray | None
    reset_state: StateDict | None = None
    info: dict = field(default_factory=dict)
    detect_seconds: float = 0.0


class Defense(ABC):
    """A server-side aggregation rule, called once per round."""

    name: str = "defense"
    #: True when the defense needs data at the server (flagged in the results table).
    needs_server_data: bool = False
    #: False when TPR/FPR are undefined for this defense (FedCLP).
    flags_clients: bool = True

    def reset(self) -> None:
        """Forget any per-run history (called at the start of every run)."""

    @abstractmethod
    def __call__(self, rin: RoundInput) -> DefenseOutput:
        """Aggregate one round."""

    def config(self) -> dict[str, Any]:
        """The defense's parameters, for results.json."""
        return {}
