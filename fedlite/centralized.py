"""The paper's centralized baseline: train Fed-MMX on pooled data, evaluate on the held-out split
after every epoch, keep the best checkpoint (by stage macro-F1, as the paper selects) and the last.

Read top to bottom it is the whole recipe; ``--modality image|text`` gives the unimodal ablations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from fedlite.atomic import atomic_write_text, json_text, require_free
from fedlite.checkpoint import save_checkpoint
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import Dataset, read_dataset
from fedlite.data.split import pooled_parts
from fedlite.errors import InputError
from fedlite.model import build_model
from fedlite.plots import plot_history
from fedlite.presets import get_preset
from fedlite.run_record import RunRecord
from fedlite.text import builtin_tokenizer, load_tokenizer
from fedlite.training import (TrainConfig, evaluate_model, make_optimizer, parameter_groups, resolve_device,
                              seed_everything, train_local)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metrics: dict
    history: list[dict]

    def describe(self) -> str:
        """What ``fedlite train --centralized`` prints: the best epoch's metrics and the outputs."""
        from fedlite.metrics import format_metrics

        lines = []
        if self.best_metrics:
            stage_names = json.loads((self.best_checkpoint / "config.json").read_text())["stage_names"]
            lines.append(format_metrics(self.best_metrics, stage_names))
        lines.append(f"\nbest checkpoint: {self.best_checkpoint}\nlast checkpoint: {self.last_checkpoint}"
                     f"\ncurves: {self.run_dir / 'curves.png'}")
        return "\n".join(lines)


def _check_compatible(train: Dataset, evaluation: Dataset | None) -> None:
    if evaluation is not None and evaluation.info.stage_names != train.info.stage_names:
        raise InputError(f"stage names differ from the training data's {list(train.info.stage_names)}",
                         path=evaluation.root / "dataset.json")


def check_images(directory: Path) -> None:
    """Every image of a dataset decoded once, so a bad one stops the run before its first epoch."""
    from fedlite.data.check import check_dataset

    report = check_dataset(directory, decode_images=True)
    if not report.ok:
        raise InputError(report.problems)


def train_centralized(data: str | Path, out: str | Path, preset: str = "small", modality: str = "both",
                      fusion: str = "concat", train_config: TrainConfig = TrainConfig(),
                      eval_data: str | Path | None = None, image_weights: str | Path | None = None,
                      text_weights: str | Path | None = None, device: str = "auto", seed: int = 0,
                      num_workers: int = 0, progress: bool = True, force: bool = False) -> RunResult:
    """Train on pooled cases. Everything is checked before anything is written: the run directory
    (an existing run is replaced only with ``force``) and every case, image decoding included."""
    require_free(out, force, "run directory")
    seed_everything(seed)
    train_dir, eval_dir = pooled_parts(data, eval_data)
    train_set = read_dataset(train_dir)
    eval_set = read_dataset(eval_dir) if eval_dir is not None else None
    _check_compatible(train_set, eval_set)
    for directory in (train_dir, eval_dir):
        if directory is not None:
            check_images(directory)
    tokenizer = load_tokenizer(text_weights) if text_weights else builtin_tokenizer()

    config = get_preset(preset, fusion=fusion, modality=modality, num_stages=train_set.info.num_stages)
    model = build_model(config, image_weights=image_weights, text_weights=text_weights)
    config = model.config
    if config.uses_text and tokenizer.get_vocab_size() > config.text.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the text encoder "
                         f"only {config.text.vocab_size}", hint="give a matching --text-weights directory")
    dev = resolve_device(device)

    def dataset(ds: Dataset, train: bool) -> CaseDataset:
        return CaseDataset(ds, tokenizer if config.uses_text else None, config.text.max_length,
                           use_image=config.uses_image, train=train, seed=seed)

    train_loader = make_loader(dataset(train_set, True), train_config.batch_size, shuffle=True, seed=seed,
                               num_workers=num_workers)
    eval_loader = (make_loader(dataset(eval_set, False), train_config.batch_size, shuffle=False,
                               num_workers=num_workers) if eval_set is not None else None)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history_path = out / "history.jsonl"
    history_path.write_text("")
    names = dict(stage_names=train_set.info.stage_names, label_names=train_set.info.label_names)
    run = RunRecord("centralized", str(train_dir), 0, {"eval_data": str(eval_dir), "device": str(dev),
                                                       "seed": seed, **train_config.__dict__})
    log.info("training %s (%s, %s fusion, %.1fM parameters) on %d cases, %s",
             preset, modality, fusion, sum(p.numel() for p in model.parameters()) / 1e6, len(train_set), dev)

    history: list[dict] = []
    best: dict | None = None
    epochs = train_config.epochs
    # One optimizer for the whole run: momentum and Adam's moments carry from epoch to epoch.
    optimizer = make_optimizer(parameter_groups(model, train_config), train_config, train_config.lr)
    warmup_steps = min(len(train_loader), round(train_config.warmup_fraction * epochs * len(train_loader)))
    for epoch in tqdm(range(epochs), desc=f"{preset}/{modality}", disable=not progress, unit="epoch"):
        lr_start = train_config.lr * (1 - epoch / epochs)
        lr_end = train_config.lr * (1 - (epoch + 1) / epochs)
        stats = train_local(model, train_loader, train_config, dev, lr_start, lr_end, epochs=1,
                            progress=progress, desc=f"epoch {epoch + 1}/{epochs}", optimizer=optimizer,
                            first_epoch=epoch, warmup_steps=warmup_steps if epoch == 0 else 0)
        record = {"epoch": epoch + 1, "train_loss": stats.mean_loss, "train_seconds": stats.seconds,
                  "samples_per_second": stats.samples / stats.seconds, "peak_memory_mb": stats.peak_memory_mb}
        if eval_loader is not None:
            record["eval"] = evaluate_model(model, eval_loader, dev)
        history.append(record)
        with history_path.open("a", encoding="utf-8") as fh:
            fh.write(json_text(record) + "\n")
        score = record.get("eval", {}).get("stage_macro_f1", -float("inf"))
        if best is None or score > best["score"]:
            best = {"score": score, "epoch": epoch + 1}
            save_checkpoint(out / "best", model, tokenizer, metrics=record.get("eval", {}),
                            training=run.at(epoch + 1).to_dict(), **names)
    save_checkpoint(out / "last", model, tokenizer, metrics=history[-1].get("eval", {}),
                    training=run.at(epochs).to_dict(), **names)
    best_metrics = history[best["epoch"] - 1].get("eval", {})
    summary = {"preset": preset, "modality": modality, "fusion": fusion, "best_epoch": best["epoch"],
               "best": best_metrics, "last": history[-1].get("eval", {}), "training": run.at(epochs).to_dict(),
               "init": config.init}
    atomic_write_text(out / "summary.json", json_text(summary, indent=2) + "\n")
    plot_history(history, out / "curves.png", title=f"{preset} · {modality} · centralized")
    return RunResult(out, out / "best", out / "last", best_metrics, history)
