"""Multi-label decisions and scores.

Names follow scikit-learn's contract: `*_score` is higher-is-better and `*_loss`
lower-is-better. The headline is `samples_f1_score`, the F1 of each row's
predicted label set averaged over rows (scikit-learn `average="samples"`), which
is the "mean F1" that the COMP5329 Kaggle competition scores. A row with no
predicted label scores 0 there, so `decide` always keeps each row's top label.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

DEFAULT_THRESHOLD = 0.5
THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Map logits to probabilities without overflow warnings for large magnitudes."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


def decide(probs: np.ndarray, threshold: float | Sequence[float] | np.ndarray = DEFAULT_THRESHOLD) -> np.ndarray:
    """Turn (rows, labels) probabilities into 0/1 predictions.

    A label is predicted when its probability reaches its threshold (one number,
    or one per label). Each row's most probable label is always predicted, so no
    row is left empty.
    """
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), probs.shape[-1:])
    predictions = (probs >= thresholds).astype(np.int8)
    if probs.size:
        predictions[np.arange(len(probs)), probs.argmax(axis=1)] = 1
    return predictions


def f1_scores(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Return samples-, micro- and macro-averaged F1 (scikit-learn, zero_division=0)."""
    return {
        f"{average}_f1_score": float(f1_score(targets, predictions, average=average, zero_division=0))
        for average in ("samples", "micro", "macro")
    }


def per_label_scores(
    targets: np.ndarray, predictions: np.ndarray, labels: Sequence[int], label_names: dict[int, str]
) -> list[dict]:
    """Return precision, recall, F1 and support of every label, in label order."""
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, average=None, zero_division=0, labels=list(range(len(labels)))
    )
    return [
        {
            "label": int(label),
            "name": label_names.get(int(label), str(label)),
            "precision_score": float(precision[index]),
            "recall_score": float(recall[index]),
            "f1_score": float(f1[index]),
            "support": int(support[index]),
        }
        for index, label in enumerate(labels)
    ]


def _samples_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    # Same value as f1_score(average="samples", zero_division=0), vectorised for the threshold search.
    true_positives = (targets * predictions).sum(axis=1)
    denominator = targets.sum(axis=1) + predictions.sum(axis=1)
    per_row = np.divide(2.0 * true_positives, denominator, out=np.zeros(len(targets)), where=denominator > 0)
    return float(per_row.mean()) if len(targets) else 0.0


def tune_thresholds(
    targets: np.ndarray, probs: np.ndarray, grid: Sequence[float] = THRESHOLD_GRID, rounds: int = 2
) -> np.ndarray:
    """Choose one threshold per label that maximises samples F1, by coordinate ascent.

    Starting from 0.5 everywhere, each label's threshold in turn is set to the grid
    value with the best samples F1 while the others stay fixed. The search makes
    `rounds` passes over the labels. A label keeps its current threshold unless another value is strictly
    better, so ties favour 0.5.
    """
    targets = np.asarray(targets, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    thresholds = np.full(probs.shape[1], DEFAULT_THRESHOLD)
    best = _samples_f1(targets, decide(probs, thresholds))
    for _ in range(rounds):
        for label in range(probs.shape[1]):
            for value in grid:
                candidate = thresholds.copy()
                candidate[label] = value
                score = _samples_f1(targets, decide(probs, candidate))
                if score > best + 1e-12:
                    best, thresholds = score, candidate
    return thresholds


def most_frequent_label_predictions(train_targets: np.ndarray, rows: int) -> np.ndarray:
    """Predict the most frequent training label, and only it, for `rows` rows (the baseline)."""
    predictions = np.zeros((rows, train_targets.shape[1]), dtype=np.int8)
    predictions[:, int(np.asarray(train_targets).sum(axis=0).argmax())] = 1
    return predictions
