"""The ``fedlite`` command line: thin click commands over library functions a test can call."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from fedlite import __version__
from fedlite.errors import InputError


class FedliteGroup(click.Group):
    """Shows bad input as a plain message (no traceback) and exits 2; real bugs keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("urllib3", "matplotlib", "PIL", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=FedliteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedlite")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Federated multimodal leukemia diagnosis: blood-smear image + clinical note -> leukemia and stage."""
    _setup_logging(verbose)


@main.group(cls=FedliteGroup)
def data() -> None:
    """Make, partition and validate manifest datasets."""


@data.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cases", default=5400, show_default=True, help="Number of image-note cases.")
@click.option("--seed", default=0, show_default=True)
@click.option("--positive-fraction", default=0.55, show_default=True)
@click.option("--stages", default=4, show_default=True, help="Number of clinical stages K.")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
@click.option("--force", is_flag=True, help="Replace an existing dataset directory.")
def data_synth(out: Path, cases: int, seed: int, positive_fraction: float, stages: int,
               workers: int | None, force: bool) -> None:
    """Generate the embedded synthetic smear + note dataset into OUT (offline, deterministic)."""
    from fedlite.data.synth import synthesize

    start = time.perf_counter()
    dataset = synthesize(out, n_cases=cases, seed=seed, positive_fraction=positive_fraction,
                         num_stages=stages, workers=workers, force=force)
    click.echo(f"wrote {len(dataset)} cases to {out} in {time.perf_counter() - start:.1f} s")


@data.command("split")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--clients", default=10, show_default=True, help="Number of sites.")
@click.option("--alpha", default=1.0, show_default=True,
              help="Dirichlet concentration over label/stage per site (smaller = more skewed).")
@click.option("--test-fraction", default=0.2, show_default=True, help="Held-out global test share.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: DATA/split.")
@click.option("--force", is_flag=True, help="Replace an existing split directory.")
def data_split(data_dir: Path, clients: int, alpha: float, test_fraction: float, seed: int,
               out: Path | None, force: bool) -> None:
    """Partition DATA into non-IID sites plus a stratified held-out test split."""
    from fedlite.data.split import format_split_table, split_dataset

    summary = split_dataset(data_dir, out, clients=clients, alpha=alpha, test_fraction=test_fraction,
                            seed=seed, force=force)
    click.echo(format_split_table(summary))
    click.echo(f"\nwrote {summary.out_dir}")


@data.command("check")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--no-images", is_flag=True, help="Only check that image files exist, do not decode them.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def data_check(data_dir: Path, no_images: bool, as_json: bool) -> None:
    """Validate a dataset and report every problem with file, line and field."""
    from fedlite.data.check import check_dataset, format_report

    report = check_dataset(data_dir, decode_images=not no_images, progress=not as_json)
    if as_json:
        click.echo(json.dumps({"root": str(report.root), "cases": report.cases, "counts": report.counts,
                               "problems": [str(p) for p in report.problems]}, indent=2))
    else:
        click.echo(format_report(report))
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option("--centralized", is_flag=True,
              help="Train on pooled data (the paper's centralized baseline) instead of federated.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="A split directory from 'fedlite data split' (sites + test/); --centralized also takes "
                   "a plain dataset directory.")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Held-out dataset evaluated every epoch (default: the split's test/). Centralized only.")
@click.option("--preset", type=click.Choice(["paper", "small", "tiny"]), default="small", show_default=True)
@click.option("--modality", type=click.Choice(["both", "image", "text"]), default="both", show_default=True)
@click.option("--fusion", type=click.Choice(["concat", "gated"]), default="concat", show_default=True)
@click.option("--epochs", default=3, show_default=True, help="Epochs (centralized) or local epochs E per round.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, help="Initial learning rate (decays linearly).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
              help="sgd as in the paper (momentum 0.9, weight decay 5e-4); adamw for randomly initialised encoders.")
@click.option("--gamma", default=1.0, show_default=True, help="Weight of the stage loss.")
@click.option("--image-weights", type=click.Path(path_type=Path), default=None,
              help="A local timm ViT checkpoint file.")
@click.option("--text-weights", type=click.Path(path_type=Path), default=None,
              help="A local transformers BERT directory with its tokenizer.")
@click.option("--rounds", default=10, show_default=True, help="Federated rounds T.")
@click.option("--sites-per-round", default=0, show_default=True, help="Sites sampled per round (0: all).")
@click.option("--freeze-rounds", default=2, show_default=True,
              help="Rounds with frozen encoders (only fusion and heads train and travel).")
@click.option("--strategy", type=click.Choice(["fedavg", "fedprox"]), default="fedavg", show_default=True)
@click.option("--proximal-mu", default=0.01, show_default=True, help="FedProx's μ (with --strategy fedprox).")
@click.option("--dp", is_flag=True, help="Opacus DP-SGD at every site.")
@click.option("--noise-multiplier", default=1.5, show_default=True, help="DP noise σ.")
@click.option("--max-grad-norm", default=1.0, show_default=True, help="DP per-case clipping norm C.")
@click.option("--dp-delta", default=1e-5, show_default=True, help="DP δ.")
@click.option("--compress", is_flag=True, help="Send top-k + int8 updates with error feedback.")
@click.option("--topk", default=0.1, show_default=True, help="Share of update entries sent with --compress.")
@click.option("--round-timeout", default=0.0, show_default=True,
              help="Seconds a round waits for sites (0: all); late updates are folded in later rounds.")
@click.option("--max-staleness", default=2, show_default=True, help="Rounds a late update may lag.")
@click.option("--staleness-decay", default=0.5, show_default=True, help="λ in (N_c/N)·e^(−λτ).")
@click.option("--convergence-tol", default=0.0, show_default=True, help="Stop when ‖θ_t+1 − θ_t‖ is below it.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
              help="Continue a federated run from its last completed round.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", default=0, show_default=True, help="Data-loading processes (centralized).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/centralized or runs/federated).")
def train(centralized: bool, data_dir: Path | None, eval_data: Path | None, preset: str, modality: str,
          fusion: str, epochs: int, batch_size: int, lr: float, optimizer: str, gamma: float,
          image_weights: Path | None, text_weights: Path | None, rounds: int, sites_per_round: int,
          freeze_rounds: int, strategy: str, proximal_mu: float, dp: bool, noise_multiplier: float,
          max_grad_norm: float, dp_delta: float, compress: bool, topk: float, round_timeout: float,
          max_staleness: int, staleness_decay: float, convergence_tol: float, resume_dir: Path | None,
          device: str, workers: int, seed: int, out: Path | None) -> None:
    """Train Fed-MMX: federated across the sites of a split (a Flower simulation), or --centralized."""
    from fedlite.metrics import format_metrics

    if resume_dir is None and data_dir is None:
        raise click.UsageError("give --data (or --resume RUN_DIR)")
    if centralized:
        from fedlite.centralized import train_centralized
        from fedlite.training import TrainConfig

        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, gamma=gamma, optimizer=optimizer)
        result = train_centralized(data_dir, out or Path("runs/centralized"), preset=preset, modality=modality,
                                   fusion=fusion, train_config=config, eval_data=eval_data,
                                   image_weights=image_weights, text_weights=text_weights, device=device,
                                   seed=seed, num_workers=workers)
        if result.best_metrics:
            stage_names = json.loads((result.best_checkpoint / "config.json").read_text())["stage_names"]
            click.echo(format_metrics(result.best_metrics, stage_names))
        click.echo(f"\nbest checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}"
                   f"\ncurves: {result.run_dir / 'curves.png'}")
        return
    from fedlite.federated.config import FederatedConfig
    from fedlite.federated.server_app import load_run_config
    from fedlite.federated.simulation import run_federated_simulation

    if resume_dir is not None:
        cfg = load_run_config(resume_dir)
    else:
        cfg = FederatedConfig(
            split_dir=str(data_dir), out=str(out or Path("runs/federated")), preset=preset, modality=modality,
            fusion=fusion, rounds=rounds, sites_per_round=sites_per_round, freeze_rounds=freeze_rounds,
            convergence_tol=convergence_tol, round_timeout=round_timeout, max_staleness=max_staleness,
            staleness_decay=staleness_decay, local_epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, gamma=gamma, proximal_mu=proximal_mu if strategy == "fedprox" else 0.0,
            dp=dp, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, dp_delta=dp_delta,
            compress=compress, topk_fraction=topk, seed=seed, device=device,
            image_weights=str(image_weights or ""), text_weights=str(text_weights or ""))
    summary = run_federated_simulation(cfg, resume=resume_dir is not None)
    if summary.get("best"):
        stage_names = json.loads((Path(cfg.out) / "best" / "config.json").read_text())["stage_names"]
        click.echo(format_metrics(summary["best"], stage_names))
    sent, received = summary["bytes_sent"], summary["bytes_received"]
    click.echo(f"\nrounds: {summary['rounds']} (best: {summary['best_round']}); sent {sent / 1e6:.1f} MB, "
               f"received {received / 1e6:.1f} MB" + (f"; worst site ε = {summary['epsilon']:.2f}"
                                                      if summary.get("epsilon") is not None else ""))
    click.echo(f"best checkpoint: {Path(cfg.out) / 'best'}\nrounds: {Path(cfg.out) / 'rounds.jsonl'}"
               f"\ncurves: {Path(cfg.out) / 'curves.png'}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(checkpoint: Path, data_dir: Path, batch_size: int, device: str, as_json: bool) -> None:
    """Accuracy, AUC, stage macro-P/R/F1 and confusion matrix of CHECKPOINT on a dataset."""
    from fedlite.checkpoint import read_checkpoint_meta
    from fedlite.evaluate import evaluate_checkpoint
    from fedlite.metrics import format_metrics

    metrics = evaluate_checkpoint(checkpoint, data_dir, device=device, batch_size=batch_size,
                                  progress=not as_json)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(format_metrics(metrics, read_checkpoint_meta(checkpoint)["stage_names"]))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("fedlite-quickstart"), show_default=True)
@click.option("--cases", default=1600, show_default=True)
@click.option("--rounds", default=8, show_default=True, help="Federated rounds.")
@click.option("--local-epochs", default=1, show_default=True,
              help="Local epochs per round (the centralized baseline trains rounds x local epochs).")
@click.option("--preset", type=click.Choice(["paper", "small", "tiny"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
def quickstart(out: Path, cases: int, rounds: int, local_epochs: int, preset: str, seed: int) -> None:
    """The whole pipeline on the embedded synthetic data, on CPU, in minutes."""
    from fedlite.quickstart import run_quickstart

    run_quickstart(out, cases=cases, rounds=rounds, local_epochs=local_epochs, preset=preset, seed=seed,
                   echo=click.echo)


if __name__ == "__main__":
    main()
