"""Detection and defense metrics (spec section 4), and backdoor-energy diagnostics.

Per round, from the ground truth of the uploads (``Upload.is_attacker``; 3DFed decoys count as
benign) and the defense's ``flagged`` vector:

- TPR = flagged attacker uploads / attacker uploads; a round without attacker uploads has
  TPR := 1 (nothing was missed; the paper reports 100 at 0% attackers);
- FPR = flagged benign uploads / benign uploads; a round without benign uploads has FPR := 0;
- a defense that does not flag clients (FedCLP: ``flagged is None``) has no TPR/FPR; FedAvg flags
  nobody (TPR = 0 when attackers are present, FPR = 0).

Over the attack window: TPR and FPR are averaged over the rounds; ACC and ASR are reported at the
final round (headline) and averaged over the rounds; CAD = (ACC + (1 - ASR) + TPR + (1 - FPR)) / 4
from the final ACC/ASR and the averaged TPR/FPR (``cad_mean`` uses the averaged ACC/ASR);
without TPR/FPR (FedCLP): CAD = (ACC + (1 - ASR)) / 2. All rates are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["cad", "detection_rates", "energy_terms", "summarize_rounds", "upload_cbe"]


def detection_rates(
    flagged: Sequence[bool] | np.ndarray | None, is_attacker: Sequence[bool] | np.ndarray
) -> tuple[float | None, float | None]:
    """(TPR, FPR) of one round; ``(None, None)`` when the defense does not flag clients."""
    if flagged is None:
        return None, None
    flagged = np.asarray(flagged, dtype=bool).reshape(-1)
    truth = np.asarray(is_attacker, dtype=bool).reshape(-1)
    if flagged.shape != truth.shape:
        raise ValueError(f"flagged has {flagged.size} entries for {truth.size} uploads")
    n_att = int(truth.sum())
    n_ben = int((~truth).sum())
    tpr = 1.0 if n_att == 0 else float((flagged & truth).sum()) / n_att
    fpr = 0.0 if n_ben == 0 else float((flagged & ~truth).sum()) / n_ben
    return tpr, fpr


def cad(acc: float, asr: float, tpr: float | None, fpr: float | None) -> float:
    """Comprehensive ability of defense, a fraction: 4 terms, or 2 without TPR/FPR."""
    if tpr is None or fpr is None:
        return (acc + (1.0 - asr)) / 2.0
    return (acc + (1.0 - asr) + tpr + (1.0 - fpr)) / 4.0


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def summarize_rounds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Window metrics from per-round records (keys ``acc``, ``asr``, ``tpr``, ``fpr``,
    ``detect_seconds``). Returns acc/asr (final), acc_mean/asr_mean, tpr/fpr (means; None
    when undefined), cad (final ACC/ASR + mean TPR/FPR), cad_mean, detect_seconds (mean)."""
    if not records:
        return {"acc": None, "asr": None, "acc_mean": None, "asr_mean": None, "tpr": None,
                "fpr": None, "cad": None, "cad_mean": None, "detect_seconds": None}
    last = records[-1]
    tpr = _mean(r.get("tpr") for r in records)
    fpr = _mean(r.get("fpr") for r in records)
    acc_mean = _mean(r["acc"] for r in records)
    asr_mean = _mean(r["asr"] for r in records)
    return {
        "acc": last["acc"],
        "asr": last["asr"],
        "acc_mean": acc_mean,
        "asr_mean": asr_mean,
        "tpr": tpr,
        "fpr": fpr,
        "cad": cad(last["acc"], last["asr"], tpr, fpr),
        "cad_mean": cad(acc_mean, asr_mean, tpr, fpr),
        "detect_seconds": _mean(r.get("detect_seconds") for r in records),
    }


