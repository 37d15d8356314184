"""The ``fedlite`` command line: thin click commands over library functions a test can call."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import click

from fedlite import __version__
from fedlite.cli_groups import BenchGroup, ExportGroup, FedliteGroup
from fedlite.cli_modes import ModalCommand
from fedlite.cli_options import (EXPORT_MODES, TRAIN_MODES, case_input, case_options, centralized_train_config,
                                 export_options, export_pipeline_options, federated_config, train_options)
from fedlite.data.corruption import CORRUPTIONS
from fedlite.errors import InputError
from fedlite.log_setup import setup_logging
from fedlite.presets import PRESETS


@click.group(cls=FedliteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedlite")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Federated multimodal leukemia diagnosis: blood-smear image + clinical note -> leukemia and stage."""
    setup_logging(verbose)


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


@data.command("pool")
@click.argument("split_dir", metavar="SPLIT", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def data_pool(split_dir: Path, out: Path, force: bool) -> None:
    """OUT/train and OUT/val: the sites' training and validation parts of SPLIT pooled, the cases a
    federated run trains and validates on, so a centralized baseline
    (`fedlite train --centralized --data OUT/train --eval-data SPLIT/test`) sees the same ones.
    A simulation's convenience: in a deployment no one holds these."""
    from fedlite.atomic import staged_dir
    from fedlite.data.holdout import VAL_DIR, pooled_site_parts
    from fedlite.data.split import load_split

    sites = load_split(split_dir).sites
    with staged_dir(out, force, "pooled dataset") as staging:  # an interrupted pool replaces nothing
        pooled_site_parts(split_dir, sites, staging)
    click.echo(f"wrote {out / 'train'} and {out / VAL_DIR} from {len(sites)} sites")


@data.command("corrupt")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(CORRUPTIONS), required=True)
@click.option("--strength", type=float, required=True,
              help="blur: standard deviation in pixels; noise: standard deviation as a share of 0-255.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def data_corrupt(data_dir: Path, out: Path, kind: str, strength: float, seed: int, force: bool) -> None:
    """A copy of DATA with every image blurred or noised, to score how a model holds up on poor slides
    (`fedlite evaluate CKPT --data OUT`, `fedlite predict BUNDLE --data OUT`)."""
    from fedlite.data.corruption import corrupted_copy

    copy = corrupted_copy(data_dir, out, kind, strength, seed=seed, force=force)
    click.echo(f"wrote {len(copy)} cases with {kind} {strength:g} to {copy.root}")


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


@main.command(cls=ModalCommand, modes=TRAIN_MODES)
@train_options
def train(**o) -> None:
    """Train Fed-MMX: federated across the sites of a split (a Flower simulation), --centralized on
    pooled cases, --edge (a bundle's head) or --resume. Options that do not act in the chosen kind
    of run are refused."""
    if o["resume_dir"] is None and o["data_dir"] is None:
        raise click.UsageError("give --data (or --resume RUN_DIR)")
    if o["centralized"]:
        from fedlite.centralized import train_centralized

        result = train_centralized(o["data_dir"], o["out"] or Path("runs/centralized"), preset=o["preset"],
                                   modality=o["modality"], fusion=o["fusion"], train_config=centralized_train_config(o),
                                   eval_data=o["eval_data"], image_weights=o["image_weights"],
                                   text_weights=o["text_weights"], device=o["device"], seed=o["seed"],
                                   num_workers=o["workers"], force=o["force"])
        click.echo(result.describe())
        return
    from fedlite.federated.config import FederatedConfig
    from fedlite.federated.simulation import run_federated_simulation

    resumed = o["resume_dir"] is not None
    cfg = FederatedConfig.from_run_dir(o["resume_dir"]) if resumed else federated_config(o)
    if o["edge_bundle"] is not None:
        from fedlite.export.bundle import verify_bundle
        from fedlite.federated.edge_server import edge_signing_key, format_edge_summary

        verify_bundle(o["edge_bundle"])  # a bad bundle, or a signed one without a key, is refused here,
        edge_signing_key(o["edge_bundle"], o["sign_key"])  # not inside the simulation
        click.echo(format_edge_summary(run_federated_simulation(cfg, force=o["force"])))
        return
    from fedlite.federated.server_app import format_training_summary

    summary = run_federated_simulation(cfg, resume=resumed, force=o["force"])
    click.echo(format_training_summary(summary, Path(cfg.out)))


@main.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(checkpoints: tuple[Path, ...], data_dir: Path, batch_size: int, device: str, as_json: bool) -> None:
    """Accuracy, AUC, stage macro-P/R/F1 and confusion matrix of CHECKPOINT on a dataset; of several
    checkpoints' averaged probabilities (late fusion, e.g. an image-only and a text-only run)."""
    from fedlite.checkpoint import read_checkpoint_meta
    from fedlite.evaluate import evaluate_late_fusion
    from fedlite.metrics import format_metrics

    metrics = evaluate_late_fusion(list(checkpoints), data_dir, device=device, batch_size=batch_size,
                                   progress=not as_json)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
    else:
        click.echo(format_metrics(metrics, read_checkpoint_meta(checkpoints[0])["stage_names"]))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write the table (FILE.md) and the curves (FILE.png).")
@click.option("--link-mbps", default="", help="Also model the federated runs' rounds on these line rates in Mbit/s "
              "(e.g. 20,100), from their recorded bytes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compare(runs: tuple[Path, ...], out: Path | None, link_mbps: str, as_json: bool) -> None:
    """Held-out metrics, bytes and time of finished runs (federated or centralized) side by side."""
    from dataclasses import asdict

    from fedlite.atomic import atomic_write_text
    from fedlite.compare import load_run, markdown_table, plot_runs
    from fedlite.federated.link_model import parse_link_mbps

    rates = parse_link_mbps(link_mbps)
    summaries = [load_run(run, rates) for run in runs]
    table = markdown_table(summaries)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".md"), table)
        plot_runs(summaries, out.with_suffix(".png"))
    if as_json:
        click.echo(json.dumps([asdict(s) for s in summaries], indent=2))
    else:
        click.echo(table, nl=False)
        if out is not None:
            click.echo(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


@main.group(cls=ExportGroup)
def export() -> None:
    """Distill, prune, quantize and verify a checkpoint into a bundle (`fedlite export CKPT --int8`);
    `fedlite export verify BUNDLE` re-checks a bundle's hashes."""


@export.command("build", cls=ModalCommand, modes=EXPORT_MODES)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@export_options
def export_build(checkpoint: Path, **o) -> None:
    """Turn the teacher CHECKPOINT into a verified bundle for CPU servers.

    The data is chosen explicitly: --sites SPLIT (every step at the sites, on their own cases), --data DIR
    (pooled cases) or --proxy-data DIR with --eval-data DIR.
    The bundle is written only if it passes the parity gate against the teacher."""
    from fedlite.export.pipeline import export_bundle, format_export_summary

    out = o["out"] or checkpoint.parent / "bundle"
    options = export_pipeline_options(o, out)
    if o["sites_split"] is not None:
        from fedlite.export.federated import EXPORT_RUN, export_simulated

        run = dataclasses.replace(EXPORT_RUN, batch_size=o["batch_size"], seed=o["seed"], device=o["device"],
                                  site_val_fraction=o["site_val_fraction"], local_epochs=o["site_epochs"])
        result = export_simulated(checkpoint, out, options, o["sites_split"], run, force=o["force"])
    else:
        result = export_bundle(checkpoint, out, options, data=o["data_dir"], eval_data=o["eval_data"],
                               calibration=o["calibration"], force=o["force"], proxy_data=o["proxy_data"])
    click.echo(json.dumps(result.meta, indent=2) if o["as_json"] else format_export_summary(result))


@export.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Also require the signature of this Ed25519 public key's holder (PEM).")
def export_verify(bundle: Path, public_key: Path | None) -> None:
    """Re-check every file of BUNDLE against the SHA-256 recorded at export (and, with --public-key,
    the signature over them); exit 2 if anything differs."""
    from fedlite.export.bundle import verify_bundle

    meta = verify_bundle(bundle, public_key)
    signed = ", signed by the key's holder" if public_key is not None else ""
    click.echo(f"{bundle}: {len(meta['files'])} files match their SHA-256{signed} (bundle version "
               f"{meta['bundle_version']}, preset {meta['preset']})")


@export.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Where the public key goes (default: PRIVATE_KEY with .pub).")
def export_keygen(private_key: Path, public_key: Path | None) -> None:
    """Make an Ed25519 key pair for signing bundles: the private key (owner-only) stays with whoever
    exports; the public key goes to every agent (`bundle_public_key` in agent.toml)."""
    from fedlite.export.signing import generate_key_pair

    public_key = public_key or private_key.with_suffix(".pub")
    generate_key_pair(private_key, public_key)
    click.echo(f"private key: {private_key} (keep it secret)\npublic key: {public_key}")


_PUBLIC_KEY_OPTION = click.option("--public-key", type=click.Path(path_type=Path), default=None,
                                  help="Refuse the bundle unless it is signed by this Ed25519 public key's holder (PEM).")
_THREADS_OPTION = click.option("--threads", default=0, show_default=True, help="ONNX Runtime threads (0: up to 4).")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@case_options("Predict every case of this dataset instead (JSON lines to --out).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: DATA/predictions.jsonl.")
@_THREADS_OPTION
@click.option("--batch-size", default=16, show_default=True)
@_PUBLIC_KEY_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def predict(bundle: Path, image: Path | None, text: str | None, text_file: Path | None, data_dir: Path | None,
            out: Path | None, threads: int, batch_size: int, public_key: Path | None, as_json: bool) -> None:
    """Leukemia and stage for one case (--image with --text or --text-file) or a dataset (--data)."""
    from fedlite.agents.predict import format_case, predict_case, predict_manifest
    from fedlite.agents.runtime import BundleRuntime, RuntimeSettings
    from fedlite.metrics import format_metrics

    case = case_input(image, text, text_file, data_dir)
    runtime = BundleRuntime(bundle, RuntimeSettings(threads=threads), public_key=public_key)
    if case is not None:
        result = predict_case(runtime, *case)
        click.echo(json.dumps(result, indent=2) if as_json else format_case(result))
        return
    summary = predict_manifest(runtime, data_dir, out or data_dir / "predictions.jsonl", batch_size,
                               progress=not as_json)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_metrics(summary["metrics"], runtime.stage_names))
        click.echo(f"\n{summary['cases']} predictions: {summary['out']}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@case_options("Explain cases of this dataset instead, and measure consistency and sparsity over them.")
@click.option("--case-id", default=None, help="Name of the one case's report (default: the image's file name).")
@click.option("--case", "case_ids", multiple=True, help="With --data: only these case ids (repeatable).")
@click.option("--limit", default=0, show_default=True, help="With --data: at most this many cases (0: all).")
@click.option("--report-dir", type=click.Path(path_type=Path), default=Path("fedlite-reports"), show_default=True,
              help="Where the owner-only PNG/HTML/JSON reports go.")
@click.option("--max-evals", default=500, show_default=True, help="Model evaluations per modality.")
@click.option("--baseline", type=click.Choice(["mean", "black"]), default="mean", show_default=True,
              help="What a masked image patch shows.")
@click.option("--modality-weight", default=0.5, show_default=True, help="λ of the joint profile (eq. 23).")
@click.option("--batch-size", default=16, show_default=True, help="Masked inputs per encoder call.")
@_THREADS_OPTION
@_PUBLIC_KEY_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def explain(bundle: Path, image: Path | None, text: str | None, text_file: Path | None, data_dir: Path | None,
            case_id: str | None, case_ids: tuple[str, ...], limit: int, report_dir: Path, max_evals: int,
            baseline: str, modality_weight: float, batch_size: int, threads: int, public_key: Path | None,
            as_json: bool) -> None:
    """SHAP explanations computed on this machine: image patches and note words, for P(leukemia) and
    the predicted stage; reports stay in --report-dir."""
    from fedlite.agents.explain import ExplainSettings, explain_case
    from fedlite.agents.explain_report import write_explanation
    from fedlite.agents.runtime import BundleRuntime, RuntimeSettings

    case = case_input(image, text, text_file, data_dir)
    if case is not None and (case_ids or limit):
        raise InputError("--case and --limit choose cases of a dataset", hint="give --data, or drop them")
    if case is None and case_id is not None:
        raise InputError("--case-id names the report of one case", hint="give --case to choose dataset cases")
    settings = ExplainSettings(max_evals=max_evals, baseline=baseline, batch_size=batch_size,
                               modality_weight=modality_weight)
    runtime = BundleRuntime(bundle, RuntimeSettings(threads=threads), public_key=public_key)
    if case is not None:
        (image, note), name = case, case_id or image.stem
        smear, pixels = runtime.load_smear(image)
        expl = explain_case(runtime, pixels, note, settings)
        paths = write_explanation(expl, name, note, smear, runtime.meta, report_dir)
        if as_json:
            click.echo(json.dumps({"prediction": expl.prediction, "timings": expl.timings,
                                   **{k: str(v) for k, v in paths.items()}}, indent=2))
        else:
            click.echo(f"{expl.describe(name)}\nreport: {paths['html']}\n        {paths['png']}\n        {paths['json']}")
        return
    from fedlite.agents.interpretability import explain_dataset, format_dataset_summary
    from fedlite.data.manifest import read_dataset

    summary = explain_dataset(runtime, read_dataset(data_dir), list(case_ids), settings, report_dir,
                              progress=not as_json, limit=limit,
                              on_case=None if as_json else lambda c: click.echo(c.explanation.describe(c.case_id)))
    click.echo(json.dumps(summary, indent=2) if as_json else format_dataset_summary(summary, report_dir))


def _int_list(value: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{name} must be comma-separated integers, got {value!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"{name} needs positive integers, got {value!r}")
    return values


@main.group(cls=BenchGroup)
def bench() -> None:
    """Measure on this machine: a bundle beside its teacher (`fedlite bench BUNDLE`), and the
    benchmarks behind the project's reports."""


@bench.command("measure")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="Teacher checkpoint: adds torch FP32, ONNX FP32 and ONNX INT8 teacher baselines.")
@click.option("--student-fp32", type=click.Path(path_type=Path), default=None,
              help="FP32 bundle of the same student (default: BUNDLE-fp32 if present).")
@click.option("--beside", multiple=True, type=click.Path(path_type=Path),
              help="Another bundle timed in the same run on the same cases (repeatable), e.g. a MobileNetV2 "
                   "student beside ViT ones.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Cases to time (dataset or split dir); default: the bundle's verification data.")
@click.option("--threads", default="1,2", show_default=True, help="Intra-op thread counts.")
@click.option("--batch", "batches", default="1,8,32", show_default=True, help="Batch sizes for throughput.")
@click.option("--runs", default=100, show_default=True, help="Timed single-stream runs per repeat.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--explain-cases", default=3, show_default=True,
              help="Cases explained with the bundle and, with --teacher, with naive shap on the teacher (0: skip).")
@click.option("--max-evals", default=500, show_default=True, help="SHAP evaluations per modality.")
@click.option("--edge-site", type=click.Path(path_type=Path), default=None,
              help="A site's dataset for the edge round (default: the split's first site).")
@click.option("--no-agent", is_flag=True, help="Skip explanations, the edge round and the memory budget.")
@click.option("--ram-budget", default=None, help="Server memory to check the agent's heavy path against, e.g. 8G.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-report"), show_default=True)
def bench_bundle(bundle: Path, teacher: Path | None, student_fp32: Path | None, beside: tuple[Path, ...],
                 data_dir: Path | None, threads: str,
                 batches: str, runs: int, repeats: int, explain_cases: int, max_evals: int, edge_site: Path | None,
                 no_agent: bool, ram_budget: str | None, out: Path) -> None:
    """CPU latency, throughput and memory of BUNDLE beside the teacher baselines, accuracy beside speed;
    the agent's explanation and edge-round costs and its peak memory."""
    from fedlite.agents.config_values import parse_memory
    from fedlite.bench.agent_bench import AgentBenchSettings
    from fedlite.bench.report import write_report
    from fedlite.bench.runner import BenchSettings, run_bench

    settings = BenchSettings(threads=_int_list(threads, "--threads"), batches=_int_list(batches, "--batch"),
                             runs=runs, repeats=repeats)
    try:
        budget = parse_memory(ram_budget) if ram_budget else None
    except ValueError as exc:
        raise InputError(f"--ram-budget: {exc}", hint='a size like "8G" or "512M"') from None
    agent = None if no_agent else AgentBenchSettings(explain_cases=explain_cases, max_evals=max_evals,
                                                     ram_budget_bytes=budget)
    report = run_bench(bundle, teacher=teacher, student_fp32=student_fp32, data=data_dir, settings=settings,
                       work=out / "work", agent=agent, site=edge_site, beside=beside)
    paths = write_report(report, out)
    click.echo(paths["markdown"].read_text(encoding="utf-8"))
    click.echo(f"report: {paths['json']}, {paths['markdown']}, {paths['plot']}")


