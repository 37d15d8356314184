"""The parity gate: it reads the report's numbers, lists every criterion a bundle fails, and refuses a
student that keeps the teacher's accuracy but not its calls, writing nothing."""

import numpy as np
import pytest
from click.testing import CliRunner

from fedlite.cli import main
from fedlite.export import pipeline
from fedlite.export.parity import (Gate, ParityGateFailed, agreement, agreement_counts, agreement_rates,
                                   gate_failures, merge_agreement_counts)
from fedlite.export.pipeline import ExportOptions, export_bundle
from fedlite.export.prune import PruneConfig


def _report(**bundle) -> dict:
    teacher = {"accuracy": 0.90, "auc": 0.95, "stage_macro_f1": 0.80}
    candidate = {**teacher, "case_agreement": 0.95, "leukemia_agreement": 0.99, **bundle}
    return {"reference": "teacher", "models": {"teacher": teacher, "bundle": candidate}}


def test_a_faithful_bundle_passes_and_every_failed_criterion_is_listed():
    assert gate_failures(_report(), "bundle", Gate()) == []
    failures = gate_failures(_report(accuracy=0.80, auc=0.90, stage_macro_f1=0.70, case_agreement=0.60,
                                     leukemia_agreement=0.90), "bundle", Gate())
    assert len(failures) == 5
    for words in ("accuracy", "AUC", "stage macro-F1", "case agreement", "leukemia-call agreement"):
        assert sum(f.startswith(words) for f in failures) == 1, (words, failures)


def test_each_threshold_is_the_gates_own():
    report = _report(stage_macro_f1=0.77, case_agreement=0.89, leukemia_agreement=0.965)
    assert len(gate_failures(report, "bundle", Gate())) == 3
    relaxed = Gate(max_stage_f1_drop=0.05, min_case_agreement=0.85, min_leukemia_agreement=0.96)
    assert gate_failures(report, "bundle", relaxed) == []


def test_an_undefined_metric_fails_the_gate_whichever_model_it_is_in():
    # a verification set without both classes proves nothing about the bundle
    nan = float("nan")
    assert "the bundle's auc not a number" in gate_failures(_report(auc=nan), "bundle", Gate())[0]
    report = _report()
    report["models"]["teacher"]["auc"] = report["models"]["bundle"]["auc"] = nan
    assert "the teacher's auc" in gate_failures(report, "bundle", Gate())[0]


def test_agreement_counts_merged_across_sites_give_the_pooled_rates():
    rng = np.random.default_rng(0)

    def probs(n, k):
        p = rng.random((n, k))
        return p / p.sum(1, keepdims=True)

    teacher = (probs(90, 2), probs(90, 4))
    student = (probs(90, 2), probs(90, 4))
    sites = [slice(0, 20), slice(20, 55), slice(55, 90)]
    merged = merge_agreement_counts([agreement_counts((teacher[0][s], teacher[1][s]), (student[0][s], student[1][s]))
                                     for s in sites])
    assert merged["cases"] == 90
    pooled = agreement(teacher, student)
    assert agreement_rates(merged) == pytest.approx(pooled)
    assert 0 < pooled["case_agreement"] <= pooled["leukemia_agreement"] < 1


def test_case_agreement_needs_the_same_stage_only_where_both_call_leukemia():
    stage_a, stage_b = np.eye(3)[[0, 1, 2]], np.eye(3)[[1, 1, 0]]
    teacher = (np.array([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]), stage_a)
    student = (np.array([[0.1, 0.9], [0.4, 0.6], [0.8, 0.2]]), stage_b)
    counts = agreement_counts(teacher, student)
    assert (counts["leukemia_agree"], counts["both_positive"], counts["stage_agree"], counts["case_agree"]) == (3, 2, 1, 2)
    assert agreement_rates(counts)["stage_agreement"] == 0.5


def _roll_stage_head(export_graphs):
    """An export step whose student names another stage for every positive case, leukemia calls intact."""
    def export(model, directory):
        import torch

        with torch.no_grad():
            model.stage_head.weight.copy_(model.stage_head.weight.roll(1, dims=0))
            model.stage_head.bias.copy_(model.stage_head.bias.roll(1, dims=0))
        return export_graphs(model, directory)
    return export


TEACHER_AS_IS = dict(distill=False, prune=PruneConfig(fraction=0.0), int8=False, fuse=False, batch_size=16,
                     progress=False)


def test_a_student_with_the_teachers_accuracy_but_other_stages_is_refused(teacher_run, tmp_path, monkeypatch):
    checkpoint, split = teacher_run
    monkeypatch.setattr(pipeline, "export_graphs", _roll_stage_head(pipeline.export_graphs))
    out = tmp_path / "bundle"
    with pytest.raises(ParityGateFailed) as err:
        export_bundle(checkpoint, out, ExportOptions(**TEACHER_AS_IS), data=split)
    failures = err.value.failures
    assert any(f.startswith("case agreement") for f in failures), failures
    assert not any(f.startswith(("accuracy", "AUC", "leukemia-call")) for f in failures), failures
    message = str(err.value)
    assert "case agree" in message and "\nbundle " in message and "\nteacher " in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_a_refused_export_leaves_the_existing_bundle_untouched(teacher_run, tmp_path, monkeypatch):
    checkpoint, split = teacher_run
    good = export_bundle(checkpoint, tmp_path / "bundle", ExportOptions(**TEACHER_AS_IS), data=split)
    before = {p.name: p.read_bytes() for p in good.bundle.iterdir()}
    monkeypatch.setattr(pipeline, "export_graphs", _roll_stage_head(pipeline.export_graphs))
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--data", str(split), "--out", str(good.bundle),
                                       "--no-distill", "--prune", "0", "--no-fuse", "--batch-size", "16", "--force"])
    assert result.exit_code == 2, result.output
    assert "case agreement" in result.output and "--min-agreement" in result.output
    assert {p.name: p.read_bytes() for p in good.bundle.iterdir()} == before
