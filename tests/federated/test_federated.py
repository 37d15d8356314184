"""Aggregation, screening, the site's reply (what may leave a site) and whole simulated runs."""

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from wire import sent_arrays

from fedlite.data.holdout import site_parts
from fedlite.federated.aggregate import SiteUpdate, aggregation_weights, screen_updates, weighted_delta
from fedlite.federated.compress import is_encoded, is_packed
from fedlite.federated.config import FederatedConfig
from fedlite.federated.engine import sites_busy_seconds
from fedlite.federated.params import frozen_fingerprint, get_arrays, trainable_names
from fedlite.federated.records import to_record
from fedlite.federated.site_training import train_site
from fedlite.federated.site_update import RESIDUAL
from fedlite.federated.task import build_initial_model
from fedlite.run_record import run_record

SHAPES = {"w": (2, 2), "b": (2,)}


def _update(site, w, b, n, staleness=0):
    return SiteUpdate(site, {"w": np.full((2, 2), w, np.float32), "b": np.full(2, b, np.float32)}, n, staleness)


def test_fedavg_weights_by_sample_count_as_computed_by_hand():
    updates = [_update("a", 1.0, 0.0, 100), _update("b", 4.0, 3.0, 300)]
    delta = weighted_delta(updates)
    assert np.allclose(delta["w"], (100 * 1.0 + 300 * 4.0) / 400)  # 3.25
    assert np.allclose(delta["b"], 300 * 3.0 / 400)


def _timed(site, first, last):
    return SiteUpdate(site, {}, 1, 0, metrics={"compute-start": first, "compute-end": last})


def test_round_compute_time_is_the_union_of_the_sites_compute_intervals():
    # two lanes: a and b overlap (10-40), c queues behind a (45-60), d ran past the round's end
    updates = [_timed("a", 10, 30), _timed("b", 15, 40), _timed("c", 45, 60), _timed("d", 90, 130)]
    assert sites_busy_seconds(updates, start=0, end=100, fallback=-1) == pytest.approx(30 + 15 + 10)
    assert sites_busy_seconds(updates[:1] + [SiteUpdate("e", {}, 1)], 0, 100, fallback=7.0) == 7.0


def test_late_updates_are_damped_by_their_staleness():
    updates = [_update("a", 1.0, 0.0, 100), _update("b", 1.0, 0.0, 100, staleness=2)]
    weights = aggregation_weights(updates, staleness_decay=0.5)
    assert weights == pytest.approx([0.5, 0.5 * math.exp(-1.0)])


@pytest.mark.parametrize("bad, reason", [
    ({"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, "NaN or Inf"),
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, "shape (3, 2)"),
    ({"w": np.zeros((2, 2), np.float32)}, "missing 1 tensors"),
    ({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32), "x": np.zeros(1, np.float32)}, "unexpected"),
    ({"w": np.zeros((2, 2), np.int64), "b": np.zeros(2, np.float32)}, "floating-point"),
])
def test_malformed_updates_are_rejected_with_the_site_named(bad, reason):
    good = [_update("a", 1.0, 1.0, 10), _update("b", 1.0, 1.0, 10)]
    accepted, rejected = screen_updates(good + [SiteUpdate("site-07", bad, 10)], SHAPES)
    assert [u.site for u in accepted] == ["a", "b"]
    assert rejected[0].site == "site-07" and reason in rejected[0].reason


