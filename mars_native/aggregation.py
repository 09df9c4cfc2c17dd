"""Server-side aggregation: the weighted mean of the client models MARS accepts.

Three entry points, one set of rules:

- :func:`weighted_mean` — one tensor: ``sum_i w_i x_i / sum_i w_i`` in fp64 (compiled kernel).
- :func:`aggregate_detected` — a whole round at once (behind ``MARS.aggregate``).
- :class:`Round` — a streaming round (behind ``MARS.round``): each client is scored and added to an
  fp64 running sum as it arrives; ``finish()`` clusters and removes the rejected clients.

Rules:

- **Float tensors** of the accepted clients are averaged with fp64 accumulation, each weighted by
  its ``weight`` (e.g. ``num_examples``): ``mean = sum_i w_i x_i / sum_i w_i``. With a global
  model the result is ``global + server_lr * (mean - global)``, which equals
  ``global + server_lr * weighted_mean(accepted - global)``. float64 tensors are computed in
  float64; float32/float16/bfloat16 tensors are rounded once to float32 and then cast back.
- **Non-float tensors** (integers such as BatchNorm's ``num_batches_tracked``, bools) are never
  averaged: they are copied from the global model, or, without one, are the element-wise maximum
  over the contributing accepted clients (``num_batches_tracked`` then counts the longest-trained
  client's batches).
- **Output** keeps the keys and key order of the template (the global model, else the first
  valid client), each tensor's dtype, and the container type (torch tensors in, CPU torch tensors
  out; NumPy in, NumPy out; an ``OrderedDict`` state_dict stays one, with its ``_metadata``).
- **Weights** must be finite and ``>= 0``, one per client. A client with weight 0 is validated and
  clustered like any other but contributes nothing.
- **Nothing to aggregate** (every client rejected, or the accepted clients' weights sum to 0):
  ``new_state`` is a copy of ``global_state`` when one was given, else ``None``;
  ``report.aggregated`` is False and ``report.note`` says why. Never a division by zero or NaN.
- Every per-client problem (wrong keys/shapes/dtypes, NaN/Inf anywhere, no scorable layer) is a
  rejection with a reason in the :class:`~mars_native.defense.Detection` report; a rejected client
  never reaches the output. Problems of the call itself (bad weights, an unusable global model,
  no clients) raise ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from mars_native import _core
from mars_native._arrays import is_torch_tensor, to_numpy
from mars_native._native import _threads
from mars_native.validation import Template, check_state, on_device, state_template

if TYPE_CHECKING:  # pragma: no cover
    from mars_native.defense import MARS, Detection

__all__ = ["Round", "aggregate_detected", "weighted_mean"]

#: A streamed client is subtracted from the running sum only while its largest weighted value is
#: at most this many times the accepted clients' largest weighted value (per tensor); beyond it,
#: fp64 cancellation could cost precision, and the tensor is re-summed from the accepted clients.
CANCELLATION_RATIO = 2.0**10


# ---------------------------------------------------------------------------------- arguments
def check_weights(weights: ArrayLike | None, n: int) -> np.ndarray:
    """``weights`` as float64 ``(n,)``: ones when None; ``ValueError`` unless finite, ``>= 0``
    and exactly one per client."""
    if weights is None:
        return np.ones(n, dtype=np.float64)
    if is_torch_tensor(weights):
        weights = to_numpy(weights, name="weights")
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}") from exc
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"weights must have one entry per client: {n} clients but weights of "
                         f"shape {tuple(w.shape)}")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"weights must be finite and >= 0; weights[{bad[0]}] = {float(w[bad[0]])!r}")
    return w


def _finite_number(value: Any, name: str) -> float:
    """``value`` as a float; TypeError unless a real number, ValueError unless finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_weight(weight: Any) -> float:
    """One client's weight as a float; ``ValueError`` unless finite and ``>= 0``."""
    w = _finite_number(weight, "weight")
    if w < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    return w


def _check_server_lr(server_lr: Any) -> float:
    return _finite_number(server_lr, "server_lr")


def _check_global(global_state: Any) -> None:
    if global_state is None:
        return
    reason = check_state(global_state)
    if reason is not None:
        raise ValueError(f"global_state is unusable: {reason}")


