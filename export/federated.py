"""``fedlite export --sites``: the export as federated jobs, so the coordinator needs no patient case.

The coordinator holds the teacher checkpoint and the student; every step that needs cases is a job
of the coordinator's round engine (``fedlite.federated.engine``, ``rounds``) over the sites
(``export/site_tasks.py``):

1. ship the teacher to every site once (checked by hash, cached there);
2. distill the student in federated rounds: each site distills against the teacher on its training
   part and sends a compressed update; the coordinator screens and averages them;
3. (before 2, as in the pooled export) prune from importance sums merged across sites;
4. export the ONNX graphs; static INT8 is calibrated from activation ranges merged across sites
   (dynamic INT8 needs no data);
5. verify: every site scores the teacher (torch) and the staged bundle (ONNX Runtime) on its
   validation part; the merged statistics feed the same gate as a pooled export. Nothing is
   written unless the bundle passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlite.atomic import atomic_write_text, staged_dir
from fedlite.checkpoint import CONFIG, WEIGHTS, Checkpoint
from fedlite.errors import InputError
from fedlite.export.bundle import seal_bundle
from fedlite.export.calibration import CalibrationStats, calibrated_tensors, decode_statistics, merge_statistics
from fedlite.export.distill import DistillConfig
from fedlite.export.parity import Gate, ParityGateFailed, format_report, gate_failures
from fedlite.export.parity_stats import ParityStats, merge_parity
from fedlite.export.pipeline import (FUSION_MODEL_TYPES, ExportOptions, ExportResult, bundle_meta,
                                     check_output_free, initial_student, load_teacher, onnx_graphs,
                                     write_bundle_files)
from fedlite.export.prune import (Importance, PruneConfig, count_parameters, describe_architecture, prune_model,
                                  trim_vocabulary)
from fedlite.export.quantize import QuantSettings, prepare_graph
from fedlite.federated.config import FederatedConfig
from fedlite.federated.engine import UpdateJob, append_row, run_rounds, summed_bytes
from fedlite.federated.params import add_to_params, get_arrays
from fedlite.federated.preflight import check_sites_data
from fedlite.federated.records import to_record
from fedlite.federated.replies import reply_arrays, reply_metrics
from fedlite.federated.rounds import QUERY_TIMEOUT, T, ask_sites, read_replies, wait_for_nodes
from fedlite.federated.shipped_files import pack_files
from fedlite.model import FedMMX
from fedlite.text import TOKENIZER_FILE
from fedlite.training import seed_everything

log = logging.getLogger(__name__)
ROUNDS = "export_rounds.jsonl"


# The engine's settings of an export's jobs. The export's epochs are passes over the consortium's
# cases, as many as a pooled export makes; each round runs `local_epochs` of them at every site
# (15 epochs: 5 rounds of 3). One epoch per round starves the student of steps: a site of 130 cases
# makes 5 AdamW steps from a fresh optimizer before the average (README, "Export at the sites").
# Updates travel dense: on the quickstart teacher, top-k 10 % with error feedback left 87 % case
# agreement after 10 rounds and int8 alone 91 %, dense updates 96 % (README); `compress=true` still
# applies the codec.
SITE_EPOCHS = 3
EXPORT_RUN = FederatedConfig(local_epochs=SITE_EPOCHS, compress=False, freeze_rounds=0)


@dataclass(frozen=True)
class ExportRunConfig:
    """A deployed export's settings, flat as Flower's run config carries them (``export-*`` keys)."""

    checkpoint: str = ""  # set: the run is a federated export of this checkpoint
    out: str = "runs/bundle"
    int8: bool = True
    student: str = ""  # "": the default student of the teacher
    distill_epochs: int = DistillConfig.epochs  # passes over the sites' cases
    site_epochs: int = SITE_EPOCHS  # of them in each round
    recovery_epochs: int = 1
    lr: float = DistillConfig.lr
    alpha: float = DistillConfig.alpha
    temperature: float = DistillConfig.temperature
    prune: float = PruneConfig.fraction
    prune_layers: int = 0
    quantize: str = "dynamic"
    max_accuracy_drop: float = Gate.max_accuracy_drop
    max_auc_drop: float = Gate.max_auc_drop
    max_stage_f1_drop: float = Gate.max_stage_f1_drop
    min_agreement: float = Gate.min_case_agreement
    min_leukemia_agreement: float = Gate.min_leukemia_agreement
    min_auc: float = Gate.min_auc
    sign_key: str = ""  # an Ed25519 private key on the coordinator: the bundle is signed with it
    force: bool = False

    def to_flat(self) -> dict:
        return {f"export-{k.replace('_', '-')}": v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_flat(cls, flat: dict) -> "ExportRunConfig":
        values = {}
        for field in dataclasses.fields(cls):
            key = f"export-{field.name.replace('_', '-')}"
            if key in flat:
                values[field.name] = type(field.default)(flat[key])
        return cls(**values)

    def options(self, progress: bool = True) -> ExportOptions:
        return ExportOptions(
            student=self.student or None,
            distill_config=DistillConfig(epochs=self.distill_epochs, lr=self.lr, alpha=self.alpha,
                                         temperature=self.temperature),
            prune=PruneConfig(fraction=self.prune, layers=self.prune_layers), recovery_epochs=self.recovery_epochs,
            int8=self.int8, quant=QuantSettings(mode=self.quantize),
            gate=Gate(max_accuracy_drop=self.max_accuracy_drop, max_auc_drop=self.max_auc_drop,
                      max_stage_f1_drop=self.max_stage_f1_drop, min_case_agreement=self.min_agreement,
                      min_leukemia_agreement=self.min_leukemia_agreement, min_auc=self.min_auc),
            progress=progress, signing_key=Path(self.sign_key) if self.sign_key else None)


def export_from_config(grid: Grid, flat: dict, progress: bool = True) -> ExportResult:
    """A federated export on Flower's deployment engine: the checkpoint and settings in the run config."""
    job = ExportRunConfig.from_flat(flat)
    run = dataclasses.replace(FederatedConfig.from_flat(flat), local_epochs=job.site_epochs, freeze_rounds=0)
    options = dataclasses.replace(job.options(progress), batch_size=run.batch_size, seed=run.seed, device=run.device)
    return export_at_sites(grid, job.checkpoint, job.out, options, run, job.force)


