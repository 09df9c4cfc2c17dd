"""MARS as a Flower Message-API strategy (``flwr.serverapp.strategy.FedAvg`` subclass)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mars_native.flower._round import (
    LOGGER,
    ClientUpdate,
    RoundRecord,
    append_jsonl,
    check_server_lr,
    check_weight,
    log_round,
    run_round,
)

__all__ = ["Mars", "arrayrecord_to_state", "state_to_arrayrecord"]


def arrayrecord_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode an ArrayRecord into ``{name: ndarray}`` in the record's key order.

    Raises ``ValueError`` naming the key when an array cannot be decoded as NumPy (another
    serialization type, corrupt bytes); pickled arrays are never loaded.
    """
    state: dict[str, np.ndarray] = {}
    for key, arr in record.items():
        try:
            state[key] = arr.numpy()
        except Exception as exc:
            raise ValueError(f"'{key}' cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return state


def state_to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Encode ``{name: ndarray}`` as an ArrayRecord (keys, order and dtypes kept)."""
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in state.items()})


def _metrics_of(content: RecordDict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in content.metric_records.values():
        for k, v in rec.items():
            out.setdefault(k, v)
    return out


class Mars(FedAvg):
    """Federated averaging of the clients that MARS judges benign.

    Every training reply is decoded by parameter name (so each conv is paired with its
    BatchNorm), checked, and handed to :class:`mars_native.MARS` with its example count
    (``weighted_by_key``) as weight. The new global model is the weighted mean of the accepted
    replies (or ``global + server_lr * mean(accepted - global)`` with ``use_global``); it keeps the
    replies' keys and dtypes (integer buffers such as ``num_batches_tracked`` stay integers).

    Replies that carry an error, no (or several) ArrayRecords, no valid example count, arrays that
    do not match the global model's names and shapes, or NaN/inf values are rejected with a reason
    and the round goes on; when every reply is rejected, ``aggregate_train`` returns
    ``(None, metrics)`` and Flower keeps the current global model.

    Parameters
    ----------
    kappa, epsilon, selection, mode, include_linear, p, random_state, n_init, n_threads, bn_eps,
        layer_map
        Passed to :class:`mars_native.MARS` (``selection="majority"`` is MARS*,
        ``mode="official"`` reproduces the authors' code). Ignored when ``defense`` is given.
    server_lr : float
        Server learning rate of ``global + server_lr * mean(accepted - global)``.
    use_global : bool or None
        Aggregate around the current global model (recorded by ``configure_train``). ``None``
        (default): only when ``server_lr != 1``.
    report_path : str or Path or None
        Append one JSON line per training round: ``round``, ``node_ids``, ``accepted``,
        ``reasons``, ``weights``, ``client_metrics``, ``metrics`` and ``report``
        (``Detection.to_dict()``; its rows are the first ``report_rows`` entries of ``node_ids``).
    defense : mars_native.MARS or None
        A ready detector to use instead of building one from the parameters above.
    **fedavg_kwargs
        Everything :class:`flwr.serverapp.strategy.FedAvg` accepts (``min_train_nodes``,
        ``weighted_by_key``, ``train_metrics_aggr_fn``, ...).

    Attributes
    ----------
    history : list[RoundRecord]
        One record per training round: node ids, accepted flags, reasons, the Detection.
    last_detection : mars_native.Detection or None
        The report of the latest round.
    current_arrays : ArrayRecord or None
        The global model sent in the latest ``configure_train``.
    """

    def __init__(
        self,
        *,
        kappa: float = 0.05,
        epsilon: float = 0.03,
        selection: str = "norm",
        mode: str = "paper",
        include_linear: bool = False,
        p: int = 1,
        random_state: int = 0,
        n_init: int = 10,
        n_threads: int | None = None,
        bn_eps: float = 1e-5,
        layer_map: Mapping[str, Any] | None = None,
        server_lr: float = 1.0,
        use_global: bool | None = None,
        report_path: str | Path | None = None,
        defense: Any = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if defense is None:
            from mars_native import MARS

            defense = MARS(kappa=kappa, epsilon=epsilon, selection=selection, mode=mode,
                           include_linear=include_linear, p=p, random_state=random_state,
                           n_init=n_init, n_threads=n_threads, bn_eps=bn_eps, layer_map=layer_map)
        check_server_lr(server_lr)
        self.defense = defense
        self.server_lr = float(server_lr)
        self.use_global = bool(server_lr != 1.0) if use_global is None else bool(use_global)
        self.report_path = None if report_path is None else Path(report_path)
        self.history: list[RoundRecord] = []
        self.current_arrays: ArrayRecord | None = None
        self._global_cache: tuple[str, dict[str, np.ndarray]] | None = None

    # ------------------------------------------------------------------ Flower hooks
    def summary(self) -> None:
        """Log the strategy's configuration (FedAvg's summary plus the MARS settings)."""
        super().summary()
        d = self.defense
        LOGGER.log(INFO, "\t└──> MARS:")
        LOGGER.log(
            INFO,
            "\t\t├── kappa %s | epsilon %s | selection %s | mode %s",
            getattr(d, "kappa", "?"),
            getattr(d, "epsilon", "?"),
            getattr(d, "selection", "?"),
            getattr(d, "mode", "?"),
        )
        LOGGER.log(
            INFO,
            "\t\t└── server_lr %s | use_global %s | report %s",
            self.server_lr,
            self.use_global,
            self.report_path,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; records ``arrays`` as the global model the replies must match."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run MARS over the replies; return the aggregate of the accepted ones and metrics."""
        updates = [self._decode_reply(msg) for msg in replies]
        if not updates:
            return None, None
        n_err = sum(1 for u in updates if u.reason is not None and u.reason.startswith("reply_"))
        LOGGER.log(
            INFO,
            "aggregate_train: Received %s results and %s failures",
            len(updates) - n_err,
            n_err,
        )
        record = run_round(
            self.defense,
            updates,
            server_round=server_round,
            global_state=self._global_state(),
            server_lr=self.server_lr,
            use_global=self.use_global,
        )
        self._finish_round(record)

        metrics = MetricRecord()
        if record.accepted_payloads:
            metrics = self._aggregate_train_metrics(record.accepted_payloads, server_round)
        for k, v in record.metrics().items():
            metrics[k] = v
        arrays = None if record.aggregate is None else state_to_arrayrecord(record.aggregate)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's weighted metric mean over the well-formed evaluation replies.

        Unlike FedAvg, a malformed reply (no MetricRecord, no valid example count) is skipped and
        logged instead of aborting the run.
        """
        good: list[RecordDict] = []
        for msg in replies:
            if msg.has_error():
                LOGGER.log(
                    INFO,
                    "aggregate_evaluate: error from node %s: %s",
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            recs = list(msg.content.metric_records.values())
            _, reason = check_weight(
                recs[0].get(self.weighted_by_key) if recs else None, self.weighted_by_key
            )
            if reason is not None:
                LOGGER.warning(
                    "aggregate_evaluate: skipped node %s: %s", msg.metadata.src_node_id, reason
                )
                continue
            good.append(msg.content)
        if not good:
            return None
        try:
            return self.evaluate_metrics_aggr_fn(good, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001 - inconsistent client metrics must not end the run
            LOGGER.warning("aggregate_evaluate round %s: %s", server_round, exc)
            return None

    # ------------------------------------------------------------------ programmatic access
    @property
    def last_detection(self) -> Any:
        """The :class:`mars_native.Detection` of the latest training round (or ``None``)."""
        return self.history[-1].detection if self.history else None

    def set_global_arrays(self, arrays: ArrayRecord | None) -> None:
        """Set the global model replies are checked against (``configure_train`` does this)."""
        self.current_arrays = arrays

    # ------------------------------------------------------------------ internals
    def _global_state(self) -> dict[str, np.ndarray] | None:
        if self.current_arrays is None:
            return None
        oid = self.current_arrays.object_id
        if self._global_cache is None or self._global_cache[0] != oid:
            self._global_cache = (oid, arrayrecord_to_state(self.current_arrays))
        return self._global_cache[1]

    def _decode_reply(self, msg: Message) -> ClientUpdate:
        node_id = int(msg.metadata.src_node_id)
        if msg.has_error():
            err = msg.error
            return ClientUpdate(node_id, reason=f"reply_error: {err.code} {err.reason}")
        content = msg.content
        metrics = _metrics_of(content)
        u = ClientUpdate(node_id, metrics=metrics, payload=content)
        array_records = content.array_records
        if len(array_records) != 1:
            u.reason = (
                "missing_arrays: the reply has no ArrayRecord"
                if not array_records
                else f"multiple_arrays: expected 1 ArrayRecord, got {sorted(array_records)}"
            )
            return u
        metric_records = list(content.metric_records.values())
        first = metric_records[0] if metric_records else {}
        u.weight, u.reason = check_weight(first.get(self.weighted_by_key), self.weighted_by_key)
        if u.reason is not None:
            return u
        record = next(iter(array_records.values()))
        if len(record) == 0:
            u.reason = "missing_keys: the reply's ArrayRecord is empty"
            return u
        try:
            u.state = arrayrecord_to_state(record)
        except ValueError as exc:
            u.reason = f"invalid_array: {exc}"
            return u
        u.sort_key = (record.object_id, u.weight, metric_records[0].object_id)
        return u

    def _aggregate_train_metrics(
        self, contents: list[RecordDict], server_round: int
    ) -> MetricRecord:
        try:
            return self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as exc:  # noqa: BLE001 - inconsistent client metrics must not end the run
            LOGGER.warning(
                "aggregate_train round %s: client metrics not aggregated: %s", server_round, exc
            )
            return MetricRecord()

    def _finish_round(self, record: RoundRecord) -> None:
        self.history.append(record)
        log_round(record, type(self).__name__)
        if self.report_path is not None:
            append_jsonl(self.report_path, record.to_json())
