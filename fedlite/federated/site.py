"""What every job a site runs reads from the federation: where the site's files are, and what the
coordinator's message says.

A deployed site's SuperNode names its files in its node config (``data-dir``, ``cache-dir``, and for
the hospital agent ``bundle``); a simulated site gets its data directory from the split by its
partition id, and the rest from the simulation's defaults. This module and ``site_update`` (the one
update path and the two reply shapes) are all a site-side handler needs; the coordinator's
machinery stays out of the sites' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from fedlite.errors import InputError
from fedlite.federated.config import FederatedConfig
from fedlite.federated.records import from_record

NODE_CONFIG_HINT = "start the SuperNode with --node-config '{key}=\"/path\"' (`fedlite agent run` sets it)"


@dataclass(frozen=True)
class SitePaths:
    data_dir: Path
    node: dict[str, str]  # node config over the simulation's defaults

    def path(self, key: str) -> Path:
        """A path the site's node config must name (``cache-dir``, ``bundle``)."""
        if not self.node.get(key):
            raise InputError(f"this site's node config lacks {key}", hint=NODE_CONFIG_HINT.format(key=key))
        return Path(self.node[key])

    @property
    def name(self) -> str:
        """How the site names itself in its replies: its data directory's name."""
        return self.data_dir.name


def site_paths(context: Context, split_dir: str | Path | None = None,
               defaults: dict[str, str] | None = None) -> SitePaths:
    """This site's files: node config first, then (simulation) a split's site by partition id."""
    node = {**(defaults or {}), **{k: str(v) for k, v in context.node_config.items()}}
    if node.get("data-dir"):
        return SitePaths(Path(node["data-dir"]), node)
    if split_dir is not None and "partition-id" in node:
        from fedlite.data.split import load_split

        sites = load_split(split_dir).sites
        return SitePaths(Path(split_dir) / sites[int(node["partition-id"])], node)
    raise InputError("this site has no data directory", hint=NODE_CONFIG_HINT.format(key="data-dir"))


def job_settings(msg: Message) -> tuple[dict, FederatedConfig]:
    """The message's flat settings, and the run settings among them."""
    flat = dict(msg.content["config"])
    return flat, FederatedConfig.from_flat(flat)


def received_arrays(msg: Message, key: str = "arrays") -> dict[str, np.ndarray]:
    return from_record(msg.content[key])
