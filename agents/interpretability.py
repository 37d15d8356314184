"""Explanations over a set of a site's cases, and the paper's two measures of them.

- Consistency: how stable the top features are when the set of cases is resampled (bootstrap):
  the mean share of the top-k features of a resample that are also in the top-k of the whole set.
  Features are patch positions for the image and words (case-folded) for the note; a feature's
  importance over a set of cases is its mean |φ|, counting 0 for cases that lack it.
- Sparsity: the mean number of non-negligible values per case, |φ_i| above a small share of the
  case's largest |φ|: a reader can only look at so many highlighted patches and words.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedlite.agents.explain import CaseExplanation, ExplainSettings, explain_case
from fedlite.agents.explain_report import OWNER_ONLY, write_explanation
from fedlite.agents.runtime import BundleRuntime
from fedlite.atomic import atomic_write_text
from fedlite.data.manifest import MANIFEST, Dataset
from fedlite.errors import InputError

NEGLIGIBLE = 0.01  # |φ| below 1 % of the case's largest |φ|


def sparsity(values: list[np.ndarray], negligible: float = NEGLIGIBLE) -> float:
    """Mean count of values per case with |φ| > negligible · max|φ| of that case."""
    counts = []
    for v in values:
        peak = float(np.abs(v).max()) if v.size else 0.0
        counts.append(int((np.abs(v) > negligible * peak).sum()) if peak > 0 else 0)
    return float(np.mean(counts)) if counts else float("nan")


def _top(importance: dict, k: int) -> set:
    return {key for key, _ in sorted(importance.items(), key=lambda kv: (-kv[1], str(kv[0])))[:k]}


def top_k_overlap(a: dict, b: dict, k: int = 10) -> float:
    """Share (0..1) of ``a``'s k features of largest |φ| that are also among ``b``'s: whether two
    models (a bundle and its teacher) point at the same patches or words for a case."""
    top_a = _top({key: abs(v) for key, v in a.items()}, k)
    return len(top_a & _top({key: abs(v) for key, v in b.items()}, k)) / len(top_a) if top_a else float("nan")


def _mean_importance(profiles: list[dict], cases: np.ndarray) -> dict:
    total: dict = {}
    for i in cases:
        for key, value in profiles[i].items():
            total[key] = total.get(key, 0.0) + abs(value)
    return {key: value / len(cases) for key, value in total.items()}


def consistency(profiles: list[dict], k: int = 10, resamples: int = 200, seed: int = 0) -> float:
    """Mean top-k overlap (0..1) between bootstrap resamples of the cases and the whole set.

    ``profiles``: one {feature: φ} per case."""
    if not profiles:
        return float("nan")
    reference = _top(_mean_importance(profiles, np.arange(len(profiles))), k)
    if not reference:
        return float("nan")
    rng = np.random.default_rng(seed)
    overlaps = []
    for _ in range(resamples):
        sample = rng.integers(0, len(profiles), size=len(profiles))
        overlaps.append(len(_top(_mean_importance(profiles, sample), k) & reference) / len(reference))
    return float(np.mean(overlaps))


def word_profile(expl: CaseExplanation, note: str, output: int) -> dict[str, float]:
    """{word: φ} for one case, words case-folded; a word seen twice keeps its summed value."""
    profile: dict[str, float] = {}
    for word, value in zip(expl.words, expl.word_values(output)):
        key = note[word["begin"]: word["end"]].casefold()
        profile[key] = profile.get(key, 0.0) + value
    return profile


def measures(explanations: list[tuple[CaseExplanation, str]], k: int = 10) -> dict:
    """Consistency and sparsity per modality and explained output over (explanation, note) pairs."""
    result = {}
    for o, output in enumerate(("leukemia", "stage")):
        patches = [{i: float(v) for i, v in enumerate(e.image.values[:, o])} for e, _ in explanations]
        words = [word_profile(e, note, o) for e, note in explanations]
        result[output] = {
            "image": {"consistency": consistency(patches, k), "sparsity": sparsity([e.image.values[:, o]
                                                                                   for e, _ in explanations]),
                      "features": int(explanations[0][0].image.values.shape[0]) if explanations else 0},
            "text": {"consistency": consistency(words, k), "sparsity": sparsity([e.text.values[:, o]
                                                                                for e, _ in explanations]),
                     "mean_tokens": float(np.mean([e.text.values.shape[0] for e, _ in explanations]))
                     if explanations else 0.0},
        }
    return {"top_k": k, "negligible": NEGLIGIBLE, **result}


@dataclass
class ExplainedCase:
    case_id: str
    explanation: CaseExplanation
    paths: dict[str, Path]


def explain_dataset(runtime: BundleRuntime, dataset: Dataset, case_ids: list[str] | None, settings: ExplainSettings,
                    report_dir: Path, progress: bool = True,
                    on_case: Callable[[ExplainedCase], None] | None = None, limit: int = 0) -> dict:
    """Explain the chosen cases (default: all; the first ``limit`` when > 0) one by one into
    ``report_dir`` and summarise them."""
    from tqdm.auto import tqdm

    from fedlite.agents.predict import check_note

    by_id = {case.id: case for case in dataset.cases}
    unknown = [i for i in case_ids or [] if i not in by_id]
    if unknown:
        raise InputError(f"no case with id {', '.join(map(repr, unknown[:5]))}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""), path=dataset.root / MANIFEST)
    cases = [by_id[i] for i in case_ids] if case_ids else dataset.cases
    cases = cases[:limit] if limit > 0 else cases
    done: list[tuple[CaseExplanation, str]] = []
    for case in tqdm(cases, desc="explain", unit="case", disable=not progress, leave=False):
        note = check_note(case.text, f"{dataset.root / MANIFEST}: case {case.id}")
        smear, pixels = runtime.load_smear(dataset.image_path(case))
        expl = explain_case(runtime, pixels, note, settings)
        paths = write_explanation(expl, case.id, note, smear, runtime.meta, report_dir)
        done.append((expl, note))
        if on_case is not None:
            on_case(ExplainedCase(case.id, expl, paths))
    seconds = [e.timings["total_seconds"] for e, _ in done]
    summary = {
        "cases": len(done), "data": str(dataset.root), "settings": done[0][0].settings if done else None,
        "seconds_per_case": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))} if done else None,
        "additivity_error_max": {"image": float(max(e.image.additivity_error.max() for e, _ in done)),
                                 "text": float(max(e.text.additivity_error.max() for e, _ in done))} if done else None,
        "measures": measures(done),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(Path(report_dir) / "summary.json", json.dumps(summary, indent=2) + "\n", OWNER_ONLY)
    return summary


def format_dataset_summary(summary: dict, report_dir: Path) -> str:
    """What ``fedlite explain --data`` prints after its cases: time per case, additivity, and each
    output's consistency and sparsity."""
    m, took = summary["measures"], summary["seconds_per_case"]
    lines = [f"\n{summary['cases']} cases, {took['mean']:.2f} s per case on average (max {took['max']:.2f} s); "
             f"largest additivity error {max(summary['additivity_error_max'].values()):.1e}"]
    for output in ("leukemia", "stage"):
        image, text = m[output]["image"], m[output]["text"]
        lines.append(f"{output:>9}: consistency (top-{m['top_k']}, bootstrap) image {image['consistency']:.0%}, "
                     f"note {text['consistency']:.0%}; sparsity image {image['sparsity']:.1f}/{image['features']} "
                     f"patches, note {text['sparsity']:.1f}/{text['mean_tokens']:.0f} tokens")
    lines.append(f"reports: {report_dir}/<case>/explanation.html; summary: {Path(report_dir) / 'summary.json'}")
    return "\n".join(lines)
