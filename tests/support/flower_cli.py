"""The Flower CLI against a test SuperLink: the connection file `flwr` reads, and registering a
hospital's node key (what a coordinator does before that hospital's SuperNode can join)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
CONNECTION = "hospitals"


def write_connection(home: Path, address: str, root_certificate: Path) -> Path:
    """``$FLWR_HOME/config.toml`` with one TLS connection, ``hospitals``, as the default."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{root_certificate}"\n')
    return home


def cli_env(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def register_node_key(home: Path, public_key: Path, name: str) -> int:
    """``flwr supernode register``; returns the node id the SuperLink gave the key."""
    result = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), CONNECTION, "--name", name,
                             "--format", "json"], env=cli_env(home), capture_output=True, text=True, timeout=120)
    start = result.stdout.find("{")
    reply = json.JSONDecoder().raw_decode(result.stdout[start:])[0] if start >= 0 else {}
    assert result.returncode == 0 and reply.get("success"), f"register failed:\n{result.stdout}\n{result.stderr}"
    return int(reply["node-id"])
