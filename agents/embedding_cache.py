"""A site's cases as embeddings from the bundle's INT8 encoders, computed once and kept on disk.

Edge fine-tuning trains only the fusion layer and heads, so the encoders' outputs for a site's
cases never change while the encoders do not: embedding the cases once turns every later round into
seconds of work on small arrays. The cache is keyed by what the embeddings depend on (the encoder
graphs, the tokenizer, preprocessing, the manifest and every image file's size and mtime), so a new
bundle with the same encoders (only a new head) reuses it and anything else recomputes it.
Embeddings are derived from patient data: owner-only files in the site's cache directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlite.agents.runtime import BundleRuntime
from fedlite.data.manifest import MANIFEST, Dataset
from fedlite.embedding_store import dataset_fingerprint, read_embeddings, store_key, write_embeddings
from fedlite.errors import InputError
from fedlite.export.bundle import encoder_fingerprint

log = logging.getLogger(__name__)


@dataclass
class SiteEmbeddings:
    image: np.ndarray  # (n, image_dim) float32
    text: np.ndarray  # (n, text_dim) float32
    leukemia: np.ndarray  # (n,) int64
    stage: np.ndarray  # (n,) int64, -1 for negatives
    seconds: float = 0.0  # time spent embedding (0 when read from the cache)
    cached: bool = False

    def __len__(self) -> int:
        return len(self.leukemia)


def cache_path(runtime: BundleRuntime, dataset: Dataset, cache_dir: Path) -> Path:
    key = store_key(encoder_fingerprint(runtime.meta), dataset_fingerprint(dataset))
    return Path(cache_dir) / f"embeddings-{key}.npz"


def _labels(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    leukemia = np.array([c.leukemia for c in dataset.cases], dtype=np.int64)
    stage = np.array([-1 if c.stage is None else c.stage for c in dataset.cases], dtype=np.int64)
    return leukemia, stage


def embed_dataset(runtime: BundleRuntime, dataset: Dataset, batch_size: int = 32,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    images, texts = [], []
    cases = dataset.cases
    for start in tqdm(range(0, len(cases), batch_size), desc="embedding cases", unit="batch", disable=not progress,
                      leave=False):
        chunk = cases[start: start + batch_size]
        ids, mask, _ = runtime.tokenize([c.text for c in chunk])
        images.append(runtime.embed_images(runtime.load_images([dataset.image_path(c) for c in chunk])))
        texts.append(runtime.embed_texts(ids, mask))
    return np.concatenate(images).astype(np.float32), np.concatenate(texts).astype(np.float32)


def site_embeddings(runtime: BundleRuntime, dataset: Dataset, cache_dir: str | Path, batch_size: int = 32,
                    progress: bool = False) -> SiteEmbeddings:
    """The site's embeddings, from the cache when it matches, else computed and cached."""
    if not dataset.cases:
        raise InputError("the site's dataset has no cases to train on", path=dataset.root / MANIFEST)
    path = cache_path(runtime, dataset, Path(cache_dir))
    leukemia, stage = _labels(dataset)
    stored = read_embeddings(path, len(dataset), ("image", "text"))
    if stored is not None:
        return SiteEmbeddings(stored["image"], stored["text"], leukemia, stage, cached=True)
    start = time.perf_counter()
    image, text = embed_dataset(runtime, dataset, batch_size, progress)
    seconds = time.perf_counter() - start
    write_embeddings(path, image=image, text=text)
    log.info("embedded %d cases of %s in %.1f s (cached in %s)", len(dataset), dataset.root, seconds, path)
    return SiteEmbeddings(image, text, leukemia, stage, seconds=seconds)
