"""`fedlite agent run`: an unreachable SuperLink is retried with growing waits and then given up, a TLS
or configuration error ends the agent at once with the code systemd does not restart, and SIGTERM
stops a real SuperNode connected to a real TLS SuperLink."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedlite.agents.agent_config import read_agent_config
from fedlite.agents.supernode import (EXIT_CONFIG, EXIT_UNAVAILABLE, RetryPolicy, run_agent, supernode_command)
from flower_cli import register_node_key, write_connection
from test_agent_check import (BIN, closed_port, make_certificates, make_site, needs_flower, stop_by_pid,
                              tls_server, tls_superlink)

FEDLITE = BIN / "fedlite"
RETRY = re.compile(r"retrying in ([\d.]+) s")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def agent_run(config: Path, *args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([str(FEDLITE), "agent", "run", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return done, time.monotonic() - start


@pytest.fixture
def agent_log():
    """The agent's log records, whatever handlers the agent's logger has."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fedlite.agents.supernode")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def fake_supernode(bin_dir: Path, body: str) -> Path:
    """A stand-in ``flower-supernode`` that prints what Flower prints and exits."""
    bin_dir.mkdir()
    exe = bin_dir / "flower-supernode"
    exe.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    exe.chmod(0o755)
    return bin_dir


# ------------------------------------------------------------------------------------------ backoff


def test_backoff_doubles_with_jitter_up_to_the_cap():
    policy = RetryPolicy(initial=5.0, cap=300.0, jitter=0.2)
    rng = random.Random(0)
    for failures, base in [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (50, 300)]:
        for _ in range(20):
            assert 0.8 * base <= policy.delay(failures, rng) <= min(300.0, 1.2 * base)
    assert not RetryPolicy(max_retries=0).gives_up(10**6)
    assert [RetryPolicy(max_retries=2).gives_up(n) for n in (1, 2, 3)] == [False, False, True]


# ------------------------------------------------------------------------------------------ the CLI


def test_unreachable_superlink_is_retried_with_growing_waits_then_given_up(tmp_path):
    port = closed_port()
    config = make_site(tmp_path, f"127.0.0.1:{port}", make_certificates(tmp_path / "certs")["ca"])
    done, seconds = agent_run(config, "--max-retries", "2", "--initial-backoff", "0.1")
    assert done.returncode == EXIT_UNAVAILABLE != 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), done.stderr
    retries = [line for line in lines if "retrying in" in line]
    assert len(retries) == 2, done.stderr
    assert all(f"SuperLink 127.0.0.1:{port} unreachable (connection refused); retrying in" in r for r in retries)
    waits = [float(RETRY.search(r).group(1)) for r in retries]
    assert 0.08 <= waits[0] < waits[1] <= 0.24, waits
    assert "giving up after 3 attempts" in lines[-1]
    assert seconds < 20


