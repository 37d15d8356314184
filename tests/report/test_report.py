"""fedlite report: runs reused by configuration, a run of other stages refused, the paper's
ordering stated from the numbers, and a page that opens offline."""

import json
import re
import shutil

import pytest

from fedlite.errors import InputError
from fedlite.report.build import FEDERATED, LATE_FUSION, build_report, paper_ordering
from fedlite.report.ledger import Ledger
from fedlite.report.page import ordering_sentences, write_report
from fedlite.report.runs import ReportSettings

STAGES = ["Stage I", "Stage II", "Stage III", "Stage IV"]


def test_a_reused_run_of_other_stage_names_is_refused_before_anything_runs(teacher_run, synth_split, tmp_path):
    checkpoint, _ = teacher_run
    out = tmp_path / "report"
    last = out / "runs" / "image-only" / "last"
    shutil.copytree(checkpoint, last)
    config = json.loads((last / "config.json").read_text())
    config["stage_names"] = ["early", "late", "relapse", "remission"]
    (last / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="trained on the stages") as err:
        build_report(synth_split.out_dir, out, ReportSettings(rounds=1, epochs=1), progress=False, echo=lambda s: None)
    assert "image-only" in str(err.value) and "--force" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["runs"]  # nothing trained, nothing written


def test_the_ledger_reuses_only_a_finished_run_of_the_same_config(tmp_path):
    ledger = Ledger(tmp_path)
    where = tmp_path / "run"
    where.mkdir()
    config = {"kind": "federated", "rounds": 8}
    assert not ledger.finished("run", config, where)
    ledger.mark("run", config, finished=False)
    assert ledger.started("run", config) and not Ledger(tmp_path).finished("run", config, where)
    ledger.mark("run", config, finished=True)
    reread = Ledger(tmp_path)
    assert reread.finished("run", config, where)
    assert not reread.finished("run", {**config, "rounds": 9}, where)  # a changed setting redoes the run
    assert not Ledger(tmp_path, force=True).finished("run", config, where)
    with pytest.raises(RuntimeError), ledger.building("export", config):  # a build that fails stays unfinished
        raise RuntimeError("killed")
    assert not Ledger(tmp_path).finished("export", config, where)
    with ledger.building("split", config):
        pass
    assert Ledger(tmp_path).entries["split"]["seconds"] >= 0 and Ledger(tmp_path).finished("split", config, where)
    (tmp_path / "runs.json").write_text("{torn")
    with pytest.raises(InputError, match="corrupt report ledger"):
        Ledger(tmp_path)


def _metrics(accuracy, auc, f1):
    return {"cases": 20, "positives": 10, "accuracy": accuracy, "auc": auc, "stage_macro_f1": f1,
            "stage_per_class_f1": [f1] * 4, "stage_confusion": [[2, 1, 0, 0], [0, 3, 0, 0], [0, 0, 2, 0], [1, 0, 0, 1]]}


def _report(models):
    row = {"accuracy": 0.8, "auc": 0.9, "stage_macro_f1": 0.4}
    return {
        "split": "/data/split", "evaluated_on": "test/", "evaluation_cases": 20, "stage_names": STAGES,
        "sites": {"site-01": 10, "site-02": 12}, "settings": ReportSettings().to_dict(),
        "machine": {"cpu": "test CPU", "logical_cores": 2, "physical_cores": 1, "memory_gb": 8.0,
                    "int8_instruction_sets": ["AVX2"], "python": "3.11", "versions": {"onnxruntime": "1"}},
        "seconds": {"federated": 60.0, "total": 120.0, "runs as built": 600.0}, "models": models, "ordering": paper_ordering(models),
        "training_share": [{"share": 0.5, **row}, {"share": 1.0, **row}],
        "robustness": {kind: [{"strength": s, "model": row, "bundle": row} for s in (0.0, 2.0)]
                       for kind in ("blur", "noise")},
        "bundle": "/b", "bundle_refused": None, "created": "now",
        "explanations": {"cases": 2, "top_k": 10, "seconds_per_case": 1.5,
                         "top_k_overlap": {o: {"image": 0.5, "text": 0.7} for o in ("leukemia", "stage")},
                         **{who: {o: {"image": {"consistency": 0.6, "sparsity": 30.0, "features": 64},
                                      "text": {"consistency": 0.8, "sparsity": 12.0, "mean_tokens": 40.0}}
                                  for o in ("leukemia", "stage")} for who in ("bundle", "teacher")}},
    }


def test_the_paper_ordering_is_checked_per_metric_and_stated_with_its_numbers():
    models = {"text only": _metrics(0.70, 0.75, 0.30), "image only": _metrics(0.65, 0.70, 0.20),
              "no fusion layer": _metrics(0.80, 0.85, 0.35), "Fed-MMX centralized": _metrics(0.90, 0.95, 0.40),
              LATE_FUSION: _metrics(0.75, 0.72, 0.50), FEDERATED: _metrics(0.87, 0.85, 0.41)}
    ordering = paper_ordering(models)
    assert ordering["accuracy"]["fused_over_late_fusion"] and ordering["accuracy"]["late_fusion_over_unimodal"]
    assert not ordering["auc"]["late_fusion_over_unimodal"]  # 0.72 is below the text model's 0.75
    assert not ordering["stage_macro_f1"]["fused_over_late_fusion"]
    assert ordering["accuracy"]["federated_within_tolerance"] and not ordering["auc"]["federated_within_tolerance"]
    assert ordering["accuracy"]["federated_minus_centralized"] == pytest.approx(-0.03)
    text = "\n".join(ordering_sentences(_report(models)))
    assert "On AUC, fused > late fusion holds (0.950 against 0.720) and late fusion > each unimodal model does " \
           "not hold" in text
    assert "Federated minus centralized on AUC: -0.100" in text and "outside that distance" in text


def test_the_page_inlines_its_figures_and_says_what_the_markdown_says(tmp_path):
    models = {name: _metrics(0.8, 0.9, 0.4) for name in
              ("text only", "image only", "no fusion layer", "Fed-MMX centralized", LATE_FUSION, FEDERATED)}
    paths = write_report(_report(models), tmp_path)
    page = paths["html"].read_text()
    assert not re.search(r"src=\"(?!data:image/png;base64,)", page)  # nothing to fetch: it opens offline
    assert page.count("data:image/png;base64,") == 4
    markdown = paths["markdown"].read_text()
    for figure in re.findall(r"\(figures/([\w.-]+)\)", markdown):
        assert (tmp_path / "figures" / figure).stat().st_size > 1000
    for sentence in ordering_sentences(_report(models)):
        assert sentence in markdown and sentence.replace(">", "&gt;") in page
    assert "Top-10 overlap, bundle against teacher" in markdown
    assert json.loads(paths["json"].read_text())["models"][FEDERATED]["auc"] == 0.9


def test_the_command_refuses_bad_sizes_before_reading_anything(tmp_path):
    from click.testing import CliRunner

    from fedlite.cli import main

    for option, value, message in (("--shares", "0.5,1.5", "between 0 and 1"), ("--blur", "1,x", "comma-separated")):
        result = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                                           option, value])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "split.json" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
