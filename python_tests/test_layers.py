"""find_layers: conv -> following-BN pairing that survives sorted (safetensors) key order."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from _torch_models import ResNet18, SmallCNN
from torch import nn

from mars_native.layers import Layer, find_layers


def _numpy_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.detach().numpy()) for k, v in model.state_dict().items())


def _sorted(state: dict) -> dict:
    return dict(sorted(state.items()))


def _pairs(layers: list[Layer]) -> dict[str, str | None]:
    return {layer.weight_key: layer.bn_prefix for layer in layers}


def test_small_cnn_pairs_conv_with_its_bn_and_leaves_conv3_alone():
    state = _numpy_state(SmallCNN())
    assert _pairs(find_layers(state)) == {"conv1.weight": "bn1", "conv2.weight": "bn2", "conv3.weight": None}
    with_linear = find_layers(state, include_linear=True)
    assert [(layer.weight_key, layer.kind) for layer in with_linear][-1] == ("fc.weight", "linear")
    assert all(layer.bn_prefix is None for layer in with_linear if layer.kind == "linear")


@pytest.mark.parametrize("sort_keys", [False, True])
def test_resnet18_every_conv_paired_even_with_sorted_keys(sort_keys):
    state = _numpy_state(ResNet18())
    if sort_keys:
        state = _sorted(state)
    pairs = _pairs(find_layers(state))
    assert len(pairs) == 20  # stem + 16 block convs + 3 shortcut convs
    assert all(bn is not None for bn in pairs.values()), pairs
    assert pairs["conv1.weight"] == "bn1"
    assert pairs["layer1.0.conv2.weight"] == "layer1.0.bn2"
    assert pairs["layer2.0.shortcut.0.weight"] == "layer2.0.shortcut.1"
    assert pairs["layer4.1.conv1.weight"] == "layer4.1.bn1"


def test_torchvision_style_sequential_and_downsample_names():
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)),
    ))
    block = nn.Module()
    block.downsample = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32))
    model.add_module("block", block)
    state = _sorted(_numpy_state(model))
    assert _pairs(find_layers(state)) == {
        "block.downsample.0.weight": "block.downsample.1",
        "features.0.weight": "features.1",
        "features.3.weight": "features.4",
    }


class _OddNames(nn.Module):
    """Names that say nothing: only order or module structure can pair them."""

    def __init__(self):
        super().__init__()
        self.zeta = nn.Conv2d(3, 8, 3)
        self.alpha = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3)
        self.beta = nn.BatchNorm2d(8)


def test_key_order_used_when_names_do_not_help_and_keys_are_not_sorted():
    state = _numpy_state(_OddNames())
    assert _pairs(find_layers(state)) == {"zeta.weight": "alpha", "mid.weight": "beta"}


def test_sorted_keys_without_reference_do_not_invent_pairs_but_reference_restores_them():
    model = _OddNames()
    original = _numpy_state(model)
    sorted_state = _sorted(original)
    # sorted: alpha.* beta.* mid.* zeta.*: key order would wrongly pair nothing sensible
    assert _pairs(find_layers(sorted_state)) == {"mid.weight": None, "zeta.weight": None}
    # a reference in the model's original order fixes it
    assert _pairs(find_layers(sorted_state, reference=original)) == {"mid.weight": "beta", "zeta.weight": "alpha"}


def test_module_structure_is_most_trusted():
    model = _OddNames()
    sorted_state = _sorted(_numpy_state(model))
    assert _pairs(find_layers(sorted_state, layer_map=model)) == {"mid.weight": "beta", "zeta.weight": "alpha"}


def test_explicit_layer_map_and_its_shape_check():
    state = _numpy_state(SmallCNN())
    layers = find_layers(state, layer_map={"conv1.weight": "bn1", "conv2.weight": None})
    assert _pairs(layers) == {"conv1.weight": "bn1", "conv2.weight": None, "conv3.weight": None}
    with pytest.raises(ValueError, match=r"conv1.weight.*bn2.*sizes differ"):
        find_layers(state, layer_map={"conv1.weight": "bn2"})
    with pytest.raises(ValueError, match="not in the state_dict"):
        find_layers(state, layer_map={"nope.weight": None})
    with pytest.raises(ValueError, match="not a BatchNorm"):
        find_layers(state, layer_map={"conv1.weight": "conv2"})


def test_bn_of_the_wrong_size_is_never_paired():
    # pre-activation style: bn1 normalises conv1's INPUT (3 channels), not its 8 outputs
    state = OrderedDict(
        [("bn1.weight", np.ones(3, np.float32)), ("bn1.bias", np.zeros(3, np.float32)),
         ("bn1.running_mean", np.zeros(3, np.float32)), ("bn1.running_var", np.ones(3, np.float32)),
         ("conv1.weight", np.ones((8, 3, 3, 3), np.float32))]
    )
    assert _pairs(find_layers(state)) == {"conv1.weight": None}


def test_require_bn_scores_only_convs_followed_by_bn():
    state = _numpy_state(SmallCNN())
    layers = find_layers(state, include_linear=True, require_bn=True)
    assert [layer.weight_key for layer in layers] == ["conv1.weight", "conv2.weight"]


def test_conv1d_and_conv3d_and_torch_tensors():
    model = nn.Sequential(nn.Conv1d(2, 4, 5), nn.BatchNorm1d(4), nn.Conv3d(1, 6, 3), nn.BatchNorm3d(6))
    pairs = _pairs(find_layers(model.state_dict()))
    assert pairs == {"0.weight": "1", "2.weight": "3"}


def test_not_a_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="state_dict"):
        find_layers([np.ones((2, 2, 3, 3))])  # type: ignore[arg-type]
