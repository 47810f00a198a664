"""Tests of ml.evaluation.metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ml.errors import DataError
from ml.evaluation.metrics import (
    confusion_csv,
    evaluate_predictions,
    expected_calibration_error,
    mcnemar_exact_p,
    mcnemar_table,
    multiclass_log_loss,
    top_confusions,
)


def _random_case(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2
    y = rng.integers(0, k, size=n)
    logits[np.arange(n), y] += 1.5  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs.astype(np.float32), [f"class_{i}" for i in range(k)]


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")
@pytest.mark.parametrize(("n", "k", "seed"), [(50, 3, 0), (200, 10, 1), (600, 120, 2)])
def test_metrics_match_sklearn(n: int, k: int, seed: int) -> None:
    y, probs, labels = _random_case(n, k, seed)
    pred = probs.argmax(axis=1)

    result = evaluate_predictions(y, probs, labels)

    assert result["n"] == n
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    p64 = probs.astype(np.float64)
    assert result["log_loss"] == pytest.approx(
        skm.log_loss(y, p64 / p64.sum(axis=1, keepdims=True), labels=list(range(k))), rel=1e-6)
    assert result["top5_accuracy"] == pytest.approx(
        skm.top_k_accuracy_score(y, probs, k=min(5, k), labels=list(range(k))))
    assert result["confusion"] == skm.confusion_matrix(y, pred, labels=list(range(k))).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=list(range(k)), zero_division=0)
    for i, label in enumerate(labels):
        assert result["per_class"][label]["precision"] == pytest.approx(precision[i])
        assert result["per_class"][label]["recall"] == pytest.approx(recall[i])
        assert result["per_class"][label]["f1"] == pytest.approx(f1[i])
        assert result["per_class"][label]["support"] == support[i]
    assert result["chance_accuracy"] == pytest.approx(1 / k)


def test_result_is_plain_json() -> None:
    y, probs, labels = _random_case(30, 4, 3)

    result = evaluate_predictions(y, probs, labels)

    assert json.loads(json.dumps(result)) == result
    floats = ("accuracy", "top5_accuracy", "log_loss", "macro_f1", "ece")
    assert all(type(result[key]) is float for key in floats)
    assert type(result["n"]) is int


def test_log_loss_clips_like_kaggle() -> None:
    # A confident miss: p(true) = 0 would be infinite; Kaggle clips to 1e-15 and renormalises.
    y = np.array([0, 1])
    probs = np.array([[0.0, 1.0], [0.0, 1.0]])
    clipped = np.clip(probs, 1e-15, 1 - 1e-15)
    clipped /= clipped.sum(axis=1, keepdims=True)
    expected = -(math.log(clipped[0, 0]) + math.log(clipped[1, 1])) / 2

    result = multiclass_log_loss(y, probs)

    assert result == pytest.approx(expected)
    assert result == pytest.approx(-math.log(1e-15) / 2, rel=1e-6)


def test_log_loss_renormalises_rows() -> None:
    y = np.array([0])
    unnormalised = np.array([[2.0, 2.0]])  # same as [0.5, 0.5] after renormalising

    assert multiclass_log_loss(y, unnormalised) == pytest.approx(math.log(2))


def test_ece_is_zero_for_perfectly_calibrated_toy() -> None:
    # Ten images at confidence 0.8 of which eight are right; ten at 0.6 of which six are right.
    y = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    probs = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 10)

    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed() -> None:
    # Bin (0.8667, 0.9333]: 2 images at 0.9, both right -> gap 0.1; bin (0.4667, 0.5333]:
    # 2 images at 0.5, one right -> gap 0. ECE = 0.1 * 2/4 + 0 = 0.05.
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])

    assert expected_calibration_error(y, probs) == pytest.approx(0.05)


def test_top5_with_fewer_than_five_classes_is_one() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])

    result = evaluate_predictions(y, probs, ["a", "b", "c"])

    assert result["top_k"] == 3
    assert result["top5_accuracy"] == 1.0
    assert result["accuracy"] == pytest.approx(0.25)


def test_top5_hand_computed() -> None:
    labels = [str(i) for i in range(7)]
    probs = np.tile(np.arange(7, 0, -1, dtype=float), (2, 1))  # class 0 most probable ... 6 least
    probs /= probs.sum(axis=1, keepdims=True)
    y = np.array([4, 5])  # rank 5 (in top 5) and rank 6 (not)

    assert evaluate_predictions(y, probs, labels)["top5_accuracy"] == pytest.approx(0.5)


def test_macro_f1_ignores_classes_absent_from_truth_and_predictions() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05]] * 2 + [[0.05, 0.9, 0.05]] * 2)

    result = evaluate_predictions(y, probs, ["a", "b", "never_seen"])

    assert result["macro_f1"] == 1.0
    assert result["per_class"]["never_seen"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize(
    ("y", "probs", "labels", "message"),
    [
        (np.array([0, 1]), np.array([0.5, 0.5]), ["a", "b"], "2-D"),
        (np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"], "3 columns but labels has 2"),
        (np.array([0, 1, 1]), np.full((2, 2), 0.5), ["a", "b"], "3 entries but probs has 2 rows"),
        (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], "allowed range is 0..1"),
        (np.array([0, -1]), np.full((2, 2), 0.5), ["a", "b"], "class index -1"),
        (np.array([0.5, 1.0]), np.full((2, 2), 0.5), ["a", "b"], "integer class indices"),
        (np.eye(2), np.full((2, 2), 0.5), ["a", "b"], "one-hot"),
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), ["a", "b"], "NaN"),
        (np.array([0, 1]), np.array([[-0.5, 1.5], [0.5, 0.5]]), ["a", "b"], ">= 0"),
        (np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"], "empty"),
        (np.array([0]), np.ones((1, 1)), ["a"], "at least 2 classes"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"], "duplicate"),
    ],
)
def test_invalid_inputs_raise_clear_errors(y, probs, labels, message: str) -> None:
    with pytest.raises(DataError, match=message):
        evaluate_predictions(y, probs, labels)


def test_confusion_csv_round_trips(tmp_path) -> None:
    labels = ["a", "b,with comma", "c"]
    y = np.array([0, 1, 2, 2])
    pred = np.array([0, 2, 2, 1])

    path = confusion_csv(y, pred, labels, tmp_path / "sub" / "confusion.csv")

    with path.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["true\\predicted", *labels]
    assert rows[2] == ["b,with comma", "0", "0", "1"]
    assert [r[0] for r in rows[1:]] == labels
    assert not list(path.parent.glob(".*tmp"))


def test_mcnemar_table_and_p_value() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    a = np.array([0, 1, 2, 1, 1, 0])  # right on 0,1,2,4
    b = np.array([0, 0, 2, 0, 1, 1])  # right on 0,2,3,4

    assert mcnemar_table(y, a, b) == (1, 1)
    assert mcnemar_exact_p(1, 1) == 1.0
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 2**10)


def test_top_confusions_lists_largest_off_diagonal_first() -> None:
    confusion = [[5, 3, 0], [1, 4, 0], [0, 0, 2]]

    result = top_confusions(confusion, ["a", "b", "c"], k=5)

    assert [(r["true"], r["predicted"], r["count"]) for r in result] == [("a", "b", 3), ("b", "a", 1)]
    assert result[0]["fraction_of_true"] == pytest.approx(3 / 8)


def test_confusion_is_left_out_of_metrics_above_the_class_cap() -> None:
    from ml.evaluation.metrics import MAX_CONFUSION_CLASSES, confusion_matrix

    y, probs, labels = _random_case(3000, MAX_CONFUSION_CLASSES + 1, 7)

    result = evaluate_predictions(y, probs, labels)

    assert "confusion" not in result
    assert "201 classes > 200" in result["confusion_omitted"] and "confusion.csv" in result["confusion_omitted"]
    full = confusion_matrix(y, probs.argmax(axis=1), len(labels))
    assert result["top_confusions"] == top_confusions(full, labels, k=10)
    assert len(result["per_class"]) == MAX_CONFUSION_CLASSES + 1
    small = evaluate_predictions(*_random_case(3000, MAX_CONFUSION_CLASSES, 7))
    assert len(small["confusion"]) == MAX_CONFUSION_CLASSES and "confusion_omitted" not in small


def test_metrics_of_a_thousand_classes_stay_small() -> None:
    y, probs, labels = _random_case(2000, 1000, 8)

    size = len(json.dumps(evaluate_predictions(y, probs, labels)))

    # O(K): per-class scores and labels (~130 bytes per class), not K x K (~2 MB more).
    assert size < 200_000, size
    assert len(json.dumps(evaluate_predictions(y, probs, labels, max_confusion_classes=1000))) > 2_000_000
