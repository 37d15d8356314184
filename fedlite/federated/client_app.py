"""The site side of federated training (Flower ClientApp).

On a train message a site loads the global trainable parameters into its model, trains on the
training part of its cases, and replies with the update Δθ = θ_local − θ_global (optionally DP-SGD,
optionally compressed with error feedback) plus aggregate metrics. On an evaluate message it scores
the global model on its validation part (``fedlite.data.holdout``) and replies with sufficient
statistics (``fedlite.eval_stats``). Nothing else leaves the site: no image, note, case id,
per-case prediction or explanation is ever put in a reply, and a failed job's error stays in the
site's log (``site_guard``).

The site's data directory comes from the SuperNode's node config (``data-dir``); in a simulation the
driver maps each simulated node's ``partition-id`` to a site of a split instead (``site.site_paths``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlite.data.loader import make_loader
from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats
from fedlite.federated.config import FederatedConfig
from fedlite.federated.downlink import received_parameters
from fedlite.federated.params import frozen_fingerprint, get_arrays, set_arrays, trainable_names
from fedlite.federated.preflight import check_own_data, data_check_reply
from fedlite.federated.site import site_paths
from fedlite.federated.site_guard import guarded
from fedlite.federated.site_update import local_update, stats_reply, update_reply
from fedlite.federated.task import build_initial_model, cached_dataset, cached_model
from fedlite.training import predict, resolve_device

log = logging.getLogger(__name__)


def _prepare_model(cfg: FederatedConfig, num_stages: int, trainable: list[str], fingerprint: str):
    """The cached model, rebuilt if its frozen part no longer matches the server's."""
    model = cached_model(cfg, num_stages)
    if frozen_fingerprint(model, trainable) != fingerprint:
        model = cached_model(cfg, num_stages, fresh=True)
        if frozen_fingerprint(model, trainable) != fingerprint:
            raise InputError("this site's frozen encoder weights differ from the server's",
                             hint="sites and server need the same preset, seed and local pretrained weights")
    return model


def global_model(msg: Message, cfg: FederatedConfig, context: Context):
    """The site's model holding the global parameters of ``msg``: its frozen part rebuilt locally
    (and proven equal to the server's by the fingerprint), the trainable part from the message (or
    from the site's copy of it, brought up to date by the message: ``fedlite.federated.downlink``)."""
    flat = dict(msg.content["config"])
    num_stages = int(flat["num-stages"])
    frozen = cfg.encoders_frozen(int(flat["server-round"]))
    trainable = trainable_names(cached_model(cfg, num_stages), frozen)
    model = _prepare_model(cfg, num_stages, trainable, str(flat["frozen-fingerprint"]))

    def own_values(names: list[str]):
        """Tensors that join the model that travels hold their initial values: the model in use still
        has them unless another simulated site in this process trained it; a fresh one always does."""
        yield get_arrays(model, names)
        yield get_arrays(build_initial_model(cfg, num_stages), names)

    global_arrays = received_parameters(msg, context, own_values)
    if set(global_arrays) != set(trainable):
        raise InputError(f"the server sent {len(global_arrays)} tensors, expected {len(trainable)}")
    set_arrays(model, global_arrays)
    model.set_encoders_frozen(frozen)
    return model, global_arrays


def train_site(msg: Message, context: Context, split_dir: str | Path | None = None) -> Message:
    compute_start = time.time()  # wall clock, so the server can tell its sites' work from transport
    flat = dict(msg.content["config"])
    cfg = FederatedConfig.from_flat(flat)
    server_round = int(flat["server-round"])
    data_dir = site_paths(context, split_dir).data_dir
    model, global_arrays = global_model(msg, cfg, context)

    dataset = cached_dataset(data_dir, cfg, model, "train")
    dataset.seed = cfg.seed + 7919 * server_round  # fresh augmentations every round, still reproducible
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    update = local_update(model, global_arrays, loader, cfg, server_round, context, resolve_device(cfg.device))
    update.metrics.update({"compute-start": compute_start, "compute-end": time.time()})
    return update_reply(msg, update, data_dir.name, cfg.compress)


def evaluate_site(msg: Message, context: Context, split_dir: str | Path | None = None) -> Message:
    """Score the global model on this site's validation part; reply with counts and sums only."""
    start = time.perf_counter()
    cfg = FederatedConfig.from_flat(dict(msg.content["config"]))
    data_dir = site_paths(context, split_dir).data_dir
    model, _ = global_model(msg, cfg, context)
    dataset = cached_dataset(data_dir, cfg, model, "val")
    if len(dataset):
        probabilities = predict(model, make_loader(dataset, cfg.batch_size, shuffle=False), resolve_device(cfg.device))
        stats = EvalStats.from_predictions(dataset.leukemia.numpy(), dataset.stage.numpy(), *probabilities)
    else:
        stats = EvalStats.empty(len(cfg.stages))
    return stats_reply(msg, stats, data_dir.name, time.perf_counter() - start)


def check_site_data(msg: Message, context: Context, split_dir: str | Path | None = None) -> Message:
    """Before a run starts: this site's data validated and every image decoded; counts only go back."""
    data_dir = site_paths(context, split_dir).data_dir
    return data_check_reply(msg, check_own_data(data_dir), data_dir.name)


def make_client_app(split_dir: str | Path | None = None, site_defaults: dict[str, str] | None = None) -> ClientApp:
    """``site_defaults``: bundle and cache-dir of simulated sites (a deployed site's come from its
    node config)."""
    client = ClientApp()
    defaults = site_defaults or {}

    @client.train()
    @guarded
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("mode") == "edge":
            from fedlite.agents.edge_client import edge_train

            return edge_train(msg, context, split_dir, defaults)
        return train_site(msg, context, split_dir)

    @client.evaluate()
    @guarded
    def evaluate(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("mode") == "edge":
            from fedlite.agents.edge_client import edge_evaluate

            return edge_evaluate(msg, context, split_dir, defaults)
        return evaluate_site(msg, context, split_dir)

    @client.query("datacheck")
    @guarded
    def datacheck(msg: Message, context: Context) -> Message:
        return check_site_data(msg, context, split_dir)

    # The federated export's jobs (export/site_tasks.py).
    def export_task(name: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            from fedlite.export import site_tasks

            return getattr(site_tasks, name)(msg, context, split_dir, defaults)
        return guarded(handle)

    client.query("teacher")(export_task("receive_teacher"))
    client.train("distill")(export_task("distill_site"))
    client.query("importance")(export_task("importance_site"))
    client.query("calibrate")(export_task("calibrate_site"))
    client.evaluate("parity")(export_task("parity_site"))
    return client


# For Flower's deployment engine (`flwr run .`): sites find their data through node config.
app = make_client_app()
