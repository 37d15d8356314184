"""Evaluation from sites' statistics equals the pooled evaluation; untrusted statistics are checked."""

import numpy as np
import pytest

from fedlite.errors import InputError
from fedlite.eval_stats import FIELDS, EvalStats, merge, score_bins
from fedlite.metrics import evaluate_predictions

STAGES = 4


def _cases(rng, n, separation):
    """Labels and probabilities of a model of a given skill, with some exact ties and extreme scores."""
    leukemia = (rng.random(n) < 0.55).astype(int)
    stage = np.where(leukemia == 1, rng.integers(0, STAGES, n), -1)
    logit = rng.normal(0, 1.5, n) + separation * (2 * leukemia - 1)
    logit[rng.random(n) < 0.05] = 30.0 * np.sign(logit[rng.random(n) < 0.05].sum() + 1)  # saturated scores
    p = 1 / (1 + np.exp(-logit))
    p[:10] = 0.5  # exact ties at the threshold
    stage_logits = rng.normal(0, 1, (n, STAGES))
    stage_logits[np.arange(n), np.clip(stage, 0, None)] += separation
    stage_prob = np.exp(stage_logits) / np.exp(stage_logits).sum(1, keepdims=True)
    return leukemia, stage, np.stack([1 - p, p], 1), stage_prob


@pytest.mark.parametrize("separation", [0.2, 1.0, 2.5, 5.0])
def test_merged_site_statistics_equal_the_pooled_metrics(separation):
    rng = np.random.default_rng(int(separation * 10))
    leukemia, stage, leukemia_prob, stage_prob = _cases(rng, 3000, separation)
    pooled = evaluate_predictions(leukemia, stage, leukemia_prob, stage_prob)
    sites = np.array_split(rng.permutation(len(leukemia)), 7)  # uneven, non-IID-free partition of the cases
    parts = [EvalStats.from_predictions(leukemia[i], stage[i], leukemia_prob[i], stage_prob[i]) for i in sites]
    merged = merge(parts, STAGES).metrics()
    for key in ("cases", "positives", "accuracy", "stage_accuracy", "stage_macro_precision", "stage_macro_recall",
                "stage_macro_f1", "stage_per_class_f1", "stage_confusion"):
        assert merged[key] == pooled[key], key  # exactly: the same confusion matrices
    assert abs(merged["auc"] - pooled["auc"]) < 1e-3
    true_prob = np.clip(leukemia_prob[np.arange(len(leukemia)), leukemia], 1e-12, None)  # saturated scores
    loss = -np.log(true_prob).mean() - np.log(stage_prob[stage >= 0, stage[stage >= 0]]).mean()
    assert merged["loss"] == pytest.approx(loss, rel=1e-9)


def test_histogram_auc_is_exact_when_no_bin_holds_both_classes():
    leukemia = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([0.01, 0.2, 0.3, 0.6, 0.9, 0.999])
    stats = EvalStats.from_predictions(leukemia, np.where(leukemia == 1, 0, -1), np.stack([1 - p, p], 1),
                                       np.full((6, STAGES), 0.25))
    assert stats.auc() == pytest.approx(8 / 9)  # one of nine positive-negative pairs is ordered wrongly


def test_score_bins_are_monotone_and_cover_the_extremes():
    p = np.array([0.0, 1e-30, 1e-7, 0.3, 0.5, 0.7, 1 - 1e-7, 1.0])
    bins = score_bins(p)
    assert (np.diff(bins) >= 0).all() and bins[0] == 0 and bins[-1] == bins.max() <= 2047


def _good():
    return EvalStats.from_predictions(np.array([0, 1, 1]), np.array([-1, 0, 2]),
                                      np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
                                      np.full((3, STAGES), 0.25)).to_arrays()


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("loss_sums"), "expected"),
    (lambda a: a.update(extra=np.zeros(1)), "expected"),
    (lambda a: a.update(stage_confusion=np.zeros((3, 3), np.int64)), "shape"),
    (lambda a: a.update(leukemia_confusion=a["leukemia_confusion"].astype(np.float64)), "integer counts"),
    (lambda a: a.update(loss_sums=np.array([np.nan, 0.0])), "finite"),
    (lambda a: a.update(leukemia_confusion=a["leukemia_confusion"] * -1), "non-negative"),
    (lambda a: a.update(leukemia_confusion=a["leukemia_confusion"] + 10**12), "at most"),
    (lambda a: a["score_histogram"].__setitem__((0, 5), 3), "class totals"),
    (lambda a: a["stage_confusion"].__setitem__((0, 0), 9), "positives"),
])
def test_malformed_statistics_from_a_site_are_refused(change, message):
    arrays = _good()
    change(arrays)
    with pytest.raises(InputError, match=message):
        EvalStats.from_arrays(arrays, STAGES)


def test_statistics_travel_as_fixed_size_arrays_of_counts():
    arrays = _good()
    assert set(arrays) == set(FIELDS)
    assert {k: v.shape for k, v in arrays.items()} == {"leukemia_confusion": (2, 2), "stage_confusion": (4, 4),
                                                       "score_histogram": (2, 2048), "loss_sums": (2,)}
    assert EvalStats.from_arrays(arrays, STAGES).cases == 3
