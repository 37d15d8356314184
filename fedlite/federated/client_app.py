"""The site side of federated training (Flower ClientApp).

On a train message a site loads the global trainable parameters into its model, trains on its own
cases, and replies with the update Δθ = θ_local − θ_global (optionally DP-SGD, optionally
compressed with error feedback) plus aggregate metrics. Nothing else leaves the site: no image, note,
per-case prediction or explanation is ever put in a reply.

The site's data directory comes from the SuperNode's node config (``data-dir``); in a simulation the
driver maps each simulated node's ``partition-id`` to a site of a split instead.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlite.data.loader import make_loader
from fedlite.errors import InputError
from fedlite.federated.compress import encode_update
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import (from_record, frozen_fingerprint, get_arrays, set_arrays, to_record,
                                      trainable_names)
from fedlite.federated.task import cached_dataset, cached_model
from fedlite.training import TrainConfig, resolve_device, train_local

log = logging.getLogger(__name__)
RESIDUAL = "fedlite-residual"
ACCOUNTANT = "fedlite-accountant"


def site_data_dir(context: Context, split_dir: str | Path | None) -> Path:
    """Where this site's cases are: node config ``data-dir``, or a split's site by partition id."""
    node = context.node_config
    if "data-dir" in node:
        return Path(str(node["data-dir"]))
    if split_dir is not None and "partition-id" in node:
        from fedlite.data.split import load_split

        sites = load_split(split_dir).sites
        return Path(split_dir) / sites[int(node["partition-id"])]
    raise InputError("this site has no data directory",
                     hint="start the SuperNode with --node-config 'data-dir=\"/path/to/site\"'")


def _prepare_model(cfg: FederatedConfig, num_stages: int, trainable: list[str], fingerprint: str):
    """The cached model, rebuilt if its frozen part no longer matches the server's."""
    model = cached_model(cfg, num_stages)
    if frozen_fingerprint(model, trainable) != fingerprint:
        model = cached_model(cfg, num_stages, fresh=True)
        if frozen_fingerprint(model, trainable) != fingerprint:
            raise InputError("this site's frozen encoder weights differ from the server's",
                             hint="sites and server need the same preset, seed and local pretrained weights")
    return model


def train_site(msg: Message, context: Context, split_dir: str | Path | None = None) -> Message:
    compute_start = time.time()  # wall clock, so the server can tell its sites' work from transport
    flat = dict(msg.content["config"])
    cfg = FederatedConfig.from_flat(flat)
    server_round = int(flat["server-round"])
    data_dir = site_data_dir(context, split_dir)
    num_stages = int(flat["num-stages"])
    frozen = cfg.encoders_frozen(server_round)
    trainable = trainable_names(cached_model(cfg, num_stages), frozen)
    model = _prepare_model(cfg, num_stages, trainable, str(flat["frozen-fingerprint"]))
    global_arrays = from_record(msg.content["arrays"])
    if set(global_arrays) != set(trainable):
        raise InputError(f"the server sent {len(global_arrays)} tensors, expected {len(trainable)}")
    set_arrays(model, global_arrays)
    model.set_encoders_frozen(frozen)

    device = resolve_device(cfg.device)
    dataset = cached_dataset(data_dir, cfg, model, train=True)
    dataset.seed = cfg.seed + 7919 * server_round  # fresh augmentations every round, still reproducible
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    train_config = TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                               optimizer=cfg.optimizer, gamma=cfg.gamma, proximal_mu=cfg.proximal_mu)
    lr = cfg.lr_for_round(server_round)
    metrics: dict[str, float | int] = {}
    train_start = time.time()
    if cfg.dp:
        from fedlite.federated.privacy import PrivacyConfig, dp_train_local, epsilon

        privacy = PrivacyConfig(cfg.noise_multiplier, cfg.max_grad_norm, cfg.dp_delta)
        state = load_accountant(context)
        stats, state = dp_train_local(model, loader, train_config, device, lr, lr, privacy,
                                      accountant_state=state, epochs=cfg.local_epochs)
        store_accountant(context, state)
        metrics["epsilon"] = float(epsilon(state, cfg.dp_delta))
    else:
        anchors = {n: torch.from_numpy(v) for n, v in global_arrays.items()} if cfg.proximal_mu > 0 else None
        stats = train_local(model, loader, train_config, device, lr, lr, epochs=cfg.local_epochs,
                            global_params=anchors, progress=False)
    train_end = time.time()
    local = get_arrays(model, trainable)
    delta = {n: local[n] - global_arrays[n] for n in trainable}
    if cfg.compress:
        residual = load_residual(context, delta)
        encoded, residual = encode_update(delta, residual, topk_fraction=cfg.topk_fraction)
        store_residual(context, residual)
        arrays = encoded
    else:
        arrays = delta
    metrics.update({"num-examples": len(dataset), "train-loss": stats.mean_loss,
                    "train-seconds": stats.seconds, "peak-memory-mb": stats.peak_memory_mb,
                    "steps": stats.steps, "samples": stats.samples,
                    "train-start": train_start, "train-end": train_end,
                    "compute-start": compute_start, "compute-end": time.time()})
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics),
                          "info": ConfigRecord({"site": data_dir.name, "compressed": cfg.compress})})
    return Message(content, reply_to=msg)


def load_residual(context: Context, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """What earlier rounds did not send; tensors that just became trainable start from zero."""
    if RESIDUAL not in context.state:
        return None
    kept = from_record(context.state[RESIDUAL])
    return {n: kept[n] if n in kept and kept[n].shape == v.shape else np.zeros_like(v) for n, v in delta.items()}


def store_residual(context: Context, residual: dict[str, np.ndarray]) -> None:
    context.state[RESIDUAL] = to_record(residual)


def load_accountant(context: Context) -> dict | None:
    if ACCOUNTANT not in context.state:
        return None
    return json.loads(str(context.state[ACCOUNTANT]["history"]))


def store_accountant(context: Context, state: dict) -> None:
    context.state[ACCOUNTANT] = ConfigRecord({"history": json.dumps(state)})


def make_client_app(split_dir: str | Path | None = None, edge_defaults: dict[str, str] | None = None) -> ClientApp:
    """``edge_defaults``: bundle and cache-dir of simulated sites in edge fine-tuning (a deployed
    agent's come from its node config)."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("mode") == "edge":
            from fedlite.agents.edge_client import edge_train

            return edge_train(msg, context, split_dir, edge_defaults or {})
        return train_site(msg, context, split_dir)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Only edge fine-tuning asks sites to evaluate; full-model runs evaluate on the server."""
        from fedlite.agents.edge_client import edge_evaluate

        if msg.content["config"].get("mode") != "edge":
            raise InputError("this site evaluates only the heads of edge fine-tuning runs")

        return edge_evaluate(msg, context, split_dir, edge_defaults or {})

    return client


# For Flower's deployment engine (`flwr run .`): sites find their data through node config.
app = make_client_app()
