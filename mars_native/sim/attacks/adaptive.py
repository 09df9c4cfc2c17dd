"""The adaptive attack against MARS (paper eq. 6, spec §2.5).

``form="paper"`` (default), eq. 6: each attacker minimises
``0.5*[CE(f(x), y) + CE(f(x'), y')] + lam * sum_l sum_k BE_k^(l)``, where the CE is the mean over
D-hat = the clean batch and its poisoned clone (equal weight), and
``BE_k = sigma_max(W_k as (C_in, kh*kw)) * |gamma_k| / sqrt(running_var_k + 1e-5)`` for every conv
directly followed by a BatchNorm (pairs found from the module structure, see
:func:`~mars_native.sim.attacks.common.conv_bn_pairs`), differentiable through
``torch.linalg.matrix_norm(ord=2)``. ``lam`` default 0.01 (the paper sweeps 1e-4 ... 0.1).

``form="official"`` (the authors' bytecode): ``0.3*CE(clean) + 0.3*CE(poisoned) + 0*||w - w_G||
+ lam * sum_{params named *weight*} sigma_max(W as (out, -1))^2`` with ``lam`` default 1e-4.

Both upload the unscaled update; attacker optimiser and epochs as for MRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mars_native.sim.attacks.base import RoundContext, StateDict
from mars_native.sim.attacks.common import (
    PoisoningAttack,
    conv_bn_pairs,
    load_model,
    model_state,
    run_epochs,
    sgd,
    total_backdoor_energy,
)
from mars_native.sim.triggers import PatternTrigger, poison_batch

FORMS = ("paper", "official")


def weight_spectral_penalty(model: nn.Module) -> torch.Tensor:
    """Official form: sum over parameters whose name contains "weight" of
    ``sigma_max(W reshaped (out, -1))**2`` (BN weights and linear layers included)."""
    terms = [
        torch.linalg.matrix_norm(p.reshape(p.shape[0], -1), ord=2).pow(2)
        for name, p in model.named_parameters()
        if "weight" in name and p.requires_grad and p.dim() >= 1
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class AdaptiveAttack(PoisoningAttack):
    """Backdoor training with a backdoor-energy regulariser (MARS-aware adversary)."""

    name = "adaptive"

    def __init__(
        self,
        lam: float | None = None,
        form: str = "paper",
        bn_eps: float = 1e-5,
        pattern: PatternTrigger | None = None,
    ) -> None:
        super().__init__(pattern)
        self._remember(locals())
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.lam = float(lam) if lam is not None else (0.01 if form == "paper" else 1e-4)
        if self.lam < 0:
            raise ValueError("lam must be >= 0")
        self.bn_eps = float(bn_eps)
        self._params["lam"] = self.lam

    def regulariser(self, model: nn.Module, pairs=None) -> torch.Tensor:
        """The penalty (without ``lam``) of this attack's form, differentiable."""
        if self.form == "paper":
            return total_backdoor_energy(model, pairs, self.bn_eps)
        return weight_spectral_penalty(model)

    def _train_one(self, ctx: RoundContext, client_id: int) -> StateDict:
        s = self._settings(ctx)
        x, y = ctx.client_data(client_id)
        model = load_model(ctx, ctx.global_state)
        pairs = conv_bn_pairs(model) if self.form == "paper" else None
        opt = sgd(model, s.lr, s.momentum, s.weight_decay)
        w_clean, w_poison = (0.5, 0.5) if self.form == "paper" else (0.3, 0.3)

        def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            xp, yp = poison_batch(xb, yb, self.pattern.stamp, s.poison_fraction, s.target_label)
            loss = w_clean * F.cross_entropy(m(xb), yb) + w_poison * F.cross_entropy(m(xp), yp)
            if self.lam > 0:
                loss = loss + self.lam * self.regulariser(m, pairs)
            return loss

        gen = self._seeds.generator("adaptive-train", client_id)
        run_epochs(model, x, y, opt, loss_fn, s.epochs, s.batch_size, gen)
        return model_state(model)

    def finalize_uploads(self, ctx, uploads):
        self._publish(ctx, {"attack": self.name, "form": self.form, "lam": self.lam,
                            "protocol": self._settings(ctx).protocol})
        return uploads
