"""``fedlite agent check``: everything the agent needs, checked before systemd finds out.

Every check runs and every problem is reported, each naming what is wrong, where, and what fixes
it, so one run of ``check`` gives a sysadmin the whole list. Run it as the agent's user: file
permissions are part of what is checked.
"""

from __future__ import annotations

import datetime as dt
import errno
import getpass
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedlite.agents.agent_config import AgentConfig, read_agent_config
from fedlite.agents.config_values import format_bytes
from fedlite.agents.node_identity import require_node_identity
from fedlite.agents.superlink_probe import CONNECTED, UNREACHABLE, probe_config
from fedlite.cpu_features import bundle_saturates_here
from fedlite.errors import InputError, Problem

OK, WARN, FAIL = "ok", "warn", "fail"
MARKS = {OK: "✓", WARN: "⚠", FAIL: "✗"}
# What the agent needs at its busiest (embedding a site's cases, training a round, explaining), as
# `fedlite bench` measures it: about 1 GiB for Python with torch, onnxruntime, shap and Flower, plus
# about twenty times the bundle's size on disk for its graphs' weights, ONNX Runtime's arena and the
# activations of batched encoder runs (1.07 GB for a 0.9 MB bundle, 1.38 GB for 16.5 MB, 1.73 GB
# for 36 MB).
PROCESS_BYTES = 2**30
BUNDLE_FACTOR = 20
CERT_EXPIRY_WARNING = dt.timedelta(days=30)
MAX_LISTED = 20  # problems listed per check; the rest are counted


@dataclass
class CheckItem:
    name: str
    status: str
    detail: str
    problems: list[str] = field(default_factory=list)  # each: where, what, and what fixes it


def run_checks(config_path: str | Path, probe_timeout: float = 5.0) -> list[CheckItem]:
    """Every check of the agent configured in ``config_path``, in the order a sysadmin fixes them."""
    config_path = Path(config_path)
    try:
        config = read_agent_config(config_path)
    except InputError as exc:
        return [CheckItem("config", FAIL, f"{config_path} is not a usable agent config",
                          [str(p) for p in exc.problems])]
    items = [CheckItem("config", OK, f"{config_path} parses and validates")]
    if config.superlink.insecure:
        items.append(CheckItem("tls", WARN, "INSECURE: insecure = true turns TLS off; traffic to the SuperLink is "
                                            "not encrypted and the SuperLink is not authenticated",
                               [str(Problem("for tests and labs only", path=config_path, field="superlink.insecure",
                                            hint="set it to false and give root_certificate"))]))
    checks = []
    if not config.superlink.insecure:
        checks.append(("root certificate", lambda: check_root_certificate(config, config_path)))
        checks.append(("node keys", lambda: check_node_keys(config, config_path)))
    checks += [
        ("bundle", lambda: check_bundle(config)),
        ("data", lambda: check_data(config)),
        ("report_dir", lambda: check_writable("report_dir", config.site.report_dir, config_path)),
        ("cache_dir", lambda: check_writable("cache_dir", config.site.cache_dir, config_path)),
        ("memory", lambda: check_memory(config, config_path)),
        ("clientappio port", lambda: check_clientappio_port(config, config_path)),
        ("superlink", lambda: check_superlink(config, probe_timeout)),
    ]
    for name, check in checks:
        try:
            items.append(check())
        except OSError as exc:  # an unreadable file or directory must not hide the other checks
            where = f": {exc.filename}" if exc.filename else ""
            items.append(CheckItem(name, FAIL, f"cannot check{where}: {exc.strerror or exc}",
                                   [f"make it accessible to user {current_user()}"]))
    return items


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


def _item(name: str, detail: str, problems: list[tuple[str, str]]) -> CheckItem:
    """An item from (status, problem) pairs: the worst status wins."""
    if not problems:
        return CheckItem(name, OK, detail)
    status = FAIL if any(s == FAIL for s, _ in problems) else WARN
    return CheckItem(name, status, detail, [p for _, p in problems])


