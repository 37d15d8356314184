"""The report's training runs and exports, each built once and reused while its configuration holds
(``fedlite.report.ledger``): pooled baselines, federated Fed-MMX on a split or a share of it, and the
federated model's bundles exported at the sites."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from fedlite.centralized import train_centralized
from fedlite.data.split import SPLIT_FILE
from fedlite.export.distill import DistillConfig
from fedlite.export.federated import EXPORT_RUN, export_simulated
from fedlite.export.parity import NO_GATE
from fedlite.export.pipeline import ExportOptions
from fedlite.export.prune import PruneConfig
from fedlite.federated.config import FederatedConfig
from fedlite.federated.simulation import run_federated_simulation
from fedlite.quickstart import EXPORT_GATE, LR, OPTIMIZER
from fedlite.report.ledger import Ledger, file_digest
from fedlite.training import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportSettings:
    """How large the report's runs are; the defaults finish on a 2-core CPU on the embedded data."""

    preset: str = "tiny"
    rounds: int = 8  # federated rounds (one local epoch each)
    epochs: int = 8  # pooled baselines' epochs: as many passes over the cases as the federated run
    export_epochs: int = 15  # distillation epochs of the INT8 bundle at the sites
    shares: tuple[float, ...] = (0.25, 0.5)  # shares of the training cases, beside the whole
    blur: tuple[float, ...] = (1.0, 2.0, 3.0)  # Gaussian blur σ in pixels
    noise: tuple[float, ...] = (16.0, 32.0, 64.0)  # Gaussian noise σ on the 0-255 scale
    explain_cases: int = 8
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunContext:
    """Where the report writes, what it trains on and what it has already built."""

    out: Path
    split: Path
    stage_names: list[str]
    settings: ReportSettings
    ledger: Ledger
    progress: bool = True

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name


def centralized(ctx: RunContext, name: str, train: Path, evaluation: Path, modality: str, fusion: str) -> Path:
    """A pooled baseline's last checkpoint, trained unless a finished one of the same config exists."""
    s = ctx.settings
    out = ctx.run_dir(name)
    config = {"kind": "centralized", "modality": modality, "fusion": fusion, "preset": s.preset, "epochs": s.epochs,
              "lr": LR, "optimizer": OPTIMIZER, "seed": s.seed, "train": file_digest(train / "manifest.jsonl"),
              "eval": file_digest(evaluation / "manifest.jsonl")}
    if not ctx.ledger.finished(name, config, out / "last"):
        with ctx.ledger.building(name, config):
            train_centralized(train, out, preset=s.preset, modality=modality, fusion=fusion, eval_data=evaluation,
                              train_config=TrainConfig(epochs=s.epochs, lr=LR, optimizer=OPTIMIZER,
                                                       warmup_fraction=0.05, clip_grad_norm=1.0),
                              seed=s.seed, progress=ctx.progress, force=True)
    else:
        log.info("reusing %s (same configuration)", out)
    return out / "last"


def federated(ctx: RunContext, name: str, split: Path) -> Path:
    """Fed-MMX trained across the split's sites; an interrupted run continues from its last round."""
    s = ctx.settings
    out = ctx.run_dir(name)
    cfg = FederatedConfig(split_dir=str(split), out=str(out), preset=s.preset, rounds=s.rounds,
                          freeze_rounds=min(1, s.rounds - 1), local_epochs=1, optimizer=OPTIMIZER, lr=LR, seed=s.seed)
    config = {"kind": "federated", "preset": s.preset, "rounds": s.rounds, "lr": LR, "optimizer": OPTIMIZER,
              "seed": s.seed, "split": file_digest(split / SPLIT_FILE)}
    if ctx.ledger.finished(name, config, out / "summary.json"):
        log.info("reusing %s (same configuration)", out)
        return out / "last"
    resume = ctx.ledger.started(name, config) and (out / "last").is_dir()  # a round finished: continue
    with ctx.ledger.building(name, config):
        run_federated_simulation(cfg, resume=resume, progress=ctx.progress, force=not resume)
    return out / "last"


def exported(ctx: RunContext, name: str, checkpoint: Path, int8: bool) -> Path:
    """The checkpoint exported at the split's sites: distilled, pruned and INT8 (``int8``, the
    bundle a hospital runs, under the quickstart's gate), or the teacher itself in FP32, its
    reference for explanations."""
    s = ctx.settings
    out = ctx.out / name
    config = {"kind": "export", "int8": int8, "epochs": s.export_epochs if int8 else 0,
              "site_epochs": EXPORT_RUN.local_epochs, "lr": DistillConfig.lr, "seed": s.seed,
              "teacher": file_digest(checkpoint / "model.safetensors"), "split": file_digest(ctx.split / SPLIT_FILE)}
    if ctx.ledger.finished(name, config, out / "bundle.json"):
        log.info("reusing %s (same configuration)", out)
        return out
    if int8:
        options = ExportOptions(int8=True, distill_config=DistillConfig(epochs=s.export_epochs),
                                gate=EXPORT_GATE, seed=s.seed, progress=ctx.progress)
    else:
        options = ExportOptions(distill=False, prune=PruneConfig(fraction=0.0), recovery_epochs=0, gate=NO_GATE,
                                seed=s.seed, progress=ctx.progress)
    with ctx.ledger.building(name, config):
        export_simulated(checkpoint, out, options, ctx.split, dataclasses.replace(EXPORT_RUN, seed=s.seed), force=True)
    return out
