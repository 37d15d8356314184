"""Evaluation as sufficient statistics, so a consortium's metrics are computed without pooling cases.

A site scores the global model on its validation cases and keeps only counts: the leukemia and stage
confusion matrices, per-class histograms of P(leukemia), the summed losses. Summed across sites they
give the pooled accuracy and stage precision/recall/F1 exactly (the same confusion matrices) and the
pooled AUC up to ties inside a histogram bin. Bins are even in logit, so confident scores near 0 or 1
are resolved as finely as the uncertain middle. numpy only: the hospital agent evaluates with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlite.errors import InputError
from fedlite.metrics import macro_scores

SCORE_BINS = 2048
LOGIT_LIMIT = 16.0  # logits beyond ±16 (P within 1e-7 of 0 or 1) share the outermost bins
# Far above any real site; it bounds what an untrusted reply can make the coordinator add up.
MAX_COUNT = 10**9
_EPS = 1e-12
FIELDS = ("leukemia_confusion", "stage_confusion", "score_histogram", "loss_sums")


def score_bins(leukemia_prob: np.ndarray, bins: int = SCORE_BINS) -> np.ndarray:
    """The histogram bin of each P(leukemia): monotone in the score, even in its logit."""
    p = np.clip(np.asarray(leukemia_prob, dtype=np.float64), _EPS, 1 - _EPS)
    logit = np.log(p) - np.log1p(-p)
    index = np.floor((logit + LOGIT_LIMIT) / (2 * LOGIT_LIMIT) * bins)
    return np.clip(index, 0, bins - 1).astype(np.int64)


@dataclass
class EvalStats:
    """What one site (or the sum of several) knows about a model's calls, with nothing per case."""

    leukemia_confusion: np.ndarray  # (2, 2) int64, rows true, columns predicted (P >= 0.5)
    stage_confusion: np.ndarray  # (K, K) int64 over positives, rows true, columns predicted
    score_histogram: np.ndarray  # (2, bins) int64: P(leukemia) of negatives (row 0) and positives (row 1)
    loss_sums: np.ndarray  # (2,) float64: Σ leukemia cross-entropy over cases, Σ stage cross-entropy over positives

    @classmethod
    def from_predictions(cls, leukemia: np.ndarray, stage: np.ndarray, leukemia_prob: np.ndarray,
                         stage_prob: np.ndarray, bins: int = SCORE_BINS) -> "EvalStats":
        """From labels (stage -1 for negatives) and the two heads' probabilities."""
        leukemia, stage = np.asarray(leukemia, dtype=np.int64), np.asarray(stage, dtype=np.int64)
        leukemia_prob, stage_prob = np.asarray(leukemia_prob, np.float64), np.asarray(stage_prob, np.float64)
        if not (np.isfinite(leukemia_prob).all() and np.isfinite(stage_prob).all()):
            raise InputError("probabilities to score hold NaN or Inf: the model is broken")
        num_stages = stage_prob.shape[1]
        called = (leukemia_prob[:, 1] >= 0.5).astype(np.int64)
        leukemia_confusion = np.zeros((2, 2), np.int64)
        np.add.at(leukemia_confusion, (leukemia, called), 1)
        positive = stage >= 0
        stage_confusion = np.zeros((num_stages, num_stages), np.int64)
        np.add.at(stage_confusion, (stage[positive], stage_prob[positive].argmax(1)), 1)
        histogram = np.zeros((2, bins), np.int64)
        np.add.at(histogram, (leukemia, score_bins(leukemia_prob[:, 1], bins)), 1)
        leukemia_ce = -np.log(np.clip(leukemia_prob[np.arange(len(leukemia)), leukemia], _EPS, None)).sum()
        stage_ce = -np.log(np.clip(stage_prob[positive, stage[positive]], _EPS, None)).sum()
        return cls(leukemia_confusion, stage_confusion, histogram, np.array([leukemia_ce, stage_ce]))

    @classmethod
    def empty(cls, num_stages: int, bins: int = SCORE_BINS) -> "EvalStats":
        return cls(np.zeros((2, 2), np.int64), np.zeros((num_stages, num_stages), np.int64),
                   np.zeros((2, bins), np.int64), np.zeros(2))

    @property
    def cases(self) -> int:
        return int(self.leukemia_confusion.sum())

    @property
    def positives(self) -> int:
        return int(self.leukemia_confusion[1].sum())

    def __add__(self, other: "EvalStats") -> "EvalStats":
        if self.stage_confusion.shape != other.stage_confusion.shape or \
                self.score_histogram.shape != other.score_histogram.shape:
            raise InputError("evaluation statistics of different shapes cannot be merged")
        return EvalStats(self.leukemia_confusion + other.leukemia_confusion,
                         self.stage_confusion + other.stage_confusion,
                         self.score_histogram + other.score_histogram, self.loss_sums + other.loss_sums)

    def auc(self) -> float:
        """P(a positive scores above a negative), ties within a bin counted half; NaN with one class."""
        negatives, positives = self.score_histogram.astype(np.float64)
        n_neg, n_pos = negatives.sum(), positives.sum()
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
        return float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))

    def metrics(self, gamma: float = 1.0) -> dict:
        """The same keys as ``fedlite.metrics.evaluate_predictions``, plus the loss and the leukemia confusion."""
        cases, positives = self.cases, self.positives
        stage_cm = self.stage_confusion
        stage_scores = macro_scores(stage_cm)
        staged = int(stage_cm.sum())
        leukemia_loss = self.loss_sums[0] / cases if cases else float("nan")
        stage_loss = self.loss_sums[1] / positives if positives else 0.0
        return {
            "cases": cases,
            "positives": positives,
            "accuracy": float(np.trace(self.leukemia_confusion) / cases) if cases else float("nan"),
            "auc": self.auc(),
            "stage_accuracy": float(np.trace(stage_cm) / staged) if staged else float("nan"),
            "stage_macro_precision": stage_scores["precision"],
            "stage_macro_recall": stage_scores["recall"],
            "stage_macro_f1": stage_scores["f1"],
            "stage_per_class_f1": stage_scores["per_class_f1"],
            "stage_confusion": stage_cm.tolist(),
            "leukemia_confusion": self.leukemia_confusion.tolist(),
            "loss": float(leukemia_loss + gamma * stage_loss),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(getattr(self, name)) for name in FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_stages: int, bins: int = SCORE_BINS) -> "EvalStats":
        """Statistics from an untrusted reply: every field present, shaped, typed and consistent."""
        if set(arrays) != set(FIELDS):
            raise InputError(f"evaluation statistics hold {sorted(arrays)}, expected {list(FIELDS)}")
        shapes = {"leukemia_confusion": (2, 2), "stage_confusion": (num_stages, num_stages),
                  "score_histogram": (2, bins), "loss_sums": (2,)}
        values = {}
        for name in FIELDS:
            value = np.asarray(arrays[name])
            if value.shape != shapes[name]:
                raise InputError(f"{name}: shape {value.shape}, expected {shapes[name]}")
            counts = name != "loss_sums"
            if counts and value.dtype.kind not in "iu":
                raise InputError(f"{name}: expected integer counts, got {value.dtype}")
            if not counts and value.dtype.kind != "f":
                raise InputError(f"{name}: expected floating-point sums, got {value.dtype}")
            if not np.isfinite(value).all() or (value < 0).any() or (counts and (value > MAX_COUNT).any()):
                raise InputError(f"{name}: values must be finite, non-negative" + (f" and at most {MAX_COUNT}"
                                                                                  if counts else ""))
            values[name] = value.astype(np.int64 if counts else np.float64)
        stats = cls(**values)
        if not np.array_equal(stats.score_histogram.sum(1), stats.leukemia_confusion.sum(1)):
            raise InputError("score_histogram: its class totals differ from leukemia_confusion's")
        if stats.stage_confusion.sum() != stats.positives:
            raise InputError("stage_confusion: its total differs from the positives of leukemia_confusion")
        return stats


def merge(stats: list[EvalStats], num_stages: int, bins: int = SCORE_BINS) -> EvalStats:
    total = EvalStats.empty(num_stages, bins)
    for one in stats:
        total = total + one
    return total
