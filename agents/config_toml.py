"""The agent's configuration written out: ``agent.toml`` as ``fedlite agent install`` writes it, and
the ``--node-config`` string the SuperNode is started with (TOML values, as Flower parses them).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from fedlite.agents.agent_config import SECTIONS, AgentConfig
from fedlite.agents.config_values import has_control
from fedlite.errors import InputError


def render_node_config(node_config: dict[str, str | int | float | bool]) -> str:
    """``--node-config`` as Flower parses it: space-separated ``key=value`` with TOML values.

    Flower splits the string with a regular expression that ends a quoted value at the first quote
    of its kind, so a string is written as a basic string ``"..."`` when it holds no ``"`` or
    backslash, else as a literal string ``'...'``; a value holding both cannot be passed.
    """
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif not any(c in value for c in '"\\') and not has_control(value):
            text = f'"{value}"'
        elif "'" not in value and not has_control(value):
            text = f"'{value}'"
        else:
            raise InputError(f"node config value {value!r} cannot be passed to Flower", field=key,
                             hint="rename the path so it holds no quotes, backslashes or control characters")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def toml_string(text: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for c in text:
        if c in escapes:
            out.append(escapes[c])
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(str(value))


_COMMENTS = {
    "superlink": "The federation's coordinator. root_certificate verifies its TLS certificate.",
    "node": "private_key/public_key: this hospital's OpenSSH EC key pair ('fedlite agent keygen'); the SuperLink\n"
            "admits the node once the coordinator registered public_key (flwr supernode register).\n"
            "clientappio_port: this agent's local Runtime API port (127.0.0.1); distinct per agent on a host.",
    "site": "Read only: bundle, data_dir. Written: report_dir (explanations), cache_dir (embeddings).\n"
            "bundle_public_key: only bundles signed by this key's holder are used (predict, explain, fine-tuning).",
    "resources": "threads: 0 = automatic (up to 4). memory_max: systemd MemoryMax (\"6G\", \"512M\").",
    "policy": "Floors the coordinator cannot lower. require_dp: train only with DP-SGD.\n"
              "min_report_cases: send nothing that sums fewer cases (0: no floor).",
}


def render_agent_config(config: AgentConfig) -> str:
    """The TOML text of ``config``; reading it back gives an equal config (unset optional paths are
    left out)."""
    lines = ["# fedlite hospital agent. Check with: fedlite agent check --config THIS_FILE", ""]
    for table in SECTIONS:
        section = getattr(config, table)
        lines += [f"# {c}" for c in _COMMENTS[table].splitlines()]
        lines.append(f"[{table}]")
        for spec in fields(section):
            value = getattr(section, spec.name)
            if value is not None:
                lines.append(f"{spec.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
