"""`fedlite agent install`: the config file round-trips, the systemd unit is hardened and names what
the agent reads and writes, nothing is written outside --prefix or by --dry-run, nothing is replaced
without --force, and bad values are refused naming the field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedlite.agents.agent_config import (AgentConfig, NodeSettings, ResourceSettings, SiteSettings,
                                         SuperLinkSettings, read_agent_config)
from fedlite.agents.config_toml import render_agent_config, render_node_config, toml_string
from fedlite.agents.config_values import parse_memory
from fedlite.agents.install import default_executable, plan_install, render_unit
from fedlite.agents.node_identity import generate_node_key_pair
from fedlite.agents.supernode import EXIT_CONFIG
from fedlite.cli import main
from fedlite.errors import InputError

NODE_CONFIG_KEYS = {"data-dir", "bundle", "cache-dir", "report-dir", "threads", "require-dp", "min-report-cases",
                    "bundle-public-key"}


def make_config(root: Path, **resources) -> AgentConfig:
    return AgentConfig(
        superlink=SuperLinkSettings(address="coordinator.example.org:9093", root_certificate=root / "ca.crt"),
        site=SiteSettings(bundle=root / "bundle", data_dir=root / "site-01", report_dir=root / "reports",
                          cache_dir=root / "cache"),
        node=NodeSettings(private_key=root / "node_key", public_key=root / "node_key.pub"),
        resources=ResourceSettings(**{"threads": 2, "memory_max": "6G", **resources}))


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """[Section] -> (key, value) lines in order (keys repeat in unit files)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


def install_args(root: Path, *extra: str, node_key: bool = True) -> list[str]:
    """``agent install`` for a site under ``root``, with its node key pair there (made once)."""
    key = []
    if node_key:
        if not (root / "node_key").exists():
            generate_node_key_pair(root / "node_key")
        key = ["--private-key", str(root / "node_key")]
    return ["agent", "install", "--superlink", "coordinator.example.org:9093",
            "--root-certificate", str(root / "ca.crt"), "--bundle", str(root / "bundle"),
            "--data-dir", str(root / "site-01"), "--report-dir", str(root / "reports"),
            "--cache-dir", str(root / "cache"), *key, *extra]


KEYS = {Path("srv/node_key"), Path("srv/node_key.pub")}


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- unit


def test_unit_is_hardened_limited_and_runs_the_agent_with_its_config():
    config = make_config(Path("/srv/fedlite"))
    unit = render_unit(config, config_path=Path("/etc/fedlite/agent.toml"),
                       executable=Path("/opt/fedlite/venv/bin/fedlite"), user="fedlite")
    sections = unit_sections(unit)
    assert list(sections) == ["Unit", "Service", "Install"]
    unit_keys, service = dict(sections["Unit"]), dict(sections["Service"])
    assert unit.startswith("# ")  # a comment header says what this is and where its settings are
    assert {("After", "network-online.target"), ("Wants", "network-online.target")} <= set(sections["Unit"])
    assert unit_keys["StartLimitIntervalSec"] and unit_keys["StartLimitBurst"]
    assert service["ExecStart"] == "/opt/fedlite/venv/bin/fedlite agent run --config /etc/fedlite/agent.toml"
    for key, value in {"Type": "simple", "User": "fedlite", "Group": "fedlite", "Restart": "on-failure",
                       "RestartSec": "10", "RestartPreventExitStatus": str(EXIT_CONFIG), "NoNewPrivileges": "yes",
                       "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "MemoryMax": "6G",
                       "ReadWritePaths": "/srv/fedlite/reports /srv/fedlite/cache",
                       "ReadOnlyPaths": "/srv/fedlite/site-01 /srv/fedlite/bundle"}.items():
        assert service.get(key) == value, (key, service.get(key))
    environment = " ".join(v for k, v in sections["Service"] if k == "Environment")
    assert "OMP_NUM_THREADS=2" in environment
    assert sections["Install"] == [("WantedBy", "multi-user.target")]


