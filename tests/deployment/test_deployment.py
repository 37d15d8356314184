"""A real deployment on loopback: SuperLink with TLS, one SuperNode per site, `flwr run` over TLS.

Everything runs as separate processes, as it would across hospitals: the SuperLink serves its Fleet,
Control and Runtime APIs on one TLS port; every SuperNode verifies the SuperLink against a throwaway
CA, finds its cases through ``--node-config data-dir=...`` and serves its own Runtime (ClientAppIo)
API on its own loopback port; the CLI submits the app from the project directory through a
connection written to ``$FLWR_HOME/config.toml``. Each process gets its own ``FLWR_HOME`` so no FAB or
state lands in the user's ``~/.flwr``. Every process is bounded in time and killed, with its whole
process tree, in a ``finally``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from certificates import make_certificates
from flower_cli import register_node_key, write_connection

from fedlite.federated.loopback import Process as Proc
from fedlite.federated.loopback import (flower_env, free_ports, json_in, process_logs, spawn, stop_process_tree,
                                       wait_for_port)

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 240.0  # seconds from `flwr run` to summary.json
ROUND_TIMEOUT = 45.0  # seconds, the crash test's round deadline
LOG_TAIL = 6000  # characters of each process log shown when a test fails

pytestmark = pytest.mark.skipif(
    not all((BIN / exe).exists() for exe in ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")),
    reason="Flower's executables are not installed beside this Python",
)


# ---------------------------------------------------------------------------------------- helpers


def base_env(flwr_home: Path) -> dict[str, str]:
    """A Flower process's environment, each torch process at one thread (the box is shared)."""
    env = flower_env(flwr_home, threads=1)
    env.pop("PYTHONPATH", None)
    return env


@dataclass
class Deployment:
    root: Path
    certs: dict[str, Path]
    link_port: int
    split: Path
    cli_env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    nodes: dict[str, Proc] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        self.procs.append(spawn(self.root, name, args, env))
        return self.procs[-1]

    def logs(self) -> str:
        return process_logs(self.procs, LOG_TAIL)


def stop(proc: Proc, grace: float = 5.0, hard: bool = False) -> None:
    stop_process_tree(proc.popen, grace, hard)


def prepare_deployment(root: Path, sites: list[str], n_cases: int = 40) -> Deployment:
    """Certificates, a split with one directory per site, and the CLI's connection config."""
    from fedlite.data.split import split_dataset
    from fedlite.data.synth import synthesize

    certs = make_certificates(root / "certs")
    synthesize(root / "data", n_cases=n_cases, workers=1, progress=False)
    split_dataset(root / "data", clients=len(sites), seed=0)
    split = (root / "data" / "split").resolve()
    for site in sites:
        assert (split / site).is_dir(), f"the split has no {site}: {sorted(p.name for p in split.iterdir())}"

    cli_home = root / "flwr-cli"
    deployment = Deployment(root, certs, free_ports(1)[0], split, base_env(cli_home))
    # What `flwr run . hospitals` reads: $FLWR_HOME/config.toml (TLS unless `insecure = true`).
    write_connection(cli_home, f"127.0.0.1:{deployment.link_port}", certs["ca"])
    return deployment


def start_superlink(deployment: Deployment, *extra: str) -> None:
    """The SuperLink with TLS: Fleet, Control and Runtime APIs on one loopback port."""
    certs, link_port = deployment.certs, deployment.link_port
    link = deployment.start("superlink", [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
        "--ssl-keyfile", str(certs["key"]),
        "--host", "127.0.0.1", "--port", str(link_port),  # Fleet, Control and Runtime APIs on one port
        "--disable-runtime-dependency-installation", *extra,
    ], base_env(deployment.root / "flwr-superlink"))
    wait_for_port(link_port, link.popen, timeout=90)


