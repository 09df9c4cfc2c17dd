"""NaN/Inf in a scored weight is found by the spectral kernel (one pass over the scored weights,
no separate finiteness scan): the client is rejected with the same ``non_finite`` reason, exact
count included, in batch and streaming rounds, and never reaches the aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from mars_native.defense import MARS
from mars_native.energy import concentrated_backdoor_energy


def _states(n: int = 5, dtype=np.float32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {
        "conv1.weight": rng.standard_normal((8, 3, 3, 3)),
        "bn1.weight": 1.0 + 0.1 * rng.standard_normal(8),
        "bn1.bias": rng.standard_normal(8),
        "bn1.running_mean": rng.standard_normal(8),
        "bn1.running_var": 1.0 + rng.random(8),
        "conv2.weight": rng.standard_normal((16, 8, 3, 3)),
        "bn2.weight": 1.0 + 0.1 * rng.standard_normal(16),
        "bn2.bias": rng.standard_normal(16),
        "bn2.running_mean": rng.standard_normal(16),
        "bn2.running_var": 1.0 + rng.random(16),
        "fc.weight": rng.standard_normal((4, 16)),
        "fc.bias": rng.standard_normal(4),
    }
    return [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(dtype) for k, v in base.items()}
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_scored_weight_is_rejected_with_its_count(dtype, value):
    states = _states(dtype=dtype)
    states[2]["conv2.weight"][3, 1, 0, 2] = value
    states[2]["conv2.weight"][5, 0, 1, 1] = value
    new, report = MARS(epsilon=1e9).aggregate(states)
    assert report.reasons[2] == "non_finite: 'conv2.weight' has 2 NaN/Inf value(s) of 1152"
    assert report.accepted.tolist() == [True, True, False, True, True]
    assert np.isnan(report.cbe[2]).all() and np.isfinite(report.cbe[[0, 1, 3, 4]]).all()
    want = np.mean([states[i]["conv2.weight"].astype(np.float64) for i in (0, 1, 3, 4)], axis=0)
    np.testing.assert_allclose(new["conv2.weight"], want, rtol=1e-6)


def test_streaming_round_gives_the_same_reason():
    states = _states()
    states[1]["conv1.weight"][0, 0, 0, 0] = np.nan
    rnd = MARS(epsilon=1e9).round()
    for s in states:
        rnd.add(s)
    new, report = rnd.finish()
    assert report.reasons[1] == "non_finite: 'conv1.weight' has 1 NaN/Inf value(s) of 216"
    assert np.isfinite(new["conv1.weight"]).all()


def test_scored_linear_weight_with_include_linear():
    states = _states()
    states[0]["fc.weight"][1, 2] = np.inf
    report = MARS(include_linear=True, epsilon=1e9).detect(states)
    assert report.reasons[0] == "non_finite: 'fc.weight' has 1 NaN/Inf value(s) of 64"
    # not scored: the ordinary scan finds it
    report = MARS(epsilon=1e9).detect(states)
    assert report.reasons[0] == "non_finite: 'fc.weight' has 1 NaN/Inf value(s) of 64"


def test_non_scored_tensor_is_named_first():
    states = _states()
    states[4]["conv1.weight"][0, 0, 0, 0] = np.nan
    states[4]["bn2.running_mean"][3] = np.nan
    report = MARS(epsilon=1e9).detect(states)
    assert report.reasons[4] == "non_finite: 'bn2.running_mean' has 1 NaN/Inf value(s) of 16"


def test_huge_finite_float32_weights_are_not_non_finite():
    states = _states()
    states[3]["conv2.weight"] *= np.float32(3e37)  # squares overflow float32, not the fp64 Gram
    report = MARS(epsilon=1e9).detect(states)
    assert report.reasons[3] is None or not report.reasons[3].startswith("non_finite")
    assert np.isfinite(report.cbe[3]).all()


def test_public_cbe_still_raises_on_non_finite_weights():
    state = _states(1)[0]
    state["conv1.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        concentrated_backdoor_energy(state)


def test_batch_detect_equals_client_cbe_for_every_kind_of_client():
    """detect() scores the valid clients of a round in one native call; every client's CBE and
    reason are those of client_cbe alone."""
    from mars_native.validation import majority_template

    states = _states(8)
    states[1]["conv2.weight"][3, 2, 1, 1] = np.nan          # scored weight
    states[2]["bn1.running_mean"][0] = np.inf                # non-scored tensor
    states[3]["conv1.weight"] = states[3]["conv1.weight"].astype(np.int32)  # dtype mismatch
    states[4] = {k: v for k, v in states[4].items() if k != "fc.bias"}       # missing key
    mars = MARS(n_threads=2)
    report = mars.detect(states)
    template = majority_template(states)
    codes = []
    for i, state in enumerate(states):
        cbe, reason = mars.client_cbe(state, template)
        codes.append(reason.split(":")[0] if reason else None)
        if reason is not None:
            assert report.reasons[i] == reason and report.labels[i] == -1
        else:
            np.testing.assert_array_equal(report.cbe[i], cbe)
    assert codes == [None, "non_finite", "non_finite", "dtype_mismatch", "missing_keys", None, None, None]


def test_infinite_bn_scale_rejects_only_that_client():
    states = _states(6, dtype=np.float64)
    states[2]["bn2.weight"][:] = 1e308  # finite, but |gamma| / sqrt(var + eps) overflows
    states[2]["bn2.running_var"][:] = 0.0
    states[4]["bn1.weight"][:] = 1e308  # a finite scale, but sigma_max * scale overflows
    report = MARS(n_threads=2).detect(states)
    assert report.reasons[2] == ("invalid_type: BatchNorm 'bn2' of 'conv2.weight' has a non-finite "
                                 "scale |gamma| / sqrt(var + eps)")
    assert report.reasons[4] == ("non_finite: the backdoor energy of 'conv1' overflows float64 "
                                 "(finite weights times a huge BN scale)")
    assert all(report.labels[i] >= 0 for i in (0, 1, 3, 5))


def test_check_finite_names_the_first_bad_tensor_in_key_order_for_any_array_kind():
    from mars_native.validation import check_finite

    ok = np.ones((4, 6), np.float32)
    strided = np.asfortranarray(np.ones((4, 3), np.float32))  # not C-contiguous
    bad_strided = strided.copy(order="F")
    bad_strided[1, 2] = np.nan
    half = np.ones(5, np.float16)
    bad_half = half.copy()
    bad_half[3] = np.inf
    assert check_finite({"a": ok, "b": strided, "c": half, "n": np.arange(3)}) is None
    assert check_finite({"a": ok, "b": bad_strided, "c": bad_half}).startswith("non_finite: 'b' has 1")
    assert check_finite({"a": ok, "c": bad_half, "b": bad_strided}).startswith("non_finite: 'c' has 1")
    bad_ok = ok.copy()
    bad_ok[0, 0] = -np.inf
    assert check_finite({"c": bad_half, "a": bad_ok}).startswith("non_finite: 'c'")
    assert check_finite({"a": bad_ok, "c": bad_half}).startswith("non_finite: 'a'")
    assert check_finite({"a": bad_ok, "c": bad_half}, skip={"a"}).startswith("non_finite: 'c'")


def test_shared_layout_checks_give_each_client_its_own_reason():
    """Clients with the template's layout share its layout checks and scored layers (found once
    per round); the finiteness check still reads each client's values, names the first bad
    tensor in the client's own key order, and falls back to the general check for views the
    native scan cannot read. Every reason and CBE is that of client_cbe alone."""
    import torch

    from mars_native.validation import majority_template, state_template

    states = _states(9)
    for s in states:
        s["bn1.num_batches_tracked"] = np.array(3, dtype=np.int64)
    states[1]["fc.bias"][2] = np.nan                          # last non-scored key
    states[1]["bn1.running_mean"][0] = np.inf                 # ...and an earlier one: named first
    states[2] = {k: states[2][k] for k in reversed(list(states[2]))}  # other key order
    states[2]["fc.bias"][0] = np.nan
    states[2]["bn1.running_mean"][1] = np.nan                 # fc.bias comes first in its order
    fc = np.asfortranarray(states[3]["fc.weight"])            # a view the native scan refuses
    fc[1, 1] = -np.inf
    states[3]["fc.weight"] = fc
    states[4]["fc.weight"] = np.asfortranarray(states[4]["fc.weight"])  # the same, all finite
    states[5] = {k: torch.from_numpy(v.copy()) for k, v in states[5].items()}  # not NumPy
    states[6]["bn2.weight"] = np.full(16, np.nan, np.float32)  # non-finite BN scale
    mars = MARS(n_threads=2, epsilon=1e9)
    report = mars.detect(states)
    template = majority_template(states)
    for i, state in enumerate(states):
        cbe, reason = mars.client_cbe(state, template)
        assert report.reasons[i] == reason, i
        if reason is None:
            np.testing.assert_array_equal(report.cbe[i], cbe)
    assert report.reasons[1] == "non_finite: 'bn1.running_mean' has 1 NaN/Inf value(s) of 8"
    assert report.reasons[2] == "non_finite: 'fc.bias' has 1 NaN/Inf value(s) of 4"
    assert report.reasons[3] == "non_finite: 'fc.weight' has 1 NaN/Inf value(s) of 64"
    assert report.reasons[6].startswith("non_finite: 'bn2.weight' has 16 NaN/Inf")
    assert [r is None for r in report.reasons] == [True, False, False, False, True, True, False,
                                                    True, True]
    # with the global model as the template (and a client whose layout differs from it)
    global_state = {k: v.copy() for k, v in _states(1, seed=5)[0].items()}
    global_state["bn1.num_batches_tracked"] = np.array(0, dtype=np.int64)
    global_state = {k: global_state[k] for k in reversed(list(global_state))}  # other key order
    states[7] = {k: v.astype(np.float64) if k == "fc.bias" else v for k, v in states[7].items()}
    report = mars.detect(states, global_state)
    for i, state in enumerate(states):
        assert report.reasons[i] == mars.client_cbe(state, state_template(global_state), global_state)[1], i
    assert report.reasons[7].startswith("dtype_mismatch: 'fc.bias'")
    assert report.reasons[1] == "non_finite: 'bn1.running_mean' has 1 NaN/Inf value(s) of 8"


def test_unsupported_dtype_in_the_shared_layout_rejects_every_client_by_itself():
    states = _states(4)
    for s in states:
        s["extra"] = np.ones(3, np.complex64)
    report = MARS(epsilon=1e9).detect(states)
    assert report.reasons == ["invalid_type: 'extra' has unsupported dtype complex64"] * 4


def test_scan_keys_and_check_finite_with_known_keys():
    from mars_native.validation import check_finite, scan_keys

    state = {"a": np.ones(3, np.float32), "n": np.arange(2), "e": np.ones(0), "b": np.ones(4),
             "s": np.ones(2, np.float32)}
    entries = [(k, v.size, v.dtype) for k, v in state.items()]
    assert scan_keys(entries) == ["a", "b", "s"]
    assert scan_keys(entries, skip={"b"}) == ["a", "s"]
    assert scan_keys([*entries, ("h", 2, np.dtype(np.float16))]) is None  # the general check decides
    state["s"][1] = np.nan
    state["b"][0] = np.inf
    assert check_finite(state) == check_finite(state, keys=scan_keys(entries)) \
        == "non_finite: 'b' has 1 NaN/Inf value(s) of 4"
    assert check_finite(state, skip={"b"}, keys=scan_keys(entries, {"b"})).startswith("non_finite: 's'")
    state["b"] = np.asfortranarray(np.ones((2, 2)))  # a view the native scan refuses
    state["b"][1, 0] = np.nan
    assert check_finite(state, keys=["a", "b", "s"]) == "non_finite: 'b' has 1 NaN/Inf value(s) of 4"