def test_unit_quotes_odd_paths_and_relaxes_protect_home_only_for_home_paths():
    config = make_config(Path("/home/lab/fedlite 100%"))
    unit = render_unit(config, config_path=Path("/etc/fedlite/agent.toml"), executable=Path("/usr/bin/fedlite"))
    service = dict(unit_sections(unit)["Service"])
    assert service["ReadWritePaths"] == '"/home/lab/fedlite 100%%/reports" "/home/lab/fedlite 100%%/cache"'
    assert service["ProtectHome"] == "read-only"  # "yes" would hide the data from the agent


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    config = make_config(Path("/srv/fedlite site"), threads=0)
    unit = tmp_path / "fedlite-agent.service"
    unit.write_text(render_unit(config, config_path=Path("/etc/fedlite/agent.toml"), executable=default_executable()))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "fedlite-agent" not in done.stderr, done.stderr


# -------------------------------------------------------------------------------------------- config


def test_config_round_trips_exactly(tmp_path):
    odd = tmp_path / 'site "01" \\ ü'
    config = AgentConfig(
        superlink=SuperLinkSettings(address="[::1]:9093", root_certificate=odd / "ca.crt"),
        site=SiteSettings(bundle=odd / "bundle", data_dir=odd / "data", report_dir=odd / "reports",
                          cache_dir=odd / "cache"),
        node=NodeSettings(private_key=odd / "node_key", public_key=odd / "node_key.pub", clientappio_port=9095),
        resources=ResourceSettings(threads=3, memory_max="1.5G"))
    path = tmp_path / "agent.toml"
    path.write_text(render_agent_config(config), encoding="utf-8")
    assert read_agent_config(path) == config
    minimal = make_config(tmp_path, threads=0)
    path.write_text(render_agent_config(minimal), encoding="utf-8")
    assert read_agent_config(path) == minimal


def test_toml_strings_escape_every_character_that_needs_it():
    import tomllib

    text = 'a"b\\c\td\ne\x01f\x7fü'
    assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


def test_node_config_has_the_clientapp_keys_and_flower_parses_it_back(tmp_path):
    from flwr.common.config import parse_config_args

    config = make_config(tmp_path / "with space")
    node = config.node_config()
    assert set(node) == NODE_CONFIG_KEYS and node["threads"] == 2
    assert node["data-dir"] == str(tmp_path / "with space" / "site-01")
    assert parse_config_args([render_node_config(node)]) == node
    quoted = {**node, "report-dir": '/srv/odd "name"'}  # a literal string carries the quotes
    assert parse_config_args([render_node_config(quoted)]) == quoted


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[superlink]\naddress = "127.0.0.1:9093"\ninsecure = true\n'
                    '[site]\nbundle = "bundle"\ndata_dir = "data"\nreport_dir = "/srv/reports"\n')
    config = read_agent_config(path)
    assert config.site.bundle == tmp_path / "bundle" and config.site.report_dir == Path("/srv/reports")
    assert config.site.cache_dir == Path("/var/lib/fedlite/cache") and config.resources.memory_max == "4G"


@pytest.mark.parametrize("table, line, field, words", [
    ("resources", 'memory_max = "6GB"', "resources.memory_max", "not a memory size"),
    ("resources", 'memory_max = "lots"', "resources.memory_max", "not a memory size"),
    ("resources", "threads = -1", "resources.threads", "0..1024"),
    ("superlink", 'address = "coordinator"', "superlink.address", "host:port"),
    ("superlink", 'address = "https://coordinator:9093"', "superlink.address", "URL scheme"),
    ("superlink", 'address = "coordinator:99999"', "superlink.address", "1..65535"),
    ("resources", 'memmory_max = "6G"', "resources.memmory_max", "did you mean 'memory_max'"),
    ("site", 'bundel = "/srv/b"', "site.bundel", "did you mean 'bundle'"),
])
def test_bad_values_and_unknown_keys_are_refused_naming_file_and_field(tmp_path, table, line, field, words):
    text = ('[superlink]\naddress = "coordinator:9093"\n'
            '[site]\nbundle = "/srv/b"\ndata_dir = "/srv/d"\nreport_dir = "/srv/r"\n[resources]\n')
    text = text.replace(f"[{table}]\n", f"[{table}]\n{line}\n")
    if table == "superlink":
        text = text.replace('address = "coordinator:9093"\n', "", 1)
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_agent_config(path)
    assert f"{path}: field '{field}'" in str(err.value) and words in str(err.value)


