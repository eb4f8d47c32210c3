"""Tests for core.metrics: decisions, F1 averages against scikit-learn, threshold tuning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from core.metrics import (
    _samples_f1,
    decide,
    f1_scores,
    most_frequent_label_predictions,
    per_label_scores,
    sigmoid,
    tune_thresholds,
)

# Hand-made case: row 2 has no true label, column 2 is never true, column 1 never predicted.
HAND_TARGETS = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
HAND_PREDICTIONS = np.array([[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0]])


def _random_case(seed: int, rows: int = 12, labels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random((rows, labels)) < 0.35).astype(int)
    predictions = (rng.random((rows, labels)) < 0.4).astype(int)
    targets[0] = 0  # a row with nothing true
    predictions[1] = 0  # a row with nothing predicted
    return targets, predictions


# ----------------------------------------------------------------------------- decide


def test_decide_single_threshold():
    probs = np.array([[0.9, 0.6, 0.2], [0.7, 0.1, 0.55]])
    assert decide(probs).tolist() == [[1, 1, 0], [1, 0, 1]]
    assert decide(probs, 0.65).tolist() == [[1, 0, 0], [1, 0, 0]]


def test_decide_threshold_is_inclusive():
    # A probability equal to the threshold is predicted.
    probs = np.array([[0.9, 0.5, 0.49]])
    assert decide(probs).tolist() == [[1, 1, 0]]


def test_decide_per_label_thresholds():
    probs = np.array([[0.9, 0.3, 0.3], [0.2, 0.25, 0.95]])
    predictions = decide(probs, [0.5, 0.2, 0.4])
    assert predictions.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_decide_per_label_thresholds_array():
    probs = np.array([[0.9, 0.3, 0.3]])
    assert decide(probs, np.array([0.95, 0.3, 0.31])).tolist() == [[1, 1, 0]]


def test_decide_keeps_top_label():
    # No probability reaches 0.5, yet every row keeps its most probable label.
    probs = np.array([[0.1, 0.4, 0.2], [0.3, 0.05, 0.01]])
    assert decide(probs).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_decide_keeps_top_label_above_threshold():
    # A per-label threshold above 1 still cannot empty the row.
    probs = np.array([[0.2, 0.9, 0.1]])
    assert decide(probs, [0.5, 1.1, 0.5]).tolist() == [[0, 1, 0]]


def test_decide_tie_keeps_first_label():
    # Two labels share the top probability below the threshold, and only the first is kept.
    probs = np.array([[0.3, 0.3, 0.1]])
    assert decide(probs).tolist() == [[1, 0, 0]]


def test_decide_tie_above_threshold_keeps_both():
    probs = np.array([[0.7, 0.7, 0.1]])
    assert decide(probs).tolist() == [[1, 1, 0]]


def test_decide_output_dtype_shape():
    probs = np.random.default_rng(0).random((4, 6))
    predictions = decide(probs)
    assert predictions.shape == (4, 6)
    assert predictions.dtype == np.int8
    assert (predictions.sum(axis=1) >= 1).all()


def test_decide_empty_rows():
    predictions = decide(np.zeros((0, 3)))
    assert predictions.shape == (0, 3)


# ----------------------------------------------------------------------------- F1 scores


def test_f1_scores_hand_case():
    # Rows: F1 1, 1/2, 0, 0 -> samples 3/8. Micro: tp 2, fp 2, fn 2 -> 0.5.
    # Macro over labels: label 0 F1 0.8, label 1 F1 0, label 2 F1 0 -> 0.8 / 3.
    scores = f1_scores(HAND_TARGETS, HAND_PREDICTIONS)
    assert scores["samples_f1_score"] == pytest.approx(3 / 8)
    assert scores["micro_f1_score"] == pytest.approx(0.5)
    assert scores["macro_f1_score"] == pytest.approx(0.8 / 3)


def test_f1_scores_keys():
    scores = f1_scores(HAND_TARGETS, HAND_PREDICTIONS)
    assert set(scores) == {"samples_f1_score", "micro_f1_score", "macro_f1_score"}
    assert all(isinstance(value, float) for value in scores.values())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("average", ["samples", "micro", "macro"])
def test_f1_scores_match_sklearn_random(seed, average):
    targets, predictions = _random_case(seed)
    expected = f1_score(targets, predictions, average=average, zero_division=0)
    assert f1_scores(targets, predictions)[f"{average}_f1_score"] == pytest.approx(expected)


def test_f1_scores_perfect_predictions():
    targets = np.array([[1, 0], [0, 1], [1, 1]])
    scores = f1_scores(targets, targets)
    assert scores["samples_f1_score"] == pytest.approx(1.0)
    assert scores["micro_f1_score"] == pytest.approx(1.0)
    assert scores["macro_f1_score"] == pytest.approx(1.0)


def test_f1_scores_all_negative():
    targets = np.zeros((3, 2), dtype=int)
    predictions = np.array([[1, 0], [0, 1], [1, 0]])
    scores = f1_scores(targets, predictions)
    assert scores["samples_f1_score"] == 0.0
    assert scores["micro_f1_score"] == 0.0
    assert scores["macro_f1_score"] == 0.0


def test_per_label_scores_hand_case():
    rows = per_label_scores(HAND_TARGETS, HAND_PREDICTIONS, [1, 3, 7], {1: "person", 3: "car"})
    assert [row["label"] for row in rows] == [1, 3, 7]
    assert [row["name"] for row in rows] == ["person", "car", "7"]
    assert rows[0]["precision_score"] == pytest.approx(2 / 3)
    assert rows[0]["recall_score"] == pytest.approx(1.0)
    assert rows[0]["f1_score"] == pytest.approx(0.8)
    assert [row["support"] for row in rows] == [2, 2, 0]


@pytest.mark.parametrize("seed", range(4))
def test_per_label_scores_match_sklearn(seed):
    targets, predictions = _random_case(seed)
    labels = [2, 4, 6, 8, 10]
    rows = per_label_scores(targets, predictions, labels, {label: f"name {label}" for label in labels})
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, average=None, zero_division=0
    )
    assert [row["name"] for row in rows] == [f"name {label}" for label in labels]
    assert [row["precision_score"] for row in rows] == pytest.approx(precision.tolist())
    assert [row["recall_score"] for row in rows] == pytest.approx(recall.tolist())
    assert [row["f1_score"] for row in rows] == pytest.approx(f1.tolist())
    assert [row["support"] for row in rows] == support.tolist()


def test_samples_f1_hand_case():
    assert _samples_f1(HAND_TARGETS, HAND_PREDICTIONS) == pytest.approx(3 / 8)


@pytest.mark.parametrize("seed", range(6))
def test_samples_f1_matches_sklearn(seed):
    targets, predictions = _random_case(seed, rows=15, labels=4)
    targets[2] = 0
    predictions[2] = 0  # nothing true and nothing predicted
    expected = f1_score(targets, predictions, average="samples", zero_division=0)
    assert _samples_f1(targets, predictions) == pytest.approx(expected)


def test_samples_f1_no_rows():
    assert _samples_f1(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("seed", range(5))
def test_tune_thresholds_never_below_default(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((40, 4)) < 0.3).astype(float)
    # Noisy probabilities that carry some signal about the targets.
    probs = np.clip(0.35 * targets + 0.65 * rng.random((40, 4)), 0, 1)
    thresholds = tune_thresholds(targets, probs)
    tuned = _samples_f1(targets, decide(probs, thresholds))
    default = _samples_f1(targets, decide(probs, 0.5))
    assert thresholds.shape == (4,)
    assert tuned >= default


def test_tune_thresholds_finds_lower_threshold():
    # Label 0 is true exactly when its probability is 0.3, not 0.1. Label 1 is always true and
    # most probable. At 0.5 label 0 is never predicted, but any threshold in (0.1, 0.3] is perfect.
    targets = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], dtype=float)
    probs = np.array([[0.3, 0.9], [0.1, 0.9], [0.3, 0.9], [0.1, 0.9]])
    thresholds = tune_thresholds(targets, probs)
    assert 0.1 < thresholds[0] <= 0.3
    assert thresholds[1] == 0.5  # no value is strictly better, so 0.5 stays
    assert _samples_f1(targets, decide(probs, thresholds)) == pytest.approx(1.0)
    assert _samples_f1(targets, decide(probs, 0.5)) < 1.0


def test_tune_thresholds_finds_higher_threshold():
    # Label 0 has probability 0.7 on negatives and 0.9 on positives. Label 1 is always
    # true with probability 0.95. Only a threshold in (0.7, 0.9] is perfect.
    targets = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], dtype=float)
    probs = np.array([[0.9, 0.95], [0.7, 0.95], [0.9, 0.95], [0.7, 0.95]])
    thresholds = tune_thresholds(targets, probs)
    assert 0.7 < thresholds[0] <= 0.9
    assert _samples_f1(targets, decide(probs, thresholds)) == pytest.approx(1.0)


def test_tune_thresholds_values_on_grid():
    grid = [0.2, 0.4, 0.6]
    rng = np.random.default_rng(3)
    targets = (rng.random((20, 3)) < 0.4).astype(float)
    probs = rng.random((20, 3))
    thresholds = tune_thresholds(targets, probs, grid=grid)
    assert all(value in grid + [0.5] for value in thresholds.tolist())


# ----------------------------------------------------------------------------- baseline and sigmoid


def test_most_frequent_label_predictions_hand_case():
    train_targets = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1]])
    predictions = most_frequent_label_predictions(train_targets, 4)
    assert predictions.shape == (4, 3)
    assert predictions[:, 2].tolist() == [1, 1, 1, 1]
    assert int(predictions[:, :2].sum()) == 0


def test_most_frequent_label_predictions_tie():
    # Labels 0 and 1 are equally frequent, and the first one wins.
    train_targets = np.array([[1, 1, 0], [1, 1, 0]])
    predictions = most_frequent_label_predictions(train_targets, 2)
    assert predictions.tolist() == [[1, 0, 0], [1, 0, 0]]


def test_sigmoid_known_values():
    values = sigmoid(np.array([0.0, 2.0, -2.0]))
    expected = 1.0 / (1.0 + np.exp(-np.array([0.0, 2.0, -2.0])))
    assert values == pytest.approx(expected)


def test_sigmoid_large_magnitudes_no_warning():
    logits = np.array([-1e6, -1000.0, -745.0, 745.0, 1000.0, 1e6, np.finfo(np.float64).max])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            probs = sigmoid(logits)
    assert np.isfinite(probs).all()
    assert ((probs >= 0.0) & (probs <= 1.0)).all()
    assert probs[0] == 0.0
    assert probs[-1] == 1.0


def test_sigmoid_float32_input():
    probs = sigmoid(np.array([[-500.0, 500.0]], dtype=np.float32))
    assert probs.shape == (1, 2)
    assert probs.tolist() == [[0.0, 1.0]]
