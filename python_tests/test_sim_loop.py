"""The federated loop: global rules, sampling, ground-truth metrics, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _sim_helpers import (
    NoFlagDefense,
    OracleDefense,
    PatternPoison,
    StubFedAvg,
    small_data,
    tiny_config,
)

from mars_native.sim.attacks.base import Attack
from mars_native.sim.defenses.base import DefenseOutput
from mars_native.sim.loop import apply_global_rule, is_honest, run_simulation, sample_participants


def _state(v, nbt=5):
    return {"w": torch.full((2, 2), float(v)), "bn.num_batches_tracked": torch.tensor(nbt)}


def test_global_rule_paper_is_the_mean_of_accepted_models():
    theta = _state(1.0)
    # two accepted clients at 3 and 5 -> deltas 2 and 4, sum 6, weight 2 -> mean model 4
    out = DefenseOutput(update_sum={"w": torch.full((2, 2), 6.0)}, weight_total=2.0,
                        flagged=np.array([False, False, True]))
    new = apply_global_rule(theta, out, "paper", 1.0, num_clients_total=10)
    assert torch.allclose(new["w"], torch.full((2, 2), 4.0))
    new = apply_global_rule(theta, out, "paper", 0.5, num_clients_total=10)
    assert torch.allclose(new["w"], torch.full((2, 2), 2.5))  # 1 + 0.5 * 3
    assert new["bn.num_batches_tracked"].item() == 5  # integer buffers keep the global value
    assert new["w"].dtype == torch.float32
    theta["w"] += 100  # the result does not alias theta
    assert torch.allclose(new["w"], torch.full((2, 2), 2.5))


def test_global_rule_official_divides_by_all_clients():
    theta = _state(1.0)
    out = DefenseOutput(update_sum={"w": torch.full((2, 2), 6.0)}, weight_total=2.0,
                        flagged=None)
    new = apply_global_rule(theta, out, "official", 1.0, num_clients_total=10)
    assert torch.allclose(new["w"], torch.full((2, 2), 1.6))  # 1 + 6 / 10
    new = apply_global_rule(theta, out, "official", 0.8, num_clients_total=4)
    assert torch.allclose(new["w"], torch.full((2, 2), 2.2))  # 1 + 0.8 * 6 / 4


def test_global_rule_nothing_accepted_and_reset():
    theta = _state(1.0)
    none = DefenseOutput(update_sum={"w": torch.zeros(2, 2)}, weight_total=0.0,
                         flagged=np.array([True]))
    assert torch.equal(apply_global_rule(theta, none, "paper", 1.0, 5)["w"], theta["w"])
    reset = DefenseOutput(update_sum={"w": torch.zeros(2, 2)}, weight_total=0.0,
                          flagged=np.array([True]), reset_state=_state(-7.0, nbt=1))
    new = apply_global_rule(theta, reset, "paper", 1.0, 5)
    assert torch.equal(new["w"], torch.full((2, 2), -7.0))
    assert new["bn.num_batches_tracked"].item() == 1
    reset.update_sum, reset.weight_total = {"w": torch.ones(2, 2)}, 1.0
    assert torch.equal(apply_global_rule(theta, reset, "paper", 1.0, 5)["w"],
                       torch.full((2, 2), -6.0))
    bad = DefenseOutput(update_sum={"w": torch.zeros(3)}, weight_total=1.0, flagged=None)
    with pytest.raises(ValueError, match="shape"):
        apply_global_rule(theta, bad, "paper", 1.0, 5)
    with pytest.raises(ValueError):
        apply_global_rule(theta, bad, "mean", 1.0, 5)


def test_sampling_all_and_sampled_with_guaranteed_attackers():
    cfg = tiny_config(num_clients=20, num_attackers=4)
    ids = sample_participants(cfg, 0)
    assert sorted(ids) == list(range(20))
    assert ids != list(range(20))  # shuffled upload order
    assert sample_participants(cfg, 0) == ids  # deterministic
    assert sample_participants(cfg.replace(shuffle_uploads=False), 0) == list(range(20))
    s = cfg.replace(num_clients=40, num_attackers=8, per_round=8)
    seen = set()
    for r in range(20):
        ids = sample_participants(s, r)
        assert len(ids) == 8 == len(set(ids))
        assert sum(i < 8 for i in ids) == 2  # round(8 * 8 / 40)
        seen |= set(ids)
    assert len(seen) > 20  # different rounds sample different clients
    few = cfg.replace(num_clients=20, num_attackers=1, per_round=5)
    assert all(sum(i < 1 for i in sample_participants(few, r)) == 1 for r in range(5))
    zero = cfg.replace(num_attackers=0, per_round=5)
    assert all(len(sample_participants(zero, r)) == 5 for r in range(3))


def test_is_honest():
    assert is_honest(Attack())
    assert not is_honest(PatternPoison())


@pytest.fixture(scope="module")
def data():
    return small_data()


def test_oracle_defense_gives_perfect_ground_truth_metrics(data):
    cfg = tiny_config()
    res = run_simulation(cfg, PatternPoison(scale=3.0), OracleDefense(cfg.num_attackers),
                         data=data)
    assert len(res.rounds) == cfg.rounds
    for rec in res.rounds:
        assert rec["tpr"] == 1.0 and rec["fpr"] == 0.0
        assert rec["n_attackers"] == 2 and rec["n_uploads"] == 6
        assert sorted(rec["flagged_ids"]) == [0, 1] == sorted(rec["attacker_ids"])
        assert rec["info"] == {"kept": 4}  # nested lists are dropped from the records
        assert 0.0 <= rec["acc"] <= 1.0 and 0.0 <= rec["asr"] <= 1.0
    assert res.tpr == 1.0 and res.fpr == 0.0
    assert res.cad == pytest.approx((res.acc + 1 - res.asr + 2) / 4)
    row = res.row()
    for key in ("attack", "defense", "acc", "asr", "tpr", "fpr", "cad", "rounds"):
        assert key in row


def test_fedavg_is_backdoored_and_flags_nobody(data):
    cfg = tiny_config(pretrain_rounds=3, rounds=2, attacker_epochs=4)
    res = run_simulation(cfg, PatternPoison(scale=3.0), StubFedAvg(), data=data)
    assert res.tpr == 0.0 and res.fpr == 0.0
    clean = run_simulation(cfg, PatternPoison(scale=3.0), OracleDefense(2), data=data)
    assert res.asr > clean.asr  # the scaled poisoned updates get through plain averaging


def test_no_flag_defense_has_two_term_cad(data):
    res = run_simulation(tiny_config(rounds=1), PatternPoison(), NoFlagDefense(), data=data)
    assert res.tpr is None and res.fpr is None and res.rounds[0]["flagged_ids"] is None
    assert res.cad == pytest.approx((res.acc + 1 - res.asr) / 2)


def test_honest_attack_counts_everyone_as_benign(data):
    res = run_simulation(tiny_config(rounds=1), Attack(), OracleDefense(2), data=data)
    rec = res.rounds[0]
    assert rec["n_attackers"] == 0 and rec["tpr"] == 1.0
    assert rec["fpr"] == pytest.approx(2 / 6)  # the oracle wrongly flags ids 0, 1


def test_same_seed_same_records_other_seed_differs(data):
    cfg = tiny_config(rounds=2)

    def strip(res):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in res.rounds]

    a = run_simulation(cfg, PatternPoison(2.0), StubFedAvg(), data=data, keep_state=True)
    b = run_simulation(cfg, PatternPoison(2.0), StubFedAvg(), data=data, keep_state=True)
    assert strip(a) == strip(b) and a.start == b.start
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    c = run_simulation(cfg.replace(seed=1), PatternPoison(2.0), StubFedAvg(), data=data,
                       keep_state=True)
    assert any(not torch.equal(a.final_state[k], c.final_state[k]) for k in a.final_state
               if torch.is_floating_point(a.final_state[k]))


def test_loop_calls_attack_hooks_and_restores_global_settings(data):
    threads = torch.get_num_threads()
    before = torch.random.get_rng_state()
    atk = PatternPoison()
    events = []
    defense = OracleDefense(2)
    run_simulation(tiny_config(rounds=3, threads=1), atk, defense, data=data,
                   progress=events.append)
    assert atk.rounds_seen == [0, 1, 2] and defense.calls == 3
    rounds = [e for e in events if e["phase"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2, 3] and "acc" in rounds[0]
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), before)


def test_registry_names_and_user_model(data):
    pytest.importorskip("mars_native.sim.defenses")
    from mars_native.sim.models import DigitsCNN

    cfg = tiny_config(rounds=1)
    res = run_simulation(cfg, "mra", "mars", data=data,
                         make_model=lambda: DigitsCNN(widths=(8, 8, 16), fc_width=8))
    assert res.attack == "mra" and res.defense == "mars"
    assert res.defense_config.get("kappa") == 0.05
    with pytest.raises(ValueError, match="unknown"):
        run_simulation(cfg, "nope", "mars", data=data)
