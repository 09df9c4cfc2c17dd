"""Shared machinery of the attacks: settings, per-round seeding, training loops, state algebra,
the blind loss (spec §2.1), the attacker protocols and the conv->BN pairing of a model.

Everything runs on torch CPU tensors. Randomness: every round draws one seed from
``ctx.generator``; each attacker (and each purpose: training, tuning, masks ...) gets its own
generator derived from ``(round seed, purpose, client id)``, so results do not depend on the
order in which the loop calls ``train_attacker``.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mars_native.sim.attacks.base import Attack, RoundContext, StateDict
from mars_native.sim.triggers import PatternTrigger, poison_batch

PROTOCOLS = ("independent", "shared")


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class AttackerSettings:
    """The attacker-relevant fields of ``SimConfig`` (read with defaults, spec §1.6)."""

    epochs: int = 15
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 16
    local_epochs: int = 2
    benign_lr: float = 0.05
    poison_fraction: float = 0.5
    target_label: int = 8
    protocol: str = "independent"

    @classmethod
    def from_config(cls, cfg: Any) -> AttackerSettings:
        d = cls()
        protocol = str(getattr(cfg, "attacker_protocol", d.protocol))
        if protocol not in PROTOCOLS:
            raise ValueError(f"attacker_protocol must be one of {PROTOCOLS}, got {protocol!r}")
        return cls(
            epochs=int(getattr(cfg, "attacker_epochs", d.epochs)),
            lr=float(getattr(cfg, "attacker_lr", d.lr)),
            momentum=float(getattr(cfg, "momentum", d.momentum)),
            weight_decay=float(getattr(cfg, "weight_decay", d.weight_decay)),
            batch_size=int(getattr(cfg, "batch_size", d.batch_size)),
            local_epochs=int(getattr(cfg, "local_epochs", d.local_epochs)),
            benign_lr=float(getattr(cfg, "lr", d.benign_lr)),
            poison_fraction=float(getattr(cfg, "poison_fraction", d.poison_fraction)),
            target_label=int(getattr(cfg, "target_label", d.target_label)),
            protocol=protocol,
        )


# --------------------------------------------------------------------------------------------
# seeding


def _tag(purpose: str) -> int:
    return zlib.crc32(purpose.encode("utf-8"))


class RoundSeeds:
    """One seed per round (drawn from ``ctx.generator``), expanded into independent streams."""

    def __init__(self) -> None:
        self.round_idx: int | None = None
        self.seed: int = 0

    def start(self, ctx: RoundContext) -> None:
        self.round_idx = ctx.round_idx
        self.seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator).item())

    def is_current(self, ctx: RoundContext) -> bool:
        return self.round_idx is not None and self.round_idx == ctx.round_idx

    def _entropy(self, purpose: str, ids: Sequence[int]) -> list[int]:
        return [self.seed, _tag(purpose), *(int(i) + 1 for i in ids)]

    def generator(self, purpose: str, *ids: int) -> torch.Generator:
        ss = np.random.SeedSequence(self._entropy(purpose, ids))
        return torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> 1))

    def rng(self, purpose: str, *ids: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self._entropy(purpose, ids)))


# --------------------------------------------------------------------------------------------
# states and models


def clone_state(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def load_model(ctx: RoundContext, state: StateDict) -> nn.Module:
    model = ctx.make_model()
    model.load_state_dict(state)
    return model


def model_state(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def parameter_names(model: nn.Module) -> list[str]:
    """State-dict keys of the trainable parameters (BN running stats excluded)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def delta(local: StateDict, global_state: StateDict) -> StateDict:
    """``local - global`` for every floating-point entry (integer buffers skipped)."""
    return {k: local[k] - g for k, g in global_state.items() if g.is_floating_point()}


def apply_update(global_state: StateDict, update: StateDict, like: StateDict) -> StateDict:
    """``global + update`` on float entries; other entries copied from ``like`` (the local state,
    so ``num_batches_tracked`` keeps the uploaded value). Keys in ``global_state`` order."""
    out = {}
    for k, g in global_state.items():
        if k in update and g.is_floating_point():
            out[k] = (g + update[k]).to(g.dtype)
        else:
            out[k] = like[k].detach().clone()
    return out


