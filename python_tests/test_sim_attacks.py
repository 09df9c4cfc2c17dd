"""Attacks of the simulation arena on a tiny conv+BN model and a hand-built RoundContext."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mars_native.sim.attacks import ATTACKS, MRA, AdaptiveAttack, CerP, ThreeDFed, make_attack
from mars_native.sim.attacks.adaptive import weight_spectral_penalty
from mars_native.sim.attacks.base import Attack, RoundContext, Upload
from mars_native.sim.attacks.common import (
    AttackerSettings,
    blind_loss,
    channel_energy,
    conv_bn_pairs,
    delta,
    total_backdoor_energy,
)
from mars_native.sim.attacks.dfed3 import choose_indicators, indicator_curvature

torch.set_num_threads(1)

MEAN, STD = 0.3, 0.4
N_CLIENTS, ATTACKERS = 6, [0, 1]


def normalize(raw):
    return (raw - MEAN) / STD


class TinyNet(nn.Module):
    """DigitsCNN layout with tiny widths: conv/bn x3, two max-pools, fc1, fc2."""

    def __init__(self, w=(4, 6, 8), hidden=16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, w[0], 3, padding=1), nn.BatchNorm2d(w[0])
        self.conv2, self.bn2 = nn.Conv2d(w[0], w[1], 3, padding=1), nn.BatchNorm2d(w[1])
        self.conv3, self.bn3 = nn.Conv2d(w[1], w[2], 3, padding=1), nn.BatchNorm2d(w[2])
        self.fc1, self.fc2 = nn.Linear(w[2] * 4, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def make_config(**kw):
    base = {"attacker_epochs": 2, "attacker_lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4,
            "batch_size": 8, "local_epochs": 1, "lr": 0.05, "poison_fraction": 0.5,
            "target_label": 8, "attacker_protocol": "independent", "num_clients": N_CLIENTS,
            "num_attackers": len(ATTACKERS), "seed": 0}
    return SimpleNamespace(**{**base, **kw})


def client_data_fn(same_for_attackers=False, n=24):
    def client_data(cid):
        g = torch.Generator().manual_seed(100 + (0 if same_for_attackers and cid in ATTACKERS
                                                 else cid))
        return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return client_data


def train_benign_fn(config):
    def train_benign(state, x, y):
        model = TinyNet()
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        g = torch.Generator().manual_seed(7)
        model.train()
        for _ in range(config.local_epochs):
            for idx in torch.randperm(len(x), generator=g).split(config.batch_size):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return train_benign


def make_ctx(config=None, round_idx=0, global_state=None, seed=0, same_data=False):
    config = config or make_config()
    if global_state is None:
        torch.manual_seed(0)
        global_state = {k: v.clone() for k, v in TinyNet().state_dict().items()}
    return RoundContext(
        round_idx=round_idx, global_state=global_state, sampled_ids=list(range(N_CLIENTS)),
        attacker_ids=list(ATTACKERS), all_attacker_ids=list(ATTACKERS), num_clients=N_CLIENTS,
        config=config, make_model=TinyNet, client_data=client_data_fn(same_data),
        train_benign=train_benign_fn(config),
        generator=torch.Generator().manual_seed(1000 * seed + round_idx),
        rng=np.random.default_rng(1000 * seed + round_idx),
    )


def setup_attack(attack, config=None):
    attack.setup(config or make_config(), (1, 8, 8), normalize)
    return attack


def run_round(attack, ctx, accept=lambda u: True):
    """A minimal federated round: begin, attackers, benign clients, finalize, FedAvg, end."""
    attack.begin_round(ctx)
    uploads = []
    for cid in ctx.sampled_ids:
        if cid in ctx.attacker_ids:
            state = attack.train_attacker(ctx, cid)
        else:
            state = ctx.train_benign(ctx.global_state, *ctx.client_data(cid))
        uploads.append(Upload(cid, state, 24, cid in ctx.attacker_ids))
    uploads = attack.finalize_uploads(ctx, uploads)
    kept = [u for u in uploads if accept(u)] or uploads
    new = {}
    for k, g in ctx.global_state.items():
        if g.is_floating_point():
            new[k] = g + torch.stack([u.state[k] - g for u in kept]).mean(0)
        else:
            new[k] = g.clone()
    attack.end_round(ctx, new)
    return uploads, new


def flat_delta(state, global_state, keys=None):
    keys = keys or [k for k, v in global_state.items() if v.is_floating_point()]
    return torch.cat([(state[k] - global_state[k]).reshape(-1).double() for k in keys])


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# ---------------------------------------------------------------------------------------------
# registry and end to end


def test_registry_and_make_attack():
    assert set(ATTACKS) == {"none", "mra", "cerp", "3dfed", "adaptive"}
    assert ATTACKS["none"] is Attack
    assert isinstance(make_attack("MRA", gamma=3), MRA) and make_attack("mra", gamma=3).gamma == 3
    assert make_attack("adaptive", lam=0.05, form="official").lam == 0.05
    assert make_attack("adaptive", form="official").lam == 1e-4
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("badnets")
    with pytest.raises(ValueError):
        make_attack("adaptive", form="nope")
    with pytest.raises(ValueError):
        setup_attack(MRA(), make_config(attacker_protocol="everyone"))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_runs_one_round_deterministically(name):
    params = {"initial_decoys": 1} if name == "3dfed" else {}
    results = []
    for _ in range(2):
        attack = make_attack(name, **params)
        attack.setup(make_config(), (1, 8, 8), normalize)
        ctx = make_ctx()
        uploads, _ = run_round(attack, ctx)
        assert len(uploads) == N_CLIENTS
        assert [u.client_id for u in uploads] == list(range(N_CLIENTS))
        for u in uploads:
            assert list(u.state) == list(ctx.global_state)
            assert all(torch.isfinite(v).all() for v in u.state.values() if v.is_floating_point())
        x = torch.randn(3, 1, 8, 8)
        stamped = attack.stamp_test(x)
        assert stamped.shape == x.shape
        assert torch.equal(stamped, x) == (name == "none")
        results.append(uploads)
    for a, b in zip(*results):
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


# ---------------------------------------------------------------------------------------------
# blind loss and MRA


def test_blind_loss_gradient_contains_distance_term():
    torch.manual_seed(1)
    model = TinyNet().train()
    params = [p for p in model.parameters()]
    refs = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    xp, yp = x.flip(0), torch.full((6,), 8)

    def grads(weights):
        model.zero_grad()
        blind_loss(model, x, y, xp, yp, params, refs, weights).backward()
        return torch.cat([p.grad.reshape(-1).clone() for p in params])

    diff = grads((0.3, 0.3, 0.4)) - grads((0.3, 0.3, 0.0))
    d = torch.cat([(p - r).reshape(-1) for p, r in zip(params, refs)]).detach()
    assert torch.allclose(diff, 0.4 * d / d.norm(), atol=1e-6)
    # at w = w_G the (un-squared) distance has a zero gradient, not NaN
    model2 = TinyNet()
    p2 = list(model2.parameters())
    blind_loss(model2, x, y, xp, yp, p2, [p.detach().clone() for p in p2]).backward()
    assert all(torch.isfinite(p.grad).all() for p in p2)


def test_mra_upload_is_gamma_times_trained_delta():
    attack = setup_attack(MRA(gamma=5.0))
    ctx = make_ctx()
    attack.begin_round(ctx)
    trained = attack.train_attacker(ctx, 0)
    uploads = attack.finalize_uploads(ctx, [Upload(0, trained, 24, True),
                                            Upload(3, dict(trained), 24, False)])
    up = uploads[0].state
    g = ctx.global_state
    for k, v in g.items():
        if v.is_floating_point():
            assert torch.allclose(up[k] - v, 5.0 * (trained[k] - v), atol=1e-6, rtol=1e-5), k
        else:
            assert torch.equal(up[k], trained[k]), k  # num_batches_tracked untouched
    ratio = flat_delta(up, g).norm() / flat_delta(trained, g).norm()
    assert float(ratio) == pytest.approx(5.0, rel=1e-5)
    assert uploads[1].state is not up and torch.equal(uploads[1].state["fc2.weight"],
                                                       trained["fc2.weight"])  # benign untouched
    assert ctx.extras["attack_info"]["gamma"] == 5.0


@pytest.mark.parametrize("cls", [MRA, AdaptiveAttack])
def test_shared_protocol_identical_independent_different(cls):
    out = {}
    for protocol in ("shared", "independent"):
        cfg = make_config(attacker_protocol=protocol)
        attack = setup_attack(cls(), cfg)
        uploads, _ = run_round(attack, make_ctx(cfg))
        a, b = uploads[0].state, uploads[1].state
        out[protocol] = all(torch.equal(a[k], b[k]) for k in a)
    assert out == {"shared": True, "independent": False}


# ---------------------------------------------------------------------------------------------
# CerP


def test_cerp_trigger_tuning_stays_in_ball_and_clamp():
    for radius, clamp in ((0.5, (-3.0, 3.0)), (100.0, (-0.5, 0.5))):
        attack = setup_attack(CerP(tune_step=500.0, radius=radius, clamp=clamp))
        ctx = make_ctx()
        attack.begin_round(ctx)
        init = attack.bars.initial_values
        shift = float(torch.linalg.vector_norm(attack.tuned - init))
        assert shift <= radius + 1e-5
        assert float(attack.tuned.min()) >= clamp[0] and float(attack.tuned.max()) <= clamp[1]
        assert shift > 0  # it did move
    # the tuning actually raises the target-class probability of the global model
    attack = setup_attack(CerP(tune_step=5.0))
    ctx = make_ctx()
    attack.begin_round(ctx)
    model = TinyNet()
    model.load_state_dict(ctx.global_state)
    model.eval()
    x = torch.cat([ctx.client_data(i)[0] for i in ATTACKERS])
    with torch.no_grad():
        def target_ce(v):
            return F.cross_entropy(model(attack.bars.stamp(x, v)), torch.full((len(x),), 8))
        assert target_ce(attack.tuned) < target_ce(attack.bars.initial_values)


def test_cerp_stamp_test_initial_or_tuned():
    x = torch.zeros(2, 1, 8, 8)
    for which in ("initial", "tuned"):
        attack = setup_attack(CerP(tune_step=5.0, test_trigger=which))
        attack.begin_round(make_ctx())
        out = attack.stamp_test(x)[:, :, [0, 0, 2, 2], [0, 4, 1, 5]]
        ref = attack.bars.initial_values if which == "initial" else attack.tuned
        assert torch.allclose(out, ref[:, [0, 2, 5, 7]].expand(2, 1, 4))
    assert not torch.allclose(attack.tuned, attack.bars.initial_values)


def test_cerp_cosine_term_makes_attackers_diverse():
    cos = {}
    for lam in (0.0, 50.0):
        attack = setup_attack(CerP(lambda_cos=lam, lambda_dist=0.0), make_config(attacker_epochs=3))
        ctx = make_ctx(same_data=True)  # both attackers hold the same samples
        uploads, _ = run_round(attack, ctx)
        keys = [n for n, _ in TinyNet().named_parameters()]
        cos[lam] = cosine(flat_delta(uploads[0].state, ctx.global_state, keys),
                          flat_delta(uploads[1].state, ctx.global_state, keys))
        assert len(attack._prev_updates) == 2
    assert cos[50.0] < cos[0.0] - 0.1
    # the penalty itself: positive against an aligned previous update, has a gradient
    attack = setup_attack(CerP())
    model = TinyNet()
    params = list(model.parameters())
    globals_ = [p.detach().clone() for p in params]
    assert float(attack.cosine_penalty(model, params, globals_)) == 0.0  # no previous attacker
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    attack._prev_updates = [torch.cat([torch.full_like(p, 0.01).reshape(-1) for p in params])]
    pen = attack.cosine_penalty(model, params, globals_)
    assert float(pen.detach()) == pytest.approx(1.0, abs=1e-5)
    official = CerP(cosine="official")
    official._prev_updates = attack._prev_updates
    assert -1.0 <= float(official.cosine_penalty(model, params, globals_).detach()) <= 1.0


# ---------------------------------------------------------------------------------------------
# 3DFed


def test_3dfed_masks_indicators_decoys_and_norm_matching():
    cfg = make_config()
    attack = setup_attack(ThreeDFed(group_size=2, num_neurons=4, initial_decoys=2), cfg)
    ctx = make_ctx(cfg)
    uploads, _ = run_round(attack, ctx)
    det = attack.details
    g = ctx.global_state
    ind_key, _, fin = det["layers"]
    assert (ind_key, fin) == ("conv3.weight", "fc2")
    # norm matching factor
    assert all(1.0 <= f <= 5.0 for f in det["factors"].values())
    # masks: zero-sum over each group on its rows, rows exclude the target
    for members in det["groups"]:
        rows = det["rows"][members[0]]
        assert 8 not in rows and len(rows) == 4
        total_w = sum(det["masks"][c][0] for c in members)
        total_b = sum(det["masks"][c][1] for c in members)
        assert torch.allclose(total_w, torch.zeros_like(total_w), atol=1e-6)
        assert torch.allclose(total_b, torch.zeros_like(total_b), atol=1e-6)
        for c in members:
            up = delta(uploads[c].state, g)
            d0 = det["delta0"][c]
            assert torch.allclose(up["fc2.weight"][rows] - d0["fc2.weight"][rows],
                                  det["masks"][c][0], atol=1e-6)
            other = [r for r in range(10) if r not in rows]
            assert torch.allclose(up["fc2.weight"][other], d0["fc2.weight"][other], atol=1e-6)
    # indicators: one distinct position per attacker and decoy, value = 1e5 * Δ0 (nonzero)
    recs = det["records"]
    assert [r["kind"] for r in recs] == ["attacker"] * 2 + ["decoy"] * 2
    assert len({r["position"] for r in recs}) == 4
    for r in recs[:2]:
        c, p = r["client_id"], r["position"]
        up = delta(uploads[c].state, g)[ind_key].reshape(-1)
        d0 = det["delta0"][c][ind_key].reshape(-1)
        expected = float(d0[p]) * 1e5 or 1e-2
        assert float(up[p]) == pytest.approx(expected, rel=1e-4) and float(up[p]) != 0.0
        rest = torch.ones_like(up, dtype=torch.bool)
        rest[p] = False
        assert torch.allclose(up[rest], d0[rest], atol=1e-7)
    # decoys replace the benign uploads of the highest ids and are flagged
    decoys = [u for u in uploads if u.is_decoy]
    assert sorted(u.client_id for u in decoys) == [4, 5]
    assert all(not u.is_attacker for u in decoys)
    for r in recs[2:]:
        up = delta(uploads[r["client_id"]].state, g)[ind_key].reshape(-1)
        assert float(up[r["position"]]) == pytest.approx(r["value"]) and r["value"] != 0.0
    assert sum(u.is_attacker for u in uploads) == 2


def test_3dfed_feedback_tunes_decoys_and_alpha():
    cfg = make_config()
    attack = setup_attack(ThreeDFed(num_neurons=4), cfg)
    ctx = make_ctx(cfg)
    _, new = run_round(attack, ctx)
    ctx1 = make_ctx(cfg, round_idx=1, global_state=new)
    attack.begin_round(ctx1)
    fb = attack.feedback
    assert fb["weak_dp"] is False and fb["status"] == ["a", "a"]
    assert all(r == pytest.approx(1 / N_CLIENTS, rel=0.05) for r in fb["ratios"])
    assert attack.num_decoys == 0
    # a defense that drops every attacker: indicators read "rejected", one decoy is added
    attack = setup_attack(ThreeDFed(num_neurons=4), cfg)
    _, new = run_round(attack, make_ctx(cfg), accept=lambda u: not u.is_attacker)
    attack.begin_round(make_ctx(cfg, round_idx=1, global_state=new))
    assert attack.feedback["status"] == ["r", "r"] and attack.num_decoys == 1
    assert all(0.01 <= a <= 0.99 for a in attack.alphas)
    uploads, _ = run_round(attack, make_ctx(cfg, round_idx=1, global_state=new))
    assert [u.client_id for u in uploads if u.is_decoy] == [5]
    # noise on the aggregate (weak DP): ratio far outside [-tau, 1]
    attack = setup_attack(ThreeDFed(num_neurons=4), cfg)
    _, new = run_round(attack, make_ctx(cfg))
    noisy = dict(new)
    noisy["conv3.weight"] = new["conv3.weight"].clone()
    rec = attack._pending["records"][0]
    base = float(attack._pending["theta_prev"][rec["position"]])
    noisy["conv3.weight"].view(-1)[rec["position"]] = base + 2.0 * rec["value"]  # r = 2 > 1
    attack.begin_round(make_ctx(cfg, round_idx=1, global_state=noisy))
    assert attack.weak_dp and attack.alphas == [pytest.approx(0.1)]


def test_indicator_curvature_is_hessian_times_ones():
    torch.manual_seed(3)
    model = TinyNet().double().eval()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    settings = AttackerSettings(batch_size=8, poison_fraction=0.0)  # clean loss twice
    hv = indicator_curvature(model, "conv3.weight", x, y, lambda t: t, settings)
    w = model.conv3.weight

    def grad_at(shift):
        with torch.no_grad():
            w.add_(shift)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), w)
        with torch.no_grad():
            w.sub_(shift)
        return g

    eps = 1e-4
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps) * 2  # two identical losses
    assert torch.allclose(hv, fd, atol=1e-6 + 1e-4 * float(fd.abs().max()))


def test_choose_indicators_prefers_low_curvature_among_small_updates():
    u = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 6.0])
    c = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    pos = choose_indicators(u, c, 2, candidates_per_indicator=2)  # candidates: 0,1,2,3
    assert pos.tolist() == [2, 3]
    with pytest.raises(ValueError):
        choose_indicators(u, c, 7)


# ---------------------------------------------------------------------------------------------
# adaptive


def test_backdoor_energy_matches_numpy_and_pairs_follow_structure():
    torch.manual_seed(2)
    model = TinyNet()
    for bn in (model.bn1, model.bn2, model.bn3):
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-2, 2)
    pairs = conv_bn_pairs(model)
    assert [(n, b is not None) for n, _, b in pairs] == [("conv1", True), ("conv2", True),
                                                         ("conv3", True)]
    be = channel_energy(model.conv2, model.bn2).detach().numpy()
    w = model.conv2.weight.detach().numpy()
    ref = np.array([np.linalg.svd(w[k].reshape(w.shape[1], -1), compute_uv=False)[0]
                    for k in range(w.shape[0])])
    ref *= np.abs(model.bn2.weight.detach().numpy()) / np.sqrt(model.bn2.running_var.numpy() + 1e-5)
    assert np.allclose(be, ref, rtol=1e-5)

    class Swapped(nn.Module):  # BN registered before the conv: structure, not order, decides
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(3)
            self.extra = nn.BatchNorm2d(2)
            self.conv = nn.Conv2d(1, 3, 3)
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)))

    pairs = {n: b for n, _, b in conv_bn_pairs(Swapped())}
    assert pairs["conv"] is not None and pairs["conv"].num_features == 3 and pairs["head"] is None


def test_adaptive_regulariser_lowers_total_energy():
    cfg = make_config(attacker_epochs=3)
    energies = {}
    for lam in (0.0, 1.0):
        attack = setup_attack(AdaptiveAttack(lam=lam), cfg)
        ctx = make_ctx(cfg)
        attack.begin_round(ctx)
        model = TinyNet()
        model.load_state_dict(attack.train_attacker(ctx, 0))
        energies[lam] = float(total_backdoor_energy(model).detach())
    assert energies[1.0] < 0.9 * energies[0.0]


def test_adaptive_official_penalty():
    model = TinyNet()
    manual = sum(float(torch.linalg.matrix_norm(p.detach().reshape(p.shape[0], -1), ord=2) ** 2)
                 for n, p in model.named_parameters() if "weight" in n)
    assert float(weight_spectral_penalty(model).detach()) == pytest.approx(manual, rel=1e-5)
    attack = setup_attack(AdaptiveAttack(form="official"))
    uploads, _ = run_round(attack, make_ctx())
    assert attack.lam == 1e-4 and sum(u.is_attacker for u in uploads) == 2


def test_upload_objects_keep_metadata():
    attack = setup_attack(MRA())
    ctx = make_ctx()
    uploads, _ = run_round(attack, ctx)
    for u in uploads:
        assert isinstance(u, Upload) and u.num_examples == 24
        assert u.is_attacker == (u.client_id in ATTACKERS)
    assert dataclasses.is_dataclass(uploads[0])


def test_config_is_json_ready_and_shared_protocol_for_cerp_and_3dfed():
    import json

    for name in ("mra", "cerp", "3dfed", "adaptive"):
        cfg = make_attack(name).config()
        assert cfg["name"] == name and json.loads(json.dumps(cfg)) == cfg
    assert make_attack("adaptive").config()["lam"] == 0.01
    assert make_attack("mra", gamma=2).config()["gamma"] == 2

    cfg = make_config(attacker_protocol="shared")
    uploads, _ = run_round(setup_attack(CerP(), cfg), make_ctx(cfg))
    assert all(torch.equal(uploads[0].state[k], uploads[1].state[k]) for k in uploads[0].state)

    attack = setup_attack(ThreeDFed(num_neurons=4), cfg)
    ctx = make_ctx(cfg)
    uploads, _ = run_round(attack, ctx)
    det = attack.details
    assert det["layers"] == ("conv3.weight", "fc1.weight", "fc2")
    assert torch.equal(det["delta0"][0]["fc1.weight"], det["delta0"][1]["fc1.weight"])
    assert list(det["factors"]) == [0]  # only the lead trained
    d0, d1 = (delta(uploads[c].state, ctx.global_state) for c in (0, 1))
    assert not torch.equal(d0["fc2.weight"], d1["fc2.weight"])  # different masks
    assert not torch.equal(d0["conv3.weight"], d1["conv3.weight"])  # different indicators


def test_attacks_run_inside_the_arena_loop():
    sim = pytest.importorskip("mars_native.sim.loop")
    from mars_native.sim.config import SimConfig

    cfg = SimConfig(rounds=1, pretrain="none", num_clients=6, num_attackers=2,
                    model_widths=[4, 6, 8], fc_width=16, attacker_epochs=1, local_epochs=1,
                    threads=1, attacks=["mra"], defenses=["fedavg"])
    for name in ("mra", "cerp", "3dfed", "adaptive"):
        attack = make_attack(name, **({"num_neurons": 4, "initial_decoys": 1}
                                      if name == "3dfed" else {}))
        res = sim.run_simulation(cfg, attack, "fedavg")
        rec = res.rounds[0]
        assert rec["n_attackers"] == 2 and 0.0 <= rec["asr"] <= 1.0
        assert rec["n_decoys"] == (1 if name == "3dfed" else 0)
        assert res.attack_config["name"] == name
