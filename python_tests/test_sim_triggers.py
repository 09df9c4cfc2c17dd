"""Triggers of the simulation arena: pattern, DBA bars, batch poisoning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mars_native.sim.triggers import (
    OFFICIAL_PATTERN,
    OFFICIAL_PATTERN_POSITION,
    BarTrigger,
    PatternTrigger,
    normalise_raw,
    poison_batch,
    poison_count,
)

MEAN, STD = 0.3, 0.4


def normalize(raw):
    return (raw - MEAN) / STD


def test_digits_pattern_bottom_right_checkerboard():
    trig = PatternTrigger().setup((1, 8, 8), normalize)
    x = torch.randn(5, 1, 8, 8)
    out = trig.stamp(x)
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.allclose(out[:, 0, 5:8, 5:8], normalize(expected).expand(5, 3, 3))
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[5:8, 5:8] = False
    assert torch.equal(out[:, 0][:, untouched], x[:, 0][:, untouched])
    assert not torch.equal(out, x)  # a copy was stamped
    assert trig.mask.sum() == 9


def test_pattern_positions_channels_and_untouched_cells():
    trig = PatternTrigger(position="top-left").setup((3, 8, 8), normalize)
    out = trig.stamp(torch.zeros(2, 3, 8, 8))
    assert torch.allclose(out[:, :, 0, 0], torch.full((2, 3), normalize(1.0)))
    assert torch.allclose(out[:, :, 0, 1], torch.full((2, 3), normalize(0.0)))
    assert torch.equal(out[:, :, 3:, :], torch.zeros(2, 3, 5, 8))

    trig = PatternTrigger(position=(2, 4)).setup((1, 8, 8), normalize)
    assert trig.mask[0, 2:5, 4:7].all() and trig.mask.sum() == 9

    off = PatternTrigger(OFFICIAL_PATTERN, OFFICIAL_PATTERN_POSITION).setup((1, 28, 28), normalize)
    x = torch.full((1, 1, 28, 28), 7.0)
    out = off.stamp(x)
    assert out[0, 0, 4, 23] == 7.0 and out[0, 0, 5, 24] == 7.0  # "." cells untouched
    assert out[0, 0, 4, 24] == pytest.approx(normalize(1.0))
    assert off.mask.sum() == 9
    with pytest.raises(ValueError):
        PatternTrigger(position=(6, 6)).setup((1, 8, 8), normalize)
    with pytest.raises(RuntimeError):
        PatternTrigger().stamp(x)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7, 16, 17])
def test_poison_batch_stamps_and_relabels_round_half(batch):
    trig = PatternTrigger().setup((1, 8, 8), normalize)
    x = torch.randn(batch, 1, 8, 8)
    y = torch.randint(0, 8, (batch,))  # never the target
    x0, y0 = x.clone(), y.clone()
    xp, yp = poison_batch(x, y, trig.stamp, 0.5, 8)
    n = round(0.5 * batch)
    assert poison_count(batch, 0.5) == n
    assert int((yp == 8).sum()) == n and torch.equal(yp[n:], y[n:])
    assert torch.equal(xp[:n], trig.stamp(x[:n])) and torch.equal(xp[n:], x[n:])
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_bar_trigger_pixels_values_and_gradient():
    bars = BarTrigger().setup((1, 8, 8), normalize)
    expected = {(r, c) for r in (0, 2) for c in (0, 1, 4, 5)}
    mask = bars.mask((1, 8, 8))[0]
    assert {tuple(map(int, p)) for p in mask.nonzero()} == expected
    assert torch.allclose(bars.initial_values, torch.full((1, 8), normalize(1.0)))
    x = torch.randn(4, 1, 8, 8)
    out = bars.stamp(x)
    assert torch.equal(out[:, 0][:, ~mask], x[:, 0][:, ~mask])
    assert torch.allclose(out[:, 0][:, mask], torch.full((4, 8), normalize(1.0)))
    v = torch.zeros(1, 8, requires_grad=True)
    bars.stamp(x, v).sum().backward()
    assert torch.equal(v.grad, torch.full((1, 8), 4.0))
    mnist = BarTrigger(rows=(0, 4), col_groups=(range(6), range(9, 15))).setup((1, 28, 28),
                                                                                    normalize)
    assert mnist.num_pixels == 24


def test_normalise_raw_accepts_numpy_and_per_channel():
    mean = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)

    def per_channel(raw):  # expects a batch
        return ((raw - mean) / 2.0).numpy()

    out = normalise_raw(per_channel, torch.ones(3, 2, 2))
    assert out.dtype == torch.float32
    assert np.allclose(out[:, 0, 0].numpy(), [(1 - 0.1) / 2, (1 - 0.2) / 2, (1 - 0.3) / 2])
