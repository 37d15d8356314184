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
from fedlite.text import pad_token_ids
from fedlite.training import autocast_for

log = logging.getLogger(__name__)


@dataclass
class EmbeddingWork:
    """What getting a part's embeddings cost this round: what the site reports beside its update."""
    seconds: float = 0.0
    computed: int = 0  # arrays computed (an image view, or the notes), the rest read from the cache


def _key(dataset: CaseDataset, encoders: str) -> str:
    """Everything the embeddings depend on but the view: encoders, cases, preprocessing, notes' token
    ids, and the augmentation seed (training parts only)."""
    tokens = store_key(*(",".join(map(str, ids)) for ids in dataset.token_ids)) if dataset.token_ids else "-"
    augmentation = f"augmented, seed {dataset.seed}" if dataset.train else "not augmented"
    return store_key(encoders, dataset_fingerprint(dataset.data), dataset.use_image, dataset.image_size,
                     tuple(dataset.mean), tuple(dataset.std), tokens, augmentation)


@torch.no_grad()
def _embed_images(model: FedMMX, dataset: CaseDataset, view: int, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """Each image through the frozen image encoder; a training part's augmented as in epoch ``view``."""
    model.to(device).eval()
    dataset.set_epoch(view)
    out = []
    for batch in make_loader(dataset, batch_size, shuffle=False):
        with autocast_for(device):
            out.append(model.encode_image(batch["pixels"].to(device)).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def _embed_texts(model: FedMMX, dataset: CaseDataset, batch_size: int, device: torch.device) -> np.ndarray:
    """Each note through the frozen text encoder (no image is decoded)."""
    model.to(device).eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        ids, mask = pad_token_ids(dataset.token_ids[start:start + batch_size], dataset.pad_id)
        with autocast_for(device):
            out.append(model.encode_text(torch.from_numpy(ids).to(device),
                                         torch.from_numpy(mask).to(device)).float().cpu())
    return torch.cat(out).numpy()


def _cached(path: Path, cases: int, compute, work: EmbeddingWork) -> np.ndarray:
    stored = read_embeddings(path, cases, ("embeddings",))
    if stored is not None:
        return stored["embeddings"]
    start = time.perf_counter()
    embeddings = compute()
    write_embeddings(path, embeddings=embeddings)
    seconds = time.perf_counter() - start
    work.seconds += seconds
    work.computed += 1
    log.info("embedded %d cases into %s in %.1f s", cases, path.name, seconds)
    return embeddings


def embedded_part(model: FedMMX, dataset: CaseDataset, encoders: str, cache_dir: Path, views: list[int],
                  batch_size: int, device: torch.device,
                  work: EmbeddingWork) -> tuple[dict[int, np.ndarray] | None, np.ndarray | None]:
    """The part's image embeddings for each view in ``views`` and its notes' embeddings (None for a
    modality the model lacks): read from the cache, or computed and cached."""
    key, cache_dir, n = _key(dataset, encoders), Path(cache_dir), len(dataset)
    images = None
    if model.image_encoder is not None:
        images = {view: _cached(cache_dir / f"frozen-{key}-image-view{view}.npz", n,
                                lambda view=view: _embed_images(model, dataset, view, batch_size, device), work)
                  for view in views}
    texts = None
    if model.text_encoder is not None:
        texts = _cached(cache_dir / f"frozen-{key}-text.npz", n,
                        lambda: _embed_texts(model, dataset, batch_size, device), work)
    return images, texts


def frozen_round_loader(model: FedMMX, dataset: CaseDataset, cfg: FederatedConfig, server_round: int,
                        encoders: str, cache_dir: Path, device: torch.device,
                        work: EmbeddingWork) -> DataLoader:
    """Shuffled batches of the training part's embeddings for this round's local epochs: run epoch
    k = (round − 1)·E + e reads view k mod V."""
    views = cfg.embedding_views
    offset = (server_round - 1) * cfg.local_epochs
    needed = sorted({(offset + e) % views for e in range(cfg.local_epochs)})
    images, texts = embedded_part(model, dataset, encoders, cache_dir, needed, cfg.batch_size, device, work)
    cases = EmbeddedCases(images, texts, dataset.leukemia.numpy(), dataset.stage.numpy(), views=views,
                          epoch_offset=offset)
    return embedding_loader(cases, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)


def frozen_eval_loader(model: FedMMX, dataset: CaseDataset, cfg: FederatedConfig, encoders: str, cache_dir: Path,
                       device: torch.device, work: EmbeddingWork) -> DataLoader:
    """The validation part's embeddings, in case order."""
    images, texts = embedded_part(model, dataset, encoders, cache_dir, [0], cfg.batch_size, device, work)
    cases = EmbeddedCases(images, texts, dataset.leukemia.numpy(), dataset.stage.numpy())
    return embedding_loader(cases, cfg.batch_size, shuffle=False)
