"""Verification before a bundle is written: does the exported model still do the teacher's job?

Teacher (torch FP32), student (torch FP32) and bundle (ONNX Runtime, as the agent runs it) are
scored on the same held-out cases; the bundle's agreement with the teacher and the largest
probability difference are reported; the bundle is refused when it falls too far below the teacher
or makes other calls than the teacher.

The gate reads only the report's numbers (headline metrics and agreement rates per model), never
per-case arrays: a federated export computes the same numbers from the sites' merged statistics
(agreement counts summed with ``merge_agreement_counts``, turned into rates by ``agreement_rates``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from fedlite.errors import InputError
from fedlite.metrics import evaluate_predictions

HEADLINE = ("accuracy", "auc", "stage_macro_f1")
COUNT_KEYS = ("cases", "leukemia_agree", "both_positive", "stage_agree", "case_agree")
MAX_KEYS = ("max_leukemia_prob_difference", "max_stage_prob_difference")


@dataclass(frozen=True)
class Gate:
    """How far the exported model may stray from its teacher before the bundle is refused."""

    max_accuracy_drop: float = 1.0  # points
    max_auc_drop: float = 0.01
    max_stage_f1_drop: float = 0.02
    min_case_agreement: float = 0.9  # same leukemia call and, where both call positive, same stage
    min_leukemia_agreement: float = 0.97
    min_auc: float = 0.5  # an absolute floor: the bundle must call better than chance; 0 sets none

    def to_dict(self) -> dict:
        return asdict(self)


# Reports parity but refuses nothing: for baselines and for checks of other parts of the export.
NO_GATE = Gate(max_accuracy_drop=100.0, max_auc_drop=1.0, max_stage_f1_drop=1.0, min_case_agreement=0.0,
               min_leukemia_agreement=0.0, min_auc=0.0)


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("cases", "positives", *HEADLINE, "stage_accuracy")}


def leukemia_call(leukemia_prob: np.ndarray) -> np.ndarray:
    """The call the agent reports: positive at a probability of 0.5 or more."""
    return np.asarray(leukemia_prob)[:, 1] >= 0.5


def agreement_counts(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    """Counts of cases where ``other`` makes the reference's calls, and the largest probability gaps.

    Counts add up across sites and maxima take the max, so sites can report these and the
    coordinator merges them (``merge_agreement_counts``) before turning them into rates.
    """
    ref_leuk, ref_stage = (np.asarray(a) for a in reference)
    leuk, stage = (np.asarray(a) for a in other)
    ref_call, call = leukemia_call(ref_leuk), leukemia_call(leuk)
    both_positive = ref_call & call
    same_stage = ref_stage.argmax(1) == stage.argmax(1)
    same_case = (ref_call == call) & (~both_positive | same_stage)
    empty = len(ref_call) == 0
    return {
        "cases": len(ref_call),
        "leukemia_agree": int((ref_call == call).sum()),
        "both_positive": int(both_positive.sum()),
        "stage_agree": int((same_stage & both_positive).sum()),
        "case_agree": int(same_case.sum()),
        "max_leukemia_prob_difference": 0.0 if empty else float(np.abs(ref_leuk[:, 1] - leuk[:, 1]).max()),
        "max_stage_prob_difference": 0.0 if empty else float(np.abs(ref_stage - stage).max()),
    }


def merge_agreement_counts(parts: list[dict]) -> dict:
    """One set of counts from several (e.g. one per site): counts summed, maxima maxed."""
    merged = {k: sum(int(p[k]) for p in parts) for k in COUNT_KEYS}
    merged.update({k: max((float(p[k]) for p in parts), default=0.0) for k in MAX_KEYS})
    return merged


def agreement_rates(counts: dict) -> dict:
    """Rates the report and the gate use; stage agreement is 1.0 when no case is called positive by both."""
    cases = counts["cases"]
    if cases == 0:
        raise ValueError("agreement over zero cases")
    both = counts["both_positive"]
    return {
        "leukemia_agreement": counts["leukemia_agree"] / cases,
        "stage_agreement": counts["stage_agree"] / both if both else 1.0,
        "case_agreement": counts["case_agree"] / cases,
        **{k: float(counts[k]) for k in MAX_KEYS},
    }


def agreement(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    """How often ``other`` makes the reference's call, and how far its probabilities stray."""
    return agreement_rates(agreement_counts(reference, other))


