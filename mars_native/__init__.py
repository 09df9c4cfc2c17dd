"""mars_native: the MARS backdoor defense for federated learning, with a native C++ core.

MARS (NeurIPS 2025) rejects backdoored client models from their weights alone: per-neuron
Lipschitz constants ("backdoor energy"), the top kappa share per layer ("concentrated backdoor
energy"), 2-means clustering under the 1-D Wasserstein distance, and a rule that keeps the
low-energy cluster. See README.md and ``help(mars_native.MARS)``.
"""

from __future__ import annotations

from mars_native import io
from mars_native._core import build_info as _build_info
from mars_native._native import (
    buffer_cache_info,
    channel_spectral_norms,
    get_num_threads,
    pairwise_wasserstein,
    set_buffer_cache_limit,
    set_num_threads,
    top_k_energy,
    wasserstein_1d,
)
from mars_native.cluster import KWMeans
from mars_native.defense import MARS, Detection
from mars_native.energy import (
    backdoor_energies,
    backdoor_energy,
    concentrated_backdoor_energies,
    concentrated_backdoor_energy,
)
from mars_native.layers import Layer, find_layers

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled core was built with.

    Returns a dict with: ``version``, ``simd`` (vector instruction level compiled in, e.g.
    "avx2+fma"), ``march`` (the -march flag), ``openmp`` (bool), ``threads`` (default thread
    count), ``max_threads`` (hardware threads), ``cuda_compiled`` (bool) and ``cuda_devices``
    (CUDA devices visible at run time; 0 without CUDA).
    """
    info = dict(_build_info())
    info.setdefault("cuda_devices", 0)
    return info


__all__ = [
    "MARS",
    "Detection",
    "KWMeans",
    "Layer",
    "__version__",
    "backdoor_energies",
    "backdoor_energy",
    "buffer_cache_info",
    "build_info",
    "channel_spectral_norms",
    "concentrated_backdoor_energies",
    "concentrated_backdoor_energy",
    "find_layers",
    "get_num_threads",
    "io",
    "pairwise_wasserstein",
    "set_buffer_cache_limit",
    "set_num_threads",
    "top_k_energy",
    "wasserstein_1d",
]
