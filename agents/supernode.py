"""``fedlite agent run``: Flower's own ``flower-supernode``, kept running the way a hospital server needs.

Before the SuperNode starts, and whenever it exits abnormally, the SuperLink is probed
(``superlink_probe``). An unreachable SuperLink (down, firewalled, DNS) is waited for with
exponential backoff and jitter, never in a tight loop; a TLS misconfiguration or a configuration
Flower refuses ends the agent with ``EXIT_CONFIG``, which the systemd unit does not restart, since
retrying cannot fix a wrong certificate. SIGTERM/SIGINT stop the SuperNode and everything it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedlite.agents.agent_config import AgentConfig, thread_environment
from fedlite.agents.config_toml import render_node_config
from fedlite.agents.node_identity import REGISTER_HINT, require_node_identity
from fedlite.agents.superlink_probe import TLS_FAILED, probe_config, tls_context
from fedlite.errors import InputError

log = logging.getLogger(__name__)

EXIT_CONFIG = 78  # sysexits' EX_CONFIG: configuration or TLS error, not restarted by systemd
EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE: SuperLink still unreachable after --max-retries
STABLE_SECONDS = 300.0  # a SuperNode that ran this long was healthy: its exit starts a fresh backoff
# Flower exit codes (logged as "Exit Code: N") that mean a configuration Flower refuses: bad node
# auth key, node auth without TLS, bad trusted entities, SuperExec config, address, TLS files.
FLOWER_CONFIG_CODES = frozenset({302, 303, 304, 400, 401, 402, 600, 602, 603, 604, 605})
_FLOWER_EXIT_RE = re.compile(r"Exit Code: (\d+)")
# What the SuperNode prints when an authenticating SuperLink does not know its public key.
_NOT_ADMITTED_TEXT = "Failed to activate SuperNode"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FLOWER_LEVEL_RE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:")

# ---------------------------------------------------------------------------------------- backoff


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``initial`` doubling per consecutive failure up to ``cap``,
    each wait spread by ±``jitter`` so many hospitals do not reconnect in lockstep."""

    initial: float = 5.0
    cap: float = 300.0
    max_retries: int = 0  # 0: forever
    jitter: float = 0.2

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.cap, self.initial * 2 ** min(failures - 1, 60))
        return min(self.cap, base * rng.uniform(1 - self.jitter, 1 + self.jitter))

    def gives_up(self, failures: int) -> bool:
        return self.max_retries > 0 and failures > self.max_retries


def format_wait(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.0f} s"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"


# ------------------------------------------------------------------------------------ the process


def supernode_command(config: AgentConfig, bin_dir: Path | None = None) -> list[str]:
    """``flower-supernode`` from this environment, with the agent's connection, keys and node config."""
    exe = (bin_dir or Path(sys.executable).parent) / "flower-supernode"
    if not exe.is_file():
        raise InputError("flower-supernode not found beside this Python", path=exe,
                         hint="install fedlite with its dependencies (flwr) into this environment")
    link, node = config.superlink, config.node
    command = [str(exe), "--superlink", link.address]
    if link.insecure:
        command.append("--insecure")
    elif link.root_certificate is not None:
        command += ["--root-certificates", str(link.root_certificate)]
    if node.private_key is not None:  # Flower derives the public key from it
        command += ["--auth-supernode-private-key", str(node.private_key)]
    command += ["--host", "127.0.0.1", "--port", str(node.clientappio_port),
                "--node-config", render_node_config(config.node_config())]
    return command


