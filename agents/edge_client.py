"""The hospital agent's side of edge fine-tuning: train the bundle's head on the site's own cases.

On a train message the site embeds its cases with the bundle's INT8 encoders (once per encoder
version, cached on disk), loads the global head weights from the message, trains the fusion layer
and heads on the embeddings for E epochs (optionally DP-SGD), and replies with the update of the
head only, compressed with the federated codec and its error feedback. On an evaluate message it
replies with the global head's metrics on its cases. Replies hold parameters and aggregate metrics:
no image, note, embedding, prediction or explanation ever leaves the site.

Where the site's files are comes from its SuperNode's node config (``bundle``, ``data-dir``,
``cache-dir``, ``threads``), which ``fedlite agent run`` sets from the agent's config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlite.agents.embedding_cache import SiteEmbeddings, encoder_fingerprint, site_embeddings
from fedlite.agents.runtime import BundleRuntime, RuntimeSettings
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import from_record, to_record

log = logging.getLogger(__name__)
_RUNTIMES: dict[tuple, BundleRuntime] = {}
METRIC_KEYS = ("loss", "accuracy", "auc", "stage_macro_f1")


def site_paths(context: Context, split_dir: str | Path | None, defaults: dict[str, str]) -> dict[str, Path]:
    """bundle, data-dir and cache-dir of this site: node config first, then the simulation's defaults."""
    from fedlite.federated.client_app import site_data_dir

    node = {**defaults, **{k: str(v) for k, v in context.node_config.items()}}
    missing = [k for k in ("bundle", "cache-dir") if not node.get(k)]
    if missing:
        raise InputError(f"this site's node config lacks {', '.join(missing)}",
                         hint="start the agent with `fedlite agent run --config agent.toml`")
    return {"bundle": Path(node["bundle"]), "cache-dir": Path(node["cache-dir"]),
            "data-dir": site_data_dir(context, split_dir)}


def site_runtime(bundle: Path, threads: int = 0) -> BundleRuntime:
    """One verified runtime per bundle per process; a bundle replaced on disk is loaded and verified anew."""
    manifest = bundle / "bundle.json"
    key = (str(bundle.resolve()), manifest.stat().st_mtime_ns if manifest.exists() else 0, threads)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = BundleRuntime(bundle, RuntimeSettings(threads=threads))
    return _RUNTIMES[key]


def _site(msg: Message, context: Context, split_dir: str | Path | None,
          defaults: dict[str, str]) -> tuple[BundleRuntime, SiteEmbeddings, str]:
    paths = site_paths(context, split_dir, defaults)
    runtime = site_runtime(paths["bundle"], int(context.node_config.get("threads", 0)))
    expected = str(msg.content["config"]["encoder-fingerprint"])
    if encoder_fingerprint(runtime.meta) != expected:
        raise InputError("this site's bundle has other encoders than the coordinator's",
                         path=paths["bundle"], hint="install the bundle the coordinator fine-tunes")
    dataset = read_dataset(paths["data-dir"])
    if list(dataset.info.stage_names) != list(runtime.stage_names):
        raise InputError(f"the site's stages {list(dataset.info.stage_names)} differ from the bundle's "
                         f"{runtime.stage_names}", path=dataset.root / "dataset.json")
    return runtime, site_embeddings(runtime, dataset, paths["cache-dir"]), paths["data-dir"].name


