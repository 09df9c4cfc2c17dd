"""Device arrays of the CUDA backend: recognising them and using the library they belong to.

:func:`is_cuda_array` tells torch CUDA tensors, CuPy arrays and other ``__cuda_array_interface__``
objects from CPU data without importing torch or CuPy. :func:`library` returns an adapter
(:class:`TorchArrays` or :class:`CuPyArrays`) bound to the array's device, which allocates
results with that library on that device, converts inputs on the device (float16/bfloat16 to
float32, non-contiguous to contiguous), builds the fast ``(ptr, shape, typestr, device)``
descriptors the bindings read, and gives the library's current stream. Internal module of
:mod:`mars_native._cuda`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from mars_native import _core

_TYPESTR = {"float32": "<f4", "float64": "<f8", "int64": "<i8"}
_TORCH_DTYPE_NAMES: dict[Any, str] = {}  # torch dtype -> "float32" (filled on first use)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _module_root(x: Any) -> str:
    return (type(x).__module__ or "").split(".", 1)[0]


def is_cuda_array(x: Any) -> bool:
    """True for a torch CUDA tensor, a CuPy array, or any object with ``__cuda_array_interface__``.

    CPU tensors, NumPy arrays and everything else are False (they go to the CPU kernels).
    Never imports torch or CuPy.
    """
    root = _module_root(x)
    if root == "torch":
        return bool(getattr(x, "is_cuda", False))
    if root == "cupy":
        return hasattr(x, "__cuda_array_interface__")
    if root == "numpy" or isinstance(x, (list, tuple, numbers.Number)):
        return False
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001 - a property that raises means "not a CUDA array"
        return False


def is_cuda_state(state: Any) -> bool:
    """True when any value of the state_dict ``state`` is a CUDA array."""
    if not (isinstance(state, Mapping) or hasattr(state, "keys")):
        return False
    keys = state.keys()  # dict-likes (e.g. Flower records) need not iterate over their keys
    return any(is_cuda_array(state[k]) for k in keys)


def is_torch_cuda(x: Any) -> bool:
    """True for a torch tensor held on a CUDA device (checked without importing torch)."""
    return _module_root(x) == "torch" and bool(getattr(x, "is_cuda", False))


def array_shape(x: Any) -> tuple[int, ...]:
    """The shape of an array-like from its metadata (``shape``, else the CUDA array interface)."""
    shape = getattr(x, "shape", None)
    if shape is None and is_cuda_array(x):
        shape = x.__cuda_array_interface__["shape"]
    if shape is None:
        shape = np.shape(x)
    return tuple(int(s) for s in shape)


def require_backend() -> None:
    """RuntimeError (with the reason) unless the CUDA backend is compiled in and a device exists."""
    info = _core.cuda.info()
    if not info["compiled"]:
        raise RuntimeError(
            "mars_native was built without the CUDA backend; rebuild with a CUDA toolkit and "
            "MARS_NATIVE_CUDA=ON, or pass CPU arrays"
        )
    if info["devices"] == 0:
        raise RuntimeError(
            f"mars_native: no CUDA device is available ({info['reason']}); pass CPU arrays or "
            "use MARS(device='cpu')"
        )


# ---------------------------------------------------------------------------- array libraries

class TorchArrays:
    """Allocation, conversion and descriptors for torch CUDA tensors on one device."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device  # torch.device("cuda", i)
        self.index = int(device.index if device.index is not None else torch.cuda.current_device())
        self._readable = {getattr(torch, name): _TYPESTR[name] for name in ("float32", "float64")}

    def owns(self, x: Any) -> bool:
        return is_torch_cuda(x)

    def wrap(self, x: Any) -> Any:
        return self.torch.as_tensor(x, device=self.device)  # zero-copy for CUDA interface objects

    def dtype_name(self, x: Any) -> str:
        name = _TORCH_DTYPE_NAMES.get(x.dtype)
        if name is None:
            name = _TORCH_DTYPE_NAMES[x.dtype] = str(x.dtype).replace("torch.", "")
        return name

    def on_device(self, x: Any, name: str) -> Any:
        if not self.owns(x):
            if is_cuda_array(x):
                x = self.wrap(x)
            else:
                return self.torch.as_tensor(np.asarray(x), device=self.device)  # small host input
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the call runs on {self.device}")
        x = x.detach()
        if x.is_neg():
            x = x.resolve_neg()
        return x

    def convert(self, x: Any, dtype: str) -> Any:
        return x.to(getattr(self.torch, dtype)).contiguous()

    def contiguous(self, x: Any) -> Any:
        return x.contiguous()

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def desc(self, x: Any) -> tuple:
        return (x.data_ptr(), tuple(x.shape), _TYPESTR[self.dtype_name(x)], self.index)

    def split(self, x: Any, sizes: list[int]) -> list[Any]:
        return list(self.torch.split(x, sizes))

    def segment_descs(self, buf: Any, sizes: list[int]) -> list[tuple]:
        """Descriptors of the consecutive 1-D segments of ``sizes`` elements of the C-contiguous
        float64 ``buf`` (what ``desc`` gives for those views), by address arithmetic."""
        base, descs, offset = buf.data_ptr(), [], 0
        for n in sizes:
            descs.append((base + 8 * offset, (n,), "<f8", self.index))
            offset += n
        return descs

    def fast_desc(self, x: Any, f64_only: bool = False) -> tuple | None:
        """``desc(x)`` when the kernels can read ``x`` as it is: a plain torch tensor on this
        device, float32 or float64 (float64 only with ``f64_only``), C-contiguous, without a
        pending negation; else None (the caller then takes the validating, converting path).
        A few attribute reads, for the thousands of tensors of a round."""
        ts = self._readable.get(x.dtype) if type(x) is self.torch.Tensor else None
        if (ts is None or (f64_only and ts != "<f8") or x.get_device() != self.index
                or not x.is_contiguous() or x.is_neg()):
            return None
        return (x.data_ptr(), tuple(x.shape), ts, self.index)

    def stream(self) -> int:
        return int(self.torch.cuda.current_stream(self.device).cuda_stream)

    def all_finite(self, x: Any) -> bool:
        return bool(self.torch.isfinite(x).all())

    def to_host(self, x: Any) -> np.ndarray:
        return x.cpu().numpy()

    def cat(self, parts: list[Any]) -> Any:
        return self.torch.cat(parts) if parts else self.empty((0,), "float64")

    def abs(self, x: Any) -> Any:
        return self.torch.abs(x)

    def sqrt(self, x: Any) -> Any:
        return self.torch.sqrt(x)

    def where_nan(self, x: Any, value: float) -> Any:
        return self.torch.nan_to_num(x, nan=value, posinf=math.inf, neginf=-math.inf)

    def clamp_min(self, x: Any, value: float) -> Any:
        return self.torch.clamp(x, min=value)

    def ones(self, n: int) -> Any:
        return self.torch.ones(n, dtype=self.torch.float64, device=self.device)

    def copy(self, x: Any) -> Any:
        return x.detach().clone()

    def maximum(self, a: Any, b: Any) -> Any:
        return self.torch.maximum(a, b)

    def cast_like(self, x: Any, like: Any) -> Any:
        return x.to(like.dtype)

    def all_finite_lazy(self, x: Any) -> Any:
        return self.torch.isfinite(x).all()

    def stack(self, parts: list[Any]) -> Any:
        return self.torch.stack(parts)


