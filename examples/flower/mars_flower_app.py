"""The Flower apps of the example: a ClientApp (honest or MRA attacker) and a ServerApp (MARS).

Everything experimental comes from the simulation arena of ``mars_native.sim``, so the example
runs the same digits data, Dirichlet split, DigitsCNN, local training and model-replacement
attack (MRA: blind-loss backdoor training, then the update scaled by ``gamma``) as
``mars-native simulate``. Partitions ``0 .. num_attackers-1`` are the attackers, as in the arena.

Clients learn the experiment from the ``ConfigRecord`` the server sends every round (keys are
the :class:`~mars_native.sim.SimConfig` field names plus ``gamma``); the ServerApp reads its
settings from ``SETTINGS``, which ``run.py`` fills before ``run_simulation``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from mars_native.sim.attacks.base import RoundContext, Upload
from mars_native.sim.attacks.mra import MRA
from mars_native.sim.config import SimConfig
from mars_native.sim.data import load_dataset
from mars_native.sim.models import model_factory
from mars_native.sim.training import (
    Trainer,
    client_split,
    derive_seed,
    initial_state,
    torch_generator,
)

#: SimConfig fields sent to the clients in every round's ConfigRecord.
SHARED_FIELDS = (
    "num_clients",
    "num_attackers",
    "seed",
    "alpha",
    "min_samples",
    "test_size",
    "local_epochs",
    "batch_size",
    "lr",
    "attacker_epochs",
    "attacker_lr",
    "poison_fraction",
    "target_label",
)

#: Filled by run.py before the simulation starts (the ServerApp runs in run.py's process).
SETTINGS: dict[str, Any] = {}
RESULTS: dict[str, Any] = {}


@functools.lru_cache(maxsize=4)
def _setup(config_json: str):
    """Data, split, model factory and trainer of a config (cached per process)."""
    config = SimConfig.from_dict(json.loads(config_json))
    data = load_dataset(config)
    make_model = model_factory(config, data)
    return config, data, client_split(config, data), make_model, Trainer(config, data, make_model)


def setup(config: SimConfig):
    return _setup(json.dumps(config.to_dict(), sort_keys=True))


def config_from_record(record: ConfigRecord) -> SimConfig:
    fields = {k: record[k] for k in SHARED_FIELDS}
    return SimConfig(threads=1, **fields)


# ----------------------------------------------------------------------------------- client
client = ClientApp()


def mra_upload(config, data, split, make_model, trainer, theta, pid: int, rnd: int, gamma: float):
    """The arena's MRA attacker for one round: blind-loss training, then the scaled update."""
    attack = MRA(gamma=gamma)
    attack.setup(config, data.input_shape, data.normalize)
    gen = torch_generator(derive_seed(config.seed, "attack", rnd))
    attackers = config.attacker_ids
    ctx = RoundContext(
        round_idx=rnd - 1,
        global_state=theta,
        sampled_ids=list(range(config.num_clients)),
        attacker_ids=attackers,
        all_attacker_ids=attackers,
        num_clients=config.num_clients,
        config=config,
        make_model=make_model,
        client_data=lambda cid: (data.train_x[split[cid]], data.train_y[split[cid]]),
        train_benign=lambda s, x, y: trainer.train(s, x, y, generator=gen),
        generator=gen,
        rng=np.random.default_rng(derive_seed(config.seed, "attack-np", rnd)),
    )
    attack.begin_round(ctx)
    local = attack.train_attacker(ctx, pid)
    upload = Upload(client_id=pid, state=local, num_examples=len(split[pid]), is_attacker=True)
    return attack.finalize_uploads(ctx, [upload])[0].state


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    rnd = int(cfg["server-round"])
    config, data, split, make_model, trainer = setup(config_from_record(cfg))
    theta = dict(msg.content["arrays"].to_torch_state_dict())
    is_attacker = pid in config.attacker_ids
    if is_attacker:
        state = mra_upload(
            config, data, split, make_model, trainer, theta, pid, rnd, float(cfg["gamma"])
        )
    else:
        x, y = data.train_x[split[pid]], data.train_y[split[pid]]
        gen = torch_generator(derive_seed(config.seed, "client", rnd, pid))
        state = trainer.train(theta, x, y, generator=gen)
    metrics = MetricRecord(
        {"num-examples": len(split[pid]), "partition-id": pid, "attacker": int(is_attacker)}
    )
    return Message(
        content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg
    )


# ----------------------------------------------------------------------------------- server
server = ServerApp()


def no_client_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """The replies' metrics are bookkeeping (partition id), not something to average."""
    return MetricRecord()


def make_strategy(name: str, n: int, report_path: str | None):
    common = {
        "fraction_evaluate": 0.0,  # evaluation is centralised (evaluate_fn below)
        "min_train_nodes": n,  # sample every node, also while nodes are still registering
        "min_available_nodes": n,
        "train_metrics_aggr_fn": no_client_metrics,
    }
    if name == "fedavg":
        return FedAvg(**common)
    from mars_native.flower import Mars

    selection = "majority" if name == "mars-star" else "norm"
    return Mars(selection=selection, report_path=report_path, **common)


def pretrain(config: SimConfig, data, trainer: Trainer, epochs: int) -> dict:
    """The starting model: a few epochs of centralised SGD (lr 0.01) on the training set.

    Backdoor defenses are evaluated on a model that already works (the arena pretrains too);
    a smaller learning rate than the clients' keeps full-data training stable.
    """
    theta = initial_state(config, trainer.make_model)
    gen = torch_generator(derive_seed(config.seed, "pretrain-central"))
    return trainer.train(theta, data.train_x, data.train_y, generator=gen, epochs=epochs, lr=0.01)


@server.main()
def main(grid: Grid, context: Context) -> None:
    import random

    random.seed(0)  # Flower's node sampling
    config: SimConfig = SETTINGS["config"]
    config, data, _split, _make_model, trainer = setup(config)
    theta = pretrain(config, data, trainer, SETTINGS["pretrain_epochs"])
    trigger = MRA().pattern.setup(data.input_shape, data.normalize)
    evaluations: dict[int, tuple[float, float]] = {}

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        ev = trainer.evaluate(dict(arrays.to_torch_state_dict()), trigger.stamp)
        evaluations[rnd] = (ev.acc, ev.asr)
        return MetricRecord({"acc": ev.acc, "asr": ev.asr})

    strategy = make_strategy(SETTINGS["strategy"], config.num_clients, SETTINGS.get("report"))
    train_config = ConfigRecord(
        {**{k: getattr(config, k) for k in SHARED_FIELDS}, "gamma": float(SETTINGS["gamma"])}
    )
    RESULTS["strategy"] = strategy
    RESULTS["evaluations"] = evaluations
    RESULTS["result"] = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(theta),
        num_rounds=SETTINGS["rounds"],
        train_config=train_config,
        evaluate_fn=evaluate,
    )
