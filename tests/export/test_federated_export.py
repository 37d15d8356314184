"""Federated export: distillation, pruning, calibration and the gate as jobs at the sites; the
coordinator holds the teacher and never a case; what sites send is parameters and statistics."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from opened_files import OpenedFiles
from wire import sent_tensor_names
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlite.agents.runtime import BundleRuntime
from fedlite.checkpoint import CONFIG, WEIGHTS, load_checkpoint
from fedlite.data.holdout import site_parts
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.eval_stats import EvalStats
from fedlite.export.bundle import verify_bundle
from fedlite.export.distill import DistillConfig
from fedlite.export.federated import export_simulated, student_settings
from fedlite.export.parity import NO_GATE, Gate, ParityGateFailed, parity_report
from fedlite.export.pipeline import ExportOptions
from fedlite.export.prune import PruneConfig, describe_architecture
from fedlite.export.student import make_student
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import get_arrays
from fedlite.federated.records import to_record
from fedlite.federated.shipped_files import pack_files
from fedlite.text import TOKENIZER_FILE
from fedlite.training import predict, resolve_device

SITES = ("site-01", "site-02", "site-03")
RUN = FederatedConfig(local_epochs=1, compress=True, freeze_rounds=0, batch_size=16)


def _options(**kw):
    base = dict(int8=True, distill_config=DistillConfig(epochs=2, lr=3e-3), prune=PruneConfig(fraction=0.5, batches=2),
                recovery_epochs=1, gate=NO_GATE, batch_size=16, progress=False)
    return ExportOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def sites_only(teacher_run, tmp_path_factory):
    """The teacher's split with nothing pooled left: no test/, no train/, no source manifest."""
    _, split = teacher_run
    data = tmp_path_factory.mktemp("sites") / "data"
    shutil.copytree(split.parent, data)
    for pooled in ("test", "train"):
        shutil.rmtree(data / split.name / pooled)
    (data / "manifest.jsonl").unlink()
    return data / split.name


@pytest.fixture(scope="module")
def site_export(teacher_run, sites_only, tmp_path_factory):
    checkpoint, _ = teacher_run
    opened = OpenedFiles(sites_only.parent)
    out = tmp_path_factory.mktemp("federated-export") / "bundle"
    opened.recording = True
    try:
        # three epochs, two at every site per round: a round of two, then a round of one
        result = export_simulated(checkpoint, out, _options(distill_config=DistillConfig(epochs=3, lr=3e-3)),
                                  sites_only, dataclasses.replace(RUN, local_epochs=2))
    finally:
        opened.recording = False
    return result, opened.paths


def test_the_coordinator_exports_without_reading_a_case(site_export, sites_only):
    result, opened = site_export
    assert {p for p in opened if not p.endswith("split.json")} == set()
    meta = verify_bundle(result.bundle)
    sources = meta["data_sources"]
    parts = {s: site_parts(sites_only / s) for s in SITES}
    assert sources["distill"] == {"kind": "sites", "sites": {s: len(p.train) for s, p in parts.items()}}
    assert sources["verification"] == {"kind": "sites", "sites": {s: len(p.val) for s, p in parts.items()}}
    distilled = meta["export"]["distill"]
    assert (distilled["epochs"], distilled["site_epochs"], distilled["rounds"]) == (3, 2, 2)
    assert "recovery" not in meta["export"]  # pruned first
    assert meta["export"]["prune"]["parameters_after"] < meta["export"]["prune"]["parameters_before"]
    assert meta["parity"]["data"] == "sites"
    rows = [json.loads(line) for line in result.bundle.with_name("bundle.rounds.jsonl").read_text().splitlines()]
    jobs = [r["job"] for r in rows]
    assert jobs == ["teacher", "importance", "distill", "distill", "verify"]
    train_cases = sum(len(p.train) for p in parts.values())
    assert [r["samples_trained"] for r in rows if r["job"] == "distill"] == [2 * train_cases, train_cases]
    for row in rows:
        if row["job"] in ("distill", "recover"):
            assert sorted(row["sites"]) == list(SITES) and all(b > 0 for b in row["bytes_received"].values())


def test_the_sites_parity_equals_the_pooled_parity_on_their_validation_cases(site_export, teacher_run, sites_only):
    result, _ = site_export
    teacher = load_checkpoint(teacher_run[0])
    runtime = BundleRuntime(result.bundle)
    labels, reference, bundle = [], [], []
    for s in SITES:
        val = site_parts(sites_only / s).val
        cases = CaseDataset(val, teacher.tokenizer, teacher.max_length)
        reference.append(predict(teacher.model, make_loader(cases, 16, shuffle=False), resolve_device("cpu")))
        p = runtime.predict_dataset(val, batch_size=16)
        bundle.append((p.leukemia_prob, p.stage_prob))
        labels.append((cases.leukemia.numpy(), cases.stage.numpy()))
    cat = lambda parts, i: np.concatenate([p[i] for p in parts])  # noqa: E731
    pooled = parity_report(cat(labels, 0), cat(labels, 1), {"teacher": (cat(reference, 0), cat(reference, 1)),
                                                            "bundle": (cat(bundle, 0), cat(bundle, 1))})
    sites = result.parity["models"]
    for model, probs in (("teacher", reference), ("bundle", bundle)):
        for key in ("cases", "positives", "accuracy", "stage_macro_f1", "stage_accuracy"):
            assert sites[model][key] == pooled["models"][model][key], (model, key)
        # AUC from the merged score histograms: exact but for positive-negative pairs sharing a bin
        stats = EvalStats.from_predictions(cat(labels, 0), cat(labels, 1), cat(probs, 0), cat(probs, 1))
        negatives, positives = stats.score_histogram
        ties = (negatives * positives).sum() / (2 * negatives.sum() * positives.sum())
        assert sites[model]["auc"] == stats.auc()
        assert abs(sites[model]["auc"] - pooled["models"][model]["auc"]) <= ties
    for key in ("leukemia_agreement", "stage_agreement", "case_agreement", "agreement_counts"):
        assert sites["bundle"][key] == pooled["models"]["bundle"][key], key


