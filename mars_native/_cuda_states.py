"""State-dict level operations of the CUDA backend: BatchNorm scales, backdoor energy (BE) and
concentrated backdoor energy (CBE) of client models held on a GPU, finiteness checks and the
aggregation of accepted models, all without copying weights to the host. Re-exported by
:mod:`mars_native._cuda`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mars_native import _core
from mars_native._arrays import to_numpy
from mars_native._cuda import (
    _spectral_launch,
    _top_k_many,
    channel_spectral_norms_batched_cuda,
    weighted_mean_cuda,
)
from mars_native._cuda_arrays import (
    FLOAT_DTYPES,
    TorchArrays,
    array_shape,
    check_kappa,
    dtype_name,
    float_input,
    is_cuda_array,
    is_torch_cuda,
    library,
    require_backend,
)

__all__ = [
    "aggregate_states_cuda",
    "backdoor_energy_cuda",
    "bn_scale_cuda",
    "concentrated_backdoor_energy_batch_cuda",
    "concentrated_backdoor_energy_cuda",
    "device_template",
    "non_finite_keys",
]


def aggregate_states_cuda(states: Sequence[Mapping[str, Any]], weights: Any = None,
                          global_state: Mapping[str, Any] | None = None,
                          server_lr: float = 1.0) -> dict[str, Any]:
    """The aggregated model of (already accepted) client states held on one GPU, with the rules of
    :mod:`mars_native.aggregation`: float tensors are the weighted mean in float64 accumulation
    (``global + server_lr * (mean - global)`` with a global model), rounded once to float32 for
    float32/16/bf16 tensors and cast back to each tensor's dtype; non-float tensors (e.g.
    ``num_batches_tracked``) are copied from the global model, or are the element-wise maximum
    over the clients. Keys, key order and dtypes follow the global model, else ``states[0]``;
    results stay on the device. ``weights``: as in :func:`weighted_mean_cuda`."""
    require_backend()
    states = list(states)
    if not states:
        raise ValueError("states must not be empty")
    template = global_state if global_state is not None else states[0]
    out: dict[str, Any] = {}
    keys = template.keys()
    for key in keys:
        ref_t = template[key]
        lib = library(ref_t, key)
        name = lib.dtype_name(ref_t)
        if name in FLOAT_DTYPES:
            mean = weighted_mean_cuda(
                [s[key] for s in states], weights,
                base=None if global_state is None else global_state[key], server_lr=server_lr,
                out_dtype="float64" if name == "float64" else "float32")
            out[key] = mean if lib.dtype_name(mean) == name else lib.cast_like(mean, ref_t)
        elif global_state is not None:
            out[key] = lib.copy(global_state[key])
        else:
            vals = [lib.on_device(s[key], key) for s in states]
            acc = lib.copy(vals[0])
            for v in vals[1:]:
                acc = lib.maximum(acc, v)
            out[key] = acc
    return out


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Keys of the float tensors of a device state that hold NaN or Inf, in key order (the
    checks run on the device; one synchronisation per call). Host values are not checked."""
    all_keys = state.keys()
    keys = [k for k in all_keys if is_cuda_array(state[k])]
    if not keys:
        return []
    lib = library(state[keys[0]], keys[0])
    flags = []
    checked = []
    for k in keys:
        x = lib.on_device(state[k], k)
        if lib.dtype_name(x) in FLOAT_DTYPES:
            flags.append(lib.all_finite_lazy(x))
            checked.append(k)
    if not flags:
        return []
    ok = lib.to_host(lib.stack(flags))
    return [k for k, good in zip(checked, ok) if not bool(good)]


