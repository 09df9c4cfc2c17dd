"""Local training, evaluation (ACC / ASR) and the pretrained start of the arena.

All randomness comes from generators derived from ``config.seed`` with :func:`derive_seed`, so a
run is a pure function of its config (for a fixed thread count and device).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import FederatedData, dirichlet_split

__all__ = [
    "EvalResult",
    "Trainer",
    "client_split",
    "clone_state",
    "data_fingerprint",
    "derive_seed",
    "initial_state",
    "is_float_key",
    "mean_state",
    "pretrain_cache_key",
    "pretrained_state",
    "torch_generator",
]

log = logging.getLogger(__name__)

StateDict = dict


# -- seeding -----------------------------------------------------------------------------------
def derive_seed(base: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``base`` and a path of keys (ints or strings), stable across
    runs and platforms (NumPy SeedSequence; strings hashed with CRC32)."""
    path = tuple(k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys)
    ss = np.random.SeedSequence(entropy=int(base) & (2**63 - 1), spawn_key=path)
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


def torch_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


# -- state dict helpers ------------------------------------------------------------------------
def clone_state(state: StateDict) -> StateDict:
    """Detached CPU copies of every tensor, in order."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def is_float_key(tensor: torch.Tensor) -> bool:
    return torch.is_floating_point(tensor)


def mean_state(states: list[StateDict], reference: StateDict) -> StateDict:
    """Plain mean of float entries (fp64 accumulation); integer buffers keep ``reference``."""
    out = {}
    for k, ref in reference.items():
        if is_float_key(ref):
            acc = torch.stack([s[k].to(torch.float64) for s in states]).mean(0)
            out[k] = acc.to(ref.dtype)
        else:
            out[k] = ref.clone()
    return out


# -- training and evaluation -------------------------------------------------------------------
@dataclass
class EvalResult:
    acc: float
    asr: float | None


class Trainer:
    """Owns one model instance and the data; trains copies of states and evaluates them.

    ``train(state, x, y, generator=...)`` is benign local training: SGD (lr, momentum, weight
    decay of the config), cross-entropy, train mode, ``local_epochs`` passes over (x, y) in
    shuffled mini-batches of ``batch_size`` (no drop_last; a final batch of one sample is skipped
    because BatchNorm cannot normalise it). Returns the new state (CPU copies).
    """

    def __init__(self, config, data: FederatedData, make_model: Callable[[], nn.Module]):
        self.config = config
        self.data = data
        self.make_model = make_model
        self.device = torch.device(config.device)
        self.model = make_model().to(self.device)
        self.test_x = data.test_x.to(self.device)
        self.test_y = data.test_y.to(self.device)

    # -- training --------------------------------------------------------------------------
    def train(
        self,
        state: StateDict,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        generator: torch.Generator,
        epochs: int | None = None,
        lr: float | None = None,
    ) -> StateDict:
        cfg = self.config
        epochs = cfg.local_epochs if epochs is None else epochs
        lr = cfg.lr if lr is None else lr
        model = self.model
        model.load_state_dict(state)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        x = x.to(self.device)
        y = y.to(self.device)
        n = x.shape[0]
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if idx.numel() < 2:
                    continue
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
        return clone_state(model.state_dict())

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, state: StateDict, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        model = self.model
        model.load_state_dict(state)
        model.eval()
        out = [model(x[i:i + chunk].to(self.device)).argmax(1) for i in range(0, len(x), chunk)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=self.device)

    def accuracy(self, state: StateDict) -> float:
        pred = self.predict(state, self.test_x)
        return float((pred == self.test_y).float().mean().item())

    def attack_success_rate(self, state: StateDict, stamp: Callable | None) -> float:
        """Share of triggered test samples classified as the target label.

        ``asr_rule="exclude-target"`` (default, issue 6): only samples whose true label is not the
        target; ``"include-target"`` (authors' code): every test sample.
        """
        target = self.config.target_label
        x, y = self.test_x, self.test_y
        if self.config.asr_rule == "exclude-target":
            keep = y != target
            x = x[keep]
        if x.shape[0] == 0:
            return 0.0
        xs = stamp(x.clone()) if stamp is not None else x
        pred = self.predict(state, xs)
        return float((pred == target).float().mean().item())

    def evaluate(self, state: StateDict, stamp: Callable | None) -> EvalResult:
        return EvalResult(self.accuracy(state), self.attack_success_rate(state, stamp))


# -- pretrained start --------------------------------------------------------------------------
_PRETRAIN_FIELDS = (
    "dataset", "test_size", "num_clients", "alpha", "min_samples", "model", "model_widths",
    "fc_width", "pretrain", "pretrain_rounds", "pretrain_epochs", "local_epochs", "batch_size",
    "lr", "momentum", "weight_decay", "seed", "device",
)
_PRETRAIN_CACHE: dict[str, StateDict] = {}


def data_fingerprint(data: FederatedData) -> str:
    """A content hash of a dataset's tensors (computed once per object)."""
    fp = getattr(data, "_fingerprint", None)
    if fp is None:
        h = hashlib.sha256()
        for t in (data.train_x, data.train_y, data.test_x, data.test_y):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        fp = h.hexdigest()[:16]
        data._fingerprint = fp
    return fp


def pretrain_cache_key(config, data: FederatedData, model_id: str | None = None) -> str:
    """Hash of everything the pretrained state depends on: the config fields that matter, the
    dataset's content and, for a user-supplied model factory, ``model_id`` (its object id: such
    starts are cached in memory only)."""
    fields = {f: getattr(config, f) for f in _PRETRAIN_FIELDS}
    fields["threads"] = config.resolved_threads()
    fields["data"] = data_fingerprint(data)
    fields["model_id"] = model_id
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def initial_state(config, make_model: Callable[[], nn.Module]) -> StateDict:
    """The seeded initial weights (torch's global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init"))
        return clone_state(make_model().state_dict())


def pretrained_state(
    config,
    data: FederatedData,
    trainer: Trainer,
    client_indices: list[np.ndarray],
    *,
    cache_dir: str | Path | None = None,
    model_id: str | None = None,
    progress: Callable[[dict], None] | None = None,
    executor=None,
    n_workers: int = 1,
) -> StateDict:
    """The global model the attack window starts from (computed once per config and cached).

    ``pretrain="fedavg"`` (default, spec 1.6): ``pretrain_rounds`` rounds of benign FedAvg (plain
    mean) over *all* clients, every one honest, from the seeded initial weights.
    ``"central"``: ``pretrain_epochs`` of centralised SGD on the union of the clients' data.
    ``"none"``: the initial weights. ``cache_dir`` adds an on-disk cache (safe to share; not
    used for a user-supplied model factory, identified by ``model_id``). With a process pool
    ``executor`` (registry models only), each FedAvg round's clients train in ``n_workers``
    chunks in parallel; every client keeps its own generator, so the result is the same.
    """
    key = pretrain_cache_key(config, data, model_id)
    if key in _PRETRAIN_CACHE:
        return clone_state(_PRETRAIN_CACHE[key])
    use_disk = cache_dir is not None and model_id is None
    path = Path(cache_dir) / f"pretrain-{key}.pt" if use_disk else None
    if path is not None and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            _PRETRAIN_CACHE[key] = state
            return clone_state(state)
        except (OSError, RuntimeError, ValueError, EOFError) as exc:  # corrupt: recompute
            log.warning("ignoring unreadable pretrain cache %s: %s", path, exc)

    theta = initial_state(config, trainer.make_model)
    x, y = data.train_x, data.train_y
    if config.pretrain == "fedavg":
        parallel = executor is not None and n_workers > 1 and model_id is None
        chunks = [list(c) for c in np.array_split(np.arange(len(client_indices)),
                                                  max(1, n_workers)) if len(c)]
        for r in range(config.pretrain_rounds):
            if parallel:
                futures = [executor.submit(_pretrain_clients_task, config.to_dict(), data, theta,
                                           r, [(int(c), client_indices[c]) for c in chunk])
                           for chunk in chunks]
                locals_ = [s for f in futures for s in f.result()]
            else:
                locals_ = [_pretrain_client(config, trainer, theta, r, cid, idx)
                           for cid, idx in enumerate(client_indices)]
            theta = mean_state(locals_, theta)
            if progress is not None:
                progress({"phase": "pretrain", "round": r + 1, "total": config.pretrain_rounds})
    elif config.pretrain == "central":
        idx = np.sort(np.concatenate(client_indices))
        gen = torch_generator(derive_seed(config.seed, "pretrain-central"))
        theta = trainer.train(theta, x[idx], y[idx], generator=gen,
                              epochs=config.pretrain_epochs)
        if progress is not None:
            progress({"phase": "pretrain", "round": 1, "total": 1})
    _PRETRAIN_CACHE[key] = clone_state(theta)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(theta, tmp)
        tmp.replace(path)
    return theta


def _pretrain_client(config, trainer: Trainer, theta: StateDict, r: int, cid: int,
                     idx: np.ndarray) -> StateDict:
    gen = torch_generator(derive_seed(config.seed, "pretrain", r, cid))
    return trainer.train(theta, trainer.data.train_x[idx], trainer.data.train_y[idx],
                         generator=gen)


_WORKER_TRAINERS: dict[str, Trainer] = {}


def _pretrain_clients_task(config_dict: dict, data: FederatedData, theta: StateDict, r: int,
                           items: list[tuple[int, np.ndarray]]) -> list[StateDict]:
    """Worker side of parallel pretraining: benign local training of some clients."""
    from .config import SimConfig
    from .models import model_factory

    config = SimConfig.from_dict(config_dict)
    key = json.dumps(config_dict, sort_keys=True) + data_fingerprint(data)
    if key not in _WORKER_TRAINERS:
        _WORKER_TRAINERS.clear()
        _WORKER_TRAINERS[key] = Trainer(config, data, model_factory(config, data))
    trainer = _WORKER_TRAINERS[key]
    torch.set_num_threads(config.resolved_threads())
    return [_pretrain_client(config, trainer, theta, r, cid, idx) for cid, idx in items]


def client_split(config, data: FederatedData) -> list[np.ndarray]:
    """The Dirichlet split of ``data``'s training set for ``config`` (seeded)."""
    return dirichlet_split(
        data.train_y,
        config.num_clients,
        config.alpha,
        min_samples=config.min_samples,
        seed=derive_seed(config.seed, "split"),
    )