def supernode_environment(config: AgentConfig, base: dict[str, str], bin_dir: Path | None = None) -> dict[str, str]:
    """The SuperNode's environment: thread limits, this environment's bin first on PATH (it starts
    ``flower-superexec`` by name), Flower's state in the cache, no telemetry or update checks from a
    hospital server unless the environment asks for them."""
    bin_dir = bin_dir or Path(sys.executable).parent
    env = dict(base)
    env.update(thread_environment(config.effective_threads))
    env["PATH"] = os.pathsep.join([str(bin_dir), *([env["PATH"]] if env.get("PATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("FLWR_HOME", str(config.site.cache_dir / "flower"))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


@dataclass(frozen=True)
class SupernodeExit:
    returncode: int
    flower_code: int | None  # the "Exit Code: N" Flower logged, if any
    seconds: float
    stopped: bool  # we stopped it (signal)
    not_admitted: bool = False  # the SuperLink refused this node's key (not registered there)

    @property
    def config_error(self) -> bool:
        """Flower refused its configuration (or its arguments): restarting would fail the same way."""
        return self.flower_code in FLOWER_CONFIG_CODES or (self.flower_code is None and self.returncode == 2)

    def describe(self) -> str:
        flower = f", Flower exit code {self.flower_code}" if self.flower_code is not None else ""
        how = f"killed by {signal.Signals(-self.returncode).name}" if self.returncode < 0 else \
            f"exit status {self.returncode}"
        return f"{how}{flower}, after {self.seconds:.0f} s"


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop_process(popen: subprocess.Popen, grace: float = 15.0, known: list | None = None) -> int:
    """SIGTERM the process (Flower's SuperNode then says goodbye to the SuperLink), SIGKILL it after
    ``grace`` seconds, then end whatever it started that is still alive (``flower-superexec`` runs in
    a session of its own); ``known``: descendants seen earlier, in case the process is already gone."""
    import psutil

    children = list(known or [])
    children += [c for c in _descendants(popen.pid) if c not in children]
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            children += _descendants(popen.pid)
            log.warning("SuperNode (pid %d) did not stop within %s; killing it", popen.pid, format_wait(grace))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.kill()
            popen.wait(timeout=10)
    # Flower's helpers watch their parent and leave on their own; give them a moment first.
    _, alive = psutil.wait_procs([c for c in children if c.is_running()], timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(alive, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return popen.returncode


def run_supernode(config: AgentConfig, stop: threading.Event, *, bin_dir: Path | None = None,
                  grace: float = 15.0) -> SupernodeExit:
    """Start ``flower-supernode``, relay its output to the log, return when it exits or ``stop`` is set."""
    command = supernode_command(config, bin_dir)
    try:
        config.site.cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the cache directory: {exc.strerror}", path=config.site.cache_dir,
                         field="site.cache_dir", hint="create it, writable by the agent's user") from None
    started = time.monotonic()
    popen = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=supernode_environment(config, dict(os.environ), bin_dir), start_new_session=True)
    log.info("SuperNode started (pid %d): %s", popen.pid, " ".join(command))
    codes: list[int] = []
    refusals: list[str] = []
    relay = threading.Thread(target=_relay_output, args=(popen.stdout, codes, refusals), daemon=True)
    relay.start()
    stopped, family, next_look = False, [], 0.0
    try:
        while popen.poll() is None:
            if time.monotonic() >= next_look:  # remembered, to clean up after a SuperNode that died
                family += [c for c in _descendants(popen.pid) if c not in family]
                next_look = time.monotonic() + 1.0
            if stop.wait(0.2):
                log.info("stopping the SuperNode (pid %d)", popen.pid)
                stopped = True
                break
    finally:
        stop_process(popen, grace, family)
    relay.join(timeout=5)
    return SupernodeExit(popen.returncode, codes[-1] if codes else None, time.monotonic() - started, stopped,
                         not_admitted=bool(refusals))


def _relay_output(stream, codes: list[int], refusals: list[str]) -> None:
    """The SuperNode's lines into the agent's log (timestamped, colour codes removed, at Flower's level);
    remembers the exit codes Flower announces and whether the SuperLink refused this node."""
    level = logging.INFO
    for raw in iter(stream.readline, b""):
        line = _ANSI_RE.sub("", raw.decode("utf-8", "replace")).rstrip()
        if not line:
            continue
        flower_level = _FLOWER_LEVEL_RE.match(line)
        if flower_level:  # continuation lines keep the level of the line that began the message
            level = logging.getLevelName(flower_level.group(1))
        match = _FLOWER_EXIT_RE.search(line)
        if match:
            codes.append(int(match.group(1)))
        if _NOT_ADMITTED_TEXT in line:
            refusals.append(line)
        log.log(level, "supernode: %s", line)
    stream.close()


# ---------------------------------------------------------------------------------------- the agent


def run_agent(config: AgentConfig, policy: RetryPolicy = RetryPolicy(), stop: threading.Event | None = None, *,
              bin_dir: Path | None = None, probe_timeout: float = 5.0, grace: float = 15.0,
              rng: random.Random | None = None) -> int:
    """Probe, run the SuperNode, probe again when it fails; returns the agent's exit status:
    0 when stopped, ``EXIT_CONFIG`` for a TLS or configuration error, ``EXIT_UNAVAILABLE`` when
    ``policy.max_retries`` consecutive retries did not help."""
    stop = stop or threading.Event()
    rng = rng or random.Random()
    address = config.superlink.address
    if config.superlink.insecure:
        log.warning("insecure = true: traffic to the SuperLink %s is NOT encrypted and the SuperLink is NOT "
                    "authenticated; use only in tests and labs", address)
    else:
        try:
            tls_context(config.superlink.root_certificate)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot load the root certificate %s: %s; not retrying, fix superlink.root_certificate",
                      config.superlink.root_certificate, getattr(exc, "strerror", None) or exc)
            return EXIT_CONFIG
    try:
        identity = require_node_identity(config)
    except InputError as exc:
        log.error("%s; not retrying, fix the configuration", exc)
        return EXIT_CONFIG
    if identity is not None:
        log.info("node key %s (%s); public key %s", identity.private_key, identity.curve,
                 identity.public_key_openssh[:40] + "...")
    failures = 0
    probe = probe_config(config, probe_timeout)
    while not stop.is_set():
        if probe.outcome == TLS_FAILED:
            log.error("SuperLink %s: %s (%s); not retrying, fix the configuration", address, probe.detail,
                      probe.hint)
            return EXIT_CONFIG
        if probe.ok:
            log.info("SuperLink %s: %s", address, probe.detail)
            result = run_supernode(config, stop, bin_dir=bin_dir, grace=grace)
            if result.stopped or stop.is_set():
                break
            if result.returncode == 0:
                log.info("SuperNode exited normally (%s)", result.describe())
                return 0
            if result.config_error:
                log.error("SuperNode refused its configuration (%s; see its log above); not retrying",
                          result.describe())
                return EXIT_CONFIG
            if result.seconds >= STABLE_SECONDS:
                failures = 0
            probe = probe_config(config, probe_timeout)
            if probe.outcome == TLS_FAILED:
                continue
            reason = f"SuperNode exited ({result.describe()}); SuperLink {address} " + (
                "reachable" if probe.ok else f"unreachable ({probe.detail})")
            if result.not_admitted:  # retried: the coordinator may register the key meanwhile
                reason = (f"the SuperLink {address} did not admit this node: its public key "
                          f"({config.node.public_key or config.node.private_key}) is not registered there; "
                          f"{REGISTER_HINT}")
        else:
            reason = f"SuperLink {address} unreachable ({probe.detail})"
        failures += 1
        if policy.gives_up(failures):
            log.error("%s; giving up after %d attempts (max retries %d)", reason, failures, policy.max_retries)
            return EXIT_UNAVAILABLE
        wait = policy.delay(failures, rng)
        log.warning("%s; retrying in %s", reason, format_wait(wait))
        if stop.wait(wait):
            break
        probe = probe_config(config, probe_timeout)
    log.info("agent stopped")
    return 0


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[threading.Event]:
    """SIGTERM (systemd stop) and SIGINT (Ctrl-C) set ``stop``; the previous handlers come back after."""
    def handler(signum, _frame) -> None:
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
