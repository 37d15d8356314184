"""The export's parity check as statistics a site can send: both models' evaluation statistics and
the counts of cases where the bundle makes the teacher's calls, with the largest probability gaps.

Summed over sites they give the same report ``parity_report`` computes on pooled cases (accuracy,
stage F1 and agreement exactly, AUC from the score histograms), so the same gate decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlite.errors import InputError
from fedlite.eval_stats import EvalStats, merge
from fedlite.export.parity import COUNT_KEYS, MAX_KEYS, agreement_counts, agreement_rates

MODELS = ("teacher", "bundle")


@dataclass
class ParityStats:
    models: dict[str, EvalStats]
    counts: np.ndarray  # int64 in COUNT_KEYS order
    max_differences: np.ndarray  # float64 in MAX_KEYS order

    @classmethod
    def empty(cls, num_stages: int) -> "ParityStats":
        return cls({m: EvalStats.empty(num_stages) for m in MODELS}, np.zeros(len(COUNT_KEYS), np.int64),
                   np.zeros(len(MAX_KEYS)))

    @classmethod
    def from_predictions(cls, leukemia: np.ndarray, stage: np.ndarray, teacher: tuple[np.ndarray, np.ndarray],
                         bundle: tuple[np.ndarray, np.ndarray]) -> "ParityStats":
        counts = agreement_counts(teacher, bundle)
        return cls({"teacher": EvalStats.from_predictions(leukemia, stage, *teacher),
                    "bundle": EvalStats.from_predictions(leukemia, stage, *bundle)},
                   np.array([counts[k] for k in COUNT_KEYS], np.int64),
                   np.array([counts[k] for k in MAX_KEYS], np.float64))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"{m}/{k}": v for m in MODELS for k, v in self.models[m].to_arrays().items()}
        return {**arrays, "agreement_counts": self.counts, "max_differences": self.max_differences}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_stages: int) -> "ParityStats":
        """From an untrusted reply: each model's statistics checked, counts consistent with them."""
        models = {m: EvalStats.from_arrays({k.split("/", 1)[1]: v for k, v in arrays.items()
                                            if k.startswith(f"{m}/")}, num_stages) for m in MODELS}
        extra = set(arrays) - {k for k in arrays if k.split("/", 1)[0] in MODELS} - {"agreement_counts",
                                                                                       "max_differences"}
        if extra:
            raise InputError(f"parity statistics hold unexpected arrays {sorted(extra)}")
        counts, gaps = np.asarray(arrays.get("agreement_counts")), np.asarray(arrays.get("max_differences"))
        if counts.shape != (len(COUNT_KEYS),) or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise InputError(f"agreement_counts: expected {len(COUNT_KEYS)} non-negative integer counts")
        if gaps.shape != (len(MAX_KEYS),) or gaps.dtype.kind != "f" or not np.isfinite(gaps).all() \
                or (gaps < 0).any() or (gaps > 1).any():
            raise InputError("max_differences: expected two probability differences in [0, 1]")
        cases = int(counts[0])
        if cases != models["teacher"].cases or cases != models["bundle"].cases or (counts[1:] > cases).any():
            raise InputError("agreement_counts: the counts do not fit the number of cases evaluated")
        return cls(models, counts.astype(np.int64), gaps.astype(np.float64))

    def report(self) -> dict:
        """The parity report's shape (``fedlite.export.parity.parity_report``) for the teacher and the bundle."""
        counts = {**dict(zip(COUNT_KEYS, (int(c) for c in self.counts))),
                  **dict(zip(MAX_KEYS, (float(g) for g in self.max_differences)))}
        models = {}
        for name in MODELS:
            metrics = self.models[name].metrics()
            models[name] = {k: metrics[k] for k in ("cases", "positives", "accuracy", "auc", "stage_macro_f1",
                                                    "stage_accuracy")}
        models["bundle"].update(agreement_rates(counts))
        models["bundle"]["agreement_counts"] = {k: counts[k] for k in COUNT_KEYS}
        return {"models": models, "reference": "teacher"}


def merge_parity(parts: list[ParityStats], num_stages: int) -> ParityStats:
    return ParityStats({m: merge([p.models[m] for p in parts], num_stages) for m in MODELS},
                       sum((p.counts for p in parts), np.zeros(len(COUNT_KEYS), np.int64)),
                       np.max([p.max_differences for p in parts], axis=0) if parts else np.zeros(len(MAX_KEYS)))