def _sum_in_order(values: Iterable[float]) -> float:
    """Left-to-right float sum (the compiled kernel's order; Python's sum() may compensate)."""
    total = 0.0
    for v in values:
        total += v
    return total


# ---------------------------------------------------------------------------------- tensors
def _native(x: Any, name: str) -> np.ndarray:
    """A float32/float64, native-byte-order, C-contiguous view of a float tensor (a copy only for
    float16/bfloat16, foreign byte order or strided input)."""
    arr = to_numpy(x, name=name)
    if arr.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        if arr.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float tensor, got dtype {arr.dtype}")
        arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32)
    return np.asarray(arr, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)


@dataclass(frozen=True)
class _Spec:
    """How one key of the template is aggregated and returned."""

    key: str
    shape: tuple[int, ...]
    is_float: bool
    out_dtype: type  # np.float32 or np.float64 (the kernel's output, float keys only)
    torch_dtype: Any  # the torch dtype to return, or None for NumPy output
    np_dtype: np.dtype  # the NumPy dtype to return (NumPy output)
    offset: int = 0  # position in the streaming accumulator (float keys only)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def restore(self, arr: np.ndarray) -> Any:
        """``arr`` as the template's container type and dtype."""
        if self.torch_dtype is not None:
            import torch

            return torch.from_numpy(np.asarray(arr, order="C")).to(dtype=self.torch_dtype)
        return np.asarray(arr, dtype=self.np_dtype).reshape(self.shape)


def _specs(state: Mapping[str, Any]) -> list[_Spec]:
    """One spec per key of ``state`` (a mapping of arrays), in its key order."""
    specs, offset = [], 0
    template = state_template(state)  # (TypeError for anything that is not a state_dict)
    for raw_key, (key, (shape, dtype)) in zip(state.keys(), template.items()):
        value = state[raw_key]  # (state_template names keys by str(key))
        is_float = dtype.kind == "f"
        spec = _Spec(
            key=key, shape=shape, is_float=is_float,
            out_dtype=np.float64 if dtype == np.float64 else np.float32,
            torch_dtype=value.dtype if is_torch_tensor(value) else None,
            np_dtype=dtype, offset=offset,
        )
        specs.append(spec)
        offset += spec.size if is_float else 0
    return specs


def _state_factory(state: Mapping[str, Any]) -> Callable[[], dict]:
    """A zero-argument constructor of an empty state_dict like ``state`` (OrderedDict with
    torch's ``_metadata`` when ``state`` has them, else dict)."""
    ordered = isinstance(state, OrderedDict)
    metadata = getattr(state, "_metadata", None)

    def make() -> dict:
        out: dict = OrderedDict() if ordered else {}
        if metadata is not None:
            out._metadata = type(metadata)(metadata)  # type: ignore[attr-defined]
        return out

    return make


def _copy_state(state: Mapping[str, Any]) -> dict:
    """A deep copy of ``state`` with the same container and dtypes."""
    out = _state_factory(state)()
    for spec in _specs(state):
        out[spec.key] = spec.restore(np.array(to_numpy(state[spec.key], name=spec.key), copy=True))
    return out


