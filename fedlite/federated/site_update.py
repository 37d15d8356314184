"""What a site does with global parameters, written once for every job that trains at the sites.

``local_update`` trains a model that holds the global parameters (plain or DP-SGD with the site's
own privacy accountant, FedProx's term when asked), takes the delta of the parameters that travel
and, when asked, encodes it with the update codec, keeping what it did not send as the residual for
the next round. ``update_reply`` and ``stats_reply`` are the only two shapes a site's answer takes:
parameters with aggregate metrics, or aggregate statistics. Full-model training, distillation and
edge fine-tuning of a bundle's head all go through here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch.utils.data import DataLoader

from fedlite.eval_stats import EvalStats
from fedlite.federated.compress import encode_update, pack_encoded
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import get_arrays
from fedlite.federated.records import from_record, to_record
from fedlite.training import TrainConfig, train_local

RESIDUAL = "fedlite-residual"
ACCOUNTANT = "fedlite-accountant"


@dataclass
class LocalUpdate:
    arrays: dict[str, np.ndarray]  # the delta, encoded when the run compresses
    metrics: dict[str, float | int]


def local_update(model: torch.nn.Module, global_arrays: dict[str, np.ndarray], loader: DataLoader,
                 cfg: FederatedConfig, server_round: int, context: Context, device: torch.device,
                 train=None) -> LocalUpdate:
    """Train ``model`` (already holding ``global_arrays``) for the run's local epochs and return its
    update of ``global_arrays``' tensors. ``train(model, loader, config, device, lr)`` replaces the
    plain training loop (distillation does); DP-SGD always uses Opacus' loop."""
    config = TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                         gamma=cfg.gamma, proximal_mu=cfg.proximal_mu)
    lr = cfg.lr_for_round(server_round)
    metrics: dict[str, float | int] = {}
    train_start = time.time()  # wall clock, so the server can tell its sites' work from transport
    if cfg.dp:
        from fedlite.federated.privacy import PrivacyConfig, dp_train_local, epsilon

        privacy = PrivacyConfig(cfg.noise_multiplier, cfg.max_grad_norm, cfg.dp_delta)
        stats, state = dp_train_local(model, loader, config, device, lr, lr, privacy,
                                      accountant_state=load_accountant(context), epochs=cfg.local_epochs)
        store_accountant(context, state)
        metrics["epsilon"] = float(epsilon(state, cfg.dp_delta))
    elif train is not None:
        stats = train(model, loader, config, device, lr)
    else:
        anchors = {n: torch.from_numpy(v) for n, v in global_arrays.items()} if cfg.proximal_mu > 0 else None
        stats = train_local(model, loader, config, device, lr, lr, epochs=cfg.local_epochs,
                            global_params=anchors, progress=False)
    train_end = time.time()
    local = get_arrays(model, list(global_arrays))
    delta = {n: local[n] - global_arrays[n] for n in global_arrays}
    arrays = delta
    if cfg.compress:
        encoded, residual = encode_update(delta, load_residual(context, delta),
                                            topk_fraction=cfg.topk_for_round(server_round))
        arrays = pack_encoded(encoded)
        store_residual(context, residual)
    metrics.update({"num-examples": len(loader.dataset), "train-loss": stats.mean_loss,
                    "train-seconds": stats.seconds, "peak-memory-mb": stats.peak_memory_mb,
                    "steps": stats.steps, "samples": stats.samples, "train-start": train_start,
                    "train-end": train_end})
    return LocalUpdate(arrays, metrics)


def update_reply(msg: Message, update: LocalUpdate, site: str, compressed: bool) -> Message:
    content = RecordDict({"arrays": to_record(update.arrays), "metrics": MetricRecord(update.metrics),
                          "info": ConfigRecord({"site": site, "compressed": compressed})})
    return Message(content, reply_to=msg)


def stats_reply(msg: Message, stats: EvalStats, site: str, seconds: float) -> Message:
    """The only thing an evaluation sends back: aggregate counts and sums, the case count, the time."""
    content = RecordDict({"stats": to_record(stats.to_arrays()),
                          "metrics": MetricRecord({"num-examples": stats.cases, "eval-seconds": seconds}),
                          "info": ConfigRecord({"site": site})})
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
