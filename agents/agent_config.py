"""The hospital agent's configuration: one TOML file that ``fedlite agent install`` writes
(``config_toml``), ``fedlite agent check`` validates and ``fedlite agent run`` reads.

Every value is validated when the file is read, and every problem is reported at once with the
file and the field (``agent.toml: field 'superlink.address': ...``), so a sysadmin fixes the file
in one pass. Unknown keys are errors: a misspelt ``memory_max`` must not silently leave the agent
without a memory limit. Relative paths are taken relative to the file's directory.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from fedlite.agents.config_values import convert, parse_memory
from fedlite.errors import InputError, Problem

DEFAULT_CONFIG_PATH = Path("/etc/fedlite/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/fedlite")
DEFAULT_CACHE_DIR = DEFAULT_STATE_DIR / "cache"
DEFAULT_CLIENTAPPIO_PORT = 9094
DEFAULT_MEMORY_MAX = "4G"
AUTO_THREADS_CAP = 4  # the bundle runtime's own default: min(4, cores)


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
                parsed[name] = convert(spec.metadata["kind"], values[name], base)
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
