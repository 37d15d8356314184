"""One schema for how a model was trained, and one reader that also reads the older shapes."""

import pytest

from fedlite.errors import InputError
from fedlite.run_record import AT_SITES, SCHEMA, RunRecord, run_record


def test_a_record_reads_back_as_written():
    record = RunRecord("federated", AT_SITES, 0, {"local_epochs": 2, "proximal_mu": 0.01})
    written = record.at(3).to_dict()
    assert written["schema"] == SCHEMA and written["step"] == 3
    assert run_record(written) == record.at(3)
    assert run_record({"rounds": 3, "training": written}) == record.at(3)  # a summary holds the same record
    assert record.step_name == "round" and RunRecord("centralized", "D", 1).step_name == "epoch"


def test_records_written_before_the_schema_still_read():
    federated_checkpoint = {"mode": "federated", "split-dir": "D/split", "local-epochs": 2, "proximal-mu": 0.01,
                            "round": 4}
    old = run_record(federated_checkpoint)
    assert (old.kind, old.data, old.step) == ("federated", AT_SITES, 4)
    assert old.settings == {"split_dir": "D/split", "local_epochs": 2, "proximal_mu": 0.01}
    centralized_checkpoint = {"mode": "centralized", "data": "D/split/site-01", "eval_data": "D/split/test",
                              "batch_size": 16, "epoch": 2}
    old = run_record(centralized_checkpoint)
    assert (old.kind, old.data, old.step) == ("centralized", "D/split/site-01", 2)
    assert old.settings == {"eval_data": "D/split/test", "batch_size": 16}
    edge_summary = {"rounds": 2, "config": {"edge-bundle": "B", "local-epochs": 1}}
    old = run_record(edge_summary)
    assert (old.kind, old.step, old.settings["local_epochs"]) == ("edge", 2, 1)


@pytest.mark.parametrize("entry, match", [
    ([1, 2], "not a JSON object"),
    ({"batch_size": 16}, "names no kind of run"),
    ({"schema": 99, "kind": "federated", "data": AT_SITES, "step": 1, "settings": {}}, "newer than this fedlite"),
    ({"schema": SCHEMA, "kind": "federated", "data": AT_SITES, "settings": {}}, "malformed"),
    ({"schema": SCHEMA, "kind": "poll", "data": AT_SITES, "step": 1, "settings": {}}, "unknown kind of run 'poll'"),
    ({"mode": "federated", "round": "three"}, "malformed"),
])
def test_a_broken_record_is_refused_with_where_it_is(entry, match, tmp_path):
    with pytest.raises(InputError, match=match) as caught:
        run_record(entry, tmp_path / "config.json")
    assert "config.json" in str(caught.value)
