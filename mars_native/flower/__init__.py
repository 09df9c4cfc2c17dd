"""MARS for Flower: ``from mars_native.flower import Mars`` (needs the extra ``flower``).

- :class:`Mars` -- a Message-API strategy (``flwr.serverapp.strategy.FedAvg`` subclass) that
  aggregates only the clients MARS judges benign, logs who was rejected and why, and can append a
  per-round JSONL report.
- :class:`MarsLegacy` -- the same for the legacy ``flwr.server.strategy`` API (``None`` when the
  installed Flower no longer has it).
- :class:`RoundRecord` -- one entry of ``strategy.history``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mars_native.flower needs Flower: pip install 'mars-native[flower]'") from exc

from mars_native.flower._round import METRIC_KEYS, ClientUpdate, RoundRecord, run_round
from mars_native.flower.strategy import Mars, arrayrecord_to_state, state_to_arrayrecord

try:
    from mars_native.flower.legacy import MarsLegacy
except ImportError:  # pragma: no cover - a Flower without flwr.server.strategy
    MarsLegacy = None  # type: ignore[assignment,misc]

__all__ = [
    "METRIC_KEYS",
    "ClientUpdate",
    "Mars",
    "MarsLegacy",
    "RoundRecord",
    "arrayrecord_to_state",
    "run_round",
    "state_to_arrayrecord",
]
