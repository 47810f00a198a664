"""Confused class pairs: ranking, the merge suggestion, the confusion cap, and the pages that show them."""

from __future__ import annotations

import numpy as np
import pytest

from ml.errors import DataError
from ml.evaluation.confusions import confused_pairs, confusion_section, per_class_table
from ml.evaluation.metrics import MAX_CONFUSION_CLASSES, evaluate_predictions
from ml.evaluation.model_card import render_model_card
from ml.evaluation.report import build_run_report, render_run_report_html
from tests.html_safety import assert_escaped, assert_safe

HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "{{7*7}}", "perro español"]


def _probs_for(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    probs = np.full((len(y_true), n_classes), 0.1 / (n_classes - 1))
    probs[np.arange(len(y_true)), y_pred] = 0.9
    return probs


def test_pairs_are_ranked_by_row_normalised_rate_not_count() -> None:
    # Class 0 (100 images) loses 6 to class 1; class 2 (4 images) loses 2 to class 3 (50%).
    matrix = np.zeros((4, 4), dtype=int)
    matrix[0, 0], matrix[0, 1] = 94, 6
    matrix[1, 1] = 100
    matrix[2, 2], matrix[2, 3] = 2, 2
    matrix[3, 3] = 10

    result = confused_pairs(matrix, ["a", "b", "c", "d"])

    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("c", "d"), ("a", "b")]
    first = result["pairs"][0]
    assert first["rate_a_as_b"] == pytest.approx(0.5) and first["b_as_a"] == 0
    assert result["n_errors"] == 8
    assert result["pairs"][1]["share_of_errors"] == pytest.approx(6 / 8)


def test_both_directions_make_one_pair_named_from_the_more_mistaken_class() -> None:
    matrix = np.array([[8, 1, 0], [3, 7, 0], [0, 0, 10]])

    pairs = confused_pairs(matrix, ["husky", "malamute", "pug"])["pairs"]

    assert len(pairs) == 1
    assert (pairs[0]["a"], pairs[0]["b"], pairs[0]["a_as_b"], pairs[0]["b_as_a"]) == ("malamute", "husky", 3, 1)
    assert pairs[0]["rate"] == pytest.approx(3 / 10 + 1 / 9)


def test_one_pair_holding_most_errors_gets_a_merge_suggestion() -> None:
    matrix = np.array([[5, 4, 0, 0], [3, 6, 0, 1], [0, 0, 9, 1], [0, 0, 0, 10]])

    result = confused_pairs(matrix, ["husky", "malamute", "pug", "boxer"])

    assert result["dominant"]["errors"] == 7 and result["dominant"]["share_of_errors"] == pytest.approx(7 / 9)
    assert "consider merging 'husky' and 'malamute', or more data for them" in result["suggestion"]


@pytest.mark.parametrize("matrix", [
    # errors spread over three pairs: none holds most of them
    [[8, 1, 1, 0], [1, 8, 0, 1], [0, 1, 8, 1], [1, 0, 1, 8]],
    # two errors only: a share of two means nothing
    [[9, 2, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]],
    # no error at all
    np.eye(4, dtype=int) * 5,
])
def test_no_suggestion_without_a_dominant_pair(matrix) -> None:
    result = confused_pairs(matrix, ["a", "b", "c", "d"])

    assert result["dominant"] is None and result["suggestion"] is None


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(DataError, match=r"3 x 3 .* got \(2, 2\)"):
        confused_pairs(np.eye(2, dtype=int), ["a", "b", "c"])


def test_over_the_confusion_cap_pairs_stay_and_the_matrix_stays_out() -> None:
    n_classes = MAX_CONFUSION_CLASSES + 1
    y = np.repeat(np.arange(n_classes), 2)
    y_pred = y.copy()
    y_pred[::2] = (y[::2] + 1) % n_classes  # every class loses one image to the next

    metrics = evaluate_predictions(y, _probs_for(y, y_pred, n_classes), [f"c{i}" for i in range(n_classes)])

    assert "confusion" not in metrics and "confusion_omitted" in metrics
    assert len(metrics["confused_pairs"]["pairs"]) == 10
    assert metrics["confused_pairs"]["n_errors"] == n_classes
    table = per_class_table(metrics["per_class"])
    assert table.count("<tr>") == MAX_CONFUSION_CLASSES + 1  # header + the cap, worst first
    assert f"{MAX_CONFUSION_CLASSES} worst shown; all {n_classes} are in metrics.json" in table


@pytest.fixture
def hostile_metrics() -> dict:
    # HOSTILE[0] and HOSTILE[1] are confused with each other 7 times; one other error.
    y = np.array([0] * 6 + [1] * 6 + [2] * 4 + [3] * 4)
    y_pred = np.array([1, 1, 1, 1, 0, 0] + [0, 0, 0, 1, 1, 1] + [2, 2, 2, 3] + [3] * 4)
    return evaluate_predictions(y, _probs_for(y, y_pred, 4), HOSTILE)


def test_section_escapes_labels_and_shows_precision_and_recall(hostile_metrics) -> None:
    page = confusion_section(hostile_metrics["confused_pairs"], hostile_metrics["per_class"], candidate=HOSTILE[2])

    assert "consider merging" in page and "<th>precision</th><th>recall</th>" in page
    assert_safe(page, source="confusion section")
    for name in HOSTILE:
        assert_escaped(page, name, source="confusion section")


def test_run_report_lists_the_best_candidates_confused_classes(hostile_metrics) -> None:
    confusions = {"candidate": "scratch_small", "confused_pairs": hostile_metrics["confused_pairs"],
                  "per_class": hostile_metrics["per_class"]}
    report = build_run_report(run_id="r1", dataset={"labels": HOSTILE}, quality=None, leaderboard=[],
                              production=None, decision=None, config={}, confusions=confusions)

    page = render_run_report_html(report)

    assert report["confusions"]["confused_pairs"]["dominant"]["errors"] == 7
    assert "<h2>Confused classes</h2>" in page and "consider merging" in page
    assert "Per-class precision and recall (4 classes" in page
    assert_safe(page, source="report.html")
    for name in HOSTILE:
        assert_escaped(page, name, source="report.html", must_appear=True)


def test_model_card_lists_confused_pairs_even_from_older_metrics(hostile_metrics) -> None:
    older = {k: v for k, v in hostile_metrics.items() if k != "confused_pairs"}  # before this field existed
    for metrics in (hostile_metrics, older):
        page = render_model_card(model_name="m", version="v1", candidate="c", metrics=metrics, labels=HOSTILE,
                                 dataset={}, quality=None, leaderboard=[], decision=None, lineage={}, images=None)

        assert "<h3>Confused classes</h3>" in page and "consider merging" in page
        assert_safe(page, source="model_card.html")
        for name in HOSTILE:
            assert_escaped(page, name, source="model_card.html", must_appear=True)
