"""What server and sites share: building the same Fed-MMX from a run's config, and a per-process
cache so many simulated sites on one machine (or one GPU) reuse one model and one tokenized dataset
instead of rebuilding them for every message."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedlite.data.holdout import site_parts
from fedlite.data.loader import CaseDataset
from fedlite.data.manifest import Dataset
from fedlite.errors import InputError
from fedlite.federated.config import FederatedConfig
from fedlite.model import FedMMX, build_model
from fedlite.presets import get_preset
from fedlite.text import builtin_tokenizer, load_tokenizer

_MODELS: dict[str, FedMMX] = {}
_DATASETS: dict[tuple, CaseDataset] = {}


def model_key(cfg: FederatedConfig, num_stages: int) -> str:
    return json.dumps([cfg.preset, cfg.modality, cfg.fusion, num_stages, cfg.seed, cfg.image_weights,
                       cfg.text_weights])


def build_initial_model(cfg: FederatedConfig, num_stages: int) -> FedMMX:
    """Seeded, so every site and the server build bit-identical initial (frozen) encoders."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(get_preset(cfg.preset, modality=cfg.modality, fusion=cfg.fusion,
                                      num_stages=num_stages),
                           image_weights=cfg.image_weights or None, text_weights=cfg.text_weights or None)


def run_tokenizer(cfg: FederatedConfig):
    return load_tokenizer(cfg.text_weights) if cfg.text_weights else builtin_tokenizer()


def cached_model(cfg: FederatedConfig, num_stages: int, fresh: bool = False) -> FedMMX:
    key = model_key(cfg, num_stages)
    if fresh or key not in _MODELS:
        _MODELS.clear()  # one model per process: memory matters more than a second cache entry
        _MODELS[key] = build_initial_model(cfg, num_stages)
    return _MODELS[key]


def site_dataset(data_dir: str | Path, cfg: FederatedConfig, part: str) -> Dataset:
    """The site's training or validation part (``fedlite.data.holdout``), checked against the run's stages."""
    parts = site_parts(data_dir, cfg.site_val_fraction)
    if list(parts.train.info.stage_names) != cfg.stages:
        raise InputError(f"this site's stages {list(parts.train.info.stage_names)} differ from the run's "
                         f"{cfg.stages}", path=Path(data_dir) / "dataset.json",
                         hint="every site and the run config (stage-names) must name the same stages in order")
    return parts.train if part == "train" else parts.val


def cached_dataset(data_dir: str | Path, cfg: FederatedConfig, model: FedMMX, part: str) -> CaseDataset:
    """``part`` "train" (augmented) or "val"."""
    config = model.config
    key = (str(Path(data_dir).resolve()), config.modality, config.text.max_length, part, cfg.seed,
           cfg.site_val_fraction, tuple(cfg.stages))
    if key not in _DATASETS:
        tokenizer = run_tokenizer(cfg) if config.uses_text else None
        _DATASETS[key] = CaseDataset(site_dataset(data_dir, cfg, part), tokenizer, config.text.max_length, use_image=config.uses_image, train=part == "train",
                                     seed=cfg.seed)
    return _DATASETS[key]
