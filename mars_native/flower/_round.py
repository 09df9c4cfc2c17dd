"""Framework-neutral core of the Flower strategies: one MARS round over decoded client replies.

Both :class:`mars_native.flower.Mars` (Message API) and :class:`mars_native.flower.MarsLegacy`
(``flwr.server.strategy`` API) turn their replies into :class:`ClientUpdate` objects and call
:func:`run_round`; everything that decides who is accepted and what is averaged lives here, once.
This module does not import Flower.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mars_native.validation import check_state, majority_template, state_template

#: Flower's logger; the strategies log through it so their lines appear with Flower's own.
LOGGER = logging.getLogger("flwr")

#: Names of the metrics added to every training round's MetricRecord.
METRIC_KEYS = (
    "mars-num-replies",
    "mars-num-accepted",
    "mars-num-rejected",
    "mars-num-invalid",
    "mars-all-benign",
    "mars-center-distance",
    "mars-detect-seconds",
)


@dataclass
class ClientUpdate:
    """One decoded reply of a training round.

    ``state`` is the client's model (parameter name -> array) or ``None`` when the reply could not
    be decoded; ``reason`` is then set (``"<code>: <detail>"``) and the reply is rejected before
    MARS sees it. ``sort_key`` orders the replies deterministically (content hashes), so the
    aggregate does not depend on the order in which replies arrived. ``payload`` is the framework's
    own reply object (a ``RecordDict`` or a ``(num_examples, metrics)`` pair), handed back to the
    metric aggregation of the accepted replies.
    """

    node_id: int | str
    state: dict[str, np.ndarray] | None = None
    weight: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    sort_key: tuple = ()
    payload: Any = None


@dataclass
class RoundRecord:
    """What happened to every reply of one training round (see ``Mars.history``).

    The per-client lists are aligned: first the replies that reached MARS, in the order MARS saw
    them (``detection`` row ``i`` is entry ``i``), then the replies rejected before detection,
    sorted by node id. ``aggregate`` is ``None`` when every reply was rejected.
    """

    server_round: int
    node_ids: list[int | str]
    accepted: list[bool]
    reasons: list[str | None]
    weights: list[float | None]
    client_metrics: list[dict[str, Any]]
    detection: Any  # mars_native.Detection | None
    aggregate: dict[str, np.ndarray] | None
    accepted_payloads: list[Any]
    seconds: float

    @property
    def num_detected(self) -> int:
        """How many replies reached MARS (the rows of ``detection``)."""
        return 0 if self.detection is None else int(self.detection.n_clients)

    @property
    def rejected_node_ids(self) -> list[int | str]:
        """Node ids of every rejected reply, in record order."""
        return [n for n, ok in zip(self.node_ids, self.accepted) if not ok]

    @property
    def rejections(self) -> dict[int | str, str]:
        """``{node_id: reason}`` of every rejected reply."""
        return {
            n: r or "" for n, ok, r in zip(self.node_ids, self.accepted, self.reasons) if not ok
        }

    def metrics(self) -> dict[str, int | float]:
        """The ``mars-*`` metrics of the round (int/float only, as a MetricRecord requires)."""
        det = self.detection
        n_ok = int(sum(self.accepted))
        return {
            "mars-num-replies": len(self.node_ids),
            "mars-num-accepted": n_ok,
            "mars-num-rejected": len(self.node_ids) - n_ok,
            "mars-num-invalid": len(self.node_ids)
            - self.num_detected
            + (0 if det is None else int(np.sum(np.asarray(det.labels) < 0))),
            "mars-all-benign": int(bool(det is not None and det.all_benign)),
            "mars-center-distance": float("nan") if det is None else float(det.center_distance),
            "mars-detect-seconds": 0.0 if det is None else float(det.detect_seconds),
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: one line of the JSONL report."""
        return json_ready(
            {
                "round": self.server_round,
                "time": time.time(),
                "node_ids": list(self.node_ids),
                "accepted": list(self.accepted),
                "reasons": list(self.reasons),
                "weights": list(self.weights),
                "client_metrics": list(self.client_metrics),
                "metrics": self.metrics(),
                "report_rows": self.num_detected,
                "report": None if self.detection is None else self.detection.to_dict(),
            }
        )


def json_ready(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays become Python numbers/lists, NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return str(obj)


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_ready(record), allow_nan=False, separators=(",", ":"))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def check_weight(value: Any, key: str) -> tuple[float | None, str | None]:
    """Validate a reply's example count; returns ``(weight, None)`` or ``(None, reason)``."""
    if value is None:
        return None, f"missing_weight: the reply has no '{key}' metric"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return (
            None,
            f"bad_weight: '{key}' must be a scalar int or float, got {type(value).__name__}",
        )
    w = float(value)
    if not math.isfinite(w) or w <= 0.0:
        return None, f"bad_weight: '{key}' must be finite and > 0, got {value!r}"
    return w, None


def check_server_lr(server_lr: Any) -> float:
    """``server_lr`` as a float; ``ValueError`` unless it is finite and > 0."""
    if not np.isfinite(server_lr) or server_lr <= 0:
        raise ValueError(f"server_lr must be finite and > 0, got {server_lr!r}")
    return float(server_lr)


