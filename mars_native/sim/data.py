"""Datasets and the federated (Dirichlet non-IID) split.

The arena runs on :class:`FederatedData`: train and test tensors, the number of classes, the
shape of one sample and a ``normalize`` function that maps *raw* intensities (the unit a trigger
is written in, e.g. 0..1) to the model's input unit. The default dataset is scikit-learn's bundled
``load_digits`` (1797 8x8 images, no download).

Bring your own data::

    from mars_native.sim.data import FederatedData
    data = FederatedData.from_tensors(train_x, train_y, test_x, test_y,
                                      mean=0.1307, std=0.3081)   # x already normalised
    # or, from any map-style torch datasets returning (image_tensor, label):
    data = FederatedData.from_torch_datasets(train_ds, test_ds, mean=..., std=...)
    result = run_simulation(config, attack, defense, data=data, make_model=my_model_fn)

``train_x``/``test_x`` are float tensors (N, C, H, W) *already normalised*; ``mean``/``std`` (scalars
or per-channel sequences) describe that normalisation so triggers given in raw intensities are
stamped correctly. Or register a loader: ``DATASETS["mydata"] = lambda config: FederatedData(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FederatedData",
    "dirichlet_split",
    "load_dataset",
    "load_digits_data",
]


@dataclass
class FederatedData:
    """A dataset ready for the arena (tensors on CPU; x normalised, y int64 labels)."""

    train_x: torch.Tensor  # (N, C, H, W) float32, normalised
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8)
    normalize: Callable[[torch.Tensor | float], torch.Tensor | float]  # raw -> model units
    name: str = "custom"

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"{split}_x and {split}_y must be torch tensors")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{split}_x has {x.shape[0]} samples, {split}_y {y.shape[0]}")
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(f"{split}_x samples have shape {tuple(x.shape[1:])}, "
                                 f"input_shape says {tuple(self.input_shape)}")
        self.train_x = self.train_x.float().contiguous()
        self.test_x = self.test_x.float().contiguous()
        self.train_y = self.train_y.long().contiguous()
        self.test_y = self.test_y.long().contiguous()
        self.input_shape = tuple(int(s) for s in self.input_shape)

    @classmethod
    def from_tensors(
        cls,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        *,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        num_classes: int | None = None,
        name: str = "custom",
    ) -> FederatedData:
        """Wrap normalised tensors; ``mean``/``std`` = the normalisation already applied."""
        train_y = torch.as_tensor(train_y).long()
        test_y = torch.as_tensor(test_y).long()
        if num_classes is None:
            num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
        return cls(
            train_x=torch.as_tensor(train_x),
            train_y=train_y,
            test_x=torch.as_tensor(test_x),
            test_y=test_y,
            num_classes=int(num_classes),
            input_shape=tuple(train_x.shape[1:]),
            normalize=make_normalizer(mean, std),
            name=name,
        )

    @classmethod
    def from_torch_datasets(cls, train_ds, test_ds, **kwargs) -> FederatedData:
        """Stack two map-style datasets of ``(tensor, label)`` (fine for small datasets)."""

        def stack(ds):
            xs, ys = zip(*(ds[i] for i in range(len(ds))))
            return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)

        trx, try_ = stack(train_ds)
        tex, tey = stack(test_ds)
        return cls.from_tensors(trx, try_, tex, tey, **kwargs)


class Normalizer:
    """``raw -> (raw - mean) / std`` (picklable, so datasets can travel to worker processes).

    Scalars, or per-channel sequences (the channel is dim 1 of a batch ``(N, C, H, W)`` and dim 0
    of one image ``(C, H, W)``)."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.per_channel = not (np.ndim(mean) == 0 and np.ndim(std) == 0)
        if self.per_channel:
            self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
            self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        else:
            self.mean, self.std = float(mean), float(std)

    def __call__(self, x):
        if not self.per_channel:
            return (x - self.mean) / self.std
        x = torch.as_tensor(x, dtype=torch.float32)
        shape = [1] * x.dim()
        shape[1 if x.dim() == 4 else 0] = -1
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def __repr__(self) -> str:
        return f"Normalizer(mean={self.mean}, std={self.std})"


def make_normalizer(mean: float | Sequence[float], std: float | Sequence[float]) -> Normalizer:
    """``raw -> (raw - mean) / std``; per-channel when mean/std are sequences."""
    return Normalizer(mean, std)


def load_digits_data(test_size: float = 0.25, seed: int = 0) -> FederatedData:
    """scikit-learn's bundled 8x8 digits: stratified split (``test_size``, ``random_state=0`` by
    default: 1347 train / 450 test), x/16 in [0, 1], normalised with the train mean/std (scalars),
    tensors (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    normalize = make_normalizer(mean, std)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return FederatedData(
        train_x=normalize(to_t(x_tr)).unsqueeze(1),
        train_y=to_t(y_tr),
        test_x=normalize(to_t(x_te)).unsqueeze(1),
        test_y=to_t(y_te),
        num_classes=10,
        input_shape=(1, 8, 8),
        normalize=normalize,
        name="digits",
    )


#: name -> loader(config) -> FederatedData. Add your own entries to plug a dataset into the CLI.
DATASETS: dict[str, Callable[..., FederatedData]] = {
    # the split of the dataset itself is fixed (random_state 0), like a published benchmark split
    "digits": lambda config: load_digits_data(test_size=config.test_size, seed=0),
}

_CACHE: dict[tuple, FederatedData] = {}


def load_dataset(config) -> FederatedData:
    """The dataset named by ``config.dataset`` (cached in memory)."""
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; known: {sorted(DATASETS)}")
    key = (config.dataset, config.test_size)
    if key not in _CACHE:
        _CACHE[key] = DATASETS[config.dataset](config)
    return _CACHE[key]


def dirichlet_split(
    labels: np.ndarray | torch.Tensor,
    num_clients: int,
    alpha: float,
    *,
    min_samples: int = 8,
    seed: int | np.random.Generator = 0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """The authors' Dirichlet non-IID split, redrawn until every client has ``min_samples``.

    For every class c: shuffle its indices, draw p ~ Dir(alpha * 1_N) and give client u the next
    ``round(n_0 * p_u)`` indices of class c, where n_0 is the size of class 0 (the authors' code
    uses class 0's size for every class); a class that runs out gives what is left, indices left
    over are unused. The whole split is redrawn (same generator, next draws) until every client
    holds at least ``min_samples`` samples. Returns one sorted int64 index array per client.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    if min_samples * num_clients > len(y):
        raise ValueError(f"{num_clients} clients x min_samples={min_samples} exceed the "
                         f"{len(y)} training samples")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    classes = np.unique(y)
    class_idx = {c: np.flatnonzero(y == c) for c in classes}
    n0 = len(class_idx[classes[0]])
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = class_idx[c].copy()
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            pos = 0
            for u in range(num_clients):
                take = round(n0 * p[u])
                parts[u].append(idx[pos:pos + take])
                pos += take
        split = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(s) for s in split) >= min_samples:
            return split
    raise RuntimeError(f"no Dirichlet split with >= {min_samples} samples per client in "
                       f"{max_tries} draws (alpha={alpha}, {num_clients} clients)")
