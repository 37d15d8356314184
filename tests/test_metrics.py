import math

import numpy as np
import pytest

from fedlite.metrics import accuracy, confusion_matrix, evaluate_predictions, format_metrics, macro_scores, roc_auc


def test_accuracy_by_hand():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_auc_by_hand_with_ties():
    # positives score 0.8, 0.4; negatives 0.4, 0.1 -> pairs: (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert roc_auc([1, 0], [0.9, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.1, 0.9]))


def test_confusion_and_macro_scores_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 2]
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    scores = macro_scores(cm)
    # precision: 1/2, 2/3, 1/1 ; recall: 1/2, 2/2, 1/2
    assert scores["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert scores["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    f1 = [0.5, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert scores["f1"] == pytest.approx(sum(f1) / 3)


def test_macro_scores_count_a_never_predicted_class_as_zero():
    cm = confusion_matrix([0, 1], [0, 0], 2)
    scores = macro_scores(cm)
    assert scores["per_class_f1"][1] == 0.0
    assert scores["precision"] == pytest.approx(0.25)


def test_macro_scores_match_scikit_learn_on_random_labels():
    from sklearn.metrics import f1_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 50), rng.integers(0, 4, 50)
    scores = macro_scores(confusion_matrix(y_true, y_pred, 4))
    assert scores["f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert scores["precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert scores["recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro", zero_division=0))


def test_stage_metrics_cover_positives_only():
    leukemia = np.array([0, 1, 1, 0])
    stage = np.array([-1, 0, 1, -1])
    leukemia_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    # the negatives' stage predictions are deliberately wrong and must not count
    stage_prob = np.array([[0, 0, 0, 1.0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    m = evaluate_predictions(leukemia, stage, leukemia_prob, stage_prob)
    assert m["accuracy"] == 0.75
    assert m["auc"] == 0.75  # positive 0.6 ranks below negative 0.7
    assert m["stage_macro_f1"] == 1.0  # over the stages that occur
    assert m["stage_accuracy"] == 1.0
    assert m["stage_confusion"][0][0] == 1 and m["stage_confusion"][1][1] == 1
    assert sum(map(sum, m["stage_confusion"])) == 2
    text = format_metrics(m, ["I", "II", "III", "IV"])
    assert "75.00 %" in text and "III" in text