class _Job:
    """What every message of one export carries, and where its record goes."""

    def __init__(self, grid: Grid, run: FederatedConfig, teacher_digest: str, options: ExportOptions, log_path: Path):
        self.grid, self.run, self.options, self.log_path = grid, run, options, log_path
        self.timeout = run.round_timeout or QUERY_TIMEOUT
        dcfg = options.distill_config
        self.settings = {**run.site_settings(), "teacher-digest": teacher_digest,
                         "distill-alpha": dcfg.alpha, "distill-temperature": dcfg.temperature,
                         "distill-feature-weight": dcfg.feature_weight, "gamma": dcfg.gamma,
                         "batch-size": options.batch_size, "importance-batches": options.prune.batches,
                         "calibration-cases": options.calibration_cases}

    def record(self, row: dict) -> None:
        append_row(self.log_path, row)

    def ask(self, what: str, message_type: str, config: dict, read: Callable[[str, Message], T],
            **records) -> dict[str, T]:
        """Every site answers the query; each answer is read by ``read(site, msg)``. Too few
        readable answers stop the export with the sites' reasons."""
        nodes = wait_for_nodes(self.grid, self.run.min_sites)
        content = RecordDict({**records, "config": ConfigRecord({**self.settings, **config})})
        answered = ask_sites(self.grid, nodes, content, message_type, self.timeout)
        values = read_replies(answered, what, read)
        if len(values) < max(1, self.run.min_sites):
            reasons = "; ".join(f"{f.site}: {f.reason}" for f in answered.failed) or "none answered"
            raise InputError(f"{what}: {len(values)} of {len(nodes)} sites answered usably, the export needs "
                             f"{max(1, self.run.min_sites)} ({reasons})")
        self.record({"job": what, "sites": sorted(values), "failed": [f.__dict__ for f in answered.failed],
                     "bytes_sent": answered.bytes_sent, "seconds": answered.seconds})
        return values


