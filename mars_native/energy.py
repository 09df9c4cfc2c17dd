"""Backdoor energy (BE) per neuron and concentrated backdoor energy (CBE) per model.

BE of output channel ``k`` of a conv followed by a BatchNorm (the paper's eq. 3, its Lipschitz
upper bound)::

    BE_k = sigma_max(W[k] reshaped to (in_per_group, prod(kernel))) * |gamma_k| / sqrt(var_k + eps)

A conv without a following BN uses scale 1; a Linear neuron's BE is ``||W[k, :]||_2``. The CBE
concatenates, layer by layer, the top ``kappa`` share of each layer's BE values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mars_native import _core, _cuda
from mars_native._arrays import as_float_array, to_numpy
from mars_native._native import _real_number, _threads, top_k_energy
from mars_native.layers import Layer, find_layers
from mars_native.validation import on_device

Mode = Literal["paper", "official"]


def _check_mode(mode: str) -> None:
    if mode not in ("paper", "official"):
        raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")


def bn_scale(
    state_dict: Mapping[str, Any], bn_prefix: str, bn_eps: float = 1e-5, mode: Mode = "paper"
) -> np.ndarray:
    """``|gamma| / sqrt(var + eps)`` of the BatchNorm ``bn_prefix``, shape (features,), float64.

    ``var`` below 0 is clipped to 0 (``max(var, 0)``, both modes); in ``mode="official"`` a NaN
    ``running_var`` is treated as 0 like the authors' code. A BN without affine weight has
    gamma = 1.
    """
    return _bn_scales(state_dict, [bn_prefix], bn_eps, mode)[0]


def _bn_scales(
    state_dict: Mapping[str, Any], bn_prefixes: Sequence[str], bn_eps: float, mode: Mode
) -> list[np.ndarray]:
    """:func:`bn_scale` of several BatchNorms of one model, computed in one vectorised pass over
    their concatenated parameters (the same values, element for element)."""
    return _bn_scales_many([(state_dict, bn_prefixes)], bn_eps, mode)[0]


def _bn_scales_many(
    groups: Sequence[tuple[Mapping[str, Any], Sequence[str]]], bn_eps: float, mode: Mode
) -> list[list[np.ndarray]]:
    """:func:`_bn_scales` of several models (``(state_dict, bn_prefixes)`` each), all in one
    vectorised pass: one list of scales per model, the same values element for element."""
    return _bn_scales_flat(groups, bn_eps, mode)[0]


def _bn_scales_flat(
    groups: Sequence[tuple[Mapping[str, Any], Sequence[str]]], bn_eps: float, mode: Mode
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """:func:`_bn_scales_many`, and the one float64 array every scale is a view of."""
    variances, gammas = [], []
    names: dict[int, list[tuple[str, str, str]]] = {}  # id(bn_prefixes) -> (prefix, var, gamma keys)
    for state_dict, bn_prefixes in groups:
        keys = names.get(id(bn_prefixes))
        if keys is None:  # (the models of a round usually share one list of prefixes)
            keys = names[id(bn_prefixes)] = [
                (p, f"{p}.running_var", f"{p}.weight") if p else (p, "running_var", "weight")
                for p in bn_prefixes]
        for bn_prefix, vkey, gkey in keys:
            var = state_dict[vkey]
            if type(var) is not np.ndarray or var.ndim != 1:  # (NumPy vectors are used as they are)
                var = to_numpy(var, name=vkey).reshape(-1)
            gamma = state_dict[gkey] if gkey in state_dict else np.ones(var.size)
            if type(gamma) is not np.ndarray or gamma.ndim != 1:
                gamma = to_numpy(gamma, name=gkey).reshape(-1)
            if gamma.size != var.size:
                raise ValueError(f"BatchNorm {bn_prefix!r}: weight has {gamma.size} values but "
                                 f"running_var has {var.size}")
            variances.append(var)
            gammas.append(gamma)
    if not variances:
        return [[] for _ in groups], np.empty(0)
    var = np.concatenate(variances, dtype=np.float64, casting="same_kind")
    if mode == "official":
        var[np.isnan(var)] = 0.0
    np.maximum(var, 0.0, out=var)
    gamma = np.abs(np.concatenate(gammas, dtype=np.float64, casting="same_kind"))
    var += bn_eps
    np.sqrt(var, out=var)
    with np.errstate(over="ignore"):  # an overflow gives inf, which callers reject by name
        scale = np.divide(gamma, var, out=gamma)
    out: list[list[np.ndarray]] = []
    start = 0
    sizes = iter([v.size for v in variances])
    for _, bn_prefixes in groups:
        model = []
        for _ in bn_prefixes:
            size = next(sizes)
            model.append(scale[start:start + size])
            start += size
        out.append(model)
    return out, scale


def _layers(
    state_dict: Mapping[str, Any],
    layers: Sequence[Layer] | None,
    include_linear: bool,
    reference: Mapping[str, Any] | None,
    layer_map: Any,
    mode: Mode,
) -> list[Layer]:
    if layers is not None:
        return list(layers)
    official = mode == "official"
    return find_layers(
        state_dict,
        include_linear=include_linear and not official,
        reference=reference,
        layer_map=layer_map,
        require_bn=official,
    )


def backdoor_energy(
    state_dict: Mapping[str, Any],
    *,
    include_linear: bool = False,
    reference: Mapping[str, Any] | None = None,
    layer_map: Any = None,
    layers: Sequence[Layer] | None = None,
    bn_eps: float = 1e-5,
    mode: Mode = "paper",
    n_threads: int | None = None,
) -> dict[str, np.ndarray]:
    """BE of every neuron of every scored layer.

    Args:
        state_dict: name -> NumPy array or torch tensor (read without copies when float32/64).
        include_linear: also score Linear layers (off by default, like the paper).
        reference, layer_map: see :func:`mars_native.find_layers` (conv -> BN pairing).
        layers: precomputed ``find_layers`` result (skips the search).
        bn_eps: the BatchNorm epsilon.
        mode: "paper", or "official" (only convs directly followed by a BN; NaN var -> 0).
        n_threads: threads for the spectral norms (None: library default).

    Returns:
        layer name -> BE values, float64 array of shape (out_channels,), in layer order (on the
        GPU, as device arrays, when the state_dict holds CUDA tensors).
    """
    _check_mode(mode)
    found = _layers(state_dict, layers, include_linear, reference, layer_map, mode)
    if on_device(state_dict):
        return _cuda.backdoor_energy_cuda(state_dict, found, bn_eps=bn_eps, mode=mode)
    return _energies_many([state_dict], [found], bn_eps, mode, n_threads)[0]


def layer_inputs(
    state_dict: Mapping[str, Any], layers: Sequence[Layer], bn_eps: float = 1e-5, mode: Mode = "paper"
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """What the spectral kernel reads for ``layers`` of one model: per layer the weight (a
    Linear's ``(out, in)`` viewed as ``(out, in, 1)``; float32/float64 without a copy) and its
    BN scale (float64 ``(out,)``, or None without a BN).

    Raises ``TypeError`` for a non-float weight and ``ValueError`` naming the BN when its scale
    is not finite (e.g. ``|gamma|`` near the float64 maximum).
    """
    return _layer_inputs_many([state_dict], [layers], bn_eps, mode)[0]


def _scored_weights(state_dict: Mapping[str, Any], layers: Sequence[Layer]) -> list[np.ndarray]:
    weights: list[np.ndarray] = []
    for layer in layers:
        weight = as_float_array(state_dict[layer.weight_key], name=layer.weight_key)
        if layer.kind == "linear":
            weight = weight.reshape(weight.shape[0], weight.shape[1], 1)
        weights.append(weight)
    return weights


def _layer_inputs_many(
    states: Sequence[Mapping[str, Any]], layers: Sequence[Sequence[Layer]], bn_eps: float, mode: Mode
) -> list[tuple[list[np.ndarray], list[np.ndarray | None]]]:
    """:func:`layer_inputs` of several host models (``layers[i]`` for ``states[i]``), the BN
    scales of all of them in one vectorised pass; the same arrays, value for value. An error is
    the one the first failing model raises on its own (the models are then taken one by one)."""
    if len(states) > 1:
        try:
            return _layer_inputs_batch(states, layers, bn_eps, mode)
        except (TypeError, ValueError, KeyError):
            pass  # let the first failing model say why, as layer_inputs would
        return [_layer_inputs_batch([s], [found], bn_eps, mode)[0] for s, found in zip(states, layers)]
    return _layer_inputs_batch(states, layers, bn_eps, mode)


def _layer_inputs_batch(
    states: Sequence[Mapping[str, Any]], layers: Sequence[Sequence[Layer]], bn_eps: float, mode: Mode
) -> list[tuple[list[np.ndarray], list[np.ndarray | None]]]:
    weights = [_scored_weights(state, found) for state, found in zip(states, layers)]
    prefixes: dict[int, list[str]] = {}  # id(layers) -> its BN prefixes (one list per layer list)
    groups = []
    for state, found in zip(states, layers):
        bns = prefixes.get(id(found))
        if bns is None:
            bns = prefixes[id(found)] = [layer.bn_prefix for layer in found if layer.bn_prefix is not None]
        groups.append((state, bns))
    bn_scales, flat = _bn_scales_flat(groups, bn_eps, mode)
    out = []
    for found, w, model_scales in zip(layers, weights, bn_scales):
        bn = iter(model_scales)
        out.append((w, [next(bn) if layer.bn_prefix is not None else None for layer in found]))
    # (The scales are views of one array: one finiteness test for all of them.)
    if not np.isfinite(flat).all():
        for found, (_, scales) in zip(layers, out):
            for layer, sc in zip(found, scales):
                if sc is not None and not np.isfinite(sc).all():
                    raise ValueError(f"BatchNorm {layer.bn_prefix!r} of {layer.weight_key!r} has a "
                                     "non-finite scale |gamma| / sqrt(var + eps)")
    return out


def _energies_many(
    states: Sequence[Mapping[str, Any]],
    layers: Sequence[Sequence[Layer]],
    bn_eps: float,
    mode: Mode,
    n_threads: int | None,
    kappa: float | None = None,
) -> list[dict[str, np.ndarray]]:
    """BE of the host models ``states[i]`` (scored layers ``layers[i]``) in one native call
    (``kappa``: only for the CBE, see :func:`score_inputs`)."""
    return score_inputs(_layer_inputs_many(states, layers, bn_eps, mode), layers, n_threads, kappa=kappa)


def cbe_keep(out: int, kappa: float) -> int:
    """How many of a layer's ``out`` BE values the CBE can read, for both rules: at most
    ``ceil(kappa * out) + 2`` (the paper's ``ceil`` count, or the one or two order statistics the
    ``(1 - kappa)`` quantile interpolates between and the values above them, with one value to
    spare for the rounding of ``kappa * out``), capped at ``out``. -1 (every value) for a
    ``kappa`` outside (0, 1], which the top-k then rejects."""
    if not (isinstance(kappa, (int, float)) and 0.0 < kappa <= 1.0):
        return -1
    return min(int(out), math.ceil(kappa * out) + 2)


def score_inputs(
    inputs: Sequence[tuple[list[np.ndarray], list[np.ndarray | None]]],
    layers: Sequence[Sequence[Layer]],
    n_threads: int | None,
    *,
    kappa: float | None = None,
) -> list[dict[str, np.ndarray]]:
    """BE of several models from their :func:`layer_inputs` (``inputs[i]`` for the layers
    ``layers[i]``): layer name -> values per model, every layer of every model in one native call
    (one parallel region, GIL released once; bit-identical to channel_spectral_norms per layer,
    without the per-layer and per-model call and thread start-up costs).

    ``kappa`` (for the CBE only): every layer's :func:`cbe_keep` largest values are wanted. They,
    and every value at or above the ``cbe_keep``-th largest, are exact (bit for bit); a channel
    the kernel certified below that value (its eigen-solve skipped) holds an upper bound of its
    BE that stays below it. :func:`concentrate` of the result is therefore the CBE, bit for bit.
    """
    weights: list[np.ndarray] = []
    scales: list[np.ndarray | None] = []
    for w, sc in inputs:
        weights += w
        scales += sc
    keep = None
    if kappa is not None:
        counts: dict[int, int] = {}  # out channels -> cbe_keep (the layers of a round repeat)
        keep = [counts[n] if n in counts else counts.setdefault(n, cbe_keep(n, kappa))
                for n in (w.shape[0] for w in weights)]
    values = iter(_core.channel_spectral_norms_batch(weights, scales, _threads(n_threads), keep))
    return [{layer.name: next(values) for layer in found} for found in layers]


def backdoor_energies(
    states: Sequence[Mapping[str, Any]],
    *,
    include_linear: bool = False,
    reference: Mapping[str, Any] | None = None,
    layer_map: Any = None,
    layers: Sequence[Layer] | None = None,
    bn_eps: float = 1e-5,
    mode: Mode = "paper",
    n_threads: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """:func:`backdoor_energy` of many models, computed together: every scored layer of every
    host model in one native call, so that the threads share the work of the whole round.

    Arguments as :func:`backdoor_energy` (``layers``, when given, applies to every model; else
    each model's layers are found on its own). Returns one dict per model, in order, with the
    same values, bit for bit, as one :func:`backdoor_energy` call per model. Models held on a
    GPU are scored on their device, one by one.
    """
    _check_mode(mode)
    states = list(states)
    found = [_layers(s, layers, include_linear, reference, layer_map, mode) for s in states]
    out: list[dict[str, np.ndarray] | None] = [None] * len(states)
    host = [i for i, s in enumerate(states) if not on_device(s)]
    for i in sorted(set(range(len(states))) - set(host)):
        out[i] = _cuda.backdoor_energy_cuda(states[i], found[i], bn_eps=bn_eps, mode=mode)
    if host:
        values = _energies_many([states[i] for i in host], [found[i] for i in host], bn_eps, mode, n_threads)
        for i, v in zip(host, values):
            out[i] = v
    return out  # type: ignore[return-value]


def concentrated_backdoor_energy(
    state_dict: Mapping[str, Any],
    kappa: float = 0.05,
    mode: Mode = "paper",
    *,
    include_linear: bool = False,
    reference: Mapping[str, Any] | None = None,
    layer_map: Any = None,
    layers: Sequence[Layer] | None = None,
    bn_eps: float = 1e-5,
    n_threads: int | None = None,
) -> np.ndarray:
    """The CBE of one model: per scored layer, the top ``kappa`` share of its BE values,
    concatenated in layer order. float64 array of shape (d,).

    ``mode="paper"`` keeps ``max(1, ceil(kappa * n))`` values per layer (sorted descending);
    ``mode="official"`` keeps every value ``>=`` the linearly interpolated ``(1 - kappa)``
    quantile (ties included) in channel order, like the authors' code.

    Raises ``ValueError`` when no layer can be scored (the message lists what was looked for).
    A state_dict of CUDA tensors is scored on its GPU; the CBE is then a device array.
    """
    _check_mode(mode)
    found = _layers(state_dict, layers, include_linear, reference, layer_map, mode)
    if on_device(state_dict):
        return _cuda.concentrated_backdoor_energy_cuda(state_dict, found, kappa, mode, bn_eps=bn_eps)
    energies = _energies_many([state_dict], [found], bn_eps, mode, n_threads, kappa=kappa)[0]
    return concentrate(energies, kappa, mode, include_linear=include_linear)


def concentrated_backdoor_energies(
    states: Sequence[Mapping[str, Any]],
    kappa: float = 0.05,
    mode: Mode = "paper",
    *,
    include_linear: bool = False,
    reference: Mapping[str, Any] | None = None,
    layer_map: Any = None,
    layers: Sequence[Layer] | None = None,
    bn_eps: float = 1e-5,
    n_threads: int | None = None,
) -> np.ndarray:
    """The CBEs of N models (one row each), float64 array of shape (N, d): the rows of
    :func:`concentrated_backdoor_energy`, bit for bit, with every layer of every model scored in
    one native call (:func:`backdoor_energies`). A server scoring a round should use this.

    Raises ``ValueError`` when ``states`` is empty, when a model has no scorable layer (the
    message names its index), or when the models' CBEs differ in length (different layers).
    """
    _check_mode(mode)
    states = list(states)
    if not states:
        raise ValueError("concentrated_backdoor_energies needs at least one state_dict; got none")
    kw = {"include_linear": include_linear, "reference": reference, "layer_map": layer_map,
          "layers": layers, "bn_eps": bn_eps}
    host = [i for i, s in enumerate(states) if not on_device(s)]
    host_energies: dict[int, dict[str, np.ndarray]] = {}
    if host:
        found = [_layers(states[i], layers, include_linear, reference, layer_map, mode) for i in host]
        host_energies = dict(zip(host, _energies_many([states[i] for i in host], found, bn_eps, mode,
                                                      n_threads, kappa=kappa)))
    rows = []
    for i, state in enumerate(states):
        try:
            if i in host_energies:
                cbe = concentrate(host_energies[i], kappa, mode, include_linear=include_linear)
            else:  # a GPU model: scored on its device, only the CBE comes back
                cbe = _cuda.to_host(concentrated_backdoor_energy(state, kappa, mode, **kw))
        except ValueError as exc:
            raise ValueError(f"states[{i}]: {exc}") from exc
        rows.append(np.asarray(cbe, dtype=np.float64))
        if rows[-1].shape != rows[0].shape:
            raise ValueError(f"states[{i}] has a CBE of length {rows[-1].size} but states[0] has "
                             f"{rows[0].size}: the models score different layers")
    return np.stack(rows)


def concentrate(
    energies: Mapping[str, np.ndarray],
    kappa: float = 0.05,
    mode: Mode = "paper",
    *,
    include_linear: bool = False,
) -> np.ndarray:
    """The CBE from per-layer BE values (:func:`backdoor_energy`'s output): the top ``kappa``
    share of every layer, concatenated in layer order (rules: :func:`concentrated_backdoor_energy`).

    Raises ``ValueError`` when there is no layer (or only empty ones), or a BE is NaN/Inf.
    """
    _check_mode(mode)
    kappa = _real_number(kappa, "kappa")
    if not energies:
        what = "conv layers followed by a BatchNorm" if mode == "official" else "conv (ndim >= 3) weights"
        raise ValueError(f"no scorable layer: the state_dict has no {what}" + (
            "" if include_linear or mode == "official" else " (pass include_linear=True to score Linear layers)"
        ))
    rule = "ceil" if mode == "paper" else "quantile"
    values = [be for be in energies.values() if be.size]
    # BE arrays from the CPU kernel (float64, contiguous) go straight to the compiled top-k (it
    # checks kappa and the values), all layers in one call; anything else through the public
    # wrapper, layer by layer.
    if values and all(type(be) is np.ndarray and be.dtype == np.float64 and be.flags.c_contiguous
                      for be in values):
        return _core.top_k_concat(values, kappa, rule)
    parts = [_core.top_k_energy(be, kappa, rule)
             if type(be) is np.ndarray and be.dtype == np.float64 and be.flags.c_contiguous
             else top_k_energy(be, kappa, rule=rule)
             for be in energies.values() if be.size]
    if not parts:
        raise ValueError("no scorable layer: every scored layer has zero output channels")
    return np.concatenate(parts)
