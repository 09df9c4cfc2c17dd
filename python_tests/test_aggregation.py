"""MARS.aggregate (batch) and MARS.round (streaming): the aggregate is exactly the weighted mean
of the accepted, valid clients; bad clients are rejected with a reason and never reach it.

Tolerances: the batch path and the NumPy twin differ only by FMA rounding (float64 ulps), which
can flip the final float32 rounding by one ulp; the streaming path adds then subtracts rejected
clients in float64, which costs at most a few float64 ulps more. Hence float32 outputs are
compared with rtol 2.5e-7 (two float32 ulps) plus an absolute 1e-12 of the data's scale.
"""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mars_native import reference
from mars_native.aggregation import CANCELLATION_RATIO, weighted_mean
from mars_native.defense import MARS

KEYS_SCORED = ("conv1.weight", "conv2.weight")


# ---------------------------------------------------------------------------------- models
def make_model(seed: int = 0, widths: tuple[int, int] = (8, 16)) -> OrderedDict:
    """A small conv/BN/conv/BN/fc model as NumPy arrays (float32, int64 num_batches_tracked)."""
    rng = np.random.default_rng(seed)
    a, b = widths
    f32 = np.float32
    s: OrderedDict = OrderedDict()
    s["conv1.weight"] = (rng.standard_normal((a, 3, 3, 3)) * 0.2).astype(f32)
    for name, n in (("bn1", a), ("bn2", b)):
        if name == "bn2":
            s["conv2.weight"] = (rng.standard_normal((b, a, 3, 3)) * 0.1).astype(f32)
        s[f"{name}.weight"] = (1 + 0.1 * rng.standard_normal(n)).astype(f32)
        s[f"{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(f32)
        s[f"{name}.running_mean"] = (0.1 * rng.standard_normal(n)).astype(f32)
        s[f"{name}.running_var"] = (1 + 0.2 * rng.random(n)).astype(f32)
        s[f"{name}.num_batches_tracked"] = np.array(100, dtype=np.int64)
    s["fc.weight"] = (rng.standard_normal((10, b)) * 0.1).astype(f32)
    s["fc.bias"] = np.zeros(10, f32)
    s["temperature"] = np.array(1.5, f32)  # a 0-d float parameter
    return s


def make_clients(base: OrderedDict, n_benign: int, n_attack: int, seed: int = 0,
                 boost: float = 3.0) -> tuple[list[OrderedDict], np.ndarray]:
    """Benign = base + small noise (and a few more batches); attackers also amplify the 3
    highest-norm channels of each scored conv (what a backdoor does to the backdoor energy)."""
    rng = np.random.default_rng(seed)
    states, attacker = [], []
    for i in range(n_benign + n_attack):
        s = OrderedDict()
        for k, v in base.items():
            if v.dtype.kind == "f" and not k.endswith("running_var"):
                s[k] = np.asarray(v + 3e-3 * np.abs(v).mean() * rng.standard_normal(v.shape),
                                  dtype=v.dtype)
            elif v.dtype.kind == "i":
                s[k] = np.asarray(v + rng.integers(0, 50), dtype=v.dtype)
            else:
                s[k] = v.copy()
        if i >= n_benign:
            for key in KEYS_SCORED:
                w = s[key]
                top = np.argsort(np.linalg.norm(w.reshape(w.shape[0], -1), axis=1))[::-1][:3]
                w[top] *= boost
        states.append(s)
        attacker.append(i >= n_benign)
    order = np.random.default_rng(seed + 1).permutation(len(states))
    return [states[i] for i in order], np.asarray(attacker)[order]


def expected_state(states, accepted, weights, global_state=None, server_lr=1.0) -> dict:
    """The aggregate from the NumPy twin over the accepted clients only."""
    idx = [i for i in np.flatnonzero(accepted) if weights[i] > 0]
    model = global_state if global_state is not None else states[idx[0]]
    out = {}
    for key, v in model.items():
        v = np.asarray(v)
        if v.dtype.kind == "f":
            base = None if global_state is None else np.asarray(global_state[key])
            out[key] = reference.aggregate([np.asarray(states[i][key]) for i in idx],
                                           np.asarray(weights)[idx], v.dtype, base, server_lr)
        elif global_state is not None:
            out[key] = v
        else:
            out[key] = np.max(np.stack([np.asarray(states[i][key]) for i in idx]), axis=0)
    return out


def _np(x):
    return x.detach().float().numpy() if hasattr(x, "detach") else np.asarray(x)


def assert_state_close(got, expected) -> None:
    assert list(got) == list(expected)
    for key in expected:
        g, e = _np(got[key]), _np(expected[key])
        assert g.shape == e.shape, key
        if e.dtype.kind == "f":
            scale = float(np.max(np.abs(e))) if e.size else 0.0
            np.testing.assert_allclose(g, e, rtol=2.5e-7, atol=1e-12 * scale + 1e-30, err_msg=key)
        else:
            np.testing.assert_array_equal(g, e, err_msg=key)


@pytest.fixture(scope="module")
def base():
    return make_model(0)


@pytest.fixture(scope="module")
def round_with_attackers(base):
    return make_clients(base, 7, 3, seed=3)


# ---------------------------------------------------------------------------------- batch
def test_batch_aggregate_is_the_weighted_mean_of_accepted_clients(round_with_attackers):
    states, attacker = round_with_attackers
    weights = np.arange(1, len(states) + 1) * 10.0
    new, report = MARS().aggregate(states, weights=weights)
    np.testing.assert_array_equal(report.accepted, ~attacker)
    assert report.aggregated and report.note is None
    assert type(new) is OrderedDict
    assert_state_close(new, expected_state(states, report.accepted, weights))
    for key, v in new.items():
        assert isinstance(v, np.ndarray) and v.dtype == states[0][key].dtype, key
    # integers are never averaged: max over the accepted clients (no global model)
    accepted = [states[i] for i in np.flatnonzero(report.accepted)]
    assert new["bn1.num_batches_tracked"] == max(int(s["bn1.num_batches_tracked"]) for s in accepted)


def test_numpy_arrays_the_kernel_cannot_read_in_place_are_converted(round_with_attackers):
    """NumPy float arrays go straight to the kernel; float16, strided and big-endian ones (which
    it refuses) are converted first, with the same result."""
    states, _ = round_with_attackers
    odd = []
    for s in states:
        t = OrderedDict(s)
        t["fc.bias"] = s["fc.bias"].astype(np.float16)
        w = s["fc.weight"]
        t["fc.weight"] = np.empty((w.shape[1], w.shape[0]), w.dtype).T  # a strided (F-order) view
        t["fc.weight"][...] = w
        t["bn1.bias"] = s["bn1.bias"].astype(">f4")
        odd.append(t)
    new, report = MARS().aggregate(odd)
    plain = [OrderedDict((k, np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("="))) for k, v in t.items())
             for t in odd]
    want, want_report = MARS().aggregate(plain)
    np.testing.assert_array_equal(report.accepted, want_report.accepted)
    for key in want:
        assert new[key].dtype == odd[0][key].dtype, key  # dtypes (and byte order) are kept
        np.testing.assert_array_equal(new[key].astype(np.float64), want[key].astype(np.float64))


