"""mars_native.flower.Mars / MarsLegacy on real Flower replies (flwr.app types, no mocks).

Every reply is a ``flwr.app.Message`` with explicit ``Metadata`` (the way a ServerApp receives it),
carrying the ArrayRecord of a small conv/BN CNN and a MetricRecord with "num-examples".
"""

from __future__ import annotations

import json
import logging
import os
import random

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flwr")
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp.strategy import FedAvg
from torch import nn

import mars_native as mn
from mars_native.flower import METRIC_KEYS, Mars, MarsLegacy, state_to_arrayrecord

N_BENIGN = 8
ATTACKERS = (3, 6)  # indices among the replies that amplify channels


class Net(nn.Module):
    """conv1/bn1/conv2/bn2 (64/128 channels) + fc: the layout MARS scores (conv -> BN pairs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not trained here
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def base() -> dict[str, np.ndarray]:
    """A model with non-trivial BN statistics, as numpy arrays in state_dict order."""
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
            bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=g))
            bn.running_mean.copy_(0.1 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=g))
            bn.num_batches_tracked.fill_(7)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def perturb(base: dict[str, np.ndarray], seed: int, rel: float = 3e-3) -> dict[str, np.ndarray]:
    """A benign client: every float tensor plus small noise relative to its mean magnitude."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in base.items():
        if v.dtype.kind == "f" and not k.endswith("running_var"):
            noise = rng.standard_normal(v.shape) * rel * float(np.abs(v).mean())
            out[k] = (v + noise).astype(v.dtype)
        else:
            out[k] = v.copy()
    return out


def amplify(state: dict[str, np.ndarray], factor: float = 4.0) -> dict[str, np.ndarray]:
    """An MRA-like backdoor: a few channels' BN gamma and conv weights scaled up."""
    out = {k: v.copy() for k, v in state.items()}
    out["bn1.weight"][:3] *= factor
    out["conv2.weight"][:6] *= factor
    return out


def meta(node_id: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )


def reply(state, node_id: int, n: int = 10, loss: float = 1.0, **extra) -> Message:
    metrics = MetricRecord({"train_loss": loss, "num-examples": n, **extra})
    content = RecordDict({"arrays": state_to_arrayrecord(state), "metrics": metrics})
    return Message(content=content, metadata=meta(node_id))


def error_reply(node_id: int) -> Message:
    return Message(error=Error(code=3, reason="client crashed"), metadata=meta(node_id))


def node(i: int) -> int:
    return 1000 + i  # node ids of the test replies


def round_states(base, attackers=ATTACKERS, n=N_BENIGN):
    states = [perturb(base, seed=10 + i) for i in range(n)]
    for i in attackers:
        states[i] = amplify(states[i])
    return states


def examples(i: int) -> int:
    return 10 + 5 * i  # distinct example counts so the weighting matters


def replies_for(states, losses=None):
    return [
        reply(s, node(i), n=examples(i), loss=1.0 if losses is None else losses[i])
        for i, s in enumerate(states)
    ]


def decode(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def sorted_like_strategy(strategy: Mars, states):
    """The states and weights in the order the strategy handed them to MARS."""
    rec = strategy.history[-1]
    idx = [nid - 1000 for nid in rec.node_ids[: rec.num_detected]]
    return [states[i] for i in idx], [float(examples(i)) for i in idx]


# --------------------------------------------------------------------------- detection
def test_benign_round_accepts_everyone(base):
    states = round_states(base, attackers=())
    strategy = Mars()
    arrays, metrics = strategy.aggregate_train(1, replies_for(states))
    assert arrays is not None
    assert metrics["mars-num-accepted"] == N_BENIGN
    assert metrics["mars-num-rejected"] == 0
    assert metrics["mars-all-benign"] == 1
    assert metrics["mars-center-distance"] < 0.03
    rec = strategy.history[-1]
    assert all(rec.accepted) and rec.rejected_node_ids == []
    assert strategy.last_detection is rec.detection


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({}, "high_energy_cluster"),
        ({"mode": "official"}, "high_energy_cluster"),
        ({"selection": "majority"}, "minority_cluster"),
    ],
)
def test_amplified_clients_are_rejected_exactly(base, kwargs, code):
    states = round_states(base)
    strategy = Mars(**kwargs)
    arrays, metrics = strategy.aggregate_train(1, replies_for(states))
    rec = strategy.history[-1]
    assert sorted(rec.rejected_node_ids) == [node(i) for i in ATTACKERS]
    for nid, reason in rec.rejections.items():
        assert reason.startswith(code + ":"), (nid, reason)
    assert metrics["mars-num-rejected"] == len(ATTACKERS)
    assert metrics["mars-num-accepted"] == N_BENIGN - len(ATTACKERS)
    assert metrics["mars-all-benign"] == 0
    assert metrics["mars-center-distance"] > 0.03
    assert arrays is not None
    assert strategy.defense.mode == kwargs.get("mode", "paper")
    assert strategy.defense.selection == kwargs.get("selection", "norm")