def test_every_config_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[superlink]\naddress = "x"\n[site]\nbundle = 3\n[extra]\n')
    with pytest.raises(InputError) as err:
        read_agent_config(path)
    fields = {p.field for p in err.value.problems}
    assert {"superlink.address", "site.bundle", "site.data_dir", "site.report_dir", "extra"} <= fields


def test_memory_sizes_parse_like_systemd():
    assert parse_memory("6G") == 6 * 2**30 and parse_memory("512M") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * 2**30) and parse_memory("1048576") == 2**20
    for bad in ("", "6GB", "G", "-1G", "0", "six"):
        with pytest.raises(ValueError):
            parse_memory(bad)


# ----------------------------------------------------------------------------------------------- CLI


def test_install_under_prefix_writes_both_files_there_and_nothing_else(tmp_path):
    prefix = tmp_path / "root"
    before = Path("/etc/fedlite/agent.toml").exists(), Path("/etc/systemd/system/fedlite-agent.service").exists()
    result = CliRunner().invoke(main, install_args(tmp_path / "srv", "--prefix", str(prefix), "--threads", "2",
                                                   "--memory-max", "6G"))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path) == {Path("root/etc/fedlite/agent.toml"),
                                     Path("root/etc/systemd/system/fedlite-agent.service")} | KEYS
    assert (Path("/etc/fedlite/agent.toml").exists(),
            Path("/etc/systemd/system/fedlite-agent.service").exists()) == before
    config = read_agent_config(prefix / "etc/fedlite/agent.toml")
    assert config == make_config(tmp_path / "srv")
    unit = (prefix / "etc/systemd/system/fedlite-agent.service").read_text()
    assert f"ExecStart={default_executable()} agent run --config /etc/fedlite/agent.toml" in unit
    for command in ("useradd --system", "systemctl daemon-reload", "systemctl enable --now fedlite-agent.service",
                    f"chown fedlite: {tmp_path / 'srv' / 'node_key'}", "flwr supernode register"):
        assert command in result.output


def test_dry_run_prints_both_files_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(main, install_args(tmp_path / "srv", "--prefix", str(tmp_path / "root"),
                                                   "--dry-run"))
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path) == KEYS
    plan = plan_install(make_config(tmp_path / "srv", threads=0, memory_max="4G"), prefix=tmp_path / "root")
    assert str(plan.config_write_path) in result.output and str(plan.unit_write_path) in result.output
    assert plan.config_text in result.output and plan.unit_text in result.output


def test_existing_config_is_kept_without_force(tmp_path):
    runner, prefix = CliRunner(), str(tmp_path / "root")
    assert runner.invoke(main, install_args(tmp_path, "--prefix", prefix)).exit_code == 0
    config_file = tmp_path / "root/etc/fedlite/agent.toml"
    first = config_file.read_text()

    refused = runner.invoke(main, install_args(tmp_path, "--prefix", prefix, "--memory-max", "8G"))
    assert refused.exit_code == 2 and "already exists" in refused.output and "--force" in refused.output
    assert "Traceback" not in refused.output and config_file.read_text() == first

    forced = runner.invoke(main, install_args(tmp_path, "--prefix", prefix, "--memory-max", "8G", "--force"))
    assert forced.exit_code == 0, forced.output
    assert read_agent_config(config_file).resources.memory_max == "8G"