def _elementwise_max(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return functools.reduce(np.maximum, arrays[1:], np.array(arrays[0], copy=True))


def _note(report: Detection, text: str) -> None:
    report.note = text if not report.note else f"{report.note}; {text}"


def _nothing_to_aggregate(report: Detection, global_state: Mapping[str, Any] | None,
                          weights: Sequence[float]) -> dict | None:
    """Mark ``report`` as not aggregated and return what the server keeps."""
    if not report.accepted.any():
        why = "every client was rejected"
    else:
        why = f"the accepted clients' weights sum to {_sum_in_order(weights):g}"
    keep = ("the global model is kept unchanged" if global_state is not None
            else "there is no global model, so no new state (None) is returned")
    report.aggregated = False
    _note(report, f"nothing to aggregate: {why}; {keep}")
    return _copy_state(global_state) if global_state is not None else None


# ---------------------------------------------------------------------------------- one tensor
def _kernel_mean(arrays: Sequence[np.ndarray], w: np.ndarray, out_dtype: Any, base: Any,
                 server_lr: float, n_threads: int) -> np.ndarray | None:
    """The kernel's weighted mean of NumPy ``arrays`` as they are (``w`` checked, ``n_threads``
    resolved), or None when it refuses them. It reads float32/float64 C-contiguous arrays of one
    dtype and shape in place and refuses anything else, which :func:`weighted_mean`'s general
    path then converts or reports. Without out_dtype the kernel keeps the input dtype, which is
    the general path's rule for arrays of one dtype."""
    try:
        return _core.aggregate(list(arrays), w, out_dtype, n_threads, base, server_lr)
    except (TypeError, ValueError):
        return None


def weighted_mean(
    arrays: Sequence[Any],
    weights: ArrayLike | None = None,
    out_dtype: Any = None,
    *,
    base: Any = None,
    server_lr: float = 1.0,
    n_threads: int | None = None,
) -> np.ndarray:
    """Weighted mean of equally shaped float arrays, accumulated in fp64 (compiled, GIL released).

    ``out[j] = sum_i w_i * x_i[j] / sum_i w_i``, summed over the arrays in the given order (so the
    result is bit-identical for any thread count); with ``base``:
    ``out = base + server_lr * (mean - base)``. Arrays with weight 0 are not read.

    Args:
        arrays: N arrays or torch tensors of one shape ``S`` (float16/32/64, bfloat16). float32 and
            float64 C-contiguous inputs are read in place; others are converted (a copy). Mixed
            float32/float64 inputs are computed as float64.
        weights: ``(N,)`` finite, ``>= 0``, positive sum; None = all 1.
        out_dtype: float32 or float64; None = float64 when any input is float64, else float32.
        base: optional array of shape ``S`` (e.g. the global model).
        server_lr: the step towards the mean when ``base`` is given.
        n_threads: threads (None = library default).

    Returns:
        the mean, shape ``S``, dtype ``out_dtype``.

    Raises:
        ValueError: no arrays, shapes differ, bad weights. TypeError: non-float input.
    """
    if isinstance(arrays, Mapping) or not isinstance(arrays, Sequence) or isinstance(arrays, (str, bytes)):
        raise TypeError(f"arrays must be a sequence of arrays, got {type(arrays).__name__}")
    if len(arrays) == 0:
        raise ValueError("weighted_mean() needs at least one array")
    n_threads = _threads(n_threads)
    server_lr = _check_server_lr(server_lr)
    if all(type(a) is np.ndarray for a in arrays):  # fast path: NumPy arrays as they are
        w = check_weights(weights, len(arrays))
        if _sum_in_order(w) > 0:
            value = _kernel_mean(arrays, w, out_dtype, base, server_lr, n_threads)
            if value is not None:
                return value
    bufs = [_native(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    base_arr = None if base is None else _native(base, "base")
    wide = any(b.dtype == np.float64 for b in bufs) or (base_arr is not None and base_arr.dtype == np.float64)
    if wide:
        bufs = [b.astype(np.float64, copy=False) for b in bufs]
        base_arr = None if base_arr is None else base_arr.astype(np.float64, copy=False)
    for i, b in enumerate(bufs[1:], 1):
        if b.shape != bufs[0].shape:
            raise ValueError(f"arrays[{i}] has shape {b.shape} but arrays[0] has shape {bufs[0].shape}")
    if base_arr is not None and base_arr.shape != bufs[0].shape:
        raise ValueError(f"base has shape {base_arr.shape} but the arrays have shape {bufs[0].shape}")
    w = check_weights(weights, len(bufs))
    if not _sum_in_order(w) > 0:
        raise ValueError("weights sum to 0: the weighted mean is undefined")
    if out_dtype is None:
        out_dtype = np.float64 if wide else np.float32
    return _core.aggregate(bufs, w, out_dtype, n_threads, base_arr, server_lr)


# ---------------------------------------------------------------------------------- batch
def aggregate_detected(
    mars: MARS,
    states: Iterable[Any],
    weights: ArrayLike | None = None,
    global_state: Mapping[str, Any] | None = None,
    server_lr: float = 1.0,
) -> tuple[dict | None, Detection]:
    """Detect with ``mars``, then aggregate the accepted clients (``MARS.aggregate``).

    Args:
        mars: the configured detector.
        states: N client state_dicts (NumPy arrays or torch tensors).
        weights: ``(N,)`` client weights (e.g. num_examples), finite and ``>= 0``; None = equal.
        global_state: the server's model: the template every client must match, and the base of
            ``global + server_lr * (mean - global)``.
        server_lr: the server learning rate (used with ``global_state`` only).

    Returns:
        ``(new_state, report)``; see the module docstring for the rules (``new_state`` is a copy
        of ``global_state``, or None, when nothing could be aggregated).
    """
    if isinstance(states, Mapping):
        raise TypeError("aggregate() takes a list of state_dicts, got a single state_dict")
    states = list(states)
    if not states:
        raise ValueError("aggregate() needs at least one client state_dict; got an empty list")
    w = check_weights(weights, len(states))
    lr = _check_server_lr(server_lr)
    _check_global(global_state)
    report = mars.detect(states, global_state)
    contributing = [i for i in np.flatnonzero(report.accepted) if w[i] > 0]
    if not contributing:
        return _nothing_to_aggregate(report, global_state, w[report.accepted]), report

    if any(on_device(states[i]) for i in contributing):  # GPU models: aggregate on the GPU
        from mars_native._cuda_states import aggregate_states_cuda

        accepted = [states[i] for i in contributing]
        return aggregate_states_cuda(accepted, w[contributing], global_state, lr), report

    first_valid = int(np.flatnonzero(report.labels >= 0)[0])  # matches detect()'s template
    model = global_state if global_state is not None else states[first_valid]
    out = _state_factory(model)()
    cw = w[contributing]  # (checked: finite, >= 0, a positive sum)
    n_threads = _threads(mars.n_threads)  # (0: the library default)
    specs = _specs(model)
    means = _means_in_one_call(specs, [states[i] for i in contributing], cw, global_state, lr,
                               n_threads)
    for spec in specs:
        if spec.is_float:
            value = means.get(spec.key)
            if value is None:  # converted, or a clear error naming the key, by weighted_mean
                base = None if global_state is None else _native(global_state[spec.key], spec.key)
                value = weighted_mean([states[i][spec.key] for i in contributing], cw,
                                      spec.out_dtype, base=base, server_lr=lr,
                                      n_threads=mars.n_threads)
        elif global_state is not None:
            value = np.array(to_numpy(global_state[spec.key], name=spec.key), copy=True)
        else:
            value = _elementwise_max([to_numpy(states[i][spec.key], name=spec.key) for i in contributing])
        out[spec.key] = spec.restore(value)
    return out, report


def _means_in_one_call(specs: Sequence[_Spec], states: Sequence[Mapping[str, Any]], w: np.ndarray,
                       global_state: Mapping[str, Any] | None, server_lr: float,
                       n_threads: int) -> dict[str, np.ndarray]:
    """The weighted means of the float keys, key -> mean, in one native call (one parallel
    region for the whole model: no per-key thread start-up, and a thread slowed down by the
    machine does less of the work); the same values, bit for bit, as :func:`weighted_mean` per
    key (tensors are read as :func:`weighted_mean` reads them: float32/float64 in place, others
    converted). A key whose tensors cannot be read so is left out; everything is left out when
    the kernel refuses its inputs. The caller takes what is left out through
    :func:`weighted_mean`, which names the key. ``w``: checked weights, one per state."""
    keys, groups, bases = [], [], []
    for spec in specs:
        if not spec.is_float:
            continue
        try:
            arrays = [x if type(x) is np.ndarray else _native(x, spec.key)
                      for x in (state[spec.key] for state in states)]
            base = None if global_state is None else _native(global_state[spec.key], spec.key)
        except (TypeError, ValueError):
            continue
        keys.append(spec)
        groups.append(arrays)
        bases.append(base)
    if not keys:
        return {}
    try:
        means = _core.aggregate_many(groups, w, [spec.out_dtype for spec in keys], n_threads,
                                     None if global_state is None else bases, server_lr)
    except (TypeError, ValueError):
        return {}
    return {spec.key: mean for spec, mean in zip(keys, means)}


# ---------------------------------------------------------------------------------- streaming
@dataclass
class _Client:
    weight: float
    cbe: np.ndarray | None
    reason: str | None
    name: str | None
    layout: frozenset | None = None  # keys, shapes and dtypes (None: not a state_dict of arrays)
    model: tuple[list[_Spec], Callable[[], dict]] | None = None  # its specs and container
    added: bool = False  # its float tensors are in the running sum
    source: Any = None  # the state itself, or its loader (a zero-argument callable)
    has_loader: bool = False
    max_abs: np.ndarray | None = None  # (n_float_keys,) max |x| per float key
    checksums: list[int] = field(default_factory=list)  # per float key
    others: dict[str, np.ndarray] = field(default_factory=dict)  # non-float tensors (no global)


def _layout(specs: Sequence[_Spec]) -> frozenset:
    """The layout of a state_dict: the same key as validation.majority_template uses."""
    return frozenset((s.key, s.shape, s.np_dtype) for s in specs)


def _shape_only_state(specs: Sequence[_Spec]) -> dict[str, np.ndarray]:
    """Zero-memory arrays with the keys, shapes and dtypes of ``specs`` (for check_state)."""
    return {s.key: np.broadcast_to(np.zeros((), s.np_dtype), s.shape) for s in specs}


class Round:
    """A streaming MARS round: ``add()`` each client as it arrives, then ``finish()``.

    ``add`` validates the client, computes its CBE and adds ``weight * x`` of every float tensor
    to one flat fp64 running sum (one pass over the client, at memory speed), so the client's
    state can be dropped at once. ``finish`` clusters the CBEs, then subtracts the rejected
    clients from the sum. To subtract, the round needs each client again:

    - ``add(state, weight, loader=f)``: ``f()`` must return the same state again (e.g. re-read
      its file). The round keeps no reference to ``state``; peak extra memory is O(one model +
      the fp64 sum + CBEs) whatever the number of clients. A re-read state is checked against a
      checksum of what was added.
    - ``add(state, weight)`` without a loader: the round keeps a reference to ``state`` until
      ``finish``, so memory is O(clients) (as for ``MARS.aggregate``).

    The template: the global model when one is given (recommended for a server). Without one,
    like ``MARS.detect``, clients must match the layout (keys, shapes, dtypes) most of them share
    (ties: the earliest), so that one malformed client cannot become the template. The running
    sum follows the layout that leads so far; when another layout overtakes it, the sum is rebuilt
    from that layout's clients (re-read through their loaders), which only malformed rounds cause.

    Subtraction is exact up to fp64 rounding (``(a + b) - b`` need not be ``a`` bit for bit): the
    result matches :func:`aggregate_detected` to within one float32 ulp. A rejected client whose
    values dwarf the accepted ones (by more than ``CANCELLATION_RATIO``) would cost precision by
    cancellation, so those tensors are instead re-summed from the accepted clients (re-read
    through their loaders); ``report.note`` says so. Rules for weights, integer tensors, the
    output container and an empty result: see the module docstring. A round is not thread-safe:
    call ``add`` from one thread at a time.

    Args:
        mars: the configured detector.
        global_state: the server's model (template and base), or None (the first valid client is
            the template and the result is the plain weighted mean).
        server_lr: the server learning rate (with ``global_state``).
    """

    def __init__(self, mars: MARS, global_state: Mapping[str, Any] | None = None,
                 server_lr: float = 1.0) -> None:
        _check_global(global_state)
        self.mars = mars
        self.global_state = global_state
        self.server_lr = _check_server_lr(server_lr)
        self._n_threads = _threads(mars.n_threads)
        self._clients: list[_Client] = []
        self._template: Template | None = None
        self._specs: list[_Spec] | None = None
        self._factory: Callable[[], dict] | None = None
        self._acc: np.ndarray | None = None
        self._layers: list[str] = []
        self._seconds = 0.0
        self._finished = False
        self._leader: frozenset | None = None  # the leading layout (no global model)
        self._model_index = -1  # the client whose keys and container the output takes
        if global_state is not None:
            self._set_model((_specs(global_state), _state_factory(global_state)))

    @property
    def n_clients(self) -> int:
        """Clients added so far."""
        return len(self._clients)

    def _set_model(self, model: tuple[list[_Spec], Callable[[], dict]]) -> None:
        """Take ``model`` (the global model's or a client's specs and container) as the
        template, with an empty running sum."""
        self._specs, self._factory = model
        self._template = {s.key: (s.shape, s.np_dtype) for s in self._specs}
        n = sum(s.size for s in self._specs if s.is_float)
        # (from the core's buffer cache: the previous round's sum, if it was dropped, is reused
        # instead of faulting in fresh zero pages)
        self._acc = _core.cached_zeros(n, self._n_threads)

    def _float_specs(self) -> list[_Spec]:
        assert self._specs is not None
        return [s for s in self._specs if s.is_float]

    def add(self, state: Any, weight: float = 1.0, *, loader: Callable[[], Any] | None = None,
            name: str | None = None) -> int:
        """Score one client and add it to the running sum.

        Args:
            state: the client's state_dict; may be None when ``loader`` is given (it is then
                called once now).
            weight: the client's weight (e.g. num_examples), finite and ``>= 0``.
            loader: a zero-argument callable returning this same state again; with it the round
                keeps no reference to ``state``.
            name: a label used in error messages.

        Returns:
            the client's index in the report.

        A client that fails validation is recorded as rejected (with its reason) and not added.
        """
        if self._finished:
            raise RuntimeError("this round is finished; start a new one with MARS.round()")
        w = check_weight(weight)
        if loader is not None and not callable(loader):
            raise TypeError(f"loader must be a zero-argument callable, got {type(loader).__name__}")
        if state is None and loader is not None:
            state = loader()
        t0 = time.perf_counter()
        cbe, reason = self.mars.client_cbe(state, self._fixed_template(), self.global_state)
        self._seconds += time.perf_counter() - t0
        if reason is None and not all(isinstance(k, str) for k in state.keys()):  # noqa: SIM118
            cbe, reason = None, "invalid_type: state_dict keys must be strings"
        client = _Client(weight=w, cbe=cbe, reason=reason, name=name)
        self._clients.append(client)
        index = len(self._clients) - 1
        keep = reason is None and w > 0  # it may contribute: keep a way to read it again
        if keep:
            client.has_loader = loader is not None
            client.source = loader if loader is not None else state
        if self.global_state is None:
            try:
                client.model = (_specs(state), _state_factory(state))
            except TypeError:  # not a state_dict of arrays: already rejected by client_cbe
                return index
            client.layout = _layout(client.model[0])
            leader = self._leading_layout()
            if leader != self._leader:  # this client's layout took the lead: rebuild the sum
                self._follow(leader, state, index)
                return index
            if client.layout != self._leader:
                return index
            if reason is None and self._clients[self._model_index].reason is not None:
                self._set_model(client.model)  # the first valid client of the layout (sum is 0)
                self._model_index = index
        if keep:
            self._contribute(index, state)
        return index

    def _fixed_template(self) -> Template | None:
        """The template of add()-time validation: the global model's, else none (the layout is
        checked against the majority at finish())."""
        return self._template if self.global_state is not None else None

    def _leading_layout(self) -> frozenset | None:
        """The layout most clients share so far (ties: the earliest)."""
        counts: dict[frozenset, int] = {}
        for c in self._clients:
            if c.layout is not None:
                counts[c.layout] = counts.get(c.layout, 0) + 1
        return max(counts, key=counts.__getitem__) if counts else None  # first max = earliest

    def _follow(self, layout: frozenset, state: Mapping[str, Any], index: int) -> None:
        """Make ``layout`` the running sum's: its first valid client's keys and container, and
        the sum of its clients so far (the earlier ones re-read)."""
        members = [i for i, c in enumerate(self._clients) if c.layout == layout]
        first_valid = next((i for i in members if self._clients[i].reason is None), members[0])
        self._leader, self._model_index = layout, first_valid
        self._set_model(self._clients[first_valid].model)  # type: ignore[arg-type]
        self._layers = []
        for c in self._clients:
            c.added = False
        for i in members:
            c = self._clients[i]
            if c.reason is not None or c.weight == 0:
                continue
            if i == index:
                self._contribute(i, state)
                continue
            try:
                self._contribute(i, self._reload(i))
            except Exception as exc:
                raise RuntimeError(f"cannot re-sum the layout most clients share: {self._label(i)} "
                                   f"could not be re-read ({type(exc).__name__}: {exc})") from exc

    def _contribute(self, index: int, state: Mapping[str, Any]) -> None:
        """Add client ``index`` (its ``state``) to the running sum."""
        c = self._clients[index]
        if not self._layers:
            self._layers = [layer.name for layer in self.mars.layers_for(state, self.global_state)]
        stats = self._accumulate(state, c.weight, self._float_specs())
        c.max_abs = np.array([m for m, _ in stats], dtype=np.float64)
        c.checksums = [k for _, k in stats]
        c.added = True
        if self.global_state is None:
            assert self._specs is not None
            c.others = {s.key: np.array(to_numpy(state[s.key], name=s.key), copy=True)
                        for s in self._specs if not s.is_float}

    def add_rejected(self, reason: str, *, name: str | None = None) -> int:
        """Record a client that could not even be read (e.g. a corrupt upload) as rejected.

        Args:
            reason: ``"<code>: <detail>"`` for the report.
        Returns:
            the client's index in the report.
        """
        if self._finished:
            raise RuntimeError("this round is finished; start a new one with MARS.round()")
        if not isinstance(reason, str) or ":" not in reason:
            raise ValueError(f"reason must be a '<code>: <detail>' string, got {reason!r}")
        self._clients.append(_Client(weight=0.0, cbe=None, reason=reason, name=name))
        return len(self._clients) - 1

    def _accumulate(self, state: Mapping[str, Any], weight: float,
                    specs: Sequence[_Spec]) -> list[tuple[float, int]]:
        """acc[spec] += weight * state[spec.key] for each spec; (max |x|, checksum) per spec."""
        assert self._acc is not None
        stats = []
        for spec in specs:
            x = _native(state[spec.key], spec.key).reshape(-1)
            acc = self._acc[spec.offset:spec.offset + spec.size]
            if x.size != acc.size:
                raise ValueError(f"{spec.key!r} has {x.size} values, expected {acc.size}")
            stats.append(_core.accumulate(acc, x, weight, self._n_threads))
        return stats

    def _reload(self, i: int) -> Mapping[str, Any]:
        c = self._clients[i]
        state = c.source() if c.has_loader else c.source
        if not isinstance(state, Mapping):
            raise TypeError(f"the loader returned {type(state).__name__}, not a state_dict")
        return state

    def _label(self, i: int) -> str:
        name = self._clients[i].name
        return f"client {i}" + (f" ({name})" if name else "")

    def _subtract(self, rejected: Sequence[int]) -> tuple[set[int], str | None]:
        """Remove the rejected clients from the sum; the float keys (indices) that must be
        re-summed from the accepted clients, and why."""
        specs = self._float_specs()
        for i in rejected:
            c = self._clients[i]
            try:  # (one expression: the previous client is freed before the next is read)
                stats = self._accumulate(self._reload(i), -c.weight, specs)
            except Exception as exc:  # noqa: BLE001 - any failure: re-sum instead of subtracting
                why = (f"{self._label(i)} could not be re-read to be removed "
                       f"({type(exc).__name__}: {exc})")
                return set(range(len(specs))), why
            if [s for _, s in stats] != c.checksums:
                return set(range(len(specs))), f"{self._label(i)} changed between add() and finish()"
        return set(), None

    def _unsafe_keys(self, contributing: Sequence[int], rejected: Sequence[int]) -> set[int]:
        """Float keys where subtracting the rejected clients could lose precision."""
        if not rejected:
            return set()
        kept = np.max([self._clients[i].weight * self._clients[i].max_abs for i in contributing], axis=0)
        removed = np.max([self._clients[i].weight * self._clients[i].max_abs for i in rejected], axis=0)
        with np.errstate(over="ignore", invalid="ignore"):
            unsafe = ~(removed <= CANCELLATION_RATIO * kept)
        return set(np.flatnonzero(unsafe).tolist())

    def _resum(self, contributing: Sequence[int], keys: set[int]) -> None:
        """Rebuild the sum of ``keys`` from the contributing clients only (re-read)."""
        assert self._acc is not None
        specs = [s for k, s in enumerate(self._float_specs()) if k in keys]
        for s in specs:
            self._acc[s.offset:s.offset + s.size] = 0.0
        order = sorted(keys)
        for i in contributing:
            c = self._clients[i]
            try:
                stats = self._accumulate(self._reload(i), c.weight, specs)
            except Exception as exc:
                raise RuntimeError(f"cannot aggregate: {self._label(i)} (accepted) could not be "
                                   f"re-read ({type(exc).__name__}: {exc})") from exc
            if [s for _, s in stats] != [c.checksums[k] for k in order]:
                raise RuntimeError(f"cannot aggregate: {self._label(i)} (accepted) changed between "
                                   "add() and finish()")

    def finish(self) -> tuple[dict | None, Detection]:
        """Cluster, remove the rejected clients, and return ``(new_state, report)``.

        ``new_state`` follows the module's rules (a copy of the global model, or None, when
        nothing could be aggregated). The round cannot be used afterwards.

        Raises:
            ValueError: no client was added. RuntimeError: an accepted client had to be re-read
                (see the class docstring) and its loader failed or returned different data.
        """
        if self._finished:
            raise RuntimeError("finish() was already called on this round")
        if not self._clients:
            raise ValueError("finish(): no client was added to the round")
        self._finished = True
        try:
            return self._finish()
        finally:
            self._acc = None
            self._clients = [_Client(c.weight, None, c.reason, c.name) for c in self._clients]

    def _final_reasons(self) -> list[str | None]:
        """Each client's reason, with the layout check against the leading layout (no global
        model) that MARS.detect applies: a mismatch there takes precedence, as in detect()."""
        reasons = [c.reason for c in self._clients]
        if self.global_state is None and self._leader is not None:
            for i, c in enumerate(self._clients):
                if c.layout is not None and c.layout != self._leader:
                    reasons[i] = check_state(_shape_only_state(c.model[0]), self._template)  # type: ignore[index]
                    c.cbe = None
        return reasons

    def _finish(self) -> tuple[dict | None, Detection]:
        t0 = time.perf_counter()
        reasons = self._final_reasons()  # (before the CBEs: it drops those of mismatched layouts)
        report = self.mars.decide([c.cbe for c in self._clients], reasons)
        report.layers = list(self._layers)
        report.detect_seconds = self._seconds + time.perf_counter() - t0
        contributing = [i for i, c in enumerate(self._clients) if report.accepted[i] and c.added]
        if not contributing:
            weights = [c.weight for c, a in zip(self._clients, report.accepted) if a]
            return _nothing_to_aggregate(report, self.global_state, weights), report
        rejected = [i for i, c in enumerate(self._clients) if c.added and not report.accepted[i]]
        resum, why = self._subtract(rejected)
        unsafe = self._unsafe_keys(contributing, rejected) - resum
        if unsafe:
            resum |= unsafe
            why = (f"{len(unsafe)} tensor(s) of rejected clients exceeded {CANCELLATION_RATIO:g}x "
                   "the accepted clients' magnitude")
        if resum:
            self._resum(contributing, resum)
            _note(report, f"{why}; {len(resum)} tensor(s) were re-summed from the accepted clients")
        total = _sum_in_order(self._clients[i].weight for i in contributing)
        assert self._specs is not None and self._factory is not None and self._acc is not None
        out = self._factory()
        for spec in self._specs:
            if spec.is_float:
                base = (None if self.global_state is None
                        else _native(self.global_state[spec.key], spec.key).reshape(-1))
                acc = self._acc[spec.offset:spec.offset + spec.size]
                value = _core.finalize_mean(acc, total, spec.out_dtype, self._n_threads, base,
                                            self.server_lr).reshape(spec.shape)
            elif self.global_state is not None:
                value = np.array(to_numpy(self.global_state[spec.key], name=spec.key), copy=True)
            else:
                value = _elementwise_max([self._clients[i].others[spec.key] for i in contributing])
            out[spec.key] = spec.restore(value)
        return out, report
