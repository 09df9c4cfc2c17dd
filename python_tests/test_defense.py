"""MARS.detect end to end on real torch models: amplified clients are found, clean rounds kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from _torch_models import ResNet18, SmallCNN, randomize_bn
from torch import nn

import mars_native as mn


def _clients(base: nn.Module, n_benign: int, n_attack: int, seed: int, noise: float = 3e-3,
             boost: float = 3.0, numpy: bool = False) -> tuple[list[dict], np.ndarray]:
    """Benign clients = base + small relative noise; attackers additionally amplify the conv
    weights of their three highest-energy channels per layer (what a backdoor does to BE)."""
    g = torch.Generator().manual_seed(seed)
    base_state = base.state_dict()
    be = mn.backdoor_energy(base_state)
    states, is_attacker = [], []
    for i in range(n_benign + n_attack):
        s = {}
        for k, v in base_state.items():
            if v.dtype.is_floating_point and not k.endswith("running_var"):
                s[k] = v + noise * v.abs().mean() * torch.randn(v.shape, generator=g)
            else:
                s[k] = v.clone()
        attacker = i >= n_benign
        if attacker:
            for layer, values in be.items():
                top = np.argsort(values)[::-1][:3].copy()
                s[f"{layer}.weight"][top] *= boost
        states.append({k: v.numpy() for k, v in s.items()} if numpy else s)
        is_attacker.append(attacker)
    order = np.random.default_rng(seed).permutation(len(states))  # attackers anywhere in the list
    return [states[i] for i in order], np.asarray(is_attacker)[order]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return randomize_bn(SmallCNN(widths=(64, 128, 128)), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_amplified_clients_are_rejected(cnn, mode):
    states, attacker = _clients(cnn, 8, 2, seed=1)
    report = mn.MARS(mode=mode).detect(states)
    np.testing.assert_array_equal(report.accepted, ~attacker)
    assert report.center_distance > 0.03
    for i in np.flatnonzero(attacker):
        assert report.reasons[i].startswith("high_energy_cluster:")
    assert all(report.reasons[i] is None for i in np.flatnonzero(~attacker))


def test_clean_round_is_accepted_whole_by_the_epsilon_rule(cnn):
    states, _ = _clients(cnn, 10, 0, seed=2)
    report = mn.MARS().detect(states)
    assert report.accepted.all() and report.all_benign and report.kept_cluster is None
    assert report.center_distance < 0.03


def test_mars_keeps_low_energy_minority_and_mars_star_keeps_the_majority(cnn):
    states, attacker = _clients(cnn, 3, 7, seed=3)
    mars = mn.MARS(selection="norm").detect(states)
    np.testing.assert_array_equal(mars.accepted, ~attacker)
    star = mn.MARS(selection="majority").detect(states)
    np.testing.assert_array_equal(star.accepted, attacker)  # MARS* trusts the majority
    assert all(r.startswith("minority_cluster:") for r in np.asarray(star.reasons, dtype=object)[~attacker])


def test_resnet18_clients():
    torch.manual_seed(1)
    base = randomize_bn(ResNet18(), torch.Generator().manual_seed(1))
    states, attacker = _clients(base, 4, 2, seed=4)
    report = mn.MARS().detect(states)
    np.testing.assert_array_equal(report.accepted, ~attacker)
    assert report.cbe.shape == (6, 250)  # 4 + 4*4 + 4*7 + 4*13 + 4*26 + (7 + 13 + 26) shortcut convs


def test_numpy_and_torch_and_sorted_keys_give_the_same_report(cnn):
    torch_states, _ = _clients(cnn, 6, 2, seed=5)
    np_states, _ = _clients(cnn, 6, 2, seed=5, numpy=True)
    sorted_states = [dict(sorted(s.items())) for s in np_states]
    a, b, c = (mn.MARS().detect(s) for s in (torch_states, np_states, sorted_states))
    np.testing.assert_array_equal(a.accepted, b.accepted)
    np.testing.assert_array_equal(a.cbe, b.cbe)
    np.testing.assert_array_equal(a.cbe, c.cbe)
    np.testing.assert_array_equal(a.labels, c.labels)


def test_deterministic_for_a_seed(cnn):
    states, _ = _clients(cnn, 7, 3, seed=6)
    a, b = mn.MARS(random_state=3).detect(states), mn.MARS(random_state=3).detect(states)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centers, b.centers)


def test_bad_clients_are_rejected_with_reasons_and_the_round_goes_on(cnn):
    states, attacker = _clients(cnn, 8, 2, seed=7, numpy=True)
    bad = [dict(states[0]) for _ in range(5)]
    bad[0]["bn1.running_mean"] = bad[0]["bn1.running_mean"].copy()
    bad[0]["bn1.running_mean"][3] = np.nan  # not a scored tensor, still rejected
    del bad[1]["conv2.weight"]
    bad[2]["conv1.weight"] = bad[2]["conv1.weight"][:, :, :2, :2].copy()
    bad[3]["fc.bias"] = bad[3]["fc.bias"].astype(np.float64)
    bad[4]["extra"] = np.zeros(2, np.float32)
    report = mn.MARS().detect(states + bad + ["not a state"])
    codes = report.reason_codes[len(states):]
    assert codes == ["non_finite", "missing_keys", "shape_mismatch", "dtype_mismatch", "extra_keys", "invalid_type"]
    assert "bn1.running_mean" in report.reasons[len(states)]
    assert "conv1.weight" in report.reasons[len(states) + 2] and "(64, 3, 2, 2)" in report.reasons[len(states) + 2]
    np.testing.assert_array_equal(report.accepted[: len(states)], ~attacker)
    assert not report.accepted[len(states):].any()
    assert (report.labels[len(states):] == -1).all()
    assert np.isnan(report.cbe[len(states):]).all()


def test_global_state_is_the_template(cnn):
    states, _ = _clients(cnn, 4, 0, seed=8, numpy=True)
    glob = {k: v.copy() for k, v in states[0].items()}
    glob["new.weight"] = np.zeros((2, 2, 1, 1), np.float32)
    report = mn.MARS().detect(states, global_state=glob)
    assert report.reason_codes == ["missing_keys"] * 4


def test_no_scorable_layer_and_int_conv_weight():
    lin = {"fc.weight": np.ones((4, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}
    report = mn.MARS().detect([lin, lin])
    assert report.reason_codes == ["no_scorable_layer"] * 2
    assert mn.MARS(include_linear=True).detect([lin, lin]).accepted.all()
    ints = {"c.weight": np.ones((4, 3, 3, 3), np.int64)}
    assert mn.MARS().detect([ints]).reason_codes == ["invalid_type"]


def test_single_and_no_valid_client():
    s = {"c.weight": np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)}
    one = mn.MARS().detect([s])
    assert one.accepted.tolist() == [True] and "single valid client" in one.note
    nan = {"c.weight": np.full((8, 3, 3, 3), np.nan, np.float32)}
    none = mn.MARS().detect([nan, nan])
    assert not none.accepted.any() and none.note == "no valid client in the round"


def test_call_errors():
    with pytest.raises(ValueError, match="empty"):
        mn.MARS().detect([])
    with pytest.raises(TypeError, match="single state_dict"):
        mn.MARS().detect({"c.weight": np.ones((2, 2, 1, 1))})
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="kappa"):
            mn.MARS(kappa=bad)
    with pytest.raises(ValueError, match="selection"):
        mn.MARS(selection="vote")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        mn.MARS(mode="fast")  # type: ignore[arg-type]


def test_report_is_json_ready(cnn):
    states, _ = _clients(cnn, 5, 2, seed=9)
    d = mn.MARS().detect(states + [{}]).to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["n_clients"] == 8 and back["reason_codes"][-1] == "invalid_type"
    assert back["cbe"][-1][0] is None and "summary" not in back
    assert "cluster" in mn.MARS().detect(states).summary()


def test_device_parameter():
    with pytest.raises(ValueError, match="device"):
        mn.MARS(device="tpu")  # type: ignore[arg-type]
    if not mn.build_info()["cuda_devices"]:
        with pytest.raises(RuntimeError, match="cuda"):
            mn.MARS(device="cuda")
    s = {"c.weight": np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)}
    report = mn.MARS(device="cpu").detect([s, s])
    assert report.accepted.all() and report.params["device"] == "cpu"


def test_misaligned_views():
    # a float64 view at an odd byte offset: copied (aligned) by the bindings, same values
    raw = np.zeros(8 * 17 + 1, np.uint8)
    values = np.arange(17, dtype=np.float64)[::-1].copy()
    raw[1:].view(np.uint8)[:] = values.view(np.uint8)
    misaligned = raw[1:].view(np.float64)
    assert not misaligned.flags.aligned
    np.testing.assert_array_equal(mn.top_k_energy(misaligned, 0.2), mn.top_k_energy(values, 0.2))
    assert mn.wasserstein_1d(misaligned, values) == 0.0


class _FakeGpuState(dict):
    """Stands in for a state_dict of CUDA tensors in the CPU test of detect()'s GPU plumbing."""


