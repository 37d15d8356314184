"""How the federated model and its bundle hold up on poor slides (Gaussian blur and noise of
increasing strength on the evaluation images) and how the model degrades with fewer training cases:
the robustness comparisons of the seed literature, on the same evaluation cases throughout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlite.agents.runtime import BundleRuntime
from fedlite.data.corruption import corrupted_copy
from fedlite.data.manifest import read_dataset
from fedlite.evaluate import evaluate_checkpoint
from fedlite.metrics import evaluate_predictions
from fedlite.report.ledger import file_digest
from fedlite.report.runs import RunContext

HEADLINE = ("accuracy", "auc", "stage_macro_f1")


def headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in HEADLINE}


def bundle_metrics(bundle: Path, data: Path) -> dict:
    """A bundle's metrics on a dataset, computed with ONNX Runtime as the agent runs it."""
    dataset = read_dataset(data)
    pred = BundleRuntime(bundle).predict_dataset(dataset)
    return evaluate_predictions(np.array([c.leukemia for c in dataset.cases]),
                                np.array([-1 if c.stage is None else c.stage for c in dataset.cases]),
                                pred.leukemia_prob, pred.stage_prob)


def corrupted_evaluation(ctx: RunContext, evaluation: Path, kind: str, strength: float) -> Path:
    """The evaluation cases with every image corrupted, written once per configuration."""
    name = f"{kind}-{strength:g}"
    out = ctx.out / "data" / "corrupted" / name
    config = {"kind": kind, "strength": strength, "seed": ctx.settings.seed,
              "of": file_digest(evaluation / "manifest.jsonl")}
    if not ctx.ledger.finished(f"corrupted/{name}", config, out / "manifest.jsonl"):
        with ctx.ledger.building(f"corrupted/{name}", config):
            corrupted_copy(evaluation, out, kind, strength, seed=ctx.settings.seed, force=True, progress=ctx.progress)
    return out


def corruption_sweep(ctx: RunContext, evaluation: Path, checkpoint: Path, bundle: Path | None) -> dict:
    """{kind: [{strength, model: metrics, bundle: metrics}, ...]}, strength 0 being the clean cases."""
    s = ctx.settings
    sweep = {}
    for kind, strengths in (("blur", s.blur), ("noise", s.noise)):
        rows = []
        for strength in (0.0, *strengths):
            data = evaluation if strength == 0 else corrupted_evaluation(ctx, evaluation, kind, strength)
            row = {"strength": strength,
                   "model": headline(evaluate_checkpoint(checkpoint, data, progress=False))}
            if bundle is not None:
                row["bundle"] = headline(bundle_metrics(bundle, data))
            rows.append(row)
        sweep[kind] = rows
    return sweep