# -- energy diagnostics --------------------------------------------------------------------------
def upload_cbe(state: dict, kappa: float = 0.05, reference: dict | None = None) -> np.ndarray:
    """The concentrated backdoor energy of one uploaded state (paper mode), for diagnostics.

    Uses :func:`mars_native.energy.concentrated_backdoor_energy` (the package's MARS core); when
    the compiled core is unavailable, an equivalent torch computation (conv followed by BN, paired
    by name ``convX``/``bnX``): BE_k = sigma_max(W_k reshaped (C_in, kh*kw)) * |gamma_k| /
    sqrt(var_k + 1e-5), top ``max(1, ceil(kappa * n))`` per layer, sorted descending.
    """
    try:
        from mars_native.energy import concentrated_backdoor_energy
    except ImportError:
        return _torch_cbe(state, kappa)
    return np.asarray(concentrated_backdoor_energy(state, kappa=kappa, reference=reference))


def _torch_cbe(state: dict, kappa: float) -> np.ndarray:
    import torch

    parts = []
    for key, w in state.items():
        if not key.endswith(".weight") or w.dim() < 3:
            continue
        prefix = key[: -len(".weight")]
        head, _, name = prefix.rpartition(".")
        bn = (head + "." if head else "") + name.replace("conv", "bn")
        w64 = w.detach().to(torch.float64)
        be = torch.linalg.matrix_norm(w64.reshape(w64.shape[0], w64.shape[1], -1), ord=2)
        if f"{bn}.weight" in state and f"{bn}.running_var" in state:
            gamma = state[f"{bn}.weight"].detach().to(torch.float64)
            var = state[f"{bn}.running_var"].detach().to(torch.float64).clamp_min(0)
            be = be * gamma.abs() / torch.sqrt(var + 1e-5)
        k = max(1, math.ceil(kappa * be.numel()))
        parts.append(torch.sort(be, descending=True).values[:k])
    if not parts:
        raise ValueError("no conv layer to score")
    return torch.cat(parts).numpy()


def energy_terms(state: dict, kappa: float = 0.05, reference: dict | None = None) -> dict:
    """Why a model's backdoor energy is what it is: per scored conv layer, the mean over its
    top-``kappa`` BE channels of BE, of the weight term sigma_max(W_k) and of the BatchNorm term
    |gamma_k| / sqrt(var_k + 1e-5), plus the layer means of sigma_max and of running_var.

    Returns ``{layer: {"be": ..., "sigma": ..., "bn_scale": ..., "sigma_mean": ...,
    "running_var_mean": ...}}`` (floats). BE = sigma * bn_scale, so a model can have larger
    weights (sigma) yet a lower BE when its BatchNorm running variance grew.
    """
    import torch

    try:
        from mars_native import find_layers

        layers = [(ly.weight_key, ly.bn_prefix, ly.name) for ly in
                  find_layers(state, reference=reference) if ly.kind == "conv"]
    except ImportError:  # pragma: no cover - the compiled core is missing
        layers = []
        for key, w in state.items():
            if key.endswith(".weight") and w.dim() >= 3:
                prefix = key[: -len(".weight")]
                head, _, name = prefix.rpartition(".")
                bn = (head + "." if head else "") + name.replace("conv", "bn")
                layers.append((key, bn if f"{bn}.running_var" in state else None, prefix))
    out = {}
    for weight_key, bn, name in layers:
        w = torch.as_tensor(state[weight_key]).detach().to(torch.float64)
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
        if bn is not None:
            gamma = torch.as_tensor(state[f"{bn}.weight"]).detach().to(torch.float64)
            var = torch.as_tensor(state[f"{bn}.running_var"]).detach().to(torch.float64)
            var = torch.nan_to_num(var, nan=0.0).clamp_min(0)
            scale = gamma.abs() / torch.sqrt(var + 1e-5)
        else:
            var = torch.ones_like(sigma)
            scale = torch.ones_like(sigma)
        be = sigma * scale
        k = max(1, math.ceil(kappa * be.numel() - 1e-9))
        top = torch.topk(be, k).indices
        out[name] = {
            "be": float(be[top].mean()),
            "sigma": float(sigma[top].mean()),
            "bn_scale": float(scale[top].mean()),
            "sigma_mean": float(sigma.mean()),
            "running_var_mean": float(var.mean()),
        }
    return out
