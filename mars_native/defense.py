"""MARS: detect backdoored client models from their weights and aggregate the rest.

``MARS(...).detect(states)`` computes every client's concentrated backdoor energy (CBE), clusters
the CBEs into two groups with K-Means under the 1-D Wasserstein distance, and keeps

- every client, when the two cluster centers are closer than ``epsilon`` (all benign);
- otherwise the cluster whose center has the smaller L1 norm (``selection="norm"``, MARS), or the
  larger cluster (``selection="majority"``, MARS*, the paper's answer to the adaptive attack).

Clients that cannot be scored (wrong keys, shapes or dtypes, NaN/Inf anywhere, no scorable layer)
are rejected before clustering, each with a reason in the :class:`Detection` report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mars_native import _cuda
from mars_native._arrays import is_mapping, to_numpy
from mars_native._native import wasserstein_1d
from mars_native.cluster import KWMeans
from mars_native.energy import (
    _energies_many,
    _layer_inputs_batch,
    concentrate,
    layer_inputs,
    score_inputs,
)
from mars_native.layers import Layer, find_layers
from mars_native.validation import (
    Template,
    check_finite,
    check_state,
    is_numpy_state,
    majority_template,
    non_finite_reason,
    on_device,
    scan_keys,
    state_template,
    state_templates,
)

Selection = Literal["norm", "majority"]
Mode = Literal["paper", "official"]


def _input_reason(exc: Exception) -> str:
    """The rejection reason for a client whose tensors could not be scored."""
    msg = str(exc)
    if isinstance(exc, ValueError) and msg.startswith("no scorable layer"):
        return f"no_scorable_layer: {msg}"
    return f"invalid_type: {msg}"


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _json_matrix(a: np.ndarray) -> list:
    return [[_json_float(v) for v in row] for row in np.asarray(a, dtype=np.float64)]


@dataclass
class Detection:
    """The report of one round of MARS.

    Attributes:
        accepted: bool array (n_clients,), in input order; True = used for aggregation.
        reasons: one entry per client: None when accepted, else ``"<code>: <detail>"`` with code
            one of invalid_type, missing_keys, extra_keys, shape_mismatch, dtype_mismatch,
            non_finite, no_scorable_layer, high_energy_cluster, minority_cluster.
        labels: int array (n_clients,): cluster of each client, -1 when rejected before clustering.
        cbe: float64 array (n_clients, d): each client's CBE (NaN rows for invalid clients; in
            official mode, ragged CBEs are NaN-padded on the right).
        centers: float64 array (n_clusters, d): the cluster centers.
        center_distance: W_p between the two centers (NaN when fewer than 2 clusters were formed).
        kept_cluster: the label of the kept cluster; None when every valid client was kept.
        all_benign: True when the centers were within epsilon (everyone valid kept).
        layers: names of the scored layers, in CBE order.
        detect_seconds: wall time of the detection.
        note: a sentence about anything unusual (no valid client, single client, ...).
        aggregated: False when an aggregation kept the global model (nobody accepted).
    """

    accepted: np.ndarray
    reasons: list[str | None]
    labels: np.ndarray
    cbe: np.ndarray
    centers: np.ndarray
    center_distance: float
    kept_cluster: int | None
    all_benign: bool
    layers: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    detect_seconds: float = 0.0
    note: str | None = None
    aggregated: bool = True

    @property
    def n_clients(self) -> int:
        """Number of clients in the round."""
        return int(self.accepted.shape[0])

    @property
    def rejected(self) -> np.ndarray:
        """Indices (input order) of the rejected clients, int array."""
        return np.flatnonzero(~self.accepted)

    @property
    def reason_codes(self) -> list[str | None]:
        """The machine-readable code of each reason (None for accepted clients)."""
        return [None if r is None else r.split(":", 1)[0] for r in self.reasons]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and Inf become null)."""
        return {
            "n_clients": self.n_clients,
            "accepted": [bool(a) for a in self.accepted],
            "reasons": list(self.reasons),
            "reason_codes": self.reason_codes,
            "labels": [int(v) for v in self.labels],
            "cbe": _json_matrix(self.cbe),
            "centers": _json_matrix(self.centers),
            "center_distance": _json_float(self.center_distance),
            "kept_cluster": self.kept_cluster,
            "all_benign": bool(self.all_benign),
            "layers": list(self.layers),
            "params": dict(self.params),
            "detect_seconds": float(self.detect_seconds),
            "note": self.note,
            "aggregated": bool(self.aggregated),
        }

    def summary(self) -> str:
        """A short human-readable table: client, CBE summary, cluster, accepted, reason."""
        lines = [f"{'client':>6}  {'cbe_len':>7}  {'cbe_median':>10}  {'cbe_max':>10}  cluster  accepted  reason"]
        for i in range(self.n_clients):
            row = self.cbe[i][np.isfinite(self.cbe[i])] if self.cbe.size else np.empty(0)
            med = f"{np.median(row):10.4g}" if row.size else f"{'-':>10}"
            mx = f"{np.max(row):10.4g}" if row.size else f"{'-':>10}"
            lines.append(
                f"{i:>6}  {row.size:>7}  {med}  {mx}  {int(self.labels[i]):>7}  "
                f"{'yes' if self.accepted[i] else 'no':>8}  {self.reasons[i] or ''}"
            )
        lines.append(f"center distance {self.center_distance:.4g}; kept cluster {self.kept_cluster}; "
                     f"{int(self.accepted.sum())}/{self.n_clients} accepted")
        return "\n".join(lines)


