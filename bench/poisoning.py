"""One poisoning site among honest ones: what FedAvg and the robust aggregations make of it.

A simulated federation in which one site sends, every round, its honest update reversed and scaled
(``-factor · Δ``): a well-formed reply of plausible size that passes every screen (float32, finite,
norm below the bound, case count in range) and pulls the model away from what the others learn.
The same split, seeds and rounds are run without the attacker under FedAvg, then with it under
FedAvg, coordinate-wise median and trimmed mean; accuracy, AUC and stage macro-F1 come from the
sites' validation parts (and the split's test set, when it has one):

    fedlite bench poisoning --data DATA/split --out bench/results/poisoning-tiny-cpu
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from fedlite.atomic import atomic_write_text, json_text
from fedlite.federated.config import FederatedConfig
from fedlite.quickstart import LR, OPTIMIZER

RUNS = (("FedAvg, no attacker", "fedavg", False), ("FedAvg", "fedavg", True), ("median", "median", True),
        ("trimmed mean", "trimmed-mean", True))


def poisoning_client_app(split_dir: str, attacker: str, factor: float):
    """The product's site handlers, except that ``attacker``'s training replies carry ``-factor · Δ``."""
    from flwr.clientapp import ClientApp

    from fedlite.federated.client_app import check_site_data
    from fedlite.federated.records import from_record, to_record
    from fedlite.federated.site import site_paths
    from fedlite.federated.site_guard import guarded
    from fedlite.federated.site_training import evaluate_site, train_site

    app = ClientApp()

    @app.train()
    @guarded
    def train(msg, context):
        reply = train_site(msg, context, split_dir)
        if site_paths(context, split_dir).data_dir.name == attacker:
            honest = from_record(reply.content["arrays"])
            reply.content["arrays"] = to_record({name: -factor * delta for name, delta in honest.items()})
        return reply

    app.evaluate()(guarded(lambda msg, context: evaluate_site(msg, context, split_dir)))
    app.query("datacheck")(guarded(lambda msg, context: check_site_data(msg, context, split_dir)))
    return app


def run_one(cfg: FederatedConfig, client_app=None) -> dict:
    from fedlite.data.split import load_split
    from fedlite.federated.server_app import run_server
    from fedlite.federated.simulation import simulate, simulation_config

    cfg = simulation_config(cfg, load_split(cfg.split_dir))
    start = time.perf_counter()
    summary = simulate(cfg.split_dir, lambda grid: run_server(grid, cfg, progress=True, force=True),
                       device=cfg.device, client_app=client_app)
    history = [json.loads(line) for line in (Path(cfg.out) / "rounds.jsonl").read_text().splitlines() if line]
    return {"summary": summary, "minutes": (time.perf_counter() - start) / 60,
            "rejected": sum(len(row["rejected"]) for row in history)}


def table(results: list[dict]) -> str:
    lines = ["| aggregation | attacker | accuracy | AUC | stage macro-F1 | test accuracy | test AUC | "
             "updates rejected | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last, test = r["summary"]["last"], r["summary"].get("server_test") or {}

        def cell(metrics: dict, key: str, fmt: str) -> str:
            return format(metrics[key], fmt) if isinstance(metrics.get(key), (int, float)) else "–"
        lines.append(f"| {r['label']} | {r['attacker'] or 'none'} | {cell(last, 'accuracy', '.1%')} | "
                     f"{cell(last, 'auc', '.3f')} | {cell(last, 'stage_macro_f1', '.3f')} | "
                     f"{cell(test, 'accuracy', '.1%')} | {cell(test, 'auc', '.3f')} | {r['rejected']} | "
                     f"{r['minutes']:.1f} |")
    return "\n".join(lines)


@click.command()
@click.option("--data", "split_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--attacker", default="site-01", show_default=True, help="The poisoning site.")
@click.option("--factor", default=4.0, show_default=True, help="The attacker sends -FACTOR × its honest update.")
@click.option("--preset", default="tiny", show_default=True)
@click.option("--rounds", default=8, show_default=True)
@click.option("--local-epochs", default=1, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--trim-fraction", default=0.2, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(split_dir: Path, out: Path, attacker: str, factor: float, preset: str, rounds: int, local_epochs: int,
         batch_size: int, trim_fraction: float, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # the quickstart's federated settings
    base = FederatedConfig(split_dir=str(split_dir.resolve()), preset=preset, rounds=rounds, freeze_rounds=1,
                           local_epochs=local_epochs, batch_size=batch_size, optimizer=OPTIMIZER, lr=LR, seed=seed,
                           trim_fraction=trim_fraction)
    results = []
    for label, aggregation, attacked in RUNS:
        cfg = dataclasses.replace(base, aggregation=aggregation, out=str(out / "runs" / f"{aggregation}-{attacked}"))
        app = poisoning_client_app(cfg.split_dir, attacker, factor) if attacked else None
        results.append({"label": label, "aggregation": aggregation, "attacker": attacker if attacked else None,
                        **run_one(cfg, app)})
        atomic_write_text(out / "results.json", json_text({"factor": factor, "runs": results}, indent=2) + "\n")
    text = table(results)
    atomic_write_text(out / "table.md", text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
