"""CBE of N ResNet-18 clients: mars_native vs NumPy vs batched torch vs the authors' approach vs
the stream-read floor (one group)."""

from __future__ import annotations

import pytest

from mars_native.bench import baselines as bl

GROUP = "cbe-resnet18"


@pytest.mark.benchmark(group=GROUP)
def test_mars_native(benchmark, resnet18, threads):
    benchmark(bl.cbe_native, resnet18.states, resnet18.layers, n_threads=threads)


@pytest.mark.benchmark(group=GROUP)
def test_read_floor(benchmark, resnet18, reader):
    arrays = bl.scored_arrays(resnet18.states, resnet18.layers)
    benchmark(bl.read_floor, arrays, reader)


@pytest.mark.benchmark(group=GROUP)
def test_torch_batched(benchmark, resnet18):
    benchmark.pedantic(bl.cbe_torch, (resnet18.states, resnet18.layers), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group=GROUP)
def test_numpy_reference(benchmark, resnet18):
    benchmark.pedantic(bl.cbe_numpy, (resnet18.states, resnet18.layers), rounds=2, warmup_rounds=1)


@pytest.mark.benchmark(group=GROUP)
def test_authors_approach(benchmark, resnet18):
    benchmark.pedantic(bl.cbe_authors, (resnet18.states[:2], resnet18.model), rounds=1)
    benchmark.extra_info["clients_timed"] = 2  # x N/2 for the whole round (linear in clients)
