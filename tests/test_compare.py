"""`fedlite compare`: runs side by side, from the files `fedlite train` writes."""

import json

import pytest
from click.testing import CliRunner

from fedlite.cli import main
from fedlite.compare import load_run, markdown_table
from fedlite.errors import InputError
from fedlite.run_record import AT_SITES, RunRecord


def _metrics(acc, auc, f1):
    return {"accuracy": acc, "auc": auc, "stage_macro_f1": f1}


def _federated_run(path, compress, recorded_as="run record"):
    """``recorded_as`` "config": the settings as runs wrote them before the run record (kebab-case)."""
    path.mkdir()
    rounds = [{"round": r, "eval": _metrics(0.5 + r / 10, 0.6, 0.1 * r), "round_seconds": 30.0,
               "dense_update_bytes": 1000, "bytes_sent": 2000, "bytes_received": {"site-01": 100 if compress else 1000,
                                                              "site-02": 100 if compress else 1000}}
              for r in (1, 2)]
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {"rounds": 2, "best_round": 2, "best": rounds[1]["eval"], "last": rounds[1]["eval"],
               "bytes_sent": 4000, "bytes_received": 400 if compress else 4000, "epsilon": None}
    settings = {"proximal_mu": 0.0 if compress else 0.01, "compress": compress, "topk_fraction": 0.1,
                "dp": False, "freeze_rounds": 1, "local_epochs": 1}
    if recorded_as == "config":
        summary["config"] = {key.replace("_", "-"): value for key, value in settings.items()}
    else:
        summary["training"] = RunRecord("federated", AT_SITES, 2, settings).to_dict()
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def _centralized_run(path):
    path.mkdir()
    history = [{"epoch": e, "train_loss": 1.0, "train_seconds": 60.0, "eval": _metrics(0.8, 0.9, 0.3 * e)}
               for e in (1, 2)]
    (path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    training = RunRecord("centralized", "DATA/split", 2, {"batch_size": 16, "optimizer": "adamw", "lr": 3e-4})
    (path / "summary.json").write_text(json.dumps({"modality": "both", "best_epoch": 2, "best": history[1]["eval"],
                                                   "last": history[1]["eval"], "training": training.to_dict()}))
    return path


def test_runs_are_tabulated_with_metrics_bytes_and_compression(tmp_path):
    dense = load_run(_federated_run(tmp_path / "fedavg", compress=False))
    sparse = load_run(_federated_run(tmp_path / "compressed", compress=True, recorded_as="config"))
    central = load_run(_centralized_run(tmp_path / "central"))
    assert (dense.mode, dense.steps, dense.minutes) == ("federated", 2, 1.0)
    assert central.mode == "centralized" and central.minutes == 2.0
    rows = markdown_table([dense, sparse, central]).splitlines()
    assert len(rows) == 5 and all(r.count("|") == rows[0].count("|") for r in rows)
    assert "| 70.0 % |" in rows[2] and "| 1.0× |" in rows[2]  # accuracy after round 2; dense updates
    assert "| 10.0× |" in rows[3] and "fedavg, top-k 0.1 + int8" in rows[3]
    assert "fedprox μ=0.01" in rows[2]
    assert "| 0.600 (2) |" in rows[4] and "| – |" in rows[4]  # best F1 at epoch 2; no bytes for centralized
    assert "B=16, adamw 0.0003" in rows[4]
    assert "| sites' validation |" in rows[2] and "| held-out set (?) |" in rows[4]


def test_a_federated_run_is_scored_on_its_test_set_with_bytes_counted_both_ways(tmp_path):
    """Federated runs that scored the pooled test set are shown on it, as centralized runs are,
    at the round the sites chose; the downlink's changes count against the dense model sent."""
    path = _federated_run(tmp_path / "both", compress=True)
    rows = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
    for row, accuracy in zip(rows, (0.6, 0.65)):
        # 2 sites, 1000 dense bytes each: training changes of 50 bytes, evaluation changes of 50
        row.update(bytes_sent=100, downlink_compression_ratio=20.0,
                   federated_eval={"cases": {"site-01": 5, "site-02": 5}, "failed": [], "bytes_sent": 100},
                   server_test={**_metrics(accuracy, 0.7, 0.2 * row["round"]), "cases": 40})
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((path / "summary.json").read_text())
    summary.update(best_round=1, bytes_sent=400, training=RunRecord(
        "federated", AT_SITES, 2, {"compress": True, "compress_downlink": True, "topk_fraction": 0.01,
                                   "server_test": "DATA/split/test"}).to_dict())
    (path / "summary.json").write_text(json.dumps(summary))
    run = load_run(path)
    assert run.last["accuracy"] == 0.65 and run.best["stage_macro_f1"] == 0.2 and run.best_step == 1
    assert [m["accuracy"] for _, m in run.curve] == [0.6, 0.65]
    assert run.dense_sent == 2 * (2000 + 2000)  # two rounds of training and evaluation messages
    row = markdown_table([run]).splitlines()[2]
    assert "| test (40) |" in row and "| 65.0 % |" in row and "| 0.200 (1) |" in row
    assert "| 10.0× |" in row and "| 15.0× |" in row  # updates: 4000/400; both: (4000 + 8000)/(400 + 400)
    assert "changes down" in row


def test_compare_writes_a_table_and_a_plot(tmp_path):
    runs = [str(_federated_run(tmp_path / "fedavg", False)), str(_centralized_run(tmp_path / "central"))]
    result = CliRunner().invoke(main, ["compare", *runs, "--out", str(tmp_path / "report" / "runs")])
    assert result.exit_code == 0, result.output
    assert "fedavg" in result.output and "central" in result.output
    assert (tmp_path / "report" / "runs.md").read_text().count("\n") == 4
    assert (tmp_path / "report" / "runs.png").stat().st_size > 1000


def test_what_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(InputError, match="no summary.json"):
        load_run(tmp_path)
    run = _federated_run(tmp_path / "broken", False)
    (run / "rounds.jsonl").write_text('{"round": 1}\n{"round": \n')
    with pytest.raises(InputError, match=r"rounds.jsonl:2: not JSON"):
        load_run(run)
    (run / "rounds.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(InputError, match=r"rounds.jsonl: a record lacks the field 'dense_update_bytes'"):
        load_run(run)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "no summary.json" in result.output
