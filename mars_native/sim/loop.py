"""The federated round loop of the arena: one attack against one defense.

:func:`run_simulation` runs the attack window of one (attack, defense) pair from the pretrained
start and returns a :class:`RunResult` with per-round records. Per round ``r``:

1. sample the participants (every client by default; with ``per_round = P < N`` a random subset
   with ``max(1, round(P * A / N))`` attackers guaranteed) and shuffle the upload order;
2. ``attack.begin_round(ctx)``; every benign participant trains ``local_epochs`` from theta with
   its own seeded generator; every sampled attacker calls ``attack.train_attacker(ctx, id)`` (in
   id order); ``attack.finalize_uploads(ctx, uploads)``;
3. the defense aggregates (:class:`~mars_native.sim.defenses.base.RoundInput` ->
   :class:`~mars_native.sim.defenses.base.DefenseOutput`) and the loop applies the global rule
   (:func:`apply_global_rule`);
4. ACC and ASR of the new global model; TPR/FPR of the defense's flags against the uploads'
   ground truth; ``attack.end_round(ctx, new_state)``.

Every random choice comes from a generator derived from ``config.seed`` and the round (and the
client), so the same config gives the same records, and the benign clients of the first round
train identically under every defense.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .attacks.base import Attack, RoundContext, Upload
from .config import SimConfig
from .data import FederatedData, load_dataset
from .defenses.base import Defense, DefenseOutput, RoundInput
from .metrics import detection_rates, energy_terms, summarize_rounds, upload_cbe
from .models import final_layer_name, model_factory
from .training import (
    Trainer,
    client_split,
    derive_seed,
    pretrained_state,
    torch_generator,
)

__all__ = [
    "RunResult",
    "apply_global_rule",
    "asr_stamp",
    "is_honest",
    "prepare_start",
    "resolve_attack",
    "resolve_defense",
    "run_simulation",
    "sample_participants",
    "torch_settings",
]

StateDict = dict


@dataclass
class RunResult:
    """One (attack, defense) run: summary metrics, per-round records and the final state."""

    attack: str
    defense: str
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    start: dict[str, Any]  # ACC/ASR of the pretrained start
    config: dict[str, Any]
    attack_config: dict[str, Any] = field(default_factory=dict)
    defense_config: dict[str, Any] = field(default_factory=dict)
    needs_server_data: bool = False
    flags_clients: bool = True
    wall_seconds: float = 0.0
    final_state: StateDict | None = None

    def __getattr__(self, name: str) -> Any:  # result.acc, result.cad, ...
        summary = self.__dict__.get("summary")
        if summary is not None and name in summary:
            return summary[name]
        raise AttributeError(name)

    def row(self, with_rounds: bool = True) -> dict[str, Any]:
        """The results.json row (DESIGN.md layout plus extra fields)."""
        cfg = self.config
        row = {
            "attack": self.attack,
            "defense": self.defense,
            **{k: self.summary[k] for k in ("acc", "asr", "tpr", "fpr", "cad")},
            "acc_mean": self.summary["acc_mean"],
            "asr_mean": self.summary["asr_mean"],
            "cad_mean": self.summary["cad_mean"],
            "acc_start": self.start.get("acc"),
            "asr_start": self.start.get("asr"),
            "detect_seconds": self.summary["detect_seconds"],
            "wall_seconds": self.wall_seconds,
            "num_clients": cfg["num_clients"],
            "num_attackers": cfg["num_attackers"],
            "rounds_run": len(self.rounds),
            "asr_rule": cfg["asr_rule"],
            "global_rule": cfg["global_rule"],
            "attacker_protocol": cfg["attacker_protocol"],
            "needs_server_data": self.needs_server_data,
            "flags_clients": self.flags_clients,
            "attack_params": self.attack_config,
            "defense_params": self.defense_config,
        }
        if with_rounds:
            row["rounds"] = self.rounds
        return row


# -- registries ---------------------------------------------------------------------------------
def resolve_attack(attack: Attack | str, config: SimConfig) -> Attack:
    if isinstance(attack, Attack):
        return attack
    from . import attacks as attacks_mod

    make = getattr(attacks_mod, "make_attack", None)
    if make is None:
        raise RuntimeError("mars_native.sim.attacks has no make_attack registry yet")
    return make(attack, **config.params_for_attack(attack))


def resolve_defense(defense: Defense | str, config: SimConfig) -> Defense:
    if isinstance(defense, Defense):
        return defense
    from . import defenses as defenses_mod

    make = getattr(defenses_mod, "make_defense", None)
    if make is None:
        raise RuntimeError("mars_native.sim.defenses has no make_defense registry yet")
    return make(defense, **config.params_for_defense(defense))


# -- global rule ---------------------------------------------------------------------------------
def apply_global_rule(
    theta: StateDict,
    out: DefenseOutput,
    rule: str,
    server_lr: float,
    num_clients_total: int,
) -> StateDict:
    """The new global state from a defense's output.

    base = ``out.reset_state`` if given, else theta. For every float key:
    ``"paper"``: base + server_lr * update_sum / weight_total (base itself when weight_total <= 0);
    ``"official"``: base + server_lr / num_clients_total * update_sum.
    Integer buffers (``num_batches_tracked``) keep the base value; a float key missing from
    ``update_sum`` is a zero update. fp64 arithmetic, result in each entry's dtype.
    """
    if rule not in ("paper", "official"):
        raise ValueError(f"unknown global rule {rule!r}")
    base = out.reset_state if out.reset_state is not None else theta
    if rule == "paper":
        step = server_lr / out.weight_total if out.weight_total > 0 else 0.0
    else:
        step = server_lr / num_clients_total
    new = {}
    for key, value in base.items():
        upd = out.update_sum.get(key) if out.update_sum is not None else None
        if not torch.is_floating_point(value) or upd is None or step == 0.0:
            new[key] = value.detach().clone()
            continue
        upd = torch.as_tensor(upd)
        if upd.shape != value.shape:
            raise ValueError(f"update_sum[{key!r}] has shape {tuple(upd.shape)}, "
                             f"the global state {tuple(value.shape)}")
        new[key] = (value.detach().to(torch.float64) + step * upd.detach().to(
            device=value.device, dtype=torch.float64)).to(value.dtype)
    return new


# -- sampling -------------------------------------------------------------------------------------
def sample_participants(config: SimConfig, round_idx: int) -> list[int]:
    """Participant ids of a round, in upload order.

    ``per_round == 0``: every client. Else ``max(1, round(P*A/N))`` attackers (at most A, and at
    least enough to fill P when benign clients run short) plus benign clients, without
    replacement. The order is shuffled when ``config.shuffle_uploads``.
    """
    rng = np.random.default_rng(derive_seed(config.seed, "sample", round_idx))
    n, a = config.num_clients, config.num_attackers
    attackers, benign = list(range(a)), list(range(a, n))
    if config.per_round == 0 or config.per_round >= n:
        ids = list(range(n))
    else:
        p = config.per_round
        n_att = 0 if a == 0 else min(a, max(1, round(p * a / n)))
        n_att = max(n_att, p - len(benign))
        chosen = list(rng.choice(attackers, size=n_att, replace=False)) if n_att else []
        chosen += list(rng.choice(benign, size=p - n_att, replace=False)) if p > n_att else []
        ids = sorted(int(i) for i in chosen)
    if config.shuffle_uploads:
        ids = [ids[i] for i in rng.permutation(len(ids))]
    return ids


# -- execution settings ----------------------------------------------------------------------------
@contextlib.contextmanager
def torch_settings(config: SimConfig, seed_key: str = "global"):
    """Threads, deterministic algorithms and seeded global RNGs (torch, NumPy, random) for the
    duration of a run; everything is restored afterwards.

    torch's CPU kernels are deterministic for a fixed thread count, so
    ``torch.use_deterministic_algorithms`` (whose first call imports torch's compiler stack,
    seconds) is only switched on for other devices when ``config.deterministic``.
    """
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    want_det = bool(config.deterministic) and torch.device(config.device).type != "cpu"
    np_state = np.random.get_state()
    py_state = random.getstate()
    base = derive_seed(config.seed, seed_key)
    try:
        torch.set_num_threads(config.resolved_threads())
        if want_det != det:
            torch.use_deterministic_algorithms(want_det)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base)
            np.random.seed(base % (2**32))
            random.seed(base)
            yield
    finally:
        torch.set_num_threads(threads)
        if want_det != det:
            torch.use_deterministic_algorithms(det)
        np.random.set_state(np_state)
        random.setstate(py_state)


# -- the loop ------------------------------------------------------------------------------------
def _compact_info(info: Any, max_list: int = 64) -> Any:
    """JSON-friendly subset of a defense's info: scalars, strings, short flat lists, dicts."""
    if isinstance(info, dict):
        out = {}
        for k, v in info.items():
            c = _compact_info(v, max_list)
            if c is not _DROP:
                out[str(k)] = c
        return out
    if isinstance(info, (bool, int, str)) or info is None:
        return info
    if isinstance(info, float):
        return info if math.isfinite(info) else None
    if isinstance(info, (np.integer, np.floating, np.bool_)):
        return _compact_info(info.item(), max_list)
    if isinstance(info, np.ndarray):
        info = info.tolist()
    if isinstance(info, (list, tuple)):
        if len(info) <= max_list and all(
            isinstance(v, (bool, int, float, str, np.integer, np.floating)) or v is None
            for v in info
        ):
            return [_compact_info(v, max_list) for v in info]
        return _DROP
    return _DROP