@main.group(cls=FedliteGroup)
def agent() -> None:
    """The hospital agent: install it as a systemd service, check its setup, run its SuperNode."""


_AGENT_CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(path_type=Path),
                                    default=Path("/etc/fedlite/agent.toml"), show_default=True,
                                    help="The agent's TOML config.")


@agent.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path), default=Path("node_key"))
def agent_keygen(private_key: Path) -> None:
    """Make this hospital's node key pair: PRIVATE_KEY (owner-only) and PRIVATE_KEY.pub, which the
    coordinator registers (flwr supernode register) so its SuperLink admits this agent."""
    from fedlite.agents.node_identity import generate_node_key_pair

    identity = generate_node_key_pair(private_key)
    public = private_key.with_name(private_key.name + ".pub")
    click.echo(f"private key: {private_key} (keep it on this server, readable only by the agent's user)\n"
               f"public key:  {public}\n\n"
               f"send {public} to the coordinator, who registers it:\n"
               f"  flwr supernode register {public.name} <connection> --name <hospital>\n"
               f"then: fedlite agent install ... --private-key {private_key.absolute()}\n"
               f"({identity.curve} {identity.public_key_openssh[:50]}...)")


@agent.command("install")
@_AGENT_CONFIG_OPTION
@click.option("--prefix", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write under DIR as if it were / (staging an image); the files name their final paths.")
@click.option("--dry-run", is_flag=True, help="Print both files and write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing config and unit.")
@click.option("--superlink", required=True, help="The SuperLink's host:port.")
@click.option("--root-certificate", type=click.Path(path_type=Path), default=None,
              help="PEM CA certificate that signed the SuperLink's certificate (default: the system's CAs).")
@click.option("--insecure", is_flag=True, help="No TLS at all (tests and labs only).")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle directory.")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True, help="This site's dataset directory.")
@click.option("--report-dir", type=click.Path(path_type=Path), required=True, help="Where explanations go.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("/var/lib/fedlite/cache"),
              show_default=True, help="Embedding cache.")
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads (0: up to 4).")
@click.option("--memory-max", default="4G", show_default=True, help="systemd MemoryMax, e.g. 6G or 512M.")
@click.option("--private-key", type=click.Path(path_type=Path), default=None,
              help="This hospital's node key (OpenSSH EC, from 'fedlite agent keygen'): the SuperLink admits "
                   "only registered keys. Required unless --insecure.")
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Its public key (default: PRIVATE_KEY.pub when it exists).")
@click.option("--clientappio-port", type=int, default=9094, show_default=True,
              help="Local Runtime API port; distinct per agent on one host.")
@click.option("--user", default="fedlite", show_default=True, help="System user the service runs as.")
def agent_install(config_path: Path, prefix: Path | None, dry_run: bool, force: bool, superlink: str,
                  root_certificate: Path | None, insecure: bool, bundle: Path, data_dir: Path, report_dir: Path,
                  cache_dir: Path, threads: int, memory_max: str, private_key: Path | None,
                  public_key: Path | None, clientappio_port: int, user: str) -> None:
    """Write the agent's config and its systemd unit (fedlite-agent.service)."""
    from fedlite.agents.install import (config_from_options, follow_up_commands, install_identity, plan_install,
                                        write_install)

    config_path = config_path.expanduser().absolute()
    config = config_from_options({
        "superlink.address": superlink, "superlink.root_certificate": root_certificate, "superlink.insecure": insecure,
        "node.private_key": private_key, "node.public_key": public_key, "node.clientappio_port": clientappio_port,
        "site.bundle": bundle, "site.data_dir": data_dir, "site.report_dir": report_dir, "site.cache_dir": cache_dir,
        "resources.threads": threads, "resources.memory_max": memory_max}, config_path)
    config = install_identity(config, prefix)
    plan = plan_install(config, config_path=config_path, prefix=prefix, user=user)
    if not plan.executable.is_file():
        click.secho(f"warning: {plan.executable} does not exist; the unit's ExecStart needs it", fg="yellow", err=True)
    if dry_run:
        for target, text in ((plan.config_write_path, plan.config_text), (plan.unit_write_path, plan.unit_text)):
            click.echo(f"# ---- {target}\n{text}")
    else:
        write_install(plan, force=force)
        click.echo(f"wrote {plan.config_write_path}\nwrote {plan.unit_write_path}")
    click.echo("\nthen, as root:\n" + "\n".join(f"  {c}" for c in follow_up_commands(plan)))


@agent.command("check")
@_AGENT_CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the SuperLink.")
def agent_check(config_path: Path, as_json: bool, timeout: float) -> None:
    """Check config, certificate, bundle, data, directories, memory and the SuperLink; report every problem."""
    from fedlite.agents.check import checks_json, checks_ok, format_checklist, run_checks

    items = run_checks(config_path, probe_timeout=timeout)
    if as_json:
        click.echo(json.dumps(checks_json(items, config_path), indent=2, ensure_ascii=False))
    else:
        click.echo(format_checklist(items, config_path))
    sys.exit(0 if checks_ok(items) else 1)


@agent.command("run")
@_AGENT_CONFIG_OPTION
@click.option("--max-retries", default=0, show_default=True,
              help="Retries after failures in a row (SuperLink unreachable, SuperNode crashed) before giving "
                   "up with exit 69 (0: retry forever).")
@click.option("--initial-backoff", default=5.0, show_default=True,
              help="Seconds before the first retry; doubles per failure (with jitter) up to --max-backoff.")
@click.option("--max-backoff", default=300.0, show_default=True, help="Longest wait between attempts, seconds.")
@click.option("--probe-timeout", default=5.0, show_default=True, help="Seconds to wait for the SuperLink's answer.")
def agent_run(config_path: Path, max_retries: int, initial_backoff: float, max_backoff: float,
              probe_timeout: float) -> None:
    """Run Flower's SuperNode for this site, reconnecting with backoff; exit 78 on TLS/config errors."""
    import threading

    from fedlite.agents.agent_config import read_agent_config
    from fedlite.agents.supernode import EXIT_CONFIG, RetryPolicy, run_agent, stop_on_signals
    from fedlite.log_setup import configure_agent_logging

    configure_agent_logging()
    agent_log = logging.getLogger("fedlite.agents.run")
    if max_retries < 0 or initial_backoff <= 0 or max_backoff < initial_backoff or probe_timeout <= 0:
        agent_log.error("--max-retries must be >= 0, --initial-backoff and --probe-timeout > 0, "
                        "--max-backoff >= --initial-backoff")
        sys.exit(EXIT_CONFIG)
    try:
        config = read_agent_config(config_path)
        with stop_on_signals(threading.Event()) as stop:
            code = run_agent(config, RetryPolicy(initial=initial_backoff, cap=max_backoff, max_retries=max_retries),
                             stop, probe_timeout=probe_timeout)
    except InputError as exc:
        agent_log.error("configuration error: %s", exc)
        sys.exit(EXIT_CONFIG)
    sys.exit(code)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("fedlite-quickstart"), show_default=True)