def test_install_refuses_bad_options_naming_each(tmp_path):
    result = CliRunner().invoke(main, install_args(tmp_path, "--prefix", str(tmp_path / "root"), "--memory-max",
                                                   "lots", "--threads", "-2", "--user", "Bad User"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--memory-max (resources.memory_max)" in result.output
    assert "--threads (resources.threads)" in result.output
    assert not (tmp_path / "root").exists()
    args = install_args(tmp_path, "--prefix", str(tmp_path / "root"))
    args[args.index("--superlink") + 1] = "coordinator"
    bad_address = CliRunner().invoke(main, args)
    assert bad_address.exit_code == 2 and "--superlink (superlink.address)" in bad_address.output
    bad_user = CliRunner().invoke(main, install_args(tmp_path, "--prefix", str(tmp_path / "root"), "--user", "Bad"))
    assert bad_user.exit_code == 2 and "--user" in bad_user.output and not (tmp_path / "root").exists()


def test_invalid_toml_names_the_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[superlink]\naddress = "coordinator:9093"\nthreads 4\n')
    with pytest.raises(InputError) as err:
        read_agent_config(path)
    assert err.value.problems[0].line == 3 and str(err.value).startswith(f"{path}:3: not valid TOML")


def test_the_unit_refuses_control_characters_and_escapes_dollars(tmp_path):
    config = make_config(tmp_path)
    unit = render_unit(config, config_path=tmp_path / "conf$HOME" / "agent.toml", executable=Path("/usr/bin/fedlite"))
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "conf$$HOME" in exec_start
    with pytest.raises(InputError, match="control character"):
        render_unit(config, config_path=tmp_path / "x\nExecStartPre=/bin/evil" / "agent.toml",
                    executable=Path("/usr/bin/fedlite"))


def test_install_requires_this_hospitals_node_key_pair_unless_insecure(tmp_path):
    from fedlite.export.signing import generate_key_pair

    srv, prefix = tmp_path / "srv", tmp_path / "root"
    missing = CliRunner().invoke(main, install_args(srv, "--prefix", str(prefix), node_key=False))
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "field '--private-key (node.private_key)': no node key" in missing.output and "fedlite agent keygen" in missing.output
    assert not prefix.exists()

    generate_node_key_pair(tmp_path / "other_key")
    args = install_args(srv, "--prefix", str(prefix), "--public-key", str(tmp_path / "other_key.pub"))
    mismatched = CliRunner().invoke(main, args)
    assert mismatched.exit_code == 2 and "--public-key (node.public_key)" in mismatched.output
    assert "is not the public key of" in mismatched.output and not prefix.exists()

    generate_key_pair(tmp_path / "bundle.pem", tmp_path / "bundle.pub")  # an Ed25519 signing key, PEM
    wrong_kind = CliRunner().invoke(main, install_args(srv, "--prefix", str(prefix), node_key=False)
                                    + ["--private-key", str(tmp_path / "bundle.pem")])
    assert wrong_kind.exit_code == 2 and "not an unencrypted OpenSSH private key" in wrong_kind.output
    assert not prefix.exists()

    lab = install_args(srv, "--prefix", str(prefix), node_key=False)
    lab[lab.index("--root-certificate"):lab.index("--root-certificate") + 2] = ["--insecure"]
    assert CliRunner().invoke(main, lab).exit_code == 0
    assert read_agent_config(prefix / "etc/fedlite/agent.toml").node.private_key is None


def test_keygen_writes_an_owner_only_pair_that_flower_and_check_accept(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    result = CliRunner().invoke(main, ["agent", "keygen", str(tmp_path / "node_key")])
    assert result.exit_code == 0, result.output
    assert "flwr supernode register node_key.pub" in result.output
    private = tmp_path / "node_key"
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode loads
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = serialization.load_ssh_public_key((tmp_path / "node_key.pub").read_bytes())  # what flwr registers
    assert public.public_numbers() == key.public_key().public_numbers()
    before = private.read_bytes()
    again = CliRunner().invoke(main, ["agent", "keygen", str(private)])
    assert again.exit_code == 2 and "refusing to replace" in again.output and private.read_bytes() == before
