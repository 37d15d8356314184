"""Frozen rounds on cached embeddings: while a run's encoders are frozen, a site runs its cases
through them once per augmented view, not once per training step.

What the frozen encoders make of a case depends only on the encoders (the frozen fingerprint the
coordinator sends, which every site checks against its own model), the case's image and note, the
preprocessing and the augmentation drawn. So a site embeds its training part one augmented view at
a time, as the epochs first need them, and its validation part once (it is never augmented). It
keeps both on disk in its cache directory (owner-only, ``fedlite.embedding_store``) under a key
over all of that, and trains the fusion layer and heads on small arrays.

Augmentation: epoch k of the run (counted over rounds) reads view k mod V, V = ``embedding-views``.
The uncached path draws a fresh augmentation of every image each epoch; with the cache, training
sees V of them, recurring. Notes are not augmented: one text embedding per case.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedlite.data.embedded import EmbeddedCases, embedding_loader
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.embedding_store import dataset_fingerprint, read_embeddings, store_key, write_embeddings
from fedlite.federated.config import FederatedConfig
from fedlite.model import FedMMX
from fedlite.training import autocast_for

log = logging.getLogger(__name__)


@dataclass
class EmbeddingWork:
    """What getting a part's embeddings cost this round: what the site reports beside its update."""
    seconds: float = 0.0
    views_computed: int = 0
    views_read: int = 0


def _key(dataset: CaseDataset, encoders: str) -> str:
    """Everything the embeddings depend on but the view: encoders, cases, preprocessing, notes' token
    ids, and the augmentation seed (training parts only)."""
    tokens = store_key(*(",".join(map(str, ids)) for ids in dataset.token_ids)) if dataset.token_ids else "-"
    augmentation = f"augmented, seed {dataset.seed}" if dataset.train else "not augmented"
    return store_key(encoders, dataset_fingerprint(dataset.data), dataset.use_image, dataset.image_size,
                     tuple(dataset.mean), tuple(dataset.std), tokens, augmentation)


@torch.no_grad()
def _embed(model: FedMMX, dataset: CaseDataset, view: int, batch_size: int,
           device: torch.device) -> dict[str, np.ndarray]:
    """Each case through the frozen encoders; a training part augmented as in epoch ``view``."""
    model.to(device).eval()
    dataset.set_epoch(view)
    images, texts = [], []
    for batch in make_loader(dataset, batch_size, shuffle=False):
        with autocast_for(device):
            if model.image_encoder is not None:
                images.append(model.encode_image(batch["pixels"].to(device)).float().cpu())
            if model.text_encoder is not None:
                texts.append(model.encode_text(batch["input_ids"].to(device),
                                               batch["attention_mask"].to(device)).float().cpu())
    arrays = {}
    if images:
        arrays["image"] = torch.cat(images).numpy()
    if texts:
        arrays["text"] = torch.cat(texts).numpy()
    return arrays


def embedded_part(model: FedMMX, dataset: CaseDataset, encoders: str, cache_dir: Path, views: list[int],
                  batch_size: int, device: torch.device, work: EmbeddingWork) -> dict[int, dict[str, np.ndarray]]:
    """The part's embeddings for each view in ``views``: read from the cache, or computed and cached."""
    names = tuple(n for n, enc in (("image", model.image_encoder), ("text", model.text_encoder)) if enc is not None)
    key = _key(dataset, encoders)
    out = {}
    for view in views:
        path = Path(cache_dir) / f"frozen-{key}-view{view}.npz"
        stored = read_embeddings(path, len(dataset), names)
        if stored is None:
            start = time.perf_counter()
            stored = _embed(model, dataset, view, batch_size, device)
            write_embeddings(path, **stored)
            work.seconds += time.perf_counter() - start
            work.views_computed += 1
            log.info("embedded %d cases of %s (view %d) in %.1f s", len(dataset), dataset.data.root, view,
                     time.perf_counter() - start)
        else:
            work.views_read += 1
        out[view] = stored
    return out


def frozen_round_loader(model: FedMMX, dataset: CaseDataset, cfg: FederatedConfig, server_round: int,
                        encoders: str, cache_dir: Path, device: torch.device,
                        work: EmbeddingWork) -> DataLoader:
    """Shuffled batches of the training part's embeddings for this round's local epochs: run epoch
    k = (round − 1)·E + e reads view k mod V."""
    views = cfg.embedding_views
    offset = (server_round - 1) * cfg.local_epochs
    needed = sorted({(offset + e) % views for e in range(cfg.local_epochs)})
    stored = embedded_part(model, dataset, encoders, cache_dir, needed, cfg.batch_size, device, work)
    image_views = {v: arrays["image"] for v, arrays in stored.items()} if model.image_encoder is not None else None
    cases = EmbeddedCases(image_views, stored[needed[0]].get("text"), dataset.leukemia.numpy(),
                          dataset.stage.numpy(), views=views, epoch_offset=offset)
    return embedding_loader(cases, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)


def frozen_eval_loader(model: FedMMX, dataset: CaseDataset, cfg: FederatedConfig, encoders: str, cache_dir: Path,
                       device: torch.device, work: EmbeddingWork) -> DataLoader:
    """The validation part's embeddings, in case order."""
    stored = embedded_part(model, dataset, encoders, cache_dir, [0], cfg.batch_size, device, work)[0]
    image = {0: stored["image"]} if "image" in stored else None
    cases = EmbeddedCases(image, stored.get("text"), dataset.leukemia.numpy(), dataset.stage.numpy())
    return embedding_loader(cases, cfg.batch_size, shuffle=False)