@dataclass(frozen=True)
class _LayoutPlan:
    """What :meth:`MARS._host_checks` finds for every host client that is a dict of NumPy arrays
    with the template's layout (keys in the template's order, shapes, dtypes), found once per
    round from the first such client: its scored layers, and the keys the finiteness check reads
    (float keys that are not scored, in key order; None when one is not float32/float64, and
    ``check_finite`` then decides)."""

    keys: list[str]
    layers: list[Layer]
    skip: frozenset[str]
    finite_keys: list[str] | None


def _pad(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


def _resample_quantiles(values: np.ndarray, length: int) -> np.ndarray:
    """The quantile function of ``values`` evaluated at the midpoints (j + 0.5) / length."""
    srt = np.sort(values)
    if srt.size == length:
        return srt
    grid = (np.arange(length) + 0.5) / length
    idx = np.minimum((grid * srt.size).astype(np.int64), srt.size - 1)
    return srt[idx]


class MARS:
    """The MARS detector and aggregator.

    Args:
        kappa: share of each layer's neurons kept in the CBE, in (0, 1] (0.05 = top 5%).
        epsilon: threshold on the Wasserstein distance between the two cluster centers below
            which every client is accepted.
        selection: "norm" keeps the cluster whose center has the smaller L1 norm (MARS);
            "majority" keeps the larger cluster (MARS*).
        mode: "paper" (the paper's algorithm) or "official" (the authors' public code: quantile
            top-k, Euclidean K-Means on rows of the W1 matrix, mean centers, ``<=`` epsilon test,
            only convs followed by BN).
        include_linear: also score Linear layers (paper mode only).
        p: order of the Wasserstein distance (1 or 2) for paper mode.
        random_state: seed of the clustering (deterministic for a given seed).
        n_init: K-Means restarts.
        n_threads: threads for the kernels (None: library default).
        bn_eps: BatchNorm epsilon in the BE formula.
        reference: a state_dict in original key order for conv -> BN pairing (else the global
            model given to ``detect``, else names). See :func:`mars_native.find_layers`.
        layer_map: explicit conv -> BN map or an nn.Module (most trusted pairing).
        device: "auto" (states of CUDA tensors are scored on their GPU, others on the CPU),
            "cuda" (CPU states are copied to the GPU first; needs the CUDA backend and a
            device) or "cpu" (CUDA states are copied to the host). The clustering of the small
            CBE matrix always runs on the CPU.
    """

    def __init__(
        self,
        kappa: float = 0.05,
        epsilon: float = 0.03,
        selection: Selection = "norm",
        mode: Mode = "paper",
        include_linear: bool = False,
        p: int = 1,
        random_state: int | None = 0,
        n_threads: int | None = None,
        *,
        n_init: int = 10,
        bn_eps: float = 1e-5,
        reference: Mapping[str, Any] | None = None,
        layer_map: Any = None,
        device: Literal["auto", "cpu", "cuda"] = "auto",
    ) -> None:
        if not isinstance(kappa, (int, float)) or not (0.0 < float(kappa) <= 1.0):
            raise ValueError(f"kappa must be in (0, 1], got {kappa!r}")
        if not isinstance(epsilon, (int, float)) or not (float(epsilon) >= 0.0):
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        if selection not in ("norm", "majority"):
            raise ValueError(f"selection must be 'norm' or 'majority', got {selection!r}")
        if mode not in ("paper", "official"):
            raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        if not isinstance(bn_eps, (int, float)) or not bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0, got {bn_eps!r}")
        self.kappa = float(kappa)
        self.epsilon = float(epsilon)
        self.selection = selection
        self.mode = mode
        self.include_linear = bool(include_linear)
        self.p = int(p)
        self.random_state = random_state
        self.n_threads = n_threads
        self.n_init = int(n_init)
        self.bn_eps = float(bn_eps)
        self.reference = reference
        self.layer_map = layer_map
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not _cuda.cuda_available():
            raise RuntimeError(f"MARS(device='cuda'): {_cuda.cuda_info().get('reason', 'no CUDA device')}")
        self.device = device
        self._layer_cache: dict[tuple, list[Layer]] = {}

    def params(self) -> dict[str, Any]:
        """The detector's parameters (JSON-ready)."""
        return {
            "kappa": self.kappa, "epsilon": self.epsilon, "selection": self.selection,
            "mode": self.mode, "include_linear": self.include_linear, "p": self.p,
            "random_state": self.random_state, "n_init": self.n_init, "bn_eps": self.bn_eps,
            "device": self.device,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"MARS({args})"

    # ------------------------------------------------------------------ per client
    def layers_for(
        self,
        state: Mapping[str, Any],
        reference: Mapping[str, Any] | None = None,
        layout: Template | None = None,
    ) -> list[Layer]:
        """The scored layers of ``state`` (cached by keys and shapes; ``layout``: its
        ``state_template`` when the caller has it)."""
        template = state_template(state) if layout is None else layout
        key = (tuple((k, s) for k, (s, _) in template.items()), id(reference))
        if key not in self._layer_cache:
            official = self.mode == "official"
            self._layer_cache[key] = find_layers(
                state,
                include_linear=self.include_linear and not official,
                reference=reference if reference is not None else self.reference,
                layer_map=self.layer_map,
                require_bn=official,
            )
        return self._layer_cache[key]

    def client_cbe(
        self,
        state: Any,
        template: Template | None = None,
        reference: Mapping[str, Any] | None = None,
    ) -> tuple[np.ndarray | None, str | None]:
        """One client's CBE, or ``(None, reason)`` when the client cannot be used.

        Args:
            state: the client's state_dict.
            template: keys/shapes/dtypes it must match (:func:`validation.state_template`).
            reference: state_dict in original key order for the conv -> BN pairing.

        Returns:
            ``(cbe, None)`` with cbe float64 (d,), or ``(None, "<code>: <detail>")``.
        """
        if on_device(state):
            return self._client_cbe_cuda(state, template, reference)
        layers, reason = self._host_checks(state, template, reference)
        if reason is not None:
            return None, reason
        try:
            # (kappa: the kernel skips the eigen-solves that cannot reach the CBE; the CBE is
            # the same, bit for bit, as the one of every exact BE value)
            energies = _energies_many([state], [layers], self.bn_eps, self.mode, self.n_threads,
                                      kappa=self.kappa)[0]
        except (TypeError, ValueError) as exc:
            return None, _input_reason(exc)
        return self._host_cbe(state, layers, energies)

    def _host_checks(
        self,
        state: Any,
        template: Template | None,
        reference: Mapping[str, Any] | None,
        layout: Template | None = None,
    ) -> tuple[list[Layer], str | None]:
        """Everything about a host (CPU) client that can be checked before its layers are scored:
        ``(layers, None)``, or ``([], reason)``. ``layout``: its ``state_template`` if known."""
        # One pass over the scored weights: the spectral kernel yields NaN for a channel holding a
        # NaN/Inf value, so those keys are not read a second time by the finiteness check; every
        # other tensor is checked first. (When several tensors are non-finite, the reason names a
        # non-scored one before a scored one.)
        reason = check_state(state, template, finite=False, layout=layout)
        if reason is not None:
            return [], reason
        try:
            layers = self.layers_for(state, reference, layout)
        except (TypeError, ValueError) as exc:
            return [], _input_reason(exc)
        reason = check_finite(state, skip={layer.weight_key for layer in layers})
        if reason is not None:
            return [], reason
        if not layers:
            return [], self._no_layer_reason()
        return layers, None

    def _layout_plan(
        self, state: Any, template: Template, reference: Mapping[str, Any] | None
    ) -> _LayoutPlan | None:
        """The :class:`_LayoutPlan` of ``template`` from ``state`` (a dict of NumPy arrays whose
        layout is ``template``), or None when a client of that layout is not usable (each such
        client then finds its reason by itself)."""
        if check_state(state, template, finite=False, layout=template) is not None:
            return None
        try:
            layers = self.layers_for(state, reference, template)
        except (TypeError, ValueError):
            return None
        if not layers:
            return None
        keys = list(state)
        if not all(type(k) is str for k in keys):
            return None
        skip = frozenset(layer.weight_key for layer in layers)
        finite_keys = scan_keys(((k, math.prod(template[k][0]), template[k][1]) for k in keys), skip)
        return _LayoutPlan(keys, layers, skip, finite_keys)

    def _planned_checks(self, state: dict, plan: _LayoutPlan) -> tuple[list[Layer], str | None]:
        """:meth:`_host_checks` of a dict of NumPy arrays with the plan's layout: the same result,
        from the plan (its layout checks and layers hold for every client of that layout), with
        the finiteness test of the client's own values."""
        reason = check_finite(state, skip=plan.skip, keys=plan.finite_keys)
        return ([], reason) if reason is not None else (plan.layers, None)

    def _no_layer_reason(self) -> str:
        what = "conv layer followed by a BatchNorm" if self.mode == "official" else "conv layer"
        return f"no_scorable_layer: the model has no {what}"

    def _host_cbe(
        self, state: Any, layers: Sequence[Layer], energies: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray | None, str | None]:
        """The CBE of a host client from its BE values (non-finite ones name their weight)."""
        try:  # (it refuses a NaN/Inf value: only then are the layers looked at one by one)
            return concentrate(energies, self.kappa, self.mode, include_linear=self.include_linear), None
        except (TypeError, ValueError) as exc:
            error = exc
        for layer, be in zip(layers, energies.values()):
            if not np.isfinite(be).all():
                reason = non_finite_reason(layer.weight_key, to_numpy(state[layer.weight_key]))
                return None, reason or (f"non_finite: the backdoor energy of {layer.name!r} overflows "
                                        "float64 (finite weights times a huge BN scale)")
        return None, _input_reason(error)

    def _host_cbes(
        self,
        states: Sequence[Any],
        template: Template | None,
        reference: Mapping[str, Any] | None,
        layouts: Sequence[Template | None] | None = None,
    ) -> list[tuple[np.ndarray | None, str | None]]:
        """``client_cbe`` of many host clients, with every scored layer of every valid client in
        one native call (the threads share the round's work); the same values, bit for bit.
        ``layouts``: the states' ``state_template`` (None entries: not known)."""
        results: list[tuple[np.ndarray | None, str | None]] = []
        checked: list[tuple[int, list[Layer]]] = []
        plan: _LayoutPlan | None = None
        planned = False  # (the plan is looked for once, at the first client it could cover)
        for i, state in enumerate(states):
            layout = layouts[i] if layouts is not None else None
            if (template is not None and layout is not None and layout == template
                    and is_numpy_state(state)):
                if not planned:
                    plan, planned = self._layout_plan(state, template, reference), True
                if plan is not None and list(state) == plan.keys:
                    layers, reason = self._planned_checks(state, plan)
                else:
                    layers, reason = self._host_checks(state, template, reference, layout)
            else:
                layers, reason = self._host_checks(state, template, reference, layout)
            if reason is None:
                checked.append((i, layers))
            results.append((None, reason))
        # The kernel inputs of every checked client at once (BN scales in one vectorised pass);
        # if any client's inputs are refused, client by client, so that each says why.
        scored: list[tuple[int, list[Layer]]] = []
        inputs = []
        try:
            inputs = _layer_inputs_batch([states[i] for i, _ in checked], [la for _, la in checked],
                                         self.bn_eps, self.mode)
            scored = checked
        except (TypeError, ValueError, KeyError):
            for i, layers in checked:
                try:
                    inputs.append(layer_inputs(states[i], layers, self.bn_eps, self.mode))
                except (TypeError, ValueError) as exc:
                    results[i] = (None, _input_reason(exc))
                else:
                    scored.append((i, layers))
        if not scored:
            return results
        try:
            energies = score_inputs(inputs, [layers for _, layers in scored], self.n_threads,
                                    kappa=self.kappa)
        except (TypeError, ValueError):  # not expected after layer_inputs; let each client say why
            for i, _ in scored:
                results[i] = self.client_cbe(states[i], template, reference)
            return results
        for (i, layers), be in zip(scored, energies):
            results[i] = self._host_cbe(states[i], layers, be)
        return results

    def _client_cbe_cuda(
        self, state: Any, template: Template | None, reference: Mapping[str, Any] | None
    ) -> tuple[np.ndarray | None, str | None]:
        """``client_cbe`` for a state held on a GPU: validated and scored on the device; only the
        CBE (a few hundred values) comes back to the host."""
        return self._device_cbes([state], template, reference)[0]

    def _device_cbes(
        self, states: Sequence[Any], template: Template | None, reference: Mapping[str, Any] | None
    ) -> list[tuple[np.ndarray | None, str | None]]:
        """``client_cbe`` of GPU clients: each is validated on its own, then the valid clients
        that share a device, an array library and their scored layers are scored in one batch of
        launches (``concentrated_backdoor_energy_batch_cuda``) and their CBEs come to the host in
        one copy: the same values, bit for bit, as one client at a time (the kernels compute
        every channel, BN scale and layer on its own)."""
        results: list[tuple[np.ndarray | None, str | None]] = [(None, None)] * len(states)
        groups: dict[tuple, tuple[list[Layer], list[int]]] = {}
        for i, state in enumerate(states):
            reason = check_state(state, template)
            if reason is not None:
                results[i] = (None, reason)
                continue
            try:
                layers = self.layers_for(state, reference)
                if not layers:
                    results[i] = (None, self._no_layer_reason())
                    continue
                lib = _cuda.library(state[layers[0].weight_key], layers[0].weight_key)
            except (TypeError, ValueError) as exc:
                results[i] = (None, f"invalid_type: {exc}")
                continue
            groups.setdefault((id(layers), type(lib).__name__, lib.index), (layers, []))[1].append(i)

        def score(members: list[int], layers: list[Layer]) -> list[tuple[np.ndarray | None, str | None]]:
            batch = _cuda.concentrated_backdoor_energy_batch_cuda(
                [states[i] for i in members], layers, self.kappa, self.mode, bn_eps=self.bn_eps)
            rows = (list(np.asarray(_cuda.to_host(batch), dtype=np.float64)) if self.mode == "paper"
                    else [np.asarray(_cuda.to_host(row), dtype=np.float64) for row in batch])
            return [(cbe, None) if np.isfinite(cbe).all() else
                    (None, "non_finite: a scored layer has a non-finite backdoor energy") for cbe in rows]

        for layers, members in groups.values():
            try:
                scored = score(members, layers)
            except (TypeError, ValueError) as exc:
                if len(members) == 1:
                    scored = [(None, f"invalid_type: {exc}")]
                else:  # let each client say why
                    scored = [self._device_cbes([states[i]], template, reference)[0] for i in members]
            for i, res in zip(members, scored):
                results[i] = res
        return results

    def _on_device(self, state: Any) -> Any:
        """``state`` moved where ``self.device`` says (unchanged for "auto" or non-mappings)."""
        if self.device == "auto" or not is_mapping(state):
            return state
        on_gpu = on_device(state)
        if self.device == "cuda" and not on_gpu:
            return _cuda.to_device_state(state)
        if self.device == "cpu" and on_gpu:
            return {k: to_numpy(state[k], name=str(k)) for k in state.keys()}  # noqa: SIM118
        return state

    # ------------------------------------------------------------------ the round
    def detect(self, states: Iterable[Any], global_state: Mapping[str, Any] | None = None) -> Detection:
        """Score and cluster the clients of one round.

        Every client is validated on its own (a bad one is rejected with its reason); the scored
        layers of all valid CPU clients are then scored in one native call, so that the threads
        share the whole round's work, and the valid GPU clients of one device in one batch of
        launches with a single copy of their CBEs to the host (the same values, bit for bit, as
        :meth:`client_cbe`).

        Args:
            states: the clients' state_dicts (NumPy arrays or torch tensors), any iterable.
            global_state: the server's model; when given, every client must match its keys,
                shapes and dtypes, and its key order drives the conv -> BN pairing. Without it,
                clients must match the layout most of them share (ties: the earliest), so one
                malformed client cannot become the template.

        Returns:
            a :class:`Detection` (accepted mask in input order, reasons, labels, CBEs, centers).

        Raises:
            ValueError: ``states`` is empty. TypeError: ``states`` is a single mapping.
        """
        t0 = time.perf_counter()
        if is_single_state(states):
            raise TypeError("detect() takes a list of state_dicts, got a single state_dict")
        states = [self._on_device(state) for state in states]
        if not states:
            raise ValueError("detect() needs at least one client state_dict; got an empty list")
        if global_state is not None:
            global_state = self._on_device(global_state)
        layouts = state_templates(states)  # each client's keys/shapes/dtypes, read once
        template = (state_template(global_state) if global_state is not None
                    else majority_template(states, layouts))
        host = [i for i, state in enumerate(states) if not on_device(state)]
        results: list[tuple[np.ndarray | None, str | None]] = [(None, None)] * len(states)
        host_results = self._host_cbes([states[i] for i in host], template, global_state,
                                       [layouts[i] for i in host])
        for i, res in zip(host, host_results):
            results[i] = res
        device = sorted(set(range(len(states))) - set(host))
        for i, res in zip(device, self._device_cbes([states[i] for i in device], template,
                                                    global_state)):
            results[i] = res
        cbes = [cbe for cbe, _ in results]
        reasons = [reason for _, reason in results]
        report = self.decide(cbes, reasons)
        first_valid = next((i for i, r in enumerate(reasons) if r is None), None)
        if first_valid is not None:
            report.layers = [layer.name for layer in
                             self.layers_for(states[first_valid], global_state, layouts[first_valid])]
        report.detect_seconds = time.perf_counter() - t0
        return report

    def decide(self, cbes: Sequence[np.ndarray | None], reasons: Sequence[str | None]) -> Detection:
        """Cluster the valid CBEs and build the report.

        Args:
            cbes: per client, its CBE (float64 (d,)) or None when invalid.
            reasons: per client, None or the reason it was rejected before clustering.
        """
        t0 = time.perf_counter()
        n = len(cbes)
        if len(reasons) != n:
            raise ValueError(f"decide(): {n} CBEs but {len(reasons)} reasons")
        reasons = list(reasons)
        valid = [i for i in range(n) if reasons[i] is None and cbes[i] is not None]
        for i in range(n):
            if reasons[i] is None and cbes[i] is None:
                reasons[i] = "invalid_type: no CBE was computed for this client"
        accepted = np.zeros(n, dtype=bool)
        labels = np.full(n, -1, dtype=np.int64)
        width = max((cbes[i].size for i in valid), default=0)  # type: ignore[union-attr]
        cbe_matrix = _pad([c if c is not None else np.empty(0) for c in cbes], width)
        base = {"layers": [], "params": self.params()}
        if not valid:
            return Detection(accepted, reasons, labels, cbe_matrix, np.empty((0, width)), math.nan,
                             None, False, note="no valid client in the round", **base,
                             detect_seconds=time.perf_counter() - t0)
        if len(valid) == 1:
            accepted[valid[0]] = True
            labels[valid[0]] = 0
            return Detection(accepted, reasons, labels, cbe_matrix, cbe_matrix[valid], math.nan, None,
                             True, note="a single valid client: accepted without clustering", **base,
                             detect_seconds=time.perf_counter() - t0)

        rows = [cbes[i] for i in valid]
        ragged = len({r.size for r in rows}) > 1  # type: ignore[union-attr]
        note = None
        if ragged:  # only possible in official mode, when quantile ties give more values
            rows = [_resample_quantiles(r, width) for r in rows]  # type: ignore[arg-type]
            note = ("CBE lengths differ between clients (quantile ties); CBEs were resampled to a "
                    "common length through their quantile functions before clustering")
        X = np.vstack(rows)
        km = KWMeans(n_clusters=2, p=self.p if self.mode == "paper" else 1, n_init=self.n_init,
                     random_state=self.random_state, mode=self.mode, n_threads=self.n_threads).fit(X)
        sub_labels = np.asarray(km.labels_, dtype=np.int64)
        labels[valid] = sub_labels
        centers = np.asarray(km.cluster_centers_, dtype=np.float64)
        p = self.p if self.mode == "paper" else 1
        present = sorted(set(sub_labels.tolist()))
        if len(present) < 2:
            accepted[valid] = True
            return Detection(accepted, reasons, labels, cbe_matrix, centers, 0.0, None, True,
                             note="all valid clients fell into one cluster", **base,
                             detect_seconds=time.perf_counter() - t0)
        dist = float(wasserstein_1d(centers[0], centers[1], p=p))
        benign = dist <= self.epsilon if self.mode == "official" else dist < self.epsilon
        kept: int | None = None
        if benign:
            accepted[valid] = True
        else:
            norms = np.abs(centers).sum(axis=1)
            sizes = np.bincount(sub_labels, minlength=2)
            if self.selection == "norm":
                kept = int(np.argmin(norms)) if norms[0] != norms[1] else int(np.argmax(sizes))
            else:
                kept = int(np.argmax(sizes)) if sizes[0] != sizes[1] else int(np.argmin(norms))
            other = 1 - kept
            for j, i in enumerate(valid):
                if sub_labels[j] == kept:
                    accepted[i] = True
                elif self.selection == "norm":
                    reasons[i] = (
                        f"high_energy_cluster: cluster {other} (center L1 norm {norms[other]:.6g} > "
                        f"{norms[kept]:.6g}; center distance {dist:.6g} vs epsilon {self.epsilon:g})"
                    )
                else:
                    reasons[i] = (
                        f"minority_cluster: cluster {other} has {sizes[other]} of {len(valid)} clients "
                        f"(center distance {dist:.6g} vs epsilon {self.epsilon:g})"
                    )
        return Detection(accepted, reasons, labels, cbe_matrix, centers, dist, kept, bool(benign),
                         note=note, **base, detect_seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ aggregation
    def aggregate(
        self,
        states: Iterable[Any],
        weights: Sequence[float] | np.ndarray | None = None,
        global_state: Mapping[str, Any] | None = None,
        server_lr: float = 1.0,
    ) -> tuple[Any, Detection]:
        """Detect, then aggregate the accepted clients.

        Returns ``(new_state, report)``: the (``weights``-weighted) mean of the accepted models,
        or ``global + server_lr * weighted_mean(accepted - global)`` when ``global_state`` is
        given. The output keeps the keys, order, dtypes and container type of the input. See
        :func:`mars_native.aggregation.aggregate_detected` for the details.
        """
        from mars_native.aggregation import aggregate_detected

        return aggregate_detected(self, states, weights, global_state, server_lr)

    def round(self, global_state: Mapping[str, Any] | None = None, server_lr: float = 1.0) -> Any:
        """A streaming round: ``rnd.add(state, weight)`` per client, then ``rnd.finish()``.

        See :class:`mars_native.aggregation.Round`.
        """
        from mars_native.aggregation import Round

        return Round(self, global_state=global_state, server_lr=server_lr)


def is_single_state(x: Any) -> bool:
    """True when ``x`` looks like one state_dict rather than a list of them."""
    return isinstance(x, Mapping)
