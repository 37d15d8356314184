"""The coordinator's round loop (``fedlite.federated.engine``), driven by in-memory sites.

Each fake site answers a train message at once with the update that moves the global parameters
halfway to its own target; the loop must average them with FedAvg's weights, refuse malformed
ones with the site named, save each round before recording it, and record every job's rounds in
one schema whose time parts add up."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlite.federated.config import FederatedConfig
from fedlite.federated.engine import UpdateJob, run_rounds
from fedlite.federated.params import from_record, to_record

TARGETS = {1: ("site-a", 10, 1.0), 2: ("site-b", 30, 3.0), 3: ("site-c", 60, -2.0)}


class _Reply:
    def __init__(self, reply_to: str, content: RecordDict):
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()
        self.content = content

    def has_error(self) -> bool:
        return False


class _Outgoing:
    """A coordinator's message as the fake sites see it (Flower's Message needs a running Grid)."""

    def __init__(self, content: RecordDict, dst_node_id: int, message_type: str):
        self.content = content
        self.metadata = type("Metadata", (), {"dst_node_id": dst_node_id, "message_type": message_type})()


@pytest.fixture(autouse=True)
def _offline_messages(monkeypatch):
    monkeypatch.setattr("fedlite.federated.rounds.Message", _Outgoing)


class _Sites:
    """A Grid whose sites train instantly: Δ = (target − w) / 2, reported with their case counts."""

    def __init__(self, poisoned: int | None = None):
        self.poisoned, self.replies, self.pushed, self.types = poisoned, {}, 0, []

    def get_node_ids(self):
        return list(TARGETS)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            node, message_id = msg.metadata.dst_node_id, f"m{self.pushed}"
            self.types.append(msg.metadata.message_type)
            site, cases, target = TARGETS[node]
            w = from_record(msg.content["arrays"])["w"]
            delta = (target - w) / 2
            if node == self.poisoned:
                delta = np.full_like(w, np.nan)
            self.replies[message_id] = _Reply(message_id, RecordDict({
                "arrays": to_record({"w": delta.astype(np.float32)}),
                "metrics": MetricRecord({"num-examples": cases, "train-loss": float(np.abs(delta).mean()),
                                         "train-seconds": 0.0}),
                "info": ConfigRecord({"site": site})}))
            ids.append(message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


class _ToyJob(UpdateJob):
    message_type = "train.toy"

    def __init__(self, log_path):
        self.w, self.log_path, self.saved = np.zeros(4, np.float32), log_path, []

    def parameters(self, server_round):
        return {"w": self.w}

    def settings(self, server_round):
        return {"server-round": server_round}

    def apply(self, delta):
        self.w = self.w + delta["w"]

    def evaluate(self, server_round, row, nodes):
        row["distance"] = float(np.abs(self.w - 0.0).max())

    def save(self, server_round, row):
        recorded = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        self.saved.append((server_round, len(recorded)))


CFG = FederatedConfig(rounds=12, min_sites=3, round_timeout=5.0)


def test_the_loop_averages_with_fedavg_weights_and_records_one_schema(tmp_path):
    job, log_path = _ToyJob(tmp_path / "rounds.jsonl"), tmp_path / "rounds.jsonl"
    history = run_rounds(_Sites(), job, CFG, range(1, 13), np.random.default_rng(0), log_path, "toy", False)
    # Each round moves w halfway to the case-weighted mean of the targets, its fixed point.
    fedavg = sum(c * t for _, c, t in TARGETS.values()) / sum(c for _, c, _ in TARGETS.values())
    assert job.w == pytest.approx(np.full(4, fedavg), abs=1e-3)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert rows == json.loads(json.dumps(history)) and [r["round"] for r in rows] == list(range(1, 13))
    assert job.saved == [(r, r - 1) for r in range(1, 13)]  # saved before its record is written
    for row in rows:
        assert sorted(row["sites"]) == ["site-a", "site-b", "site-c"] and not row["rejected"]
        assert row["site_cases"] == {"site-a": 10, "site-b": 30, "site-c": 60}
        assert row["bytes_sent"] == 3 * row["bytes_sent_per_site"] and len(row["bytes_received"]) == 3
        assert "distance" in row  # the job's own fields
        parts = (row["site_compute_seconds"] + row["communication_seconds"] + row["aggregate_seconds"]
                 + row["eval_seconds"])
        assert parts == pytest.approx(row["round_seconds"], rel=1e-9)
    assert rows[0]["train_loss"] > rows[-1]["train_loss"]


def test_a_malformed_update_is_refused_with_the_site_named_and_never_applied(tmp_path):
    grid, job = _Sites(poisoned=2), _ToyJob(tmp_path / "r.jsonl")
    rows = run_rounds(grid, job, CFG, range(1, 4), np.random.default_rng(0), tmp_path / "r.jsonl", "toy", False)
    assert np.isfinite(job.w).all()
    for row in rows:
        assert sorted(row["sites"]) == ["site-a", "site-c"]
        assert [r["site"] for r in row["rejected"]] == ["site-b"] and "NaN" in row["rejected"][0]["reason"]
    assert set(grid.types) == {"train.toy"}  # routed to the job's handler at the sites


def test_the_loop_stops_once_the_update_is_below_the_convergence_tolerance(tmp_path):
    cfg = dataclasses.replace(CFG, convergence_tol=1e-2)
    rows = run_rounds(_Sites(), _ToyJob(tmp_path / "r.jsonl"), cfg, range(1, 100), np.random.default_rng(0),
                      tmp_path / "r.jsonl", "toy", False)
    assert 1 < len(rows) < 99 and rows[-1]["update_norm"] < 1e-2 <= rows[-2]["update_norm"]
