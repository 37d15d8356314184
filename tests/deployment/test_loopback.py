"""A loopback deployment (fedlite.federated.loopback): the federated benchmark on Flower's deployment
engine, a SuperLink and a SuperNode per site as processes of their own, every one of them stopped
afterwards, and a run that fails raised with the ServerApp's log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from fedlite.bench.federated import main as bench_federated
from fedlite.federated.loopback import LoopbackDeployment

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not all((BIN / exe).exists() for exe in ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")),
    reason="Flower's executables are not installed beside this Python",
)


def processes_under(root: Path) -> list[str]:
    """Command lines of live processes that name the deployment's directory (its Flower homes and logs)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["environ"] or {}).get("FLWR_HOME", "")
        except (psutil.Error, TypeError):
            continue
        if str(root) in text:
            found.append(text)
    return found


def test_the_federated_benchmark_runs_on_a_loopback_deployment(synth_split, tmp_path):
    split, out = synth_split.out_dir, tmp_path / "bench"
    result = CliRunner().invoke(bench_federated, [
        "--data", str(split), "--preset", "tiny", "--rounds", "1", "--local-epochs", "1", "--batch-size", "16",
        "--engine", "deployment", "--compress", "--compress-downlink", "--topk", "0.05", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)

    report = json.loads((out / "bench.json").read_text())
    assert report["engine"] == "deployment" and report["timed_rounds"] == 1
    assert report["compress"] and report["compress_downlink"] and report["topk"] == 0.05
    assert 0 < report["share_outside_training"] < 1 and report["samples_per_second"] > 0
    (record,) = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    sites = sorted(name for name in synth_split.counts if name.startswith("site-"))
    assert sorted(record["bytes_received"]) == sites  # every site of the split was a SuperNode of the run
    assert 10 < record["compression_ratio"] < 4 / (3 * 0.05)  # top-k 5 % reached the sites
    logs = out.parent / "bench-deployment" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted(["superlink.log", *(f"supernode-{s}.log" for s in sites)])
    assert processes_under(tmp_path) == []


def test_a_run_that_fails_is_raised_with_the_server_log_and_everything_stopped(synth_split, tmp_path):
    root = tmp_path / "deployment"
    with pytest.raises(RuntimeError) as failure:
        with LoopbackDeployment(root, synth_split.out_dir, sites=["site-01"]) as deployment:
            # an aggregation no server knows: the ServerApp refuses it and the run ends without a summary
            deployment.run({"out": str(tmp_path / "run"), "preset": "tiny", "aggregation": "mean-of-medians"},
                           tmp_path / "run", timeout=240)
    assert "mean-of-medians" in str(failure.value)
    assert processes_under(tmp_path) == []