class CuPyArrays:
    """Allocation, conversion and descriptors for CuPy arrays on one device."""

    def __init__(self, device_id: int) -> None:
        import cupy

        self.cp = cupy
        self.index = int(device_id)
        self.device = cupy.cuda.Device(self.index)

    def owns(self, x: Any) -> bool:
        return _module_root(x) == "cupy"

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype)

    def on_device(self, x: Any, name: str) -> Any:
        if not self.owns(x):
            with self.device:
                return self.cp.asarray(x if is_cuda_array(x) else np.asarray(x))
        if int(x.device.id) != self.index:
            raise ValueError(f"{name} is on cuda:{x.device.id} but the call runs on cuda:{self.index}")
        return x

    def convert(self, x: Any, dtype: str) -> Any:
        with self.device:
            return self.cp.ascontiguousarray(x.astype(dtype, copy=False))

    def contiguous(self, x: Any) -> Any:
        with self.device:
            return self.cp.ascontiguousarray(x)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        with self.device:
            return self.cp.empty(shape, dtype=dtype)

    def desc(self, x: Any) -> tuple:
        return (int(x.data.ptr), tuple(int(s) for s in x.shape), _TYPESTR[str(x.dtype)], self.index)

    def split(self, x: Any, sizes: list[int]) -> list[Any]:
        offsets = itertools.accumulate(sizes, initial=0)
        return [x[a:b] for a, b in itertools.pairwise(offsets)]

    def segment_descs(self, buf: Any, sizes: list[int]) -> list[tuple]:
        return [self.desc(v) for v in self.split(buf.reshape(-1), sizes)]

    def stream(self) -> int:
        with self.device:
            return int(self.cp.cuda.get_current_stream().ptr)

    def all_finite(self, x: Any) -> bool:
        with self.device:
            return bool(self.cp.isfinite(x).all())

    def to_host(self, x: Any) -> np.ndarray:
        return self.cp.asnumpy(x)

    def cat(self, parts: list[Any]) -> Any:
        with self.device:
            return self.cp.concatenate(parts) if parts else self.cp.empty((0,), dtype="float64")

    def abs(self, x: Any) -> Any:
        return self.cp.abs(x)

    def sqrt(self, x: Any) -> Any:
        return self.cp.sqrt(x)

    def where_nan(self, x: Any, value: float) -> Any:
        return self.cp.where(self.cp.isnan(x), value, x)

    def clamp_min(self, x: Any, value: float) -> Any:
        return self.cp.maximum(x, value)  # NaN propagates, like np.maximum

    def ones(self, n: int) -> Any:
        with self.device:
            return self.cp.ones(n, dtype="float64")

    def copy(self, x: Any) -> Any:
        with self.device:
            return x.copy()

    def maximum(self, a: Any, b: Any) -> Any:
        with self.device:
            return self.cp.maximum(a, b)

    def cast_like(self, x: Any, like: Any) -> Any:
        with self.device:
            return x.astype(like.dtype)

    def all_finite_lazy(self, x: Any) -> Any:
        with self.device:
            return self.cp.isfinite(x).all()

    def stack(self, parts: list[Any]) -> Any:
        with self.device:
            return self.cp.stack(parts)


