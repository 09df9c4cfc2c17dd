"""TPR / FPR / CAD of the arena (spec section 4), on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from mars_native.sim.metrics import cad, detection_rates, summarize_rounds, upload_cbe


def test_detection_rates_hand_cases():
    truth = [True, True, False, False, False, False]
    assert detection_rates([True, False, False, True, False, False], truth) == (0.5, 0.25)
    assert detection_rates([True, True, False, False, False, False], truth) == (1.0, 0.0)
    assert detection_rates([False] * 6, truth) == (0.0, 0.0)  # FedAvg
    # no attacker in the round: TPR := 1; FPR from the benign flags
    assert detection_rates([False, True, False], [False] * 3) == (1.0, pytest.approx(1 / 3))
    # no benign upload: FPR := 0
    assert detection_rates([True, False], [True, True]) == (0.5, 0.0)
    # a defense that does not flag clients
    assert detection_rates(None, truth) == (None, None)
    with pytest.raises(ValueError):
        detection_rates([True], truth)


def test_cad():
    assert cad(0.9, 0.1, 1.0, 0.0) == pytest.approx(0.95)
    assert cad(0.98, 1.0, 0.0, 0.0) == pytest.approx(0.495)
    assert cad(0.8, 0.2, None, None) == pytest.approx(0.8)  # FedCLP: 2 terms


def test_summarize_rounds_final_vs_mean():
    recs = [
        {"acc": 0.9, "asr": 0.1, "tpr": 1.0, "fpr": 0.0, "detect_seconds": 0.1},
        {"acc": 0.8, "asr": 0.5, "tpr": 0.5, "fpr": 0.25, "detect_seconds": 0.3},
    ]
    s = summarize_rounds(recs)
    assert s["acc"] == 0.8 and s["asr"] == 0.5
    assert s["acc_mean"] == pytest.approx(0.85) and s["asr_mean"] == pytest.approx(0.3)
    assert s["tpr"] == pytest.approx(0.75) and s["fpr"] == pytest.approx(0.125)
    assert s["cad"] == pytest.approx((0.8 + 0.5 + 0.75 + 0.875) / 4)
    assert s["cad_mean"] == pytest.approx((0.85 + 0.7 + 0.75 + 0.875) / 4)
    assert s["detect_seconds"] == pytest.approx(0.2)
    s2 = summarize_rounds([{"acc": 0.7, "asr": 0.3, "tpr": None, "fpr": None}])
    assert s2["tpr"] is None and s2["cad"] == pytest.approx(0.7)
    assert summarize_rounds([])["cad"] is None


def test_upload_cbe_matches_a_direct_computation():
    import torch

    from mars_native.sim.metrics import _torch_cbe
    from mars_native.sim.models import DigitsCNN

    torch.manual_seed(0)
    m = DigitsCNN(widths=(20, 40, 80), fc_width=16)
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.weight.data.uniform_(0.5, 2.0)
        bn.running_var.uniform_(0.5, 2.0)
    sd = m.state_dict()
    cbe = upload_cbe(sd, kappa=0.05)
    assert cbe.shape == (1 + 2 + 4,)  # ceil(0.05 * 20, 40, 80)
    np.testing.assert_allclose(cbe, _torch_cbe(sd, 0.05), rtol=1e-6)
    w = sd["conv1.weight"].double()
    be = torch.linalg.matrix_norm(w.reshape(20, 1, 9), ord=2) * sd["bn1.weight"].double().abs() \
        / torch.sqrt(sd["bn1.running_var"].double() + 1e-5)
    assert cbe[0] == pytest.approx(float(be.max()), rel=1e-6)


def test_energy_terms_factorise_the_backdoor_energy():
    import torch

    from mars_native.sim.metrics import energy_terms
    from mars_native.sim.models import DigitsCNN

    torch.manual_seed(1)
    m = DigitsCNN(widths=(20, 40, 80), fc_width=16)
    sd = m.state_dict()
    sd["bn2.running_var"].fill_(4.0)  # BN term of conv2 = |gamma| / 2
    terms = energy_terms(sd, kappa=0.05)
    assert list(terms) == ["conv1", "conv2", "conv3"]
    t2 = terms["conv2"]
    assert t2["bn_scale"] == pytest.approx(1 / np.sqrt(4 + 1e-5))
    assert t2["be"] == pytest.approx(t2["sigma"] * t2["bn_scale"])
    assert t2["running_var_mean"] == pytest.approx(4.0)
    cbe = upload_cbe(sd, kappa=0.05)
    assert terms["conv1"]["be"] == pytest.approx(cbe[0])  # k = 1 for 20 channels
