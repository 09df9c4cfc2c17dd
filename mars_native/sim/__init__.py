"""The federated backdoor arena: attacks vs. defenses on real data, with metrics and plots.

Install with the ``sim`` extra and run ``mars-native simulate`` (see ``--help``), or from Python::

    from mars_native.sim import SimConfig, run_simulation
    cfg = SimConfig(rounds=10)
    result = run_simulation(cfg, "mra", "mars")      # registry names or Attack/Defense objects
    print(result.acc, result.asr, result.tpr, result.fpr, result.cad)

    from mars_native.sim import run_experiments       # every attack x defense of a config
    table = run_experiments(cfg, out_dir="mars-out")   # writes results.json/csv + PNGs

Pieces: :mod:`.config` (SimConfig), :mod:`.data` (FederatedData, Dirichlet split),
:mod:`.models` (DigitsCNN, model registry), :mod:`.training` (local training, ACC/ASR,
pretrained start), :mod:`.loop` (run_simulation), :mod:`.metrics` (TPR/FPR/CAD),
:mod:`.report` (results.json/csv, terminal table), :mod:`.plots`, :mod:`.sweep`,
:mod:`.attacks` and :mod:`.defenses` (registries).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DATASETS",
    "MODELS",
    "DigitsCNN",
    "FederatedData",
    "RunResult",
    "SimConfig",
    "run_experiments",
    "run_simulation",
    "run_sweep",
]

_LAZY = {
    "SimConfig": ("config", "SimConfig"),
    "FederatedData": ("data", "FederatedData"),
    "DATASETS": ("data", "DATASETS"),
    "DigitsCNN": ("models", "DigitsCNN"),
    "MODELS": ("models", "MODELS"),
    "run_simulation": ("loop", "run_simulation"),
    "RunResult": ("loop", "RunResult"),
    "run_experiments": ("report", "run_experiments"),
    "run_sweep": ("sweep", "run_sweep"),
}


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import torch
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