def scale_local(global_state: StateDict, local: StateDict, gamma: float) -> StateDict:
    """``theta + gamma * (local - theta)`` on every float entry (BN running stats included);
    integer buffers (``num_batches_tracked``) keep the local value untouched."""
    return apply_update(global_state, {k: gamma * d for k, d in delta(local, global_state).items()},
                        local)


def update_norm(update: StateDict, keys: Iterable[str]) -> torch.Tensor:
    """L2 norm of ``update`` over ``keys`` (float64)."""
    sq = sum(float(update[k].double().pow(2).sum()) for k in keys)
    return torch.tensor(sq, dtype=torch.float64).sqrt()


def flat(update: StateDict, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([update[k].reshape(-1) for k in keys])


# --------------------------------------------------------------------------------------------
# training


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering ``n`` samples once (no drop_last)."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield perm[start:start + batch_size]


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(trainable(model), lr=lr, momentum=momentum, weight_decay=weight_decay)


def run_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> nn.Module:
    """Train mode; ``epochs`` passes of shuffled mini-batches; one optimiser step per batch.
    A final batch of a single sample is skipped (BatchNorm cannot normalise it), as in the
    arena's benign training."""
    model.train()
    for _ in range(epochs):
        for idx in minibatches(int(x.shape[0]), batch_size, generator):
            if idx.numel() < 2:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, x[idx], y[idx])
            loss.backward()
            optimizer.step()
    return model


