"""SimConfig: defaults, validation, presets and the TOML round trip."""

from __future__ import annotations

import pytest

from mars_native.sim.config import PRESETS, SimConfig


def test_defaults_follow_the_spec_digits_setting():
    c = SimConfig()
    assert (c.num_clients, c.num_attackers, c.alpha, c.min_samples) == (20, 4, 0.9, 8)
    assert (c.pretrain_rounds, c.rounds, c.local_epochs, c.batch_size) == (30, 20, 2, 16)
    assert (c.lr, c.momentum, c.weight_decay) == (0.05, 0.9, 5e-4)
    assert (c.attacker_epochs, c.attacker_lr, c.poison_fraction, c.target_label) == (
        15, 0.03, 0.5, 8)
    assert c.model_widths == [64, 128, 256]
    assert (c.global_rule, c.attacker_protocol, c.asr_rule) == (
        "paper", "independent", "exclude-target")
    assert c.attacker_ids == [0, 1, 2, 3]
    assert c.participants_per_round == 20


@pytest.mark.parametrize("field,value", [
    ("num_attackers", 21), ("num_clients", 0), ("per_round", 25), ("alpha", 0.0),
    ("global_rule", "mean"), ("attacker_protocol", "x"), ("asr_rule", "all"),
    ("poison_fraction", 1.5), ("pretrain", "imagenet"), ("threads", -1),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimConfig(**{field: value})


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="roundz"):
        SimConfig.from_dict({"roundz": 3})


def test_toml_round_trip(tmp_path):
    c = SimConfig(rounds=7, alpha=0.5, seed=3, attacks=["mra", "3dfed"], defenses=["mars"],
                  attack_params={"mra": {"gamma": 2.5}, "adaptive": {"lam": 0.05,
                                                                     "form": "official"}},
                  defense_params={"mars": {"kappa": 0.1, "epsilon": 0.5}},
                  model_widths=[32, 64, 128], record_energy=True, server_lr=0.8)
    path = tmp_path / "c.toml"
    c.save_toml(path)
    back = SimConfig.from_toml(path)
    assert back == c
    assert back.to_dict() == c.to_dict()


def test_toml_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('rounds = 4\nattacks = "mra"\n[defense_params.mars]\nkappa = 0.2\n')
    c = SimConfig.from_toml(path)
    assert c.rounds == 4 and c.attacks == ["mra"]
    assert c.params_for_defense("mars") == {"kappa": 0.2}
    assert c.params_for_attack("mra") == {}
    assert c.num_clients == 20


def test_presets_are_valid_configs():
    for name in PRESETS:
        c = SimConfig.preset(name)
        assert c.attacks and c.defenses
    assert SimConfig.preset("default", rounds=9).rounds == 9
    with pytest.raises(ValueError, match="preset"):
        SimConfig.preset("nope")


def test_replace_validates():
    c = SimConfig()
    assert c.replace(num_attackers=0).num_attackers == 0
    with pytest.raises(ValueError):
        c.replace(num_attackers=99)


@pytest.mark.parametrize("kwargs, match", [
    ({"attacks": ["mrx"]}, r"SimConfig.attacks: unknown \['mrx'\]"),
    ({"defenses": ["mars", "krum"]}, r"SimConfig.defenses: unknown \['krum'\]"),
    ({"attack_params": {"mra": {"scale": 5.0}}}, r"attack_params\['mra'\].*'scale'"),
    ({"defense_params": {"mars": {"kapa": 0.1}}}, r"defense_params\['mars'\].*'kapa'"),
    ({"defense_params": {"mars": {"kappa": -1}}}, r"defense_params\['mars'\].*kappa"),
    ({"attack_params": {"mra": 5.0}}, r"must be a table"),
])
def test_unknown_components_and_parameters_fail_before_any_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimConfig(**kwargs)
