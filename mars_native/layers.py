"""Find the layers MARS scores in a state_dict and pair every conv with the BatchNorm after it.

Key order alone is not enough: safetensors files store keys sorted, so ``bn1.*`` comes before
``conv1.*`` and ``layer1.0.bn2`` before ``layer1.0.conv1``. The pairing uses, in order of trust:

1. ``layer_map``: an explicit ``{conv_weight_key: bn_prefix | None}`` mapping, or an
   ``nn.Module`` whose module structure (a conv immediately followed, in definition order, by a
   BatchNorm) is read;
2. ``reference``: a state_dict in its original order (e.g. the server's global model), paired by
   key order, and the pairing is applied by name;
3. names: same parent module and matching suffix (``conv1``/``bn1``, Sequential index ``i``/``i+1``
   as in ``downsample.0``/``downsample.1``, ``conv``/``bn`` or ``norm`` in one block);
4. the key order of the given dict (a BN whose keys directly follow the conv's), skipped when the
   keys are sorted (safetensors) since order then says nothing.

A pairing is accepted only when shapes agree (BN size == conv out-channels); anything unpaired is a
conv without BN (scale 1). A BatchNorm is recognised by its ``running_var`` (1-D) key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mars_native._arrays import is_mapping, to_numpy

LayerKind = Literal["conv", "linear"]


@dataclass(frozen=True)
class Layer:
    """A scored layer.

    name: the layer's module path (``weight_key`` without ``.weight``).
    weight_key: key of the weight, shape (out, in, *kernel) for convs, (out, in) for Linear.
    bn_prefix: module path of the BatchNorm that directly follows the conv, or None.
    kind: "conv" or "linear".
    """

    name: str
    weight_key: str
    bn_prefix: str | None
    kind: LayerKind


def _prefix(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else ("" if key == "weight" else key)


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _shapes(state: Any) -> dict[str, tuple[int, ...]]:
    if not is_mapping(state):
        raise TypeError(f"expected a state_dict (mapping of name -> tensor), got {type(state).__name__}")
    out: dict[str, tuple[int, ...]] = {}
    for k in state.keys():  # noqa: SIM118 - duck-typed mappings
        shape = getattr(state[k], "shape", None)  # metadata only: no copy of GPU tensors
        if shape is None:
            shape = to_numpy(state[k], name=str(k)).shape
        out[str(k)] = tuple(int(s) for s in shape)
    return out


def _bn_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """BatchNorm prefixes (modules with a 1-D running_var) -> number of features."""
    out: dict[str, int] = {}
    for key, shape in shapes.items():
        if (key.endswith(".running_var") or key == "running_var") and len(shape) == 1:
            prefix = key[: -len(".running_var")] if key != "running_var" else ""
            w = shapes.get(_join(prefix, "weight"))
            if w is not None and w != shape:
                continue
            out[prefix] = shape[0]
    return out


def _weight_keys(shapes: Mapping[str, tuple[int, ...]], include_linear: bool) -> list[tuple[str, LayerKind]]:
    out: list[tuple[str, LayerKind]] = []
    bn = _bn_sizes(shapes)
    for key, shape in shapes.items():
        if not (key.endswith(".weight") or key == "weight"):
            continue
        if _prefix(key) in bn:
            continue
        if len(shape) >= 3:
            out.append((key, "conv"))
        elif len(shape) == 2 and include_linear:
            out.append((key, "linear"))
    return out


_CONV_WORD = re.compile(r"conv(olution)?", re.IGNORECASE)


def _name_candidates(conv_prefix: str) -> list[str]:
    """BN prefixes that, by naming convention, follow the conv ``conv_prefix``."""
    parent, _, leaf = conv_prefix.rpartition(".")
    cands: list[str] = []
    if leaf.isdigit():  # Sequential: index i -> i + 1 (features.0 / features.1, downsample.0 / .1)
        cands.append(_join(parent, str(int(leaf) + 1)))
    if _CONV_WORD.search(leaf):
        for word in ("bn", "norm", "batchnorm", "batch_norm"):
            cands.append(_join(parent, _CONV_WORD.sub(word, leaf, count=1)))
    if leaf in ("conv", "0"):
        cands += [_join(parent, "bn"), _join(parent, "norm")]
    # the conv is a block of its own: block.conv.weight -> block.bn
    if leaf.lower().startswith("conv") and parent:
        cands += [_join(parent, "bn"), _join(parent, "norm")]
    seen: set[str] = set()
    return [c for c in cands if not (c in seen or seen.add(c)) and c != conv_prefix]


def _pair_by_order(keys: list[str], convs: list[str], bn_sizes: Mapping[str, int]) -> dict[str, str]:
    """Pair each conv with a BN whose keys directly follow the conv's own keys."""
    pairs: dict[str, str] = {}
    conv_set = set(convs)
    for i, key in enumerate(keys):
        if key not in conv_set:
            continue
        prefix = _prefix(key)
        j = i + 1
        while j < len(keys) and keys[j].rpartition(".")[0] == prefix:
            j += 1  # skip the conv's own bias and friends
        if j < len(keys):
            nxt = keys[j].rpartition(".")[0] if "." in keys[j] else ""
            if nxt in bn_sizes:
                pairs[key] = nxt
    return pairs