def test_aggregate_equals_mars_own_aggregate(base):
    states = round_states(base)
    strategy = Mars()
    arrays, _ = strategy.aggregate_train(1, replies_for(states))
    got = decode(arrays)
    ordered, weights = sorted_like_strategy(strategy, states)
    want, report = mn.MARS().aggregate(ordered, weights=weights)
    assert list(got) == list(base)  # same keys, same order
    for k in base:
        assert got[k].dtype == base[k].dtype, k  # num_batches_tracked stays int64
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(report.accepted, strategy.history[-1].accepted)
    # And, up to float rounding, the same as MARS on the states in their original order.
    want2, _ = mn.MARS().aggregate(states, weights=[examples(i) for i in range(len(states))])
    for k in base:
        np.testing.assert_allclose(got[k], want2[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # The attackers carry no weight in it: the weighted mean of the benign clients only.
    benign = [i for i in range(len(states)) if i not in ATTACKERS]
    w = np.array([examples(i) for i in benign], dtype=np.float64)
    mean_gamma = sum(
        w[j] * states[i]["bn1.weight"].astype(np.float64) for j, i in enumerate(benign)
    )
    np.testing.assert_allclose(got["bn1.weight"], mean_gamma / w.sum(), rtol=1e-6)
    assert got["bn1.num_batches_tracked"].dtype == np.int64
    assert int(got["bn1.num_batches_tracked"]) == 7


def test_train_metrics_are_weighted_over_accepted_clients(base):
    states = round_states(base)
    losses = [100.0 if i in ATTACKERS else float(i) for i in range(len(states))]
    _, metrics = Mars().aggregate_train(1, replies_for(states, losses))
    benign = [i for i in range(len(states)) if i not in ATTACKERS]
    w = np.array([examples(i) for i in benign], dtype=np.float64)
    expected = float(np.dot(w, [losses[i] for i in benign]) / w.sum())
    assert metrics["train_loss"] == pytest.approx(expected)
    assert "num-examples" not in metrics
    for key in METRIC_KEYS:
        assert isinstance(metrics[key], (int, float)) and not isinstance(metrics[key], bool), key


def test_reply_order_does_not_change_a_bit(base):
    states = round_states(base)
    a1, m1 = Mars().aggregate_train(1, replies_for(states))
    shuffled = replies_for(states)
    random.Random(5).shuffle(shuffled)
    a2, m2 = Mars().aggregate_train(1, (r for r in shuffled))  # any iterable, here a generator
    assert a1.object_id == a2.object_id
    assert m1["mars-num-rejected"] == m2["mars-num-rejected"]


def test_same_as_fedavg_when_nobody_is_rejected(base):
    states = round_states(base, attackers=())
    ours, ours_m = Mars().aggregate_train(1, replies_for(states))
    theirs, theirs_m = FedAvg().aggregate_train(1, replies_for(states))
    got, want = decode(ours), decode(theirs)
    for k in got:
        if got[k].dtype.kind == "f":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        else:  # Flower's own mean turns int buffers into floats (7 -> 6.999...); ours keeps ints
            assert got[k].dtype == np.int64 and int(got[k]) == 7
            assert want[k].dtype.kind == "f"
    assert ours_m["train_loss"] == pytest.approx(theirs_m["train_loss"])


def test_server_lr_uses_the_global_model(base):
    states = round_states(base)
    strategy = Mars(server_lr=0.5)
    assert strategy.use_global
    with pytest.raises(ValueError, match="global model"):
        strategy.aggregate_train(1, replies_for(states))
    strategy.set_global_arrays(state_to_arrayrecord(base))
    arrays, _ = strategy.aggregate_train(1, replies_for(states))
    ordered, weights = sorted_like_strategy(strategy, states)
    want, _ = mn.MARS().aggregate(ordered, weights=weights, global_state=base, server_lr=0.5)
    got = decode(arrays)
    for k in base:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_invalid_server_lr():
    with pytest.raises(ValueError, match="server_lr"):
        Mars(server_lr=0.0)


# --------------------------------------------------------------------------- bad replies
def _bad_replies(base):
    """(reply, expected reason code) for every kind of malformed reply."""
    out = []
    out.append((error_reply(node(50)), "reply_error"))
    missing = perturb(base, 51)
    del missing["conv2.weight"]
    out.append((reply(missing, node(51)), "missing_keys"))
    extra = perturb(base, 52)
    extra["spare.weight"] = np.zeros(3, np.float32)
    out.append((reply(extra, node(52)), "extra_keys"))
    shape = perturb(base, 53)
    shape["fc.weight"] = np.zeros((10, 64), np.float32)
    out.append((reply(shape, node(53)), "shape_mismatch"))
    nan = perturb(base, 54)
    nan["conv1.weight"][0, 0, 0, 0] = np.nan
    out.append((reply(nan, node(54)), "non_finite"))
    inf = perturb(base, 55)
    inf["bn2.running_var"][4] = np.inf
    out.append((reply(inf, node(55)), "non_finite"))
    no_arrays = RecordDict({"metrics": MetricRecord({"num-examples": 10})})
    out.append((Message(content=no_arrays, metadata=meta(node(56))), "missing_arrays"))
    two = RecordDict(
        {
            "arrays": state_to_arrayrecord(perturb(base, 57)),
            "more": state_to_arrayrecord(perturb(base, 58)),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    out.append((Message(content=two, metadata=meta(node(57))), "multiple_arrays"))
    no_weight = RecordDict(
        {"arrays": state_to_arrayrecord(perturb(base, 59)), "metrics": MetricRecord({"loss": 1.0})}
    )
    out.append((Message(content=no_weight, metadata=meta(node(59))), "missing_weight"))
    no_metrics = RecordDict({"arrays": state_to_arrayrecord(perturb(base, 60))})
    out.append((Message(content=no_metrics, metadata=meta(node(60))), "missing_weight"))
    out.append((reply(perturb(base, 61), node(61), n=0), "bad_weight"))
    list_weight = RecordDict(
        {
            "arrays": state_to_arrayrecord(perturb(base, 62)),
            "metrics": MetricRecord({"num-examples": [1, 2]}),
        }
    )
    out.append((Message(content=list_weight, metadata=meta(node(62))), "bad_weight"))
    dtype = perturb(base, 63)
    dtype["fc.bias"] = dtype["fc.bias"].astype(np.float64)
    out.append((reply(dtype, node(63)), "dtype_mismatch"))
    empty = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 3})})
    out.append((Message(content=empty, metadata=meta(node(64))), "missing_keys"))
    return out


