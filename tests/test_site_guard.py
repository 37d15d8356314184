"""What a site lets out: a failed job's error stays in the site's log, and the site's own policy
(node config) can refuse jobs and replies the coordinator asks for."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlite.errors import InputError
from fedlite.federated.site_guard import SiteJobFailed, SiteRefusal, guarded

CASE_ID = "MRN-0042-DOE-JANE"


class _Msg:
    def __init__(self, message_type: str, config: dict | None = None, metrics: dict | None = None):
        self.metadata = type("Metadata", (), {"message_type": message_type})()
        records = {"config": ConfigRecord(config or {})}
        if metrics is not None:
            records["metrics"] = MetricRecord(metrics)
        self.content = RecordDict(records)

    def has_error(self) -> bool:
        return False


class _Context:
    def __init__(self, **node):
        self.node_config = node


def test_a_failed_job_sends_a_generic_line_and_logs_the_error_at_the_site(caplog):
    def failing(msg, context):
        raise InputError(f"case {CASE_ID}: leukemia label 7, expected 0 or 1", path="/data/site/manifest.jsonl")

    with caplog.at_level(logging.ERROR), pytest.raises(SiteJobFailed) as failure:
        guarded(failing)(_Msg("train"), _Context())
    sent = str(failure.value)
    assert CASE_ID not in sent and "manifest" not in sent and "7" not in sent.split("incident")[0]
    assert "invalid data or settings" in sent
    incident = sent.split("incident ")[1].split()[0]
    assert CASE_ID in caplog.text and incident in caplog.text  # the site's admin finds it by the incident id


def test_a_site_that_requires_dp_refuses_to_train_without_it():
    handler = guarded(lambda msg, context: _Msg("reply", metrics={"num-examples": 50}))
    with pytest.raises(SiteRefusal, match="require-dp"):
        handler(_Msg("train", {"dp": False}), _Context(**{"require-dp": "true"}))
    with pytest.raises(SiteRefusal, match="require-dp"):
        handler(_Msg("train.distill", {}), _Context(**{"require-dp": "true"}))
    assert handler(_Msg("train", {"dp": True}), _Context(**{"require-dp": "true"}))
    assert handler(_Msg("evaluate", {}), _Context(**{"require-dp": "true"}))  # scoring is not training


def test_a_site_reports_nothing_over_fewer_cases_than_its_floor():
    few = guarded(lambda msg, context: _Msg("reply", metrics={"num-examples": 4}))
    with pytest.raises(SiteRefusal, match="fewer than 5"):
        few(_Msg("evaluate"), _Context(**{"min-report-cases": "5"}))
    assert few(_Msg("evaluate"), _Context(**{"min-report-cases": "4"}))
    with pytest.raises(SiteJobFailed):
        few(_Msg("evaluate"), _Context(**{"min-report-cases": "lots"}))


def test_a_site_with_a_bad_manifest_does_not_leak_its_case_into_the_coordinators_records(tmp_path, synth_split):
    from fedlite.federated.config import FederatedConfig
    from fedlite.federated.simulation import run_federated_simulation

    data = tmp_path / "data"  # the images sit beside the split; the coordinator gets no test set
    shutil.copytree(synth_split.out_dir.parent, data, ignore=shutil.ignore_patterns("test"))
    split = data / synth_split.out_dir.name
    manifest = split / "site-02" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0].update(id=CASE_ID, leukemia=7)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FederatedConfig(split_dir=str(split), out=str(tmp_path / "run"), preset="tiny", rounds=1, freeze_rounds=1,
                          local_epochs=1, batch_size=16)
    run_federated_simulation(cfg, progress=False)
    text = (tmp_path / "run" / "rounds.jsonl").read_text()
    row = json.loads(text)
    assert "site-02" not in row["sites"] and row["sites"]
    assert any("incident" in r["reason"] for r in row["rejected"])
    assert CASE_ID not in text and "manifest" not in text


def test_the_agents_policy_table_reaches_the_site_guard_through_the_node_config(tmp_path):
    from fedlite.agents.agent_config import (AgentConfig, PolicySettings, SiteSettings, SuperLinkSettings,
                                             read_agent_config, render_agent_config)
    from fedlite.federated.site_guard import SitePolicy

    config = AgentConfig(superlink=SuperLinkSettings(address="coordinator.example.org:9093", insecure=True),
                         site=SiteSettings(bundle=tmp_path / "b", data_dir=tmp_path / "d", report_dir=tmp_path / "r"),
                         policy=PolicySettings(require_dp=True, min_report_cases=20))
    (tmp_path / "agent.toml").write_text(render_agent_config(config))
    read = read_agent_config(tmp_path / "agent.toml")
    assert read.policy == config.policy
    assert SitePolicy.from_node(read.node_config()) == SitePolicy(require_dp=True, min_report_cases=20)