def cases_of(site: str, msg: Message) -> int:
    return int(reply_metrics(msg)["num-examples"])


def student_settings(student: FedMMX) -> dict:
    return {"student-config": json.dumps(student.config.to_dict()),
            "student-architecture": json.dumps(describe_architecture(student))}


class DistillJob(UpdateJob):
    """Federated distillation as a job of the round engine: the whole student travels; each site
    distills it against the cached teacher on its training part."""

    message_type = "train.distill"

    def __init__(self, job: _Job, student: FedMMX, cfg: FederatedConfig, phase: str, epochs: int):
        self.job, self.student, self.cfg, self.phase, self.epochs = job, student, cfg, phase, epochs
        self.names = [n for n, _ in student.named_parameters()]

    def local_epochs(self, server_round: int) -> int:
        """``cfg.local_epochs`` per round; the last round makes up the rest of ``epochs``."""
        return min(self.cfg.local_epochs, self.epochs - (server_round - 1) * self.cfg.local_epochs)

    def parameters(self, server_round: int) -> dict[str, np.ndarray]:
        return get_arrays(self.student, self.names)

    def settings(self, server_round: int) -> dict:
        return {**self.job.settings, **self.cfg.site_settings(), **student_settings(self.student),
                "server-round": server_round, "local-epochs": self.local_epochs(server_round)}

    def apply(self, delta: dict[str, np.ndarray]) -> None:
        add_to_params(self.student, delta)

    def evaluate(self, server_round: int, row: dict, nodes: list[int]) -> None:
        row["job"] = self.phase  # the student is scored once, as a bundle, by the parity job