@click.option("--cases", default=1600, show_default=True)
@click.option("--rounds", default=8, show_default=True, help="Federated rounds.")
@click.option("--local-epochs", default=1, show_default=True,
              help="Local epochs per round (the centralized baseline trains rounds x local epochs).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--export-epochs", default=15, show_default=True,
              help="Distillation epochs of the export at the sites (3 local epochs a round).")
@click.option("--report-only-gate", is_flag=True,
              help="Print the export's parity table but write the bundle whatever it says (smoke runs on a "
                   "handful of cases, where agreement rates mean little).")
@click.option("--seed", default=0, show_default=True)
def quickstart(out: Path, cases: int, rounds: int, local_epochs: int, preset: str, export_epochs: int,
               report_only_gate: bool, seed: int) -> None:
    """The whole pipeline on the embedded synthetic data, on CPU, in minutes."""
    from fedlite.quickstart import run_quickstart

    run_quickstart(out, cases=cases, rounds=rounds, local_epochs=local_epochs, preset=preset, seed=seed,
                   export_epochs=export_epochs, gate_applies=not report_only_gate,
                   echo=click.echo)


def _numbers(value: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"comma-separated numbers, got {value!r}", param_hint=option) from None


@main.command()
@click.argument("split", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("fedlite-report"), show_default=True,
              help="Runs, bundles and the report; rerun with the same --out to resume or reuse them.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--rounds", default=8, show_default=True, help="Federated rounds (one local epoch each).")
