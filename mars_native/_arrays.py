"""Conversions between the containers users hand us (NumPy arrays, torch tensors) and NumPy.

torch is never imported here: a tensor is recognised by its type's module, and converted with
its own methods, so the package works with any torch version or none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: float dtypes the compiled kernels read without a copy.
NATIVE_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_torch_tensor(x: Any) -> bool:
    """True when ``x`` is a ``torch.Tensor`` (checked without importing torch)."""
    module = type(x).__module__ or ""
    return module.startswith("torch") and hasattr(x, "detach") and hasattr(x, "dtype")


def to_numpy(x: Any, *, name: str = "array") -> np.ndarray:
    """View ``x`` as a NumPy array, without a copy where possible.

    - ``np.ndarray``: returned as is.
    - CPU ``torch.Tensor``: ``tensor.detach().numpy()`` shares memory (no copy). bfloat16 (which
      NumPy cannot represent) is converted to float32. Tensors on another device are copied to the
      host.
    - anything else array-like (lists, scalars): ``np.asarray``.

    Raises ``TypeError`` naming ``name`` when ``x`` cannot be read as an array.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        t = x.detach()
        if getattr(t, "device", None) is not None and t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        return t.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:
        raise TypeError(f"{name}: cannot read {type(x).__name__} as an array ({exc})") from exc
    if arr.dtype == object:
        raise TypeError(f"{name}: cannot read {type(x).__name__} as a numeric array")
    return arr


def as_float_array(x: Any, *, name: str = "array") -> np.ndarray:
    """``to_numpy`` plus a float dtype: float32/float64 kept as is (no copy), float16 converted to
    float32; integer, bool, complex or object data raise ``TypeError`` naming ``name``."""
    arr = to_numpy(x, name=name)
    if arr.dtype in NATIVE_FLOAT_DTYPES:
        return arr
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise TypeError(f"{name}: expected a float32/float64 tensor, got dtype {arr.dtype}")


def is_mapping(x: Any) -> bool:
    """True for dict-like containers (dict, OrderedDict, Flower ArrayRecord views...)."""
    return isinstance(x, Mapping) or (hasattr(x, "keys") and hasattr(x, "__getitem__"))