def embedding_loader(embeddings: SiteEmbeddings, batch_size: int, seed: int):
    """Shuffled batches of a site's embeddings and labels, shaped as the training loops take them."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Embedded(Dataset):
        def __len__(self) -> int:
            return len(embeddings)

        def __getitem__(self, i: int) -> dict:
            return {"image_embedding": torch.from_numpy(embeddings.image[i]),
                    "text_embedding": torch.from_numpy(embeddings.text[i]),
                    "leukemia": torch.tensor(embeddings.leukemia[i]), "stage": torch.tensor(embeddings.stage[i])}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(Embedded(), batch_size=batch_size, shuffle=True, generator=generator)


def edge_train(msg: Message, context: Context, split_dir: str | Path | None, defaults: dict[str, str]) -> Message:
    from fedlite.export.head_swap import fusion_head_from_weights
    from fedlite.federated.client_app import load_accountant, load_residual, store_accountant, store_residual
    from fedlite.federated.compress import encode_update
    from fedlite.federated.params import get_arrays
    from fedlite.training import TrainConfig, resolve_device, train_local

    flat = dict(msg.content["config"])
    cfg = FederatedConfig.from_flat(flat)
    server_round = int(flat["server-round"])
    runtime, embeddings, site = _site(msg, context, split_dir, defaults)
    global_arrays = from_record(msg.content["arrays"])
    head = fusion_head_from_weights(runtime.meta, global_arrays)
    loader = embedding_loader(embeddings, cfg.batch_size, cfg.seed + server_round)
    config = TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                         gamma=cfg.gamma)
    lr = cfg.lr_for_round(server_round)
    device = resolve_device("cpu")  # a head of a few thousand weights: a GPU would not pay off
    metrics: dict[str, float | int] = {}
    if cfg.dp:
        from fedlite.federated.privacy import PrivacyConfig, dp_train_local, epsilon

        stats, state = dp_train_local(head, loader, config, device, lr, lr,
                                      PrivacyConfig(cfg.noise_multiplier, cfg.max_grad_norm, cfg.dp_delta),
                                      accountant_state=load_accountant(context), epochs=cfg.local_epochs)
        store_accountant(context, state)
        metrics["epsilon"] = float(epsilon(state, cfg.dp_delta))
    else:
        stats = train_local(head, loader, config, device, lr, lr, epochs=cfg.local_epochs, progress=False)
    local = get_arrays(head, list(global_arrays))
    delta = {n: local[n] - global_arrays[n] for n in global_arrays}
    arrays = delta
    if cfg.compress:
        arrays, residual = encode_update(delta, load_residual(context, delta), topk_fraction=cfg.topk_fraction)
        store_residual(context, residual)
    metrics.update({"num-examples": len(embeddings), "train-loss": stats.mean_loss, "train-seconds": stats.seconds,
                    "peak-memory-mb": stats.peak_memory_mb, "steps": stats.steps, "samples": stats.samples,
                    "embed-seconds": embeddings.seconds, "embeddings-cached": int(embeddings.cached)})
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics),
                          "info": ConfigRecord({"site": site, "compressed": cfg.compress})})
    return Message(content, reply_to=msg)


def evaluate_head(runtime: BundleRuntime, embeddings: SiteEmbeddings, arrays: dict[str, np.ndarray]) -> dict:
    """The head with these weights on the site's embeddings, through the torch head (equal to the
    bundle's head graph; checked whenever a bundle is rewritten)."""
    import torch

    from fedlite.export.head_swap import fusion_head_from_weights
    from fedlite.metrics import evaluate_predictions
    from fedlite.model import multitask_loss

    head = fusion_head_from_weights(runtime.meta, arrays)
    with torch.no_grad():
        out = head.classify(torch.from_numpy(embeddings.image), torch.from_numpy(embeddings.text))
        loss, _ = multitask_loss(out, torch.from_numpy(embeddings.leukemia), torch.from_numpy(embeddings.stage))
        leukemia, stage = out.leukemia_logits.softmax(-1).numpy(), out.stage_logits.softmax(-1).numpy()
    return {**evaluate_predictions(embeddings.leukemia, embeddings.stage, leukemia, stage), "loss": float(loss)}


def edge_evaluate(msg: Message, context: Context, split_dir: str | Path | None, defaults: dict[str, str]) -> Message:
    start = time.perf_counter()
    runtime, embeddings, site = _site(msg, context, split_dir, defaults)
    metrics = evaluate_head(runtime, embeddings, from_record(msg.content["arrays"]))
    record = {k: float(metrics[k]) for k in METRIC_KEYS if np.isfinite(metrics.get(k, float("nan")))}
    record.update({"num-examples": len(embeddings), "eval-seconds": time.perf_counter() - start,
                   "embed-seconds": embeddings.seconds})
    return Message(RecordDict({"metrics": MetricRecord(record), "info": ConfigRecord({"site": site})}), reply_to=msg)
