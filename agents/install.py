"""``fedlite agent install``: the agent's config file and a hardened systemd unit that runs
``fedlite agent run`` as an unprivileged user.

The unit lets the agent read its bundle and cases, write only its reports and cache, and take
no more memory than configured; a configuration or TLS error stops it for good (restarting
cannot fix a wrong certificate) while a crash is restarted, with a start limit so nothing loops.
Rendering is pure: tests and ``--dry-run`` see exactly the bytes that would be installed.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from fedlite.agents.agent_config import (DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, AgentConfig, config_from_mapping,
                                         thread_environment)
from fedlite.agents.config_toml import render_agent_config
from fedlite.agents.node_identity import (REGISTER_HINT, default_public_key, load_node_identity,
                                          missing_identity_problem)
from fedlite.agents.supernode import EXIT_CONFIG
from fedlite.atomic import atomic_write_text
from fedlite.errors import InputError, Problem

UNIT_NAME = "fedlite-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_USER = "fedlite"
# Where `ProtectHome=yes` makes everything inaccessible to the service.
HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")


@dataclass(frozen=True)
class InstallPlan:
    """What ``install`` writes: the files' final paths (what the service sees), where they are written
    (the same, or under ``--prefix``) and their contents."""

    config_path: Path
    unit_path: Path
    config_write_path: Path
    unit_write_path: Path
    config_text: str
    unit_text: str
    config: AgentConfig
    user: str
    executable: Path


# The install option that sets each config field, so an error names what the user typed.
OPTIONS = {"superlink.address": "--superlink", "superlink.root_certificate": "--root-certificate",
           "superlink.insecure": "--insecure", "node.private_key": "--private-key", "node.public_key": "--public-key",
           "node.clientappio_port": "--clientappio-port", "site.bundle": "--bundle", "site.data_dir": "--data-dir",
           "site.report_dir": "--report-dir", "site.cache_dir": "--cache-dir", "resources.threads": "--threads",
           "resources.memory_max": "--memory-max"}


def config_from_options(values: dict[str, object], config_path: Path) -> AgentConfig:
    """The config from install options keyed by dotted field (``"site.bundle"``); paths made absolute
    against the working directory; unset (None) values take their defaults. Errors name the option."""
    raw: dict[str, dict] = {}
    for dotted, value in values.items():
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value.expanduser().absolute())
        table, key = dotted.split(".")
        raw.setdefault(table, {})[key] = value
    try:
        return config_from_mapping(raw, config_path)
    except InputError as exc:
        raise InputError([Problem(p.message, field=_option_field(p.field), hint=p.hint)
                          for p in exc.problems]) from None


def _option_field(dotted: str | None) -> str | None:
    return f"{OPTIONS[dotted]} ({dotted})" if dotted in OPTIONS else dotted


def default_executable() -> Path:
    """The ``fedlite`` script beside the running interpreter: the unit runs the same installation.
    Not resolved: a virtualenv's python is a symlink out of the virtualenv."""
    return Path(sys.executable).absolute().parent / "fedlite"


def check_user(user: str) -> str:
    if not _USER_RE.match(user):
        raise InputError(f"{user!r} is not a valid system user name", field="--user",
                         hint="lowercase letters, digits, '_' and '-', starting with a letter or '_'")
    return user


def unit_word(text: str, command: bool = False) -> str:
    """One word of a unit file line: '%' doubled (systemd specifiers), '$' doubled in a command line
    (``command``: systemd expands variables there), quoted when it holds blanks. A control character
    (a newline would start a new directive) is refused."""
    text = str(text)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"{text!r} holds a control character and cannot go into a systemd unit",
                         hint="rename the path")
    text = text.replace("%", "%%")
    if command:
        text = text.replace("$", "$$")
    if re.search(r"[\s\"'\\;]", text) or not text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _under(path: Path, trees: tuple[Path, ...]) -> bool:
    return any(path == tree or tree in path.parents for tree in trees)


