"""The site side of every federated job (Flower ClientApp): each message goes to its job's handler.

The training job (``site_training``: train on the site's training part, score on its validation
part), edge fine-tuning (``fedlite.agents.edge_client``) and the export's jobs
(``fedlite.export.site_tasks``) are imported when their message arrives: a deployed SuperNode starts
a ClientApp process for every message, and the data check that opens every run needs none of torch,
timm or transformers. Nothing but parameters and aggregate statistics leaves the site: no image,
note, case id, per-case prediction or explanation is ever put in a reply, and a failed job's error
stays in the site's log (``site_guard``).

The site's data directory comes from the SuperNode's node config (``data-dir``); in a simulation the
driver maps each simulated node's ``partition-id`` to a site of a split instead (``site.site_paths``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlite.federated.preflight import check_own_data, data_check_reply
from fedlite.federated.site import site_paths
from fedlite.federated.site_guard import guarded

# the modules of the jobs a site runs, imported when their first message arrives
TRAINING, EDGE, EXPORT = "fedlite.federated.site_training", "fedlite.agents.edge_client", "fedlite.export.site_tasks"


def check_site_data(msg: Message, context: Context, split_dir: str | Path | None = None) -> Message:
    """Before a run starts: this site's data validated and every image decoded; counts only go back."""
    data_dir = site_paths(context, split_dir).data_dir
    return data_check_reply(msg, check_own_data(data_dir), data_dir.name)


def make_client_app(split_dir: str | Path | None = None, site_defaults: dict[str, str] | None = None) -> ClientApp:
    """``site_defaults``: bundle and cache-dir of simulated sites (a deployed site's come from its
    node config)."""
    client = ClientApp()
    defaults = site_defaults or {}

    def job(module: str, name: str) -> Callable[[Message, Context], Message]:
        """Handler ``name`` of ``module``, imported when its first message arrives."""
        def handle(msg: Message, context: Context) -> Message:
            return getattr(importlib.import_module(module), name)(msg, context, split_dir, defaults)
        return handle

    def by_mode(edge: Callable, full: Callable) -> Callable[[Message, Context], Message]:
        """Edge fine-tuning's handler for an edge run's messages, the training job's for the others."""
        def handle(msg: Message, context: Context) -> Message:
            return (edge if msg.content["config"].get("mode") == "edge" else full)(msg, context)
        return guarded(handle)

    client.train()(by_mode(job(EDGE, "edge_train"), job(TRAINING, "train_site")))
    client.evaluate()(by_mode(job(EDGE, "edge_evaluate"), job(TRAINING, "evaluate_site")))
    client.query("datacheck")(guarded(lambda msg, context: check_site_data(msg, context, split_dir)))
    # the federated export's jobs
    client.query("teacher")(guarded(job(EXPORT, "receive_teacher")))
    client.train("distill")(guarded(job(EXPORT, "distill_site")))
    client.query("importance")(guarded(job(EXPORT, "importance_site")))
    client.query("calibrate")(guarded(job(EXPORT, "calibrate_site")))
    client.evaluate("parity")(guarded(job(EXPORT, "parity_site")))
    return client


# For Flower's deployment engine (`flwr run .`): sites find their data through node config.
app = make_client_app()
