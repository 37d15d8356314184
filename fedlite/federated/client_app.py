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

from pathlib import Path
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlite.federated.preflight import check_own_data, data_check_reply
from fedlite.federated.site import site_paths
from fedlite.federated.site_guard import guarded


def check_site_data(msg: Message, context: Context, split_dir: str | Path | None = None) -> Message:
    """Before a run starts: this site's data validated and every image decoded; counts only go back."""
    data_dir = site_paths(context, split_dir).data_dir
    return data_check_reply(msg, check_own_data(data_dir), data_dir.name)


def make_client_app(split_dir: str | Path | None = None, site_defaults: dict[str, str] | None = None) -> ClientApp:
    """``site_defaults``: bundle and cache-dir of simulated sites (a deployed site's come from its
    node config)."""
    client = ClientApp()
    defaults = site_defaults or {}

    @client.train()
    @guarded
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("mode") == "edge":
            from fedlite.agents.edge_client import edge_train

            return edge_train(msg, context, split_dir, defaults)
        from fedlite.federated.site_training import train_site

        return train_site(msg, context, split_dir)

    @client.evaluate()
    @guarded
    def evaluate(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("mode") == "edge":
            from fedlite.agents.edge_client import edge_evaluate

            return edge_evaluate(msg, context, split_dir, defaults)
        from fedlite.federated.site_training import evaluate_site

        return evaluate_site(msg, context, split_dir)

    @client.query("datacheck")
    @guarded
    def datacheck(msg: Message, context: Context) -> Message:
        return check_site_data(msg, context, split_dir)

    # The federated export's jobs (export/site_tasks.py).
    def export_task(name: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            from fedlite.export import site_tasks

            return getattr(site_tasks, name)(msg, context, split_dir, defaults)
        return guarded(handle)

    client.query("teacher")(export_task("receive_teacher"))
    client.train("distill")(export_task("distill_site"))
    client.query("importance")(export_task("importance_site"))
    client.query("calibrate")(export_task("calibrate_site"))
    client.evaluate("parity")(export_task("parity_site"))
    return client


# For Flower's deployment engine (`flwr run .`): sites find their data through node config.
app = make_client_app()
