"""MARS for the legacy ``flwr.server.strategy`` API (``aggregate_fit`` over ``FitRes``).

Flower 1.x still ships the pre-Message strategies (imported from ``flwr.compat``). This adapter
converts ``Parameters`` to named arrays and runs the same round logic as
:class:`mars_native.flower.Mars` (:func:`mars_native.flower._round.run_round`).

Legacy ``Parameters`` carry no names. Pass ``param_names`` (e.g.
``list(model.state_dict().keys())``) so MARS can pair every conv with the BatchNorm that follows
it by name. Without names the pairing falls back to key order: :func:`infer_param_names` reads the
arrays in the order of ``model.state_dict()`` (a conv weight, its bias, then a BatchNorm's weight,
bias, running mean and variance and ``num_batches_tracked``) and names them accordingly. That
holds for ``[v.numpy() for v in model.state_dict().values()]`` (what Flower's PyTorch examples
send), not for arrays in another order; a BatchNorm sent without its running statistics (only
``model.parameters()``) is not recognised, and its conv is then scored without BN scaling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg

from mars_native.flower._round import (
    ClientUpdate,
    RoundRecord,
    append_jsonl,
    check_server_lr,
    check_weight,
    log_round,
    run_round,
)

__all__ = ["MarsLegacy", "infer_param_names"]


def _node_id(proxy: ClientProxy) -> int | str:
    node_id = getattr(proxy, "node_id", None)
    return node_id if node_id is not None else proxy.cid


def _params_hash(params: Parameters) -> str:
    h = hashlib.sha256()
    for t in params.tensors:
        h.update(len(t).to_bytes(8, "little"))
        h.update(t)
    return h.hexdigest()


def infer_param_names(arrays: Sequence[np.ndarray]) -> list[str]:
    """Names for unnamed arrays laid out in ``state_dict()`` order, so MARS can score them.

    A weight with >= 2 dims starts module ``m<j>`` (``m<j>.conv.weight`` for >= 3 dims, else
    ``m<j>.linear.weight``); the 1-D float arrays of its output size that follow it are its bias
    and/or a BatchNorm (``m<j>.bn.weight/bias/running_mean/running_var`` when there are 4 or 5 of
    them, plus ``m<j>.bn.num_batches_tracked`` for an integer scalar right after). Anything else is
    ``param<i>``.
    """
    n = len(arrays)
    names = [f"param{i}" for i in range(n)]
    i = module = 0
    while i < n:
        a = arrays[i]
        if a.ndim < 2:
            i += 1
            continue
        prefix = f"m{module}"
        module += 1
        kind = "conv" if a.ndim >= 3 else "linear"
        names[i] = f"{prefix}.{kind}.weight"
        i += 1
        j = i
        while (
            j < n
            and arrays[j].ndim == 1
            and arrays[j].shape[0] == a.shape[0]
            and arrays[j].dtype.kind == "f"
        ):
            j += 1
        run = j - i
        if run in (4, 5):
            if run == 5:
                names[i] = f"{prefix}.{kind}.bias"
                i += 1
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                names[i] = f"{prefix}.bn.{leaf}"
                i += 1
            if i < n and arrays[i].ndim == 0 and arrays[i].dtype.kind in "iu":
                names[i] = f"{prefix}.bn.num_batches_tracked"
                i += 1
        elif run >= 1:
            names[i] = f"{prefix}.{kind}.bias"
            i += 1
    return names


class MarsLegacy(LegacyFedAvg):
    """MARS for ``flwr.server.strategy`` (``start_server`` / ``ServerAppComponents``).

    Same detection, weighting (``FitRes.num_examples``), rejection reasons, ``history`` and JSONL
    report as :class:`mars_native.flower.Mars`. ``param_names`` names the arrays of ``Parameters``
    (see the module docstring). The returned metrics are ``fit_metrics_aggregation_fn`` over the
    accepted clients (when given) plus the ``mars-*`` metrics.
    """

    def __init__(
        self,
        *,
        param_names: Sequence[str] | None = None,
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
        self.param_names = None if param_names is None else [str(n) for n in param_names]
        if self.param_names is not None and len(set(self.param_names)) != len(self.param_names):
            raise ValueError("param_names must be unique")
        self.defense = defense
        self.server_lr = float(server_lr)
        self.use_global = bool(server_lr != 1.0) if use_global is None else bool(use_global)
        self.report_path = None if report_path is None else Path(report_path)
        self.history: list[RoundRecord] = []
        self.current_parameters: Parameters | None = self.initial_parameters

    def __repr__(self) -> str:
        return f"MarsLegacy(accept_failures={self.accept_failures})"

    @property
    def last_detection(self) -> Any:
        """The :class:`mars_native.Detection` of the latest round (or ``None``)."""
        return self.history[-1].detection if self.history else None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        """FedAvg's sampling; records ``parameters`` as the global model."""
        self.current_parameters = parameters
        return super().configure_fit(server_round, parameters, client_manager)

    def _to_state(self, params: Parameters) -> dict[str, np.ndarray]:
        arrays = parameters_to_ndarrays(params)
        names = self.param_names if self.param_names is not None else infer_param_names(arrays)
        if len(arrays) != len(names):
            raise ValueError(f"expected {len(names)} arrays (param_names), got {len(arrays)}")
        return dict(zip(names, arrays))

    def _decode(self, proxy: ClientProxy, res: FitRes) -> ClientUpdate:
        u = ClientUpdate(_node_id(proxy), metrics=dict(res.metrics or {}))
        if res.status.code != Code.OK:
            u.reason = f"reply_error: {res.status.code.name} {res.status.message}"
            return u
        u.weight, u.reason = check_weight(res.num_examples, "num_examples")
        if u.reason is not None:
            return u
        try:
            u.state = self._to_state(res.parameters)
        except Exception as exc:  # noqa: BLE001 - any decode failure is the sender's fault
            u.reason = f"invalid_array: {type(exc).__name__}: {exc}"
            return u
        u.sort_key = (_params_hash(res.parameters), u.weight)
        u.payload = (res.num_examples, res.metrics)
        return u

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Run MARS over the fit results; aggregate the accepted ones."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        updates = [self._decode(proxy, res) for proxy, res in results]
        for i, fail in enumerate(failures):
            if isinstance(fail, BaseException):
                updates.append(
                    ClientUpdate(
                        f"failure-{i}", reason=f"reply_error: {type(fail).__name__} {fail}"
                    )
                )
            else:
                proxy, res = fail
                updates.append(
                    ClientUpdate(
                        _node_id(proxy),
                        reason=f"reply_error: {res.status.code.name} {res.status.message}",
                    )
                )
        global_state = None
        if self.current_parameters is not None and self.current_parameters.tensors:
            global_state = self._to_state(self.current_parameters)
        record = run_round(
            self.defense,
            updates,
            server_round=server_round,
            global_state=global_state,
            server_lr=self.server_lr,
            use_global=self.use_global,
        )
        self.history.append(record)
        log_round(record, type(self).__name__)
        if self.report_path is not None:
            append_jsonl(self.report_path, record.to_json())

        metrics: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn and record.accepted_payloads:
            metrics = dict(self.fit_metrics_aggregation_fn(record.accepted_payloads))
        metrics.update(record.metrics())
        if record.aggregate is None:
            return None, metrics
        names = list(record.aggregate)
        return ndarrays_to_parameters([record.aggregate[k] for k in names]), metrics