def _pair_by_module(module: Any) -> dict[str, str | None]:
    """Read conv -> following BatchNorm from an nn.Module's definition order."""
    leaves = [(n, m) for n, m in module.named_modules() if not list(m.children())]
    pairs: dict[str, str | None] = {}
    for i, (name, mod) in enumerate(leaves):
        cls = type(mod).__name__
        if not cls.startswith("Conv"):
            continue
        nxt = leaves[i + 1] if i + 1 < len(leaves) else None
        follows = nxt is not None and type(nxt[1]).__name__.startswith("BatchNorm")
        pairs[_join(name, "weight")] = nxt[0] if follows else None  # type: ignore[index]
    return pairs


def find_layers(
    state_dict: Mapping[str, Any],
    include_linear: bool = False,
    reference: Mapping[str, Any] | None = None,
    layer_map: Mapping[str, str | None] | Any | None = None,
    *,
    require_bn: bool = False,
) -> list[Layer]:
    """The scored layers of ``state_dict``, each conv paired with the BatchNorm that follows it.

    Args:
        state_dict: name -> array/tensor (NumPy or torch). Conv weights have ndim >= 3.
        include_linear: also score Linear layers (2-D weights), never paired with a BN.
        reference: a state_dict with the same keys in the model's original order (e.g. the
            server's global model); its key order decides the pairing.
        layer_map: an explicit ``{conv_weight_key: bn_prefix or None}`` mapping, or an
            ``nn.Module`` (its module structure decides the pairing). Most trusted.
        require_bn: only score convs that have a BatchNorm (the authors' code; Linear excluded).

    Returns:
        Layers in the key order of ``state_dict``.

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        ValueError: ``layer_map`` names a key that is missing or a BN whose size does not match
            the conv's out-channels (the message names both keys and shapes).
    """
    shapes = _shapes(state_dict)
    bn_sizes = _bn_sizes(shapes)
    candidates = _weight_keys(shapes, include_linear)
    convs = [k for k, kind in candidates if kind == "conv"]
    pairs: dict[str, str | None] = {}

    if layer_map is not None:
        explicit = _pair_by_module(layer_map) if hasattr(layer_map, "named_modules") else dict(layer_map)
        for wkey, bn in explicit.items():
            if wkey not in shapes:
                if hasattr(layer_map, "named_modules"):
                    continue
                raise ValueError(f"layer_map names {wkey!r}, which is not in the state_dict")
            if bn is not None:
                if bn not in bn_sizes:
                    raise ValueError(f"layer_map pairs {wkey!r} with {bn!r}, which is not a BatchNorm here")
                if bn_sizes[bn] != shapes[wkey][0]:
                    raise ValueError(
                        f"layer_map pairs {wkey!r} (shape {shapes[wkey]}) with BatchNorm {bn!r} of "
                        f"size {bn_sizes[bn]}: sizes differ"
                    )
            pairs[wkey] = bn
        for k in convs:  # convs the map does not mention: no BN
            pairs.setdefault(k, None)
    else:
        used: set[str] = set()

        def accept(conv_key: str, bn: str | None) -> bool:
            if bn is None or bn in used or bn not in bn_sizes:
                return False
            if bn_sizes[bn] != shapes[conv_key][0]:
                return False
            pairs[conv_key] = bn
            used.add(bn)
            return True

        if reference is not None:
            ref_shapes = _shapes(reference)
            ref_pairs = _pair_by_order(list(ref_shapes), [k for k in convs if k in ref_shapes], _bn_sizes(ref_shapes))
            for k in convs:
                accept(k, ref_pairs.get(k))
        else:
            for k in convs:
                for cand in _name_candidates(_prefix(k)):
                    if accept(k, cand):
                        break
            keys = list(shapes)
            if keys != sorted(keys):
                order_pairs = _pair_by_order(keys, [k for k in convs if k not in pairs], bn_sizes)
                for k, bn in order_pairs.items():
                    accept(k, bn)

    layers: list[Layer] = []
    for key, kind in candidates:
        if kind == "linear":
            if not require_bn:
                layers.append(Layer(_prefix(key), key, None, "linear"))
            continue
        bn = pairs.get(key)
        if require_bn and bn is None:
            continue
        layers.append(Layer(_prefix(key), key, bn, "conv"))
    return layers