@pytest.mark.parametrize("global_known", [False, True], ids=["majority-layout", "global-layout"])
def test_bad_replies_are_rejected_with_reasons_and_the_round_goes_on(base, global_known, caplog):
    states = round_states(base)
    bad = _bad_replies(base)
    strategy = Mars()
    if global_known:
        strategy.set_global_arrays(state_to_arrayrecord(base))
    replies = replies_for(states) + [r for r, _ in bad]
    random.Random(0).shuffle(replies)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(3, replies)
    rec = strategy.history[-1]
    got = rec.rejections
    for msg, code in bad:
        nid = msg.metadata.src_node_id
        assert got[nid].split(":", 1)[0] == code, (nid, got[nid])
    for i in ATTACKERS:
        assert got[node(i)].startswith("high_energy_cluster:")
    assert set(got) == {m.metadata.src_node_id for m, _ in bad} | {node(i) for i in ATTACKERS}
    assert metrics["mars-num-replies"] == len(replies)
    assert metrics["mars-num-accepted"] == N_BENIGN - len(ATTACKERS)
    assert metrics["mars-num-invalid"] == len(bad)
    # The aggregate is MARS's own aggregate of the well-formed replies alone.
    clean = Mars()
    clean_arrays, _ = clean.aggregate_train(3, replies_for(states))
    assert arrays.object_id == clean_arrays.object_id
    # Every rejection is logged with its node id and reason.
    text = caplog.text
    for nid, reason in got.items():
        assert f"rejected node {nid}: {reason}" in text