_DROP = object()


def run_simulation(
    config: SimConfig,
    attack: Attack | str,
    defense: Defense | str,
    *,
    data: FederatedData | None = None,
    make_model: Callable[[], nn.Module] | None = None,
    progress: Callable[[dict], None] | None = None,
    cache_dir: str | None = None,
    keep_state: bool = False,
) -> RunResult:
    """Run the attack window of one attack against one defense.

    Args:
        config: the experiment (:class:`SimConfig`).
        attack, defense: objects, or registry names (built with the config's params).
        data: a :class:`FederatedData` (default: ``config.dataset``).
        make_model: zero-argument model factory (default: ``config.model`` from the registry).
        progress: called with event dicts (``{"phase": "pretrain"|"round", "round", "total",
            ...}``; round events carry ``acc``/``asr``/``tpr``/``fpr``).
        cache_dir: directory of the on-disk pretrained-start cache (optional).
        keep_state: keep the final global state in the result.
    """
    t_start = time.perf_counter()
    attack_name = attack if isinstance(attack, str) else getattr(attack, "name", "attack")
    defense_name = defense if isinstance(defense, str) else getattr(defense, "name", "defense")
    attack = resolve_attack(attack, config)
    defense = resolve_defense(defense, config)
    model_id = _model_id(make_model)
    data = data if data is not None else load_dataset(config)
    make_model = make_model if make_model is not None else model_factory(config, data)

    with torch_settings(config):
        trainer = Trainer(config, data, make_model)
        final_layer = final_layer_name(trainer.model)
        split = client_split(config, data)
        theta = pretrained_state(config, data, trainer, split, cache_dir=cache_dir,
                                 model_id=model_id, progress=progress)

        attack.setup(config, data.input_shape, data.normalize)
        defense.reset()
        stamp = asr_stamp(attack, data)
        start_eval = trainer.evaluate(theta, stamp)
        start = {"acc": start_eval.acc, "asr": start_eval.asr}

        # an attack that keeps the base class's benign behaviour ("none") has honest "attackers":
        # they are counted as benign clients (a no-attack run measures false positives only)
        attackers = set() if is_honest(attack) else set(config.attacker_ids)
        client_x = [data.train_x[idx] for idx in split]
        client_y = [data.train_y[idx] for idx in split]

        def client_data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
            return client_x[cid], client_y[cid]

        records: list[dict[str, Any]] = []
        for r in range(config.rounds):
            records.append(_run_round(
                r, config, theta, attack, defense, trainer, data, make_model, final_layer,
                attackers, client_data, split, stamp,
            ))
            theta = records[-1].pop("_new_state")
            if progress is not None:
                rec = records[-1]
                progress({"phase": "round", "round": r + 1, "total": config.rounds,
                          "attack": attack_name, "defense": defense_name, "acc": rec["acc"],
                          "asr": rec["asr"], "tpr": rec["tpr"], "fpr": rec["fpr"]})

    summary = summarize_rounds(records)
    if not records:
        summary.update(acc=start["acc"], asr=start["asr"])
    return RunResult(
        attack=attack_name,
        defense=defense_name,
        summary=summary,
        rounds=records,
        start=start,
        config=config.to_dict(),
        attack_config=_compact_info(_call_config(attack)),
        defense_config=_compact_info(defense.config()),
        needs_server_data=bool(getattr(defense, "needs_server_data", False)),
        flags_clients=bool(getattr(defense, "flags_clients", True)),
        wall_seconds=time.perf_counter() - t_start,
        final_state=theta if keep_state else None,
    )


