"""The hospital agent's side of edge fine-tuning: train the bundle's head on the site's own cases.

On a train message the site embeds its cases with the bundle's INT8 encoders (once per encoder
version, cached on disk), loads the global head weights from the message, trains the fusion layer
and heads on the embeddings of its training part for E epochs (optionally DP-SGD), and replies with
the update of the head only, compressed with the federated codec and its error feedback. On an
evaluate message it scores the global head on its validation part, which never trains
(``fedlite.data.holdout``), and replies with sufficient statistics (``fedlite.eval_stats``).
Replies hold parameters and aggregate statistics: no image, note, embedding, prediction or
explanation ever leaves the site.

Where the site's files are comes from its SuperNode's node config (``bundle``, ``data-dir``,
``cache-dir``, ``threads``), which ``fedlite agent run`` sets from the agent's config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from fedlite.agents.embedding_cache import SiteEmbeddings, site_embeddings
from fedlite.agents.runtime import BundleRuntime, RuntimeSettings
from fedlite.data.holdout import site_parts
from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats
from fedlite.export.bundle import encoder_fingerprint
from fedlite.federated.site import FederatedConfig, job_settings, received_arrays, site_paths
from fedlite.federated.site_update import LocalUpdate, local_update, stats_reply, update_reply

log = logging.getLogger(__name__)
_RUNTIMES: dict[tuple, BundleRuntime] = {}


def site_runtime(bundle: Path, threads: int = 0, public_key: str = "") -> BundleRuntime:
    """One verified runtime per bundle per process; a bundle replaced on disk is loaded and verified
    anew. With ``public_key`` (the agent's pinned key) only a bundle its holder signed is used."""
    manifest = bundle / "bundle.json"
    key = (str(bundle.resolve()), manifest.stat().st_mtime_ns if manifest.exists() else 0, threads, public_key)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = BundleRuntime(bundle, RuntimeSettings(threads=threads), public_key=public_key or None)
    return _RUNTIMES[key]


@dataclass
class EdgeSite:
    runtime: BundleRuntime
    train: SiteEmbeddings
    val: SiteEmbeddings | None  # None when the site holds no validation cases
    name: str


def _site(msg: Message, context: Context, split_dir: str | Path | None, defaults: dict[str, str]) -> EdgeSite:
    """The site's verified bundle and the embeddings of its training and validation parts."""
    paths = site_paths(context, split_dir, defaults)
    runtime = site_runtime(paths.path("bundle"), int(paths.node.get("threads", 0)),
                           paths.node.get("bundle-public-key", ""))
    flat, cfg = job_settings(msg)
    if encoder_fingerprint(runtime.meta) != str(flat["encoder-fingerprint"]):
        raise InputError("this site's bundle has other encoders than the coordinator's",
                         path=paths.path("bundle"), hint="install the bundle the coordinator fine-tunes")
    parts = site_parts(paths.data_dir, cfg.site_val_fraction)
    if list(parts.train.info.stage_names) != list(runtime.stage_names):
        raise InputError(f"the site's stages {list(parts.train.info.stage_names)} differ from the bundle's "
                         f"{runtime.stage_names}", path=parts.train.root / "dataset.json")
    cache = paths.path("cache-dir")
    val = site_embeddings(runtime, parts.val, cache) if parts.val.cases else None
    return EdgeSite(runtime, site_embeddings(runtime, parts.train, cache), val, paths.name)


def train_head(runtime: BundleRuntime, embeddings: SiteEmbeddings, global_arrays: dict[str, np.ndarray],
               cfg: FederatedConfig, server_round: int, context: Context) -> LocalUpdate:
    """One edge round at a site: the bundle's head, holding the global weights, trained on the site's
    embeddings; returns the update as the site sends it (compressed, with error feedback, when the
    run compresses). What ``fedlite bench`` times as the agent's training round."""
    from fedlite.data.embedded import EmbeddedCases, embedding_loader
    from fedlite.export.head_swap import fusion_head_from_weights
    from fedlite.training import resolve_device

    head = fusion_head_from_weights(runtime.meta, global_arrays)
    cases = EmbeddedCases({0: embeddings.image}, embeddings.text, embeddings.leukemia, embeddings.stage)
    loader = embedding_loader(cases, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    # a head of a few thousand weights: a GPU would not pay off
    return local_update(head, global_arrays, loader, cfg, server_round, context, resolve_device("cpu"))


def edge_train(msg: Message, context: Context, split_dir: str | Path | None, defaults: dict[str, str]) -> Message:
    flat, cfg = job_settings(msg)
    site = _site(msg, context, split_dir, defaults)
    update = train_head(site.runtime, site.train, received_arrays(msg), cfg, int(flat["server-round"]), context)
    update.metrics.update({"embed-seconds": site.train.seconds, "embeddings-cached": int(site.train.cached)})
    return update_reply(msg, update, site.name, cfg.compress)


def evaluate_head(runtime: BundleRuntime, embeddings: SiteEmbeddings, arrays: dict[str, np.ndarray]) -> EvalStats:
    """The head with these weights on the site's embeddings, through the torch head (equal to the
    bundle's head graph; checked whenever a bundle is rewritten)."""
    import torch

    from fedlite.export.head_swap import fusion_head_from_weights

    head = fusion_head_from_weights(runtime.meta, arrays).eval()
    with torch.no_grad():
        out = head.classify(torch.from_numpy(embeddings.image), torch.from_numpy(embeddings.text))
        leukemia, stage = out.leukemia_logits.softmax(-1).numpy(), out.stage_logits.softmax(-1).numpy()
    return EvalStats.from_predictions(embeddings.leukemia, embeddings.stage, leukemia, stage)


def edge_evaluate(msg: Message, context: Context, split_dir: str | Path | None, defaults: dict[str, str]) -> Message:
    """The global head scored on the site's validation part, as statistics only."""
    start = time.perf_counter()
    site = _site(msg, context, split_dir, defaults)
    arrays = received_arrays(msg)
    stats = (evaluate_head(site.runtime, site.val, arrays) if site.val is not None
             else EvalStats.empty(len(site.runtime.stage_names)))
    return stats_reply(msg, stats, site.name, time.perf_counter() - start)
