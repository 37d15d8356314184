"""The sites' data check before a federated run: what stops the run, what does not."""

from __future__ import annotations

import pytest
from fake_sites import TARGETS, ReplyingGrid, offline_messages  # noqa: F401
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlite.errors import InputError
from fedlite.federated.preflight import MESSAGE_TYPE, check_sites_data


class CheckingSites(ReplyingGrid):
    """Sites answering the data check with ``problems[node]`` problems (0 when absent); a node in
    ``silent`` never answers."""

    def __init__(self, problems: dict[int, int] | None = None, silent: tuple[int, ...] = (), forge=None,
                 forged: int | None = None):
        super().__init__(forged, forge)
        self.problems, self.silent = problems or {}, silent

    def answer(self, node: int, msg) -> RecordDict:
        assert msg.metadata.message_type == MESSAGE_TYPE
        site, cases, _ = TARGETS[node]
        return RecordDict({"metrics": MetricRecord({"num-examples": cases, "problems": self.problems.get(node, 0)}),
                           "info": ConfigRecord({"site": site})})

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, message_id in zip(messages, ids):
            if msg.metadata.dst_node_id in self.silent:
                del self.replies[message_id]
        return ids


def test_sound_sites_pass_with_their_case_counts():
    checks = check_sites_data(CheckingSites(), minimum=3, timeout=1)
    assert {site: c.cases for site, c in checks.items()} == {"site-a": 10, "site-b": 30, "site-c": 60}


def test_a_site_with_problems_stops_the_run_named_with_its_count():
    with pytest.raises(InputError) as err:
        check_sites_data(CheckingSites({2: 3}), minimum=1, timeout=1)
    message = str(err.value)
    assert "the run wrote nothing" in message and "site-b: 3 problem(s) in its data (30 cases read)" in message
    assert "site-a" not in message and "site-c" not in message


def test_a_site_that_does_not_answer_is_left_to_the_rounds_when_enough_others_are_sound():
    checks = check_sites_data(CheckingSites(silent=(3,)), minimum=2, timeout=0.5)
    assert sorted(checks) == ["site-a", "site-b"]
    with pytest.raises(InputError) as err:
        check_sites_data(CheckingSites(silent=(3,)), minimum=3, timeout=0.5)
    assert "2 site(s) checked their data, the run needs 3" in str(err.value) and "no answer" in str(err.value)


@pytest.mark.parametrize("problems", [-1, 2.5, float("nan"), "many", None])
def test_a_malformed_answer_counts_as_no_answer(problems):
    def forge(content: RecordDict) -> RecordDict:
        metrics = {"num-examples": 10} if problems is None else {"num-examples": 10, "problems": problems}
        return RecordDict({"metrics": MetricRecord(metrics) if not isinstance(problems, str)
                           else ConfigRecord(metrics), "info": content["info"]})

    grid = CheckingSites(forge=forge, forged=1)
    assert sorted(check_sites_data(grid, minimum=2, timeout=1)) == ["site-b", "site-c"]
    with pytest.raises(InputError, match="malformed data check"):
        check_sites_data(CheckingSites(forge=forge, forged=1), minimum=3, timeout=1)


def test_a_site_checks_its_data_without_importing_torch(synth_split):
    """A deployed site starts a ClientApp process per message: the data check that opens every run
    loads none of the model's libraries."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from flwr.app import Context, Message, RecordDict, ConfigRecord\n"
        "from flwr.supercore.task_identity import TaskIdentity\n"
        "from fedlite.federated.client_app import check_site_data, make_client_app\n"
        "TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1\n"
        "make_client_app()\n"
        f"context = Context(run_id=1, node_id=1, node_config={{'data-dir': {str(synth_split.out_dir / 'site-01')!r}}},"
        " state=RecordDict(), run_config={})\n"
        f"msg = Message(RecordDict({{'config': ConfigRecord({{}})}}), dst_node_id=1, message_type={MESSAGE_TYPE!r})\n"
        "reply = check_site_data(msg, context)\n"
        "print(json.dumps([dict(reply.content['metrics']),"
        " [n for n in ('torch', 'timm', 'transformers') if n in sys.modules]]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["problems"] == 0 and metrics["num-examples"] > 0
    assert heavy == []
