"""Thread-count independence and thread safety of the compiled kernels.

Every kernel writes each output element from exactly one thread and reduces in a fixed serial
order, so results must be bit-identical (compared with tobytes()) for any n_threads, including
more threads than cores or than work items.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mars_native._native as mn
from mars_native.cluster import KWMeans

THREADS = [1, 2, 8]


def same_bits(results) -> bool:
    first = np.ascontiguousarray(results[0]).tobytes()
    return all(np.ascontiguousarray(r).tobytes() == first for r in results[1:])


# Sizes are chosen so that every kernel splits its work into several chunks (the kernels keep
# small problems on one thread: at least ~32k weights per chunk for the spectral norms, ~16k
# multiply-adds per chunk for K-Means assignment, ~8k for pairwise distances).
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((256, 64, 3, 3), np.float32),  # 4 chunks
        ((300, 7, 5, 5), np.float64),  # 2 chunks
        ((64, 70, 9), np.float32),  # 2 chunks (conv1d)
        ((2000, 130), np.float64),  # 8 chunks (Linear rows)
    ],
)
def test_spectral_norms_bit_identical(shape, dtype):
    w = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    scale = np.random.default_rng(1).uniform(0.5, 2.0, shape[0])
    assert same_bits([mn.channel_spectral_norms(w, scale, n_threads=t) for t in THREADS])


@pytest.mark.parametrize("p", [1, 2, 1.5])
def test_pairwise_wasserstein_bit_identical(p):
    X = np.random.default_rng(2).gamma(2.0, size=(57, 40))
    assert same_bits([mn.pairwise_wasserstein(X, p, n_threads=t) for t in THREADS])


@pytest.mark.parametrize(("mode", "p"), [("paper", 1), ("paper", 2), ("official", 1)])
@pytest.mark.parametrize("n_init", [1, 10])  # 1: per-sample threads; 10: restarts in parallel
def test_kwmeans_bit_identical(mode, p, n_init):
    rng = np.random.default_rng(3)
    X = np.vstack([rng.gamma(2.0, size=(400, 30)), rng.gamma(2.0, size=(300, 30)) + 1.0])
    fits = [KWMeans(2, p=p, n_init=n_init, mode=mode, n_threads=t).fit(X) for t in THREADS]
    assert same_bits([f.labels_ for f in fits])
    assert same_bits([f.cluster_centers_ for f in fits])
    assert len({(f.inertia_, f.n_iter_, f.best_init_) for f in fits}) == 1
    assert same_bits([f.predict(X[::-1]) for f in fits])


def test_default_thread_count_roundtrip():
    before = mn.get_num_threads()
    try:
        mn.set_num_threads(3)
        assert mn.get_num_threads() == 3
        w = np.random.default_rng(4).standard_normal((16, 8, 3, 3))
        assert same_bits([mn.channel_spectral_norms(w), mn.channel_spectral_norms(w, n_threads=1)])
        mn.set_num_threads(None)
        assert mn.get_num_threads() >= 1
        with pytest.raises(ValueError, match="n_threads"):
            mn.set_num_threads(-2)
    finally:
        mn.set_num_threads(before)


def test_concurrent_calls_from_python_threads():
    # The kernels release the GIL and keep no shared mutable state: calls from several Python
    # threads at once give the same results as sequential calls.
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((32, 16, 3, 3)).astype(np.float32) for _ in range(6)]
    X = rng.gamma(2.0, size=(30, 25))
    expected_norms = [mn.channel_spectral_norms(w, n_threads=1) for w in weights]
    expected_d = mn.pairwise_wasserstein(X, n_threads=1)
    expected_labels = KWMeans(2, n_threads=1).fit_predict(X)

    def job(i):
        return (
            mn.channel_spectral_norms(weights[i], n_threads=2),
            mn.pairwise_wasserstein(X, n_threads=2),
            KWMeans(2, n_threads=2).fit_predict(X),
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(job, range(len(weights))))
    for i, (norms, d, labels) in enumerate(results):
        assert same_bits([norms, expected_norms[i]])
        assert same_bits([d, expected_d])
        assert same_bits([labels, expected_labels])
