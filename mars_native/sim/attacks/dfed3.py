"""3DFed (Li et al., S&P 2023) as described in spec §2.4, with the MNIST constants by default.

Per round:

- ``begin_round``: read the indicators implanted last round from ``g = theta_now - theta_prev``
  (``r = g[p] / v``; ``r > 1`` or ``r < -tau`` -> weak DP; ``r <= tau`` rejected, ``r <= 0.8*max r``
  clipped, else accepted) and tune the per-group ``alpha`` and the decoy count ``k``.
- ``train_attacker``: constrained backdoor training with the blind loss (spec §2.1), every
  sampled attacker on its own data (``"independent"``) or the lead attacker once (``"shared"``).
- ``finalize_uploads``: for each trained attacker a benign reference ``Δ_ben`` (``ctx.train_benign``
  on its data) and norm matching ``Δ_0 <- max(1, min(||Δ_ben||/||Δ_0||, 5)) * Δ_0`` (norms over
  trainable parameters; the factor scales every float entry); indicator design on the indicator
  layer (``10*D`` candidates with the smallest ``|Δ_0| + |Δ_ben|``, then the ``D`` of smallest
  ``|H·1|``, the Hessian-vector product with the ones vector by double backward, summed over the
  clean and poisoned losses of the attackers' data); zero-sum noise masks per group on
  ``num_neurons`` rows (classes != target) of the final layer, optimised 30 SGD steps with the
  Lagrangian loss; the indicator of each upload multiplied by 1e5; ``k`` decoys trained on the
  decoy layer replace the benign uploads of the highest client ids (``is_decoy=True``).

Departures (documented choices): indicators are implanted and read only for the *sampled*
attackers (the authors read all A ids, so unsampled ids look rejected, spec §6.8); with
``"independent"`` each attacker's own norm-matched ``Δ_0`` carries its mask, the indicator
positions avoid every attacker's update (``u`` summed over attackers, ``|H·1|`` summed over their
models and data); the masks are re-centred after the optimisation so that every group sums to
exactly zero (``project_zero_sum=True``; the Lagrangian only drives the sum towards zero); decoys
are trained on the lead attacker's (lowest sampled id) data and reference model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mars_native.sim.attacks.base import RoundContext, StateDict, Upload
from mars_native.sim.attacks.common import (
    AttackerSettings,
    PoisoningAttack,
    apply_update,
    delta,
    load_model,
    model_state,
    parameter_names,
    run_epochs,
    sgd,
    train_blind,
    update_norm,
)
from mars_native.sim.triggers import PatternTrigger, poison_batch


def indicator_curvature(
    model: nn.Module,
    layer_key: str,
    x: torch.Tensor,
    y: torch.Tensor,
    stamp: Callable[[torch.Tensor], torch.Tensor],
    settings: AttackerSettings,
) -> torch.Tensor:
    """``H·1`` restricted to one parameter tensor: ``d(sum dL/dW)/dW``, accumulated over the clean
    and the poisoned-clone losses of every batch of ``(x, y)`` (model in eval mode)."""
    model.eval()
    weight = dict(model.named_parameters())[layer_key]
    acc = torch.zeros_like(weight)
    for start in range(0, int(x.shape[0]), settings.batch_size):
        xb, yb = x[start:start + settings.batch_size], y[start:start + settings.batch_size]
        xp, yp = poison_batch(xb, yb, stamp, settings.poison_fraction, settings.target_label)
        for xx, yy in ((xb, yb), (xp, yp)):
            loss = F.cross_entropy(model(xx), yy)
            (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
            (hv,) = torch.autograd.grad(grad.sum(), weight, allow_unused=True)
            if hv is not None:
                acc += hv.detach()
    return acc


def choose_indicators(u: torch.Tensor, curvature: torch.Tensor, count: int,
                      candidates_per_indicator: int = 10) -> torch.Tensor:
    """``count`` flat positions: among the ``candidates_per_indicator*count`` smallest ``u``, the
    ones with the smallest ``|curvature|`` (ties broken by smaller ``u``, then position)."""
    u = u.reshape(-1).double()
    c = curvature.reshape(-1).double().abs()
    if count > u.numel():
        raise ValueError(f"need {count} indicator positions, the layer has only {u.numel()}")
    n_cand = min(u.numel(), max(count, candidates_per_indicator * count))
    cand = np.argsort(u.numpy(), kind="stable")[:n_cand]
    order = np.lexsort((cand, u.numpy()[cand], c.numpy()[cand]))
    return torch.as_tensor(cand[order[:count]], dtype=torch.long)


class ThreeDFed(PoisoningAttack):
    """3DFed: constrained training, norm matching, indicators, noise masks, decoys, adaptivity."""

    name = "3dfed"

    def __init__(
        self,
        group_size: int = 2,
        num_neurons: int = 8,
        indicator_layer: str | None = None,
        decoy_layer: str | None = None,
        final_layer: str | None = None,
        norm_cap: float = 5.0,
        indicator_scale: float = 1e5,
        indicator_zero_fill: float = 1e-2,
        indicator_threshold: float = 1e-4,
        clip_ratio: float = 0.8,
        group_accept_fraction: float = 0.8,
        candidates_per_indicator: int = 10,
        mask_sigma: float = 0.05,
        weak_dp_sigma: float = 0.01,
        weak_dp_alpha: float = 0.1,
        mask_steps: int = 30,
        mask_lr: float = 0.1,
        mask_momentum: float = 0.9,
        mask_weight_decay: float = 5e-4,
        c_up: float = 0.1,
        c_norm: float = 0.08,
        c_lag: float = 0.1,
        lagrange_step: float = 0.1,
        alpha_min: float = 0.0,
        initial_decoys: int = 0,
        decoy_penalty: float = 10.0,
        decoy_gap: float = 10.0,
        project_zero_sum: bool = True,
        loss_weights: Sequence[float] = (0.3, 0.3, 0.4),
        pattern: PatternTrigger | None = None,
    ) -> None:
        super().__init__(pattern)
        self._remember(locals())
        if group_size < 1 or num_neurons < 1 or initial_decoys < 0:
            raise ValueError("group_size and num_neurons must be >= 1, initial_decoys >= 0")
        self.group_size = int(group_size)
        self.num_neurons = int(num_neurons)
        self.layer_names = (indicator_layer, decoy_layer, final_layer)
        self.norm_cap = float(norm_cap)
        self.indicator_scale = float(indicator_scale)
        self.indicator_zero_fill = float(indicator_zero_fill)
        self.indicator_threshold = float(indicator_threshold)
        self.clip_ratio = float(clip_ratio)
        self.group_accept_fraction = float(group_accept_fraction)
        self.candidates_per_indicator = int(candidates_per_indicator)
        self.mask_sigma = float(mask_sigma)
        self.weak_dp_sigma = float(weak_dp_sigma)
        self.weak_dp_alpha = float(weak_dp_alpha)
        self.mask_steps = int(mask_steps)
        self.mask_lr = float(mask_lr)
        self.mask_momentum = float(mask_momentum)
        self.mask_weight_decay = float(mask_weight_decay)
        self.c_up = float(c_up)
        self.c_norm = float(c_norm)
        self.c_lag = float(c_lag)
        self.lagrange_step = float(lagrange_step)
        self.alpha_min = float(alpha_min)
        self.initial_decoys = int(initial_decoys)
        self.decoy_penalty = float(decoy_penalty)
        self.decoy_gap = float(decoy_gap)
        self.project_zero_sum = bool(project_zero_sum)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self._reset_state()

    def _reset_state(self) -> None:
        self.num_decoys = self.initial_decoys  # k
        self.alphas: list[float] | None = None  # one per group of the previous round
        self.weak_dp = False
        self.feedback: dict | None = None  # the last indicator reading
        self._pending: dict | None = None  # indicators implanted last round
        self.details: dict = {}  # tensors of the last finalize (tests, diagnostics)
        self._layers: tuple[str, str, str] | None = None

    def setup(self, config: Any, input_shape: tuple[int, ...], normalize: Callable) -> None:
        super().setup(config, input_shape, normalize)
        self._reset_state()

    def layers(self, ctx: RoundContext) -> tuple[str, str, str]:
        """(indicator weight key, decoy weight key, final-layer prefix).

        Each is, in order of precedence: the constructor argument, the config attribute
        (``indicator_layer``, ``decoy_layer``, ``final_layer``), then automatic: the final layer
        from ``ctx.extras["final_layer"]`` / the model's ``final_layer`` attribute / its last
        ``nn.Linear``; the indicator layer = the weight of the last conv; the decoy layer = the
        weight of the last ``nn.Linear`` before the final one (the final layer itself when
        there is none). Digits: ``conv3.weight``, ``fc1.weight``, ``fc2``.
        """
        if self._layers is not None:
            return self._layers
        cfg = ctx.config
        model = ctx.make_model()
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        extras = ctx.extras if isinstance(ctx.extras, dict) else {}
        fin = (self.layer_names[2] or getattr(cfg, "final_layer", None)
               or extras.get("final_layer") or getattr(model, "final_layer", None)
               or (linears[-1] if linears else None))
        ind = (self.layer_names[0] or getattr(cfg, "indicator_layer", None)
               or (f"{convs[-1]}.weight" if convs else None))
        before = [n for n in linears if n != fin]
        dec = (self.layer_names[1] or getattr(cfg, "decoy_layer", None)
               or (f"{before[-1]}.weight" if before else f"{fin}.weight"))
        if fin is None or ind is None:
            raise ValueError("3DFed needs a conv layer (indicators) and a linear final layer")
        for key in (ind, dec, f"{fin}.weight"):
            if key not in ctx.global_state:
                raise ValueError(f"3DFed: layer {key!r} is not in the global state "
                                 f"(keys: {list(ctx.global_state)})")
        self._layers = (ind, dec, fin)
        return self._layers

    # -- feedback and adaptive tuning -----------------------------------------------------------
    def _start_round(self, ctx: RoundContext) -> None:
        super()._start_round(ctx)
        pending, self._pending = self._pending, None
        if pending is None:
            self.weak_dp = False
            return
        rng = self._seeds.rng("3dfed-alpha")
        key = pending["layer"]
        g = (ctx.global_state[key].detach().reshape(-1).double() - pending["theta_prev"])
        recs = pending["records"]
        ratios = [float(g[r["position"]]) / r["value"] for r in recs]
        tau = self.indicator_threshold
        weak = any(r > 1 or r < -tau for r in ratios)
        status: list[str | None] = [None] * len(recs)
        alphas = list(pending["alphas"])
        if weak:
            alphas = [self.weak_dp_alpha] * len(alphas)
        else:
            rmax = max(ratios)
            status = ["r" if r <= tau else "c" if r <= self.clip_ratio * rmax else "a"
                      for r in ratios]
            dec_acc = sum(1 for r, s in zip(recs, status) if r["kind"] == "decoy" and s == "a")
            att_ok = any(s in ("a", "c") for r, s in zip(recs, status) if r["kind"] == "attacker")
            self.num_decoys = max(0, self.num_decoys - dec_acc)
            if not att_ok and dec_acc == 0:
                self.num_decoys += 1
            groups_ok = []
            for gi, _members in enumerate(pending["groups"]):
                st = [s for r, s in zip(recs, status) if r["kind"] == "attacker" and r["group"] == gi]
                groups_ok.append(bool(st) and
                                 sum(s == "a" for s in st) >= self.group_accept_fraction * len(st))
            cand = sorted(a for a, ok in zip(alphas, groups_ok) if ok)
            if len(alphas) == 1:
                if not groups_ok[0]:
                    alphas = [float(rng.uniform(0.0, 1.0))]
            elif cand and len(cand) == len(alphas):
                alphas = [float(rng.uniform(cand[0], cand[1])) for _ in alphas]
            elif cand:
                alphas = [float(rng.uniform(cand[0], cand[0] + 0.1)) for _ in alphas]
            else:
                alphas = [float(rng.uniform(0.0, 1.0)) for _ in alphas]
        self.alphas = [float(np.clip(a, 0.01, 0.99)) for a in alphas]
        self.weak_dp = weak
        self.feedback = {
            "weak_dp": weak,
            "ratios": ratios,
            "status": status,
            "kinds": [r["kind"] for r in recs],
            "client_ids": [r["client_id"] for r in recs],
            "num_decoys": self.num_decoys,
            "alphas": list(self.alphas),
        }

    # -- training -------------------------------------------------------------------------------
    def _train_one(self, ctx: RoundContext, client_id: int) -> StateDict:
        x, y = ctx.client_data(client_id)
        return train_blind(ctx, x, y, self._settings(ctx), self.pattern.stamp,
                           self._seeds.generator("3dfed-train", client_id), self.loss_weights)

    # -- masks ----------------------------------------------------------------------------------
    def optimise_masks(
        self,
        base_w: torch.Tensor,
        base_b: torch.Tensor,
        alpha: float,
        sigma: float,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise masks of one group on the selected rows.

        base_w (m, R, in), base_b (m, R): each member's norm-matched update of the selected rows.
        Returns masks of the same shapes, summing to zero over the members.
        """
        m = base_w.shape[0]
        mw = torch.randn(base_w.shape, generator=generator, dtype=torch.float32) * sigma
        mb = torch.randn(base_b.shape, generator=generator, dtype=torch.float32) * sigma
        mw = (mw - mw.mean(0, keepdim=True)).requires_grad_(True)
        mb = (mb - mb.mean(0, keepdim=True)).requires_grad_(True)
        opt = torch.optim.SGD([mw, mb], lr=self.mask_lr, momentum=self.mask_momentum,
                              weight_decay=self.mask_weight_decay)
        lam = 1.0
        for _ in range(self.mask_steps):
            opt.zero_grad(set_to_none=True)
            total = torch.cat([mw.sum(0).reshape(-1), mb.sum(0).reshape(-1)])
            lag = self.c_lag * torch.linalg.vector_norm(total)
            loss = torch.zeros(())
            for i in range(m):
                l1 = (base_w[i] + mw[i]).abs().sum(1) + (base_b[i] + mb[i]).abs()
                up = (self.c_up / l1.clamp_min(1e-12)).sum()
                nrm = self.c_norm * torch.linalg.vector_norm(
                    torch.cat([mw[i].reshape(-1), mb[i].reshape(-1)]))
                loss = loss + (alpha * up + (1 - alpha) * nrm + lam * lag) / (1 + lam)
            loss.backward()
            opt.step()
            with torch.no_grad():
                lam += self.lagrange_step * float(torch.linalg.vector_norm(
                    torch.cat([mw.sum(0).reshape(-1), mb.sum(0).reshape(-1)])))
        mw, mb = mw.detach(), mb.detach()
        if self.project_zero_sum:
            mw = mw - mw.mean(0, keepdim=True)
            mb = mb - mb.mean(0, keepdim=True)
        return mw, mb

    def _implant(self, update: StateDict, key: str, position: int) -> float:
        flat_view = update[key].view(-1)
        value = float(flat_view[position]) * self.indicator_scale
        if value == 0.0:
            value += self.indicator_zero_fill
        flat_view[position] = value
        return float(flat_view[position])

    # -- decoys ---------------------------------------------------------------------------------
    def _train_decoy(self, ctx: RoundContext, x, y, key: str, position: int, ref_value: float,
                     generator: torch.Generator) -> StateDict:
        s = self._settings(ctx)
        model = load_model(ctx, ctx.global_state)
        weight = dict(model.named_parameters())[key]
        opt = sgd(model, s.benign_lr, s.momentum, s.weight_decay)

        def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            gap = (weight.reshape(-1)[position] - ref_value).abs()
            pen = torch.where(gap <= self.decoy_gap, -self.decoy_penalty * gap, 1e-10 * gap)
            return 0.5 * (F.cross_entropy(m(xb), yb) + pen)

        run_epochs(model, x, y, opt, loss_fn, s.local_epochs, s.batch_size, generator)
        return model_state(model)

    # -- the round's uploads --------------------------------------------------------------------
    def finalize_uploads(self, ctx: RoundContext, uploads: list[Upload]) -> list[Upload]:
        self._ensure_round(ctx)
        s = self._settings(ctx)
        theta = ctx.global_state
        ind_key, dec_key, fin = self.layers(ctx)
        fw, fb = f"{fin}.weight", f"{fin}.bias"
        has_bias = fb in theta
        att_pos = [i for i, u in enumerate(uploads) if u.is_attacker and not u.is_decoy]
        if not att_pos:
            self._publish(ctx, {"attack": self.name, "attackers": 0})
            return uploads
        ids = [int(uploads[i].client_id) for i in att_pos]
        by_id = {int(uploads[i].client_id): uploads[i] for i in att_pos}
        lead = min(ids)
        trainers = [lead] if s.protocol == "shared" else sorted(ids)
        src = {cid: (lead if s.protocol == "shared" else cid) for cid in ids}
        names = parameter_names(ctx.make_model())

        # 1. benign reference and norm matching, per trained attacker
        d0, dben, ref_states, factors = {}, {}, {}, {}
        curv = torch.zeros_like(theta[ind_key], dtype=torch.float64)
        for cid in trainers:
            raw = by_id[cid].state
            x, y = ctx.client_data(cid)
            ref_states[cid] = ctx.train_benign(theta, x, y)
            dben[cid] = delta(ref_states[cid], theta)
            d = delta(raw, theta)
            n0, nb = float(update_norm(d, names)), float(update_norm(dben[cid], names))
            ratio = self.norm_cap if n0 == 0.0 else min(nb / n0, self.norm_cap)
            factors[cid] = max(ratio, 1.0)
            d0[cid] = {k: v * factors[cid] for k, v in d.items()}
            model = load_model(ctx, raw)
            curv += indicator_curvature(model, ind_key, x, y, self.pattern.stamp, s).abs().double()

        # 2. indicator positions
        k = self.num_decoys
        n_att = len(ids)
        u = sum(d0[c][ind_key].abs().double() + dben[c][ind_key].abs().double() for c in trainers)
        positions = choose_indicators(u, curv, n_att + k, self.candidates_per_indicator)

        # 3. groups, alphas, masks
        rng = self._seeds.rng("3dfed-groups")
        order = [int(c) for c in rng.permutation(np.array(sorted(ids)))]
        groups = [order[i:i + self.group_size] for i in range(0, n_att, self.group_size)]
        alphas = list(self.alphas or [])
        alpha_rng = self._seeds.rng("3dfed-alpha-init")
        while len(alphas) < len(groups):
            alphas.append(float(alpha_rng.uniform(self.alpha_min, 1.0)))
        alphas = [float(np.clip(a, 0.01, 0.99)) for a in alphas[:len(groups)]]
        self.alphas = alphas
        num_classes = int(theta[fw].shape[0])
        others = [c for c in range(num_classes) if c != s.target_label]
        sigma = self.weak_dp_sigma if self.weak_dp else self.mask_sigma
        new_states: dict[int, StateDict] = {}
        records, masks, rows_of = [], {}, {}
        for gi, members in enumerate(groups):
            rows = sorted(int(r) for r in rng.choice(
                np.array(others), size=min(self.num_neurons, len(others)), replace=False))
            rows_t = torch.as_tensor(rows, dtype=torch.long)
            base_w = torch.stack([d0[src[c]][fw][rows_t] for c in members]).float()
            base_b = (torch.stack([d0[src[c]][fb][rows_t] for c in members]).float()
                      if has_bias else torch.zeros(len(members), len(rows)))
            mw, mb = self.optimise_masks(base_w, base_b, alphas[gi], sigma,
                                         self._seeds.generator("3dfed-mask", gi))
            for i, cid in enumerate(members):
                upd = {kk: v.clone() for kk, v in d0[src[cid]].items()}
                upd[fw][rows_t] += mw[i].to(upd[fw].dtype)
                if has_bias:
                    upd[fb][rows_t] += mb[i].to(upd[fb].dtype)
                masks[cid] = (mw[i], mb[i])
                rows_of[cid] = rows
                p = int(positions[order.index(cid)])
                value = self._implant(upd, ind_key, p)
                records.append({"kind": "attacker", "client_id": cid, "group": gi,
                                "position": p, "value": value})
                new_states[cid] = apply_update(theta, upd, by_id[cid].state)

        # 4. decoys in the benign slots of the highest client ids
        out = [dataclasses.replace(u_, state=new_states[int(u_.client_id)])
               if (u_.is_attacker and not u_.is_decoy) else u_ for u_ in uploads]
        slots = sorted((i for i, u_ in enumerate(out) if not u_.is_attacker and not u_.is_decoy),
                       key=lambda i: -int(out[i].client_id))[:k]
        decoy_slots = []
        if slots:
            diff = (d0[lead][dec_key] - dben[lead][dec_key]).abs().reshape(-1).double().numpy()
            qs = np.argsort(diff, kind="stable")[:len(slots)]
            ref_flat = ref_states[lead][dec_key].reshape(-1)
            x, y = ctx.client_data(lead)
            for j, (slot, q) in enumerate(zip(slots, qs)):
                state = self._train_decoy(ctx, x, y, dec_key, int(q), float(ref_flat[int(q)]),
                                          self._seeds.generator("3dfed-decoy", j))
                upd = delta(state, theta)
                p = int(positions[n_att + j])
                value = self._implant(upd, ind_key, p)
                records.append({"kind": "decoy", "client_id": int(out[slot].client_id),
                                "group": -1, "position": p, "value": value})
                out[slot] = Upload(client_id=out[slot].client_id,
                                   state=apply_update(theta, upd, state),
                                   num_examples=out[slot].num_examples,
                                   is_attacker=False, is_decoy=True)
                decoy_slots.append(int(out[slot].client_id))

        # 5. remember theta_prev and the indicators for next round's feedback
        self._pending = {
            "layer": ind_key,
            "theta_prev": theta[ind_key].detach().reshape(-1).double().clone(),
            "records": records,
            "groups": groups,
            "alphas": list(alphas),
        }
        self.details = {"delta0": {c: d0[src[c]] for c in ids}, "factors": dict(factors),
                        "masks": masks, "rows": rows_of, "groups": groups,
                        "positions": positions, "records": records, "layers": (ind_key, dec_key, fin)}
        self._publish(ctx, {
            "attack": self.name, "protocol": s.protocol, "attackers": n_att,
            "norm_factors": {str(c): f for c, f in factors.items()},
            "groups": groups, "alphas": alphas, "weak_dp": self.weak_dp, "num_decoys": k,
            "decoy_slots": decoy_slots, "feedback": self.feedback,
        })
        return out
