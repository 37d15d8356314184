"""What a frozen round costs a site, with and without the embedding cache, side by side in one run.

The site's own round (``site_training.local_round``, what its training job runs for each message)
runs the same frozen rounds on one site twice, interleaved round by round so both see the same
machine: once with no cache directory (every step runs the frozen encoders), once with one
(``fedlite.federated.frozen_embeddings``: each augmented view embedded the first time an epoch needs
it, then read back). Timed: the round from the global weights to the encoded update. Each path
trains its own copy across the rounds; both are then scored on the site's validation part, which is
the accuracy effect of training on V recurring augmented views instead of fresh ones.

    fedlite bench frozen-rounds --data DATA/split --preset small --text-weights MINILM_DIR --out OUT
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import click

from fedlite.atomic import atomic_write_text
from fedlite.bench.machine import machine_info
from fedlite.federated.config import FederatedConfig


def time_frozen_rounds(site_dir: Path, cfg: FederatedConfig, num_stages: int,
                       cache_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    """Each frozen round of ``cfg`` at the site, uncached and cached, each path training its own copy
    from the same initial weights (a federation of this one site); then both copies scored on the
    site's validation part by the same uncached evaluation. Returns the rounds and the scores."""
    import time

    from flwr.app import Context, RecordDict

    from fedlite.data.loader import make_loader
    from fedlite.federated.params import get_arrays, trainable_names
    from fedlite.federated.site import SitePaths
    from fedlite.federated.site_training import local_round
    from fedlite.federated.task import build_initial_model, cached_dataset
    from fedlite.metrics import evaluate_predictions
    from fedlite.training import predict, resolve_device

    sites = {"uncached": SitePaths(site_dir, {}), "cached": SitePaths(site_dir, {"cache-dir": str(cache_dir)})}
    models = {name: build_initial_model(cfg, num_stages) for name in sites}
    for model in models.values():
        model.set_encoders_frozen(True)
    trainable = trainable_names(models["cached"], True)
    contexts = {name: Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
                for name in sites}
    cached_dataset(site_dir, cfg, models["cached"], "train")  # notes tokenized once, before either path is timed
    rows = []
    for server_round in range(1, cfg.freeze_rounds + 1):
        row = {"round": server_round}
        for name in sorted(sites, reverse=server_round % 2 == 0):  # each path goes first every other round
            model = models[name]  # trained in place: the next round starts from this round's weights
            start = time.perf_counter()
            update = local_round(model, get_arrays(model, trainable), cfg, server_round, "initial encoders",
                                 sites[name], contexts[name])
            row[f"{name}_seconds"] = time.perf_counter() - start
            row[f"{name}_train_seconds"] = update.metrics["train-seconds"]
            row[f"{name}_loss"] = update.metrics["train-loss"]
            if name == "cached":
                row["embed_seconds"] = update.metrics["embed-seconds"]
                row["all_views_cached"] = bool(update.metrics["embeddings-cached"])
        row["speedup"] = row["uncached_seconds"] / row["cached_seconds"]
        rows.append(row)
        click.echo(json.dumps(row))
    val = cached_dataset(site_dir, cfg, models["cached"], "val")
    scores = {}
    for name, model in models.items():
        probabilities = predict(model, make_loader(val, cfg.batch_size, shuffle=False), resolve_device(cfg.device))
        metrics = evaluate_predictions(val.leukemia.numpy(), val.stage.numpy(), *probabilities)
        scores[name] = {k: metrics[k] for k in ("accuracy", "auc", "stage_macro_f1")} | {"cases": len(val)}
    return rows, scores


def format_table(rows: list[dict], scores: dict[str, dict], cfg: FederatedConfig, cases: int) -> str:
    lines = [f"Frozen rounds at one site ({cases} training cases), `{cfg.preset}`, E = {cfg.local_epochs}, "
             f"batch {cfg.batch_size}, {cfg.embedding_views} cached views.", "",
             "| round | encoders every step: s | cached: s | of which embedding s | all views cached | ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['uncached_seconds']:.2f} | {r['cached_seconds']:.2f} | "
                     f"{r['embed_seconds']:.2f} | {'yes' if r['all_views_cached'] else 'no'} | {r['speedup']:.1f}× |")
    lines += ["", f"After {len(rows)} rounds, on the site's {scores['cached']['cases']} validation cases:", "",
              "| path | accuracy | AUC | stage macro-F1 |", "|---|---|---|---|"]
    for name, label in (("uncached", "encoders every step"), ("cached", "cached embeddings")):
        s = scores[name]
        lines.append(f"| {label} | {100 * s['accuracy']:.2f} % | {s['auc']:.4f} | {s['stage_macro_f1']:.3f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--data", "split_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--site", default=None, help="The site to time (default: the split's first).")
@click.option("--preset", default="small", show_default=True)
@click.option("--text-weights", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--image-weights", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--rounds", default=6, show_default=True, help="Frozen rounds to time.")
@click.option("--local-epochs", default=1, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--views", default=3, show_default=True, help="Cached augmented views (embedding-views).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench-frozen-rounds"), show_default=True)
def main(split_dir: Path, site: str | None, preset: str, text_weights: Path | None, image_weights: Path | None,
         rounds: int, local_epochs: int, batch_size: int, views: int, out: Path) -> None:
    from fedlite.data.holdout import site_parts
    from fedlite.data.split import load_split

    split = load_split(split_dir)
    site = site or split.sites[0]
    stages = split.stratum_names[1:]
    cfg = FederatedConfig(preset=preset, rounds=rounds, freeze_rounds=rounds, local_epochs=local_epochs,
                          batch_size=batch_size, embedding_views=views, stage_names=",".join(stages),
                          text_weights=str(text_weights or ""), image_weights=str(image_weights or ""),
                          device="cpu", optimizer="adamw")
    with tempfile.TemporaryDirectory(prefix="fedlite-frozen-bench-") as cache:
        rows, scores = time_frozen_rounds(Path(split_dir) / site, cfg, len(stages), Path(cache))
    cases = len(site_parts(Path(split_dir) / site, cfg.site_val_fraction).train)
    steady = [r["speedup"] for r in rows if r["all_views_cached"]]
    report = {"preset": preset, "site": site, "training_cases": cases, "local_epochs": local_epochs,
              "batch_size": batch_size, "views": views, "rounds": rows, "validation": scores,
              "median_speedup_all_cached": statistics.median(steady) if steady else None,
              "machine": machine_info()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "frozen_rounds.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "frozen_rounds.md", format_table(rows, scores, cfg, cases))
    click.echo(format_table(rows, scores, cfg, cases))


if __name__ == "__main__":
    main()
