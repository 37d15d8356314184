"""Only registered hospitals join, a registered one cannot poison the model, and the round is
evaluated at the sites: a real TLS SuperLink with SuperNode authentication
(``--enable-supernode-auth``), two hospital agents whose keys the coordinator registered
(``flwr supernode register``), one of which sends a crafted update, one agent whose key nobody
registered, and a SuperNode with no key at all. Every process is stopped by PID."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_deployment import (BIN, base_env, deploy, flwr_run, free_ports, rounds, start_agent,  # noqa: F401
                             start_superlink, wait_for_summary)

from fedlite.agents.supernode import EXIT_UNAVAILABLE

pytestmark = pytest.mark.skipif(not (BIN / "fedlite").exists(), reason="the fedlite console script is not installed")

HONEST = ["site-01"]
HOSTILE = "site-02"
# Loaded at the start of every Python process of the hostile hospital's agent, so its ClientApp
# multiplies every update it sends by a million: the reply is well formed, its values are not.
CRAFTED_UPDATE = '''
import fedlite.federated.site_update as site_update

_honest_reply = site_update.update_reply


def update_reply(msg, update, site, compressed):
    update.arrays = {name: value * 1e6 for name, value in update.arrays.items()}
    return _honest_reply(msg, update, site, compressed)


site_update.update_reply = update_reply
'''


def authenticated_launcher(bundle: Path, hostile_code: Path):
    def launch(deployment, sites: list[str]) -> None:
        start_superlink(deployment, "--enable-supernode-auth")
        ports = [p for p in free_ports(len(sites) + 2) if p != deployment.link_port][:len(sites) + 1]
        for site, port in zip(sites, ports):
            env = {"PYTHONPATH": str(hostile_code)} if site == HOSTILE else None
            deployment.nodes[site] = start_agent(deployment, site, deployment.split / site, bundle, port, env=env)
        # a hospital nobody registered, pointed at the same SuperLink with a key of its own
        deployment.nodes["intruder"] = start_agent(deployment, "intruder", deployment.split / HONEST[0], bundle,
                                                   ports[-1], registered=False, args=("--max-retries", "1"))
        # and a bare SuperNode with no key at all, which would register itself at a SuperLink without auth
        deployment.nodes["anonymous"] = deployment.start("supernode-anonymous", [
            str(BIN / "flower-supernode"), "--root-certificates", str(deployment.certs["ca"]),
            "--superlink", f"127.0.0.1:{deployment.link_port}", "--host", "127.0.0.1", "--port", str(ports[-1] + 1),
            "--node-config", f'data-dir="{deployment.split / HONEST[0]}"'], base_env(deployment.root / "flwr-anon"))
    return launch


def test_only_registered_hospitals_join_and_a_crafted_update_is_rejected_and_named(deploy, teacher_bundle,
                                                                                  tmp_path):
    from safetensors.numpy import load_file

    from fedlite.data.holdout import site_parts

    hostile_code = tmp_path / "hostile"
    hostile_code.mkdir()
    (hostile_code / "sitecustomize.py").write_text(CRAFTED_UPDATE)
    sites = [*HONEST, HOSTILE]
    deployment = deploy(sites, authenticated_launcher(teacher_bundle, hostile_code))

    intruder = deployment.nodes["intruder"]
    assert intruder.popen.wait(timeout=120) == EXIT_UNAVAILABLE, deployment.logs()
    intruder_log = intruder.log.read_text(errors="replace")
    assert "did not admit this node: its public key" in intruder_log and "not registered" in intruder_log
    assert deployment.nodes["anonymous"].popen.wait(timeout=120) != 0, deployment.logs()
    link_log = deployment.procs[0].log.read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log  # the intruder's activation
    assert "[ApiError:2001]" in link_log  # the anonymous node's self-registration: disabled by node auth

    out = tmp_path / "run"
    run_id = flwr_run(deployment, out, **{"min-sites": len(sites)})
    summary = wait_for_summary(deployment, run_id, out)
    assert summary["rounds"] == 1
    (row,) = rounds(out)
    assert sorted(row["sites"]) == HONEST, row
    (rejection,) = row["rejected"]
    assert rejection["site"] == HOSTILE and "norm" in rejection["reason"], rejection
    weights = load_file(str(out / "last" / "model.safetensors"))
    assert all(math.isfinite(float(abs(w).max())) for w in weights.values())
    # evaluated at the sites on their validation parts; the coordinator was given no test set
    validation = {s: len(site_parts(deployment.split / s).val) for s in sites}
    assert row["federated_eval"]["cases"] == validation and "server_test" not in row
    assert row["eval"]["cases"] == sum(validation.values()) > 0 and math.isfinite(row["eval"]["accuracy"])
    assert (out / "best" / "model.safetensors").is_file()
