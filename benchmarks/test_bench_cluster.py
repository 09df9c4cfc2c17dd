"""2-clustering of N CBEs: KWMeans vs the NumPy twin vs pairwise scipy + scikit-learn KMeans."""

from __future__ import annotations

import pytest

from mars_native.bench import baselines as bl

GROUP = "cluster"


@pytest.mark.benchmark(group=GROUP)
def test_kwmeans(benchmark, cbes, threads):
    benchmark(bl.cluster_native, cbes, n_threads=threads)


@pytest.mark.benchmark(group=GROUP)
def test_kwmeans_official(benchmark, cbes, threads):
    benchmark(bl.cluster_native, cbes, mode="official", n_threads=threads)


@pytest.mark.benchmark(group=GROUP)
def test_numpy_twin(benchmark, cbes):
    benchmark.pedantic(bl.cluster_numpy, (cbes,), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group=GROUP)
def test_authors_scipy_sklearn(benchmark, cbes):
    benchmark.pedantic(bl.cluster_authors, (cbes,), rounds=1, warmup_rounds=0)
