"""Edge fine-tuning deployed: a TLS SuperLink, two hospital agents started with `fedlite agent run`
from their TOML configs, and `flwr run` of the edge mode; every process is stopped by PID."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_deployment import BIN, deploy, flwr_run, free_ports, start_agent, start_superlink, wait_for_summary  # noqa: F401

from fedlite.export.bundle import verify_bundle
from fedlite.export.head_swap import read_head_weights

pytestmark = pytest.mark.skipif(not (BIN / "fedlite").exists(), reason="the fedlite console script is not installed")


def agent_launcher(bundle: Path):
    def launch_agents(deployment, sites: list[str]) -> None:
        start_superlink(deployment)
        ports = [p for p in free_ports(len(sites) + 1) if p != deployment.link_port][:len(sites)]
        for site, port in zip(sites, ports):
            deployment.nodes[site] = start_agent(deployment, site, deployment.split / site, bundle, port)
    return launch_agents


def test_two_agents_fine_tune_the_head_over_tls(deploy, teacher_bundle, tmp_path):
    sites = ["site-01", "site-02"]
    deployment = deploy(sites, agent_launcher(teacher_bundle), n_cases=120)
    out = tmp_path / "edge-run"
    run_id = flwr_run(deployment, out, **{"edge-bundle": str(teacher_bundle), "min-sites": 2, "rounds": 1,
                                          "local-epochs": 2, "batch-size": 8, "optimizer": "sgd", "lr": 0.002,
                                          "compress": True})
    summary = wait_for_summary(deployment, run_id, out)
    rows = [json.loads(line) for line in (out / "edge_rounds.jsonl").read_text().splitlines()]
    for row in rows:
        print(f"round {row['round']}: sent {row['bytes_sent']} B, received {row['bytes_received']} B, "
              f"compression {row['compression_ratio']:.1f}x, student/update {row['student_to_update_ratio']:.0f}x, "
              f"site peak RSS {row['site_peak_memory_mb']} MB")
    assert [r["round"] for r in rows] == [1]
    for row in rows:
        assert sorted(row["sites"]) == sites and not row["rejected"]
        assert row["compression_ratio"] > 1 and row["student_to_update_ratio"] >= 100
    # a small step, scored at both sites before and after (that fine-tuning lowers the sites' loss is
    # shown in simulation: test_edge.py)
    assert sorted(summary["validation_cases"]) == sites and all(summary["validation_cases"].values())
    assert abs(summary["after"]["loss"] - summary["before"]["loss"]) < 0.05
    new = verify_bundle(out / "bundle")
    assert new["bundle_version"] == 2 and new["head_updates"][-1]["sites"] == sites
    tuned, teacher_head = read_head_weights(out / "bundle"), read_head_weights(teacher_bundle)
    assert tuned.keys() == teacher_head.keys()
    assert any(not np.array_equal(tuned[name], teacher_head[name]) for name in tuned)
    for site in sites:  # embeddings of the training and validation parts stayed at the site, owner-only
        cached = list((deployment.root / f"agent-{site}" / "cache").glob("embeddings-*.npz"))
        assert len(cached) == 2 and all(oct(c.stat().st_mode)[-3:] == "600" for c in cached)
