"""Embeddings of a site's cases kept on disk at the site: what both kinds of frozen-encoder training
(edge rounds on a bundle's INT8 encoders, frozen rounds of a federated run on its torch encoders)
read instead of running the encoders again.

Embeddings are derived from patient data: owner-only files in the site's cache directory, each
named by a key over everything it depends on; this module gives the part of that key the data
contributes and reads and writes the files. numpy only, so the agent's side stays free of torch.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

from fedlite.atomic import atomic_write_bytes, owner_only_dir
from fedlite.data.manifest import MANIFEST, Dataset
from fedlite.errors import InputError

log = logging.getLogger(__name__)


def dataset_fingerprint(dataset: Dataset) -> str:
    """The manifest's bytes and every image file's size and mtime: a changed case, label or image
    gives another fingerprint, without reading the images."""
    digest = hashlib.sha256((dataset.root / MANIFEST).read_bytes())
    for case in dataset.cases:
        path = dataset.image_path(case)
        try:
            stat = path.stat()
        except OSError:
            raise InputError("image file not found", path=path) from None
        digest.update(f"{case.id}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def store_key(*parts: object) -> str:
    return hashlib.sha256("\n".join(str(p) for p in parts).encode()).hexdigest()[:24]


def read_embeddings(path: Path, cases: int, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The stored arrays ``names``, each with one row per case; None when the file is missing, and
    (with a warning) when it is unreadable or holds another number of cases: then it is recomputed."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in names}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("embedding cache %s is unreadable (%s); recomputing it", path, exc)
        return None
    if any(len(a) != cases for a in arrays.values()):
        log.warning("embedding cache %s holds another number of cases; recomputing it", path)
        return None
    return arrays


def write_embeddings(path: Path, **arrays: np.ndarray) -> None:
    owner_only_dir(path.parent)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)
