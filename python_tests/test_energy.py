"""Backdoor energy and CBE of real torch models against a NumPy-SVD oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from _torch_models import ResNet18, SmallCNN, randomize_bn
from torch import nn

from mars_native import reference as ref
from mars_native.energy import backdoor_energy, bn_scale, concentrated_backdoor_energy


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _oracle_be(w: np.ndarray, gamma=None, var=None, eps=1e-5) -> np.ndarray:
    sig = np.array([np.linalg.svd(w[k].reshape(w.shape[1], -1).astype(np.float64), compute_uv=False)[0]
                    for k in range(w.shape[0])])
    if gamma is None:
        return sig
    return sig * np.abs(gamma.astype(np.float64)) / np.sqrt(np.maximum(var.astype(np.float64), 0) + eps)


@pytest.fixture(scope="module")
def cnn_state():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return _state(randomize_bn(SmallCNN(), g))


def test_be_matches_svd_oracle_with_bn_scale(cnn_state):
    be = backdoor_energy(cnn_state)
    assert list(be) == ["conv1", "conv2", "conv3"]
    s = cnn_state
    # rtol 1e-9: fp64 Gram + Jacobi vs LAPACK SVD of the fp64-cast float32 weights
    np.testing.assert_allclose(be["conv1"], _oracle_be(s["conv1.weight"], s["bn1.weight"], s["bn1.running_var"]), rtol=1e-9)
    np.testing.assert_allclose(be["conv2"], _oracle_be(s["conv2.weight"], s["bn2.weight"], s["bn2.running_var"]), rtol=1e-9)
    np.testing.assert_allclose(be["conv3"], _oracle_be(s["conv3.weight"]), rtol=1e-9)  # no BN: scale 1


def test_linear_rows_and_depthwise_convs():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    s = _state(randomize_bn(model, torch.Generator().manual_seed(1)))
    be = backdoor_energy(s, include_linear=True)
    np.testing.assert_allclose(be["0"], _oracle_be(s["0.weight"], s["1.weight"], s["1.running_var"]), rtol=1e-9)
    np.testing.assert_allclose(be["3"], np.linalg.norm(s["3.weight"].astype(np.float64), axis=1), rtol=1e-12)


def test_torch_and_numpy_inputs_agree_bitwise():
    model = randomize_bn(SmallCNN(), torch.Generator().manual_seed(2))
    a = concentrated_backdoor_energy(model.state_dict())
    b = concentrated_backdoor_energy(_state(model))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kappa", [0.05, 0.1, 0.3, 1.0])
def test_cbe_lengths_paper_rule(cnn_state, kappa):
    cbe = concentrated_backdoor_energy(cnn_state, kappa)
    assert cbe.shape == (sum(max(1, math.ceil(kappa * n)) for n in (32, 64, 64)),)
    assert cbe.dtype == np.float64


def test_cbe_official_rule_uses_quantile_counts_and_only_bn_convs(cnn_state):
    cbe = concentrated_backdoor_energy(cnn_state, 0.05, mode="official")
    # quantile rule on 32 and 64 distinct values keeps 2 and 4 (conv3 has no BN: not scored)
    assert cbe.shape == (2 + 4,)
    be = backdoor_energy(cnn_state, mode="official")
    expected = np.concatenate([ref.top_k_energy(be["conv1"], 0.05, "quantile"),
                               ref.top_k_energy(be["conv2"], 0.05, "quantile")])
    np.testing.assert_array_equal(cbe, expected)


def test_cbe_paper_rule_is_topk_of_each_layer(cnn_state):
    be = backdoor_energy(cnn_state)
    cbe = concentrated_backdoor_energy(cnn_state, 0.1)
    expected = np.concatenate([np.sort(v)[::-1][: math.ceil(0.1 * v.size)] for v in be.values()])
    np.testing.assert_allclose(cbe, expected, rtol=0, atol=0)


def test_negative_and_nan_running_var():
    state = {"c.weight": np.ones((2, 1, 1, 1), np.float32), "bn.weight": np.ones(2, np.float32),
             "bn.bias": np.zeros(2, np.float32), "bn.running_mean": np.zeros(2, np.float32),
             "bn.running_var": np.array([-4.0, np.nan], np.float32)}
    scale = bn_scale(state, "bn", 1e-5, mode="official")
    np.testing.assert_allclose(scale, 1 / np.sqrt(1e-5) * np.ones(2))
    paper = bn_scale(state, "bn", 1e-5, mode="paper")
    assert paper[0] == pytest.approx(1 / np.sqrt(1e-5)) and np.isnan(paper[1])


def test_resnet18_cbe_shape():
    state = ResNet18().state_dict()
    cbe = concentrated_backdoor_energy(state)
    widths = [64] + [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4 + [128, 256, 512]
    assert cbe.shape == (sum(math.ceil(0.05 * w) for w in widths),)
    assert np.all(np.isfinite(cbe)) and np.all(cbe > 0)


def test_no_scorable_layer_and_bad_mode():
    with pytest.raises(ValueError, match="no scorable layer"):
        concentrated_backdoor_energy({"fc.weight": np.ones((3, 4), np.float32)})
    with pytest.raises(ValueError, match="mode"):
        concentrated_backdoor_energy({"c.weight": np.ones((3, 4, 1), np.float32)}, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="c.weight"):
        backdoor_energy({"c.weight": np.ones((3, 4, 1), np.int32)})


# ------------------------------------------------------------------ many models in one native call
def _clients(n: int = 4, seed: int = 3) -> list[dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    states = []
    for i in range(n):
        torch.manual_seed(seed + i)
        states.append(_state(randomize_bn(SmallCNN(), g)))
    states[1] = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in states[1].items()}
    return states


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_many_models_equal_one_call_per_model_bitwise(mode):
    from mars_native.energy import backdoor_energies, concentrated_backdoor_energies

    states = _clients()
    many = backdoor_energies(states, mode=mode, n_threads=2)
    for state, got in zip(states, many):
        one = backdoor_energy(state, mode=mode, n_threads=1)
        assert list(got) == list(one)
        for name in one:
            np.testing.assert_array_equal(got[name], one[name])
    cbes = concentrated_backdoor_energies(states, 0.1, mode, n_threads=3)
    assert cbes.shape[0] == len(states) and cbes.dtype == np.float64
    for state, row in zip(states, cbes):
        np.testing.assert_array_equal(row, concentrated_backdoor_energy(state, 0.1, mode, n_threads=1))


def test_many_models_errors_name_the_model():
    from mars_native.energy import backdoor_energies, concentrated_backdoor_energies

    states = _clients(3)
    with pytest.raises(ValueError, match="at least one"):
        concentrated_backdoor_energies([])
    assert backdoor_energies([]) == []
    with pytest.raises(ValueError, match=r"states\[1\]: no scorable layer"):
        concentrated_backdoor_energies([states[0], {"fc.weight": np.ones((3, 4), np.float32)}])
    wide = _state(randomize_bn(SmallCNN((8, 16, 64)), torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError, match=r"states\[2\] has a CBE of length \d+ but states\[0\] has \d+"):
        concentrated_backdoor_energies([states[0], states[1], wide])
    bad = dict(states[2])
    bad["bn1.weight"] = np.full_like(bad["bn1.weight"], 1e308, dtype=np.float64)
    bad["bn1.running_var"] = np.zeros_like(bad["bn1.running_var"])  # 1e308 / sqrt(1e-5) = inf
    with pytest.raises(ValueError, match="BatchNorm 'bn1' of 'conv1.weight' has a non-finite scale"):
        backdoor_energies([states[0], bad])


def test_layer_inputs_of_many_models_equal_one_model_at_a_time():
    from mars_native.energy import _layer_inputs_many, layer_inputs
    from mars_native.layers import find_layers

    states = _clients(3)
    found = [find_layers(s) for s in states]
    for mode in ("paper", "official"):
        many = _layer_inputs_many(states, found, 1e-5, mode)
        for state, layers, (weights, scales) in zip(states, found, many):
            one_w, one_s = layer_inputs(state, layers, 1e-5, mode)
            assert all(a is b for a, b in zip(weights, one_w))  # the same arrays (no copies)
            for a, b in zip(scales, one_s):
                assert (a is None and b is None) or np.array_equal(a, b)


def test_layer_inputs_of_many_models_raise_for_the_first_failing_model():
    from mars_native.energy import _layer_inputs_many
    from mars_native.layers import find_layers

    states = _clients(3)
    found = [find_layers(s) for s in states]
    huge = dict(states[1])
    huge["bn2.weight"] = np.full_like(huge["bn2.weight"], 1e308, dtype=np.float64)
    huge["bn2.running_var"] = np.zeros_like(huge["bn2.running_var"])
    ints = dict(states[2])
    ints["conv1.weight"] = ints["conv1.weight"].astype(np.int32)
    with pytest.raises(ValueError, match="BatchNorm 'bn2' of 'conv2.weight'"):
        _layer_inputs_many([states[0], huge, ints], found, 1e-5, "paper")
    with pytest.raises(TypeError, match="conv1.weight"):
        _layer_inputs_many([states[0], ints, huge], found, 1e-5, "paper")


def test_mars_rejects_only_the_client_whose_bn_scale_overflows():
    import mars_native as mn

    wide = [{k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in s.items()} for s in _clients(3)]
    states = wide * 2
    bad = dict(states[4])
    bad["bn1.weight"] = np.full_like(bad["bn1.weight"], 1e308)
    bad["bn1.running_var"] = np.zeros_like(bad["bn1.running_var"])  # 1e308 / sqrt(1e-5) = inf
    states[4] = bad
    report = mn.MARS(kappa=0.1).detect(states)
    assert report.reasons[4] is not None and "non-finite scale" in report.reasons[4]
    assert all(report.reasons[i] is None for i in (0, 1, 2, 3, 5)), report.reasons
    assert np.isfinite(report.cbe[[0, 1, 2, 3, 5]]).all()