def device_template(state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, NumPy dtype) of a state_dict whose values may live on a GPU, read from the
    arrays' metadata only (no device access): the layout :func:`mars_native.validation.
    state_template` gives for host arrays (bfloat16 reads as float32, as there). Values that are
    not CUDA arrays are described through :func:`mars_native._arrays.to_numpy`, as there."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    keys = state.keys()
    for key in keys:
        x = state[key]
        if not is_cuda_array(x):
            arr = to_numpy(x, name=str(key))  # host data: a view where possible, as in validation
            out[str(key)] = (tuple(int(s) for s in arr.shape), arr.dtype)
            continue
        shape = array_shape(x)
        name = (dtype_name(x.dtype) if hasattr(x, "dtype")
                else np.dtype(x.__cuda_array_interface__["typestr"]).name)
        out[str(key)] = (shape, np.dtype("float32" if name == "bfloat16" else name))
    return out


def shape_proxy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state_dict of zero-stride host views with the same keys and shapes (no device reads), for
    :func:`mars_native.find_layers`, which only looks at names and shapes."""
    keys = state.keys()
    return {k: np.broadcast_to(np.zeros((), np.float32), array_shape(state[k])) for k in keys}


def bn_scale_cuda(state: Mapping[str, Any], bn_prefix: str, bn_eps: float = 1e-5,
                  mode: str = "paper") -> Any:
    """Device twin of :func:`mars_native.energy.bn_scale`: ``|gamma| / sqrt(max(var, 0) + eps)``,
    float64, same IEEE operations as NumPy (bit-identical)."""
    prefix = f"{bn_prefix}." if bn_prefix else ""
    var_key, gkey = prefix + "running_var", prefix + "weight"
    lib = library(state[var_key], var_key)
    gamma = state[gkey] if gkey in state else None  # noqa: SIM401 (any Mapping)
    return _bn_scale_of(lib, state[var_key], gamma, var_key, gkey, bn_eps, mode)


def _bn_scale_of(lib: Any, var: Any, gamma: Any, var_key: str, gkey: str, bn_eps: float,
                 mode: str) -> Any:
    """``|gamma| / sqrt(max(var, 0) + eps)`` in float64 on the device, elementwise for arrays of
    any one shape (one model's BN vectors, or those of many models stacked); gamma None: 1."""
    var = float_input(lib, var, var_key, allow_int=True, to64=True)
    if mode == "official":
        var = lib.where_nan(var, 0.0)
    var = lib.clamp_min(var, 0.0)
    gamma = (lib.abs(float_input(lib, gamma, gkey, to64=True)) if gamma is not None
             else lib.ones(int(var.shape[0])))
    return gamma / lib.sqrt(var + bn_eps)


def bn_scales_stacked(states: Sequence[Mapping[str, Any]], bn_prefix: str, bn_eps: float = 1e-5,
                      mode: str = "paper") -> Any | None:
    """The BN scales of one layer of many models at once: a float64 ``(n_models, out)`` device
    array whose row i equals ``bn_scale_cuda(states[i], bn_prefix, bn_eps, mode)`` bit for bit
    (the same elementwise IEEE operations, on the stacked vectors: a handful of launches per
    layer instead of per layer and model). None when the models' BN vectors are not torch
    tensors of one dtype and shape on one device (the caller then takes the per-model path,
    whose errors name the offending key)."""
    prefix = f"{bn_prefix}." if bn_prefix else ""
    var_key, gkey = prefix + "running_var", prefix + "weight"
    columns = []
    for key in (var_key, gkey):  # without gamma (affine=False) the per-model path is taken
        if key not in states[0]:
            return None
        ref = states[0][key]
        if not is_torch_cuda(ref) or ref.ndim != 1:
            return None
        kind, dt = type(ref), ref.dtype
        column = []
        for state in states:
            v = state[key] if key in state else None  # noqa: SIM401 (any Mapping)
            if type(v) is not kind or v.dtype != dt:
                return None
            column.append(v)
        columns.append(column)
    lib = library(columns[0][0], var_key)
    var_dtype, gamma_dtype = lib.dtype_name(columns[0][0]), lib.dtype_name(columns[1][0])
    if gamma_dtype not in FLOAT_DTYPES or not (var_dtype in FLOAT_DTYPES or var_dtype.startswith(("int", "uint"))):
        return None  # the per-model path raises the TypeError naming the key
    try:  # shapes or devices that differ: torch.stack refuses them
        var_stack, gamma_stack = lib.stack(columns[0]), lib.stack(columns[1])
    except RuntimeError:
        return None
    return _bn_scale_of(lib, var_stack, gamma_stack, var_key, gkey, bn_eps, mode)


def layer_inputs_many(states: Sequence[Mapping[str, Any]], layers: Sequence[Any], bn_eps: float,
                      mode: str, descs: bool = False) -> tuple[list[Any], list[Any], list[tuple | None]]:
    """The weights of ``layers`` in every model and their BN scales on the device (None: no BN),
    concatenated model after model (``len(states) * len(layers)`` each); the BN scales of a layer
    are computed for all models at once (:func:`bn_scales_stacked`) when their vectors allow it,
    else model by model (:func:`bn_scale_cuda`).

    ``descs=True``: the scales of a stacked layer are not cut into row views; their launch
    descriptors come by address arithmetic instead (third list; None elsewhere) and the scales
    list holds the whole ``(n_models, out)`` stack at each of its rows' places (to keep it
    alive). Otherwise the third list is all None."""
    per = len(layers)
    weights = [state[layer.weight_key] for state in states for layer in layers]
    scales: list[Any] = [None] * (len(states) * per)
    scale_descs: list[tuple | None] = [None] * (len(states) * per)
    for j, layer in enumerate(layers):
        if layer.bn_prefix is None:
            continue
        stacked = bn_scales_stacked(states, layer.bn_prefix, bn_eps, mode) if len(states) > 1 else None
        if stacked is not None and descs:
            lib = library(stacked, "scales")
            whole = lib.fast_desc(stacked, f64_only=True) if isinstance(lib, TorchArrays) else None
            if whole is not None and whole[1] == (len(states), int(stacked.shape[1])):
                rows = lib.segment_descs(stacked, [int(stacked.shape[1])] * len(states))
                for i in range(len(states)):
                    scales[i * per + j], scale_descs[i * per + j] = stacked, rows[i]
                continue
        for i, state in enumerate(states):
            scales[i * per + j] = (stacked[i] if stacked is not None
                                   else bn_scale_cuda(state, layer.bn_prefix, bn_eps, mode))
    return weights, scales, scale_descs


def find_layers_from_shapes(state: Mapping[str, Any], layers: Sequence[Any] | None,
                            include_linear: bool, mode: str) -> list[Any]:
    """``layers`` if given, else :func:`mars_native.find_layers` on the shapes of ``state`` (the
    scoring rules of ``mode``, as in :mod:`mars_native.energy`)."""
    if layers is not None:
        return list(layers)
    from mars_native.layers import find_layers

    official = mode == "official"
    return find_layers(shape_proxy(state), include_linear=include_linear and not official,
                       require_bn=official)


def backdoor_energy_cuda(state: Mapping[str, Any], layers: Sequence[Any] | None = None, *,
                         include_linear: bool = False, bn_eps: float = 1e-5,
                         mode: str = "paper") -> dict[str, Any]:
    """BE of every scored layer of a state_dict held on the GPU (one batch of launches):
    layer name -> float64 ``(out,)`` device array. ``layers``: a :func:`mars_native.find_layers`
    result (found from the shapes when None; nothing is read back from the device)."""
    require_backend()
    layers = find_layers_from_shapes(state, layers, include_linear, mode)
    weights, scales, _ = layer_inputs_many([state], layers, bn_eps, mode)
    energies = channel_spectral_norms_batched_cuda(weights, scales, check_finite=False)
    return {layer.name: e for layer, e in zip(layers, energies)}


def concentrated_backdoor_energy_cuda(state: Mapping[str, Any], layers: Sequence[Any] | None = None,
                                      kappa: float = 0.05, mode: str = "paper", *,
                                      include_linear: bool = False, bn_eps: float = 1e-5) -> Any:
    """CBE of one model held on the GPU: float64 1-D device array (the top ``kappa`` share of
    every scored layer's BE, concatenated in layer order; rule "ceil" for ``mode="paper"``,
    "quantile" for ``mode="official"``). Raises ``ValueError`` when no layer can be scored."""
    return concentrated_backdoor_energy_batch_cuda([state], layers, kappa, mode,
                                                   include_linear=include_linear, bn_eps=bn_eps)[0]


def concentrated_backdoor_energy_batch_cuda(states: Sequence[Mapping[str, Any]],
                                            layers: Sequence[Any] | None = None,
                                            kappa: float = 0.05, mode: str = "paper", *,
                                            include_linear: bool = False,
                                            bn_eps: float = 1e-5) -> Any:
    """CBEs of many models on one GPU with one spectral launch batch and one top-k launch for all
    of them. ``mode="paper"``: a float64 ``(n_models, d)`` device array (rows are the CBEs).
    ``mode="official"``: a list of 1-D device arrays (lengths can differ; synchronises once).
    ``layers`` (from the first model's shapes when None) must fit every model."""
    require_backend()
    if mode not in ("paper", "official"):
        raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")
    kappa = check_kappa(kappa)
    states = list(states)
    if not states:
        raise ValueError("states must not be empty")
    layers = find_layers_from_shapes(states[0], layers, include_linear, mode)
    if not layers:
        raise ValueError("no scorable layer: the state_dict has no conv (ndim >= 3) weights")
    shapes = {layer.weight_key: array_shape(states[0][layer.weight_key]) for layer in layers}
    raw = {key: getattr(states[0][key], "shape", None) for key in shapes}  # e.g. torch.Size
    for i, state in enumerate(states[1:], 1):
        for key, shape in shapes.items():
            if key not in state:
                raise ValueError(f"states[{i}] has no {key!r} (states[0] has it)")
            x = state[key]
            if raw[key] is not None and getattr(x, "shape", None) == raw[key]:
                continue  # equal shapes (e.g. two torch.Size): no conversion needed
            got = array_shape(x)
            if got != shape:
                raise ValueError(f"states[{i}][{key!r}] has shape {got} but states[0] has {shape}")
    weights, scales, scale_descs = layer_inputs_many(states, layers, bn_eps, mode, descs=True)
    official = mode == "official"  # (its top-k takes arrays: the result views are needed)
    energies, descs = _spectral_launch(weights, scales, check_finite=False, scale_descs=scale_descs,
                                       views=official)
    lib = library(weights[0], "weights[0]")
    per = len(layers)
    # Like the CPU: layers with zero output channels contribute nothing.
    scored = [j for j in range(per) if descs[j][1][0] > 0]
    if not scored:
        raise ValueError("no scorable layer: every scored layer has zero output channels")
    picked = [i * per + j for i in range(len(states)) for j in scored]
    descs = [descs[k] for k in picked]
    per = len(scored)
    if official:
        parts = _top_k_many(lib, [energies[k] for k in picked], kappa, "quantile")
        return [lib.cat(parts[i * per:(i + 1) * per]) for i in range(len(states))]
    counts = [int(_core.top_k_count(kappa, int(d[1][0]))) for d in descs[:per]]
    out = lib.empty((len(states), sum(counts)), "float64")
    # Row i, layer j of `out` is the (i * len(counts) + j)-th consecutive segment of its memory.
    targets = lib.segment_descs(out, counts * len(states))
    _core.cuda.top_k_ceil(descs, kappa, targets, lib.index, lib.stream())
    del energies  # (the result buffer outlives the enqueued top-k launch, which reads it)
    return out
