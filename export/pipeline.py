"""``fedlite export``: teacher checkpoint -> distilled, pruned, INT8, verified bundle.

Read top to bottom it is the whole recipe. Every step can be switched off, so the same function
exports the teacher itself in FP32. Nothing is written unless the bundle passes its parity gate,
and an existing bundle is replaced only by a complete new one.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from fedlite import __version__
from fedlite.atomic import staged_dir
from fedlite.centralized import resolve_data, seed_everything
from fedlite.checkpoint import Checkpoint, load_checkpoint
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import Dataset, read_dataset
from fedlite.errors import InputError
from fedlite.export.bundle import HEAD_WEIGHTS, seal_bundle
from fedlite.export.distill import DistillConfig, distill, distillation_loss
from fedlite.export.graphs import OPSET, export_graphs
from fedlite.export.parity import Gate, ParityGateFailed, format_report, gate_failures, parity_report
from fedlite.export.prune import (PruneConfig, count_parameters, describe_architecture, prune_model,
                                  score_importance, trim_vocabulary)
from fedlite.export.quantize import QuantSettings, fuse_graph, quantize_graph
from fedlite.export.student import default_student, make_student
from fedlite.model import FedMMX
from fedlite.text import TOKENIZER_FILE
from fedlite.training import forward_batch, predict, resolve_device, to_device

log = logging.getLogger(__name__)
FUSION_MODEL_TYPES = {"image_encoder": "vit", "text_encoder": "bert"}


@dataclass(frozen=True)
class ExportOptions:
    student: str | None = None  # None: default_student(teacher)
    distill: bool = True
    distill_config: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recovery_epochs: int = 1
    int8: bool = False
    quant: QuantSettings = field(default_factory=QuantSettings)
    calibration_cases: int = 64
    fuse: bool = True
    fp32_copy: Path | None = None  # also write the student's FP32 graphs as a bundle here
    gate: Gate = field(default_factory=Gate)
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    progress: bool = True


@dataclass
class ExportResult:
    bundle: Path
    meta: dict

    @property
    def parity(self) -> dict:
        return self.meta["parity"]


def _recorded_data(meta: dict) -> tuple[Path | None, Path | None]:
    training = meta.get("training", {})
    if training.get("split-dir"):
        split = Path(training["split-dir"])
        return split / "train", split / "test"
    if training.get("data"):
        return Path(training["data"]), Path(training["eval_data"]) if training.get("eval_data") else None
    return None, None


def resolve_export_data(ckpt_meta: dict, data: Path | None, eval_data: Path | None,
                        scratch: Path) -> tuple[Dataset, Dataset]:
    """Training cases for distillation and held-out cases for verification.

    Given nothing, use the data the checkpoint was trained on if it is still there, else generate the
    embedded synthetic dataset (offline, deterministic) and its split.
    """
    if data is not None:
        train_dir, test_dir = resolve_data(data, eval_data)
    else:
        train_dir, test_dir = _recorded_data(ckpt_meta)
        if train_dir is None or not train_dir.is_dir() or test_dir is None or not test_dir.is_dir():
            from fedlite.data.split import split_dataset
            from fedlite.data.synth import synthesize

            log.info("no --data given and the checkpoint's training data is not here: "
                     "generating the embedded synthetic dataset")
            synthesize(scratch / "synthetic", progress=False)
            split_dataset(scratch / "synthetic", scratch / "split")
            train_dir, test_dir = scratch / "split" / "train", scratch / "split" / "test"
    if test_dir is None:
        raise InputError("no held-out cases to verify the bundle on", path=data,
                         hint="pass a split directory from `fedlite data split` or --eval-data DIR")
    train, test = read_dataset(train_dir), read_dataset(test_dir)
    for ds in (train, test):
        if list(ds.info.stage_names) != list(ckpt_meta["stage_names"]):
            raise InputError(f"the data's stages {list(ds.info.stage_names)} differ from the checkpoint's "
                             f"{ckpt_meta['stage_names']}", path=ds.root / "dataset.json")
    return train, test


def _loader(ckpt: Checkpoint, data: Dataset, batch_size: int, train: bool, seed: int):
    cases = CaseDataset(data, ckpt.tokenizer, ckpt.max_length, train=train, seed=seed)
    return make_loader(cases, batch_size, shuffle=train, seed=seed)


def _head_state(model: FedMMX) -> dict[str, np.ndarray]:
    parts = {"fusion": model.fusion, "leukemia_head": model.leukemia_head, "stage_head": model.stage_head}
    return {f"{name}.{k}": v.detach().cpu().numpy().copy() for name, module in parts.items()
            for k, v in module.state_dict().items()}


def _feeds(ckpt: Checkpoint, data: Dataset, cases: int, batch: int = 8):
    """Encoder inputs from real cases, for fusion checks and static calibration."""
    loader = _loader(ckpt, data, batch, train=False, seed=0)
    batches = list(islice(iter(loader), max(1, cases // batch)))
    return {
        "image_encoder": lambda: ({"pixels": b["pixels"].numpy()} for b in batches),
        "text_encoder": lambda: ({"input_ids": b["input_ids"].numpy(),
                                  "attention_mask": b["attention_mask"].numpy()} for b in batches),
    }


def export_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                  data: str | Path | None = None, eval_data: str | Path | None = None,
                  calibration: str | Path | None = None, force: bool = False) -> ExportResult:
    out = Path(out)
    for target in (out, options.fp32_copy):
        if target is not None and target.exists() and not force and (not target.is_dir() or any(target.iterdir())):
            raise InputError("bundle already exists", path=target, hint="choose another --out or pass --force")
    seed_everything(options.seed)
    device = resolve_device(options.device)
    ckpt = load_checkpoint(checkpoint)
    teacher = ckpt.model.eval()
    if teacher.config.modality != "both":
        raise InputError(f"the checkpoint reads only the {teacher.config.modality}; the bundle needs both "
                         "modalities", path=checkpoint, hint="export a model trained with --modality both")

    with tempfile.TemporaryDirectory(prefix="fedlite-export-") as scratch_name:
        scratch = Path(scratch_name)
        train, test = resolve_export_data(ckpt.meta, Path(data) if data else None,
                                          Path(eval_data) if eval_data else None, scratch)
        train_loader = _loader(ckpt, train, options.batch_size, train=True, seed=options.seed)
        dcfg = options.distill_config
        report: dict = {"teacher_parameters": count_parameters(teacher)}

        # 1. Distill the teacher into the student.
        if options.distill:
            name = options.student or default_student(teacher.config)
            student, init = make_student(teacher, name)
            report["student"] = {"name": name, **init.to_dict()}
            log.info("distilling into %s (%.2fM parameters) for %d epochs", name,
                     count_parameters(student) / 1e6, dcfg.epochs)
            report["distill"] = distill(student, teacher, train_loader, dcfg, device,
                                        progress=options.progress).to_dict()
        else:
            student = copy.deepcopy(teacher)
            report["student"] = {"name": "teacher"}

        # 2. Prune heads, FFN channels and layers; recover with the distillation loss.
        prune = options.prune
        if prune.fraction > 0 or prune.layers > 0:
            teacher.to(device)
            student.to(device)

            def loss_of(batch: dict) -> torch.Tensor:
                batch = to_device(batch, device)
                with torch.no_grad():
                    target = forward_batch(teacher, batch)
                return distillation_loss(forward_batch(student, batch), target, batch, dcfg)

            importance = score_importance(student, islice(iter(train_loader), prune.batches), loss_of)
            report["prune"] = prune_model(student, importance, prune).to_dict()
            if options.recovery_epochs > 0:
                report["recovery"] = distill(student, teacher, train_loader, dcfg, device,
                                             epochs=options.recovery_epochs, desc="recover",
                                             progress=options.progress).to_dict()
        student = student.cpu().eval()
        teacher = teacher.cpu().eval()
        report["vocabulary"] = trim_vocabulary(student, ckpt.tokenizer.get_vocab_size())

        # 3-4. ONNX graphs, ORT fusions, INT8.
        fp32, work = scratch / "fp32", scratch / "work"
        fp32.mkdir()
        work.mkdir()
        specs = export_graphs(student, fp32)
        calib_data = read_dataset(calibration) if calibration else train
        feeds = _feeds(ckpt, calib_data, options.calibration_cases)
        fusions, sources = {}, {}
        for name, spec in specs.items():
            sources[name] = fp32 / spec.file
            if name in FUSION_MODEL_TYPES and options.fuse:
                result = fuse_graph(sources[name], work / spec.file, FUSION_MODEL_TYPES[name], list(feeds[name]())[:2])
                fusions[name] = {"applied": result.applied, "fused_ops": result.fused_ops}
                sources[name] = work / spec.file
        meta = _bundle_meta(ckpt, student, specs, options, fusions, report, checkpoint)

        with contextlib.ExitStack() as stack:
            staged = stack.enter_context(staged_dir(out, force=True, what="bundle"))
            _write_files(staged, specs, sources, options.int8, options, feeds, student, ckpt)
            files = seal_bundle(staged, meta)["files"]
            extra, extra_files = {}, {}
            if options.fp32_copy is not None and options.int8:
                staged_fp32 = stack.enter_context(staged_dir(options.fp32_copy, force=True, what="bundle"))
                _write_files(staged_fp32, specs, sources, False, options, feeds, student, ckpt)
                extra_files = seal_bundle(staged_fp32, {**meta, "quantization": None})["files"]
                extra["student-onnx-fp32"] = staged_fp32

            # 5. Verify on held-out cases before anything is put in place.
            meta["parity"] = _verify(ckpt, teacher, student, staged, test, options, extra)
            failures = gate_failures(meta["parity"], "bundle", options.gate)
            if failures:
                raise ParityGateFailed(failures, format_report(meta["parity"]))
            log.info("verified on %d held-out cases of %s", len(test), test.root)
            meta = seal_bundle(staged, meta, files)
            if extra:
                seal_bundle(extra["student-onnx-fp32"], {**meta, "quantization": None}, extra_files)
    return ExportResult(out, meta)


def _write_files(staged: Path, specs: dict, sources: dict[str, Path], int8: bool, options: ExportOptions,
                 feeds: dict, student: FedMMX, ckpt: Checkpoint) -> None:
    from safetensors.numpy import save_file

    for name, spec in specs.items():
        if int8 and name in FUSION_MODEL_TYPES:
            quantize_graph(sources[name], staged / spec.file, options.quant, feeds[name])
        else:
            shutil.copyfile(sources[name], staged / spec.file)
    save_file(_head_state(student), str(staged / HEAD_WEIGHTS))
    ckpt.tokenizer.save(str(staged / TOKENIZER_FILE))


def _verify(ckpt: Checkpoint, teacher: FedMMX, student: FedMMX, bundle: Path, test: Dataset,
            options: ExportOptions, extra_bundles: dict[str, Path]) -> dict:
    from fedlite.agents.runtime import BundleRuntime

    loader = _loader(ckpt, test, options.batch_size, train=False, seed=0)
    device = resolve_device(options.device)
    outputs = {
        "teacher": predict(teacher, loader, device, options.progress, desc="teacher"),
        "student": predict(student, loader, device, options.progress, desc="student"),
    }
    teacher.cpu()
    student.cpu()
    for name, path in {**extra_bundles, "bundle": bundle}.items():
        pred = BundleRuntime(path).predict_dataset(test, batch_size=options.batch_size, progress=options.progress)
        outputs[name] = (pred.leukemia_prob, pred.stage_prob)
    cases = loader.dataset
    report = parity_report(cases.leukemia.numpy(), cases.stage.numpy(), outputs)
    report["data"] = str(test.root)
    report["gate"] = {"max_accuracy_drop": options.gate.max_accuracy_drop, "max_auc_drop": options.gate.max_auc_drop}
    return report


def _bundle_meta(ckpt: Checkpoint, student: FedMMX, specs: dict, options: ExportOptions, fusions: dict,
                 report: dict, checkpoint: str | Path) -> dict:
    cfg = student.config
    return {
        "bundle_version": 1,
        "fedlite_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "opset": OPSET,
        "preset": cfg.preset,
        "model": {"fusion": cfg.fusion, "num_stages": cfg.num_stages, "image_embedding": cfg.image.embed_dim,
                  "text_embedding": cfg.text.hidden_size, "patch_size": cfg.image.patch_size,
                  "architecture": describe_architecture(student), "parameters": count_parameters(student)},
        "teacher": {"checkpoint": str(checkpoint), "preset": ckpt.model.config.preset,
                    "init": ckpt.model.config.init, "metrics": ckpt.meta.get("metrics", {})},
        "graphs": {name: spec.to_dict() for name, spec in specs.items()},
        "preprocessing": ckpt.meta["preprocessing"],
        "tokenizer": TOKENIZER_FILE,
        "head_weights": HEAD_WEIGHTS,
        "label_names": ckpt.meta["label_names"],
        "stage_names": ckpt.stage_names,
        "quantization": ({**options.quant.to_dict(), "graphs": sorted(FUSION_MODEL_TYPES)} if options.int8 else None),
        "fusions": fusions,
        "export": report,
    }
