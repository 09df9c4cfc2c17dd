"""Private stand-ins for the sim tests: a FedAvg, an oracle defense and a pattern-poisoning
attack, so the loop can be tested without the attack/defense registries. Not part of the package.
"""

from __future__ import annotations

import numpy as np
import torch

from mars_native.sim.attacks.base import Attack
from mars_native.sim.config import SimConfig
from mars_native.sim.data import FederatedData, load_digits_data
from mars_native.sim.defenses.base import Defense, DefenseOutput

torch.set_num_threads(1)


def _update_sum(rin, keep):
    out = {}
    for k, v in rin.global_state.items():
        if torch.is_floating_point(v):
            acc = torch.zeros_like(v, dtype=torch.float64)
            for i in keep:
                acc += rin.client_states[i][k].double() - v.double()
            out[k] = acc
    return out


class StubFedAvg(Defense):
    name = "stub-fedavg"

    def __call__(self, rin):
        n = len(rin.client_states)
        return DefenseOutput(update_sum=_update_sum(rin, range(n)), weight_total=float(n),
                             flagged=np.zeros(n, dtype=bool))


class OracleDefense(Defense):
    """Flags exactly the clients whose id is below ``num_attackers`` (ground-truth oracle)."""

    name = "oracle"

    def __init__(self, num_attackers: int):
        self.a = num_attackers
        self.calls = 0

    def reset(self):
        self.calls = 0

    def __call__(self, rin):
        self.calls += 1
        flagged = np.array([c < self.a for c in rin.client_ids])
        keep = [i for i, f in enumerate(flagged) if not f]
        return DefenseOutput(update_sum=_update_sum(rin, keep), weight_total=float(len(keep)),
                             flagged=flagged, info={"kept": len(keep), "matrix": [[1, 2], [3, 4]]})


class NoFlagDefense(StubFedAvg):
    name = "noflag"
    flags_clients = False

    def __call__(self, rin):
        out = super().__call__(rin)
        out.flagged = None
        return out


class PatternPoison(Attack):
    """Data poisoning with a 3x3 checkerboard (rows/cols 5-7), optional model-replacement scale."""

    name = "stub-poison"

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.rounds_seen = []

    def setup(self, config, input_shape, normalize):
        self.cfg = config
        self.patch = normalize(torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))

    def begin_round(self, ctx):
        self.rounds_seen.append(ctx.round_idx)

    def stamp_test(self, x):
        x = x.clone()
        x[..., 5:8, 5:8] = self.patch
        return x

    def train_attacker(self, ctx, client_id):
        x, y = ctx.client_data(client_id)
        k = round(self.cfg.poison_fraction * len(x))
        x = torch.cat([x, self.stamp_test(x[:k])])
        y = torch.cat([y, torch.full((k,), self.cfg.target_label, dtype=torch.long)])
        state = ctx.extras["trainer"].train(ctx.global_state, x, y, generator=ctx.generator,
                                            epochs=self.cfg.attacker_epochs,
                                            lr=self.cfg.attacker_lr)
        g = ctx.global_state
        return {k: g[k] + self.scale * (v - g[k]) if torch.is_floating_point(v) else v
                for k, v in state.items()}


_SMALL = {}


def small_data(n_train: int = 360) -> FederatedData:
    """A stratified subset of digits (fast tests); test set 150 samples."""
    if n_train not in _SMALL:
        full = load_digits_data()
        g = torch.Generator().manual_seed(0)
        tr = torch.randperm(len(full.train_y), generator=g)[:n_train]
        te = torch.randperm(len(full.test_y), generator=g)[:150]
        _SMALL[n_train] = FederatedData(full.train_x[tr], full.train_y[tr], full.test_x[te],
                                        full.test_y[te], 10, (1, 8, 8), full.normalize,
                                        name=f"digits-small-{n_train}")
    return _SMALL[n_train]


def tiny_config(**kw) -> SimConfig:
    base = {"num_clients": 6, "num_attackers": 2, "model_widths": [8, 16, 16], "fc_width": 16,
            "pretrain_rounds": 1, "rounds": 2, "local_epochs": 1, "attacker_epochs": 2,
            "threads": 1, "batch_size": 32, "attacks": ["mra"], "defenses": ["fedavg", "mars"]}
    base.update(kw)
    return SimConfig(**base)
