"""Verification before a bundle is written: does the exported model still do the teacher's job?

Teacher (torch FP32), student (torch FP32) and bundle (ONNX Runtime, as the agent runs it) are
scored on the same held-out cases; the bundle's agreement with the teacher and the largest
probability difference are reported; the bundle is refused when it falls too far below the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlite.errors import InputError
from fedlite.metrics import evaluate_predictions

HEADLINE = ("accuracy", "auc", "stage_macro_f1")


@dataclass(frozen=True)
class Gate:
    max_accuracy_drop: float = 1.0  # points
    max_auc_drop: float = 0.01


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("cases", "positives", *HEADLINE, "stage_accuracy")}


def agreement(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> dict:
    """How often ``other`` makes the reference's call, and how far its probabilities stray."""
    ref_leuk, ref_stage = reference
    leuk, stage = other
    ref_call, call = ref_leuk.argmax(1), leuk.argmax(1)
    both_positive = (ref_call == 1) & (call == 1)
    same_stage = ref_stage.argmax(1) == stage.argmax(1)
    same_case = (ref_call == call) & (~both_positive | same_stage)
    return {
        "leukemia_agreement": float((ref_call == call).mean()),
        "stage_agreement": float(same_stage[both_positive].mean()) if both_positive.any() else 1.0,
        "case_agreement": float(same_case.mean()),
        "max_leukemia_prob_difference": float(np.abs(ref_leuk[:, 1] - leuk[:, 1]).max()),
        "max_stage_prob_difference": float(np.abs(ref_stage - stage).max()),
    }


def parity_report(leukemia: np.ndarray, stage: np.ndarray, outputs: dict[str, tuple[np.ndarray, np.ndarray]],
                  reference: str = "teacher") -> dict:
    """Metrics per model (``outputs``: name -> (leukemia_prob, stage_prob)) and agreement with the reference."""
    report = {"models": {}, "reference": reference}
    for name, probs in outputs.items():
        entry = _headline(evaluate_predictions(leukemia, stage, *probs))
        if name != reference:
            entry.update(agreement(outputs[reference], probs))
        report["models"][name] = entry
    return report


def gate_failures(report: dict, candidate: str, gate: Gate) -> list[str]:
    ref = report["models"][report["reference"]]
    got = report["models"][candidate]
    failures = []
    drop = (ref["accuracy"] - got["accuracy"]) * 100
    if drop > gate.max_accuracy_drop:
        failures.append(f"accuracy {got['accuracy'] * 100:.2f} % is {drop:.2f} points below the teacher's "
                        f"{ref['accuracy'] * 100:.2f} % (allowed: {gate.max_accuracy_drop})")
    auc_drop = ref["auc"] - got["auc"]
    if auc_drop > gate.max_auc_drop:
        failures.append(f"AUC {got['auc']:.4f} is {auc_drop:.4f} below the teacher's {ref['auc']:.4f} "
                        f"(allowed: {gate.max_auc_drop})")
    return failures


class ParityGateFailed(InputError):
    """The exported model lost too much against its teacher; nothing was written."""

    def __init__(self, failures: list[str], table: str) -> None:
        self.failures = failures
        super().__init__("bundle not written: " + "; ".join(failures) + "\n" + table + "\n"
                         "Distill longer (--distill-epochs), prune less (--prune), try --quantize static, "
                         "or relax --max-accuracy-drop/--max-auc-drop.")


def format_report(report: dict) -> str:
    lines = [f"{'model':<16}{'accuracy':>10}{'AUC':>8}{'stage F1':>10}{'agree':>8}{'max Δp':>8}"]
    for name, m in report["models"].items():
        agree = f"{m['case_agreement'] * 100:7.1f}%" if "case_agreement" in m else f"{'-':>8}"
        delta = f"{m['max_leukemia_prob_difference']:8.3f}" if "max_leukemia_prob_difference" in m else f"{'-':>8}"
        lines.append(f"{name:<16}{m['accuracy'] * 100:9.2f}%{m['auc']:8.4f}{m['stage_macro_f1']:10.4f}{agree}{delta}")
    return "\n".join(lines)
