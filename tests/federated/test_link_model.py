"""The link model: a round's measured bytes over hospital line rates, in the records and in compare."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from fedlite.cli import main
from fedlite.compare import load_run, markdown_table
from fedlite.errors import InputError
from fedlite.federated.engine import run_rounds
from fedlite.federated.link_model import link_record, parse_link_mbps, site_transfer_bytes
from fake_sites import Sites, offline_messages  # noqa: F401 (fixture)
from test_compare import _federated_run
from test_engine import CFG, _ToyJob

ROW = {"bytes_sent_per_site": 8_000_000, "bytes_received": {"site-01": 2_000_000, "site-02": 500_000},
       "federated_eval": {"cases": {"site-01": 30, "site-02": 20}, "failed": [], "bytes_sent": 2_000_000},
       "round_seconds": 50.0, "communication_seconds": 12.0}


def test_rates_are_positive_numbers_of_mbits():
    assert parse_link_mbps("20, 100") == (20.0, 100.0) and parse_link_mbps("") == ()
    for bad in ("0", "-5", "fast", "nan", "inf"):
        with pytest.raises(InputError, match="is not a positive number of Mbit/s"):
            parse_link_mbps(bad)
    with pytest.raises(InputError, match="Mbit/s"):
        dataclasses.replace(CFG, link_mbps="20,x")


def test_the_slowest_sites_bytes_both_ways_set_the_transfer_time():
    # model down (8 MB) + evaluation request down (1 MB each) + update up
    assert site_transfer_bytes(ROW) == {"site-01": 11_000_000, "site-02": 9_500_000}
    record = link_record(ROW, (20.0, 100.0))
    assert record["link_seconds"] == pytest.approx({"20": 11e6 * 8 / 20e6, "100": 11e6 * 8 / 100e6})
    # the measured communication (12 s) is replaced by the modelled transfer
    assert record["round_seconds_on_link"] == pytest.approx({"20": 38.0 + 4.4, "100": 38.0 + 0.88})
    assert link_record(ROW, ()) == {}
    nobody = {**ROW, "bytes_received": {}, "federated_eval": {}}  # the model went out, nothing came back
    assert link_record(nobody, (20.0,))["link_seconds"]["20"] == pytest.approx(8e6 * 8 / 20e6)


def test_every_round_of_the_engine_records_its_link_times(tmp_path):
    cfg = dataclasses.replace(CFG, link_mbps="20,100")
    log_path = tmp_path / "rounds.jsonl"
    run_rounds(Sites(), _ToyJob(log_path), cfg, range(1, 4), np.random.default_rng(0), log_path, "toy", False)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    for row in rows:
        slowest = max(row["bytes_sent_per_site"] + up for up in row["bytes_received"].values())
        assert row["link_seconds"] == pytest.approx({"20": slowest * 8 / 20e6, "100": slowest * 8 / 100e6})
        assert row["round_seconds_on_link"]["20"] >= row["round_seconds_on_link"]["100"] > 0
    assert "link_seconds" not in run_rounds(Sites(), _ToyJob(tmp_path / "b.jsonl"), CFG, range(1, 2),
                                            np.random.default_rng(0), tmp_path / "b.jsonl", "toy", False)[0]


def test_compare_shows_minutes_on_each_link_recorded_or_modelled(tmp_path):
    run = _federated_run(tmp_path / "fedavg", compress=False)
    rounds = [{**json.loads(line), **{k: ROW[k] for k in ("bytes_sent_per_site", "communication_seconds")}}
              for line in (run / "rounds.jsonl").read_text().splitlines()]
    rounds = [{**r, **link_record(r, (20.0,))} for r in rounds]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

    recorded = load_run(run)
    per_round = 30.0 - 12.0 + (8e6 + 1000) * 8 / 20e6
    assert recorded.link_minutes == pytest.approx({"20": 2 * per_round / 60})
    both = load_run(run, (100.0,))  # modelled here from the recorded bytes, beside the recorded rate
    assert set(both.link_minutes) == {"20", "100"} and both.link_minutes["100"] < both.link_minutes["20"]
    header = markdown_table([both]).splitlines()[0]
    assert header.endswith("| minutes at 20 Mbit/s | minutes at 100 Mbit/s |")

    result = CliRunner().invoke(main, ["compare", str(run), "--link-mbps", "100"])
    assert result.exit_code == 0 and "minutes at 100 Mbit/s" in result.output, result.output
    result = CliRunner().invoke(main, ["compare", str(run), "--link-mbps", "0"])
    assert result.exit_code != 0 and "not a positive number of Mbit/s" in result.output