def test_an_update_far_larger_than_the_others_is_rejected():
    updates = [_update(s, 1.0, 1.0, 10) for s in "abc"] + [_update("huge", 1e4, 1e4, 10)]
    accepted, rejected = screen_updates(updates, SHAPES)
    assert [r.site for r in rejected] == ["huge"] and "median" in rejected[0].reason
    assert len(accepted) == 3


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Messages can only be built inside a run; give the direct calls below one."""


def _train_message(model, cfg, server_round):
    trainable = trainable_names(model, cfg.encoders_frozen(server_round))
    flat = {**cfg.site_settings(), "server-round": server_round, "num-stages": 4,
            "frozen-fingerprint": frozen_fingerprint(model, trainable)}
    content = RecordDict({"arrays": to_record(get_arrays(model, trainable)), "config": ConfigRecord(flat)})
    return Message(content, dst_node_id=1, message_type="train"), trainable


def _context(data_dir):
    return Context(run_id=1, node_id=1, node_config={"data-dir": str(data_dir)}, state=RecordDict(), run_config={})


def _strings(record):
    return [str(v) for v in record.values()]


@pytest.mark.parametrize("compress", [False, True])
def test_a_site_sends_only_parameters_and_aggregate_metrics(synth_split, compress):
    cfg = FederatedConfig(preset="tiny", rounds=3, freeze_rounds=1, local_epochs=1, batch_size=8, compress=compress)
    model = build_initial_model(cfg, 4)
    site_dir = synth_split.out_dir / "site-01"
    context = _context(site_dir)
    notes = [json.loads(l)["text"] for l in (site_dir / "manifest.jsonl").read_text().splitlines()]
    for server_round in (1, 2):
        msg, trainable = _train_message(model, cfg, server_round)
        reply = train_site(msg, context)
        assert set(reply.content.keys()) == {"arrays", "metrics", "info"}
        assert is_packed(reply.content["arrays"]) == compress
        if compress:  # six arrays on the wire, whatever the number of tensors
            assert len(reply.content["arrays"]) == 6
        arrays = sent_arrays(reply.content["arrays"])
        names = {k.split("::")[0] for k in arrays}
        assert names == set(trainable)  # parameters only, and only the trainable ones
        assert is_encoded(arrays) == compress
        shapes = {n: p.shape for n, p in model.named_parameters()}
        for key, value in arrays.items():  # each array is (a part of) one parameter's update, no more
            name = key.split("::")[0]
            assert value.shape == shapes[name] if not compress else value.size <= max(np.prod(shapes[name]), 4)
        metrics = dict(reply.content["metrics"])
        assert all(isinstance(v, (int, float)) for v in metrics.values())
        assert metrics["num-examples"] == len(site_parts(site_dir).train)  # the validation part never trains
        info = _strings(reply.content["info"])
        assert not any(note[:40] in s for note in notes for s in info)
        assert all(len(s) < 40 for s in info)
    if server_round == 1:
        assert all(n.startswith(("fusion.", "leukemia_head.", "stage_head.")) for n in trainable)
    assert (RESIDUAL in context.state) == compress  # error feedback stays at the site
    if compress:  # and follows the trainable set across the end of the frozen rounds
        assert set(context.state[RESIDUAL].keys()) == set(trainable)


def test_a_site_refuses_a_model_whose_frozen_part_differs(synth_split):
    cfg = FederatedConfig(preset="tiny", rounds=2, freeze_rounds=1, local_epochs=1)
    other = build_initial_model(FederatedConfig(preset="tiny", seed=99), 4)
    msg, _ = _train_message(other, cfg, 1)
    with pytest.raises(Exception, match="frozen encoder weights differ"):
        train_site(msg, _context(synth_split.out_dir / "site-01"))


def _cfg(split, out, **kw):
    base = dict(split_dir=str(split), out=str(out), preset="tiny", rounds=2, freeze_rounds=1, local_epochs=1,
                batch_size=16, optimizer="adamw")
    return FederatedConfig(**{**base, **kw})


def test_a_simulated_run_records_its_rounds_and_sends_the_model_as_changes(tmp_path, synth_split):
    from fedlite.federated.simulation import run_federated_simulation

    cfg = _cfg(synth_split.out_dir, tmp_path / "run", rounds=3, compress=True, compress_downlink=True,
               topk_fraction=0.05)
    summary = run_federated_simulation(cfg, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [sorted(r["sites"]) for r in rounds] == [["site-01", "site-02", "site-03"]] * 3, rounds
    assert not any(r["rejected"] for r in rounds)
    assert rounds[0]["frozen_encoders"] and not rounds[1]["frozen_encoders"]
    assert rounds[0]["dense_update_bytes"] < rounds[1]["dense_update_bytes"] / 10  # heads only while frozen
    assert rounds[1]["compression_ratio"] > 4
    assert set(rounds[1]["site_train_seconds"]) == set(rounds[1]["sites"])
    for r in rounds:  # sites' compute, transport, aggregation and evaluation add up to the round
        assert r["slowest_site_train_seconds"] <= r["site_training_seconds"] <= r["site_compute_seconds"]
        assert r["site_compute_seconds"] <= r["round_seconds"]
        parts = r["site_compute_seconds"] + r["communication_seconds"] + r["aggregate_seconds"] + r["eval_seconds"]
        assert parts == pytest.approx(r["round_seconds"], rel=1e-6)
    # round 1: the heads whole; round 2: the encoders join, seeded at the sites, so only changes travel
    assert rounds[0]["downlink_compression_ratio"] == pytest.approx(1.0, rel=0.05)
    assert rounds[1]["downlink_compression_ratio"] > 10 and rounds[2]["downlink_compression_ratio"] > 10
    assert rounds[2]["bytes_sent_per_site"] * 10 < rounds[2]["dense_update_bytes"]
    # the sites score the copy they hold, brought up to date by the evaluation's own changes
    assert rounds[2]["federated_eval"]["bytes_sent"] * 10 < 3 * rounds[2]["dense_update_bytes"]
    assert all(r["federated_eval"]["cases"] and r["eval"]["accuracy"] >= 0 for r in rounds)
    assert 0 < rounds[2]["downlink_residual_norm"] < 1e3
    assert summary["rounds"] == 3 and 0 <= summary["last"]["accuracy"] <= 1
    for name in ("best/model.safetensors", "last/model.safetensors", "curves.png", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    record = run_record(json.loads((tmp_path / "run" / "last" / "config.json").read_text())["training"])
    assert (record.kind, record.data, record.step, record.settings["topk_fraction"]) == ("federated", "sites", 3, 0.05)
    assert run_record(summary) == record  # the summary and the last checkpoint hold one record


def test_a_simulated_job_starts_once_every_site_of_the_split_is_connected(synth_split):
    from fedlite.data.split import load_split
    from fedlite.federated.simulation import simulate

    seen = simulate(synth_split.out_dir, lambda grid: sorted(grid.get_node_ids()))
    assert len(seen) == len(load_split(synth_split.out_dir).sites) == 3


def test_resume_after_the_server_process_is_killed(tmp_path, synth_split):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedlite.cli", "train", "--data", str(synth_split.out_dir), "--preset", "tiny",
           "--rounds", "2", "--freeze-rounds", "1", "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "server_state.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["round"] >= 1:
                break
            time.sleep(0.2)
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    completed = json.loads(state.read_text())["round"]
    assert completed == 1, "the server should have been killed mid-run"
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "train", "--resume", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rounds = [json.loads(l)["round"] for l in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    assert json.loads(state.read_text())["round"] == 2


def test_pyproject_declares_the_flower_app_with_every_setting():
    import tomllib
    from pathlib import Path

    from flwr.common.config import validate_fields_in_config

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    valid, errors, _ = validate_fields_in_config(pyproject)
    assert valid, errors
    from fedlite.export.federated import ExportRunConfig

    flat = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(flat) == set(FederatedConfig().to_flat()) | set(ExportRunConfig().to_flat())
    assert ExportRunConfig.from_flat(flat) == ExportRunConfig()  # the declared defaults are the code's
    assert FederatedConfig.from_flat(flat).server_test == ""  # the coordinator needs no cases


def test_a_dp_site_reports_an_epsilon_that_accumulates_over_rounds(synth_split):
    cfg = FederatedConfig(preset="tiny", rounds=3, freeze_rounds=3, local_epochs=1, batch_size=8, dp=True)
    model = build_initial_model(cfg, 4)
    context = _context(synth_split.out_dir / "site-02")
    epsilons = []
    for server_round in (1, 2):
        msg, _ = _train_message(model, cfg, server_round)
        epsilons.append(dict(train_site(msg, context).content["metrics"])["epsilon"])
    assert 0 < epsilons[0] < epsilons[1]


class _Reply:
    """A site's reply as the server pulls it from the grid."""

    def __init__(self, reply_to, site, value):
        from flwr.app import MetricRecord

        from fedlite.federated.records import to_record

        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to, "src_node_id": 0})()
        self.content = RecordDict({"arrays": to_record({"w": np.full((2, 2), value, np.float32),
                                                        "b": np.zeros(2, np.float32)}),
                                   "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0}),
                                   "info": ConfigRecord({"site": site})})

    def has_error(self):
        return False


