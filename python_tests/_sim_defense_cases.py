"""Constructed rounds for the simulation-defense tests: a tiny conv+BN+fc model, no training."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mars_native.sim.defenses.base import RoundInput
from mars_native.sim.defenses.common import FlatLayout, is_float_key


class TinyNet(nn.Module):
    """conv1/bn1, conv2/bn2 (+ maxpool), fc1, fc2 (final layer); input (1, 8, 8), 10 classes."""

    def __init__(self, widths: tuple[int, int] = (4, 8), hidden: int = 16, classes: int = 10):
        super().__init__()
        a, b = widths
        self.conv1 = nn.Conv2d(1, a, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(a)
        self.conv2 = nn.Conv2d(a, b, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(b)
        self.fc1 = nn.Linear(b * 16, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def global_state(widths: tuple[int, int] = (4, 8), seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised TinyNet state with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = TinyNet(widths)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(n, generator=g))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def layout_of(state: dict) -> FlatLayout:
    return FlatLayout.from_state(state)


def states_from_deltas(gstate: dict, deltas: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """Local states theta + delta (rows of ``deltas`` in the FlatLayout of ``gstate``)."""
    layout = layout_of(gstate)
    out = []
    for row in np.atleast_2d(deltas):
        d = layout.to_state(row)
        out.append({k: (v + d[k] if is_float_key(k, v) else v.clone()) for k, v in gstate.items()})
    return out


def random_deltas(gstate: dict, n: int, scale: float = 0.01, seed: int = 1) -> np.ndarray:
    """(n, d) small random deltas around a shared direction (like benign clients of one round)."""
    rng = np.random.default_rng(seed)
    d = layout_of(gstate).size
    common = rng.normal(0.0, scale, d)
    return common + rng.normal(0.0, scale, (n, d))


def make_round(
    gstate: dict,
    states: list[dict],
    ids: list[int] | None = None,
    round_idx: int = 0,
    seed: int = 0,
    widths: tuple[int, int] = (4, 8),
    num_examples: list[int] | None = None,
) -> RoundInput:
    n = len(states)
    return RoundInput(
        global_state=gstate,
        client_states=states,
        client_ids=list(range(n)) if ids is None else list(ids),
        num_examples=[10] * n if num_examples is None else list(num_examples),
        round_idx=round_idx,
        num_clients_total=n,
        make_model=lambda: TinyNet(widths),
        input_shape=(1, 8, 8),
        num_classes=10,
        final_layer="fc2",
        rng=np.random.default_rng(seed),
        generator=torch.Generator().manual_seed(seed),
    )


def out_vector(out, gstate: dict) -> np.ndarray:
    """The flat float64 vector of a DefenseOutput's update_sum."""
    return layout_of(gstate).flatten(out.update_sum)


def generic_round(
    n: int = 10, n_attackers: int = 2, seed: int = 0
) -> tuple[dict, list[dict], np.ndarray]:
    """A round with benign clients and ``n_attackers`` scaled (x5) aligned attackers first."""
    g = global_state(seed=seed)
    deltas = random_deltas(g, n, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    bad = rng.normal(0.0, 0.05, deltas.shape[1])
    for i in range(n_attackers):
        deltas[i] = 5.0 * (bad + rng.normal(0.0, 0.002, deltas.shape[1]))
    return g, states_from_deltas(g, deltas), deltas
