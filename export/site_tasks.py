"""The sites' side of a federated export: every step that needs cases runs here, on the site's own.

- ``query.teacher``: receive the teacher checkpoint once, checked by hash, and keep it in the cache;
- ``train.distill``: distill the student against the teacher on the training part and send the
  update through the shared site-update path (codec and residual included);
- ``query.importance``: per-head and per-channel importance sums of the student (no per-case value);
- ``query.calibrate``: activation ranges of the student's graphs for static INT8;
- ``evaluate.parity``: teacher (torch) and bundle (ONNX Runtime, as the agent runs it) scored on the
  validation part: both models' evaluation statistics, agreement counts and the largest probability
  differences.
Replies carry parameters, counts, sums and extremes only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from itertools import islice

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlite.checkpoint import Checkpoint, load_checkpoint
from fedlite.data.holdout import SiteParts, site_parts
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.data.manifest import Dataset
from fedlite.errors import InputError
from fedlite.export.distill import DistillConfig, distill, distillation_loss
from fedlite.export.parity_stats import ParityStats
from fedlite.export.prune import apply_architecture, score_importance
from fedlite.federated.params import set_arrays
from fedlite.federated.records import to_record
from fedlite.federated.shipped_files import cached_shipment
from fedlite.federated.site import SitePaths, job_settings, received_arrays, site_paths
from fedlite.federated.site_update import local_update, update_reply
from fedlite.model import FedMMX
from fedlite.presets import ModelConfig
from fedlite.training import TrainStats, forward_batch, peak_memory_mb, predict, resolve_device, to_device

_TEACHERS: dict[str, Checkpoint] = {}


def _site(context: Context, split_dir, defaults: dict[str, str], flat: dict) -> tuple[SitePaths, SiteParts]:
    """This site's files and the training and validation parts of its cases."""
    paths = site_paths(context, split_dir, defaults)
    return paths, site_parts(paths.data_dir, float(flat["site-val-fraction"]))


def teacher_of(flat: dict, site: SitePaths, arrays=None) -> Checkpoint:
    """The teacher this job names, from the site's cache (loaded once per process)."""
    digest = str(flat["teacher-digest"])
    if digest not in _TEACHERS:
        path = cached_shipment(site.path("cache-dir"), "teacher", digest, arrays)
        _TEACHERS.clear()
        _TEACHERS[digest] = load_checkpoint(path)
        _TEACHERS[digest].model.eval().requires_grad_(False)
    return _TEACHERS[digest]


def _check_stages(dataset: Dataset, teacher: Checkpoint) -> None:
    if list(dataset.info.stage_names) != list(teacher.stage_names):
        raise InputError(f"this site's stages {list(dataset.info.stage_names)} differ from the teacher's "
                         f"{teacher.stage_names}", path=dataset.root / "dataset.json")


def student_of(flat: dict, arrays: dict[str, np.ndarray]) -> FedMMX:
    """The coordinator's student: its config and (pruned) shapes from the message, then its weights."""
    student = FedMMX(ModelConfig.from_dict(json.loads(str(flat["student-config"]))))
    apply_architecture(student, json.loads(str(flat["student-architecture"])))
    names = {n for n, _ in student.named_parameters()}
    if set(arrays) != names:
        raise InputError(f"the coordinator sent {len(arrays)} student tensors, this student has {len(names)}")
    set_arrays(student, arrays)
    return student


def distill_config(flat: dict) -> DistillConfig:
    return DistillConfig(alpha=float(flat["distill-alpha"]), temperature=float(flat["distill-temperature"]),
                         feature_weight=float(flat["distill-feature-weight"]), gamma=float(flat["gamma"]),
                         batch_size=int(flat["batch-size"]))


def _loader(teacher: Checkpoint, data: Dataset, batch_size: int, train: bool, seed: int = 0):
    return make_loader(CaseDataset(data, teacher.tokenizer, teacher.max_length, train=train, seed=seed),
                       batch_size, shuffle=train, seed=seed)


def receive_teacher(msg: Message, context: Context, split_dir, defaults: dict[str, str]) -> Message:
    flat = dict(msg.content["config"])
    site, parts = _site(context, split_dir, defaults, flat)
    teacher = teacher_of(flat, site, received_arrays(msg, "files"))
    _check_stages(parts.train, teacher)
    metrics = {"num-examples": len(parts.train), "validation-cases": len(parts.val)}
    return Message(RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"site": site.name})}),
                   reply_to=msg)