class _FakeLib:
    index = 0


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_detect_scores_gpu_clients_in_one_batch_like_one_at_a_time(monkeypatch, cnn, mode):
    """MARS.detect's GPU path, on the CPU: clients of a marker type take the device route, the
    device batch scorer is replaced by the CPU's concentrated_backdoor_energies. The report must
    equal the CPU path's; valid clients that share their layers go to the scorer in one batch; a
    batch that fails falls back to one client at a time with the same CBEs; invalid clients keep
    their own reasons."""
    from mars_native import _cuda, defense

    states, _ = _clients(cnn, 6, 2, seed=5, numpy=True)
    bad = dict(states[3])
    bad.pop(next(iter(bad)))  # a missing key: rejected by the template check
    nan = {k: v.copy() for k, v in states[5].items()}
    key = next(k for k, v in nan.items() if v.ndim == 4)
    nan[key][0, 0, 0, 0] = np.nan
    states = [*states[:3], bad, states[4], nan, *states[6:]]
    expected = mn.MARS(mode=mode).detect(states)

    calls = []

    def batch(group, layers, kappa, mode_, *, bn_eps):
        calls.append(len(group))
        if fail and len(group) > 1:
            raise ValueError("simulated batch failure")
        cbes = mn.concentrated_backdoor_energies([dict(s) for s in group], kappa, mode_, layers=layers,
                                                 bn_eps=bn_eps)
        return cbes if mode_ == "paper" else list(cbes)

    monkeypatch.setattr(defense, "on_device", lambda s: isinstance(s, _FakeGpuState))
    monkeypatch.setattr(_cuda, "library", lambda x, name: _FakeLib())
    monkeypatch.setattr(_cuda, "to_host", np.asarray)
    monkeypatch.setattr(_cuda, "concentrated_backdoor_energy_batch_cuda", batch, raising=False)
    for fail in (False, True):
        calls.clear()
        got = mn.MARS(mode=mode).detect([_FakeGpuState(s) for s in states])
        np.testing.assert_array_equal(got.accepted, expected.accepted)
        assert [r is None for r in got.reasons] == [r is None for r in expected.reasons]
        assert got.reasons[3] == expected.reasons[3]
        assert got.reasons[5].startswith("non_finite") and expected.reasons[5].startswith("non_finite")
        assert got.cbe.tobytes() == expected.cbe.tobytes()
        np.testing.assert_array_equal(got.labels, expected.labels)
        # the NaN client passes the template but not the finiteness check of check_state
        assert calls == ([6] if not fail else [6, 1, 1, 1, 1, 1, 1])
