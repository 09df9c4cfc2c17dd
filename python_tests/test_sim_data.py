"""Datasets, the Dirichlet split and the model registry of the arena."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mars_native.sim.config import SimConfig
from mars_native.sim.data import FederatedData, dirichlet_split, load_digits_data
from mars_native.sim.models import MODELS, DigitsCNN, final_layer_name, model_factory


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


def test_digits_split_and_normalisation(digits):
    assert digits.train_x.shape == (1347, 1, 8, 8)
    assert digits.test_x.shape == (450, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert abs(float(digits.train_x.mean())) < 1e-4
    assert abs(float(digits.train_x.std()) - 1.0) < 1e-2
    # stratified: every class in both splits, proportions close
    tr = np.bincount(digits.train_y.numpy(), minlength=10) / 1347
    te = np.bincount(digits.test_y.numpy(), minlength=10) / 450
    assert np.abs(tr - te).max() < 0.01
    # normalize maps raw [0, 1] intensities to model units
    raw_one = digits.normalize(torch.tensor(1.0))
    assert float(digits.train_x.max()) == pytest.approx(float(raw_one), abs=1e-5)


def _labels(n_per_class=60, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


def test_dirichlet_split_properties():
    y = _labels()
    parts = dirichlet_split(y, 8, 0.9, min_samples=8, seed=1)
    assert len(parts) == 8
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx))  # disjoint
    assert allidx.min() >= 0 and allidx.max() < len(y)
    assert min(len(p) for p in parts) >= 8
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted


def test_dirichlet_split_is_deterministic_and_seed_dependent():
    y = _labels()
    a = dirichlet_split(y, 8, 0.9, seed=3)
    b = dirichlet_split(y, 8, 0.9, seed=3)
    c = dirichlet_split(y, 8, 0.9, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_dirichlet_alpha_controls_heterogeneity():
    y = _labels(200)

    def skew(alpha):
        vals = []
        for s in range(5):
            for p in dirichlet_split(y, 10, alpha, min_samples=1, seed=s):
                counts = np.bincount(y[p], minlength=10) / len(p)
                vals.append(counts.max())
        return np.mean(vals)

    assert skew(0.1) > skew(0.9) > skew(100.0)
    assert skew(100.0) < 0.2  # nearly IID: max class share close to 1/10


def test_dirichlet_uses_class0_size_for_every_class():
    # class 0 has 10 samples, class 1 has 100: client shares of class 1 are drawn as
    # round(10 * p_u), so at most ~10 (+ rounding) of class 1 are used in total
    y = np.concatenate([np.zeros(10, int), np.ones(100, int)])
    parts = dirichlet_split(y, 2, 1.0, min_samples=1, seed=0)
    used1 = sum(int((y[p] == 1).sum()) for p in parts)
    assert used1 <= 12


def test_dirichlet_redraws_until_min_samples_and_errors_when_impossible():
    y = _labels(20)
    parts = dirichlet_split(y, 10, 0.05, min_samples=5, seed=0, max_tries=5000)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="min_samples"):
        dirichlet_split(y, 100, 0.9, min_samples=8)


def test_federated_data_from_tensors_and_validation():
    x = torch.randn(30, 3, 8, 8)
    y = torch.arange(30) % 3
    d = FederatedData.from_tensors(x, y, x[:6], y[:6], mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    assert d.num_classes == 3 and d.input_shape == (3, 8, 8)
    raw = torch.ones(2, 3, 8, 8)
    assert torch.allclose(d.normalize(raw)[0, 0], torch.full((8, 8), 2.5))
    with pytest.raises(ValueError, match="samples"):
        FederatedData(x, y[:5], x, y, 3, (3, 8, 8), d.normalize)
    with pytest.raises(ValueError, match="input_shape"):
        FederatedData(x, y, x, y, 3, (1, 8, 8), d.normalize)


def test_digits_cnn_layout_and_registry(digits):
    m = DigitsCNN()
    keys = list(m.state_dict())
    assert keys[:2] == ["conv1.weight", "conv1.bias"]
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc1", "fc2"):
        assert any(k.startswith(name + ".") for k in keys)
    assert m.conv3.weight.shape == (256, 128, 3, 3)
    assert m(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert final_layer_name(m) == "fc2"
    cfg = SimConfig(model_widths=[8, 16, 32], fc_width=12)
    net = model_factory(cfg, digits)()
    assert net.conv3.weight.shape[0] == 32 and net.fc1.out_features == 12
    assert "digits-cnn" in MODELS
    with pytest.raises(ValueError, match="unknown model"):
        model_factory(SimConfig(model="nope"), digits)


def test_final_layer_of_a_user_model():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 20), torch.nn.ReLU(),
                              torch.nn.Linear(20, 10))
    assert final_layer_name(net) == "3"