Arrays = TorchArrays | CuPyArrays


def library(x: Any, name: str) -> Arrays:
    """The array library (and device) of the CUDA array ``x``; TypeError for anything else,
    RuntimeError when the backend is missing or there is no device."""
    if not is_cuda_array(x):
        raise TypeError(f"{name} must be a CUDA array (torch CUDA tensor or CuPy array), got "
                        f"{type(x).__name__}; CPU arrays go to mars_native's CPU functions")
    require_backend()
    root = _module_root(x)
    if root == "torch" and getattr(x, "is_cuda", False):
        return TorchArrays(x.device)
    if root == "cupy":
        return CuPyArrays(x.device.id)
    try:
        import torch

        return TorchArrays(torch.as_tensor(x).device)  # the pointer's device, zero-copy
    except ImportError:
        pass
    try:
        import cupy

        return CuPyArrays(cupy.asarray(x).device.id)
    except ImportError as exc:
        raise TypeError(f"{name}: a CUDA array of type {type(x).__name__} needs torch or CuPy to "
                        "allocate results") from exc


def float_input(lib: Arrays, x: Any, name: str, *, allow_int: bool = False,
                to64: bool = False) -> Any:
    """A contiguous float32/float64 (float64 when ``to64``) device array from ``x``."""
    x = lib.on_device(x, name)
    dt = lib.dtype_name(x)
    if dt in ("float16", "bfloat16"):
        return lib.convert(x, "float64" if to64 else "float32")
    if dt in ("float32", "float64"):
        return lib.convert(x, "float64") if (to64 and dt == "float32") else lib.contiguous(x)
    if allow_int and dt.startswith(("int", "uint")):
        return lib.convert(x, "float64")
    kinds = "real numbers (float or int)" if allow_int else "floating-point values"
    raise TypeError(f"{name} must hold {kinds}, got dtype {dt} and shape {tuple(x.shape)}")


def dtype_name(dtype: Any) -> str:
    """The dtype name ("float32") of a name, NumPy dtype or type, or torch dtype."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).replace("torch.", "")


def require_finite(lib: Arrays, x: Any, name: str) -> None:
    if not lib.all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf (shape {tuple(x.shape)}); only finite values "
                         "are accepted")


def real_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_p(p: Any) -> float:
    p = real_number(p, "p")
    if not (p >= 1.0 and math.isfinite(p)):
        raise ValueError(f"p must be a finite real number >= 1, got {p!r}")
    return p


def check_kappa(kappa: Any) -> float:
    kappa = real_number(kappa, "kappa")
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa!r}")
    return kappa


