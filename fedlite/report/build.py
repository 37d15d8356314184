"""``fedlite report SPLIT --out DIR``: the paper's comparisons from one command, top to bottom.

The runs it compares (text only, image only, their late fusion, both modalities without the fusion
layer, Fed-MMX pooled and federated), how the federated model and its INT8 bundle hold up on blurred
and noisy slides and with fewer training cases, and how stable and faithful the bundle's
explanations are, written as one self-contained HTML page, Markdown and JSON.

Every model is scored on the same cases: the split's held-out test/ where it has one, otherwise the
sites' validation parts, the federated models by the sites themselves (their federated evaluation)
and the pooled baselines on those same cases pooled. The pooled baselines train on the sites'
training parts, the cases federated training sees.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from fedlite.bench.machine import machine_info
from fedlite.data.holdout import pooled_site_parts
from fedlite.data.split import TEST, format_split_table, load_split
from fedlite.data.train_share import reduced_split
from fedlite.evaluate import evaluate_checkpoint, evaluate_late_fusion
from fedlite.export.parity import ParityGateFailed
from fedlite.federated.config import FederatedConfig
from fedlite.report.explanations import explanation_study
from fedlite.report.ledger import Ledger, check_stages, file_digest
from fedlite.report.page import write_report
from fedlite.report.robustness import corruption_sweep, headline
from fedlite.report.runs import ReportSettings, RunContext, centralized, exported, federated

POOLED = (  # name, modality, fusion
    ("text only", "text", "concat"),
    ("image only", "image", "concat"),
    ("no fusion layer", "both", "none"),
    ("Fed-MMX centralized", "both", "concat"),
)
FEDERATED = "Fed-MMX federated"
LATE_FUSION = "late fusion"
# How close the federated model must come to the pooled one for the paper's claim to hold here.
FEDERATED_TOLERANCE = {"accuracy": 0.05, "auc": 0.05, "stage_macro_f1": 0.05}


def _run_name(name: str) -> str:
    return name.lower().replace(" ", "-")


def _federated_metrics(checkpoint: Path, evaluation: Path, at_sites: bool) -> dict:
    """The federated model's metrics: on test/, or as its sites scored it in its last round."""
    if not at_sites:
        return evaluate_checkpoint(checkpoint, evaluation, progress=False)
    return json.loads((checkpoint.parent / "summary.json").read_text(encoding="utf-8"))["last"]


def paper_ordering(models: dict[str, dict]) -> dict:
    """Whether fused > late fusion > each unimodal model, and federated ≈ centralized, per metric."""
    fused, late = models["Fed-MMX centralized"], models[LATE_FUSION]
    fed = models[FEDERATED]
    result = {}
    for key, tolerance in FEDERATED_TOLERANCE.items():
        unimodal = max(models["text only"][key], models["image only"][key])
        gap = fed[key] - fused[key]
        result[key] = {"fused_over_late_fusion": fused[key] > late[key],
                       "late_fusion_over_unimodal": late[key] > unimodal,
                       "federated_minus_centralized": gap, "tolerance": tolerance,
                       "federated_within_tolerance": gap >= -tolerance}
    return result


