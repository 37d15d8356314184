"""Federated training throughput: a few timed rounds of a simulated run, extrapolated to the paper's
full workload (10 sites × 3 local epochs × 100 rounds).

Reports samples/s while sites train, achieved TFLOP/s (≈ 6 · parameters · tokens per sample for a
training step), and the share of round time spent outside training (transport, serialisation,
aggregation, evaluation). Runs on CPU too, so it can be checked anywhere; the numbers that matter
come from a GPU:

    fedlite bench federated --data DATA/split --preset paper --rounds 3 --freeze-rounds 0

``--engine deployment`` runs the same apps on Flower's deployment engine instead of its simulation:
a SuperLink and one SuperNode per site on loopback (fedlite.federated.loopback), each site's
ClientApp a process of its own, as across hospitals; it needs no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedlite.atomic import atomic_write_text, require_free
from fedlite.bench.machine import machine_info
from fedlite.federated.config import FederatedConfig


def training_flops_per_sample(preset: str, modality: str, mean_tokens: float) -> float:
    """6 · N · T per encoder (forward + backward), T = 197 patch tokens for a 224² ViT/16."""
    from fedlite.federated.task import build_initial_model

    model = build_initial_model(FederatedConfig(preset=preset, modality=modality), num_stages=4)
    flops = 0.0
    if model.image_encoder is not None:
        flops += 6 * sum(p.numel() for p in model.image_encoder.parameters()) * 197
    if model.text_encoder is not None:
        embeddings = model.text_encoder.embeddings.word_embeddings.weight.numel()
        flops += 6 * (sum(p.numel() for p in model.text_encoder.parameters()) - embeddings) * mean_tokens
    return flops


def summarize(rounds: list[dict], flops_per_sample: float, sites: int, paper_rounds: int = 100) -> dict:
    """Throughput over the timed rounds (the first round, which includes start-up, is skipped
    when there are more)."""
    timed = rounds[1:] if len(rounds) > 1 else rounds
    samples = sum(r["samples_trained"] for r in timed)
    wall = sum(r["round_seconds"] for r in timed)
    # time at least one site was in its training loop: sites training side by side on one GPU count
    # once (records without it come from sequential sites, whose train times add up)
    train_seconds = sum(r.get("site_training_seconds", sum(r["site_train_seconds"].values())) for r in timed)
    per_round = wall / len(timed)
    return {
        "timed_rounds": len(timed),
        "samples_per_second": samples / train_seconds,
        "achieved_tflops": samples * flops_per_sample / train_seconds / 1e12,
        "round_seconds": per_round,
        "share_outside_training": max(0.0, 1 - train_seconds / wall),
        "paper_workload_minutes": per_round * paper_rounds * 10 / max(sites, 1) / 60,
    }


def run_deployed(cfg: FederatedConfig, split_dir: Path, force: bool) -> None:
    """The run on a loopback deployment: every site of the split a SuperNode, all of them in every
    round; the coordinator reads no cases (its settings name no split)."""
    import os
    import shutil

    from fedlite.data.split import load_split
    from fedlite.federated.loopback import LoopbackDeployment

    out = Path(cfg.out).resolve()
    require_free(out, force, "the run directory")
    shutil.rmtree(out, ignore_errors=True)
    split = load_split(split_dir)
    settings = {**cfg.site_settings(), "out": str(out), "stage-names": ",".join(split.stratum_names[1:]),
                "min-sites": len(split.sites)}
    threads = max(1, (os.cpu_count() or 1) // len(split.sites))
    with LoopbackDeployment(out.parent / f"{out.name}-deployment", split_dir, threads_per_site=threads) as deployment:
        deployment.run(settings, out)


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


@click.command()
@click.option("--data", "split_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--preset", default="paper", show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--freeze-rounds", default=0, show_default=True)
@click.option("--local-epochs", default=3, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench-federated"), show_default=True)
@click.option("--compress", is_flag=True, help="Sites send top-k + int8 updates.")
@click.option("--compress-downlink", is_flag=True, help="The global model travels as compressed changes.")
@click.option("--topk", default=0.1, show_default=True, help="Share of entries sent with --compress/--compress-downlink.")
@click.option("--engine", type=click.Choice(["simulation", "deployment"]), default="simulation", show_default=True,
              help="Flower's simulation (Ray), or its deployment engine on loopback (a process per site).")
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
def main(split_dir: Path, preset: str, rounds: int, freeze_rounds: int, local_epochs: int, batch_size: int,
         compress: bool, compress_downlink: bool, topk: float, engine: str, out: Path, force: bool) -> None:
    from fedlite.data.manifest import read_dataset
    from fedlite.data.split import load_split
    from fedlite.text import builtin_tokenizer, encode_notes

    split = load_split(split_dir)
    cfg = FederatedConfig(split_dir=str(split_dir), out=str(out), preset=preset, rounds=rounds,
                          freeze_rounds=freeze_rounds, local_epochs=local_epochs, batch_size=batch_size,
                          eval_every=rounds, compress=compress, compress_downlink=compress_downlink,
                          topk_fraction=topk)
    if engine == "deployment":
        run_deployed(cfg, split_dir, force)
    else:
        from fedlite.federated.simulation import run_federated_simulation

        run_federated_simulation(cfg, force=force)
    history = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    notes = [c.text for c in read_dataset(Path(split_dir) / split.sites[0]).cases]
    tokens = sum(len(ids) for ids in encode_notes(builtin_tokenizer(), notes, 512).ids) / len(notes)
    report = summarize(history, training_flops_per_sample(preset, "both", tokens), len(split.sites))
    report.update(preset=preset, sites=len(split.sites), local_epochs=local_epochs, mean_tokens=tokens, engine=engine,
                  compress=compress, compress_downlink=compress_downlink,
                  topk=topk if compress or compress_downlink else None, machine=machine_info(), gpu=gpu_name())
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