class _SlowSiteGrid:
    """Site 'a' answers at once; site 'b' only after ``delay`` pulls."""

    def __init__(self, delay):
        self.delay, self.pulls, self.ready = delay, 0, {}

    def pull_messages(self, ids):
        self.pulls += 1
        out = [r for mid, (r, at) in list(self.ready.items()) if mid in ids and self.pulls >= at]
        for r in out:
            del self.ready[r.metadata.reply_to_message_id]
        return out


def test_a_late_site_does_not_stall_the_round_and_is_folded_in_later():
    from fedlite.federated.rounds import Outstanding, collect

    grid = _SlowSiteGrid(delay=10_000)
    outstanding = {"m1a": Outstanding(1, 1, SHAPES), "m1b": Outstanding(2, 1, SHAPES)}
    grid.ready = {"m1a": (_Reply("m1a", "a", 1.0), 0), "m1b": (_Reply("m1b", "b", 2.0), 10_000)}
    first = collect(grid, outstanding, server_round=1, current={"m1a", "m1b"}, timeout=0.3, max_staleness=2)
    assert [u.site for u in first.updates] == ["a"]
    assert "m1b" in outstanding  # still awaited, not forgotten
    grid.ready["m1b"] = (grid.ready["m1b"][0], 0)
    outstanding["m2a"] = Outstanding(1, 2, SHAPES)
    grid.ready["m2a"] = (_Reply("m2a", "a", 3.0), 0)
    second = collect(grid, outstanding, server_round=2, current={"m2a"}, timeout=5, max_staleness=2)
    assert sorted((u.site, u.staleness) for u in second.updates) == [("a", 0), ("b", 1)]
    outstanding["m3b"] = Outstanding(2, 3, SHAPES)  # never answers
    collect(grid, outstanding, server_round=5, current=set(), timeout=0.1, max_staleness=2)
    assert "m3b" not in outstanding  # too stale to use: dropped, and reported