def parity_report(leukemia: np.ndarray, stage: np.ndarray, outputs: dict[str, tuple[np.ndarray, np.ndarray]],
                  reference: str = "teacher") -> dict:
    """Metrics per model (``outputs``: name -> (leukemia_prob, stage_prob)) and agreement with the reference."""
    report = {"models": {}, "reference": reference}
    for name, probs in outputs.items():
        entry = _headline(evaluate_predictions(leukemia, stage, *probs))
        if name != reference:
            counts = agreement_counts(outputs[reference], probs)
            entry.update(agreement_rates(counts))
            entry["agreement_counts"] = {k: counts[k] for k in COUNT_KEYS}
        report["models"][name] = entry
    return report


def _drop(ref: float, got: float) -> float:
    """How far ``got`` fell below ``ref`` (both defined: ``gate_failures`` refuses undefined ones first)."""
    return ref - got


def gate_failures(report: dict, candidate: str, gate: Gate) -> list[str]:
    """Every criterion ``candidate`` fails against the report's reference, each stated with its numbers."""
    ref = report["models"][report["reference"]]
    got = report["models"][candidate]
    broken = [f"{name} {key}" for name, model in (("the teacher's", ref), ("the bundle's", got))
              for key, value in model.items() if isinstance(value, float) and not math.isfinite(value)]
    if broken:  # whatever the gate allows: a number that is not one means a broken model or an empty set
        return [f"{', '.join(broken)} not a number: a model or the verification set is broken"]
    failures = []
    if gate.min_auc > 0 and got["auc"] <= gate.min_auc:
        failures.append(f"AUC {got['auc']:.4f} is not above {gate.min_auc} (chance is 0.5)")
    drop = _drop(ref["accuracy"], got["accuracy"]) * 100
    if drop > gate.max_accuracy_drop:
        failures.append(f"accuracy {got['accuracy'] * 100:.2f} % is {drop:.2f} points below the teacher's "
                        f"{ref['accuracy'] * 100:.2f} % (allowed: {gate.max_accuracy_drop})")
    auc_drop = _drop(ref["auc"], got["auc"])
    if auc_drop > gate.max_auc_drop:
        failures.append(f"AUC {got['auc']:.4f} is {auc_drop:.4f} below the teacher's {ref['auc']:.4f} "
                        f"(allowed: {gate.max_auc_drop})")
    f1_drop = _drop(ref["stage_macro_f1"], got["stage_macro_f1"])
    if f1_drop > gate.max_stage_f1_drop:
        failures.append(f"stage macro-F1 {got['stage_macro_f1']:.4f} is {f1_drop:.4f} below the teacher's "
                        f"{ref['stage_macro_f1']:.4f} (allowed: {gate.max_stage_f1_drop})")
    if got["case_agreement"] < gate.min_case_agreement:
        failures.append(f"case agreement with the teacher {got['case_agreement'] * 100:.1f} % is below "
                        f"{gate.min_case_agreement * 100:.1f} % (same leukemia call and, where both call "
                        "positive, same stage)")
    if got["leukemia_agreement"] < gate.min_leukemia_agreement:
        failures.append(f"leukemia-call agreement with the teacher {got['leukemia_agreement'] * 100:.1f} % "
                        f"is below {gate.min_leukemia_agreement * 100:.1f} %")
    return failures


class ParityGateFailed(InputError):
    """The exported model lost too much against its teacher; nothing was written."""

    def __init__(self, failures: list[str], table: str) -> None:
        self.failures = failures
        super().__init__("bundle not written, it failed the parity gate:\n  - " + "\n  - ".join(failures)
                         + "\n" + table + "\n"
                         "Distill longer (--distill-epochs), prune less (--prune), try --quantize static, "
                         "or relax the gate (--max-accuracy-drop, --max-auc-drop, --max-stage-f1-drop, "
                         "--min-agreement, --min-leukemia-agreement).")


def format_report(report: dict) -> str:
    header = (f"{'model':<20}{'accuracy':>10}{'AUC':>8}{'stage F1':>10}{'leuk agree':>12}{'case agree':>12}"
              f"{'max Δp':>8}")
    lines = [header]
    for name, m in report["models"].items():
        leuk = f"{m['leukemia_agreement'] * 100:11.1f}%" if "leukemia_agreement" in m else f"{'-':>12}"
        case = f"{m['case_agreement'] * 100:11.1f}%" if "case_agreement" in m else f"{'-':>12}"
        delta = f"{m['max_leukemia_prob_difference']:8.3f}" if "max_leukemia_prob_difference" in m else f"{'-':>8}"
        lines.append(f"{name:<20}{m['accuracy'] * 100:9.2f}%{m['auc']:8.4f}{m['stage_macro_f1']:10.4f}"
                     f"{leuk}{case}{delta}")
    return "\n".join(lines)