def test_every_reply_rejected_keeps_the_global_model(base, caplog):
    bad = [r for r, _ in _bad_replies(base)]
    strategy = Mars()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(2, bad)
    assert arrays is None
    assert metrics is not None
    assert metrics["mars-num-accepted"] == 0
    assert metrics["mars-num-rejected"] == len(bad)
    assert np.isnan(metrics["mars-center-distance"])
    assert "global model is kept" in caplog.text
    assert Mars().aggregate_train(1, []) == (None, None)


def test_evaluate_skips_malformed_replies(base):
    def eval_reply(node_id, metrics):
        return Message(
            content=RecordDict({"metrics": MetricRecord(metrics)}), metadata=meta(node_id)
        )

    replies = [
        eval_reply(1, {"loss": 1.0, "num-examples": 10}),
        eval_reply(2, {"loss": 4.0, "num-examples": 30}),
        eval_reply(3, {"loss": 9.0}),  # no weight: FedAvg would abort the run
        error_reply(4),
    ]
    metrics = Mars().aggregate_evaluate(1, replies)
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 4.0) / 40)
    assert Mars().aggregate_evaluate(1, [eval_reply(3, {"loss": 9.0})]) is None


# --------------------------------------------------------------------------- reports
def test_jsonl_report_one_line_per_round(base, tmp_path):
    path = tmp_path / "reports" / "mars.jsonl"
    strategy = Mars(report_path=path)
    states = round_states(base)
    strategy.aggregate_train(1, replies_for(states))
    strategy.aggregate_train(2, replies_for(states) + [error_reply(node(70))])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line, rec in zip(lines, strategy.history):
        assert line["node_ids"] == rec.node_ids
        assert line["accepted"] == rec.accepted
        assert line["reasons"] == rec.reasons
        assert line["report"]["n_clients"] == line["report_rows"] == len(states)
        assert line["report"]["accepted"] == rec.accepted[: line["report_rows"]]
        rejected = {n for n, ok in zip(line["node_ids"], line["accepted"]) if not ok}
        assert {node(i) for i in ATTACKERS} <= rejected
        assert line["metrics"]["mars-num-rejected"] == len(rejected)
    assert lines[1]["reasons"][-1] == "reply_error: 3 client crashed"
    assert lines[0]["client_metrics"][0]["num-examples"] in [examples(i) for i in range(8)]


def test_summary_logs_the_mars_settings(caplog):
    with caplog.at_level(logging.INFO, logger="flwr"):
        Mars(kappa=0.1, selection="majority").summary()
    assert "kappa 0.1" in caplog.text and "selection majority" in caplog.text


