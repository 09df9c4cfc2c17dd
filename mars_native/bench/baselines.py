"""The implementations the benchmarks time, on the same data: mars_native and its baselines.

Every function takes the round's data (client state_dicts of NumPy arrays, the scored layers, or
a CBE matrix) and returns its result, so the tests can check that all sides compute the same
thing. Baselines are written the way a competent user of each library would write them:

CBE (concentrated backdoor energy of N clients)
    ``cbe_native``      :func:`mars_native.concentrated_backdoor_energy` per client.
    ``cbe_numpy``       the NumPy reference: batched ``np.linalg.svd`` per layer (fp64).
    ``cbe_torch``       batched torch: ``torch.linalg.matrix_norm(W.reshape(out, in, -1), ord=2)``
                        over all channels of a layer at once (fp32, the tensors' dtype), ``topk``.
    ``cbe_authors``     the authors' approach: ``load_state_dict`` into the torch model, then for
                        every conv directly followed by a BatchNorm a per-channel ``torch.svd``
                        loop and a quantile top-k (values >= the (1 - kappa) quantile).
    ``read_floor``      the stream-read floor: every scored weight read once (a native SIMD sum).
Clustering of N CBEs
    ``cluster_native`` (:class:`mars_native.KWMeans`, paper and official modes),
    ``cluster_numpy`` (:func:`mars_native.reference.kwmeans`, the NumPy twin),
    ``cluster_authors`` (pairwise ``scipy.stats.wasserstein_distance`` + scikit-learn ``KMeans``).
Aggregation of N models
    ``aggregate_native`` (:func:`mars_native.aggregation.weighted_mean` per tensor),
    ``aggregate_numpy`` (an fp64 running sum per tensor), ``aggregate_torch``
    (``torch.stack(...).mean(0)``, fp32), ``aggregate_floor`` (read all inputs, write one output).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mars_native.layers import Layer

State = Mapping[str, np.ndarray]

__all__ = [
    "Reader",
    "aggregate_floor",
    "aggregate_native",
    "aggregate_numpy",
    "aggregate_torch",
    "authors_pairs",
    "bn_scale",
    "cbe_authors",
    "cbe_native",
    "cbe_native_per_model",
    "cbe_numpy",
    "cbe_torch",
    "cluster_authors",
    "cluster_native",
    "cluster_numpy",
    "float_keys",
    "read_floor",
    "scored_arrays",
    "torch_threads",
]


# ---------------------------------------------------------------------------------- helpers
def bn_scale(state: State, bn_prefix: str | None, eps: float = 1e-5, official: bool = False) -> np.ndarray | None:
    """``|gamma| / sqrt(max(var, 0) + eps)`` (fp64), None without a BatchNorm. ``official``:
    a NaN running_var counts as 0 (the authors' code)."""
    if bn_prefix is None:
        return None
    p = f"{bn_prefix}." if bn_prefix else ""
    var = np.asarray(state[p + "running_var"], dtype=np.float64)
    if official:
        var = np.where(np.isnan(var), 0.0, var)
    gamma = np.asarray(state[p + "weight"], dtype=np.float64) if p + "weight" in state else np.ones_like(var)
    return np.abs(gamma) / np.sqrt(np.maximum(var, 0.0) + eps)


def scored_arrays(states: Sequence[State], layers: Sequence[Layer]) -> list[np.ndarray]:
    """The scored weight arrays of every client (what a CBE must read)."""
    return [s[layer.weight_key] for s in states for layer in layers]


def float_keys(state: State) -> list[str]:
    """Keys of the floating-point tensors (the ones an aggregation averages)."""
    return [k for k, v in state.items() if np.asarray(v).dtype.kind == "f"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (restored afterwards); None leaves it as is."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------- floors
class Reader:
    """Reads arrays once (the stream-read floor), on ``n_threads`` threads.

    float32/float64 C-contiguous arrays go through ``_core.stream_sum`` in one call: blocks of
    16,384 elements summed with independent SIMD lanes, spread over the threads, no Python work
    per array (a NumPy ``sum`` per array measured 1.7x slower on one thread, mostly per-call
    overhead on small tensors and pairwise summation). Anything else (integer buffers, strided
    views) is read with ``np.sum``. The floor is therefore as fast as this machine streams
    memory, which makes the ratios against it conservative. Usable as a context manager (kept
    for the callers that hold one per run; there is nothing to close).
    """

    def __init__(self, n_threads: int = 1) -> None:
        self.n_threads = max(1, int(n_threads))

    def __enter__(self) -> Reader:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (the native floor uses the library's threads)."""

    def read(self, arrays: Sequence[np.ndarray]) -> float:
        """Sum of every element of every array (each element read exactly once)."""
        from mars_native import _core

        fast, rest = [], []
        for a in arrays:
            a = np.asarray(a)
            ok = a.dtype in (np.float32, np.float64) and a.flags.c_contiguous and a.flags.aligned
            (fast if ok else rest).append(a)
        total = _core.stream_sum(fast, self.n_threads) if fast else 0.0
        return float(total + sum(float(np.sum(a, dtype=np.float64)) for a in rest))


def read_floor(arrays: Sequence[np.ndarray], reader: Reader) -> float:
    """The stream-read floor: read every array once (returns the sum)."""
    return reader.read(arrays)


def aggregate_floor(states: Sequence[State], keys: Sequence[str], reader: Reader,
                    out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The aggregation floor: read every input tensor once and write one output per key, into
    ``out`` when given (buffers allocated once by the caller, so that the floor pays no page
    faults: mars_native's outputs reuse freed blocks of its buffer cache), else into fresh
    arrays."""
    reader.read([s[k] for s in states for k in keys])
    if out is None:
        out = {k: np.empty_like(states[0][k]) for k in keys}
    for k in keys:
        out[k].fill(0)
    return out


# ---------------------------------------------------------------------------------- CBE
def cbe_native(states: Sequence[State], layers: Sequence[Layer], kappa: float = 0.05,
               mode: str = "paper", n_threads: int | None = None) -> np.ndarray:
    """mars_native: the public :func:`concentrated_backdoor_energies` (every layer of every client
    in one native call, as MARS scores a round), (n, d)."""
    from mars_native.energy import concentrated_backdoor_energies

    return concentrated_backdoor_energies(states, kappa, mode, layers=layers, n_threads=n_threads)


def cbe_native_per_model(states: Sequence[State], layers: Sequence[Layer], kappa: float = 0.05,
                         n_threads: int | None = None) -> np.ndarray:
    """mars_native, one :func:`concentrated_backdoor_energy` call per client (what the per-call
    overhead costs next to :func:`cbe_native`), (n, d)."""
    from mars_native.energy import concentrated_backdoor_energy

    return np.stack([concentrated_backdoor_energy(s, kappa, layers=layers, n_threads=n_threads)
                     for s in states])


def cbe_numpy(states: Sequence[State], layers: Sequence[Layer], kappa: float = 0.05) -> np.ndarray:
    """The NumPy reference: fp64 batched SVD per layer, ceil top-k (sorted descending), (n, d)."""
    from mars_native import reference

    rows = []
    for s in states:
        parts = []
        for layer in layers:
            w = s[layer.weight_key]
            if layer.kind == "linear":
                w = w.reshape(w.shape[0], w.shape[1], 1)
            be = reference.channel_spectral_norms(w, bn_scale(s, layer.bn_prefix))
            parts.append(reference.top_k_energy(be, kappa, "ceil"))
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def cbe_torch(states: Sequence[State], layers: Sequence[Layer], kappa: float = 0.05) -> np.ndarray:
    """Batched torch: the spectral norms of all channels of a layer in one
    ``torch.linalg.matrix_norm(ord=2)`` call (fp32, like the tensors), ``topk``; (n, d)."""
    import torch

    from mars_native import reference

    rows = []
    with torch.no_grad():
        for s in states:
            parts = []
            for layer in layers:
                w = torch.from_numpy(s[layer.weight_key])
                sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
                scale = bn_scale(s, layer.bn_prefix)
                be = sigma.double() * torch.from_numpy(scale) if scale is not None else sigma.double()
                k = reference.top_k_count(be.numel(), kappa)
                parts.append(torch.topk(be, k).values)
            rows.append(torch.cat(parts).numpy())
    return np.stack(rows)


def authors_pairs(model: Any) -> list[tuple[Any, Any]]:
    """(conv, bn) module pairs of ``model`` where a BatchNorm directly follows a conv in module
    definition order (the authors' rule; convs without one are not scored)."""
    import torch

    mods = [m for m in model.modules() if not list(m.children())]
    pairs = []
    for a, b in itertools.pairwise(mods):
        if isinstance(a, torch.nn.modules.conv._ConvNd) and isinstance(b, torch.nn.modules.batchnorm._BatchNorm):
            pairs.append((a, b))
    return pairs


def cbe_authors(states: Sequence[State], model: Any, kappa: float = 0.05) -> list[np.ndarray]:
    """The authors' approach: load each client into the torch ``model``; per scored conv, a
    Python loop of ``torch.svd`` over the output channels (fp32); BE = sigma * |gamma| /
    sqrt(var + eps) (NaN or negative var -> 0); keep the BEs >= their (1 - kappa) quantile, in
    channel order. Returns one CBE per client (lengths can differ with ties)."""
    import torch

    pairs = authors_pairs(model)
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.svd is deprecated in favour of torch.linalg.svd
        for s in states:
            model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in s.items()})
            parts = []
            for conv, bn in pairs:
                w = conv.weight
                var = torch.nan_to_num(bn.running_var, nan=0.0).clamp(min=0.0)
                scale = bn.weight.abs() / torch.sqrt(var + bn.eps)
                be = torch.stack([torch.svd(w[k].reshape(w.shape[1], -1))[1][0] * scale[k]
                                  for k in range(w.shape[0])])
                threshold = torch.quantile(be.double(), 1.0 - kappa)
                parts.append(be.double()[be.double() >= threshold])
            out.append(torch.cat(parts).numpy())
    return out


# ---------------------------------------------------------------------------------- clustering
def cluster_native(X: np.ndarray, mode: str = "paper", n_init: int = 10, seed: int = 0,
                   n_threads: int | None = None) -> np.ndarray:
    """:class:`mars_native.KWMeans` (2 clusters) labels."""
    from mars_native.cluster import KWMeans

    return KWMeans(n_clusters=2, n_init=n_init, random_state=seed, mode=mode, n_threads=n_threads).fit(X).labels_


def cluster_numpy(X: np.ndarray, n_init: int = 10, seed: int = 0) -> np.ndarray:
    """The NumPy twin :func:`mars_native.reference.kwmeans` (paper mode) labels."""
    from mars_native import reference

    return np.asarray(reference.kwmeans(X, n_clusters=2, n_init=n_init, random_state=seed)["labels"])


def pairwise_scipy(X: np.ndarray, pairs: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """``D[i, j] = scipy.stats.wasserstein_distance(X[i], X[j])`` (upper triangle computed, then
    mirrored); with ``pairs``, only those entries (for the time estimate of huge N)."""
    from scipy.stats import wasserstein_distance

    n = X.shape[0]
    D = np.zeros((n, n))
    todo = pairs if pairs is not None else ((i, j) for i in range(n) for j in range(i + 1, n))
    for i, j in todo:
        D[i, j] = D[j, i] = wasserstein_distance(X[i], X[j])
    return D


def kmeans_sklearn(D: np.ndarray, n_init: int = 10, seed: int = 0) -> np.ndarray:
    """scikit-learn ``KMeans(2)`` on the rows of ``D`` (n_init restarts, like KWMeans)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit(D).labels_


def cluster_authors(X: np.ndarray, n_init: int = 10, seed: int = 0) -> np.ndarray:
    """The authors' approach: pairwise scipy W1 matrix, then scikit-learn KMeans on its rows."""
    return kmeans_sklearn(pairwise_scipy(X), n_init, seed)


# ---------------------------------------------------------------------------------- aggregation
def aggregate_native(states: Sequence[State], keys: Sequence[str], n_threads: int | None = None) -> dict[str, np.ndarray]:
    """mars_native: fp64-accumulated mean per tensor (:func:`weighted_mean`, GIL released)."""
    from mars_native.aggregation import weighted_mean

    return {k: weighted_mean([s[k] for s in states], n_threads=n_threads) for k in keys}


def aggregate_numpy(states: Sequence[State], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """NumPy: an fp64 running sum per tensor (``np.add(acc, x, out=acc)``), divided, cast back."""
    out = {}
    for k in keys:
        acc = np.zeros(states[0][k].shape, dtype=np.float64)
        for s in states:
            np.add(acc, s[k], out=acc)
        acc /= len(states)
        out[k] = acc.astype(states[0][k].dtype)
    return out


def aggregate_torch(states: Sequence[State], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """torch: ``torch.stack(tensors).mean(0)`` per tensor (fp32 accumulation, the usual idiom)."""
    import torch

    with torch.no_grad():
        return {k: torch.stack([torch.from_numpy(s[k]) for s in states]).mean(0).numpy() for k in keys}


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """A zero-argument closure (the timing harness calls it)."""
    return lambda: fn(*args, **kwargs)