def render_unit(config: AgentConfig, *, config_path: Path, executable: Path, user: str = DEFAULT_USER) -> str:
    site = config.site
    read_write = [site.report_dir, site.cache_dir]
    read_only = [site.data_dir, site.bundle]
    used = [*read_write, *read_only, config_path, executable,
            *(p for p in (config.superlink.root_certificate, config.node.private_key) if p is not None)]
    in_home = [p for p in used if _under(p, HOME_TREES)]
    exec_start = " ".join(unit_word(w, command=True) for w in (executable, "agent", "run", "--config", config_path))
    lines = [
        "# fedlite hospital agent: a Flower SuperNode that keeps this site's cases on this server and",
        f"# connects out to the SuperLink {config.superlink.address}.",
        f"# Written by 'fedlite agent install'; settings in {config_path}",
        f"# (check them with 'fedlite agent check --config {config_path}').",
        f"# Local changes: 'systemctl edit {UNIT_NAME}' keeps them when the agent is reinstalled.",
        "",
        "[Unit]",
        f"Description=fedlite hospital agent (Flower SuperNode for {config.superlink.address})",
        "After=network-online.target",
        "Wants=network-online.target",
        "# A crash is restarted at most 5 times in 10 minutes, then systemd gives up.",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Group={user}",
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=10",
        f"# {EXIT_CONFIG}: a configuration or TLS error; restarting cannot fix it. An unreachable SuperLink",
        "# is retried inside the agent with backoff.",
        f"RestartPreventExitStatus={EXIT_CONFIG}",
        "# SIGTERM goes to the agent, which stops its SuperNode; whatever is left is killed after 30 s.",
        "KillMode=mixed",
        "TimeoutStopSec=30",
        "SyslogIdentifier=fedlite-agent",
        f"StateDirectory={DEFAULT_STATE_DIR.name}",
        f"Environment={unit_word('HOME=' + str(DEFAULT_STATE_DIR))}",
    ]
    if config.resources.threads:
        lines.append("Environment=" + " ".join(unit_word(f"{k}={v}")
                                                for k, v in thread_environment(config.resources.threads).items()))
    else:
        lines.append("# threads = 0: 'agent run' sets OMP_NUM_THREADS and friends to min(4, CPUs) itself.")
    lines += [
        "# Reports hold patient-level explanations: not readable by other users.",
        "UMask=0027",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ]
    if in_home:
        lines += ["# read-only, not yes: the agent uses paths under a home directory: "
                  + ", ".join(str(p) for p in in_home),
                  "ProtectHome=read-only"]
    else:
        lines.append("ProtectHome=yes")
    lines += [
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "ReadWritePaths=" + " ".join(unit_word(p) for p in read_write),
        "ReadOnlyPaths=" + " ".join(unit_word(p) for p in read_only),
        f"MemoryMax={config.resources.memory_max}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def staged_path(path: Path, prefix: Path | None) -> Path:
    """``path`` under ``prefix`` taken as the root (staging an image or package), else ``path``."""
    if prefix is None:
        return path
    return prefix.expanduser().absolute() / path.relative_to(path.anchor)


def install_identity(config: AgentConfig, prefix: Path | None = None) -> AgentConfig:
    """The config with its node key pair checked: required unless ``--insecure``; the public key
    defaults to the private key's ``.pub`` beside it. Under ``prefix`` a key staged there is read,
    else the one at the path given."""
    node = config.node
    if config.superlink.insecure:
        return config
    field = _option_field("node.private_key")
    if node.private_key is None:
        raise InputError(missing_identity_problem(None, field=field))
    private = _existing(node.private_key, prefix)
    public = node.public_key
    if public is None and _existing(default_public_key(node.private_key), prefix).is_file():
        public = default_public_key(node.private_key)
    load_node_identity(private, _existing(public, prefix) if public is not None else None, field=field)
    return replace(config, node=replace(node, public_key=public))


def _existing(path: Path, prefix: Path | None) -> Path:
    staged = staged_path(path, prefix)
    return staged if staged.exists() else path


def plan_install(config: AgentConfig, *, config_path: Path = DEFAULT_CONFIG_PATH, prefix: Path | None = None,
                 executable: Path | None = None, user: str = DEFAULT_USER) -> InstallPlan:
    config_path = Path(config_path).absolute()
    executable = executable or default_executable()
    unit_path = UNIT_DIR / UNIT_NAME
    return InstallPlan(
        config_path=config_path, unit_path=unit_path,
        config_write_path=staged_path(config_path, prefix), unit_write_path=staged_path(unit_path, prefix),
        config_text=render_agent_config(config),
        unit_text=render_unit(config, config_path=config_path, executable=executable, user=check_user(user)),
        config=config, user=user, executable=executable)


def write_install(plan: InstallPlan, force: bool = False) -> None:
    """Write both files atomically; nothing is replaced without ``force``, nothing is written if either
    file would be refused."""
    existing = [p for p in (plan.config_write_path, plan.unit_write_path) if p.exists()]
    if existing and not force:
        raise InputError([Problem("already exists", path=p, hint="pass --force to replace it") for p in existing])
    for path, text in ((plan.config_write_path, plan.config_text), (plan.unit_write_path, plan.unit_text)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        except PermissionError:
            raise InputError("permission denied", path=path,
                             hint="run as root, or pass --prefix DIR to write under DIR") from None


def follow_up_commands(plan: InstallPlan) -> list[str]:
    """What a sysadmin runs next, in order."""
    site, user = plan.config.site, plan.user
    dirs = " ".join(shlex.quote(str(p)) for p in (site.report_dir, site.cache_dir))
    config = shlex.quote(str(plan.config_path))
    node = plan.config.node
    identity = [] if node.private_key is None else [
        f"chown {user}: {shlex.quote(str(node.private_key))} && chmod 0600 {shlex.quote(str(node.private_key))}",
        f"# send {node.public_key or 'the public key'} to the coordinator; {REGISTER_HINT}"]
    return [
        f"useradd --system --user-group --home-dir {DEFAULT_STATE_DIR} --no-create-home "
        f"--shell /usr/sbin/nologin {user}",
        f"install -d -o {user} -g {user} -m 0750 {dirs}",
        *identity,
        f"# make sure {user} can read {site.data_dir} and {site.bundle}",
        f"sudo -u {user} {shlex.quote(str(plan.executable))} agent check --config {config}",
        "systemctl daemon-reload",
        f"systemctl enable --now {UNIT_NAME}",
        f"journalctl -u {UNIT_NAME} -f",
    ]
