"""No reply can crash the coordinator: every crafted reply becomes that site's logged rejection.

A site of three sends a reply made up field by field; the run must complete, name the site and
the field, keep the model finite, and write records that are strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fake_sites import TARGETS, ReplyingGrid, Sites, offline_messages  # noqa: F401 (fixture)
from fedlite.eval_stats import EvalStats
from fedlite.federated.config import FederatedConfig
from fedlite.federated.engine import UpdateJob, run_rounds
from fedlite.federated.records import to_record
from fedlite.federated.rounds import federated_evaluate

CFG = FederatedConfig(rounds=2, min_sites=3, round_timeout=5.0, max_update_ratio=1e6)


def _metrics(content: RecordDict, **changes) -> RecordDict:
    metrics = {k: v for k, v in content["metrics"].items() if k not in changes or changes[k] is not None}
    metrics.update({k: v for k, v in changes.items() if v is not None})
    return RecordDict({**{k: v for k, v in content.items() if k != "metrics"}, "metrics": MetricRecord(metrics)})


def _replace(content: RecordDict, key: str, record) -> RecordDict:
    kept = {k: v for k, v in content.items() if k != key}
    return RecordDict({**kept, key: record} if record is not None else kept)


FORGED_UPDATES = {
    "num-examples is inf": (lambda c: _metrics(c, **{"num-examples": float("inf")}), "num-examples is inf"),
    "num-examples is 10^12": (lambda c: _metrics(c, **{"num-examples": 10**12}), "num-examples"),
    "num-examples is 2.5": (lambda c: _metrics(c, **{"num-examples": 2.5}), "not a whole number"),
    "no train-loss": (lambda c: _metrics(c, **{"train-loss": None}), "lack train-loss"),
    "train-loss is NaN": (lambda c: _metrics(c, **{"train-loss": float("nan")}), "train-loss is nan"),
    "train-loss is a list": (lambda c: _metrics(c, **{"train-loss": [1.0, 2.0]}), "train-loss is a list"),
    "samples is a list": (lambda c: _metrics(c, samples=[1, 2]), "samples is a list"),
    "epsilon is a list": (lambda c: _metrics(c, epsilon=[1.0]), "epsilon is a list"),
    "epsilon is negative": (lambda c: _metrics(c, epsilon=-1.0), "epsilon"),
    "compute-start is a list": (lambda c: _metrics(c, **{"compute-start": [1.0]}), "compute-start is a list"),
    "compute-start is no time": (lambda c: _metrics(c, **{"compute-start": 1e18}), "no wall-clock time"),
    "arrays are a ConfigRecord": (lambda c: _replace(c, "arrays", ConfigRecord({"w": "x"})), "ConfigRecord"),
    "no arrays": (lambda c: _replace(c, "arrays", None), "no arrays"),
    "no metrics": (lambda c: _replace(c, "metrics", None), "no metrics"),
    "metrics are an ArrayRecord": (lambda c: _replace(c, "metrics", ArrayRecord()), "ArrayRecord"),
    "values of 1e300 in float64": (lambda c: _replace(c, "arrays", to_record({"w": np.full(4, 1e300)})),
                                   "NaN or Inf"),
    "integer values": (lambda c: _replace(c, "arrays", to_record({"w": np.ones(4, np.int64)})), "floating-point"),
    "a tensor of another shape": (lambda c: _replace(c, "arrays", to_record({"w": np.ones(5, np.float32)})),
                                  "shape"),
}


class _Job(UpdateJob):
    def __init__(self):
        self.w = np.zeros(4, np.float32)

    def parameters(self, server_round):
        return {"w": self.w}

    def settings(self, server_round):
        return {}

    def apply(self, delta):
        self.w = self.w + delta["w"]


def _strict(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} in a record")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("case", sorted(FORGED_UPDATES))
def test_a_crafted_update_is_rejected_and_named_and_the_run_completes(tmp_path, case):
    forge, reason = FORGED_UPDATES[case]
    job = _Job()
    rows = run_rounds(Sites(poisoned=2, forge=forge), job, CFG, range(1, 3), np.random.default_rng(0),
                      tmp_path / "rounds.jsonl", "hostile", False)
    assert [r["round"] for r in rows] == [1, 2] and np.isfinite(job.w).all()
    for row in rows:
        assert sorted(row["sites"]) == ["site-a", "site-c"]
        assert [r["site"] for r in row["rejected"]] == ["site-b"]
        assert reason in row["rejected"][0]["reason"], row["rejected"][0]["reason"]
    assert [_strict(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("name", [["a", "list"], "site\nwith a newline", "x" * 500, ""])
def test_a_site_that_names_itself_oddly_is_recorded_by_its_node_id(tmp_path, name):
    forge = lambda c: _replace(c, "info", ConfigRecord({"site": name}))  # noqa: E731
    rows = run_rounds(Sites(poisoned=2, forge=forge), _Job(), CFG, range(1, 2), np.random.default_rng(0),
                      tmp_path / "rounds.jsonl", "hostile", False)
    assert sorted(rows[0]["sites"]) == ["node-2", "site-a", "site-c"]


class _QuerySites(ReplyingGrid):
    """Every site answers an evaluation query with statistics."""

    def answer(self, node, msg):
        stats = EvalStats.from_predictions(np.array([0, 1]), np.array([-1, 2]),
                                           np.array([[0.9, 0.1], [0.2, 0.8]]), np.full((2, 4), 0.25))
        return RecordDict({"stats": to_record(stats.to_arrays()), "metrics": MetricRecord({"num-examples": 2}),
                           "info": ConfigRecord({"site": TARGETS[node][0]})})


FORGED_STATISTICS = {
    "statistics are a ConfigRecord": lambda c: _replace(c, "stats", ConfigRecord({"cases": 5})),
    "no statistics": lambda c: _replace(c, "stats", None),
    "negative counts": lambda c: _replace(c, "stats", to_record({k: -np.abs(v) - 1 for k, v in
                                                                 _arrays(c["stats"]).items()})),
    "one array missing": lambda c: _replace(c, "stats", to_record(dict(list(_arrays(c["stats"]).items())[1:]))),
}


def _arrays(record):
    return {k: v.numpy() for k, v in record.items()}


@pytest.mark.parametrize("case", sorted(FORGED_STATISTICS))
def test_crafted_evaluation_statistics_count_for_nothing_and_the_others_merge(case):
    grid = _QuerySites(forged=2, forge=FORGED_STATISTICS[case])
    evaluation = federated_evaluate(grid, [1, 2, 3], RecordDict({"config": ConfigRecord({})}), num_stages=4,
                                    timeout=5)
    assert evaluation.cases == {"site-a": 2, "site-c": 2}
    assert [f.site for f in evaluation.failed] == ["site-b"]
    assert evaluation.stats.cases == 4 and 0 <= evaluation.metrics["accuracy"] <= 1