def distill_rounds(job: _Job, student: FedMMX, epochs: int, phase: str) -> dict:
    """Federated distillation: ``epochs`` passes over the sites' cases, ``job.run.local_epochs`` of
    them in each round, the sites' updates averaged into ``student`` after every round."""
    epochs = max(1, epochs)
    rounds = -(-epochs // job.run.local_epochs)
    cfg = dataclasses.replace(job.run, rounds=rounds, lr=job.options.distill_config.lr)
    history = run_rounds(job.grid, DistillJob(job, student, cfg, phase, epochs), cfg, range(1, rounds + 1),
                         np.random.default_rng([cfg.seed, len(phase)]), job.log_path, phase, job.options.progress)
    sent, received = summed_bytes(history)
    sites = {site: cases for row in history for site, cases in row["site_cases"].items()}
    return {"epochs": epochs, "site_epochs": cfg.local_epochs, "rounds": len(history), "sites": sites,
            "bytes_sent": sent, "bytes_received": received}


def merged_importance(job: _Job, student: FedMMX) -> tuple[Importance, dict]:
    """Importance of every head and FFN channel, summed over the sites' batches."""
    layers = describe_architecture(student)
    expected = {f"{kind}/{enc}/{i}": (shape[key],) for enc, shapes in layers.items()
                for i, shape in enumerate(shapes) for kind, key in (("heads", "heads"), ("channels", "ffn"))}

    def read(site: str, msg: Message) -> tuple[dict[str, np.ndarray], int]:
        arrays = reply_arrays(msg, "stats")
        bad = sorted(set(arrays) ^ set(expected)) or [n for n, v in arrays.items() if v.shape != expected[n]
                                                      or not np.isfinite(v).all() or (v < 0).any()]
        if bad:
            raise InputError(f"importance statistic {bad[0]} is missing, unexpected, misshapen or not finite")
        return arrays, cases_of(site, msg)

    answers = job.ask("importance", "query.importance", student_settings(student), read,
                      arrays=to_record(get_arrays(student, [n for n, _ in student.named_parameters()])))
    total = {name: sum(arrays[name] for arrays, _ in answers.values()) for name in expected}
    cases = {site: count for site, (_, count) in answers.items()}

    def scores(kind: str) -> dict[str, list[torch.Tensor]]:
        return {enc: [torch.from_numpy(total[f"{kind}/{enc}/{i}"]).float() for i in range(len(shapes))]
                for enc, shapes in layers.items()}

    return Importance(heads=scores("heads"), channels=scores("channels")), cases


def merged_calibration(job: _Job, sources: dict[str, Path], work: Path) -> tuple[dict, dict]:
    """Activation ranges of each encoder graph, merged from the sites' statistics. A graph with no
    tensor to calibrate (ORT's fused attention graphs) is not asked about: its INT8 is weights-only."""
    operators = job.options.quant.operators
    prepared = {name: f"{name}.prep.onnx" for name in FUSION_MODEL_TYPES}
    expected = {}
    for name, file in prepared.items():
        prepare_graph(sources[name], work / file)
        expected[name] = calibrated_tensors(work / file, operators)
    asked = {name: file for name, file in prepared.items() if expected[name]}
    merged = {name: CalibrationStats(ranges={}) for name in prepared if not expected[name]}
    if not asked:
        return merged, {}
    files, digest = pack_files(work, list(asked.values()))

    def read(site: str, msg: Message) -> tuple[dict[str, CalibrationStats], int]:
        arrays = reply_arrays(msg, "stats")
        stats = {}
        for name in asked:
            part = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}/")}
            stats[name] = decode_statistics(part, expected[name], source=f"{site} ({name})")
        return stats, cases_of(site, msg)

    answers = job.ask("calibrate", "query.calibrate", {"graphs-digest": digest, "graph-files": json.dumps(asked),
                                                        "operators": json.dumps(operators)}, read,
                      files=to_record(files))
    merged.update({name: merge_statistics([stats[name] for stats, _ in answers.values()]) for name in asked})
    return merged, {site: count for site, (_, count) in answers.items()}


def site_parity(job: _Job, staged: Path, num_stages: int) -> tuple[dict, dict]:
    """The staged bundle and the teacher scored at the sites: the parity report and validation cases per site."""
    files, digest = pack_files(staged)
    answers = job.ask("verify", "evaluate.parity", {"bundle-digest": digest},
                      lambda site, msg: ParityStats.from_arrays(reply_arrays(msg, "stats"), num_stages),
                      files=to_record(files))
    parts = list(answers.values())
    cases = {site: stats.models["teacher"].cases for site, stats in answers.items()}
    merged = merge_parity(parts, num_stages)
    if merged.models["teacher"].cases == 0:
        raise InputError("no site holds validation cases to verify the bundle on",
                         hint="give sites a val/ directory or a --site-val-fraction above 0")
    return merged.report(), cases


def _fusion_feeds(ckpt: Checkpoint, batch: int = 2) -> dict:
    """Inputs for checking ORT's fusions: random pixels and token ids, not cases."""
    generator = torch.Generator().manual_seed(0)
    size = ckpt.meta["preprocessing"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=generator).numpy()
    ids = torch.randint(0, ckpt.tokenizer.get_vocab_size(), (batch, 32), generator=generator).numpy()
    return {"image_encoder": [{"pixels": pixels}],
            "text_encoder": [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]}


