"""``fedlite evaluate``: a checkpoint's metrics on any dataset directory, or the late fusion of
several (their probabilities averaged), the paper's baseline against a fusion layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlite.checkpoint import load_checkpoint, read_checkpoint_meta
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import Dataset, read_dataset
from fedlite.errors import InputError
from fedlite.metrics import evaluate_predictions
from fedlite.training import predict, resolve_device


def checkpoint_probabilities(checkpoint: str | Path, dataset: Dataset, device, batch_size: int = 32,
                             progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's leukemia and stage probabilities for every case of the dataset, in order."""
    ckpt = load_checkpoint(checkpoint, device="cpu")
    if list(dataset.info.stage_names) != list(ckpt.stage_names):
        raise InputError(f"the data's stages {list(dataset.info.stage_names)} differ from the "
                         f"checkpoint's {ckpt.stage_names}", path=dataset.root / "dataset.json")
    config = ckpt.model.config
    cases = CaseDataset(dataset, ckpt.tokenizer if config.uses_text else None, ckpt.max_length,
                        use_image=config.uses_image, train=False)
    return predict(ckpt.model, make_loader(cases, batch_size, shuffle=False), device, progress)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, device: str = "auto",
                        batch_size: int = 32, progress: bool = True) -> dict:
    return evaluate_late_fusion([checkpoint], data, device, batch_size, progress)


def evaluate_late_fusion(checkpoints: list[str | Path], data: str | Path, device: str = "auto",
                         batch_size: int = 32, progress: bool = True) -> dict:
    """Metrics of the checkpoints' averaged probabilities (late fusion, e.g. an image-only and a
    text-only model); one checkpoint is scored as it is."""
    if not checkpoints:
        raise InputError("late fusion needs at least one checkpoint")
    for checkpoint in checkpoints:  # every checkpoint is checked before the data is read
        read_checkpoint_meta(checkpoint)
    dataset = read_dataset(data)
    dev = resolve_device(device)
    outputs = [checkpoint_probabilities(c, dataset, dev, batch_size, progress) for c in checkpoints]
    metrics = evaluate_predictions(np.array([c.leukemia for c in dataset.cases]),
                                   np.array([-1 if c.stage is None else c.stage for c in dataset.cases]),
                                   np.mean([o[0] for o in outputs], axis=0), np.mean([o[1] for o in outputs], axis=0))
    metrics["checkpoint" if len(checkpoints) == 1 else "late_fusion"] = (
        str(checkpoints[0]) if len(checkpoints) == 1 else [str(c) for c in checkpoints])
    metrics["data"] = str(data)
    return metrics