def _restore_dtypes(
    new_state: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The aggregate in the template's key order and dtypes (int buffers stay ints)."""
    out: dict[str, np.ndarray] = {}
    for k, ref in template.items():
        a = np.asarray(new_state[k])
        if a.dtype != ref.dtype:
            if ref.dtype.kind in "iub" and a.dtype.kind == "f":
                a = np.rint(a)
            a = a.astype(ref.dtype)
        out[k] = np.require(a, requirements="C")  # keeps 0-d arrays 0-d
    return out


def run_round(
    defense: Any,
    updates: Sequence[ClientUpdate],
    *,
    server_round: int,
    global_state: Mapping[str, np.ndarray] | None = None,
    server_lr: float = 1.0,
    use_global: bool = False,
) -> RoundRecord:
    """Validate, detect and aggregate one round.

    ``defense`` is a :class:`mars_native.MARS`. ``global_state`` (the model the clients started
    from), when known, is the layout every reply must match (keys, shapes); otherwise the layout
    most replies share is (:func:`mars_native.validation.majority_template`). With ``use_global`` the
    aggregate is ``global + server_lr * weighted_mean(accepted - global)``, otherwise the weighted
    mean of the accepted models. Replies that cannot be scored are rejected with a reason and never
    reach the aggregate; if MARS itself refuses the round (``ValueError``/``TypeError``, e.g. too few
    clients to cluster) every reply is rejected with reason ``"mars_error: ..."`` and the round
    returns no aggregate, so the server keeps its model instead of crashing.
    """
    t0 = time.perf_counter()
    candidates: list[ClientUpdate] = []
    rejected: list[ClientUpdate] = []
    updates = sorted(updates, key=lambda u: (u.sort_key, str(u.node_id)))
    if global_state is not None:
        template = state_template(global_state)
    else:
        template = majority_template([u.state for u in updates if u.reason is None and u.state])
    for u in updates:
        if u.reason is None and u.state is not None:
            u.reason = check_state(u.state, template)
        if u.reason is None and u.state is None:
            u.reason = "invalid_type: the reply carries no model"
        (rejected if u.reason is not None else candidates).append(u)
    rejected.sort(key=lambda u: str(u.node_id))

    detection = None
    aggregate = None
    accepted_mask = [False] * len(candidates)
    mars_reasons: list[str | None] = [None] * len(candidates)
    if candidates:
        states = [u.state for u in candidates]
        weights = [float(u.weight) for u in candidates]  # type: ignore[arg-type]
        if use_global and global_state is None:
            raise ValueError(
                "use_global=True needs the global model: start() / configure_train() record it"
            )
        try:
            if use_global:
                new_state, detection = defense.aggregate(
                    states, weights=weights, global_state=dict(global_state), server_lr=server_lr
                )
            else:
                new_state, detection = defense.aggregate(states, weights=weights)
        except (ValueError, TypeError) as exc:
            LOGGER.exception("MARS round %s: detection failed", server_round)
            mars_reasons = [f"mars_error: {exc}"] * len(candidates)
        else:
            accepted_mask = [bool(a) for a in np.asarray(detection.accepted)]
            mars_reasons = list(detection.reasons)
            if any(accepted_mask) and new_state is not None:
                template = global_state if global_state is not None else candidates[0].state
                aggregate = _restore_dtypes(new_state, template)  # type: ignore[arg-type]

    ordered = candidates + rejected
    accepted = accepted_mask + [False] * len(rejected)
    reasons = [None if ok else (r or "rejected") for ok, r in zip(accepted_mask, mars_reasons)]
    reasons += [u.reason for u in rejected]
    return RoundRecord(
        server_round=server_round,
        node_ids=[u.node_id for u in ordered],
        accepted=accepted,
        reasons=reasons,
        weights=[u.weight for u in ordered],
        client_metrics=[dict(u.metrics) for u in ordered],
        detection=detection,
        aggregate=aggregate,
        accepted_payloads=[u.payload for u, ok in zip(candidates, accepted_mask) if ok],
        seconds=time.perf_counter() - t0,
    )


def log_round(record: RoundRecord, strategy_name: str = "Mars") -> None:
    """Log the round's outcome and every rejected node with its reason (Flower's logger)."""
    m = record.metrics()
    LOGGER.info(
        "%s round %s: accepted %d of %d replies (center distance %.4g, detection %.3f s)",
        strategy_name,
        record.server_round,
        m["mars-num-accepted"],
        m["mars-num-replies"],
        m["mars-center-distance"],
        m["mars-detect-seconds"],
    )
    for node_id, reason in record.rejections.items():
        LOGGER.warning(
            "%s round %s: rejected node %s: %s", strategy_name, record.server_round, node_id, reason
        )
    if record.aggregate is None and record.node_ids:
        LOGGER.warning(
            "%s round %s: every reply was rejected; the global model is kept",
            strategy_name,
            record.server_round,
        )
