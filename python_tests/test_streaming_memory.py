"""Streaming rounds keep peak extra memory at O(one model + CBEs), whatever the number of clients.

50 clients of a ~5 MB model are written to .npz files and streamed through ``MARS.round`` with a
loader per file (the round keeps no client in memory and re-reads only the rejected ones at
``finish``). tracemalloc traces every NumPy allocation; the peak over the whole round must stay
below 4 model sizes + the CBEs (+1 MiB for Python objects). What it is made of: the float64
running sum (2 models, the model being float32), the client being added (1 model), and the
output at ``finish`` (1 model). For contrast, the batch path holds all 50 clients.

The streamed aggregate must equal ``MARS.aggregate`` on the same clients: within one float32 ulp
(the running sum adds then subtracts the rejected clients in float64, and ``(a + b) - b`` need
not equal ``a`` bit for bit, which can flip the final float32 rounding).
"""

from __future__ import annotations

import functools
import gc
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest

from mars_native import io
from mars_native.defense import MARS

N_CLIENTS = 50
N_ATTACKERS = 10


def _model(rng: np.random.Generator) -> OrderedDict:
    s: OrderedDict = OrderedDict()
    widths = [3, 64, 128, 256, 384]
    for i in range(1, len(widths)):
        cout, cin = widths[i], widths[i - 1]
        s[f"conv{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        s[f"bn{i}.weight"] = (1 + 0.1 * rng.standard_normal(cout)).astype(np.float32)
        s[f"bn{i}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        s[f"bn{i}.running_mean"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        s[f"bn{i}.running_var"] = (1 + 0.2 * rng.random(cout)).astype(np.float32)
        s[f"bn{i}.num_batches_tracked"] = np.array(1000, dtype=np.int64)
    s["fc.weight"] = (0.05 * rng.standard_normal((10, widths[-1]))).astype(np.float32)
    s["fc.bias"] = np.zeros(10, np.float32)
    return s


@pytest.fixture(scope="module")
def client_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    base = _model(rng)
    paths, attacker = [], []
    for i in range(N_CLIENTS):
        s = OrderedDict()
        for k, v in base.items():
            if v.dtype.kind == "f" and not k.endswith("running_var"):
                noise = rng.standard_normal(v.shape, dtype=np.float32)
                s[k] = v + np.float32(3e-3 * np.abs(v).mean()) * noise
            else:
                s[k] = v
        if i % (N_CLIENTS // N_ATTACKERS) == 0:  # 10 attackers spread over the round
            for k in [k for k in s if k.startswith("conv")]:
                w = s[k].copy()
                top = np.argsort(np.linalg.norm(w.reshape(w.shape[0], -1), axis=1))[::-1][:3]
                w[top] *= 3.0
                s[k] = w
        paths.append(d / f"client{i:02d}.npz")
        io.save_state_dict(s, paths[-1])
        attacker.append(i % (N_CLIENTS // N_ATTACKERS) == 0)
    model_bytes = sum(v.nbytes for v in base.values())
    return paths, np.asarray(attacker), model_bytes


def _traced_peak(fn):
    """(result, peak bytes allocated above the level at the start) of fn()."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    return result, peak


def test_streaming_round_memory_is_bounded_by_one_model(client_files):
    paths, attacker, model_bytes = client_files
    weights = [float(10 + i % 7) for i in range(N_CLIENTS)]

    def stream():
        rnd = MARS().round()
        for path, w in zip(paths, weights):
            rnd.add(None, w, loader=functools.partial(io.load_state_dict, path), name=path.name)
        return rnd.finish()

    (new, report), peak = _traced_peak(stream)
    np.testing.assert_array_equal(report.accepted, ~attacker)
    assert report.note is None  # the rejected clients were subtracted, not re-summed
    cbe_bytes = report.cbe.nbytes
    bound = 4 * model_bytes + 2 * cbe_bytes + 2**20
    print(f"\nmodel {model_bytes / 2**20:.2f} MiB; streaming peak {peak / 2**20:.2f} MiB "
          f"= {peak / model_bytes:.2f} models for {N_CLIENTS} clients (bound {bound / 2**20:.2f} MiB)")
    assert peak < bound

    # the same clients in one batch: all of them in memory at once (the measurement sees it)
    def batch():
        states = [io.load_state_dict(p) for p in paths]
        return MARS().aggregate(states, weights=weights)

    (batch_state, batch_report), batch_peak = _traced_peak(batch)
    print(f"batch peak {batch_peak / 2**20:.2f} MiB = {batch_peak / model_bytes:.2f} models")
    assert batch_peak > N_CLIENTS * model_bytes

    np.testing.assert_array_equal(batch_report.accepted, report.accepted)
    assert list(new) == list(batch_state)
    for key, v in batch_state.items():
        assert new[key].dtype == v.dtype and new[key].shape == v.shape, key
        if v.dtype.kind == "f":
            np.testing.assert_array_max_ulp(new[key], v, maxulp=1)
        else:
            np.testing.assert_array_equal(new[key], v)