_MODEL_REFS: dict[str, Any] = {}


def _model_id(make_model) -> str | None:
    """Identity of a user model factory for the in-memory pretraining cache (the factory is
    kept alive so that its id cannot be reused by another object)."""
    if make_model is None:
        return None
    key = f"user-{id(make_model)}"
    _MODEL_REFS[key] = make_model
    return key


def prepare_start(
    config: SimConfig,
    *,
    data: FederatedData | None = None,
    make_model: Callable[[], nn.Module] | None = None,
    cache_dir: str | None = None,
    progress: Callable[[dict], None] | None = None,
    executor=None,
    n_workers: int = 1,
) -> StateDict:
    """Compute (or load) the pretrained start of ``config`` and fill the caches, so that later
    runs (in this process, or in workers sharing ``cache_dir``) only load it. A process pool
    ``executor`` trains each pretraining round's clients in ``n_workers`` parallel chunks."""
    model_id = _model_id(make_model)
    data = data if data is not None else load_dataset(config)
    make_model = make_model if make_model is not None else model_factory(config, data)
    with torch_settings(config):
        trainer = Trainer(config, data, make_model)
        split = client_split(config, data)
        return pretrained_state(config, data, trainer, split, cache_dir=cache_dir,
                                model_id=model_id, progress=progress, executor=executor,
                                n_workers=n_workers)


