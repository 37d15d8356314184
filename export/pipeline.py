"""``fedlite export``: teacher checkpoint -> pruned, distilled, INT8, verified bundle.

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
from fedlite.atomic import require_free, staged_dir
from fedlite.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_meta
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import Dataset, read_dataset
from fedlite.data.split import pooled_parts
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
from fedlite.run_record import run_record
from fedlite.text import TOKENIZER_FILE
from fedlite.training import forward_batch, predict, resolve_device, seed_everything, to_device

log = logging.getLogger(__name__)
FUSION_MODEL_TYPES = {"image_encoder": "vit", "text_encoder": "bert"}


@dataclass(frozen=True)
class ExportOptions:
    student: str | None = None  # None: default_student(teacher)
    student_image_weights: Path | None = None  # a checkpoint for a student image encoder unlike the teacher's
    distill: bool = True
    distill_config: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recovery_epochs: int = 1  # distillation after pruning the teacher itself (distill=False)
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
    signing_key: Path | None = None  # an Ed25519 private key (PEM): the bundle is signed with it

    def load_signing_key(self):
        """The key, loaded (and so checked) before any work starts; None when unsigned."""
        from fedlite.export.signing import load_private_key

        return load_private_key(self.signing_key) if self.signing_key is not None else None


@dataclass
class ExportResult:
    bundle: Path
    meta: dict

    @property
    def parity(self) -> dict:
        return self.meta["parity"]


DATA_OPTIONS = "--sites SPLIT (each step at the sites, on their own cases), --data DIR (pooled cases: a split " \
               "directory, or a dataset with --eval-data DIR) or --proxy-data DIR (non-patient data at the " \
               "coordinator) with --eval-data DIR"


@dataclass(frozen=True)
class ExportData:
    """The cases each step reads and, for bundle.json, where each set came from.

    ``sources`` maps a step (distill, calibration, verification) to ``{"kind", ...}``: kind ``pooled``
    (cases at the coordinator: --data, --eval-data, --calibration) or ``proxy`` (non-patient data,
    --proxy-data) with ``path`` and ``cases``; a federated export adds ``{"kind": "sites",
    "sites": {site: cases}}``.
    """

    distill: Dataset
    verification: Dataset
    calibration: Dataset
    sources: dict[str, dict]


def _source(kind: str, option: str, dataset: Dataset) -> dict:
    return {"kind": kind, "option": option, "path": str(dataset.root), "cases": len(dataset)}


def _check_stages(dataset: Dataset, ckpt_meta: dict) -> Dataset:
    if list(dataset.info.stage_names) != list(ckpt_meta["stage_names"]):
        raise InputError(f"the data's stages {list(dataset.info.stage_names)} differ from the checkpoint's "
                         f"{ckpt_meta['stage_names']}", path=dataset.root / "dataset.json",
                         hint="export with data labelled in the teacher's stages")
    return dataset


def resolve_export_data(ckpt_meta: dict, data: Path | None = None, eval_data: Path | None = None,
                        proxy_data: Path | None = None, calibration: Path | None = None) -> ExportData:
    """Cases for distillation, calibration and verification, each chosen explicitly by the caller.

    Nothing is assumed: a consortium's bundle must never be certified on data nobody chose (the
    checkpoint's recorded training data, or generated synthetic cases). ``data`` is pooled cases (a
    split's train/ distills, its test/ verifies); ``proxy_data`` is non-patient data for distillation
    and calibration only, so verification then needs ``eval_data``.
    """
    chosen = [option for option, value in (("--data", data), ("--proxy-data", proxy_data)) if value is not None]
    if len(chosen) > 1:
        raise InputError(f"{' and '.join(chosen)} given: the student learns from one source",
                         hint="pass one of them, not both")
    if not chosen:
        raise InputError("no data to distill and verify the bundle on", hint=f"pass {DATA_OPTIONS}")
    if data is not None:
        kind, option, (train_dir, test_dir) = "pooled", "--data", pooled_parts(data, eval_data)
        if test_dir is None:
            raise InputError("no held-out cases to verify the bundle on", path=data,
                             hint="pass a split directory from `fedlite data split` or --eval-data DIR")
    else:
        kind, option = "proxy", "--proxy-data"
        train_dir = pooled_parts(proxy_data)[0]
        if eval_data is None:
            raise InputError("--proxy-data distills on non-patient data; the bundle still needs held-out "
                             "cases to be verified on", path=proxy_data, hint="add --eval-data DIR")
        test_dir = Path(eval_data)
    train = _check_stages(read_dataset(train_dir), ckpt_meta)
    test = _check_stages(read_dataset(test_dir), ckpt_meta)
    calib = _check_stages(read_dataset(calibration), ckpt_meta) if calibration is not None else train
    test_kind, test_option = (kind, option) if eval_data is None else ("pooled", "--eval-data")
    sources = {"distill": _source(kind, option, train),
               "calibration": (_source("pooled", "--calibration", calib) if calibration is not None
                               else _source(kind, option, train)),
               "verification": _source(test_kind, test_option, test)}
    return ExportData(train, test, calib, sources)


def _loader(ckpt: Checkpoint, data: Dataset, batch_size: int, train: bool, seed: int):
    cases = CaseDataset(data, ckpt.tokenizer, ckpt.max_length, train=train, seed=seed)
    return make_loader(cases, batch_size, shuffle=train, seed=seed)


def _head_state(model: FedMMX) -> dict[str, np.ndarray]:
    parts = {"fusion": model.fusion, "leukemia_head": model.leukemia_head, "stage_head": model.stage_head}
    return {f"{name}.{k}": v.detach().cpu().numpy().copy() for name, module in parts.items()
            for k, v in module.state_dict().items()}


def load_teacher(checkpoint: str | Path) -> Checkpoint:
    """The teacher in eval mode; a bundle needs a model that reads both the smear and the note."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.model.config.modality != "both":
        raise InputError(f"the checkpoint reads only the {ckpt.model.config.modality}; the bundle needs both "
                         "modalities", path=checkpoint, hint="export a model trained with --modality both")
    ckpt.model.eval()
    return ckpt


