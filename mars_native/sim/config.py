"""Every knob of a simulation run, in one dataclass.

:class:`SimConfig` holds the whole experiment: the data and its federated split, the model, the
benign and poisoned training recipes, the federated loop, the metrics and the run plan (which
attacks and defenses the CLI runs). Defaults follow the scaled-down digits setting of the spec
(``spec/attacks-and-baselines.md`` section 1.6); where the authors' code departs from the paper,
the paper is the default and the authors' behaviour is an option (``global_rule="official"``,
``attacker_protocol="shared"``, ``asr_rule="include-target"``).

A config can be read from TOML (:meth:`SimConfig.from_toml`); CLI flags override it. Attack and
defense parameters live in sub-tables keyed by name::

    rounds = 20
    attacks = ["mra", "3dfed"]
    defenses = ["fedavg", "mars"]

    [attack_params.mra]
    gamma = 5.0

    [defense_params.mars]
    kappa = 0.05
    epsilon = 0.03
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ASR_RULES",
    "ATTACKER_PROTOCOLS",
    "GLOBAL_RULES",
    "PRESETS",
    "PRETRAIN_MODES",
    "SimConfig",
]

GLOBAL_RULES = ("paper", "official")
ATTACKER_PROTOCOLS = ("independent", "shared")
ASR_RULES = ("exclude-target", "include-target")
PRETRAIN_MODES = ("fedavg", "central", "none")

#: Attacks and defenses of a SimConfig() (the spec's comparison, Table 2 of the paper).
DEFAULT_ATTACKS = ["mra", "cerp", "3dfed"]
DEFAULT_DEFENSES = ["fedavg", "mars", "mars-star", "multikrum", "flame", "foolsgold"]

#: Named starting points of the CLI (``--preset``). Fields not listed keep SimConfig's defaults
#: (the spec's scaled-down digits protocol, section 1.6).
PRESETS: dict[str, dict] = {
    # what `mars-native simulate` runs with no arguments: the three published attacks against
    # MARS and the undefended FedAvg, 3 attack rounds after the protocol's 30 clean rounds; sized
    # to finish in a few minutes on 2 CPU cores (see the CLI help). Same data, model and
    # training as the protocol.
    "default": {
        "attacks": ["mra", "cerp", "3dfed"],
        "defenses": ["fedavg", "mars"],
        "rounds": 3,
    },
    # the full scaled-down protocol of the spec: every attack and defense, 20 attack rounds
    "paper": {
        "attacks": ["none", "mra", "cerp", "3dfed", "adaptive"],
        "defenses": ["fedavg", "mars", "mars-star", "mars-official", "multikrum", "median",
                     "trimmed-mean", "flame", "foolsgold", "rflbat", "fedclp", "fldetector",
                     "deepsight"],
    },
    # a smoke test (seconds): tiny model, few clients and rounds. Numbers are not meaningful.
    "quick": {
        "attacks": ["mra"],
        "defenses": ["fedavg", "mars"],
        "num_clients": 8,
        "num_attackers": 2,
        "model_widths": [8, 16, 32],
        "fc_width": 32,
        "pretrain_rounds": 2,
        "rounds": 2,
        "local_epochs": 1,
        "attacker_epochs": 2,
    },
}


@dataclass
class SimConfig:
    """One simulation experiment. All fields are plain JSON/TOML values."""

    # -- run plan (used by the CLI; run_simulation takes one attack and one defense) --------
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    defenses: list[str] = field(default_factory=lambda: list(DEFAULT_DEFENSES))
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    defense_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- data -------------------------------------------------------------------------------
    dataset: str = "digits"  # key of mars_native.sim.data.DATASETS
    test_size: float = 0.25  # stratified train/test split of the bundled datasets
    num_clients: int = 20
    num_attackers: int = 4  # attackers are client ids 0 .. num_attackers-1
    alpha: float = 0.9  # Dirichlet concentration of the non-IID split
    min_samples: int = 8  # redraw the split until every client has at least this many

    # -- model ------------------------------------------------------------------------------
    model: str = "digits-cnn"  # key of mars_native.sim.models.MODELS
    model_widths: list[int] = field(default_factory=lambda: [64, 128, 256])  # conv widths
    fc_width: int = 128  # hidden width of fc1

    # -- federated loop ---------------------------------------------------------------------
    per_round: int = 0  # participants per round; 0 = every client every round
    rounds: int = 20  # attack window (rounds after pretraining)
    server_lr: float = 1.0  # eta of the global rule
    global_rule: str = "paper"  # "paper": theta += eta*mean(accepted deltas);
    #                             "official": theta += eta/N * sum(accepted deltas)
    shuffle_uploads: bool = True  # random upload order each round (no positional leaks)

    # -- pretraining (the paper's pretrained-start convention) ------------------------------
    pretrain: str = "fedavg"  # "fedavg": benign FedAvg rounds over all clients; "central":
    #                           centralised SGD epochs on the union of the clients' data; "none"
    pretrain_rounds: int = 30  # FedAvg rounds (pretrain="fedavg")
    pretrain_epochs: int = 10  # epochs (pretrain="central")

    # -- benign local training --------------------------------------------------------------
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4

    # -- attackers ---------------------------------------------------------------------------
    attacker_epochs: int = 15
    attacker_lr: float = 0.03
    poison_fraction: float = 0.5
    target_label: int = 8
    attacker_protocol: str = "independent"  # "shared" = authors' code: the lead trains, others copy

    # -- metrics -----------------------------------------------------------------------------
    asr_rule: str = "exclude-target"  # "include-target" = authors' code (target class counted)
    record_energy: bool = False  # store every upload's CBE per round (diagnostics, energy plots)
    energy_kappa: float = 0.05  # kappa of the recorded CBE

    # -- reproducibility / execution ----------------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch threads per run (0 = min(cpu count, 4)); the thread count can
    #                   change the last bits of a result, so it is part of the experiment
    jobs: int = 0  # runs in parallel worker processes; 0 = one per core in the CLI (the Python
    #                API runs sequentially unless asked); results do not depend on it
    deterministic: bool = True  # torch.use_deterministic_algorithms on non-CPU devices

    # ---------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"SimConfig.{name} = {getattr(self, name)!r}: {why}")

        if self.num_clients < 1:
            bad("num_clients", "need at least one client")
        if not 0 <= self.num_attackers <= self.num_clients:
            bad("num_attackers", f"must be in [0, num_clients={self.num_clients}]")
        if self.per_round < 0 or self.per_round > self.num_clients:
            bad("per_round", f"must be 0 (all) or in [1, num_clients={self.num_clients}]")
        if self.alpha <= 0:
            bad("alpha", "Dirichlet alpha must be > 0")
        if self.rounds < 0:
            bad("rounds", "must be >= 0")
        if self.global_rule not in GLOBAL_RULES:
            bad("global_rule", f"one of {GLOBAL_RULES}")
        if self.attacker_protocol not in ATTACKER_PROTOCOLS:
            bad("attacker_protocol", f"one of {ATTACKER_PROTOCOLS}")
        if self.asr_rule not in ASR_RULES:
            bad("asr_rule", f"one of {ASR_RULES}")
        if self.pretrain not in PRETRAIN_MODES:
            bad("pretrain", f"one of {PRETRAIN_MODES}")
        if not 0.0 <= self.poison_fraction <= 1.0:
            bad("poison_fraction", "must be in [0, 1]")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if not 0.0 < self.test_size < 1.0:
            bad("test_size", "must be in (0, 1)")
        if self.threads < 0:
            bad("threads", "must be >= 0 (0 = automatic)")
        if self.jobs < 0:
            bad("jobs", "must be >= 0 (0 = one per core)")
        self._validate_components()

    def _validate_components(self) -> None:
        """Unknown attack/defense names and parameters fail here, not after pretraining: every
        entry of ``attack_params``/``defense_params`` is built once with its constructor."""
        from mars_native.sim.attacks import ATTACKS, make_attack
        from mars_native.sim.defenses import DEFENSES, make_defense

        for field_name, names, known, norm in (("attacks", self.attacks, ATTACKS, str.lower),
                                               ("defenses", self.defenses, DEFENSES, str)):
            unknown = [n for n in names if norm(str(n)) not in known]
            if unknown:
                raise ValueError(f"SimConfig.{field_name}: unknown {unknown}; known: {sorted(known)}")
        for field_name, params, make in (("attack_params", self.attack_params, make_attack),
                                         ("defense_params", self.defense_params, make_defense)):
            for name, kwargs in params.items():
                if not isinstance(kwargs, dict):
                    raise ValueError(f"SimConfig.{field_name}[{name!r}] must be a table of "  # noqa: TRY004 (validate: ValueError per field)
                                     f"parameters, got {kwargs!r}")
                try:
                    make(name, **kwargs)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"SimConfig.{field_name}[{name!r}] = {kwargs!r}: {exc}") from None

    # -- derived -------------------------------------------------------------------------------
    @property
    def attacker_ids(self) -> list[int]:
        return list(range(self.num_attackers))

    @property
    def participants_per_round(self) -> int:
        return self.num_clients if self.per_round == 0 else self.per_round

    def resolved_threads(self) -> int:
        return self.threads if self.threads > 0 else max(1, min(os.cpu_count() or 1, 4))

    def resolved_jobs(self, n_runs: int) -> int:
        """Parallel worker processes for ``n_runs`` runs (at most one per core)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        jobs = self.jobs if self.jobs > 0 else cores
        return max(1, min(jobs, n_runs))

    def params_for_attack(self, name: str) -> dict[str, Any]:
        return dict(self.attack_params.get(name, {}))

    def params_for_defense(self, name: str) -> dict[str, Any]:
        return dict(self.defense_params.get(name, {}))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SimConfig:
        """A config from a named preset (:data:`PRESETS`), with ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        data = json.loads(json.dumps(PRESETS[name]))
        data.update(overrides)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (deep copy)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        """Build from a dict; unknown keys raise ``ValueError`` (typos should not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SimConfig keys: {unknown}; known keys: {sorted(names)}")
        kwargs = dict(data)
        for key in ("attacks", "defenses", "model_widths"):
            if key in kwargs and isinstance(kwargs[key], (str, int)):
                kwargs[key] = [kwargs[key]]
            if key in kwargs:
                kwargs[key] = list(kwargs[key])
        for key in ("attack_params", "defense_params"):
            if key in kwargs:
                kwargs[key] = {str(k): dict(v) for k, v in kwargs[key].items()}
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SimConfig:
        """Read a TOML file whose top-level keys are field names (see the module docstring)."""
        try:
            import tomllib  # Python >= 3.11
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        return cls.from_dict(data)

    def to_toml(self) -> str:
        """TOML text that :meth:`from_toml` reads back to an equal config."""
        scalars, tables = [], []
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                for sub, params in value.items():
                    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in params.items()]
                    tables.append(f"[{key}.{_toml_key(sub)}]\n" + "\n".join(lines))
            else:
                scalars.append(f"{key} = {_toml_value(value)}")
        return "\n".join(scalars) + "\n\n" + "\n\n".join(tables) + ("\n" if tables else "")

    def save_toml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_toml())


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return {"nan": "nan", "inf": "inf", "-inf": "-inf"}[repr(value)]
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        raise ValueError("TOML has no null: leave the key out instead of setting it to None")
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
