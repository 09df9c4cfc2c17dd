"""Small torch models shared by the tests (built here, randomly initialised; no downloads)."""

from __future__ import annotations

import torch
from torch import nn

# the CIFAR-style ResNet-18 and the BN randomiser are the benchmark suite's (one copy)
from mars_native.bench.models import ResNet18, randomize_bn

__all__ = ["ResNet18", "SmallCNN", "randomize_bn"]


class SmallCNN(nn.Module):
    """conv1/bn1, conv2/bn2, conv3 (no BN), fc: a small CNN with BatchNorm."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64), in_ch: int = 3, classes: int = 10):
        super().__init__()
        a, b, c = widths
        self.conv1 = nn.Conv2d(in_ch, a, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(a)
        self.conv2 = nn.Conv2d(a, b, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(b)
        self.conv3 = nn.Conv2d(b, c, 3, padding=1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x)).mean(dim=(2, 3))
        return self.fc(x)