def _call_config(attack: Attack) -> dict:
    cfg = getattr(attack, "config", None)
    if callable(cfg):
        try:
            out = cfg()
            return out if isinstance(out, dict) else {}
        except TypeError:
            return {}
    return {}


def is_honest(attack: Attack) -> bool:
    """True when the attack neither trains attackers differently nor edits uploads ("none")."""
    cls = type(attack)
    return (cls.train_attacker is Attack.train_attacker
            and cls.finalize_uploads is Attack.finalize_uploads)


def asr_stamp(attack: Attack, data: FederatedData) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trigger stamped on test images for the ASR: the attack's ``stamp_test``, or, for an
    attack that keeps the base class's identity stamp (``"none"``), the default pattern trigger,
    so a no-attack run reports the clean model's ASR under the usual trigger."""
    if type(attack).stamp_test is not Attack.stamp_test:
        return attack.stamp_test
    from .triggers import PatternTrigger

    return PatternTrigger().setup(data.input_shape, data.normalize).stamp


def _run_round(r, config, theta, attack, defense, trainer, data, make_model, final_layer,
               attackers, client_data, split, stamp) -> dict[str, Any]:
    seed = config.seed
    sampled = sample_participants(config, r)
    sampled_attackers = sorted(c for c in sampled if c in attackers)
    gen_attack = torch_generator(derive_seed(seed, "attack", r))
    ctx = RoundContext(
        round_idx=r,
        global_state=theta,
        sampled_ids=list(sampled),
        attacker_ids=sampled_attackers,
        all_attacker_ids=sorted(attackers),
        num_clients=config.num_clients,
        config=config,
        make_model=make_model,
        client_data=client_data,
        train_benign=lambda state, x, y: trainer.train(state, x, y, generator=gen_attack),
        generator=gen_attack,
        rng=np.random.default_rng(derive_seed(seed, "attack-np", r)),
        extras={"data": data, "final_layer": final_layer, "trainer": trainer,
                "num_classes": data.num_classes, "input_shape": data.input_shape,
                "client_sizes": [len(s) for s in split]},
    )
    t0 = time.perf_counter()
    attack.begin_round(ctx)
    states: dict[int, StateDict] = {}
    for cid in sampled:
        if cid not in attackers:
            x, y = client_data(cid)
            gen = torch_generator(derive_seed(seed, "client", r, cid))
            states[cid] = trainer.train(theta, x, y, generator=gen)
    for cid in sampled_attackers:
        states[cid] = attack.train_attacker(ctx, cid)
    uploads = [Upload(client_id=cid, state=states[cid], num_examples=len(split[cid]),
                      is_attacker=cid in attackers) for cid in sampled]
    uploads = attack.finalize_uploads(ctx, uploads)
    train_seconds = time.perf_counter() - t0

    rin = RoundInput(
        global_state=theta,
        client_states=[u.state for u in uploads],
        client_ids=[u.client_id for u in uploads],
        num_examples=[u.num_examples for u in uploads],
        round_idx=r,
        num_clients_total=config.num_clients,
        make_model=make_model,
        input_shape=tuple(data.input_shape),
        num_classes=data.num_classes,
        final_layer=final_layer,
        rng=np.random.default_rng(derive_seed(seed, "defense-np", r)),
        generator=torch_generator(derive_seed(seed, "defense", r)),
    )
    t1 = time.perf_counter()
    out = defense(rin)
    defense_seconds = time.perf_counter() - t1
    flagged = None if out.flagged is None else np.asarray(out.flagged, dtype=bool).reshape(-1)
    if flagged is not None and flagged.size != len(uploads):
        raise ValueError(f"defense {defense.name!r} flagged {flagged.size} entries for "
                         f"{len(uploads)} uploads")
    new_theta = apply_global_rule(theta, out, config.global_rule, config.server_lr,
                                  config.num_clients)
    ev = trainer.evaluate(new_theta, stamp)
    is_att = [bool(u.is_attacker) for u in uploads]
    tpr, fpr = detection_rates(flagged, is_att)
    attack.end_round(ctx, new_theta)

    record: dict[str, Any] = {
        "round": r + 1,
        "acc": ev.acc,
        "asr": ev.asr,
        "tpr": tpr,
        "fpr": fpr,
        "n_uploads": len(uploads),
        "n_attackers": int(sum(is_att)),
        "n_decoys": int(sum(bool(u.is_decoy) for u in uploads)),
        "upload_ids": [int(u.client_id) for u in uploads],
        "attacker_ids": [int(u.client_id) for u in uploads if u.is_attacker],
        "flagged_ids": None if flagged is None else [
            int(u.client_id) for u, f in zip(uploads, flagged) if f],
        "weight_total": float(out.weight_total),
        "reset": out.reset_state is not None,
        "detect_seconds": float(out.detect_seconds) if out.detect_seconds else defense_seconds,
        "defense_seconds": defense_seconds,
        "train_seconds": train_seconds,
        "info": _compact_info(out.info or {}),
        "attack_info": _compact_info(getattr(attack, "last_info", None) or {}),
        "_new_state": new_theta,
    }
    if config.record_energy:
        record["cbe"] = [upload_cbe(u.state, config.energy_kappa, reference=theta).tolist()
                         for u in uploads]
        record["upload_is_attacker"] = is_att
        record["energy_terms"] = [energy_terms(u.state, config.energy_kappa, reference=theta)
                                  for u in uploads]
    return record
