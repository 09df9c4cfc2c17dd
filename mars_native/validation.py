"""Checks of one client's state_dict against a template (the global model, or the layout most
clients share, or for a streaming round the first valid client). Every problem becomes a machine-readable reason ``"<code>: <detail>"``; nothing raises.

Codes: ``invalid_type``, ``missing_keys``, ``extra_keys``, ``shape_mismatch``, ``dtype_mismatch``,
``non_finite``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from mars_native import _core
from mars_native._arrays import NATIVE_FLOAT_DTYPES, is_mapping, to_numpy
from mars_native._cuda_arrays import is_cuda_state

#: key -> (shape, dtype) of a state_dict.
Template = dict[str, tuple[tuple[int, ...], np.dtype]]


def _short(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_NDARRAY_ONLY = frozenset({np.ndarray})


def is_numpy_state(state: Any) -> bool:
    """True for a plain dict whose values are all NumPy arrays: the common CPU case, recognised
    without looking at each value's library (a fast path for the hot per-client checks; the
    types are collected in C, without a Python-level loop)."""
    return isinstance(state, dict) and _NDARRAY_ONLY.issuperset(set(map(type, state.values())))


def on_device(state: Any) -> bool:
    """``is_cuda_state(state)``, answered at once for a dict of NumPy arrays."""
    return not is_numpy_state(state) and is_cuda_state(state)


def state_template(state: Any) -> Template:
    """The keys, shapes and dtypes of ``state`` (a mapping of name -> array/tensor). Read from
    metadata for CUDA tensors (no device access)."""
    if not is_mapping(state):
        raise TypeError(f"expected a state_dict (mapping of name -> tensor), got {type(state).__name__}")
    if is_numpy_state(state):  # fast path: shapes are tuples of ints already
        return {str(k): (v.shape, v.dtype) for k, v in state.items()}
    if is_cuda_state(state):
        from mars_native._cuda_states import device_template

        return device_template(state)
    out: Template = {}
    for key in state.keys():  # noqa: SIM118 - duck-typed mappings (keys + __getitem__)
        arr = to_numpy(state[key], name=str(key))
        out[str(key)] = (tuple(int(s) for s in arr.shape), arr.dtype)
    return out


def state_templates(states: Any) -> list[Template | None]:
    """:func:`state_template` of every state, None for one that is not a mapping of arrays (for
    callers that validate many states and need each layout more than once)."""
    out: list[Template | None] = []
    for state in states:
        try:
            out.append(state_template(state))
        except TypeError:
            out.append(None)
    return out


def majority_template(states: Any, layouts: list[Template | None] | None = None) -> Template | None:
    """The layout (keys, shapes, dtypes) that the most states share; ties go to the earliest.

    Used as the template when no global model is known, so that one malformed client cannot
    become the layout every other client is compared with. States that are not mappings of
    arrays are skipped; None when there is none. ``layouts``: the states' precomputed
    :func:`state_templates`, if the caller has them.
    """
    layouts = state_templates(states) if layouts is None else layouts
    present = [tmpl for tmpl in layouts if tmpl is not None]
    if present and all(tmpl == present[0] for tmpl in present):  # the common case: one layout
        return present[0]
    counts: dict[frozenset, int] = {}
    first: dict[frozenset, Template] = {}
    for tmpl in layouts:
        if tmpl is None:
            continue
        key = frozenset((k, shape, dtype) for k, (shape, dtype) in tmpl.items())
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, tmpl)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k, c in counts.items() if c == best)


#: Arrays up to this many elements are tested element-wise (``np.isfinite(...).all()``: SIMD,
#: its bool temporary stays in cache, no error-state context to enter); larger ones by a sum.
_ELEMENTWISE_MAX = 1 << 21


def all_finite(arr: np.ndarray) -> bool:
    """True when every value of a float array is finite. Small arrays: an exact element-wise
    test. Large arrays: one pass, no temporary: the sum of finite values is finite unless it
    overflows, in which case the exact test decides; float32 and float64 are summed in their own
    precision (NumPy's SIMD pairwise sum, at memory speed; an fp64 accumulator would convert
    every element and run at half that speed)."""
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return True
    if arr.size <= _ELEMENTWISE_MAX:
        return bool(np.isfinite(arr).all())
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(arr) if arr.dtype.itemsize >= 4 else np.sum(arr, dtype=np.float64)
    if np.isfinite(total):
        return True
    return bool(np.isfinite(arr).all())


def non_finite_reason(key: str, arr: np.ndarray) -> str | None:
    """``"non_finite: ..."`` naming ``key`` and its count of NaN/Inf values, or None when every
    value of ``arr`` is finite (an exact element-wise test)."""
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return None
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    return f"non_finite: {key!r} has {n_bad} NaN/Inf value(s) of {arr.size}" if n_bad else None


def scan_keys(entries: Iterable[tuple[Any, int, np.dtype]], skip: Collection[str] = ()) -> list | None:
    """The keys :func:`check_finite` scans in one native call, from ``(key, size, dtype)`` of a
    state's tensors in key order: the non-empty float tensors not in ``skip``. None when one of
    them is not float32/float64 (the general check then decides)."""
    keys = []
    for key, size, dtype in entries:
        if dtype.kind in "fc" and size and str(key) not in skip:
            if dtype not in NATIVE_FLOAT_DTYPES:
                return None
            keys.append(key)
    return keys


def check_finite(state: Any, skip: Collection[str] = (), keys: list | None = None) -> str | None:
    """``"non_finite: ..."`` for the first float tensor of ``state`` (a validated mapping) holding
    a NaN/Inf value, keys in ``skip`` excepted; None when all are finite. CUDA tensors are
    checked on their device. ``keys``: :func:`scan_keys` of a dict of NumPy arrays when the
    caller knows them (its layout was checked: e.g. every client of a round that shares the
    template's layout)."""
    if on_device(state):
        from mars_native._cuda_states import non_finite_keys

        bad = [k for k in non_finite_keys(state) if str(k) not in skip]
        return f"non_finite: {bad[0]!r} holds NaN/Inf value(s)" if bad else None
    if keys is None and isinstance(state, dict) and is_numpy_state(state):
        keys = scan_keys(((k, v.size, v.dtype) for k, v in state.items()), skip)
    if keys is not None:
        # The common case, a dict of float32/float64 NumPy arrays: one native call (it refuses
        # strided views, and then the general path below decides).
        try:
            bad = int(_core.first_non_finite([state[k] for k in keys]))
        except (TypeError, ValueError):
            pass
        else:
            return non_finite_reason(str(keys[bad]), state[keys[bad]]) if bad >= 0 else None
    # float32/float64 C-contiguous arrays are checked in one native call per run of them, in key
    # order; anything else (float16, complex, strided views) one by one.
    run: list[tuple[str, np.ndarray]] = []

    def flush() -> str | None:
        if not run:
            return None
        bad = int(_core.first_non_finite([arr for _, arr in run]))
        reason = non_finite_reason(*run[bad]) if bad >= 0 else None
        run.clear()
        return reason

    for key in state.keys():  # noqa: SIM118 - duck-typed mappings (keys + __getitem__)
        if str(key) in skip:
            continue
        arr = to_numpy(state[key], name=str(key))
        if arr.dtype.kind not in "fc" or arr.size == 0:
            continue
        if arr.dtype in NATIVE_FLOAT_DTYPES and arr.flags.c_contiguous and arr.flags.aligned:
            run.append((str(key), arr))
            continue
        reason = flush()
        if reason is None and not all_finite(arr):
            reason = non_finite_reason(str(key), arr)
        if reason is not None:
            return reason
    return flush()


def check_state(
    state: Any,
    template: Template | None = None,
    *,
    finite: bool = True,
    layout: Template | None = None,
) -> str | None:
    """Why ``state`` cannot be used, or ``None`` when it can.

    Checks, in order: it is a mapping of arrays/tensors; with a ``template``, the same keys, shapes
    and dtypes (read from metadata, so CUDA tensors are not copied); with ``finite`` (default),
    every float value is finite (all tensors, not only scored layers; on the GPU for CUDA
    tensors). ``finite=False`` leaves that to the caller (MARS checks the tensors it does not
    score with :func:`check_finite` and the scored weights through the spectral kernel, which
    returns NaN for a channel holding a NaN/Inf value, so they are read once). ``layout``:
    ``state_template(state)`` when the caller already has it.
    """
    if not is_mapping(state):
        return f"invalid_type: expected a state_dict mapping, got {type(state).__name__}"
    if layout is None:
        try:
            layout = state_template(state)
        except TypeError as exc:
            return f"invalid_type: {exc}"
    for key, (_, dtype) in layout.items():
        if dtype.kind not in "fiub":
            return f"invalid_type: {key!r} has unsupported dtype {dtype}"
    if not layout:
        return "invalid_type: empty state_dict"
    if template is not None:
        missing = [k for k in template if k not in layout]
        if missing:
            return f"missing_keys: {_short(missing)} (present in the reference model)"
        extra = [k for k in layout if k not in template]
        if extra:
            return f"extra_keys: {_short(extra)} (absent from the reference model)"
        for key, (shape, dtype) in layout.items():
            ref_shape, ref_dtype = template[key]
            if shape != ref_shape:
                return f"shape_mismatch: {key!r} has shape {shape}, the reference has {ref_shape}"
            if dtype != ref_dtype:
                return f"dtype_mismatch: {key!r} is {dtype}, the reference is {ref_dtype}"
    return check_finite(state) if finite else None
