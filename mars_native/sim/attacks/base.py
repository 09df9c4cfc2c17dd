"""The attack interface of the simulation arena.

An attack controls the uploads of the attacker clients of a round. The federated loop
(:mod:`mars_native.sim.loop`) calls, in every round:

1. ``attack.begin_round(ctx)`` before any local training (CerP tunes its trigger here, 3DFed
   reads the feedback of its indicators);
2. ``attack.train_attacker(ctx, client_id)`` for every sampled attacker, which returns the
   attacker's *local model* state (global state + its update); every attacker trains its own
   poisoned model on its own data by default (``ctx.config.attacker_protocol == "independent"``),
   or, with ``"shared"`` (the authors' code), the lead attacker trains and the others copy it;
3. ``attack.finalize_uploads(ctx, uploads)`` once all benign and attacker uploads exist (MRA
   scales, 3DFed adds masks, indicators and decoys that replace benign slots);
4. ``attack.end_round(ctx, new_global_state)`` after aggregation.

``attack.stamp_test(x)`` stamps the trigger on test images for the ASR measurement.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

StateDict = dict  # dict[str, torch.Tensor], in the model's state_dict order


@dataclass
class Upload:
    """One client's upload of a round: its local model state (not the delta)."""

    client_id: int
    state: StateDict
    num_examples: int
    is_attacker: bool  # ground truth, used for TPR/FPR
    is_decoy: bool = False  # 3DFed decoy written into a benign slot (counted as benign)


@dataclass
class RoundContext:
    """Everything an attack (or the loop) may read during one round."""

    round_idx: int  # 0-based index inside the attack window
    global_state: StateDict  # theta at the start of the round (do not modify)
    sampled_ids: list[int]  # every participant of the round, in upload order
    attacker_ids: list[int]  # the sampled attackers (subset of sampled_ids)
    all_attacker_ids: list[int]  # every attacker of the population
    num_clients: int
    config: Any  # mars_native.sim.config.SimConfig
    make_model: Callable[[], torch.nn.Module]  # a fresh model of the architecture
    client_data: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # (x, y) of a client
    train_benign: Callable[[StateDict, torch.Tensor, torch.Tensor], StateDict]
    generator: torch.Generator  # seeded torch RNG for this round
    rng: np.random.Generator  # seeded numpy RNG for this round
    extras: dict = field(default_factory=dict)


class Attack(ABC):
    """Base class: an attack that does nothing (the benign "none" attack)."""

    name: str = "none"
    #: which trigger poisons training and is stamped for ASR ("pattern" or "cerp").
    trigger: str = "pattern"

    def setup(self, config: Any, input_shape: tuple[int, ...], normalize: Callable) -> None:
        """Called once per run, before the first round."""

    def begin_round(self, ctx: RoundContext) -> None:
        """Called before local training in every round."""

    def train_attacker(self, ctx: RoundContext, client_id: int) -> StateDict:
        """Return the local model state uploaded by attacker ``client_id`` (default: benign)."""
        x, y = ctx.client_data(client_id)
        return ctx.train_benign(ctx.global_state, x, y)

    def finalize_uploads(self, ctx: RoundContext, uploads: list[Upload]) -> list[Upload]:
        """Post-process the round's uploads (default: unchanged)."""
        return uploads

    def end_round(self, ctx: RoundContext, new_global_state: StateDict) -> None:
        """Called after the server aggregated the round."""

    def stamp_test(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch of (normalised) test images; default: unchanged."""
        return x
