"""The hospital agent's configuration: one TOML file that ``fedlite agent install`` writes,
``fedlite agent check`` validates and ``fedlite agent run`` reads.

Every value is validated when the file is read, and every problem is reported at once with the
file and the field (``agent.toml: field 'superlink.address': ...``), so a sysadmin fixes the file
in one pass. Unknown keys are errors: a misspelt ``memory_max`` must not silently leave the agent
without a memory limit. Relative paths are taken relative to the file's directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from fedlite.errors import InputError, Problem

DEFAULT_CONFIG_PATH = Path("/etc/fedlite/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/fedlite")
DEFAULT_CACHE_DIR = DEFAULT_STATE_DIR / "cache"
DEFAULT_CLIENTAPPIO_PORT = 9094
DEFAULT_MEMORY_MAX = "4G"
AUTO_THREADS_CAP = 4  # the bundle runtime's own default: min(4, cores)

_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # systemd's, base 1024
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$", re.IGNORECASE)
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                          r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


# ----------------------------------------------------------------------------------- value checks


def parse_memory(text: str) -> int:
    """Bytes in a systemd-style size ("6G", "512M", "1.5G", "1073741824"); suffixes are base 1024."""
    match = _MEMORY_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a memory size")
    value = float(match.group(1)) * _MEMORY_UNITS[match.group(2).upper()]
    if value < 1 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a positive memory size")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (a name, an IPv4 address or a bracketed IPv6 address) -> (host, port)."""
    if "://" in address:
        raise ValueError(f"{address!r} has a URL scheme; give host:port only")
    if address.startswith("["):
        host, sep, port_text = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"{address!r} is not [IPv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{address!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::1]:9093")
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is not a host name or IP address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def _as_address(value: Any) -> str:
    text = _as_text(value)
    parse_address(text)
    return text


def _as_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    if _has_control(value):
        raise ValueError("must not contain control characters (newlines, tabs, ...)")
    return value


def _as_path(value: Any, base: Path) -> Path:
    path = Path(os.path.expanduser(_as_text(value)))
    return path if path.is_absolute() else base / path


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _as_int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer in {low}..{high}, got {value!r}")
        return value
    return check


def _as_memory(value: Any) -> str:
    text = _as_text(value).strip()
    parse_memory(text)
    return text[:-1] + text[-1].upper() if text[-1].isalpha() else text


# ------------------------------------------------------------------------------------------ model


def _setting(kind: str, hint: str | None = None, **kwargs) -> Any:
    return field(metadata={"kind": kind, "hint": hint}, **kwargs)


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where the federation's coordinator is and how its TLS certificate is verified."""

    address: str = _setting("address", 'host:port, e.g. "coordinator.example.org:9093"')
    root_certificate: Path | None = _setting("path", "the PEM file of the CA that signed the SuperLink's "
                                             "certificate; leave out to use the system's CAs", default=None)
    insecure: bool = _setting("bool", "true only in tests and labs: no TLS at all", default=False)


@dataclass(frozen=True)
class NodeSettings:
    """This SuperNode's identity (Flower node authentication) and its local Runtime API port.

    Flower derives the public key from the private key; ``public_key`` is kept so ``agent check``
    can confirm that the pair registered at the coordinator is the pair this node uses.
    """

    private_key: Path | None = _setting("path", "an EC private key in OpenSSH format ('fedlite agent keygen'); "
                                        "required unless superlink.insecure", default=None)
    public_key: Path | None = _setting("path", "the matching OpenSSH public key", default=None)
    clientappio_port: int = _setting("port", "distinct per agent on one host", default=DEFAULT_CLIENTAPPIO_PORT)


@dataclass(frozen=True)
class SiteSettings:
    """This hospital's bundle, cases and outputs."""

    bundle: Path = _setting("path", "a bundle directory from 'fedlite export'")
    data_dir: Path = _setting("path", "a dataset directory with manifest.jsonl")
    report_dir: Path = _setting("path", "where explanations are written")
    cache_dir: Path = _setting("path", "embedding cache", default=DEFAULT_CACHE_DIR)
    bundle_public_key: Path | None = _setting("path", "the consortium's Ed25519 public key (PEM): only bundles "
                                              "signed with its private key are used", default=None)


@dataclass(frozen=True)
class ResourceSettings:
    """What the agent may take from a shared hospital server."""

    threads: int = _setting("threads", "0 = automatic (up to 4)", default=0)
    memory_max: str = _setting("memory", 'like "6G" or "512M"', default=DEFAULT_MEMORY_MAX)

    @property
    def memory_max_bytes(self) -> int:
        return parse_memory(self.memory_max)


@dataclass(frozen=True)
class PolicySettings:
    """Floors this hospital sets on what it does for the federation; the coordinator cannot lower them."""

    require_dp: bool = _setting("bool", "true: train only with DP-SGD", default=False)
    min_report_cases: int = _setting("cases", "no reply that sums fewer cases (0: no floor)", default=0)


