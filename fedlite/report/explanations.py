"""How stable and how sparse the bundle's SHAP explanations are per modality over a sample of
evaluation cases, and whether they point where its teacher's do: the same cases explained with the
INT8 bundle and with the teacher exported as it is (FP32, same explainer), top-10 overlap per case.
The per-case explanations stay in the report's owner-only directory; the page shows aggregates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlite.agents.explain import ExplainSettings
from fedlite.agents.interpretability import ExplainedCase, explain_dataset, top_k_overlap, word_profile
from fedlite.agents.runtime import BundleRuntime
from fedlite.data.manifest import read_dataset

TOP_K = 10
OUTPUTS = ("leukemia", "stage")


def _explain(bundle: Path, data: Path, case_ids: list[str], out: Path, progress: bool) -> tuple[dict, dict]:
    cases: dict[str, ExplainedCase] = {}
    summary = explain_dataset(BundleRuntime(bundle), read_dataset(data), case_ids, ExplainSettings(), out,
                              progress=progress, on_case=lambda done: cases.__setitem__(done.case_id, done))
    return summary, cases


def explanation_study(bundle: Path, teacher_bundle: Path, data: Path, cases: int, out: Path,
                      progress: bool = True) -> dict:
    """Consistency and sparsity of both models' explanations, and their mean top-10 overlap per
    modality and output, over the first ``cases`` evaluation cases."""
    dataset = read_dataset(data)
    ids = [c.id for c in dataset.cases[:cases]]
    notes = {c.id: c.text for c in dataset.cases}
    ours, our_cases = _explain(bundle, data, ids, out / "bundle", progress)
    theirs, their_cases = _explain(teacher_bundle, data, ids, out / "teacher", progress)
    overlap = {}
    for o, output in enumerate(OUTPUTS):
        image, text = [], []
        for case_id in ids:
            a, b = our_cases[case_id].explanation, their_cases[case_id].explanation
            image.append(top_k_overlap(dict(enumerate(a.image.values[:, o])), dict(enumerate(b.image.values[:, o])),
                                       TOP_K))
            text.append(top_k_overlap(word_profile(a, notes[case_id], o), word_profile(b, notes[case_id], o), TOP_K))
        overlap[output] = {"image": float(np.nanmean(image)), "text": float(np.nanmean(text))}
    return {"cases": len(ids), "top_k": TOP_K, "bundle": ours["measures"], "teacher": theirs["measures"],
            "top_k_overlap": overlap, "seconds_per_case": ours["seconds_per_case"]["mean"]}