def test_global_model_and_server_lr(base, round_with_attackers):
    states, attacker = round_with_attackers
    new, report = MARS().aggregate(states, global_state=base, server_lr=0.8)
    np.testing.assert_array_equal(report.accepted, ~attacker)
    expected = expected_state(states, report.accepted, np.ones(len(states)), base, 0.8)
    assert_state_close(new, expected)
    # the same as global + lr * mean(accepted - global), up to rounding
    idx = np.flatnonzero(report.accepted)
    delta = np.mean([states[i]["fc.weight"].astype(np.float64) - base["fc.weight"] for i in idx], axis=0)
    np.testing.assert_allclose(new["fc.weight"], base["fc.weight"] + 0.8 * delta, rtol=1e-6, atol=1e-9)
    assert new["bn2.num_batches_tracked"] == base["bn2.num_batches_tracked"]  # from the global model


def test_torch_in_torch_out_with_dtypes_order_and_metadata(base):
    torch = pytest.importorskip("torch")
    states, _ = make_clients(base, 5, 0, seed=5)
    tstates = []
    for s in states:
        t = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in s.items())
        t["fc.weight"] = t["fc.weight"].to(torch.bfloat16)
        t["fc.bias"] = t["fc.bias"].to(torch.float16)
        t["bn1.running_mean"] = t["bn1.running_mean"].double()
        t._metadata = OrderedDict([("", {"version": 1}), ("bn1", {"version": 2})])
        tstates.append(t)
    new, report = MARS().aggregate(tstates)
    assert report.accepted.all()
    assert isinstance(new, OrderedDict) and new._metadata == tstates[0]._metadata
    assert list(new) == list(tstates[0])
    for key, v in new.items():
        assert isinstance(v, torch.Tensor) and v.dtype == tstates[0][key].dtype, key
        assert v.device.type == "cpu"
    expected = torch.stack([t["bn1.running_mean"] for t in tstates]).mean(0)
    torch.testing.assert_close(new["bn1.running_mean"], expected, rtol=1e-14, atol=0)
    expected = torch.stack([t["fc.weight"].float() for t in tstates]).mean(0).to(torch.bfloat16)
    torch.testing.assert_close(new["fc.weight"], expected, rtol=0.01, atol=0)