SECTIONS: dict[str, type] = {"superlink": SuperLinkSettings, "node": NodeSettings, "site": SiteSettings,
                             "resources": ResourceSettings, "policy": PolicySettings}


@dataclass(frozen=True)
class AgentConfig:
    superlink: SuperLinkSettings
    site: SiteSettings
    node: NodeSettings = NodeSettings()
    resources: ResourceSettings = ResourceSettings()
    policy: PolicySettings = PolicySettings()

    @property
    def effective_threads(self) -> int:
        """``threads``, or with 0 the CPUs this process may use, at most 4 (the bundle runtime's default)."""
        if self.resources.threads:
            return self.resources.threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return min(AUTO_THREADS_CAP, cpus or 1)

    def node_config(self) -> dict[str, str | int]:
        """What the agent's ClientApp reads from ``context.node_config`` (keys fixed by that contract);
        ``threads`` is resolved, so the ClientApp uses exactly the threads the environment allows."""
        return {"data-dir": str(self.site.data_dir), "bundle": str(self.site.bundle),
                "cache-dir": str(self.site.cache_dir), "report-dir": str(self.site.report_dir),
                "threads": self.effective_threads, "require-dp": self.policy.require_dp,
                "bundle-public-key": str(self.site.bundle_public_key or ""),
                "min-report-cases": self.policy.min_report_cases}


def thread_environment(threads: int) -> dict[str, str]:
    """Thread limits every numeric library in the agent obeys, so it keeps to its share of the server."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "TOKENIZERS_PARALLELISM": "false"}


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
        elif not any(c in value for c in '"\\') and not _has_control(value):
            text = f'"{value}"'
        elif "'" not in value and not _has_control(value):
            text = f"'{value}'"
        else:
            raise InputError(f"node config value {value!r} cannot be passed to Flower", field=key,
                             hint="rename the path so it holds no quotes, backslashes or control characters")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# ---------------------------------------------------------------------------------- read / build


def config_from_mapping(raw: dict, source: Path) -> AgentConfig:
    """Validate a parsed TOML document; raises InputError naming ``source`` and each bad field."""
    problems: list[Problem] = []
    base = source.absolute().parent

    def problem(name: str, message: str, hint: str | None = None) -> None:
        problems.append(Problem(message, path=source, field=name, hint=hint))

    for table in raw:
        if table not in SECTIONS:
            problem(table, "unknown table", _did_you_mean(table, SECTIONS) or f"tables: {', '.join(SECTIONS)}")
    sections, given = {}, {}
    for table, cls in SECTIONS.items():
        values = raw.get(table, {})
        if not isinstance(values, dict):
            problem(table, f"must be a table [{table}], got {type(values).__name__}")
            values = {}
        known = {f.name: f for f in fields(cls)}
        for key in values:
            if key not in known:
                problem(f"{table}.{key}", "unknown key", _did_you_mean(key, known) or f"keys: {', '.join(known)}")
        parsed = {}
        for name, spec in known.items():
            dotted = f"{table}.{name}"
            if name not in values:
                if spec.default is MISSING and spec.default_factory is MISSING:
                    problem(dotted, "missing", spec.metadata["hint"])
                continue
            try:
                parsed[name] = _convert(spec.metadata["kind"], values[name], base)
            except ValueError as exc:
                problem(dotted, str(exc), spec.metadata["hint"])
        sections[table], given[table] = parsed, set(values)
    link, node = sections["superlink"], sections["node"]  # the values that passed their own checks
    if link.get("insecure") and link.get("root_certificate") is not None:
        problem("superlink.insecure", "insecure = true turns TLS off, yet root_certificate is set",
                "remove one of them")
    if link.get("insecure") and node.get("private_key") is not None:
        problem("node.private_key", "node authentication needs TLS, but insecure = true",
                "set insecure = false (and root_certificate)")
    if "public_key" in node and "private_key" not in given["node"]:
        problem("node.public_key", "set without node.private_key", "add private_key or remove public_key")
    if problems:
        raise InputError(problems)
    return AgentConfig(superlink=SuperLinkSettings(**sections["superlink"]), site=SiteSettings(**sections["site"]),
                       node=NodeSettings(**sections["node"]), resources=ResourceSettings(**sections["resources"]),
                       policy=PolicySettings(**sections["policy"]))


def _convert(kind: str, value: Any, base: Path) -> Any:
    converters: dict[str, Callable[[Any], Any]] = {
        "address": _as_address, "path": lambda v: _as_path(v, base), "bool": _as_bool,
        "port": _as_int(1, 65535), "threads": _as_int(0, 1024), "memory": _as_memory,
        "cases": _as_int(0, 10_000_000),
    }
    return converters[kind](value)


def _did_you_mean(name: str, choices) -> str | None:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else None


def read_agent_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError("agent config not found", path=path,
                         hint="write one with 'fedlite agent install' or pass --config PATH")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise InputError(f"not valid TOML: {exc}", path=path, line=int(line.group(1)) if line else None) from None
    return config_from_mapping(raw, path)


# ----------------------------------------------------------------------------------------- render


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