def distill_site(msg: Message, context: Context, split_dir, defaults: dict[str, str]) -> Message:
    compute_start = time.time()
    flat, cfg = job_settings(msg)
    server_round = int(flat["server-round"])
    site, parts = _site(context, split_dir, defaults, flat)
    teacher = teacher_of(flat, site)
    arrays = received_arrays(msg)
    student = student_of(flat, arrays)
    loader = _loader(teacher, parts.train, cfg.batch_size, train=True, seed=cfg.seed + server_round)
    config = distill_config(flat)

    def train(model, loader, _, device, lr) -> TrainStats:
        report = distill(model, teacher.model, loader, dataclasses.replace(config, lr=lr), device,
                         epochs=cfg.local_epochs, progress=False)
        return TrainStats(samples=len(loader.dataset) * cfg.local_epochs, steps=report.steps,
                          mean_loss=report.mean_loss_last_epoch, seconds=report.seconds,
                          peak_memory_mb=peak_memory_mb(device))

    device = resolve_device(cfg.device)
    update = local_update(student, arrays, loader, cfg, server_round, context, device, train=train)
    teacher.model.cpu()
    update.metrics.update({"compute-start": compute_start, "compute-end": time.time()})
    return update_reply(msg, update, site.name, cfg.compress)


def importance_site(msg: Message, context: Context, split_dir, defaults: dict[str, str]) -> Message:
    """|∂L/∂gate| summed over the site's batches, per head and per FFN channel of every layer."""
    flat = dict(msg.content["config"])
    site, parts = _site(context, split_dir, defaults, flat)
    teacher = teacher_of(flat, site)
    student = student_of(flat, received_arrays(msg))
    config, device = distill_config(flat), resolve_device(str(flat["device"]))
    teacher.model.to(device)
    student.to(device)

    def loss_of(batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with torch.no_grad():
            target = forward_batch(teacher.model, batch)
        return distillation_loss(forward_batch(student, batch), target, batch, config)

    loader = _loader(teacher, parts.train, int(flat["batch-size"]), train=False)
    batches = list(islice(iter(loader), int(flat["importance-batches"])))
    importance = score_importance(student, batches, loss_of)
    teacher.model.cpu()
    arrays = {f"{kind}/{encoder}/{i}": scores.numpy().astype(np.float64)
              for kind, table in (("heads", importance.heads), ("channels", importance.channels))
              for encoder, layers in table.items() for i, scores in enumerate(layers)}
    metrics = {"num-examples": sum(len(b["leukemia"]) for b in batches), "batches": len(batches)}
    return Message(RecordDict({"stats": to_record(arrays), "metrics": MetricRecord(metrics),
                               "info": ConfigRecord({"site": site.name})}), reply_to=msg)


def calibrate_site(msg: Message, context: Context, split_dir, defaults: dict[str, str]) -> Message:
    """Activation statistics of the shipped (prepared) encoder graphs on the site's training cases."""
    from fedlite.export.calibration import collect_statistics
    from fedlite.export.pipeline import encoder_feeds

    flat = dict(msg.content["config"])
    site, parts = _site(context, split_dir, defaults, flat)
    teacher = teacher_of(flat, site)
    graphs = cached_shipment(site.path("cache-dir"), "graphs", str(flat["graphs-digest"]),
                             received_arrays(msg, "files"))
    feeds, cases = encoder_feeds(teacher, parts.train, int(flat["calibration-cases"]))
    operators = json.loads(str(flat["operators"]))
    arrays = {}
    for name, file in json.loads(str(flat["graph-files"])).items():
        stats = collect_statistics(graphs / file, feeds[name](), operators)
        arrays.update({f"{name}/{key}": value for key, value in stats.items()})
    return Message(RecordDict({"stats": to_record(arrays), "metrics": MetricRecord({"num-examples": cases}),
                               "info": ConfigRecord({"site": site.name})}), reply_to=msg)


def parity_site(msg: Message, context: Context, split_dir, defaults: dict[str, str]) -> Message:
    """Teacher and bundle on the validation part: statistics of each and of their agreement."""
    from fedlite.agents.runtime import BundleRuntime

    start = time.perf_counter()
    flat = dict(msg.content["config"])
    site, parts = _site(context, split_dir, defaults, flat)
    teacher = teacher_of(flat, site)
    bundle = cached_shipment(site.path("cache-dir"), "bundle", str(flat["bundle-digest"]),
                             received_arrays(msg, "files"))
    val = parts.val
    stats = ParityStats.empty(len(teacher.stage_names))
    if val.cases:
        loader = _loader(teacher, val, int(flat["batch-size"]), train=False)
        reference = predict(teacher.model, loader, resolve_device(str(flat["device"])))
        prediction = BundleRuntime(bundle).predict_dataset(val, batch_size=int(flat["batch-size"]))
        labels = loader.dataset.leukemia.numpy(), loader.dataset.stage.numpy()
        stats = ParityStats.from_predictions(*labels, reference, (prediction.leukemia_prob, prediction.stage_prob))
    metrics = {"num-examples": len(val), "eval-seconds": time.perf_counter() - start}
    return Message(RecordDict({"stats": to_record(stats.to_arrays()), "metrics": MetricRecord(metrics),
                               "info": ConfigRecord({"site": site.name})}), reply_to=msg)