def test_mixed_containers_follow_the_template(base):
    torch = pytest.importorskip("torch")
    states, _ = make_clients(base, 4, 0, seed=6)
    mixed = [OrderedDict((k, torch.from_numpy(v)) for k, v in states[0].items())] + states[1:]
    new, _ = MARS().aggregate(mixed)
    assert all(isinstance(v, torch.Tensor) for v in new.values())
    new_np, _ = MARS().aggregate(mixed, global_state=base)
    assert all(isinstance(v, np.ndarray) for v in new_np.values())


@pytest.mark.parametrize("streaming", [False, True])
def test_every_client_rejected_keeps_the_global_model(base, streaming):
    bad = [{"conv1.weight": np.full((8, 3, 3, 3), np.nan, np.float32)}, "not a state", None]

    def run(global_state):
        mars = MARS()
        if not streaming:
            return mars.aggregate(bad, global_state=global_state)
        rnd = mars.round(global_state=global_state)
        for s in bad:
            rnd.add(s)
        return rnd.finish()

    new, report = run(base)
    assert not report.accepted.any() and report.aggregated is False
    assert "nothing to aggregate: every client was rejected" in report.note
    assert "global model is kept unchanged" in report.note
    assert_state_close(new, base)
    assert new["conv1.weight"] is not base["conv1.weight"]  # a copy: the caller may modify it
    new, report = run(None)
    assert new is None and report.aggregated is False
    assert "no new state (None) is returned" in report.note
    assert report.to_dict()["aggregated"] is False


@pytest.mark.parametrize("streaming", [False, True])
def test_zero_total_weight_keeps_the_global_model(base, round_with_attackers, streaming):
    states, attacker = round_with_attackers
    weights = np.where(attacker, 5.0, 0.0)  # only the (rejected) attackers carry weight
    mars = MARS()
    if streaming:
        rnd = mars.round(global_state=base)
        for s, w in zip(states, weights):
            rnd.add(s, w)
        new, report = rnd.finish()
    else:
        new, report = mars.aggregate(states, weights=weights, global_state=base)
    assert report.accepted.any() and not report.aggregated
    assert "weights sum to 0" in report.note
    assert_state_close(new, base)
    for v in new.values():
        assert np.all(np.isfinite(v.astype(np.float64)))