def test_a_bundle_that_breaks_the_teachers_calls_fails_at_the_sites_and_nothing_is_written(
        teacher_run, sites_only, tmp_path, monkeypatch):
    from fedlite.export import pipeline

    def inverted(model, directory):  # a student whose leukemia head swaps its two logits: every call flips
        with torch.no_grad():
            model.leukemia_head.weight.neg_()
            model.leukemia_head.bias.neg_()
        return export_graphs(model, directory)

    export_graphs = pipeline.export_graphs
    monkeypatch.setattr(pipeline, "export_graphs", inverted)
    checkpoint, _ = teacher_run
    out = tmp_path / "bundle"
    options = _options(distill_config=DistillConfig(epochs=0), recovery_epochs=0, prune=PruneConfig(fraction=0.0),
                       gate=Gate())
    with pytest.raises(ParityGateFailed) as failed:
        export_simulated(checkpoint, out, options, sites_only, RUN)
    assert any(f.startswith("leukemia-call agreement") for f in failed.value.failures), failed.value.failures
    assert "bundle" in str(failed.value) and "teacher" in str(failed.value)
    assert not out.exists()


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Messages can only be built inside a run; give the direct calls below one."""


def test_what_a_site_sends_in_each_export_job(teacher_run, sites_only, tmp_path):
    from fedlite.export import site_tasks

    checkpoint, _ = teacher_run
    teacher = load_checkpoint(checkpoint)
    files, digest = pack_files(checkpoint, [WEIGHTS, CONFIG, TOKENIZER_FILE])
    student, _ = make_student(teacher.model, "half")
    flat = {**RUN.to_flat(), "teacher-digest": digest, "distill-alpha": 0.0, "distill-temperature": 2.0,
            "distill-feature-weight": 0.0, "gamma": 1.0, "batch-size": 8, "importance-batches": 1,
            "calibration-cases": 8, "server-round": 1, **student_settings(student)}
    site_dir = sites_only / "site-01"
    notes = [c.text for c in site_parts(site_dir).train.cases] + [c.text for c in site_parts(site_dir).val.cases]
    ids = [c.id for c in site_parts(site_dir).train.cases]
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(site_dir), "cache-dir": str(tmp_path / "cache")})

    def ask(handler, **records):
        msg = Message(RecordDict({**records, "config": ConfigRecord(flat)}), dst_node_id=1, message_type="query")
        reply = handler(msg, context, None, {})
        text = " ".join(str(v) for rec in reply.content.config_records.values() for v in rec.values())
        assert not any(note[:30] in text for note in notes) and not any(i in text for i in ids)
        assert all(isinstance(v, (int, float)) for v in dict(reply.content["metrics"]).values())
        return reply

    ask(site_tasks.receive_teacher, files=to_record(files))
    assert (tmp_path / "cache").stat().st_mode & 0o077 == 0  # the teacher is kept owner-only
    arrays = get_arrays(student, [n for n, _ in student.named_parameters()])
    update = ask(site_tasks.distill_site, arrays=to_record(arrays))
    assert sent_tensor_names(update.content["arrays"]) == set(arrays)  # parameters, nothing else
    importance = ask(site_tasks.importance_site, arrays=to_record(arrays))
    sizes = {k: v.numpy().shape for k, v in importance.content["stats"].items()}
    assert all(k.startswith(("heads/", "channels/")) for k in sizes)  # one value per head or channel
    widths = [layer[key] for layers in describe_architecture(student).values() for layer in layers
              for key in ("heads", "ffn")]
    assert sorted(s[0] for s in sizes.values()) == sorted(widths)


def test_static_int8_is_calibrated_from_ranges_merged_across_sites(teacher_run, sites_only, tmp_path):
    from fedlite.export.quantize import QuantSettings, op_counts

    options = _options(distill=False, prune=PruneConfig(fraction=0.0), recovery_epochs=0, calibration_cases=8,
                       quant=QuantSettings(mode="static", isa="avx2"))
    result = export_simulated(teacher_run[0], tmp_path / "static", options, sites_only, RUN)
    assert result.meta["data_sources"]["calibration"] == {"kind": "sites", "sites": {s: 8 for s in SITES}}
    assert op_counts(result.bundle / "image_encoder.onnx").get("QuantizeLinear", 0) > 0
    assert result.parity["models"]["bundle"]["leukemia_agreement"] >= 0.85