def l2_distance(params: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Un-squared L2 distance between two parameter lists (gradient 0 at distance 0)."""
    return torch.linalg.vector_norm(torch.cat([(p - r).reshape(-1) for p, r in zip(params, refs)]))


def blind_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    xp: torch.Tensor,
    yp: torch.Tensor,
    params: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    weights: Sequence[float] = (0.3, 0.3, 0.4),
) -> torch.Tensor:
    """Spec §2.1: ``w0*CE(f(x), y) + w1*CE(f(x'), y') + w2*||w - w_G||_2`` (trainable params)."""
    loss = weights[0] * F.cross_entropy(model(x), y) + weights[1] * F.cross_entropy(model(xp), yp)
    if weights[2] != 0:
        loss = loss + weights[2] * l2_distance(params, refs)
    return loss


def train_blind(
    ctx: RoundContext,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackerSettings,
    stamp: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    weights: Sequence[float] = (0.3, 0.3, 0.4),
) -> StateDict:
    """The constrained backdoor training of MRA and 3DFed; returns the poisoned local state."""
    model = load_model(ctx, ctx.global_state)
    params = trainable(model)
    refs = [p.detach().clone() for p in params]
    opt = sgd(model, settings.lr, settings.momentum, settings.weight_decay)

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xp, yp = poison_batch(xb, yb, stamp, settings.poison_fraction, settings.target_label)
        return blind_loss(m, xb, yb, xp, yp, params, refs, weights)

    run_epochs(model, x, y, opt, loss_fn, settings.epochs, settings.batch_size, generator)
    return model_state(model)


# --------------------------------------------------------------------------------------------
# conv -> BN pairs by module structure


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """Every conv of ``model`` with the BatchNorm that directly follows it (None when none).

    "Follows" is read from the model's structure: the execution graph from ``torch.fx`` when the
    model traces (a BN whose input is the conv's output), else module definition order (the next
    leaf module after the conv). Never from state-dict key order. A BN must have as many features
    as the conv has output channels.
    """
    modules = dict(model.named_modules())
    pairs: dict[str, nn.Module | None] = {n: None for n, m in modules.items() if isinstance(m, _CONV)}
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
                continue
            src = node.args[0] if node.args else None
            if (getattr(src, "op", None) == "call_module" and src.target in pairs
                    and pairs[src.target] is None):
                pairs[src.target] = modules[node.target]
    except Exception:  # noqa: BLE001 - untraceable model: definition order
        leaves = [(n, m) for n, m in modules.items() if not list(m.children())]
        for (name, mod), (_, nxt) in itertools.pairwise(leaves):
            if isinstance(mod, _CONV) and isinstance(nxt, _BN):
                pairs[name] = nxt
    out = []
    for name, bn in pairs.items():
        conv = modules[name]
        if bn is not None and bn.num_features != conv.out_channels:
            bn = None
        out.append((name, conv, bn))
    return out


def channel_energy(conv: nn.Module, bn: nn.Module | None, bn_eps: float = 1e-5) -> torch.Tensor:
    """Differentiable BE of every output channel: sigma_max(W_k as (C_in, prod(kernel))) times
    ``|gamma_k| / sqrt(max(running_var_k, 0) + eps)`` of the following BN (scale 1 without BN)."""
    w = conv.weight
    sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    if bn is None:
        return sigma
    scale = torch.ones_like(sigma)
    if bn.weight is not None:
        scale = bn.weight.abs()
    if bn.running_var is not None:
        scale = scale / torch.sqrt(bn.running_var.detach().clamp(min=0) + bn_eps)
    return sigma * scale


def total_backdoor_energy(model: nn.Module, pairs=None, bn_eps: float = 1e-5) -> torch.Tensor:
    """Sum of BE over every channel of every conv followed by a BN (differentiable)."""
    pairs = conv_bn_pairs(model) if pairs is None else pairs
    terms = [channel_energy(c, b, bn_eps).sum() for _, c, b in pairs if b is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------
# the base class of the poisoning attacks


class PoisoningAttack(Attack):
    """An attack whose attackers train poisoned models (MRA, CerP, 3DFed, adaptive).

    Handles the attacker protocol: ``"independent"`` (default) trains every sampled attacker on
    its own data; ``"shared"`` trains the lead attacker (lowest sampled id) once per round and
    hands every sampled attacker a copy of that state. Subclasses implement
    :meth:`_train_one` and may override :meth:`_start_round`.
    """

    trigger = "pattern"

    def __init__(self, pattern: PatternTrigger | None = None) -> None:
        self.pattern = pattern if pattern is not None else PatternTrigger()
        self.settings: AttackerSettings | None = None
        self._seeds = RoundSeeds()
        self._cache: dict[int, StateDict] = {}
        self.last_info: dict = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def setup(self, config: Any, input_shape: tuple[int, ...], normalize: Callable) -> None:
        self.settings = AttackerSettings.from_config(config)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.pattern.setup(input_shape, normalize)
        self._seeds = RoundSeeds()
        self._cache = {}
        self.last_info = {}

    def _settings(self, ctx: RoundContext) -> AttackerSettings:
        return AttackerSettings.from_config(ctx.config)

    def _start_round(self, ctx: RoundContext) -> None:
        """Per-round initialisation (called once per round, before any training)."""
        self._seeds.start(ctx)
        self._cache = {}

    def _ensure_round(self, ctx: RoundContext) -> None:
        if not self._seeds.is_current(ctx):
            self._start_round(ctx)

    def begin_round(self, ctx: RoundContext) -> None:
        self._start_round(ctx)

    # -- training -------------------------------------------------------------------------------
    @staticmethod
    def lead_attacker(ctx: RoundContext, client_id: int | None = None) -> int:
        ids = list(ctx.attacker_ids)
        if not ids:
            return int(client_id) if client_id is not None else 0
        return int(min(ids))

    def train_attacker(self, ctx: RoundContext, client_id: int) -> StateDict:
        self._ensure_round(ctx)
        s = self._settings(ctx)
        cid = int(client_id)
        if s.protocol == "shared" and cid in ctx.attacker_ids:
            cid = self.lead_attacker(ctx, cid)
        if cid not in self._cache:
            self._cache[cid] = self._train_one(ctx, cid)
        return clone_state(self._cache[cid])

    def _train_one(self, ctx: RoundContext, client_id: int) -> StateDict:  # pragma: no cover
        raise NotImplementedError

    def stamp_test(self, x: torch.Tensor) -> torch.Tensor:
        return self.pattern.stamp(x)

    def _remember(self, params: dict) -> None:
        """Keep the constructor parameters (JSON-ready) for :meth:`config`."""
        def ready(v):
            if isinstance(v, (bool, int, float, str)) or v is None:
                return v
            if isinstance(v, (tuple, list, range)):
                return [ready(i) for i in v]
            return repr(v)
        self._params = {k: ready(v) for k, v in params.items()
                        if k not in ("self", "__class__")}

    def config(self) -> dict:
        """The attack's constructor parameters (JSON-ready; the loop records them)."""
        return {"name": self.name, "trigger": self.trigger, **getattr(self, "_params", {})}

    def _publish(self, ctx: RoundContext, info: dict) -> None:
        """Store per-round diagnostics (JSON-ready) in ``last_info`` and ``ctx.extras``."""
        self.last_info = info
        try:
            ctx.extras["attack_info"] = info
        except (AttributeError, TypeError):  # pragma: no cover - extras not a dict
            pass
