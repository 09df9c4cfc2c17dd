"""JSON helpers shared by the simulation and benchmark reports."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, dict keys as strings, tuples as lists and NumPy
    scalars as Python numbers, recursively, so that ``json.dumps(..., allow_nan=False)`` writes
    strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return json_safe(value.item())
    return value
