"""Models of the arena and the registry that lets users plug their own.

``DigitsCNN`` is the spec's digits network: conv1+bn1+ReLU; conv2+bn2+ReLU+maxpool2;
conv3+bn3+ReLU+maxpool2; flatten; fc1+ReLU; fc2. Every conv is followed by a BatchNorm, so MARS
(and FedCLP) score three layers. Widths 64-128-256 by default: with kappa = 5% that gives a CBE of
4 + 7 + 13 = 24 values; narrower models (16-32-64: 7 values) are too narrow for the 2-means of
MARS to separate independent attackers (spec section 1.6, "Model width matters").

Plug your own model: ``MODELS["mynet"] = lambda config, data: MyNet(...)`` (a builder taking the
:class:`~mars_native.sim.config.SimConfig` and the :class:`~mars_native.sim.data.FederatedData`),
or pass ``make_model=`` (a zero-argument factory) to :func:`mars_native.sim.run_simulation`. The
final layer used by 3DFed, FLAME, FoolsGold and DeepSight is the last ``nn.Linear`` of the model
(override with a ``final_layer`` attribute on the model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "DigitsCNN", "final_layer_name", "model_factory"]


class DigitsCNN(nn.Module):
    """Three Conv2d+BatchNorm blocks and two linear layers, for small images (8x8 digits).

    Shapes: (B, C, H, W) -> conv1 (same size) -> conv2 + pool (H/2) -> conv3 + pool (H/4) ->
    flatten -> fc1 (``fc_width``) -> fc2 (``num_classes``).
    """

    final_layer = "fc2"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 128, 256),
        fc_width: int = 128,
        image_size: tuple[int, int] = (8, 8),
    ) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(w3)
        h, w = image_size[0] // 4, image_size[1] // 4
        if h < 1 or w < 1:
            raise ValueError(f"image_size {image_size} is too small for two 2x2 poolings")
        self.fc1 = nn.Linear(w3 * h * w, fc_width)
        self.fc2 = nn.Linear(fc_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def _digits_cnn(config, data) -> nn.Module:
    c, h, w = data.input_shape
    return DigitsCNN(
        in_channels=c,
        num_classes=data.num_classes,
        widths=tuple(config.model_widths),
        fc_width=config.fc_width,
        image_size=(h, w),
    )


#: name -> builder(config, data) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {"digits-cnn": _digits_cnn}


def model_factory(config, data) -> Callable[[], nn.Module]:
    """A zero-argument factory of fresh models for ``config.model`` (weights from torch's RNG)."""
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; known: {sorted(MODELS)}")
    builder = MODELS[config.model]
    return lambda: builder(config, data)


def final_layer_name(model: nn.Module) -> str:
    """The module name of the model's final layer: ``model.final_layer`` if set, else the last
    ``nn.Linear`` in module order."""
    name = getattr(model, "final_layer", None)
    if isinstance(name, str):
        return name
    last = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = mod_name
    if last is None:
        raise ValueError("model has no nn.Linear layer; set a `final_layer` attribute")
    return last