def test_with_changes_sent_down_the_checkpoints_hold_the_sites_copy_not_the_model_ahead_of_it(tmp_path):
    """The sites train from and score θ̂; θ runs ahead by changes not yet sent. Checkpoints (and the
    server test) take θ̂, and training goes on from θ."""
    from fedlite.checkpoint import load_checkpoint
    from fedlite.federated.server_app import TrainingJob
    from fedlite.federated.task import run_tokenizer

    cfg = _cfg(tmp_path / "unused", tmp_path / "run", compress=True, compress_downlink=True, topk_fraction=0.05)
    model = build_initial_model(cfg, len(cfg.stages))
    state = {"round": 0, "best_round": 0, "best_score": -1.0}
    job = TrainingJob(None, cfg, model, run_tokenizer(cfg), state, "cpu")
    names = trainable_names(model, cfg.encoders_frozen(1))
    job.downlink.advance(job.parameters(1))  # round 1: the sites get θ whole
    rng = np.random.default_rng(0)
    job.apply({n: rng.normal(0, 0.1, v.shape).astype(np.float32) for n, v in job.parameters(1).items()})
    job.downlink.advance(job.parameters(1))  # round 2: 5 % of the change goes down
    ahead, held = job.parameters(1), {n: job.downlink.reference[n].copy() for n in names}
    assert max(np.abs(ahead[n] - held[n]).max() for n in names) > 0.05
    (tmp_path / "run").mkdir()
    job.save(2, {"eval": {"stage_macro_f1": 0.5}})
    for kept in ("best", "last"):
        saved = get_arrays(load_checkpoint(tmp_path / "run" / kept).model, names)
        for n in names:
            np.testing.assert_array_equal(saved[n], held[n])
    after = job.parameters(1)
    for n in names:  # θ is back for the next round
        np.testing.assert_array_equal(after[n], ahead[n])
    assert state["best_round"] == 2
