"""Federated evaluation: sites score the global model on their validation parts and send statistics;
the coordinator, which holds no case, merges them into the pooled metrics and picks best/ from them."""

import json
import shutil

import numpy as np
import pytest
from opened_files import OpenedFiles
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlite.checkpoint import load_checkpoint
from fedlite.data.holdout import site_parts
from fedlite.data.loader import CaseDataset, make_loader
from fedlite.eval_stats import FIELDS, EvalStats
from fedlite.federated.site_training import evaluate_site
from fedlite.federated.config import FederatedConfig
from fedlite.federated.params import frozen_fingerprint, get_arrays, trainable_names
from fedlite.federated.records import to_record
from fedlite.federated.task import build_initial_model
from fedlite.metrics import evaluate_predictions
from fedlite.text import builtin_tokenizer
from fedlite.training import predict, resolve_device


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Messages can only be built inside a run; give the direct calls below one."""


def test_a_site_evaluates_on_its_validation_part_and_sends_counts_only(synth_split):
    cfg = FederatedConfig(preset="tiny", rounds=2, freeze_rounds=1, batch_size=8)
    model = build_initial_model(cfg, 4)
    trainable = trainable_names(model, True)
    flat = {**cfg.site_settings(), "server-round": 1, "num-stages": 4,
            "frozen-fingerprint": frozen_fingerprint(model, trainable)}
    msg = Message(RecordDict({"arrays": to_record(get_arrays(model, trainable)), "config": ConfigRecord(flat)}),
                  dst_node_id=1, message_type="evaluate")
    site_dir = synth_split.out_dir / "site-02"
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(site_dir)}, state=RecordDict(), run_config={})
    reply = evaluate_site(msg, context)
    assert set(reply.content.keys()) == {"stats", "metrics", "info"}
    arrays = {k: v.numpy() for k, v in reply.content["stats"].items()}
    assert set(arrays) == set(FIELDS)  # fixed-size counts and sums, whatever the number of cases
    assert arrays["score_histogram"].shape == (2, 2048) and arrays["leukemia_confusion"].shape == (2, 2)
    assert set(dict(reply.content["metrics"])) == {"num-examples", "eval-seconds"}
    assert dict(reply.content["info"]) == {"site": "site-02"}
    val = site_parts(site_dir).val
    stats = EvalStats.from_arrays(arrays, 4)
    assert stats.cases == len(val) > 0
    cases = CaseDataset(val, builtin_tokenizer(), model.config.text.max_length)
    probs = predict(model, make_loader(cases, 8, shuffle=False), resolve_device("cpu"))
    pooled = evaluate_predictions(cases.leukemia.numpy(), cases.stage.numpy(), *probs)
    assert stats.metrics()["accuracy"] == pooled["accuracy"]
    assert stats.metrics()["stage_confusion"] == pooled["stage_confusion"]


@pytest.fixture
def sites_only(synth_split, tmp_path):
    """A copy of the split with nothing pooled left: no test/, no train/, no source manifest."""
    data = tmp_path / "data"
    shutil.copytree(synth_split.source, data)
    split = data / synth_split.out_dir.name
    for pooled in ("test", "train"):
        shutil.rmtree(split / pooled)
    (data / "manifest.jsonl").unlink()
    return split


def test_the_coordinator_trains_evaluates_and_picks_best_without_reading_a_case(sites_only, tmp_path):
    from fedlite.federated.simulation import run_federated_simulation

    opened = OpenedFiles(sites_only.parent)
    cfg = FederatedConfig(split_dir=str(sites_only), out=str(tmp_path / "run"), preset="tiny", rounds=2,
                          freeze_rounds=1, local_epochs=1, batch_size=16, optimizer="adamw", lr=3e-3)
    opened.recording = True
    try:
        summary = run_federated_simulation(cfg, progress=False)
    finally:
        opened.recording = False
    # the coordinator's process read the split's summary and nothing else of the data (sites ran elsewhere)
    assert {p for p in opened.paths if not p.endswith("split.json")} == set()

    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert all("server_test" not in r for r in rows)  # no pooled test set: the sites' metrics stand alone
    sites = ["site-01", "site-02", "site-03"]
    val = {s: site_parts(sites_only / s).val for s in sites}
    for row in rows:
        assert row["federated_eval"]["cases"] == {s: len(v) for s, v in val.items()}
        assert row["eval"]["cases"] == sum(len(v) for v in val.values())
    best = max(rows, key=lambda r: (r["eval"]["stage_macro_f1"], -r["round"]))
    assert summary["best_round"] == best["round"]

    # the merged statistics equal the pooled evaluation of the same model on the same cases
    last = load_checkpoint(tmp_path / "run" / "last")
    leukemia, stage, leukemia_prob, stage_prob = [], [], [], []
    for s in sites:
        cases = CaseDataset(val[s], last.tokenizer, last.max_length)
        probs = predict(last.model, make_loader(cases, 16, shuffle=False), resolve_device("cpu"))
        leukemia.append(cases.leukemia.numpy()), stage.append(cases.stage.numpy())
        leukemia_prob.append(probs[0]), stage_prob.append(probs[1])
    everything = [np.concatenate(x) for x in (leukemia, stage, leukemia_prob, stage_prob)]
    pooled = evaluate_predictions(*everything)
    merged = rows[-1]["eval"]
    for key in ("accuracy", "stage_macro_f1", "stage_macro_precision", "stage_macro_recall", "stage_confusion"):
        assert merged[key] == pooled[key], key
    # The sites' histograms add up to the pooled one; its AUC departs from the exact one only by the
    # positive-negative pairs sharing a bin (a model two rounds old scores its cases almost alike).
    histogram = EvalStats.from_predictions(*everything).score_histogram
    assert merged["auc"] == EvalStats.from_predictions(*everything).auc()
    ties = (histogram[0] * histogram[1]).sum() / (2 * histogram[0].sum() * histogram[1].sum())
    assert abs(merged["auc"] - pooled["auc"]) <= ties + 1e-12
    assert json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())["cases"] == merged["cases"]


def test_a_pooled_test_set_is_reported_beside_the_federated_metrics(synth_split, tmp_path):
    from fedlite.federated.simulation import run_federated_simulation

    cfg = FederatedConfig(split_dir=str(synth_split.out_dir), out=str(tmp_path / "run"), preset="tiny", rounds=1,
                          freeze_rounds=1, local_epochs=1, batch_size=16, eval_every=1)
    summary = run_federated_simulation(cfg, progress=False)
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[-1])
    test_cases = len(list(open(synth_split.out_dir / "test" / "manifest.jsonl")))
    assert row["server_test"]["cases"] == test_cases and summary["server_test"]["cases"] == test_cases
    assert sum(row["federated_eval"]["cases"].values()) == row["eval"]["cases"] > 0