def _limited(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_LISTED:
        return lines
    return lines[:MAX_LISTED] + [f"... and {len(lines) - MAX_LISTED} more"]


# ---------------------------------------------------------------------------------------- TLS, keys


def check_root_certificate(config: AgentConfig, config_path: Path) -> CheckItem:
    from cryptography import x509

    path = config.superlink.root_certificate
    if path is None:
        return CheckItem("root certificate", OK, "not set: the SuperLink's certificate is verified against "
                                                 "this system's CAs")
    where = dict(path=config_path, field="superlink.root_certificate")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return CheckItem("root certificate", FAIL, f"{path} not found",
                         [str(Problem(f"file not found: {path}", **where,
                                      hint="copy the federation's CA certificate (ca.crt) here"))])
    except OSError as exc:
        return CheckItem("root certificate", FAIL, f"{path} cannot be read",
                         [str(Problem(f"cannot read {path}: {exc.strerror}", **where,
                                      hint=f"make it readable by user {current_user()}"))])
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return CheckItem("root certificate", FAIL, f"{path} is not a PEM certificate",
                         [str(Problem(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", **where,
                                      hint="give the CA certificate in PEM format"))])
    now = dt.datetime.now(dt.timezone.utc)
    problems = []
    for cert in certs:
        subject = cert.subject.rfc4514_string()
        if cert.not_valid_after_utc < now:
            problems.append((FAIL, str(Problem(f"certificate {subject!r} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                                               **where, hint="get the federation's current CA certificate"))))
        elif cert.not_valid_before_utc > now:
            problems.append((FAIL, str(Problem(f"certificate {subject!r} is not valid before "
                                               f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", **where,
                                               hint="check this server's clock"))))
        elif cert.not_valid_after_utc - now < CERT_EXPIRY_WARNING:
            problems.append((WARN, str(Problem(f"certificate {subject!r} expires on "
                                               f"{cert.not_valid_after_utc:%Y-%m-%d}", **where,
                                               hint="ask the coordinator for the renewed CA certificate"))))
    if not any(_is_ca(cert) for cert in certs):
        problems.append((WARN, str(Problem(f"{path} holds no CA certificate (basicConstraints CA:TRUE)", **where,
                                           hint="give the CA that signed the SuperLink's certificate, not the "
                                                "SuperLink's own certificate"))))
    names = ", ".join(repr(c.subject.rfc4514_string()) for c in certs)
    return _item("root certificate", f"{path}: {len(certs)} certificate(s), {names}", problems)


def _is_ca(cert) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.issuer == cert.subject  # an old-style self-signed root


def check_node_keys(config: AgentConfig, config_path: Path) -> CheckItem:
    """The node's identity at the SuperLink: required unless insecure (tests and labs), an OpenSSH EC
    private key Flower can use, owner-only, and the public key beside it its own."""
    try:
        identity = require_node_identity(config, source=config_path)
    except InputError as exc:
        return CheckItem("node keys", FAIL, "no usable node key pair", [str(p) for p in exc.problems])
    problems = []
    if identity.private_key.stat().st_mode & 0o044:
        problems.append((WARN, str(Problem(f"{identity.private_key} is readable by other users", path=config_path,
                                           field="node.private_key", hint=f"chmod 600 {identity.private_key}"))))
    return _item("node keys", f"{identity.private_key}: OpenSSH EC key ({identity.curve})"
                 + (", public key matches" if config.node.public_key is not None else "")
                 + "; the coordinator admits it after: flwr supernode register "
                 + str(config.node.public_key or "PUBLIC_KEY"), problems)


# --------------------------------------------------------------------------------- bundle and data


def check_bundle(config: AgentConfig) -> CheckItem:
    from fedlite.export.bundle import verify_bundle

    bundle, key = config.site.bundle, config.site.bundle_public_key
    try:
        meta = verify_bundle(bundle, key)
    except InputError as exc:
        what = "unsigned, wrongly signed, " if key is not None else ""
        return CheckItem("bundle", FAIL, f"{bundle} does not verify ({what}tampered, corrupt or missing)",
                         _limited([str(p) for p in exc.problems]))
    signed = f", signed by the holder of {key}" if key is not None else ""
    problems = []
    if bundle_saturates_here(meta.get("quantization")):
        problems.append((WARN, str(Problem(
            f"{bundle} was quantized for CPUs with VNNI (--isa {meta['quantization'].get('isa')}: signed INT8 weights, "
            "unsigned activations) and this CPU has none: ONNX Runtime's 8-bit products saturate here and can "
            "change a prediction", path=bundle / "bundle.json", field="quantization",
            hint="ask the coordinator for a bundle exported with --isa avx2, which runs exactly on this CPU"))))
    return _item("bundle", f"{bundle}: {len(meta['files'])} files match their SHA-256{signed} "
                           f"(bundle version {meta.get('bundle_version')}, preset {meta.get('preset')})", problems)


def check_data(config: AgentConfig) -> CheckItem:
    """The manifest validated record by record; image files present (not decoded: that is
    ``fedlite data check``'s slower, complete job)."""
    from fedlite.data.check import check_dataset

    data_dir = config.site.data_dir
    report = check_dataset(data_dir, decode_images=False)
    if report.ok:
        return CheckItem("data", OK, f"{data_dir}: {report.cases} cases, every image file present")
    return CheckItem("data", FAIL, f"{data_dir} is not a valid dataset ({len(report.problems)} problem(s))",
                     _limited([str(p) for p in report.problems]))


def check_writable(name: str, path: Path, config_path: Path) -> CheckItem:
    """A directory the agent writes: writable now, or creatable (with a warning: systemd's
    ReadWritePaths= needs it to exist before the service starts)."""
    user = current_user()
    where = dict(path=config_path, field=f"site.{name}")
    if path.exists():
        if not path.is_dir():
            return CheckItem(name, FAIL, f"{path} is not a directory",
                             [str(Problem(f"{path} exists and is not a directory", **where))])
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".fedlite-check."):
                pass
        except OSError as exc:
            return CheckItem(name, FAIL, f"{path} is not writable by {user}",
                             [str(Problem(f"cannot write in {path}: {exc.strerror}", **where,
                                          hint="chown it to the agent's user, or run the check as that user"))])
        return CheckItem(name, OK, f"{path} is writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return CheckItem(name, FAIL, f"{path} does not exist and cannot be created by {user}",
                         [str(Problem(f"{path} does not exist and {parent} is not writable", **where,
                                      hint=f"create it: install -d -o USER -g USER -m 0750 {path}"))])
    return CheckItem(name, WARN, f"{path} does not exist yet (creatable)",
                     [str(Problem(f"{path} does not exist; the systemd unit needs it before the agent starts",
                                  **where, hint=f"create it: install -d -o USER -g USER -m 0750 {path}"))])


# ---------------------------------------------------------------------------------- machine, network


def estimate_agent_memory(bundle: Path) -> tuple[int, int]:
    """(estimated bytes the agent needs, bundle bytes on disk)."""
    size = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()) if bundle.is_dir() else 0
    return PROCESS_BYTES + BUNDLE_FACTOR * size, size


def check_memory(config: AgentConfig, config_path: Path) -> CheckItem:
    import psutil

    memory = psutil.virtual_memory()
    limit = config.resources.memory_max_bytes
    need, bundle_bytes = estimate_agent_memory(config.site.bundle)
    where = dict(path=config_path, field="resources.memory_max")
    problems = []
    if need > limit:
        problems.append((FAIL, str(Problem(f"memory_max {config.resources.memory_max} is below the estimated need "
                                           f"of {format_bytes(need)}; the agent would be killed at the limit",
                                           **where, hint=f"raise it to at least {_size_hint(need)}"))))
    if limit > memory.total:
        problems.append((WARN, str(Problem(f"memory_max {config.resources.memory_max} exceeds this machine's "
                                           f"{format_bytes(memory.total)}: the limit would never apply", **where,
                                           hint=f"lower it to at most {_size_hint(memory.total * 0.8, up=False)}"))))
    if need > memory.available:
        problems.append((WARN, f"only {format_bytes(memory.available)} available now, the agent needs about "
                               f"{format_bytes(need)}: other programs use this server's memory"))
    detail = (f"memory_max {config.resources.memory_max} ({format_bytes(limit)}); estimated need "
              f"{format_bytes(need)} = {format_bytes(PROCESS_BYTES)} (Python with torch, onnxruntime, shap, Flower) + "
              f"{BUNDLE_FACTOR} × bundle {format_bytes(bundle_bytes)}; this machine: {format_bytes(memory.total)} "
              f"total, {format_bytes(memory.available)} available")
    return _item("memory", detail, problems)


def _size_hint(n: float, up: bool = True) -> str:
    """A memory_max value near ``n`` bytes, rounded to 256 MiB (up or down)."""
    step = 256 * 2**20
    steps = -(-int(n) // step) if up else max(1, int(n) // step)
    mib = steps * 256
    return f'"{mib // 1024}G"' if mib % 1024 == 0 else f'"{mib}M"'


def check_clientappio_port(config: AgentConfig, config_path: Path) -> CheckItem:
    port = config.node.clientappio_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return CheckItem("clientappio port", WARN, f"127.0.0.1:{port} is in use",
                             [str(Problem(f"port {port} on 127.0.0.1 is taken: by this agent if it is running, "
                                          "else by another program", path=config_path, field="node.clientappio_port",
                                          hint="give every agent on this host its own port"))])
    return CheckItem("clientappio port", OK, f"127.0.0.1:{port} is free")


def check_superlink(config: AgentConfig, timeout: float = 5.0) -> CheckItem:
    address = config.superlink.address
    probe = probe_config(config, timeout)
    if probe.outcome == CONNECTED:
        return CheckItem("superlink", OK, f"{address}: {probe.detail}")
    what = "cannot reach" if probe.outcome == UNREACHABLE else "TLS problem with"
    return CheckItem("superlink", FAIL, f"{what} {address}: {probe.detail}", [f"fix: {probe.hint}"] if probe.hint else [])


# ------------------------------------------------------------------------------------------ output


def checks_ok(items: list[CheckItem]) -> bool:
    return all(item.status != FAIL for item in items)


def format_checklist(items: list[CheckItem], config_path: Path) -> str:
    lines = [f"fedlite agent check: {config_path} (as user {current_user()})"]
    for item in items:
        lines.append(f"  {MARKS[item.status]} {item.name}: {item.detail}")
        lines.extend(f"      {problem}" for problem in item.problems)
    failed = sum(item.status == FAIL for item in items)
    warned = sum(item.status == WARN for item in items)
    warnings = f", {warned} warning(s)" if warned else ""
    lines.append(f"{failed} check(s) failed{warnings}" if failed else f"all checks passed{warnings}")
    return "\n".join(lines)


def checks_json(items: list[CheckItem], config_path: Path) -> dict:
    return {"config": str(config_path), "ok": checks_ok(items), "checks": [asdict(item) for item in items]}