def test_tls_misconfiguration_exits_at_once_with_the_config_code(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    other_ca = make_certificates(tmp_path / "other", ca_name="another CA")["ca"]
    with tls_server(certs["cert"], certs["key"]) as port:
        config = make_site(tmp_path, f"127.0.0.1:{port}", other_ca)
        done, seconds = agent_run(config, "--initial-backoff", "0.1")
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "TLS handshake failed: certificate verify failed" in done.stderr
    assert "retrying in" not in done.stderr and "not retrying" in done.stderr and seconds < 20


def test_configuration_errors_exit_with_the_config_code(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, insecure=True)
    config.write_text(config.read_text().replace("[site]", "[site]\ndata-dir = \"/srv/data\""))
    done, _ = agent_run(config)
    assert done.returncode == EXIT_CONFIG
    assert "field 'site.data-dir': unknown key (did you mean 'data_dir'?)" in done.stderr
    missing, _ = agent_run(tmp_path / "nowhere.toml")
    assert missing.returncode == EXIT_CONFIG and "agent config not found" in missing.stderr


def test_an_agent_without_a_node_key_does_not_start(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", make_certificates(tmp_path / "certs")["ca"],
                       node_key=False)
    done, seconds = agent_run(config)
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "no node key" in done.stderr and "fedlite agent keygen" in done.stderr and "not retrying" in done.stderr
    assert "SuperNode started" not in done.stderr and seconds < 20


# ----------------------------------------------------------------------------- the SuperNode process


def test_the_supernode_flags_are_flowers_own(tmp_path):
    config = read_agent_config(make_site(tmp_path, "127.0.0.1:9093", make_certificates(tmp_path / "c")["ca"]))
    private_key = tmp_path / "node_key"
    config = replace(config, node=replace(config.node, private_key=private_key, clientappio_port=9111))
    command = supernode_command(config)
    flags = [word for word in command if word.startswith("--")]
    assert set(flags) == {"--superlink", "--root-certificates", "--auth-supernode-private-key", "--host", "--port",
                          "--node-config"}
    assert command[command.index("--port") + 1] == "9111" and command[command.index("--host") + 1] == "127.0.0.1"
    help_text = subprocess.run([command[0], "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in flags:
        assert re.search(rf"{flag}\b", help_text), flag


def test_a_supernode_that_fails_is_restarted_with_backoff_after_probing(tmp_path, agent_log):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        config = read_agent_config(make_site(tmp_path, f"127.0.0.1:{listener.getsockname()[1]}", None, insecure=True))
        bin_dir = fake_supernode(tmp_path / "bin", 'print("ERROR :     Exit Code: 305"); sys.exit(1)')
        code = run_agent(config, RetryPolicy(initial=0.05, max_retries=1), bin_dir=bin_dir, probe_timeout=2)
    assert code == EXIT_UNAVAILABLE
    messages = [r.getMessage() for r in agent_log]
    assert sum("SuperNode started" in m for m in messages) == 2
    assert any("Flower exit code 305" in m and "SuperLink" in m and "reachable; retrying in" in m for m in messages)
    assert any(r.levelno == logging.ERROR and r.getMessage() == "supernode: ERROR :     Exit Code: 305"
               for r in agent_log)


def test_a_configuration_flower_refuses_is_not_restarted(tmp_path, agent_log):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        config = read_agent_config(make_site(tmp_path, f"127.0.0.1:{listener.getsockname()[1]}", None, insecure=True))
        bin_dir = fake_supernode(tmp_path / "bin", 'print("ERROR :     Exit Code: 302"); sys.exit(1)')
        code = run_agent(config, RetryPolicy(initial=0.05), bin_dir=bin_dir, probe_timeout=2)
    assert code == EXIT_CONFIG
    assert sum("SuperNode started" in r.getMessage() for r in agent_log) == 1


def test_stop_during_backoff_returns_promptly(tmp_path):
    config = read_agent_config(make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, insecure=True))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    assert run_agent(config, RetryPolicy(initial=30.0), stop, probe_timeout=2) == 0
    assert time.monotonic() - start < 5


@needs_flower
def test_sigterm_stops_a_real_supernode_and_exits_zero(tmp_path):
    import psutil

    certs = make_certificates(tmp_path / "certs")
    with tls_superlink(tmp_path, certs) as port:
        config = make_site(tmp_path, f"127.0.0.1:{port}", certs["ca"])
        config.write_text(config.read_text().replace("clientappio_port = 9094", f"clientappio_port = {closed_port()}"))
        # a keyed SuperNode joins only once the coordinator has registered its key
        cli_home = write_connection(tmp_path / "flwr-cli", f"127.0.0.1:{port}", certs["ca"])
        register_node_key(cli_home, tmp_path / "node_key.pub", "site")
        log = tmp_path / "agent.log"
        with log.open("wb") as fh:
            agent = subprocess.Popen([str(FEDLITE), "agent", "run", "--config", str(config)], stdout=fh, stderr=fh,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr-node")})
        try:
            deadline = time.monotonic() + 60
            supernode = None
            while supernode is None or "SuperNode ID" not in log.read_text(errors="replace"):
                assert agent.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                supernode = next((p for p in psutil.Process(agent.pid).children()
                                  if "flower-supernode" in " ".join(p.cmdline())), supernode)
                time.sleep(0.2)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=40) == 0, log.read_text(errors="replace")
            assert not supernode.is_running() or supernode.status() == psutil.STATUS_ZOMBIE
        finally:
            stop_by_pid(agent)
    text = log.read_text(errors="replace")
    assert "SIGTERM received" in text and "agent stopped" in text
