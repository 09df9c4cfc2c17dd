"""The benchmark cases and the suite that runs them (data built once, every side on the same data).

Groups:

- ``cbe``: CBE of N client models (:mod:`baselines` ``cbe_*``) vs the stream-read floor;
- ``cluster``: 2-clustering of N CBEs (KWMeans vs NumPy twin vs scipy + scikit-learn);
- ``aggregate``: the mean of N models vs NumPy, torch and the read-inputs/write-output floor;
- ``round``: a whole MARS round (detect + aggregate), batch and streaming, with peak memory,
  vs the time to read every client's state once.

See :mod:`mars_native.bench.timing` for the timing protocol. Baselines whose run on the full
data would exceed ``Config.slow_budget_s`` are extrapolated from a subset of clients (their work
is exactly linear in the number of clients) and flagged as estimates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mars_native.bench import baselines as bl
from mars_native.bench import models as bm
from mars_native.bench.timing import Estimate, Figure, measure, peak_rss_delta

__all__ = ["Config", "Suite", "synthetic_cbes"]

GROUPS = ("cbe", "cluster", "aggregate", "round")


@dataclass
class Config:
    """What the suite runs. :meth:`quick` (about 1-2 minutes) and :meth:`full` are the presets."""

    models: list[str] = field(default_factory=lambda: ["cnn", "resnet18"])
    clients: list[int] = field(default_factory=lambda: [10, 20])
    cluster_sizes: list[int] = field(default_factory=lambda: [20, 100, 1000])
    groups: list[str] = field(default_factory=lambda: list(GROUPS))
    repeat: int = 3
    threads: int = 0  # 0: all CPUs of the process
    budget_s: float = 20.0  # stop repeating an implementation past this much time per case
    slow_budget_s: float = 10.0  # extrapolate a baseline whose full run would exceed this
    max_memory_gb: float = 8.0  # client states of one model above this: fewer clients
    max_pairs: int = 200_000  # scipy pairwise matrices above this many pairs are estimated
    official_max_n: int = 2000  # KWMeans(mode="official") is O(N^2) memory: skipped above
    cbe_dim: int = 250  # CBE length of the clustering data (ResNet-18's CBE has 250 values)
    kappa: float = 0.05
    seed: int = 0
    mode: str = "quick"

    @classmethod
    def quick(cls, **overrides: Any) -> Config:
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides: Any) -> Config:
        base = {"models": ["cnn", "resnet18", "resnext50"], "clients": [10, 20, 100],
                "cluster_sizes": [20, 100, 1000, 10000], "repeat": 5, "budget_s": 40.0,
                "slow_budget_s": 30.0, "max_memory_gb": 10.0, "max_pairs": 600_000, "mode": "full"}
        base.update(overrides)
        return cls(**base)

    def resolved_threads(self) -> int:
        return self.threads if self.threads > 0 else bl.cpu_count()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_cbes(n: int, d: int, seed: int = 0, attacker_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CBE-like vectors of length ``d``: a shared log-normal profile with 5% client noise;
    every ``round(1 / attacker_fraction)``-th row (from row 0) has 10% of its coordinates
    doubled."""
    rng = np.random.default_rng(seed)
    profile = rng.lognormal(0.0, 0.5, d)
    X = profile * np.exp(0.05 * rng.standard_normal((n, d)))
    attackers = np.arange(n) % round(1.0 / attacker_fraction) == 0
    hot = rng.choice(d, size=max(1, d // 10), replace=False)
    X[np.ix_(np.flatnonzero(attackers), hot)] *= 2.0
    return X, attackers


def _noop() -> None:
    return None


def _scaled(fn: Callable[[int], Any], m: int, n: int, what: str) -> Callable[[], Estimate]:
    """Runs ``fn(m)`` (the first m of n items) and extrapolates its time linearly to n."""
    def run() -> Estimate:
        t0 = time.perf_counter()
        fn(m)
        return Estimate((time.perf_counter() - t0) * n / m, f"{m} of {n} {what} timed, x{n / m:g}")
    return run


@dataclass
class _Pool:
    """One model's data: the torch model, base state, client states, attacker flags, layers."""

    name: str
    model: Any
    base: dict[str, np.ndarray]
    states: list[dict[str, np.ndarray]]
    attackers: np.ndarray
    layers: list
    params: int
    scored_params: int
    state_bytes: int


class Suite:
    """Runs the configured cases; :meth:`run` returns the JSON-ready results."""

    def __init__(self, config: Config, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda line: None)
        self.threads = config.resolved_threads()
        self.cases: list[dict[str, Any]] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ data
    def _pool(self, name: str, n_max: int) -> _Pool:
        from mars_native.layers import find_layers

        model = bm.build_model(name, seed=self.config.seed)
        base = bm.base_state(model)
        nbytes = bm.state_nbytes(base)
        fit = int(self.config.max_memory_gb * 2**30 // max(nbytes, 1))
        if fit < n_max:
            self.notes.append(f"{name}: {n_max} clients would take {n_max * nbytes / 2**30:.1f} GiB "
                              f"(> --max-memory-gb {self.config.max_memory_gb:g}); cases limited to "
                              f"{fit} clients")
            n_max = fit
        t0 = time.perf_counter()
        states, attackers = bm.make_clients(base, n_max, seed=self.config.seed)
        self.progress(f"[data] {name}: {n_max} clients x {nbytes / 1e6:.1f} MB generated in "
                      f"{time.perf_counter() - t0:.1f} s")
        layers = find_layers(base)
        return _Pool(name, model, base, states, attackers, layers,
                     params=int(sum(v.size for v in base.values() if v.dtype.kind == "f")),
                     scored_params=int(sum(base[layer.weight_key].size for layer in layers)),
                     state_bytes=nbytes)

    def _record(self, group: str, figures: dict[str, Figure], **info: Any) -> dict[str, Any]:
        rec = {"group": group, **info, "threads": self.threads,
               "impls": {name: fig.to_dict() for name, fig in figures.items()}}
        self.cases.append(rec)
        return rec

    def _time(self, impls: dict[str, Callable[[], Any]], warmups: dict[str, Callable[[], Any]] | None = None) -> dict[str, Figure]:
        return measure(impls, self.config.repeat, self.config.budget_s, warmups,
                       progress=lambda line: self.progress("    " + line))

    def _probe(self, fn1: Callable[[], Any]) -> float:
        """Warm-up run on one client, timed (decides whether a baseline is extrapolated)."""
        t0 = time.perf_counter()
        fn1()
        return time.perf_counter() - t0

    def _maybe_scaled(self, name: str, per_clients: Callable[[int], Any], n: int) -> Callable[[], Any]:
        t1 = self._probe(lambda: per_clients(1))
        if t1 * n <= self.config.slow_budget_s or n == 1:
            return lambda: per_clients(n)
        m = max(1, min(n - 1, int(self.config.slow_budget_s // max(t1, 1e-9))))
        self.progress(f"    {name}: ~{t1 * n:.0f} s per run on {n} clients; extrapolating from {m}")
        return _scaled(per_clients, m, n, "clients")

    # ------------------------------------------------------------------ groups
    def _cbe(self, pool: _Pool, n: int, reader: bl.Reader) -> None:
        states, layers, k, t = pool.states[:n], pool.layers, self.config.kappa, self.threads
        self.progress(f"[cbe] {pool.name}, {n} clients")
        arrays = bl.scored_arrays(states, layers)

        def torch_cbe(m: int) -> Any:
            with bl.torch_threads(t):
                return bl.cbe_torch(states[:m], layers, k)

        def authors_cbe(m: int) -> Any:
            with bl.torch_threads(t):
                return bl.cbe_authors(states[:m], pool.model, k)

        native = lambda: bl.cbe_native(states, layers, k, n_threads=t)
        native()  # warm-up
        impls = {
            "mars_native": native,
            "per_model": lambda: bl.cbe_native_per_model(states, layers, k, n_threads=t),
            "numpy": self._maybe_scaled("numpy", lambda m: bl.cbe_numpy(states[:m], layers, k), n),
            "torch_batched": self._maybe_scaled("torch_batched", torch_cbe, n),
            "authors": self._maybe_scaled("authors", authors_cbe, n),
            "floor": lambda: bl.read_floor(arrays, reader),
        }
        bl.read_floor(arrays, reader)  # warm-up
        figures = self._time(impls, warmups={name: _noop for name in impls})
        # Agreement (untimed, on 2 clients): every side computes the same CBE.
        two = states[: min(2, n)]
        ref = bl.cbe_native(two, layers, k, n_threads=t)
        with bl.torch_threads(t):
            tor = bl.cbe_torch(two, layers, k)
            auth = bl.cbe_authors(two[:1], pool.model, k)[0]
        off = bl.cbe_native(two[:1], [la for la in layers if la.bn_prefix is not None], k, mode="official")[0]
        check = {
            "cbe_length": int(ref.shape[1]),
            "numpy_max_rel_diff": float(np.max(np.abs(bl.cbe_numpy(two, layers, k) - ref) / ref)),
            "torch_max_rel_diff": float(np.max(np.abs(tor - ref) / ref)),
            "authors_vs_official_max_rel_diff": (float(np.max(np.abs(auth - off) / off))
                                                 if auth.shape == off.shape else None),
        }
        self._record("cbe", figures, model=pool.name, clients=n, params=pool.params,
                     scored_params=pool.scored_params, bytes_read=int(sum(a.nbytes for a in arrays)),
                     check=check)

    def _aggregate(self, pool: _Pool, n: int, reader: bl.Reader) -> None:
        states, t = pool.states[:n], self.threads
        keys = bl.float_keys(pool.base)
        self.progress(f"[aggregate] {pool.name}, {n} clients")

        def torch_mean() -> Any:
            with bl.torch_threads(t):
                return bl.aggregate_torch(states, keys)

        floor_out = {k: np.empty_like(states[0][k]) for k in keys}
        impls = {
            "mars_native": lambda: bl.aggregate_native(states, keys, n_threads=t),
            "numpy": lambda: bl.aggregate_numpy(states, keys),
            "torch_stack_mean": torch_mean,
            "floor": lambda: bl.aggregate_floor(states, keys, reader, out=floor_out),
        }
        figures = self._time(impls)
        nat, ref, tor = impls["mars_native"](), impls["numpy"](), torch_mean()
        check = {
            "numpy_max_abs_diff": float(max(np.max(np.abs(nat[k_] - ref[k_])) for k_ in keys)),
            "torch_max_abs_diff": float(max(np.max(np.abs(nat[k_] - tor[k_])) for k_ in keys)),
        }
        nbytes = sum(states[0][k_].nbytes for k_ in keys)
        self._record("aggregate", figures, model=pool.name, clients=n, params=pool.params,
                     bytes_read=int(nbytes * n), bytes_written=int(nbytes), check=check)

    def _round(self, pool: _Pool, n: int, reader: bl.Reader) -> None:
        from mars_native.defense import MARS

        states, t = pool.states[:n], self.threads
        self.progress(f"[round] {pool.name}, {n} clients")
        mars = MARS(n_threads=t)
        all_arrays = [a for s in states for a in s.values()]

        def batch() -> Any:
            return mars.aggregate(states)

        def streaming() -> Any:
            rnd = mars.round()
            for s in states:
                rnd.add(s, loader=(lambda s=s: s))
            return rnd.finish()

        memory = {"batch": peak_rss_delta(batch), "streaming": peak_rss_delta(streaming)}
        impls = {"batch": batch, "streaming": streaming, "floor": lambda: reader.read(all_arrays)}
        reader.read(all_arrays)
        figures = self._time(impls, warmups={name: _noop for name in impls})
        _, report = batch()
        rejected = set(np.flatnonzero(~report.accepted).tolist())
        attackers = set(np.flatnonzero(pool.attackers[:n]).tolist())
        check = {"rejected": sorted(rejected), "attackers": sorted(attackers),
                 "detected_all_attackers": attackers <= rejected,
                 "false_positives": len(rejected - attackers)}
        self._record("round", figures, model=pool.name, clients=n, params=pool.params,
                     bytes_read=int(sum(a.nbytes for a in all_arrays)),
                     peak_memory_bytes=memory, check=check)

    def _cluster(self, n: int) -> None:
        cfg, t = self.config, self.threads
        X, attackers = synthetic_cbes(n, cfg.cbe_dim, seed=cfg.seed)
        self.progress(f"[cluster] {n} CBEs of length {cfg.cbe_dim}")
        impls: dict[str, Callable[[], Any]] = {
            "mars_native": lambda: bl.cluster_native(X, n_threads=t),
            "mars_native_official": lambda: bl.cluster_native(X, mode="official", n_threads=t),
            "numpy": lambda: bl.cluster_numpy(X),
            "authors": lambda: bl.cluster_authors(X),
        }
        warm = {name: _noop for name in impls}
        warm["mars_native"] = lambda: bl.cluster_native(X[: min(n, 20)], n_threads=t)
        warm["numpy"] = lambda: bl.cluster_numpy(X[: min(n, 20)])
        warm["authors"] = lambda: bl.cluster_authors(X[: min(n, 20)])
        skipped: dict[str, str] = {}
        if n > cfg.official_max_n:
            skipped["mars_native_official"] = (f"skipped: the official mode builds the {n}x{n} "
                                               "distance matrix and clusters its rows")
        n_pairs = n * (n - 1) // 2
        if n_pairs > cfg.max_pairs:
            impls["authors"] = self._authors_cluster_estimate(X, n_pairs)
        for name in skipped:
            impls.pop(name)
        figures = self._time(impls, warm)
        for name, why in skipped.items():
            figures[name] = Figure(error=why)
        labels = bl.cluster_native(X, n_threads=t)
        check = {"cbe_dim": cfg.cbe_dim,
                 "native_separates_attackers": bool(len(set(labels[attackers])) == 1
                                                    and len(set(labels[~attackers])) == 1
                                                    and labels[attackers][0] != labels[~attackers][0])}
        self._record("cluster", figures, clients=n, check=check)

    def _authors_cluster_estimate(self, X: np.ndarray, n_pairs: int) -> Callable[[], Estimate]:
        from mars_native._native import pairwise_wasserstein

        n = X.shape[0]
        rng = np.random.default_rng(self.config.seed)
        sample = min(n_pairs, max(2000, self.config.max_pairs // 10))
        ii = rng.integers(0, n, size=2 * sample)
        jj = rng.integers(0, n, size=2 * sample)
        pairs = [(int(i), int(j)) for i, j in zip(ii, jj) if i != j][:sample]
        D = pairwise_wasserstein(X, n_threads=self.threads)  # the same matrix scipy would give

        def run() -> Estimate:
            t0 = time.perf_counter()
            bl.pairwise_scipy(X, pairs)
            pair_s = (time.perf_counter() - t0) / len(pairs)
            t1 = time.perf_counter()
            bl.kmeans_sklearn(D)
            kmeans_s = time.perf_counter() - t1
            return Estimate(pair_s * n_pairs + kmeans_s,
                            f"scipy W1 on {len(pairs):,} of {n_pairs:,} pairs timed (x{n_pairs / len(pairs):.0f}); "
                            f"KMeans on the {n}x{n} matrix timed in full")
        return run

    # ------------------------------------------------------------------ the suite
    def _model_clients(self) -> Iterator[tuple[str, list[int]]]:
        for name in self.config.models:
            yield name, sorted(set(self.config.clients))

    def run(self) -> dict[str, Any]:
        """Runs every configured case; returns {"config", "cases", "notes", "wall_s", ...}."""
        t0 = time.perf_counter()
        groups = [g for g in self.config.groups if g in GROUPS]
        with bl.Reader(self.threads) as reader:
            model_groups = [g for g in groups if g != "cluster"]
            if model_groups:
                for name, clients in self._model_clients():
                    pool = self._pool(name, max(clients))
                    for n in clients:
                        if n > len(pool.states):
                            continue
                        for g in model_groups:
                            getattr(self, f"_{g}")(pool, n, reader)
                    del pool
            if "cluster" in groups:
                for n in sorted(set(self.config.cluster_sizes)):
                    self._cluster(n)
        return {"config": self.config.to_dict(), "threads": self.threads, "cases": self.cases,
                "notes": self.notes, "wall_s": time.perf_counter() - t0}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return float("nan")
    return a / b
