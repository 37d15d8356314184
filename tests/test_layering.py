"""Which side imports what: the hospital agent's code uses the federation only through the site API,
and the coordinator's round machinery does not reach into the agent."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE_API = {"fedlite.federated.site", "fedlite.federated.site_update"}
COORDINATOR = ["engine", "rounds", "server_app", "edge_server", "aggregate"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_agent_uses_the_federation_only_through_the_site_api():
    for path in sorted((ROOT / "agents").glob("*.py")):
        federated = {m for m in imported_modules(path) if m.startswith("fedlite.federated")}
        assert federated <= SITE_API, f"{path.name} imports {sorted(federated - SITE_API)}"


def test_the_coordinator_does_not_import_the_agent():
    for name in COORDINATOR:
        path = ROOT / "fedlite" / "federated" / f"{name}.py"
        agent = {m for m in imported_modules(path) if m.startswith("fedlite.agents")}
        assert not agent, f"{path.name} imports {sorted(agent)}"