def test_zero_weight_clients_are_scored_but_do_not_contribute(round_with_attackers):
    states, _ = round_with_attackers
    weights = np.ones(len(states))
    weights[0] = 0.0
    new, report = MARS().aggregate(states, weights=weights)
    assert_state_close(new, expected_state(states, report.accepted, weights))
    assert np.isfinite(report.cbe[0]).all()


def test_call_errors(base, round_with_attackers):
    states, _ = round_with_attackers
    mars = MARS()
    with pytest.raises(ValueError, match="one entry per client: 10 clients but weights of shape"):
        mars.aggregate(states, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        mars.aggregate(states, weights=[1.0] * 9 + [-1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        mars.aggregate(states, weights=[1.0] * 9 + [np.inf])
    with pytest.raises(ValueError, match="server_lr must be finite"):
        mars.aggregate(states, server_lr=np.nan)
    with pytest.raises(TypeError, match="single state_dict"):
        mars.aggregate(states[0])
    with pytest.raises(ValueError, match="at least one client"):
        mars.aggregate([])
    broken = OrderedDict(base)
    broken["fc.bias"] = np.full(10, np.nan, np.float32)
    with pytest.raises(ValueError, match="global_state is unusable: non_finite: 'fc.bias'"):
        mars.aggregate(states, global_state=broken)
    with pytest.raises(ValueError, match="global_state is unusable"):
        mars.round(global_state=broken)


# ---------------------------------------------------------------------------------- bad clients
CORRUPTIONS = ("nan", "inf", "missing", "extra", "shape", "dtype", "int_dtype", "not_mapping",
               "bad_value", "int_key")
EXPECTED_CODE = {"nan": "non_finite", "inf": "non_finite", "missing": "missing_keys",
                 "extra": "extra_keys", "shape": "shape_mismatch", "dtype": "dtype_mismatch",
                 "int_dtype": "dtype_mismatch", "not_mapping": "invalid_type",
                 "bad_value": "invalid_type", "int_key": "extra_keys"}


def corrupt(state: OrderedDict, kind: str, key_index: int, pos: int):
    keys = list(state)
    key = keys[key_index % len(keys)]
    float_keys = [k for k in keys if state[k].dtype.kind == "f"]
    fkey = float_keys[key_index % len(float_keys)]
    s = OrderedDict((k, v.copy()) for k, v in state.items())
    if kind in ("nan", "inf"):
        flat = s[fkey].reshape(-1)
        flat[pos % flat.size] = np.nan if kind == "nan" else -np.inf
    elif kind == "missing":
        del s[key]
    elif kind == "extra":
        s["extra.weight"] = np.zeros(3, np.float32)
    elif kind == "shape":
        s[key] = np.zeros(s[key].shape + (2,), s[key].dtype)
    elif kind == "dtype":
        s[fkey] = s[fkey].astype(np.float64)
    elif kind == "int_dtype":
        s["bn1.num_batches_tracked"] = s["bn1.num_batches_tracked"].astype(np.int32)
    elif kind == "not_mapping":
        return [s[k] for k in s] if pos % 2 else None
    elif kind == "bad_value":
        s[key] = "weights"
    elif kind == "int_key":
        s[7] = np.zeros(3, np.float32)
    return s


@st.composite
def bad_rounds(draw):
    # clean clients are the strict majority, so that their layout is the template without a
    # global model (MARS.detect's rule); anywhere in the round
    n_clean = draw(st.integers(1, 4))
    n_bad = draw(st.integers(0, n_clean))
    kinds = [None] * n_clean + [draw(st.sampled_from(CORRUPTIONS)) for _ in range(n_bad)]
    if n_bad == n_clean:  # one more clean client keeps the majority strict
        kinds.append(None)
    kinds = draw(st.permutations(kinds))
    n = len(kinds)
    corruption = [(k, draw(st.integers(0, 30)), draw(st.integers(0, 10_000))) for k in kinds]
    weights = draw(st.lists(st.sampled_from([0.5, 1.0, 3.0, 17.0]), min_size=n, max_size=n))
    with_global = draw(st.booleans())
    lr = draw(st.sampled_from([1.0, 0.5, 2.0]))
    return corruption, weights, with_global, lr


@given(bad_rounds())
def test_bad_clients_are_rejected_and_never_reach_the_aggregate(base, case):
    corruption, weights, with_global, lr = case
    clients, _ = make_clients(base, len(corruption), 0, seed=len(corruption))
    states = [s if kind is None else corrupt(s, kind, ki, pos)
              for s, (kind, ki, pos) in zip(clients, corruption)]
    global_state = base if with_global else None
    mars = MARS()
    new, report = mars.aggregate(states, weights=weights, global_state=global_state, server_lr=lr)
    for i, (kind, _, _) in enumerate(corruption):
        if kind is None:
            assert report.labels[i] >= 0, report.reasons[i]
        else:
            assert not report.accepted[i] and report.labels[i] == -1
            assert report.reason_codes[i] == EXPECTED_CODE[kind], report.reasons[i]
    assert report.accepted.any()
    expected = expected_state(states, report.accepted, weights, global_state, lr)
    assert_state_close(new, expected)
    # streaming, with loaders (no reference kept), gives the same aggregate and decisions
    rnd = mars.round(global_state=global_state, server_lr=lr)
    for s, w in zip(states, weights):
        rnd.add(None, w, loader=lambda s=s: s)
    new_s, report_s = rnd.finish()
    np.testing.assert_array_equal(report_s.accepted, report.accepted)
    assert report_s.reasons == report.reasons
    assert_state_close(new_s, expected)


@pytest.mark.parametrize("n_odd", [1, 2])
def test_majority_layout_is_the_template_without_a_global_model(base, n_odd):
    clients, _ = make_clients(base, 5, 0, seed=9)
    # malformed but valid on their own, and first: they lead the stream until overtaken
    odd = [corrupt(c, "extra", 0, 0) for c in clients[:n_odd]]
    states = [*odd, *clients[n_odd:]]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    new, report = MARS().aggregate(states, weights=weights)
    assert report.reason_codes == ["extra_keys"] * n_odd + [None] * (5 - n_odd)
    assert list(new) == list(clients[n_odd])
    assert_state_close(new, expected_state(states, report.accepted, weights))
    for loaders in (True, False):  # the streaming round follows the majority too
        stream, report_s = _stream(MARS(), states, weights, loaders=loaders)
        assert report_s.reasons == report.reasons
        np.testing.assert_array_equal(report_s.cbe, report.cbe)
        assert_state_close(stream, new)


def test_streaming_layout_rebuild_needs_the_clients_again(base):
    clients, _ = make_clients(base, 3, 0, seed=10)
    odd = corrupt(clients[0], "extra", 0, 0)
    rnd = MARS().round()
    rnd.add(odd, loader=lambda: odd)

    def gone():
        raise OSError("deleted")

    rnd.add(clients[1], loader=gone)  # a tie: the earliest layout still leads
    with pytest.raises(RuntimeError, match=r"client 1 could not be re-read \(OSError: deleted\)"):
        rnd.add(clients[2], loader=lambda: clients[2])  # the clean layout takes the lead


def test_model_without_scorable_layer_is_rejected():
    rng = np.random.default_rng(0)
    mlp = [{"fc.weight": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(3)]
    new, report = MARS().aggregate(mlp)
    assert report.reason_codes == ["no_scorable_layer"] * 3
    assert new is None and not report.aggregated


# ---------------------------------------------------------------------------------- streaming
def _stream(mars, states, weights=None, global_state=None, loaders=True, **kw):
    rnd = mars.round(global_state=global_state, **kw)
    for i, s in enumerate(states):
        w = 1.0 if weights is None else weights[i]
        rnd.add(s, w, loader=(lambda s=s: s) if loaders else None, name=f"c{i}")
    return rnd.finish()


@pytest.mark.parametrize("loaders", [True, False])
@pytest.mark.parametrize("with_global", [True, False])
def test_streaming_equals_batch(base, round_with_attackers, loaders, with_global):
    states, attacker = round_with_attackers
    weights = [float(w) for w in np.random.default_rng(2).integers(1, 100, len(states))]
    g = base if with_global else None
    batch, report_b = MARS().aggregate(states, weights=weights, global_state=g, server_lr=0.7)
    stream, report_s = _stream(MARS(), states, weights, g, loaders, server_lr=0.7)
    np.testing.assert_array_equal(report_s.accepted, ~attacker)
    assert report_s.reasons == report_b.reasons
    np.testing.assert_array_equal(report_s.labels, report_b.labels)
    np.testing.assert_array_equal(report_s.cbe, report_b.cbe)
    assert report_s.layers == report_b.layers
    assert report_s.note is None  # subtraction was safe: no re-sum
    for key in batch:
        a, b = batch[key], stream[key]
        assert a.dtype == b.dtype
        if a.dtype.kind == "f":
            np.testing.assert_array_max_ulp(a, b, maxulp=1)
        else:
            np.testing.assert_array_equal(a, b)


class _State(OrderedDict):
    """An OrderedDict that can be weak-referenced (to see whether the round keeps it)."""


def test_round_with_loaders_keeps_no_reference(base):
    states, _ = make_clients(base, 4, 1, seed=4)
    rnd = MARS().round()
    refs = []
    for s in states:
        held = _State(s)
        refs.append(weakref.ref(held))
        rnd.add(held, loader=lambda s=s: _State(s))
        del held
    gc.collect()
    assert all(r() is None for r in refs)
    rnd2 = MARS().round()
    held = _State(states[0])
    rnd2.add(held)  # without a loader the round must keep the state to be able to remove it
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is not None
    rnd2.finish()
    gc.collect()
    assert ref() is None  # released by finish()


def test_rejected_client_that_changed_is_detected_and_resummed(round_with_attackers):
    states, attacker = round_with_attackers
    batch, _ = MARS().aggregate(states)
    rnd = MARS().round()
    for s, is_attacker in zip(states, attacker):
        def loader(s=s, changed=is_attacker):
            if not changed:
                return s
            t = OrderedDict(s)
            t["fc.bias"] = s["fc.bias"] + 1.0  # the re-read differs from what was added
            return t
        rnd.add(s, loader=loader)
    new, report = rnd.finish()
    assert "changed between add() and finish()" in report.note
    assert "re-summed from the accepted clients" in report.note
    assert_state_close(new, batch)


def test_rejected_client_whose_loader_fails_is_resummed(round_with_attackers):
    states, attacker = round_with_attackers
    batch, _ = MARS().aggregate(states)
    rnd = MARS().round()
    for s, is_attacker in zip(states, attacker):
        def loader(s=s, fail=is_attacker):
            if fail:
                raise OSError("upload deleted")
            return s
        rnd.add(s, loader=loader)
    new, report = rnd.finish()
    assert "could not be re-read to be removed (OSError: upload deleted)" in report.note
    assert_state_close(new, batch)


def test_accepted_client_that_changed_makes_finish_fail(round_with_attackers):
    states, attacker = round_with_attackers
    rnd = MARS().round()
    first_benign = int(np.flatnonzero(~attacker)[0])
    for i, s in enumerate(states):
        def loader(s=s, i=i):
            if i == first_benign:
                return {k: v + 1 for k, v in s.items()}
            if attacker[i]:
                raise OSError("gone")  # forces a re-sum from the accepted clients
            return s
        rnd.add(s, loader=loader)
    with pytest.raises(RuntimeError, match=rf"client {first_benign} \(accepted\) changed"):
        rnd.finish()


def test_huge_rejected_client_is_resummed_not_subtracted(base):
    states, attacker = make_clients(base, 6, 1, seed=11)
    bomb = int(np.flatnonzero(attacker)[0])
    states[bomb]["fc.weight"] = states[bomb]["fc.weight"] * np.float32(1e30)  # finite, huge
    batch, report_b = MARS().aggregate(states)
    assert not report_b.accepted[bomb]
    stream, report = _stream(MARS(), states)
    assert f"exceeded {CANCELLATION_RATIO:g}x the accepted clients' magnitude" in report.note
    assert_state_close(stream, batch)
    # subtracting it naively would have destroyed the small accepted values
    acc = np.zeros(states[0]["fc.weight"].size)
    for s in states:
        acc += s["fc.weight"].reshape(-1)
    acc -= states[bomb]["fc.weight"].reshape(-1)
    naive = acc / (len(states) - 1)
    assert not np.allclose(naive, batch["fc.weight"].reshape(-1), rtol=1e-3)


def test_round_misuse_and_add_rejected(base):
    states, _ = make_clients(base, 3, 0, seed=12)
    rnd = MARS().round()
    with pytest.raises(ValueError, match="no client was added"):
        rnd.finish()
    rnd = MARS().round()
    with pytest.raises(ValueError, match="finite and >= 0"):
        rnd.add(states[0], -1.0)
    with pytest.raises(TypeError, match="weight must be a number"):
        rnd.add(states[0], "1")
    with pytest.raises(TypeError, match="loader must be a zero-argument callable"):
        rnd.add(states[0], loader="file.pt")
    with pytest.raises(ValueError, match="'<code>: <detail>'"):
        rnd.add_rejected("bad")
    assert rnd.add_rejected("invalid_type: cannot read the file: truncated", name="c.pt") == 0
    for s in states:
        rnd.add(s)
    assert rnd.n_clients == 4
    new, report = rnd.finish()
    assert report.reasons[0] == "invalid_type: cannot read the file: truncated"
    assert report.labels[0] == -1 and report.accepted[1:].all()
    assert_state_close(new, expected_state(states, np.ones(3, bool), np.ones(3)))
    with pytest.raises(RuntimeError, match="already called"):
        rnd.finish()
    with pytest.raises(RuntimeError, match="round is finished"):
        rnd.add(states[0])


@pytest.mark.parametrize("with_global", [False, True])
def test_batch_aggregate_is_weighted_mean_per_key_bit_for_bit(base, round_with_attackers, with_global):
    """Every float key of the batch aggregate (one native call for the whole model) is the
    weighted_mean of that key, bit for bit, for NumPy and torch clients alike."""
    torch = pytest.importorskip("torch")
    states, _ = round_with_attackers
    w = np.arange(1, len(states) + 1) * 1.5
    gs = base if with_global else None
    new, report = MARS().aggregate(states, weights=w, global_state=gs, server_lr=0.7)
    idx = np.flatnonzero(report.accepted)
    for key, v in new.items():
        if v.dtype.kind != "f":
            continue
        want = weighted_mean([states[i][key] for i in idx], w[idx], v.dtype,
                             base=None if gs is None else gs[key], server_lr=0.7)
        assert v.tobytes() == want.tobytes(), key
    tstates = [OrderedDict((k, torch.from_numpy(v)) for k, v in s.items()) for s in states]
    tglobal = None if gs is None else OrderedDict((k, torch.from_numpy(v)) for k, v in gs.items())
    tnew, treport = MARS().aggregate(tstates, weights=w, global_state=tglobal, server_lr=0.7)
    np.testing.assert_array_equal(treport.accepted, report.accepted)
    for key, v in new.items():
        assert tnew[key].numpy().tobytes() == v.tobytes(), key
