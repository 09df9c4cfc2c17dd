"""Server-side defenses of the simulation arena, all implementing :class:`Defense`.

``make_defense(name, **params)`` builds one by name; ``DEFENSES`` maps every name to its class:

========================  ===========================================================  =========
name                      what                                                         flags
========================  ===========================================================  =========
fedavg                    accept all (spec §3.1)                                       nobody
mars / mars-star          MARS (norm selection) / MARS* (majority), paper mode         rejected
mars-official             MARS in the authors' code's mode                              rejected
multikrum                 Multi-Krum, f = 4 assumed attackers (§3.2)                   not kept
median / trimmed-mean     coordinate-wise median / trimmed mean (beta = 0.2)           nobody
flame                     FLAME, authors' variant (§3.4)                               outliers
foolsgold                 FoolsGold, history per client id (§3.5)                      w <= 0.5
rflbat                    RFLBAT (§3.3)                                                not kept
fedclp                    FedCLP channel pruning + FedAvg (§3.8)                       None
fldetector                FLDetector, window 10, permanent exclusion (§3.6)            excluded
deepsight                 DeepSight on random-noise probes (§3.7)                      rejected
========================  ===========================================================  =========

None of them needs real data at the server (DeepSight probes the models with random noise).
``DefenseOutput.detect_seconds`` is the wall time of the defense's whole call.
"""

from __future__ import annotations

from typing import Any

from mars_native.sim.defenses.base import Defense, DefenseOutput, RoundInput
from mars_native.sim.defenses.deepsight import DeepSight
from mars_native.sim.defenses.fedavg import FedAvg
from mars_native.sim.defenses.fedclp import FedCLP
from mars_native.sim.defenses.flame import Flame
from mars_native.sim.defenses.fldetector import FLDetector
from mars_native.sim.defenses.foolsgold import FoolsGold
from mars_native.sim.defenses.mars import MarsDefense, MarsOfficial, MarsStar
from mars_native.sim.defenses.rflbat import RFLBAT
from mars_native.sim.defenses.robust import Median, MultiKrum, TrimmedMean

DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        MarsDefense,
        MarsStar,
        MarsOfficial,
        MultiKrum,
        Median,
        TrimmedMean,
        Flame,
        FoolsGold,
        RFLBAT,
        FedCLP,
        FLDetector,
        DeepSight,
    )
}


def make_defense(name: str, **params: Any) -> Defense:
    """A new defense by registry name (see the module docstring), with its constructor's params."""
    try:
        cls = DEFENSES[name]
    except KeyError:
        raise ValueError(f"unknown defense {name!r}; choose one of {', '.join(DEFENSES)}") from None
    return cls(**params)


__all__ = [
    "DEFENSES",
    "RFLBAT",
    "DeepSight",
    "Defense",
    "DefenseOutput",
    "FLDetector",
    "FedAvg",
    "FedCLP",
    "Flame",
    "FoolsGold",
    "MarsDefense",
    "MarsOfficial",
    "MarsStar",
    "Median",
    "MultiKrum",
    "RoundInput",
    "TrimmedMean",
    "make_defense",
]
