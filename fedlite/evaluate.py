"""``fedlite evaluate``: a checkpoint's metrics on any dataset directory."""

from __future__ import annotations

from pathlib import Path

from fedlite.checkpoint import load_checkpoint
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import read_dataset
from fedlite.errors import InputError
from fedlite.training import evaluate_model, resolve_device


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, device: str = "auto",
                        batch_size: int = 32, progress: bool = True) -> dict:
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, device="cpu")
    dataset = read_dataset(data)
    if list(dataset.info.stage_names) != list(ckpt.stage_names):
        raise InputError(f"the data's stages {list(dataset.info.stage_names)} differ from the "
                         f"checkpoint's {ckpt.stage_names}", path=Path(data) / "dataset.json")
    config = ckpt.model.config
    cases = CaseDataset(dataset, ckpt.tokenizer if config.uses_text else None, ckpt.max_length,
                        use_image=config.uses_image, train=False)
    metrics = evaluate_model(ckpt.model, make_loader(cases, batch_size, shuffle=False), dev, progress)
    metrics["checkpoint"] = str(checkpoint)
    metrics["data"] = str(data)
    return metrics