def initial_student(teacher: FedMMX, options: ExportOptions) -> tuple[FedMMX, dict]:
    """The student before pruning and distillation, and its report: the teacher's layers it keeps,
    or a copy of the teacher itself when nothing is distilled."""
    if not options.distill:
        return copy.deepcopy(teacher), {"name": "teacher"}
    name = options.student or default_student(teacher.config)
    student, init = make_student(teacher, name, options.student_image_weights)
    return student, {"name": name, **init.to_dict()}


def check_output_free(out: Path, options: ExportOptions, force: bool) -> None:
    """Refuse to replace an existing bundle unless asked, before any work is done."""
    for target in (out, options.fp32_copy):
        if target is not None:
            require_free(target, force, "bundle")


def encoder_feeds(ckpt: Checkpoint, data: Dataset, cases: int, batch: int = 8) -> tuple[dict, int]:
    """Encoder inputs from real cases, for fusion checks and static calibration, and how many cases."""
    loader = _loader(ckpt, data, batch, train=False, seed=0)
    batches = list(islice(iter(loader), max(1, cases // batch)))
    feeds = {
        "image_encoder": lambda: ({"pixels": b["pixels"].numpy()} for b in batches),
        "text_encoder": lambda: ({"input_ids": b["input_ids"].numpy(),
                                  "attention_mask": b["attention_mask"].numpy()} for b in batches),
    }
    return feeds, sum(len(b["leukemia"]) for b in batches)


def export_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                  data: str | Path | None = None, eval_data: str | Path | None = None,
                  calibration: str | Path | None = None, force: bool = False,
                  proxy_data: str | Path | None = None) -> ExportResult:
    """Distill, prune, quantize and verify; the bundle is written only if it passes ``options.gate``.

    Data is chosen explicitly: ``data`` (pooled cases) or ``proxy_data`` (non-patient data, then
    ``eval_data`` for verification); see ``resolve_export_data``.
    """
    out = Path(out)
    signing_key = options.load_signing_key()
    paths = {name: Path(p) if p is not None else None
             for name, p in (("data", data), ("eval_data", eval_data), ("proxy_data", proxy_data),
                             ("calibration", calibration))}
    check_output_free(out, options, force)
    sets = resolve_export_data(read_checkpoint_meta(checkpoint), **paths)
    seed_everything(options.seed)
    device = resolve_device(options.device)
    ckpt = load_teacher(checkpoint)
    teacher = ckpt.model

    with tempfile.TemporaryDirectory(prefix="fedlite-export-") as scratch_name:
        scratch = Path(scratch_name)
        train, test = sets.distill, sets.verification
        train_loader = _loader(ckpt, train, options.batch_size, train=True, seed=options.seed)
        dcfg = options.distill_config
        report: dict = {"teacher_parameters": count_parameters(teacher)}

        # 1. The student: the teacher's layers it keeps (or the teacher itself).
        student, report["student"] = initial_student(teacher, options)

        # 2. Prune heads, FFN channels and layers, ranked by the distillation loss's gradients. A new
        # student is pruned before it is distilled, so every distillation epoch also recovers from
        # the pruning: far closer to the teacher than distill -> prune -> a short recovery (README).
        prune = options.prune
        pruned = prune.fraction > 0 or prune.layers > 0
        if pruned:
            report["prune"] = _prune(student, teacher, train_loader, options, device)

        # 3. Distill the teacher into the student; a pruned teacher recovers for --recovery-epochs.
        if options.distill:
            log.info("distilling into %s (%.2fM parameters) for %d epochs", report["student"]["name"],
                     count_parameters(student) / 1e6, dcfg.epochs)
            report["distill"] = distill(student, teacher, train_loader, dcfg, device,
                                        progress=options.progress).to_dict()
        elif pruned and options.recovery_epochs > 0:
            report["recovery"] = distill(student, teacher, train_loader, dcfg, device,
                                         epochs=options.recovery_epochs, desc="recover",
                                         progress=options.progress).to_dict()
        student = student.cpu().eval()
        teacher = teacher.cpu().eval()
        report["vocabulary"] = trim_vocabulary(student, ckpt.tokenizer.get_vocab_size())

        # 3-4. ONNX graphs, ORT fusions, INT8.
        feeds, calibration_cases = encoder_feeds(ckpt, sets.calibration, options.calibration_cases)
        specs, sources, fusions = onnx_graphs(student, scratch, {n: list(feeds[n]())[:2] for n in FUSION_MODEL_TYPES},
                                              options.fuse)
        meta = bundle_meta(ckpt, student, specs, options, fusions, report, checkpoint)
        meta["data_sources"] = _data_sources(sets, options, calibration_cases)

        with contextlib.ExitStack() as stack:
            staged = stack.enter_context(staged_dir(out, force=True, what="bundle"))
            write_bundle_files(staged, specs, sources, options.int8, options, feeds, student, ckpt)
            files = seal_bundle(staged, meta)["files"]
            extra, extra_files = {}, {}
            if options.fp32_copy is not None and options.int8:
                staged_fp32 = stack.enter_context(staged_dir(options.fp32_copy, force=True, what="bundle"))
                write_bundle_files(staged_fp32, specs, sources, False, options, feeds, student, ckpt)
                extra_files = seal_bundle(staged_fp32, {**meta, "quantization": None})["files"]
                extra["student-onnx-fp32"] = staged_fp32

            # 5. Verify on held-out cases before anything is put in place.
            meta["parity"] = _verify(ckpt, teacher, student, staged, test, options, extra)
            failures = gate_failures(meta["parity"], "bundle", options.gate)
            if failures:
                raise ParityGateFailed(failures, format_report(meta["parity"]))
            log.info("verified on %d held-out cases of %s", len(test), test.root)
            meta = seal_bundle(staged, meta, files, signing_key)
            if extra:
                seal_bundle(extra["student-onnx-fp32"], {**meta, "quantization": None}, extra_files, signing_key)
    return ExportResult(out, meta)


def _prune(student: FedMMX, teacher: FedMMX, loader, options: ExportOptions, device: torch.device) -> dict:
    """Cut the least important heads and channels out of ``student``; importance is taken against
    the teacher's outputs, since the bundle is judged by how faithfully it follows them."""
    teacher.to(device)
    student.to(device)

    def loss_of(batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with torch.no_grad():
            target = forward_batch(teacher, batch)
        return distillation_loss(forward_batch(student, batch), target, batch, options.distill_config)

    importance = score_importance(student, islice(iter(loader), options.prune.batches), loss_of)
    return prune_model(student, importance, options.prune).to_dict()


def onnx_graphs(student: FedMMX, scratch: Path, check_feeds: dict, fuse: bool) -> tuple[dict, dict, dict]:
    """The student's graphs in ``scratch``, the encoders fused by ONNX Runtime where that keeps their
    outputs on ``check_feeds``: (graph specs, the file each graph is taken from, what was fused)."""
    fp32, work = scratch / "fp32", scratch / "work"
    fp32.mkdir()
    work.mkdir()
    specs = export_graphs(student, fp32)
    fusions, sources = {}, {}
    for name, spec in specs.items():
        sources[name] = fp32 / spec.file
        if name in FUSION_MODEL_TYPES and fuse:
            result = fuse_graph(sources[name], work / spec.file, FUSION_MODEL_TYPES[name], check_feeds[name])
            fusions[name] = {"applied": result.applied, "fused_ops": result.fused_ops}
            sources[name] = work / spec.file
    return specs, sources, fusions


def write_bundle_files(staged: Path, specs: dict, sources: dict[str, Path], int8: bool, options: ExportOptions,
                       feeds: dict | None, student: FedMMX, ckpt: Checkpoint, ranges: dict | None = None) -> None:
    """The bundle's graphs (encoders in INT8 if asked: static scales from calibration ``feeds`` or from
    ``ranges`` merged at the sites), head weights and tokenizer, into ``staged``."""
    from safetensors.numpy import save_file

    for name, spec in specs.items():
        if int8 and name in FUSION_MODEL_TYPES:
            quantize_graph(sources[name], staged / spec.file, options.quant, feeds[name] if feeds else None,
                           ranges=ranges[name] if ranges else None)
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
    report["gate"] = options.gate.to_dict()
    return report


def _data_sources(sets: ExportData, options: ExportOptions, calibration_cases: int) -> dict:
    """Where the cases of each step came from; distill is None when the teacher was exported as-is."""
    trained = options.distill or options.prune.fraction > 0 or options.prune.layers > 0
    return {"distill": sets.sources["distill"] if trained else None,
            "calibration": {**sets.sources["calibration"], "cases": calibration_cases},
            "verification": sets.sources["verification"]}


def format_data_sources(sources: dict) -> str:
    """One line per step: which cases it read, so a reader sees at once what the bundle was certified on."""
    lines = []
    for step, src in sources.items():
        if src is None:
            continue
        where = (", ".join(f"{site} {n}" for site, n in src["sites"].items()) if src["kind"] == "sites"
                 else f"{src['path']} ({src.get('option', '')})")
        lines.append(f"{step:<13}{src['kind']:<8}{src.get('cases', sum(src.get('sites', {}).values()))} cases: {where}")
    return "\n".join(lines)


def format_export_summary(result: ExportResult) -> str:
    """What ``fedlite export`` prints: teacher and student, the parity table, the data each step read,
    and the bundle written."""
    meta, report = result.meta, result.meta["export"]
    pruned = report.get("prune")
    size = sum(f["bytes"] for f in meta["files"].values())
    return "\n".join([
        f"teacher: {meta['teacher']['preset']}, {report['teacher_parameters'] / 1e6:.2f}M parameters; "
        f"student: {report['student']['name']}"
        + (f", pruned {pruned['parameters_before'] / 1e6:.2f}M -> {pruned['parameters_after'] / 1e6:.2f}M"
           if pruned else ""),
        format_report(result.parity), format_data_sources(meta["data_sources"]),
        f"bundle: {result.bundle} ({size / 1e6:.1f} MB, {meta['model']['parameters'] / 1e6:.2f}M "
        f"parameters{', INT8' if meta['quantization'] else ', FP32'})"])


def bundle_meta(ckpt: Checkpoint, student: FedMMX, specs: dict, options: ExportOptions, fusions: dict,
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
                    "init": ckpt.model.config.init, "metrics": ckpt.meta.get("metrics", {}),
                    "training": (run_record(ckpt.meta["training"], Path(checkpoint) / "config.json").to_dict()
                                 if ckpt.meta.get("training") else None)},
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
