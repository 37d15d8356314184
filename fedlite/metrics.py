"""The paper's evaluation: leukemia accuracy and AUC-ROC; stage macro precision/recall/F1 and the
confusion matrix over positives (negatives carry no stage). numpy only, so agents can use it."""

from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half);
    NaN when only one class is present."""
    y_true, score = np.asarray(y_true).astype(bool), np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def macro_scores(cm: np.ndarray) -> dict[str, float | list[float]]:
    """Macro precision/recall/F1 from a confusion matrix, averaged over the classes that occur in
    the labels or the predictions (scikit-learn's default); an undefined ratio scores 0."""
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (predicted + actual) > 0
    if not present.any():
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan"),
                "per_class_f1": [float(v) for v in f1]}
    return {"precision": float(precision[present].mean()), "recall": float(recall[present].mean()),
            "f1": float(f1[present].mean()), "per_class_f1": [float(v) for v in f1]}


def evaluate_predictions(leukemia: np.ndarray, stage: np.ndarray, leukemia_prob: np.ndarray,
                         stage_prob: np.ndarray) -> dict:
    """All metrics from labels (stage -1 for negatives) and the two heads' probabilities."""
    leukemia, stage = np.asarray(leukemia), np.asarray(stage)
    leukemia_prob, stage_prob = np.asarray(leukemia_prob), np.asarray(stage_prob)
    positive = stage >= 0
    num_stages = stage_prob.shape[1]
    cm = confusion_matrix(stage[positive], stage_prob[positive].argmax(axis=1), num_stages)
    stage_scores = macro_scores(cm)
    return {
        "cases": int(len(leukemia)),
        "positives": int(positive.sum()),
        "accuracy": accuracy(leukemia, leukemia_prob[:, 1] >= 0.5),
        "auc": roc_auc(leukemia, leukemia_prob[:, 1]),
        "stage_accuracy": accuracy(stage[positive], stage_prob[positive].argmax(axis=1)),
        "stage_macro_precision": stage_scores["precision"],
        "stage_macro_recall": stage_scores["recall"],
        "stage_macro_f1": stage_scores["f1"],
        "stage_per_class_f1": stage_scores["per_class_f1"],
        "stage_confusion": cm.tolist(),
    }


def format_metrics(metrics: dict, stage_names: list[str] | tuple[str, ...]) -> str:
    """A readable report: headline numbers, then the stage confusion matrix with names."""
    lines = [
        f"cases            {metrics['cases']} ({metrics['positives']} positive)",
        f"accuracy         {metrics['accuracy'] * 100:.2f} %",
        f"AUC-ROC          {metrics['auc']:.4f}",
        f"stage macro-P    {metrics['stage_macro_precision']:.4f}",
        f"stage macro-R    {metrics['stage_macro_recall']:.4f}",
        f"stage macro-F1   {metrics['stage_macro_f1']:.4f}",
        "",
        "stage confusion (rows: true, columns: predicted; positives only)",
    ]
    width = max(10, *(len(n) + 1 for n in stage_names))
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in stage_names))
    for name, row in zip(stage_names, metrics["stage_confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
