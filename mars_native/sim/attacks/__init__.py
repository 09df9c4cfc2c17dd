"""Attacks of the simulation arena (spec ``attacks-and-baselines.md`` §2).

``ATTACKS`` maps a name to its class; ``make_attack(name, **params)`` builds one with its
constructor parameters (the spec's digits defaults when omitted):

- ``"none"``: :class:`~mars_native.sim.attacks.base.Attack`, attackers behave benignly;
- ``"mra"``: :class:`MRA` (``gamma=5``);
- ``"cerp"``: :class:`CerP` (tuned DBA-bar trigger, ``radius=5``, ``clamp=(-3, 3)`` ...);
- ``"3dfed"``: :class:`ThreeDFed` (``group_size=2``, ``num_neurons=8``, MNIST constants);
- ``"adaptive"``: :class:`AdaptiveAttack` (``lam=0.01``, ``form="paper"`` | ``"official"``).
"""

from __future__ import annotations

from mars_native.sim.attacks.adaptive import AdaptiveAttack
from mars_native.sim.attacks.base import Attack, RoundContext, Upload
from mars_native.sim.attacks.cerp import CerP
from mars_native.sim.attacks.dfed3 import ThreeDFed
from mars_native.sim.attacks.mra import MRA

ATTACKS: dict[str, type] = {
    "none": Attack,
    "mra": MRA,
    "cerp": CerP,
    "3dfed": ThreeDFed,
    "adaptive": AdaptiveAttack,
}


def make_attack(name: str, **params) -> Attack:
    """A new attack by name (case-insensitive); ``params`` go to its constructor."""
    key = str(name).lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    cls = ATTACKS[key]
    if cls is Attack and params:
        raise TypeError(f"attack 'none' takes no parameters, got {sorted(params)}")
    return cls(**params)


__all__ = [
    "ATTACKS",
    "MRA",
    "AdaptiveAttack",
    "Attack",
    "CerP",
    "RoundContext",
    "ThreeDFed",
    "Upload",
    "make_attack",
]
