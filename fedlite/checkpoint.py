"""The checkpoint: the contract between training and export.

A directory with the weights (safetensors), the model config, the tokenizer, label and stage
names, preprocessing settings and metrics, so it can be rebuilt and evaluated with nothing else.
Written atomically: a crash during saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from fedlite import __version__
from fedlite.atomic import atomic_write_text, json_text, staged_dir
from fedlite.data.images import IMAGE_SIZE, MEAN, STD
from fedlite.errors import InputError
from fedlite.presets import ModelConfig
from fedlite.text import TOKENIZER_FILE, load_tokenizer

if TYPE_CHECKING:
    from fedlite.model import FedMMX

FORMAT = "fedlite-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"


@dataclass
class Checkpoint:
    model: FedMMX
    tokenizer: Tokenizer
    meta: dict

    @property
    def stage_names(self) -> list[str]:
        return self.meta["stage_names"]

    @property
    def max_length(self) -> int:
        return self.meta["preprocessing"]["max_length"]


def save_checkpoint(path: str | Path, model, tokenizer: Tokenizer, stage_names, label_names,
                    metrics: dict | None = None, training: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    config: ModelConfig = model.config
    meta = {
        "format": FORMAT,
        "fedlite_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": config.to_dict(),
        "label_names": list(label_names),
        "stage_names": list(stage_names),
        "preprocessing": {"image_size": IMAGE_SIZE, "mean": list(MEAN), "std": list(STD),
                          "max_length": config.text.max_length},
        "training": training or {},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with staged_dir(path, force=True, what="checkpoint") as tmp:
        save_file(state, str(tmp / WEIGHTS))
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        atomic_write_text(tmp / CONFIG, json_text(meta, indent=2) + "\n")
        atomic_write_text(tmp / METRICS, json_text(metrics or {}, indent=2) + "\n")
    return path


def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise InputError("checkpoint directory not found", path=path)
    for name in (CONFIG, WEIGHTS, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise InputError(f"checkpoint lacks {name}", path=path,
                             hint="it is incomplete or not a fedlite checkpoint")
    try:
        meta = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"corrupt checkpoint config: {exc}", path=path / CONFIG) from None
    if meta.get("format") != FORMAT:
        raise InputError(f"unsupported checkpoint format {meta.get('format')!r}", path=path / CONFIG,
                         hint=f"this fedlite reads {FORMAT}")
    metrics_path = path / METRICS
    meta["metrics"] = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    return meta


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fedlite.model import FedMMX

    path = Path(path)
    meta = read_checkpoint_meta(path)
    model = FedMMX(ModelConfig.from_dict(meta["model"]))
    try:
        state = load_file(str(path / WEIGHTS), device=device)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"corrupt weights: {exc}", path=path / WEIGHTS) from None
    broken = [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise InputError(f"{len(broken)} weight tensors hold NaN or Inf, e.g. {broken[0]}: the model is broken",
                         path=path / WEIGHTS, hint="use an earlier checkpoint of the run")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"weights do not match the config: {str(exc).splitlines()[0]}",
                         path=path / WEIGHTS) from None
    return Checkpoint(model=model.to(device), tokenizer=load_tokenizer(path / TOKENIZER_FILE), meta=meta)
