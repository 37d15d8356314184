"""`fedlite agent check`: a healthy site passes against a real TLS SuperLink; every problem of a broken
one is reported in one run, and an unreachable SuperLink is told apart from a TLS misconfiguration."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from fedlite.agents.agent_config import AgentConfig, NodeSettings, ResourceSettings, SiteSettings, SuperLinkSettings
from fedlite.agents.check import FAIL, OK, WARN, run_checks
from fedlite.agents.config_toml import render_agent_config
from fedlite.agents.superlink_probe import CONNECTED, TLS_FAILED, UNREACHABLE, probe_superlink
from fedlite.cli import main
from fedlite.export.bundle import seal_bundle
from certificates import make_certificates

BIN = Path(sys.executable).parent
needs_flower = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                  reason="Flower's executables are not installed beside this Python")


# ---------------------------------------------------------------------------------------- helpers


def make_bundle(directory: Path, quantization: dict | None = None) -> Path:
    """A sealed bundle: what verification reads (graph contents do not matter to the check)."""
    directory.mkdir(parents=True)
    graphs = {}
    for name in ("image_encoder", "text_encoder", "head"):
        (directory / f"{name}.onnx").write_bytes(bytes(range(256)) * 8)
        graphs[name] = {"file": f"{name}.onnx"}
    (directory / "tokenizer.json").write_text('{"model": {}}')
    seal_bundle(directory, {"bundle_version": 1, "preset": "tiny", "graphs": graphs, "tokenizer": "tokenizer.json",
                            "preprocessing": {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3,
                                              "max_length": 128}, "quantization": quantization})
    return directory


def make_site(root: Path, address: str, root_certificate: Path | None, insecure: bool = False,
              memory_max: str = "2G", node_key: bool = True) -> Path:
    """A site with a bundle, a dataset and its output directories, and (unless insecure or not
    ``node_key``) its node key pair; returns its agent.toml."""
    from fedlite.agents.node_identity import generate_node_key_pair
    from fedlite.data.synth import synthesize

    synthesize(root / "data", n_cases=6, seed=1, workers=1, progress=False)
    for name in ("reports", "cache"):
        (root / name).mkdir()
    config = AgentConfig(
        superlink=SuperLinkSettings(address=address, root_certificate=root_certificate, insecure=insecure),
        site=SiteSettings(bundle=make_bundle(root / "bundle"), data_dir=root / "data", report_dir=root / "reports",
                          cache_dir=root / "cache"),
        resources=ResourceSettings(threads=1, memory_max=memory_max))
    if node_key and not insecure:
        identity = generate_node_key_pair(root / "node_key")
        config = replace(config, node=NodeSettings(private_key=identity.private_key,
                                                   public_key=root / "node_key.pub"))
    path = root / "agent.toml"
    path.write_text(render_agent_config(config), encoding="utf-8")
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (the kernel's pick, released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """Flower's processes: own state directory, no telemetry, this environment's executables first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "FLWR_HOME": str(home),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"})
    return env