@click.option("--epochs", default=None, type=int, help="Epochs of the pooled baselines (default: --rounds).")
@click.option("--export-epochs", default=15, show_default=True,
              help="Distillation epochs of the bundle at the sites (3 local epochs a round).")
@click.option("--shares", default="0.25,0.5", show_default=True, help="Shares of the training cases to retrain on.")
@click.option("--blur", default="1,2,3", show_default=True, help="Gaussian blur σ in pixels.")
@click.option("--noise", default="16,32,64", show_default=True, help="Gaussian noise σ on the 0-255 scale.")
@click.option("--explain-cases", default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild every run, even one of another split or stage names.")
def report(split: Path, out: Path, preset: str, rounds: int, epochs: int | None, export_epochs: int, shares: str,
           blur: str, noise: str, explain_cases: int, seed: int, force: bool) -> None:
    """The paper's comparisons on SPLIT (unimodal, late fusion, fusion layer, pooled against federated),
    robustness to blur, noise and fewer cases, and explanation quality: one HTML page, Markdown, JSON."""
    from fedlite.report.build import build_report
    from fedlite.report.page import ordering_sentences
    from fedlite.report.runs import ReportSettings

    fractions = _numbers(shares, "--shares")
    if not all(0 < f < 1 for f in fractions):
        raise click.BadParameter("every share must be between 0 and 1 (the whole is always included)",
                                 param_hint="--shares")
    settings = ReportSettings(preset=preset, rounds=rounds, epochs=epochs or rounds, export_epochs=export_epochs,
                              shares=fractions, blur=_numbers(blur, "--blur"), noise=_numbers(noise, "--noise"),
                              explain_cases=explain_cases, seed=seed)
    result = build_report(split, out, settings, force=force, echo=click.echo)
    click.echo("\n" + "\n".join(ordering_sentences(result)))
    click.echo(f"\nreport: {result['files']['html']} (also {Path(result['files']['markdown']).name}, "
               f"{Path(result['files']['json']).name}); built in {result['seconds']['total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
