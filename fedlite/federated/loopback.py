"""Flower's deployment engine on one machine: a SuperLink, one SuperNode per site of a split and a
run submitted with ``flwr run``, each a process of its own on loopback.

This is the real transport (gRPC between processes, each site's ClientApp in its own process,
finding its cases through ``--node-config`` as a hospital's does) without Ray's simulation runtime:
what a benchmark wants on a GPU host, where the round's overhead outside training is the question.
Nothing listens beyond 127.0.0.1, so it runs without TLS; a consortium's deployment is README's
"Deployment across hospitals"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlite.errors import InputError

CONNECTION = "loopback"
STATUS_EVERY = 15.0  # seconds between `flwr ls` checks while a run is waited for
LOG_TAIL = 4000  # characters of a process's log quoted when the run fails


def flower_executable(name: str) -> str:
    """A Flower command beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise InputError(f"Flower's {name} is not installed", hint="pip install 'flwr>=1.41,<1.42'")
    return found


def project_dir() -> Path:
    """The fedlite source tree ``flwr run`` packs into the app bundle: the one this module lives in
    (an editable install), else the working directory."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        pyproject = root / "pyproject.toml"
        if pyproject.is_file() and 'name = "fedlite"' in pyproject.read_text():
            return root
    raise InputError("a local deployment packs fedlite's source directory into Flower's app bundle",
                     hint="run it from the fedlite checkout (the directory with pyproject.toml)")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} after {timeout:.0f} s")


def stop_process_tree(proc: subprocess.Popen, grace: float = 5.0, hard: bool = False) -> None:
    """SIGTERM the process, its process group and every descendant (``flower-superexec`` runs in a
    session of its own, the ServerApp and ClientApps below it), then SIGKILL what is left. ``hard``:
    SIGKILL at once, as a crash would (no goodbye to the SuperLink)."""
    import psutil

    pids = {proc.pid}

    def signal_all(sig: int) -> None:
        try:  # again each time: a ClientApp may have started meanwhile
            pids.update(child.pid for child in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    if not hard:
        signal_all(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
    signal_all(signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def flower_env(home: Path, threads: int | None = None) -> dict[str, str]:
    """A Flower process's environment: its own FLWR_HOME, no telemetry, update checks or installs at
    run time; ``threads`` caps each torch process (sites sharing a few cores)."""
    env = dict(os.environ)
    bin_dir = str(Path(flower_executable("flower-superexec")).parent)  # SuperLink/SuperNode spawn it by name
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "FLWR_HOME": str(home),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TQDM_DISABLE": "1",
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    home.mkdir(parents=True, exist_ok=True)
    return env


def json_in(text: str) -> dict:
    """The JSON object in a Flower CLI's output (``--format json``), past any lines before it."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in {text!r}")
    return json.JSONDecoder().raw_decode(text[start:])[0]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path


def spawn(root: Path, name: str, args: list[str], env: dict[str, str]) -> Process:
    """A process with its output in ``root/logs/NAME.log``, in a session of its own so that
    ``stop_process_tree`` ends it with whatever it starts."""
    log = root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=root, start_new_session=True)
    return Process(name, popen, log)


def process_logs(procs: list[Process], tail: int = LOG_TAIL) -> str:
    """The end of each process's log, headed by its name, pid and exit status."""
    parts = []
    for proc in procs:
        text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
        parts.append(f"===== {proc.name} (pid {proc.popen.pid}, exit {proc.popen.poll()}) =====\n{text[-tail:]}")
    return "\n".join(parts)


@dataclass
class LoopbackDeployment:
    """``with LoopbackDeployment(root, split) as d: d.run(settings)``: started on entry, every process
    it started stopped on exit, their logs left in ``root/logs``."""

    root: Path
    split: Path
    sites: list[str] = field(default_factory=list)  # default: every site of the split
    threads_per_site: int | None = None
    procs: list[Process] = field(default_factory=list)
    link_port: int = 0

    def __enter__(self) -> "LoopbackDeployment":
        from fedlite.data.split import load_split

        self.root, self.split = Path(self.root).resolve(), Path(self.split).resolve()
        self.sites = self.sites or list(load_split(self.split).sites)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        self.procs.append(spawn(self.root, name, args, env))
        return self.procs[-1]

    def _start(self) -> None:
        ports = free_ports(len(self.sites) + 1)
        self.link_port = ports[0]
        link = self._spawn("superlink", [
            flower_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port),
            "--disable-runtime-dependency-installation"], flower_env(self.root / "flwr-superlink"))
        wait_for_port(self.link_port, link.popen, timeout=90)
        for site, port in zip(self.sites, ports[1:]):
            self._spawn(f"supernode-{site}", [
                flower_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                "--node-config", f'data-dir="{self.split / site}" cache-dir="{self.root / "cache" / site}"',
                "--host", "127.0.0.1", "--port", str(port),  # this SuperNode's ClientAppIo API
            ], flower_env(self.root / f"flwr-{site}", self.threads_per_site))
        cli = self.root / "flwr-cli"
        cli.mkdir(parents=True, exist_ok=True)
        (cli / "config.toml").write_text(  # what `flwr run . loopback` reads
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flower_executable("flwr"), *args], env=flower_env(self.root / "flwr-cli"),
                              cwd=self.root, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        return process_logs(self.procs)

    def _status(self, run_id: str) -> str:
        try:
            reply = json_in(self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=60).stdout)
            return str(reply["runs"][0]["status"])
        except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
            return ""

    def _failure(self, run_id: str, why: str) -> RuntimeError:
        try:
            server = self.flwr("log", run_id, CONNECTION, "--show", timeout=60)
            server_log = (server.stdout + server.stderr)[-2 * LOG_TAIL:]
        except subprocess.TimeoutExpired:
            server_log = "(flwr log timed out)"
        return RuntimeError(f"{why}\n===== ServerApp (flwr log {run_id}) =====\n{server_log}\n{self.logs()}")

    def run(self, settings: dict, out: Path, done: str = "summary.json", timeout: float = 3600.0) -> Path:
        """Submit fedlite's app with these run-config settings and wait until the run has written
        ``out/done``; raise with the ServerApp's and the processes' logs if it ends without it."""
        run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())  # TOML scalars
        submitted = self.flwr("run", str(project_dir()), CONNECTION, "--run-config", run_config, "--format", "json",
                              timeout=300)
        try:
            run_id = str(json_in(submitted.stdout)["run-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run failed ({submitted.returncode}):\n{submitted.stdout}\n{submitted.stderr}\n"
                               f"{self.logs()}") from None
        target, link = Path(out) / done, self.procs[0].popen
        deadline, next_check = time.monotonic() + timeout, time.monotonic() + STATUS_EVERY
        while time.monotonic() < deadline:
            if target.is_file():
                return target
            if link.poll() is not None:
                raise self._failure(run_id, f"the SuperLink exited with {link.returncode}")
            if time.monotonic() > next_check:
                status = self._status(run_id)
                if status.startswith("finished"):
                    time.sleep(2)  # the ServerApp writes its output before it reports back
                    if target.is_file():
                        return target
                    raise self._failure(run_id, f"run {run_id} {status} without writing {target}")
                next_check = time.monotonic() + STATUS_EVERY
            time.sleep(1.0)
        raise self._failure(run_id, f"run {run_id} wrote no {target} within {timeout:.0f} s")

    def stop(self) -> None:
        for proc in reversed(self.procs):  # SuperNodes first, the SuperLink last
            stop_process_tree(proc.popen)