def start_agent(deployment: Deployment, name: str, data_dir: Path, bundle: Path, port: int, *,
                registered: bool = True, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Proc:
    """A hospital agent (`fedlite agent run`) from its own agent.toml, with its own node key pair,
    registered at the SuperLink as a coordinator would (``registered``)."""
    from fedlite.agents.agent_config import (AgentConfig, NodeSettings, ResourceSettings, SiteSettings,
                                             SuperLinkSettings)
    from fedlite.agents.config_toml import render_agent_config
    from fedlite.agents.node_identity import generate_node_key_pair

    home = deployment.root / f"agent-{name}"
    home.mkdir(parents=True)
    identity = generate_node_key_pair(home / "node_key")
    if registered:
        register_node_key(deployment.root / "flwr-cli", home / "node_key.pub", name)
    config = AgentConfig(
        superlink=SuperLinkSettings(address=f"127.0.0.1:{deployment.link_port}", root_certificate=deployment.certs["ca"]),
        site=SiteSettings(bundle=bundle, data_dir=data_dir, report_dir=home / "reports", cache_dir=home / "cache"),
        node=NodeSettings(private_key=identity.private_key, public_key=home / "node_key.pub", clientappio_port=port),
        resources=ResourceSettings(threads=1, memory_max="2G"))
    (home / "agent.toml").write_text(render_agent_config(config))
    return deployment.start(f"agent-{name}", [
        str(BIN / "fedlite"), "agent", "run", "--config", str(home / "agent.toml"), "--initial-backoff", "1", *args,
    ], {**base_env(home / "flwr"), **(env or {})})


def launch(deployment: Deployment, sites: list[str]) -> None:
    """A TLS SuperLink, then one SuperNode per site, each with its data dir and its own Runtime API port."""
    start_superlink(deployment)
    certs, link_port = deployment.certs, deployment.link_port
    node_ports = [p for p in free_ports(len(sites) + 1) if p != link_port][:len(sites)]
    for site, port in zip(sites, node_ports):
        deployment.nodes[site] = deployment.start(f"supernode-{site}", [
            str(BIN / "flower-supernode"),
            "--root-certificates", str(certs["ca"]),
            "--superlink", f"127.0.0.1:{link_port}",
            "--node-config", f'data-dir="{deployment.split / site}" cache-dir="{deployment.root / "cache" / site}"',
            "--host", "127.0.0.1", "--port", str(port),  # this SuperNode's Runtime (ClientAppIo) API
        ], base_env(deployment.root / f"flwr-{site}"))


def flwr(deployment: Deployment, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The Flower CLI against the test's connection (TLS, verified against the throwaway CA)."""
    return subprocess.run([str(BIN / "flwr"), *args], env=deployment.cli_env, cwd=deployment.root,
                          capture_output=True, text=True, timeout=timeout)


def flwr_run(deployment: Deployment, out: Path, **overrides) -> str:
    """Submit the project as a run; returns the run id."""
    settings = {"split-dir": str(deployment.split), "out": str(out), "preset": "tiny", "rounds": 1,
                "freeze-rounds": 1, "local-epochs": 1, "batch-size": 16, **overrides}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())  # TOML scalars
    result = flwr(deployment, "run", str(PROJECT), "hospitals", "--run-config", run_config, "--format", "json",
                  timeout=180)
    try:
        reply = json_in(result.stdout)
    except ValueError:
        reply = {}
    if result.returncode != 0 or not reply.get("success"):
        pytest.fail(f"flwr run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{deployment.logs()}")
    return str(reply["run-id"])


def run_status(deployment: Deployment, run_id: str) -> str:
    """``pending``, ``starting``, ``running`` or ``finished:completed|failed|stopped`` ("" if unknown)."""
    try:
        result = flwr(deployment, "ls", "hospitals", "--run-id", run_id, "--format", "json", timeout=60)
        return str(json_in(result.stdout)["runs"][0]["status"])
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
        return ""


def run_logs(deployment: Deployment, run_id: str) -> str:
    """The ServerApp's own output, which the SuperLink keeps per run (not in its stdout)."""
    try:
        result = flwr(deployment, "log", run_id, "hospitals", "--show", timeout=60)
        return result.stdout[-2 * LOG_TAIL:] + result.stderr[-LOG_TAIL:]
    except subprocess.TimeoutExpired:
        return "(flwr log timed out)"


def wait_for_summary(deployment: Deployment, run_id: str, out: Path, timeout: float = RUN_TIMEOUT,
                     name: str = "summary.json") -> dict:
    """Poll for the run's summary.json (or another JSON file ``name`` in ``out``); fail early (with the
    ServerApp's log) if the run ends without one."""
    deadline = time.monotonic() + timeout
    next_status_check = time.monotonic() + 15
    link = deployment.procs[0]
    status = ""
    while time.monotonic() < deadline:
        if (out / name).is_file():
            return json.loads((out / name).read_text())
        if link.popen.poll() is not None:
            pytest.fail(f"the SuperLink exited with {link.popen.returncode}\n{deployment.logs()}")
        if time.monotonic() > next_status_check:
            status = run_status(deployment, run_id)
            if status.startswith("finished"):
                time.sleep(2)  # the ServerApp writes its output before it reports back
                if (out / name).is_file():
                    return json.loads((out / name).read_text())
                break
            next_status_check = time.monotonic() + 15
        time.sleep(1.0)
    pytest.fail(f"no {name} in {out} (run {run_id}: {status or 'still running'} after at most "
                f"{timeout:.0f} s)\n===== ServerApp log (flwr log) =====\n{run_logs(deployment, run_id)}\n"
                f"{deployment.logs()}")


def rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def deploy(tmp_path):
    """Start a deployment with ``deploy(sites)`` (``deploy(sites, launcher)`` to start the sites another
    way); everything started is stopped afterwards."""
    started: list[Deployment] = []

    def _deploy(sites: list[str], launcher=launch, n_cases: int = 40) -> Deployment:
        deployment = prepare_deployment(tmp_path, sites, n_cases)
        started.append(deployment)  # registered first: a failed launch still stops what it started
        launcher(deployment, sites)
        return deployment

    try:
        yield _deploy
    finally:
        for deployment in started:
            for proc in reversed(deployment.procs):  # SuperNodes first, the SuperLink last
                stop(proc)
            logs = deployment.logs()
            (tmp_path / "deployment.log").write_text(logs)
            print(logs[-4 * LOG_TAIL:])  # shown by pytest when the test failed
        shutil.rmtree(tmp_path / "data", ignore_errors=True)


# ------------------------------------------------------------------------------------------ tests


def test_deployment_exports_a_bundle_at_the_sites(deploy, teacher_run, tmp_path):
    from fedlite.export.bundle import verify_bundle

    sites = ["site-01", "site-02"]
    deployment = deploy(sites, n_cases=120)
    out = tmp_path / "bundle"
    run_id = flwr_run(deployment, out, **{"min-sites": 2, "export-checkpoint": str(teacher_run[0]),
                                          "export-out": str(out), "export-distill-epochs": 1,
                                          "export-prune": 0.0,  # pruning at sites: test_federated_export
                                          "export-min-agreement": 0.0, "export-min-leukemia-agreement": 0.0,
                                          "export-max-accuracy-drop": 100.0, "export-max-auc-drop": 1.0,
                                          "export-max-stage-f1-drop": 1.0, "export-min-auc": 0.0})
    meta = wait_for_summary(deployment, run_id, out, name="bundle.json")
    assert verify_bundle(out)["content_sha256"] == meta["content_sha256"]
    assert sorted(meta["data_sources"]["verification"]["sites"]) == sites
    assert meta["data_sources"]["distill"]["kind"] == "sites" and meta["parity"]["data"] == "sites"
    for site in sites:  # the teacher reached each site once, into its owner-only cache
        assert len(list((deployment.root / "cache" / site).glob("teacher-*"))) == 1


def _clientapp_started(proc: Proc) -> bool:
    try:
        import psutil

        return any("flwr-clientapp" in " ".join(p.cmdline())
                   for p in psutil.Process(proc.popen.pid).children(recursive=True))
    except Exception:
        return False


def test_deployment_round_completes_when_a_supernode_dies_mid_round(deploy, tmp_path):
    sites = ["site-01", "site-02", "site-03"]
    deployment = deploy(sites)
    out = tmp_path / "run"
    start = time.monotonic()
    run_id = flwr_run(deployment, out, **{"min-sites": 3, "round-timeout": ROUND_TIMEOUT})

    # Crash site-03 (SIGKILL, no goodbye) once the sites have checked their data (the run's first
    # message) and it works on the round's: the server must not stall; it closes the round at its
    # deadline (or when the SuperLink reports the node gone after two missed heartbeats, ~60 s) with
    # the two sites that answered.
    victim = deployment.nodes["site-03"]
    deadline = time.monotonic() + 180
    while not (out / "rounds.jsonl").exists():  # the run writes nothing before the sites' data is checked
        if time.monotonic() > deadline or run_status(deployment, run_id).startswith("finished"):
            pytest.fail(f"the sites' data check did not finish\n===== ServerApp log =====\n"
                        f"{run_logs(deployment, run_id)}\n{deployment.logs()}")
        time.sleep(2)
    next_status_check = time.monotonic() + 15
    while not _clientapp_started(victim):
        if time.monotonic() > deadline:
            pytest.fail(f"site-03 never started a ClientApp\n{deployment.logs()}")
        if time.monotonic() > next_status_check:
            if run_status(deployment, run_id).startswith("finished"):
                pytest.fail(f"run {run_id} ended before site-03 got its message\n===== ServerApp log =====\n"
                            f"{run_logs(deployment, run_id)}\n{deployment.logs()}")
            next_status_check = time.monotonic() + 15
        time.sleep(0.2)
    stop(victim, hard=True)
    assert not (out / "summary.json").exists(), "the round finished before the SuperNode could be killed"

    summary = wait_for_summary(deployment, run_id, out)
    assert summary["rounds"] == 1
    history = rounds(out)
    assert sorted(history[0]["sites"]) == ["site-01", "site-02"], history[0]
    assert history[0]["round_seconds"] < ROUND_TIMEOUT + 60, "the round waited far past its deadline"
    assert time.monotonic() - start < RUN_TIMEOUT + 180
