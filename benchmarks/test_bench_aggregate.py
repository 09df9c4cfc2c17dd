"""Mean of N ResNet-18 models: mars_native vs NumPy vs torch vs the read-inputs/write-output floor."""

from __future__ import annotations

import numpy as np
import pytest

from mars_native.bench import baselines as bl

GROUP = "aggregate-resnet18"


@pytest.mark.benchmark(group=GROUP)
def test_mars_native(benchmark, resnet18, threads):
    benchmark(bl.aggregate_native, resnet18.states, resnet18.keys, n_threads=threads)


@pytest.mark.benchmark(group=GROUP)
def test_numpy(benchmark, resnet18):
    benchmark(bl.aggregate_numpy, resnet18.states, resnet18.keys)


@pytest.mark.benchmark(group=GROUP)
def test_torch_stack_mean(benchmark, resnet18):
    benchmark(bl.aggregate_torch, resnet18.states, resnet18.keys)


@pytest.mark.benchmark(group=GROUP)
def test_floor(benchmark, resnet18, reader):
    out = {k: np.empty_like(resnet18.states[0][k]) for k in resnet18.keys}
    benchmark(bl.aggregate_floor, resnet18.states, resnet18.keys, reader, out)
