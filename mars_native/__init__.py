"""mars_native: the MARS backdoor defense for federated learning, with a native C++ core."""

from __future__ import annotations

from mars_native._core import build_info as _build_info


def build_info() -> dict:
    """What the compiled core was built with: version, SIMD level, OpenMP, threads, CUDA."""
    return dict(_build_info())


__all__ = ["build_info"]
