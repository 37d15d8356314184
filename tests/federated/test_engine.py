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

from fedlite.federated.config import FederatedConfig
from fedlite.federated.engine import UpdateJob, run_rounds
from fake_sites import TARGETS, offline_messages  # noqa: F401 (fixture)
from fake_sites import Sites as _Sites


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


# The toy updates are large beside the toy parameters; the norm bound gets its own test.
CFG = FederatedConfig(rounds=12, min_sites=3, round_timeout=5.0, max_update_ratio=1e6)


def _run(grid, cfg=CFG, rounds=12, tmp_path=None, job=None):
    job = job or _ToyJob(tmp_path / "r.jsonl")
    rows = run_rounds(grid, job, cfg, range(1, rounds + 1), np.random.default_rng(0), tmp_path / "r.jsonl", "toy",
                      False)
    return job, rows


def test_the_loop_averages_with_fedavg_weights_and_records_one_schema(tmp_path):
    job, log_path = _ToyJob(tmp_path / "rounds.jsonl"), tmp_path / "rounds.jsonl"
    history = run_rounds(_Sites(), job, CFG, range(1, 13), np.random.default_rng(0), log_path, "toy", False)
    # Each round moves w halfway to the weighted mean of the targets, its fixed point. Site c holds
    # 60 % of the cases, over the 50 % cap: it weighs 0.5, and a and b share the rest 1:3.
    assert job.w == pytest.approx(np.full(4, 0.125 * 1.0 + 0.375 * 3.0 + 0.5 * -2.0), abs=1e-3)
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
    assert rows[0]["train_loss"] == pytest.approx((10 * 0.5 + 30 * 1.5 + 60 * 1.0) / 100)  # case-weighted


def test_without_a_cap_the_weights_are_fedavgs_case_counts(tmp_path):
    job, _ = _run(_Sites(), dataclasses.replace(CFG, max_site_share=1.0), tmp_path=tmp_path)
    fedavg = sum(c * t for _, c, t in TARGETS.values()) / sum(c for _, c, _ in TARGETS.values())
    assert job.w == pytest.approx(np.full(4, fedavg), abs=1e-3)


def test_a_malformed_update_is_refused_with_the_site_named_and_never_applied(tmp_path):
    grid = _Sites(poisoned=2)
    job, rows = _run(grid, rounds=3, tmp_path=tmp_path)
    assert np.isfinite(job.w).all()
    for row in rows:
        assert sorted(row["sites"]) == ["site-a", "site-c"]
        assert [r["site"] for r in row["rejected"]] == ["site-b"] and "NaN" in row["rejected"][0]["reason"]
    assert set(grid.types) == {"train.toy"}  # routed to the job's handler at the sites


def test_the_loop_stops_once_the_update_is_below_the_convergence_tolerance(tmp_path):
    _, rows = _run(_Sites(), dataclasses.replace(CFG, convergence_tol=1e-2), rounds=99, tmp_path=tmp_path)
    assert 1 < len(rows) < 99 and rows[-1]["update_norm"] < 1e-2 <= rows[-2]["update_norm"]


def test_an_update_longer_than_the_parameters_it_changes_is_refused_whatever_the_site_count(tmp_path):
    # With w = 0 the bound is max_update_ratio × 1: site a's first step (norm 1) passes, b's and c's not.
    job, rows = _run(_Sites(), dataclasses.replace(CFG, max_update_ratio=1.0), rounds=1, tmp_path=tmp_path)
    assert rows[0]["sites"] == ["site-a"]
    assert sorted(r["site"] for r in rows[0]["rejected"]) == ["site-b", "site-c"]
    assert all("over the bound" in r["reason"] for r in rows[0]["rejected"])


def test_float64_values_that_overflow_float32_are_refused(tmp_path):
    job, rows = _run(_Sites(poisoned=2, poison=lambda d: np.full(d.shape, 1e300)), rounds=2, tmp_path=tmp_path)
    assert np.isfinite(job.w).all() and all([r["site"] for r in row["rejected"]] == ["site-b"] for row in rows)


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_robust_aggregation_holds_against_one_poisoning_site_where_fedavg_does_not(tmp_path, method):
    # site b sends its step reversed and twice as long: finite, well shaped, within 10x of the
    # others' norms, so every screen passes it. FedAvg is driven away from every honest target.
    poison = dict(poisoned=2, poison=lambda d: d * -2)
    (tmp_path / "fedavg").mkdir()
    (tmp_path / method).mkdir()
    fedavg, rows = _run(_Sites(**poison), rounds=4, tmp_path=tmp_path / "fedavg")
    robust, _ = _run(_Sites(**poison), dataclasses.replace(CFG, aggregation=method, trim_fraction=0.34),
                     rounds=4, tmp_path=tmp_path / method)
    assert all(not row["rejected"] for row in rows)
    assert np.abs(fedavg.w).min() > 3
    assert -2.0 <= robust.w.min() and robust.w.max() <= 3.0  # within the honest targets


def test_a_step_that_would_overflow_the_model_is_not_applied():
    from fedlite.federated.engine import non_finite_result

    arrays = {"w": np.full(3, 3e38, np.float32)}
    assert non_finite_result(arrays, {"w": np.full(3, 1e38, np.float32)}) == "w would not be finite"
    assert non_finite_result(arrays, {"w": np.full(3, -1e38, np.float32)}) is None


def test_a_late_update_of_fewer_tensors_counts_as_no_change_of_the_others():
    from fedlite.federated.aggregate import SiteUpdate, aggregate

    fresh = SiteUpdate("a", {"head": np.ones(2, np.float32), "encoder": np.ones(3, np.float32)}, 10)
    late = SiteUpdate("b", {"head": np.full(2, 3.0, np.float32)}, 10, staleness=1)  # from a frozen round
    for updates in ([fresh, late], [late, fresh]):
        delta = aggregate(updates, staleness_decay=0.0)
        assert delta["head"] == pytest.approx([2.0, 2.0]) and delta["encoder"] == pytest.approx([0.5] * 3)
        assert aggregate(updates, "median")["encoder"] == pytest.approx([1.0] * 3)


def test_late_updates_are_screened_like_fresh_ones():
    from fedlite.federated.aggregate import SiteUpdate
    from fedlite.federated.rounds import RoundReplies, accept_updates

    shapes = {"head": (2,), "encoder": (3,)}
    honest = SiteUpdate("fresh", {"head": np.ones(2, np.float32), "encoder": np.ones(3, np.float32)}, 10)
    late = [SiteUpdate("late-nan", {"head": np.array([np.nan, 0], np.float32)}, 10, staleness=1),
            SiteUpdate("late-long", {"head": np.full(2, 1e6, np.float32)}, 10, staleness=2),
            SiteUpdate("late-overflow", {"head": np.full(2, 1e300)}, 10, staleness=1),
            SiteUpdate("late-unknown", {"bias": np.ones(2, np.float32)}, 10, staleness=1),
            SiteUpdate("late-ok", {"head": np.ones(2, np.float32)}, 10, staleness=1)]
    accepted, rejected = accept_updates(RoundReplies(updates=[honest, *late]), shapes, 3, max_norm=100.0)
    assert [u.site for u in accepted] == ["fresh", "late-ok"]
    assert sorted(r.site for r in rejected) == ["late-long", "late-nan", "late-overflow", "late-unknown"]
    assert all(v.dtype == np.float32 for u in accepted for v in u.delta.values())
