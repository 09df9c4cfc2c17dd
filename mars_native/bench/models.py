"""Models and client populations for the benchmarks (built with torch, random weights; no downloads).

Three model families span the sizes and layer shapes a MARS server meets:

- ``cnn``: the simulation's small CNN (``mars_native.sim.models.DigitsCNN``, conv widths
  64-128-256, 3x3 kernels; 0.5 M parameters);
- ``resnet18``: the CIFAR-style ResNet-18 (3x3 stem, basic blocks, 1x1 projection shortcuts;
  11.2 M parameters);
- ``resnext50``: a ResNeXt-50 (32x4d) -like network, the wide/deep case: 7x7 stem, bottleneck
  blocks with 1x1, grouped 3x3 (32 groups of 4..32 channels) and 1x1 convs, projection
  shortcuts (25.0 M parameters).

Every BatchNorm gets randomised statistics (as after training), so that the BN scale of the
backdoor energy is not trivially 1. Clients of a round are the base model plus small per-client
noise; every fifth one (an "attacker") also has a few channels of its two last scored layers
amplified, so that MARS has a high-energy cluster to find (this only matters for the correctness
checks; timings do not depend on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["MODELS", "ModelSpec", "base_state", "build_model", "make_clients", "state_nbytes"]


# ---------------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem without pooling, 4 stages of 2 basic blocks."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        cin = w
        for i, (cout, stride) in enumerate([(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)], start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        return self.linear(out.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------- ResNeXt-50
class Bottleneck(nn.Module):
    """1x1 reduce -> grouped 3x3 -> 1x1 expand (ResNeXt), projection shortcut when needed."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNeXt50(nn.Module):
    """ResNeXt-50 (32x4d) layout: 7x7 stem, stages of [3, 4, 6, 3] bottlenecks."""

    def __init__(self, num_classes: int = 1000, groups: int = 32, base_width: int = 4,
                 blocks: tuple[int, ...] = (3, 4, 6, 3), stem: int = 64, out_base: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, n_blocks in enumerate(blocks):
            width = groups * base_width * 2**i
            cout = out_base * 2**i
            layer = [Bottleneck(cin if b == 0 else cout, width, cout, (1 if i == 0 else 2) if b == 0 else 1, groups)
                     for b in range(n_blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = nn.functional.max_pool2d(out, 3, 2, 1)
        for i in range(1, 5):
            out = getattr(self, f"layer{i}")(out)
        return self.fc(out.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------- small CNN
def _digits_cnn(widths: tuple[int, int, int] = (64, 128, 256)) -> nn.Module:
    """The simulation's DigitsCNN (its own definition when the sim package is importable)."""
    try:
        from mars_native.sim.models import DigitsCNN
    except ImportError:  # pragma: no cover - the sim extra ships with the bench extra
        DigitsCNN = None
    if DigitsCNN is not None:
        return DigitsCNN(in_channels=1, num_classes=10, widths=widths)
    raise ImportError("mars_native.sim.models.DigitsCNN is unavailable")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its builder and a one-line description."""

    name: str
    build: Callable[[], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec("cnn", _digits_cnn, "simulation CNN (DigitsCNN 64-128-256, 3x3)"),
    "resnet18": ModelSpec("resnet18", ResNet18, "CIFAR ResNet-18 (3x3 convs, 1x1 shortcuts)"),
    "resnext50": ModelSpec("resnext50", ResNeXt50,
                           "ResNeXt-50 32x4d (7x7 stem, 1x1 + grouped 3x3 bottlenecks)"),
    # Tiny variants for the tests of the benchmark code itself.
    "tiny-cnn": ModelSpec("tiny-cnn", lambda: _digits_cnn((8, 16, 32)), "DigitsCNN 8-16-32"),
    "tiny-resnet": ModelSpec("tiny-resnet", lambda: ResNet18(width=4), "ResNet-18, width 4"),
    "tiny-resnext": ModelSpec(
        "tiny-resnext",
        lambda: ResNeXt50(num_classes=10, groups=4, base_width=1, blocks=(1, 1, 1, 1), stem=8,
                          out_base=16),
        "ResNeXt, 4 groups, 1 block per stage"),
}


def randomize_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=generator))
                m.bias.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                m.num_batches_tracked.fill_(100)
    return model


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised model ``name`` (see :data:`MODELS`) with randomised BN statistics."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(seed)
    model = MODELS[name].build()
    return randomize_bn(model, torch.Generator().manual_seed(seed + 1)).eval()


def base_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as NumPy arrays (copies, original key order)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def state_nbytes(state: dict[str, np.ndarray]) -> int:
    """Bytes held by the arrays of one state_dict."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def make_clients(
    base: dict[str, np.ndarray],
    n: int,
    seed: int = 0,
    noise: float = 0.01,
    attacker_fraction: float = 0.2,
    boost: float = 3.0,
) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """``n`` client state_dicts derived from ``base`` and the attacker flags.

    Client ``i``'s float tensor ``x`` is ``base[x] + noise * std(base[x]) * z_i`` with ``z_i`` a
    window of one shared Gaussian pool (offset per client, so generation costs one pass per
    client); ``running_var`` is perturbed multiplicatively and stays positive. Every
    ``round(1 / attacker_fraction)``-th client, starting with client 0, is an attacker (so every
    prefix of the list, e.g. the first 10 of 100 clients, has the same share): 5% of the output
    channels of its two last conv layers are multiplied by ``boost``. Integer tensors are copied.

    Returns:
        ``(states, is_attacker)``; every array is a fresh float32/int64 NumPy array.
    """
    rng = np.random.default_rng(seed)
    float_keys = [k for k, v in base.items() if v.dtype.kind == "f"]
    total = sum(base[k].size for k in float_keys)
    stride = 7919  # a prime: the windows of different clients never coincide
    pool = rng.standard_normal(total + stride * max(n, 1), dtype=np.float32)
    conv_keys = [k for k in float_keys if base[k].ndim >= 3]
    boosted = conv_keys[-2:]
    period = round(1.0 / attacker_fraction) if attacker_fraction > 0 else 0
    attackers = (np.arange(n) % period == 0) if period else np.zeros(n, dtype=bool)
    stds = {k: float(np.std(base[k])) if base[k].size else 0.0 for k in float_keys}
    states = []
    for i in range(n):
        offset = i * stride
        state: dict[str, np.ndarray] = {}
        for key, value in base.items():
            if value.dtype.kind != "f":
                state[key] = value.copy()
                continue
            z = pool[offset : offset + value.size].reshape(value.shape)
            offset += value.size
            if key.endswith("running_var"):
                out = np.abs(z) * np.float32(noise)
                out += np.float32(1.0)
                out *= value
            else:
                out = z * np.float32(noise * stds[key])
                out += value
            if attackers[i] and key in boosted:
                k = max(1, value.shape[0] // 20)
                out[:k] *= boost
            state[key] = out.astype(value.dtype, copy=False)
        states.append(state)
    return states, attackers
