"""A whole MARS round on N ResNet-18 clients, batch and streaming, vs reading every state once."""

from __future__ import annotations

import pytest

from mars_native.defense import MARS

GROUP = "round-resnet18"


@pytest.mark.benchmark(group=GROUP)
def test_batch(benchmark, resnet18, threads):
    mars = MARS(n_threads=threads)
    _, report = benchmark(mars.aggregate, resnet18.states)
    assert report.n_clients == len(resnet18.states)


@pytest.mark.benchmark(group=GROUP)
def test_streaming(benchmark, resnet18, threads):
    mars = MARS(n_threads=threads)

    def stream():
        rnd = mars.round()
        for s in resnet18.states:
            rnd.add(s, loader=(lambda s=s: s))
        return rnd.finish()

    benchmark(stream)


@pytest.mark.benchmark(group=GROUP)
def test_read_states_once(benchmark, resnet18, reader):
    arrays = [a for s in resnet18.states for a in s.values()]
    benchmark(reader.read, arrays)
