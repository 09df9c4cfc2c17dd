"""Backdoor triggers of the simulation arena and the batch-poisoning helper.

Two triggers (spec ``attacks-and-baselines.md`` §1.4 and §1.6):

- :class:`PatternTrigger` (MRA, 3DFed, adaptive): a small patch of raw intensities written over
  the image. Digits default: the 3×3 checkerboard ``1 0 1 / 0 1 0 / 1 0 1`` replacing rows 5–7,
  cols 5–7 of the 8×8 image (bottom-right). Cells given as ``None`` are left untouched (the
  authors' 5×3 MNIST/CIFAR pattern, :data:`OFFICIAL_PATTERN`, has such cells).
- :class:`BarTrigger` (CerP): DBA-style bars whose pixel values are *tunable*. Digits default:
  4 bars × 2 px = row 0 cols {0,1},{4,5} and row 2 cols {0,1},{4,5}, raw value 1.

Images are normalised tensors ``(N, C, H, W)``. ``setup(input_shape, normalize)`` receives one
sample's shape ``(C, H, W)`` and the dataset's ``normalize(raw) -> normalised`` (raw intensities
in [0, 1]); every trigger value is stored in normalised units and written into every channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: the digits pattern trigger (raw intensities), spec §1.6
DIGITS_PATTERN: tuple[tuple[float | None, ...], ...] = (
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
)
#: the authors' MNIST/CIFAR pattern (spec §1.4), top-left at row 3, column 23; None = untouched
OFFICIAL_PATTERN: tuple[tuple[float | None, ...], ...] = (
    (1.0, 0.0, 1.0),
    (None, 1.0, None),
    (None, None, 0.0),
    (None, 1.0, None),
    (1.0, 0.0, 1.0),
)
OFFICIAL_PATTERN_POSITION = (3, 23)

_CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def normalise_raw(normalize: Callable, raw: torch.Tensor) -> torch.Tensor:
    """Apply the dataset's ``normalize`` to a raw ``(C, H, W)`` image; float32 result, same shape.

    ``normalize`` may expect a batch ``(N, C, H, W)`` (per-channel statistics broadcast over it),
    an image, or return a NumPy array: all three are accepted.
    """
    raw = raw.to(torch.float32)
    try:
        out = normalize(raw.unsqueeze(0))
        out = torch.as_tensor(out, dtype=torch.float32).reshape(raw.shape)
    except Exception:  # noqa: BLE001 - fall back to an unbatched call
        out = torch.as_tensor(normalize(raw), dtype=torch.float32).reshape(raw.shape)
    return out


def poison_count(batch_size: int, fraction: float) -> int:
    """Number of stamped samples of a batch: ``round(fraction * batch_size)`` (Python rounding)."""
    return int(min(batch_size, max(0, round(fraction * batch_size))))


def poison_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    stamp: Callable[[torch.Tensor], torch.Tensor],
    fraction: float,
    target: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The poisoned clone of a batch: the first ``round(fraction * B)`` samples are stamped with
    ``stamp`` and relabelled ``target``; the rest is an unchanged copy. ``x``/``y`` are not modified.
    """
    n = poison_count(int(x.shape[0]), fraction)
    xp = x.clone()
    yp = y.clone()
    if n > 0:
        xp[:n] = stamp(x[:n])
        yp[:n] = target
    return xp, yp


