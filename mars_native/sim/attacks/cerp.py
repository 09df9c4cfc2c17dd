"""CerP, Cerberus poisoning (spec §2.3), with a tunable DBA-bar trigger.

Per round:

1. Trigger tuning (``begin_round``) on the global model in eval mode, ``tune_passes`` pass(es)
   over the union of every attacker's data (``ctx.all_attacker_ids``, shuffled): for each batch
   write the trigger values into every image, ``loss = CE(f(x), y_t)``,
   ``trigger <- trigger - tune_step * grad``, then project ``trigger - initial`` onto the L2 ball
   of radius ``radius``; after the pass clamp to ``clamp`` (normalised units). Digits: step 0.1,
   radius 5, clamp [-3, 3]. The tuning starts from the initial trigger every round (official);
   ``carry_trigger=True`` starts from the previous round's tuned trigger instead.
2. For each sampled attacker i in id order: a reference model ``w_ref`` = benign local training
   on i's data (``ctx.train_benign``); then the poisoned model, ``epochs`` (default the config's
   ``attacker_epochs``) with the *config* optimiser (``lr`` default: the benign ``lr``, as in the
   authors' CerP loop) on batches whose first ``round(poison_fraction*B)`` samples carry the tuned
   trigger and y_t:
   ``L = CE(batch) + lambda_dist*||w - w_ref||_2 + lambda_cos * sum_{j<i} cos(...)``.
   ``cosine="update"`` (default, the CerP paper's intent): cosine between the current update
   ``w - theta`` and attacker j's update (trainable parameters flattened; the term is skipped at
   the very first step where the update is exactly zero and the cosine undefined).
   ``cosine="official"``: per tensor cosine between the current *weights* and Δ_j, averaged.
3. Upload ``theta + Δ_i`` unscaled.

ASR trigger (``stamp_test``): ``test_trigger="initial"`` (default; the authors measure with the
untuned initial trigger, spec §4 and §6.10) or ``"tuned"`` (the latest tuned trigger).
With ``attacker_protocol="shared"`` the lead attacker trains once and the others copy it
(no cosine term then); the authors' CerP loop trains every attacker like ``"independent"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mars_native.sim.attacks.base import RoundContext, StateDict, Upload
from mars_native.sim.attacks.common import (
    PoisoningAttack,
    flat,
    l2_distance,
    load_model,
    minibatches,
    model_state,
    parameter_names,
    run_epochs,
    sgd,
    trainable,
)
from mars_native.sim.triggers import BarTrigger, poison_batch

COSINE_FORMS = ("update", "official")
TEST_TRIGGERS = ("initial", "tuned")


def tune_trigger(
    model: nn.Module,
    x: torch.Tensor,
    trigger: BarTrigger,
    start: torch.Tensor,
    target: int,
    step: float,
    radius: float,
    clamp: tuple[float, float],
    batch_size: int,
    generator: torch.Generator,
    passes: int = 1,
) -> torch.Tensor:
    """CerP trigger tuning (see module docstring); returns the tuned values ``(C, P)``."""
    assert trigger.initial_values is not None
    init = trigger.initial_values
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    values = start.detach().clone()
    for _ in range(passes):
        for idx in minibatches(int(x.shape[0]), batch_size, generator):
            v = values.clone().requires_grad_(True)
            xb = trigger.stamp(x[idx], v)
            yb = torch.full((len(idx),), int(target), dtype=torch.long)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xb), yb), v)
            values = values - step * grad
            d = values - init
            norm = torch.linalg.vector_norm(d)
            if norm > radius:
                values = init + d * (radius / norm)
        values = values.clamp(clamp[0], clamp[1])
    return values.detach()


class CerP(PoisoningAttack):
    """Cerberus poisoning: tuned bar trigger, reference-distance and cosine-diversity terms."""

    name = "cerp"
    trigger = "cerp"

    def __init__(
        self,
        tune_step: float = 0.1,
        radius: float = 5.0,
        clamp: Sequence[float] = (-3.0, 3.0),
        tune_passes: int = 1,
        lambda_dist: float = 1e-3,
        lambda_cos: float = 1e-3,
        lr: float | None = None,
        epochs: int | None = None,
        cosine: str = "update",
        test_trigger: str = "initial",
        carry_trigger: bool = False,
        bar_rows: Sequence[int] = (0, 2),
        bar_cols: Sequence[Sequence[int]] = ((0, 1), (4, 5)),
    ) -> None:
        super().__init__()
        self._remember(locals())
        if cosine not in COSINE_FORMS:
            raise ValueError(f"cosine must be one of {COSINE_FORMS}, got {cosine!r}")
        if test_trigger not in TEST_TRIGGERS:
            raise ValueError(f"test_trigger must be one of {TEST_TRIGGERS}, got {test_trigger!r}")
        lo, hi = (float(c) for c in clamp)
        if not lo < hi or radius < 0 or tune_step < 0:
            raise ValueError("need clamp lo < hi, radius >= 0, tune_step >= 0")
        self.tune_step = float(tune_step)
        self.radius = float(radius)
        self.clamp = (lo, hi)
        self.tune_passes = int(tune_passes)
        self.lambda_dist = float(lambda_dist)
        self.lambda_cos = float(lambda_cos)
        self.lr = lr
        self.epochs = epochs
        self.cosine = cosine
        self.test_trigger = test_trigger
        self.carry_trigger = bool(carry_trigger)
        self.bars = BarTrigger(bar_rows, bar_cols)
        self.tuned: torch.Tensor | None = None
        self._prev_updates: list[torch.Tensor] = []

    def setup(self, config: Any, input_shape: tuple[int, ...], normalize: Callable) -> None:
        super().setup(config, input_shape, normalize)
        self.bars.setup(input_shape, normalize)
        self.tuned = None

    # -- round ----------------------------------------------------------------------------------
    def _start_round(self, ctx: RoundContext) -> None:
        super()._start_round(ctx)
        self._prev_updates = []
        if self.bars.initial_values is None:
            raise RuntimeError("CerP.setup(config, input_shape, normalize) was not called")
        s = self._settings(ctx)
        start = self.bars.initial_values
        if self.carry_trigger and self.tuned is not None:
            start = self.tuned
        ids = sorted(int(i) for i in (ctx.all_attacker_ids or ctx.attacker_ids))
        xs = [ctx.client_data(i)[0] for i in ids]
        if not xs or self.tune_passes <= 0:
            self.tuned = start.clone()
        else:
            model = load_model(ctx, ctx.global_state)
            self.tuned = tune_trigger(
                model, torch.cat(xs), self.bars, start, s.target_label, self.tune_step,
                self.radius, self.clamp, s.batch_size, self._seeds.generator("cerp-tune"),
                self.tune_passes,
            )
        self.bars.values = self.tuned.clone()

    def train_attacker(self, ctx: RoundContext, client_id: int) -> StateDict:
        self._ensure_round(ctx)
        # train the sampled attackers in id order once, so that the cosine terms see the
        # updates of the lower ids whatever order the loop asks in
        if self._settings(ctx).protocol == "independent" and int(client_id) in ctx.attacker_ids:
            for cid in sorted(int(i) for i in ctx.attacker_ids):
                if cid not in self._cache:
                    self._cache[cid] = self._train_one(ctx, cid)
        return super().train_attacker(ctx, client_id)

    # -- training -------------------------------------------------------------------------------
    def cosine_penalty(
        self, model: nn.Module, params: list[torch.Tensor], globals_: list[torch.Tensor]
    ) -> torch.Tensor:
        """``sum_j cos(...)`` against the updates of the attackers trained before this one."""
        if not self._prev_updates:
            return torch.zeros(())
        if self.cosine == "update":
            cur = torch.cat([(p - g).reshape(-1) for p, g in zip(params, globals_)])
            norm = torch.linalg.vector_norm(cur)
            if float(norm.detach()) == 0.0:  # undefined at the first step (update exactly 0)
                return torch.zeros(())
            return torch.stack([
                torch.dot(cur, d) / (norm * torch.linalg.vector_norm(d)).clamp_min(1e-30)
                for d in self._prev_updates
            ]).sum()
        terms = []
        sizes = [p.numel() for p in params]
        for d in self._prev_updates:
            chunks = torch.split(d, sizes)
            cos = [F.cosine_similarity(p.reshape(-1), c, dim=0) for p, c in zip(params, chunks)]
            terms.append(torch.stack(cos).mean())
        return torch.stack(terms).sum()

    def _train_one(self, ctx: RoundContext, client_id: int) -> StateDict:
        s = self._settings(ctx)
        x, y = ctx.client_data(client_id)
        ref_state = ctx.train_benign(ctx.global_state, x, y)
        model = load_model(ctx, ctx.global_state)
        names = parameter_names(model)
        params = trainable(model)
        globals_ = [p.detach().clone() for p in params]
        refs = [ref_state[n].detach().to(p.dtype) for n, p in zip(names, params)]
        lr = s.benign_lr if self.lr is None else float(self.lr)
        epochs = s.epochs if self.epochs is None else int(self.epochs)
        opt = sgd(model, lr, s.momentum, s.weight_decay)
        stamp = self.bars.stamper(self.tuned)

        def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            xp, yp = poison_batch(xb, yb, stamp, s.poison_fraction, s.target_label)
            loss = F.cross_entropy(m(xp), yp)
            if self.lambda_dist:
                loss = loss + self.lambda_dist * l2_distance(params, refs)
            if self.lambda_cos and self._prev_updates:
                loss = loss + self.lambda_cos * self.cosine_penalty(m, params, globals_)
            return loss

        run_epochs(model, x, y, opt, loss_fn, epochs, s.batch_size,
                   self._seeds.generator("cerp-train", client_id))
        state = model_state(model)
        g = {n: ctx.global_state[n] for n in names}
        self._prev_updates.append(
            flat({n: state[n] - g[n] for n in names}, names).detach().to(torch.float32)
        )
        return state

    def finalize_uploads(self, ctx: RoundContext, uploads: list[Upload]) -> list[Upload]:
        info: dict = {"attack": self.name, "protocol": self._settings(ctx).protocol,
                      "cosine": self.cosine, "test_trigger": self.test_trigger}
        if self.tuned is not None and self.bars.initial_values is not None:
            info["trigger_shift_l2"] = float(
                torch.linalg.vector_norm(self.tuned - self.bars.initial_values))
        self._publish(ctx, info)
        return uploads

    def stamp_test(self, x: torch.Tensor) -> torch.Tensor:
        if self.test_trigger == "tuned" and self.tuned is not None:
            return self.bars.stamp(x, self.tuned)
        if self.bars.initial_values is None:
            raise RuntimeError("CerP.setup(config, input_shape, normalize) was not called")
        return self.bars.stamp(x, self.bars.initial_values)
