"""Run a federated training on one machine with Flower's simulation runtime: one simulated
SuperNode per site of a split, the same ServerApp and ClientApp as a real deployment.

Only the ClientApps are given the sites' directories. The coordinator reads the split's
``split.json`` (site names and the stage names) and, as the research protocol, its pooled ``test/``
when there is one; it never opens a site's cases."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

from flwr.serverapp import Grid

from fedlite.data.manifest import MANIFEST
from fedlite.data.split import TEST, SplitSummary, load_split
from fedlite.errors import InputError
from fedlite.federated.client_app import make_client_app
from fedlite.federated.config import FederatedConfig
from fedlite.federated.rounds import wait_for_nodes
from fedlite.federated.server_app import make_server_app
from fedlite.log_setup import quiet_site_processes

log = logging.getLogger(__name__)


def backend_config(sites: int, gpus: int) -> dict:
    """Sites share the machine: one CPU each (at most as many at once as there are cores), and
    on GPUs a fraction of one so several sites train side by side without reloading."""
    cpus = os.cpu_count() or 1
    resources = {"num_cpus": 1, "num_gpus": min(1.0, gpus / max(1, min(sites, 4))) if gpus else 0.0}
    return {"client_resources": resources, "init_args": {"num_cpus": cpus, "num_gpus": gpus}}


def simulation_config(cfg: FederatedConfig, split: SplitSummary) -> FederatedConfig:
    """The split's stage names, and its pooled test set as the server-side test when it has one."""
    changes = {"stage_names": ",".join(split.stratum_names[1:])}
    test = Path(cfg.split_dir) / TEST
    if not cfg.server_test and (test / MANIFEST).is_file():
        changes["server_test"] = str(test)
    return dataclasses.replace(cfg, **changes)


def simulate(split_dir: str | Path, job: Callable[[Grid], object], site_defaults: dict[str, str] | None = None,
             device: str = "auto", client_app=None) -> object:
    """Run ``job`` as the ServerApp over one simulated site per site of the split and return its
    result; an error in the job is raised here, in the caller's thread. ``client_app`` replaces the
    sites' own (a benchmark's attacker)."""
    import torch
    from flwr.simulation import run_simulation

    split = load_split(split_dir)
    if not split.sites:
        raise InputError("the split has no sites", path=split_dir)
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    outcome: dict = {}
    log.info("simulating %d sites (%s)", len(split.sites), ", ".join(split.sites))
    def once_every_site_is_up(grid: Grid) -> object:
        # simulated SuperNodes come online one by one: a job that started at the first would check,
        # query or score only some of the split's sites
        wait_for_nodes(grid, len(split.sites))
        return job(grid)

    with quiet_site_processes():
        run_simulation(server_app=make_server_app(once_every_site_is_up, outcome),
                       client_app=client_app or make_client_app(str(Path(split_dir).resolve()), site_defaults),
                       num_supernodes=len(split.sites), backend_config=backend_config(len(split.sites), gpus))
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError(f"the simulation over {split_dir} ended before its job did; see the log above")
    return outcome["result"]


def run_federated_simulation(cfg: FederatedConfig, resume: bool = False, progress: bool = True,
                             force: bool = False) -> dict:
    """Federated training, or edge fine-tuning of a bundle, over the sites of ``cfg.split_dir``."""
    from fedlite.federated.server_app import run_server

    cfg = simulation_config(cfg, load_split(cfg.split_dir))
    if cfg.edge_bundle:
        from fedlite.federated.edge_server import run_edge_server

        # simulated sites share the coordinator's bundle; each embeds its own cases into the run's cache
        edge = {"bundle": cfg.edge_bundle, "cache-dir": str(Path(cfg.out).resolve() / "cache")}
        return simulate(cfg.split_dir, lambda grid: run_edge_server(grid, cfg, progress=progress, force=force), edge,
                        cfg.device)
    # Simulated sites keep their frozen encoders' embeddings (patient-derived) in a private scratch
    # directory that lives as long as the simulation, never in the coordinator's run directory; a
    # deployed site keeps them in its own cache-dir.
    with tempfile.TemporaryDirectory(prefix="fedlite-sites-") as scratch:
        return simulate(cfg.split_dir, lambda grid: run_server(grid, cfg, resume=resume, progress=progress,
                                                               force=force), {"cache-dir": scratch}, cfg.device)
