"""Shared data for the pytest-benchmark groups (``pytest benchmarks/ --benchmark-only``).

These files are not part of the test suite (pyproject's ``testpaths`` is ``python_tests``): they
time mars_native next to its baselines on the same data, one pytest-benchmark group per case,
so ``--benchmark-group-by=group`` prints each figure next to its baselines.

Sizes: ``MARS_BENCH_SIZE=small`` (default: ResNet-18 with 4 clients, 200 CBEs; a few minutes)
or ``full`` (20 clients, 1,000 CBEs: the issue's headline cases). ``MARS_BENCH_THREADS`` sets the
threads of mars_native, torch and the read floor (default: all CPUs). For the complete suite with
tables, targets and plots use ``mars-native bench``.
"""

from __future__ import annotations

import os

import pytest

from mars_native.bench import baselines as bl
from mars_native.bench import cases
from mars_native.bench import models as bm
from mars_native.layers import find_layers

SIZE = os.environ.get("MARS_BENCH_SIZE", "small")
CLIENTS = 20 if SIZE == "full" else 4
CBES = 1000 if SIZE == "full" else 200
THREADS = int(os.environ.get("MARS_BENCH_THREADS", "0")) or bl.cpu_count()


class Round:
    """One model's round: the torch model, base state, client states and scored layers."""

    def __init__(self, name: str, n: int) -> None:
        self.model = bm.build_model(name)
        self.base = bm.base_state(self.model)
        self.states, self.attackers = bm.make_clients(self.base, n)
        self.layers = find_layers(self.base)
        self.keys = bl.float_keys(self.base)


@pytest.fixture(scope="session")
def threads() -> int:
    return THREADS


@pytest.fixture(scope="session")
def resnet18() -> Round:
    return Round("resnet18", CLIENTS)


@pytest.fixture(scope="session")
def cbes():
    return cases.synthetic_cbes(CBES, 250)[0]


@pytest.fixture(scope="session")
def reader():
    with bl.Reader(THREADS) as r:
        yield r


@pytest.fixture(autouse=True)
def _torch_threads():
    with bl.torch_threads(THREADS):
        yield
