"""What a site lets out: a failed job's error stays in the site's log, and the site's own policy
(node config) can refuse jobs and replies the coordinator asks for."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

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


def break_site(split, site_name: str):
    """A case with an impossible label under a telling id, and another case's image not decodable."""
    from fedlite.data.manifest import read_dataset

    site = read_dataset(split / site_name)
    broken_image = site.image_path(site.cases[1])
    broken_image.write_bytes(b"not a png")
    manifest = split / site_name / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0].update(id=CASE_ID, leukemia=7)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return broken_image


def test_a_site_checks_its_own_data_and_sends_two_counts(tmp_path, synth_split, caplog, task_identity):
    from fedlite.federated.preflight import check_own_data, data_check_reply

    split = tmp_path / "data" / synth_split.out_dir.name
    shutil.copytree(synth_split.out_dir.parent, tmp_path / "data", ignore=shutil.ignore_patterns("test"))
    broken_image = break_site(split, "site-02")
    with caplog.at_level(logging.ERROR, logger="fedlite.federated.preflight"):
        check = check_own_data(split / "site-02")
    lines = (split / "site-02" / "manifest.jsonl").read_text().splitlines()
    assert check.problems == 2 and check.cases == len(lines) - 1  # the case with the impossible label is out
    site_log = "\n".join(r.getMessage() for r in caplog.records)
    assert "manifest.jsonl:1: field" in site_log and str(broken_image) in site_log  # file, line, field, path
    request = Message(RecordDict({"config": ConfigRecord({"decode-images": True})}), dst_node_id=1,
                      message_type="query.datacheck")
    reply = data_check_reply(request, check, "site-02")
    assert dict(reply.content["metrics"]) == {"num-examples": check.cases, "problems": 2}
    assert set(reply.content.keys()) == {"metrics", "info"} and dict(reply.content["info"]) == {"site": "site-02"}
    assert check_own_data(split / "site-01").problems == 0


def test_a_site_with_bad_data_stops_the_run_before_it_writes_anything(tmp_path, synth_split):
    """Before round 1 every site checks its own data: the site with problems is named with their
    count, the run writes nothing, and no case id or path reaches the coordinator."""
    from fedlite.federated.config import FederatedConfig
    from fedlite.federated.simulation import run_federated_simulation

    data = tmp_path / "data"  # the images sit beside the split; the coordinator gets no test set
    shutil.copytree(synth_split.out_dir.parent, data, ignore=shutil.ignore_patterns("test"))
    split = data / synth_split.out_dir.name
    broken_image = break_site(split, "site-02")
    cfg = FederatedConfig(split_dir=str(split), out=str(tmp_path / "run"), preset="tiny", rounds=1, freeze_rounds=1,
                          local_epochs=1, batch_size=16)
    with pytest.raises(InputError) as err:
        run_federated_simulation(cfg, progress=False)
    message = str(err.value)
    assert "the run wrote nothing" in message and "site-02: 2 problem(s) in its data" in message
    assert "site-01" not in message and CASE_ID not in message and str(broken_image) not in message
    assert not (tmp_path / "run").exists()


def test_the_agents_policy_table_reaches_the_site_guard_through_the_node_config(tmp_path):
    from fedlite.agents.agent_config import (AgentConfig, PolicySettings, SiteSettings, SuperLinkSettings,
                                             read_agent_config)
    from fedlite.agents.config_toml import render_agent_config
    from fedlite.federated.site_guard import SitePolicy

    config = AgentConfig(superlink=SuperLinkSettings(address="coordinator.example.org:9093", insecure=True),
                         site=SiteSettings(bundle=tmp_path / "b", data_dir=tmp_path / "d", report_dir=tmp_path / "r"),
                         policy=PolicySettings(require_dp=True, min_report_cases=20))
    (tmp_path / "agent.toml").write_text(render_agent_config(config))
    read = read_agent_config(tmp_path / "agent.toml")
    assert read.policy == config.policy
    assert SitePolicy.from_node(read.node_config()) == SitePolicy(require_dp=True, min_report_cases=20)