def stop_by_pid(popen: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process and everything it started, SIGKILL what is left after ``grace`` seconds."""
    import psutil

    try:
        family = [psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for proc in family:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=5)


@contextlib.contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS endpoint on 127.0.0.1 presenting ``cert``: completes handshakes, then hangs up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            with contextlib.suppress(OSError, ssl.SSLError):
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True):
                    pass
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


@contextlib.contextmanager
def tls_superlink(root: Path, certs: dict[str, Path], timeout: float = 60.0) -> Iterator[int]:
    """A real ``flower-superlink`` serving TLS on a loopback port; stopped by PID afterwards."""
    port = closed_port()
    with (root / "superlink.log").open("wb") as log:
        popen = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
             "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=flower_env(root / "flwr-superlink"),
            cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert popen.poll() is None, (root / "superlink.log").read_text(errors="replace")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, f"flower-superlink did not listen within {timeout:.0f} s"
            time.sleep(0.1)
        yield port
    finally:
        stop_by_pid(popen)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """A CA that did not sign the server's certificate."""
    return make_certificates(tmp_path_factory.mktemp("other-ca"), ca_name="another CA")["ca"]


def by_name(items) -> dict:
    return {item.name: item for item in items}


# ------------------------------------------------------------------------------------------ tests


@needs_flower
def test_healthy_site_passes_against_a_real_tls_superlink(tmp_path, certs):
    with tls_superlink(tmp_path, certs) as port:
        config = make_site(tmp_path, f"127.0.0.1:{port}", certs["ca"])
        result = CliRunner().invoke(main, ["agent", "check", "--config", str(config)])
        as_json = CliRunner().invoke(main, ["agent", "check", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert f"✓ superlink: 127.0.0.1:{port}: connected" in result.output
    assert "certificate verified for 127.0.0.1" in result.output
    for name in ("config", "root certificate", "bundle", "data", "report_dir", "cache_dir", "memory"):
        assert f"✓ {name}:" in result.output, result.output
    report = json.loads(as_json.output)
    assert as_json.exit_code == 0 and report["ok"] is True
    assert all(check["status"] != FAIL for check in report["checks"])


def test_every_problem_is_reported_in_one_run(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", tmp_path / "missing-ca.crt")
    victim = tmp_path / "bundle" / "head.onnx"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / "data" / "manifest.jsonl").unlink()

    result = CliRunner().invoke(main, ["agent", "check", "--config", str(config), "--json", "--timeout", "2"])
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    assert checks["root certificate"]["status"] == FAIL
    assert "not found" in checks["root certificate"]["detail"]
    assert "field 'superlink.root_certificate'" in checks["root certificate"]["problems"][0]
    assert checks["bundle"]["status"] == FAIL
    assert any(str(victim) in p and "tampered" in p for p in checks["bundle"]["problems"])
    assert checks["data"]["status"] == FAIL and "no manifest.jsonl" in " ".join(checks["data"]["problems"])
    assert checks["superlink"]["status"] == FAIL
    assert checks["superlink"]["detail"].startswith("cannot reach") and "refused" in checks["superlink"]["detail"]
    assert checks["memory"]["status"] == OK


def test_missing_data_dir_and_missing_images_are_reported(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, insecure=True)
    images = sorted((tmp_path / "data" / "images").iterdir())
    images[0].unlink()
    item = by_name(run_checks(config, probe_timeout=2))["data"]
    assert item.status == FAIL and "image file not found" in item.problems[0] and "manifest.jsonl:" in item.problems[0]

    import shutil

    shutil.rmtree(tmp_path / "data")
    item = by_name(run_checks(config, probe_timeout=2))["data"]
    assert item.status == FAIL and "dataset directory not found" in item.problems[0]


def test_unreachable_superlink_is_not_a_tls_problem():
    probe = probe_superlink(f"127.0.0.1:{closed_port()}", None, timeout=2)
    assert probe.outcome == UNREACHABLE and probe.detail == "connection refused"


def test_certificate_from_another_ca_is_a_tls_problem(tmp_path, certs, other_ca):
    with tls_server(certs["cert"], certs["key"]) as port:
        good = probe_superlink(f"127.0.0.1:{port}", certs["ca"], timeout=2)
        bad = probe_superlink(f"127.0.0.1:{port}", other_ca, timeout=2)
        config = make_site(tmp_path, f"127.0.0.1:{port}", other_ca)
        item = by_name(run_checks(config, probe_timeout=2))["superlink"]
    assert good.outcome == CONNECTED, good
    assert bad.outcome == TLS_FAILED
    assert bad.detail.startswith("TLS handshake failed: certificate verify failed")
    assert item.status == FAIL and item.detail.startswith("TLS problem with") and "cannot reach" not in item.detail


def test_a_file_that_is_no_certificate_is_reported(tmp_path):
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("hello\n")
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", not_pem)
    item = by_name(run_checks(config, probe_timeout=2))["root certificate"]
    assert item.status == FAIL and "not a PEM certificate" in item.detail


def test_server_certificate_given_as_root_is_flagged(tmp_path, certs):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", certs["cert"])
    item = by_name(run_checks(config, probe_timeout=2))["root certificate"]
    assert item.status == WARN and "no CA certificate" in item.problems[0]


def test_memory_limit_below_the_estimate_fails_and_above_the_machine_warns(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, insecure=True, memory_max="100M")
    item = by_name(run_checks(config, probe_timeout=2))["memory"]
    assert item.status == FAIL and "raise it to at least" in item.problems[0]
    assert "estimated need" in item.detail and "1.0 GiB" in item.detail

    config.write_text(config.read_text().replace('memory_max = "100M"', 'memory_max = "1000T"'))
    item = by_name(run_checks(config, probe_timeout=2))["memory"]
    assert item.status == WARN and "exceeds this machine" in item.problems[0]


def test_a_bundle_quantized_for_vnni_is_flagged_on_a_cpu_without_vnni(tmp_path, monkeypatch):
    import shutil

    from fedlite import cpu_features
    from fedlite.export.quantize import QuantSettings

    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, insecure=True)
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    for isa, flags, expected in [("avx512_vnni", {"avx2", "avx512f"}, WARN), ("avx512_vnni", {"avx2", "avx_vnni"}, OK),
                                 ("avx2", {"avx2", "avx512f"}, OK)]:
        shutil.rmtree(tmp_path / "bundle")
        make_bundle(tmp_path / "bundle", QuantSettings(mode="static", isa=isa).to_dict())
        monkeypatch.setattr(cpu_features, "cpu_info", lambda flags=flags: ("a Xeon", frozenset(flags)))
        item = by_name(run_checks(config, probe_timeout=2))["bundle"]
        assert item.status == expected, (isa, flags, item)
        if expected == WARN:
            assert "saturate" in item.problems[0] and "--isa avx2" in item.problems[0], item.problems


def test_insecure_is_flagged_loudly_and_only_tcp_is_probed(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        config = make_site(tmp_path, f"127.0.0.1:{listener.getsockname()[1]}", None, insecure=True)
        result = CliRunner().invoke(main, ["agent", "check", "--config", str(config)])
    assert "⚠ tls: INSECURE" in result.output
    assert "✓ superlink:" in result.output and "insecure" in result.output


def test_report_dir_that_is_a_file_and_a_bad_config_are_reported(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, insecure=True)
    (tmp_path / "reports").rmdir()
    (tmp_path / "reports").write_text("")
    assert by_name(run_checks(config, probe_timeout=2))["report_dir"].status == FAIL

    config.write_text(config.read_text().replace("threads = 1", "threads = 1\nthraeds = 2"))
    result = CliRunner().invoke(main, ["agent", "check", "--config", str(config)])
    assert result.exit_code == 1 and "✗ config" in result.output
    assert "field 'resources.thraeds': unknown key (did you mean 'threads'?)" in result.output


def test_node_keys_must_be_an_openssh_ec_pair(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def write_pair(name: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = tmp_path / name, tmp_path / f"{name}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
        return private, public

    (private, public), (_, other_public) = write_pair("node_key"), write_pair("other_key")
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None, node_key=False)
    text = config.read_text()

    config.write_text(text.replace("[node]", f'[node]\nprivate_key = "{private}"\npublic_key = "{public}"'))
    assert by_name(run_checks(config, probe_timeout=2))["node keys"].status == OK

    config.write_text(text.replace("[node]", f'[node]\nprivate_key = "{private}"\npublic_key = "{other_public}"'))
    item = by_name(run_checks(config, probe_timeout=2))["node keys"]
    assert item.status == FAIL and "is not the public key of" in item.problems[0]

    config.write_text(text.replace("[node]", f'[node]\nprivate_key = "{public}"'))
    item = by_name(run_checks(config, probe_timeout=2))["node keys"]
    assert item.status == FAIL and "field 'node.private_key'" in item.problems[0]


def test_without_a_node_key_check_fails_unless_insecure(tmp_path):
    config = make_site(tmp_path / "tls", f"127.0.0.1:{closed_port()}", None, node_key=False)
    result = CliRunner().invoke(main, ["agent", "check", "--config", str(config), "--timeout", "1"])
    assert result.exit_code == 1 and "✗ node keys: no usable node key pair" in result.output, result.output
    assert "field 'node.private_key': no node key" in result.output and "fedlite agent keygen" in result.output
    assert "flwr supernode register" in result.output

    lab = make_site(tmp_path / "lab", f"127.0.0.1:{closed_port()}", None, insecure=True)
    item_names = [item.name for item in run_checks(lab, probe_timeout=1)]
    assert "node keys" not in item_names and "tls" in item_names


def test_a_node_key_readable_by_others_is_flagged(tmp_path):
    config = make_site(tmp_path, f"127.0.0.1:{closed_port()}", None)
    (tmp_path / "node_key").chmod(0o640)
    item = by_name(run_checks(config, probe_timeout=1))["node keys"]
    assert item.status == WARN and "readable by other users" in item.problems[0] and "chmod 600" in item.problems[0]