class PatternTrigger:
    """A fixed patch trigger.

    pattern: rows of raw intensities (``None`` = pixel left untouched).
    position: ``"bottom-right"`` (default), ``"bottom-left"``, ``"top-right"``, ``"top-left"`` or
        the ``(row, col)`` of the patch's top-left pixel.
    """

    def __init__(
        self,
        pattern: Sequence[Sequence[float | None]] = DIGITS_PATTERN,
        position: str | tuple[int, int] = "bottom-right",
    ) -> None:
        widths = {len(r) for r in pattern}
        if not pattern or len(widths) != 1 or 0 in widths:
            raise ValueError("pattern must be a non-empty rectangular list of rows")
        if isinstance(position, str) and position not in _CORNERS:
            raise ValueError(f"position must be one of {_CORNERS} or (row, col), got {position!r}")
        self.pattern = tuple(tuple(r) for r in pattern)
        self.position = position
        self.mask: torch.Tensor | None = None  # bool (C, H, W)
        self.values: torch.Tensor | None = None  # float32 (C, H, W), normalised

    @property
    def patch_shape(self) -> tuple[int, int]:
        return len(self.pattern), len(self.pattern[0])

    def top_left(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_shape
        if isinstance(self.position, str):
            row = height - ph if self.position.startswith("bottom") else 0
            col = width - pw if self.position.endswith("right") else 0
        else:
            row, col = (int(v) for v in self.position)
        if row < 0 or col < 0 or row + ph > height or col + pw > width:
            raise ValueError(
                f"a {ph}x{pw} trigger at ({row}, {col}) does not fit a {height}x{width} image"
            )
        return row, col

    def setup(self, input_shape: Sequence[int], normalize: Callable) -> PatternTrigger:
        c, h, w = (int(v) for v in input_shape[-3:])
        row, col = self.top_left(h, w)
        raw = torch.zeros((c, h, w), dtype=torch.float32)
        mask = torch.zeros((c, h, w), dtype=torch.bool)
        for i, line in enumerate(self.pattern):
            for j, value in enumerate(line):
                if value is not None:
                    raw[:, row + i, col + j] = float(value)
                    mask[:, row + i, col + j] = True
        self.mask = mask
        self.values = torch.where(mask, normalise_raw(normalize, raw), torch.zeros(()))
        return self

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """A stamped copy of a batch ``(N, C, H, W)`` (or one image ``(C, H, W)``)."""
        if self.mask is None or self.values is None:
            raise RuntimeError("PatternTrigger.setup(input_shape, normalize) was not called")
        return torch.where(self.mask, self.values.to(x.dtype), x)


class BarTrigger:
    """A DBA-style bar trigger with tunable values (CerP).

    rows: the image rows carrying bars; col_groups: the column runs of each bar (every row gets
    every run). ``values`` has shape ``(C, P)`` (P trigger pixels, row-major) in normalised units.
    """

    def __init__(
        self,
        rows: Sequence[int] = (0, 2),
        col_groups: Sequence[Sequence[int]] = ((0, 1), (4, 5)),
        raw_value: float = 1.0,
    ) -> None:
        cols = [int(c) for group in col_groups for c in group]
        pixels = [(int(r), c) for r in rows for c in cols]
        if not pixels or len(set(pixels)) != len(pixels):
            raise ValueError("the bar trigger needs distinct pixels")
        self.rows_idx = torch.tensor([p[0] for p in pixels], dtype=torch.long)
        self.cols_idx = torch.tensor([p[1] for p in pixels], dtype=torch.long)
        self.raw_value = float(raw_value)
        self.initial_values: torch.Tensor | None = None  # (C, P)
        self.values: torch.Tensor | None = None  # (C, P), the current (tuned) values

    @property
    def num_pixels(self) -> int:
        return int(self.rows_idx.numel())

    def setup(self, input_shape: Sequence[int], normalize: Callable) -> BarTrigger:
        c, h, w = (int(v) for v in input_shape[-3:])
        if int(self.rows_idx.max()) >= h or int(self.cols_idx.max()) >= w:
            raise ValueError(f"the bar trigger does not fit a {h}x{w} image")
        raw = torch.zeros((c, h, w), dtype=torch.float32)
        raw[:, self.rows_idx, self.cols_idx] = self.raw_value
        self.initial_values = normalise_raw(normalize, raw)[:, self.rows_idx, self.cols_idx].clone()
        self.values = self.initial_values.clone()
        return self

    def mask(self, input_shape: Sequence[int]) -> torch.Tensor:
        """Bool ``(C, H, W)`` mask of the trigger pixels."""
        c, h, w = (int(v) for v in input_shape[-3:])
        m = torch.zeros((c, h, w), dtype=torch.bool)
        m[:, self.rows_idx, self.cols_idx] = True
        return m

    def stamp(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of ``x`` (N, C, H, W) with the trigger pixels set to ``values`` (default: the
        current values). Differentiable with respect to ``values``."""
        if values is None:
            if self.values is None:
                raise RuntimeError("BarTrigger.setup(input_shape, normalize) was not called")
            values = self.values
        out = x.clone()
        batched = out.dim() == 4
        view = out if batched else out.unsqueeze(0)
        n, c = view.shape[0], view.shape[1]
        view[:, :, self.rows_idx, self.cols_idx] = values.to(x.dtype).expand(n, c, -1)
        return out

    def stamper(self, values: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A one-argument stamp function bound to ``values`` (a detached copy)."""
        bound = None if values is None else values.detach().clone()
        return lambda x: self.stamp(x, bound)