def build_report(split: str | Path, out: str | Path, settings: ReportSettings = ReportSettings(),
                 force: bool = False, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    split, out = Path(split), Path(out)
    summary = load_split(split)
    stage_names = list(summary.stratum_names[1:])
    ledger = Ledger(out, force=force)
    ctx = RunContext(out, split, stage_names, settings, ledger, progress)
    for name in [n for n, _, _ in POOLED] + [FEDERATED] + [f"{FEDERATED} {s:g}" for s in settings.shares]:
        check_stages(ctx.run_dir(_run_name(name)) / "last", stage_names, force)  # before any run starts
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(title: str) -> float:
        echo(f"\n== {title}")
        return time.perf_counter()

    at_sites = not (split / TEST).is_dir()
    val_fraction = FederatedConfig.site_val_fraction
    train, site_val = pooled_site_parts(split, summary.sites, out / "data" / "pooled", val_fraction)
    evaluation = site_val if at_sites else split / TEST
    echo(format_split_table(summary) if not at_sites else f"{len(summary.sites)} sites, no test/: every model is "
         f"scored on the sites' validation parts")

    start = step(f"1/6 pooled baselines ({len(POOLED)} runs, {settings.epochs} epochs each)")
    checkpoints = {name: centralized(ctx, _run_name(name), train, evaluation, modality, fusion)
                   for name, modality, fusion in POOLED}
    timings["pooled baselines"] = time.perf_counter() - start

    start = step(f"2/6 Fed-MMX federated across {len(summary.sites)} sites, {settings.rounds} rounds")
    checkpoints[FEDERATED] = federated(ctx, _run_name(FEDERATED), split)
    timings["federated"] = time.perf_counter() - start

    start = step("3/6 scoring every model on the same cases")
    models = {name: evaluate_checkpoint(path, evaluation, progress=False) for name, path in checkpoints.items()
              if name != FEDERATED}
    models[LATE_FUSION] = evaluate_late_fusion([checkpoints["image only"], checkpoints["text only"]], evaluation,
                                               progress=False)
    models[FEDERATED] = _federated_metrics(checkpoints[FEDERATED], evaluation, at_sites)
    timings["scoring"] = time.perf_counter() - start

    start = step(f"4/6 federated training on {', '.join(f'{s:.0%}' for s in settings.shares)} of the training cases")
    shares = []
    for share in settings.shares:
        reduced = out / "data" / f"share-{share:g}"
        config = {"of": file_digest(split / "split.json"), "share": share}
        if not ledger.finished(f"split {share:g}", config, reduced / "split.json"):
            with ledger.building(f"split {share:g}", config):
                reduced_split(split, reduced, share, val_fraction, force=True)
        ckpt = federated(ctx, _run_name(f"{FEDERATED} {share:g}"), reduced)
        shares.append({"share": share, **headline(_federated_metrics(ckpt, evaluation, at_sites))})
    shares.append({"share": 1.0, **headline(models[FEDERATED])})
    timings["training share"] = time.perf_counter() - start

    start = step(f"5/6 exporting the federated model at the sites: INT8 bundle ({settings.export_epochs} "
                 f"distillation epochs) and the teacher as it is, then blur and noise on the evaluation images")
    refused = None
    try:
        bundle = exported(ctx, "bundle", checkpoints[FEDERATED], int8=True)
    except ParityGateFailed as exc:  # the report says so and goes on: robustness of the model alone
        bundle, refused = None, exc.failures
        echo(f"the bundle was refused by the export gate: {'; '.join(exc.failures)}")
    teacher_bundle = exported(ctx, "teacher-bundle", checkpoints[FEDERATED], int8=False)
    robustness = corruption_sweep(ctx, evaluation, checkpoints[FEDERATED], bundle)
    timings["export and robustness"] = time.perf_counter() - start

    start = step(f"6/6 explaining {settings.explain_cases} evaluation cases with the bundle and with its teacher")
    explanations = (explanation_study(bundle, teacher_bundle, evaluation, settings.explain_cases,
                                      out / "explanations", progress) if bundle is not None else None)
    timings["explanations"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started
    timings["runs as built"] = ledger.build_seconds()  # reused runs count what they took when built

    report = {
        "split": str(split), "evaluated_on": "the sites' validation parts" if at_sites else "test/",
        "evaluation_cases": models[FEDERATED]["cases"], "stage_names": stage_names,
        "sites": {site: summary.size(site) for site in summary.sites},
        "settings": settings.to_dict(), "machine": machine_info(), "seconds": timings,
        "models": models, "ordering": paper_ordering(models), "training_share": shares,
        "robustness": robustness, "bundle": str(bundle) if bundle is not None else None, "bundle_refused": refused,
        "explanations": explanations, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    report["files"] = {k: str(v) for k, v in write_report(report, out).items()}
    return report