# --------------------------------------------------------------------------- legacy API
class Proxy(ClientProxy):
    """A concrete legacy ClientProxy (the abstract methods are never called here)."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError


def fit_res(state, n, loss=1.0, code=Code.OK):
    return FitRes(
        status=Status(code=code, message="ok" if code == Code.OK else "boom"),
        parameters=ndarrays_to_parameters(list(state.values())),
        num_examples=n,
        metrics={"train_loss": loss},
    )


@pytest.mark.skipif(MarsLegacy is None, reason="this Flower has no flwr.server.strategy")
def test_legacy_adapter_gives_the_same_result(base):
    states = round_states(base)
    names = list(base)
    msg_strategy = Mars()
    arrays, _ = msg_strategy.aggregate_train(1, replies_for(states))

    def weighted_loss(pairs):
        total = sum(n for n, _ in pairs)
        return {"train_loss": sum(n * m["train_loss"] for n, m in pairs) / total}

    legacy = MarsLegacy(param_names=names, fit_metrics_aggregation_fn=weighted_loss)
    results = [(Proxy(node(i)), fit_res(s, examples(i))) for i, s in enumerate(states)]
    random.Random(1).shuffle(results)
    failures = [
        RuntimeError("lost connection"),
        (Proxy(node(40)), fit_res(states[0], 5, code=Code.FIT_NOT_IMPLEMENTED)),
    ]
    params, legacy_metrics = legacy.aggregate_fit(1, results, failures)
    got = dict(zip(names, parameters_to_ndarrays(params)))
    want = decode(arrays)
    for k in names:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    rec = legacy.history[-1]
    assert sorted(n for n in rec.rejected_node_ids if isinstance(n, int) and n < 1040) == [
        node(i) for i in ATTACKERS
    ]
    assert rec.rejections[node(40)].startswith("reply_error: FIT_NOT_IMPLEMENTED")
    assert rec.rejections["failure-0"] == "reply_error: RuntimeError lost connection"
    assert legacy_metrics["mars-num-rejected"] == len(ATTACKERS) + 2
    assert legacy_metrics["train_loss"] == pytest.approx(1.0)
    assert legacy.last_detection is rec.detection


@pytest.mark.skipif(MarsLegacy is None, reason="this Flower has no flwr.server.strategy")
def test_legacy_without_names_and_with_a_bad_client(base):
    states = round_states(base)
    legacy = MarsLegacy()  # arrays named "0", "1", ...: pairing falls back to their order
    results = [(Proxy(node(i)), fit_res(s, examples(i))) for i, s in enumerate(states)]
    short = list(perturb(base, 99).values())[:-1]
    bad = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(short), 10, {})
    results.append((Proxy(node(41)), bad))
    results.append((Proxy(node(42)), fit_res(perturb(base, 98), 0)))
    params, _ = legacy.aggregate_fit(1, results, [])
    assert params is not None
    rec = legacy.history[-1]
    assert sorted(rec.rejected_node_ids) == sorted(
        [node(i) for i in ATTACKERS] + [node(41), node(42)]
    )
    assert rec.rejections[node(41)].startswith("missing_keys")
    assert rec.rejections[node(42)].startswith("bad_weight")
    assert isinstance(params, Parameters)
    strict = MarsLegacy(accept_failures=False)
    assert strict.aggregate_fit(1, results, [RuntimeError("x")]) == (None, {})
    assert legacy.aggregate_fit(1, [], []) == (None, {})


def test_array_decoding_rejects_other_serializations(base):
    state = perturb(base, 3)
    record = state_to_arrayrecord(state)
    record["fc.bias"] = Array(dtype="float32", shape=(10,), stype="torch.raw", data=b"\x00" * 40)
    msg = Message(
        content=RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 4})}),
        metadata=meta(77),
    )
    strategy = Mars()
    strategy.aggregate_train(1, replies_for(round_states(base, attackers=())) + [msg])
    assert strategy.history[-1].rejections[77].startswith("invalid_array: 'fc.bias'")


def test_inferred_legacy_names_pair_every_conv_with_its_bn(base):
    from mars_native.flower.legacy import infer_param_names

    arrays = list(base.values())
    names = infer_param_names(arrays)
    assert len(set(names)) == len(names)
    assert names[:7] == [
        "m0.conv.weight",
        "m0.conv.bias",
        "m0.bn.weight",
        "m0.bn.bias",
        "m0.bn.running_mean",
        "m0.bn.running_var",
        "m0.bn.num_batches_tracked",
    ]
    layers = mn.find_layers(dict(zip(names, arrays)))
    assert [(layer.weight_key, layer.bn_prefix) for layer in layers] == [
        ("m0.conv.weight", "m0.bn"),
        ("m1.conv.weight", "m1.bn"),
    ]
    # The energies match those computed with the real names.
    named = mn.concentrated_backdoor_energy(base)
    inferred = mn.concentrated_backdoor_energy(dict(zip(names, arrays)))
    np.testing.assert_allclose(inferred, named)
