"""The training job at a site: train the global model on the site's training part, or score it on
its validation part (``fedlite.data.holdout``).

A train reply is the update Δθ = θ_local − θ_global (optionally DP-SGD, optionally compressed with
error feedback) plus aggregate metrics; an evaluate reply is sufficient statistics
(``fedlite.eval_stats``). Kept apart from ``client_app``, which imports it when such a message
arrives, so that a site's light handlers (the data check) start without torch, timm or transformers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from fedlite.data.loader import make_loader
from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats
from fedlite.federated.config import FederatedConfig
from fedlite.federated.downlink import received_parameters
from fedlite.federated.frozen_embeddings import EmbeddingWork, frozen_eval_loader, frozen_round_loader
from fedlite.federated.params import frozen_fingerprint, get_arrays, set_arrays, trainable_names
from fedlite.federated.site import SitePaths, site_paths
from fedlite.federated.site_update import LocalUpdate, local_update, stats_reply, update_reply
from fedlite.federated.task import build_initial_model, cached_dataset, cached_model
from fedlite.model import FedMMX
from fedlite.training import predict, resolve_device


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


def _embedding_cache(cfg: FederatedConfig, server_round: int, node: dict[str, str]) -> Path | None:
    """Where this round's frozen encoders' embeddings live: the site's cache directory, in a frozen
    round of a run that caches (``embedding-views``); None: run the encoders at every step."""
    if not (cfg.encoders_frozen(server_round) and cfg.embedding_views and node.get("cache-dir")):
        return None
    return Path(node["cache-dir"])


def train_site(msg: Message, context: Context, split_dir: str | Path | None = None,
               defaults: dict[str, str] | None = None) -> Message:
    compute_start = time.time()  # wall clock, so the server can tell its sites' work from transport
    flat = dict(msg.content["config"])
    cfg = FederatedConfig.from_flat(flat)
    paths = site_paths(context, split_dir, defaults)
    model, global_arrays = global_model(msg, cfg, context)
    update = local_round(model, global_arrays, cfg, int(flat["server-round"]), str(flat["frozen-fingerprint"]),
                         paths, context)
    update.metrics.update({"compute-start": compute_start, "compute-end": time.time()})
    return update_reply(msg, update, paths.name, cfg.compress)


def local_round(model: FedMMX, global_arrays: dict[str, np.ndarray], cfg: FederatedConfig, server_round: int,
                encoders: str, paths: SitePaths, context: Context) -> LocalUpdate:
    """The site's round on its training part, ``model`` holding the global parameters: on cached
    embeddings in a frozen round when the site has a cache directory, else on images and notes.
    ``encoders``: the frozen fingerprint the coordinator sent (what cached embeddings are keyed by)."""
    device = resolve_device(cfg.device)
    dataset = cached_dataset(paths.data_dir, cfg, model, "train")
    cache, work = _embedding_cache(cfg, server_round, paths.node), EmbeddingWork()
    if cache is not None:
        dataset.seed = cfg.seed  # a view's augmentation is the same every round: it is cached
        loader = frozen_round_loader(model, dataset, cfg, server_round, encoders, cache, device, work)
    else:
        dataset.seed = cfg.seed + 7919 * server_round  # fresh augmentations every round, still reproducible
        loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    update = local_update(model, global_arrays, loader, cfg, server_round, context, device)
    if cache is not None:  # what the embeddings cost this round, and whether all came from the cache
        update.metrics.update({"embed-seconds": work.seconds, "embeddings-cached": int(work.computed == 0)})
    return update


def evaluate_site(msg: Message, context: Context, split_dir: str | Path | None = None,
                  defaults: dict[str, str] | None = None) -> Message:
    """Score the global model on this site's validation part; reply with counts and sums only."""
    start = time.perf_counter()
    flat = dict(msg.content["config"])
    cfg = FederatedConfig.from_flat(flat)
    paths = site_paths(context, split_dir, defaults)
    model, _ = global_model(msg, cfg, context)
    device = resolve_device(cfg.device)
    dataset = cached_dataset(paths.data_dir, cfg, model, "val")
    if len(dataset):
        cache = _embedding_cache(cfg, int(flat["server-round"]), paths.node)
        loader = make_loader(dataset, cfg.batch_size, shuffle=False) if cache is None else frozen_eval_loader(
            model, dataset, cfg, str(flat["frozen-fingerprint"]), cache, device, EmbeddingWork())
        probabilities = predict(model, loader, device)
        stats = EvalStats.from_predictions(dataset.leukemia.numpy(), dataset.stage.numpy(), *probabilities)
    else:
        stats = EvalStats.empty(len(cfg.stages))
    return stats_reply(msg, stats, paths.name, time.perf_counter() - start)