def export_at_sites(grid: Grid, checkpoint: str | Path, out: str | Path, options: ExportOptions,
                    run: FederatedConfig = EXPORT_RUN, force: bool = False) -> ExportResult:
    out = Path(out)
    check_output_free(out, options, force)
    signing_key = options.load_signing_key()
    seed_everything(options.seed)
    ckpt = load_teacher(checkpoint)
    teacher = ckpt.model
    if run.dp:
        raise InputError("a federated export distills without DP-SGD", hint="drop --dp")
    check_sites_data(grid, run.min_sites, run.round_timeout or QUERY_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="fedlite-export-") as scratch_name:
        scratch = Path(scratch_name)
        log_path = scratch / ROUNDS
        files, digest = pack_files(checkpoint, [WEIGHTS, CONFIG, TOKENIZER_FILE])
        job = _Job(grid, run, digest, options, log_path)
        train_cases = job.ask("teacher", "query.teacher", {}, cases_of, files=to_record(files))
        report: dict = {"teacher_parameters": count_parameters(teacher)}

        # The same order as the pooled export: a new student is pruned first, so every distillation
        # round also recovers from the pruning.
        student, report["student"] = initial_student(teacher, options)
        prune = options.prune
        pruned = prune.fraction > 0 or prune.layers > 0
        if pruned:
            importance, importance_cases = merged_importance(job, student)
            report["prune"] = {**prune_model(student, importance, prune).to_dict(), "sites": importance_cases}
        if options.distill:
            report["distill"] = distill_rounds(job, student, options.distill_config.epochs, "distill")
        elif pruned and options.recovery_epochs > 0:
            report["recovery"] = distill_rounds(job, student, options.recovery_epochs, "recover")
        student = student.cpu().eval()
        report["vocabulary"] = trim_vocabulary(student, ckpt.tokenizer.get_vocab_size())

        specs, sources, fusions = onnx_graphs(student, scratch, _fusion_feeds(ckpt), options.fuse)
        ranges, calibration_cases = None, None
        if options.int8 and options.quant.mode == "static":
            ranges, calibration_cases = merged_calibration(job, sources, scratch / "work")
        meta = bundle_meta(ckpt, student, specs, options, fusions, report, checkpoint)
        with contextlib.ExitStack() as stack:
            staged = stack.enter_context(staged_dir(out, force=True, what="bundle"))
            write_bundle_files(staged, specs, sources, options.int8, options, None, student, ckpt, ranges=ranges)
            files_meta = seal_bundle(staged, meta)["files"]
            parity, validation_cases = site_parity(job, staged, len(ckpt.stage_names))
            meta["parity"] = {**parity, "gate": options.gate.to_dict(), "data": "sites"}
            meta["data_sources"] = {
                "distill": {"kind": "sites", "sites": train_cases} if options.distill else None,
                "calibration": {"kind": "sites", "sites": calibration_cases} if calibration_cases else None,
                "verification": {"kind": "sites", "sites": validation_cases}}
            failures = gate_failures(meta["parity"], "bundle", options.gate)
            if failures:
                raise ParityGateFailed(failures, format_report(meta["parity"]))
            log.info("verified at %d sites on %d validation cases", len(validation_cases),
                     sum(validation_cases.values()))
            meta = seal_bundle(staged, meta, files_meta, signing_key)
        atomic_write_text(out.with_name(out.name + ".rounds.jsonl"), log_path.read_text())
    return ExportResult(out, meta)


def export_simulated(checkpoint: str | Path, out: str | Path, options: ExportOptions, sites: str | Path,
                     run: FederatedConfig = EXPORT_RUN, force: bool = False) -> ExportResult:
    """``export_at_sites`` over a split's sites simulated on this machine (Flower's simulation
    runtime); the simulated sites share one cache for the teacher and the bundle under test, and may
    write the same file at once: the first copy published is the one kept."""
    from fedlite.federated.simulation import simulate

    with tempfile.TemporaryDirectory(prefix="fedlite-site-cache-") as cache:
        return simulate(sites, lambda grid: export_at_sites(grid, checkpoint, out, options, run, force),
                        {"cache-dir": cache}, options.device)
