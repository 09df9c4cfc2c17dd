"""MRA, the model replacement attack (spec §2.1–2.2), in its constrain-and-scale form.

Each attacker copies theta and trains ``attacker_epochs`` with the blind loss
``0.3*CE(clean) + 0.3*CE(poisoned clone) + 0.4*||w - w_G||_2`` (un-squared, trainable parameters
only) and the attacker optimiser (SGD ``attacker_lr``, momentum, weight decay). The upload is
``theta + gamma * (w - theta)`` on every float state entry, BN running statistics included;
``num_batches_tracked`` keeps the trained value. With ``attacker_protocol="independent"`` every
sampled attacker trains on its own data; with ``"shared"`` the lead attacker trains once and every
sampled attacker uploads the same scaled state (the authors' code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mars_native.sim.attacks.base import RoundContext, StateDict, Upload
from mars_native.sim.attacks.common import PoisoningAttack, scale_local, train_blind
from mars_native.sim.triggers import PatternTrigger


class MRA(PoisoningAttack):
    """Model replacement: blind-loss training, then the update scaled by ``gamma`` (digits: 5)."""

    name = "mra"

    def __init__(
        self,
        gamma: float = 5.0,
        loss_weights: Sequence[float] = (0.3, 0.3, 0.4),
        pattern: PatternTrigger | None = None,
    ) -> None:
        super().__init__(pattern)
        self._remember(locals())
        self.gamma = float(gamma)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        if len(self.loss_weights) != 3:
            raise ValueError("loss_weights = (clean CE, poisoned CE, distance), three numbers")

    def _train_one(self, ctx: RoundContext, client_id: int) -> StateDict:
        x, y = ctx.client_data(client_id)
        return train_blind(
            ctx, x, y, self._settings(ctx), self.pattern.stamp,
            self._seeds.generator("mra-train", client_id), self.loss_weights,
        )

    def finalize_uploads(self, ctx: RoundContext, uploads: list[Upload]) -> list[Upload]:
        out = []
        for u in uploads:
            if u.is_attacker and not u.is_decoy:
                u = dataclasses.replace(u, state=scale_local(ctx.global_state, u.state, self.gamma))
            out.append(u)
        self._publish(ctx, {"attack": self.name, "gamma": self.gamma,
                            "protocol": self._settings(ctx).protocol})
        return out
