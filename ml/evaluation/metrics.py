"""Test-split metrics of a classifier from its predicted probabilities.

Everything returned is plain Python (floats, ints, lists, dicts) so it can go straight into
`metrics.json`, XCom and the run report. Computed with numpy alone, so this module stays cheap
to import; the tests check it against scikit-learn.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml.errors import DataError
from ml.evaluation.confusions import confused_pairs
from ml.io import write_atomic

log = logging.getLogger(__name__)

# Kaggle's multi-class log loss (dog-breed-identification) clips to [eps, 1 - eps] and then
# renormalises every row, so a single overconfident miss costs at most -log(1e-15) ~ 34.5.
LOG_LOSS_EPS = 1e-15
ECE_BINS = 15  # Guo et al. 2017, "On Calibration of Modern Neural Networks"
TOP_K = 5
# How far a probability row may sum from 1 before we say so (float32 softmax drifts ~1e-6).
_ROW_SUM_TOLERANCE = 1e-3
# metrics.json goes to XCom, the registry page and every version: above this many classes the
# K x K matrix (1,000 classes: 1 M cells, ~3 MB of JSON) is left out of it. The full matrix is
# in confusion.csv and can be recomputed from predictions.npz (`confusion_matrix`). 200 keeps
# dog-breed-identification's 120 classes (14,400 cells, ~45 KB of JSON) in; 200 x 200 is ~150 KB.
MAX_CONFUSION_CLASSES = 200
TOP_CONFUSIONS = 10


def validate_predictions(
    y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and values; return (y_true as int64 of shape (N,), probs as float64 N x K).

    Raises:
        DataError: naming the array, its shape/value and what is allowed.
    """
    n_classes = len(labels)
    if n_classes < 2:
        raise DataError(f"labels must name at least 2 classes, got {n_classes}")
    probs_arr = np.asarray(probs)
    if probs_arr.ndim != 2:
        raise DataError(f"probs must be a 2-D array (N images x K classes), got shape {probs_arr.shape}")
    if probs_arr.shape[1] != n_classes:
        raise DataError(
            f"probs has {probs_arr.shape[1]} columns but labels has {n_classes} classes; "
            "column i must be the probability of labels[i]"
        )
    if probs_arr.shape[0] == 0:
        raise DataError("probs has no rows: the test split is empty")
    if not np.issubdtype(probs_arr.dtype, np.number) or np.issubdtype(probs_arr.dtype, np.complexfloating):
        raise DataError(f"probs must be real numbers, got dtype {probs_arr.dtype}")
    probs_arr = probs_arr.astype(np.float64)
    if not np.all(np.isfinite(probs_arr)):
        bad = int(np.argwhere(~np.isfinite(probs_arr))[0, 0])
        raise DataError(f"probs has NaN or infinite values (first in row {bad})")
    if probs_arr.min() < 0:
        raise DataError(f"probs must be >= 0 (softmax outputs), got a minimum of {probs_arr.min():.6g}")

    y_arr = np.asarray(y_true)
    if y_arr.ndim == 2 and y_arr.shape == probs_arr.shape:
        raise DataError("y_true looks one-hot encoded (N x K); pass class indices of shape (N,)")
    if y_arr.ndim != 1:
        raise DataError(f"y_true must be a 1-D array of class indices, got shape {y_arr.shape}")
    if y_arr.shape[0] != probs_arr.shape[0]:
        raise DataError(f"y_true has {y_arr.shape[0]} entries but probs has {probs_arr.shape[0]} rows")
    if not np.issubdtype(y_arr.dtype, np.integer):
        if np.issubdtype(y_arr.dtype, np.floating) and np.all(np.mod(y_arr, 1) == 0):
            y_arr = y_arr.astype(np.int64)  # e.g. indices that went through a float column
        else:
            raise DataError(f"y_true must hold integer class indices, got dtype {y_arr.dtype}")
    y_arr = y_arr.astype(np.int64)
    if y_arr.min() < 0 or y_arr.max() >= n_classes:
        bad = y_arr[(y_arr < 0) | (y_arr >= n_classes)][0]
        raise DataError(f"y_true has class index {int(bad)}; allowed range is 0..{n_classes - 1}")
    row_sums = probs_arr.sum(axis=1)
    off = np.abs(row_sums - 1.0) > _ROW_SUM_TOLERANCE
    if off.any():
        # Not fatal: log loss renormalises anyway, but it usually means logits were passed.
        log.warning("%d of %d probability rows do not sum to 1 (e.g. row %d sums to %.4f); "
                    "were logits passed instead of softmax outputs?",
                    int(off.sum()), len(row_sums), int(np.argmax(off)), float(row_sums[np.argmax(off)]))
    return y_arr, probs_arr


def multiclass_log_loss(y_true: np.ndarray, probs: np.ndarray, *, eps: float = LOG_LOSS_EPS) -> float:
    """Kaggle's multi-class log loss: clip to [eps, 1-eps], renormalise rows, mean -log p(true)."""
    clipped = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    clipped /= clipped.sum(axis=1, keepdims=True)
    picked = clipped[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(picked)))


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k most probable.

    Ties count in the model's favour: the true class is in the top k when fewer than k classes
    have a strictly higher probability (sklearn breaks ties by index instead; with float
    softmax outputs exact ties are rare).
    """
    true_p = probs[np.arange(len(y_true)), y_true]
    n_higher = (probs > true_p[:, None]).sum(axis=1)
    return float(np.mean(n_higher < k))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = ECE_BINS) -> float:
    """ECE over `n_bins` equal-width confidence bins (lo, hi] of the max probability.

    sum over bins of |accuracy(bin) - mean confidence(bin)| * (images in bin / all images).
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    # side="left" puts a confidence equal to an edge into the lower bin: (lo, hi] intervals.
    bins = np.searchsorted(inner_edges, confidence, side="left")
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count:
            gap = abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
            ece += gap * count / len(y_true)
    return float(ece)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1, support) per class from a confusion matrix; 0 where undefined."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    # zero_division=0 as in sklearn: a class never predicted has precision 0, not NaN.
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def evaluate_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    *,
    max_confusion_classes: int = MAX_CONFUSION_CLASSES,
) -> dict:
    """All test-split metrics of one model, JSON-serialisable and O(K) in size for K classes.

    Args:
        y_true: (N,) integer class indices into `labels`.
        probs: (N, K) predicted probabilities, column i for `labels[i]`.
        labels: the K class names, index = output unit.
        max_confusion_classes: the K x K ``confusion`` is included only up to this many classes.

    Returns:
        ``n``, ``n_classes``, ``accuracy``, ``top5_accuracy`` (k = min(5, K), also as ``top_k``),
        ``log_loss`` (Kaggle's clipped and renormalised), ``macro_f1`` (over the classes that
        occur in y_true or the predictions, as sklearn's default), ``ece`` (15 bins),
        ``chance_accuracy`` (1/K), ``per_class`` ({label: {precision, recall, f1, support}}),
        ``top_confusions`` (the 10 largest off-diagonal cells, see `top_confusions`),
        ``confused_pairs`` (the 10 most confused class pairs, row-normalised, and a suggestion when
        one pair holds most of the errors: `ml.evaluation.confusions.confused_pairs`), ``labels``,
        and ``confusion`` (K x K list of lists, rows = true class) when K <= max_confusion_classes;
        above it ``confusion_omitted`` says why it is missing.

    Raises:
        DataError: when shapes or values are invalid.
    """
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        raise DataError(f"labels has duplicate class names: {dupes[:10]}")
    y, p = validate_predictions(y_true, probs, labels)
    n, n_classes = p.shape
    y_pred = p.argmax(axis=1)
    matrix = confusion_matrix(y, y_pred, n_classes)
    precision, recall, f1, support = per_class_scores(matrix)
    present = (support > 0) | (matrix.sum(axis=0) > 0)
    k = min(TOP_K, n_classes)
    result = {
        "n": int(n),
        "n_classes": int(n_classes),
        "accuracy": float(np.mean(y_pred == y)),
        "top5_accuracy": top_k_accuracy(y, p, k),
        "top_k": int(k),
        "log_loss": multiclass_log_loss(y, p),
        "macro_f1": float(f1[present].mean()),
        "ece": expected_calibration_error(y, p),
        "chance_accuracy": 1.0 / n_classes,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "top_confusions": top_confusions(matrix, labels, k=TOP_CONFUSIONS),
        # From the full matrix whatever K: O(pairs) in size, so it stays under the confusion cap.
        "confused_pairs": confused_pairs(matrix, labels),
        "labels": labels,
    }
    if n_classes <= max_confusion_classes:
        result["confusion"] = matrix.tolist()
    else:
        result["confusion_omitted"] = (
            f"{n_classes} classes > {max_confusion_classes}: the {n_classes} x {n_classes} matrix is in "
            "confusion.csv (or recompute it from predictions.npz)"
        )
    log.info("evaluated %d test images over %d classes: accuracy %.4f, top-%d %.4f, log loss %.4f, "
             "macro F1 %.4f, ECE %.4f (chance %.4f)", n, n_classes, result["accuracy"], k,
             result["top5_accuracy"], result["log_loss"], result["macro_f1"], result["ece"],
             result["chance_accuracy"])
    return result


def top_confusions(confusion: Sequence[Sequence[int]], labels: Sequence[str], *, k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells: [{true, predicted, count, fraction_of_true}], largest first."""
    matrix = np.asarray(confusion, dtype=np.int64)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    support = matrix.sum(axis=1)
    out = []
    for index in flat:
        i, j = divmod(int(index), matrix.shape[1])
        if off[i, j] == 0:
            break
        out.append({"true": str(labels[i]), "predicted": str(labels[j]), "count": int(off[i, j]),
                    "fraction_of_true": float(off[i, j] / support[i])})
    return out


def confusion_csv(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str], path: str | Path) -> Path:
    """Write the confusion matrix as CSV (header: ``true\\predicted``, then labels); atomically."""
    y = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    n_classes = len(labels)
    if y.shape != pred.shape or y.ndim != 1:
        raise DataError(f"y_true {y.shape} and y_pred {pred.shape} must be 1-D arrays of the same length")
    for name, arr in (("y_true", y), ("y_pred", pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
            raise DataError(f"{name} has class indices outside 0..{n_classes - 1}")
    matrix = confusion_matrix(y, pred, n_classes)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\predicted", *labels])
    for label, row in zip(labels, matrix.tolist(), strict=True):
        writer.writerow([label, *row])
    return write_atomic(path, buffer.getvalue())


def mcnemar_table(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> tuple[int, int]:
    """Discordant pair counts (b, c) for McNemar's test on the same test images.

    b = images model A got right and model B got wrong; c = the reverse.
    """
    y, a, b_pred = (np.asarray(x) for x in (y_true, pred_a, pred_b))
    if not (y.shape == a.shape == b_pred.shape) or y.ndim != 1:
        raise DataError(f"y_true {y.shape}, pred_a {a.shape} and pred_b {b_pred.shape} must be 1-D "
                        "arrays over the same test images")
    a_ok, b_ok = a == y, b_pred == y
    return int(np.sum(a_ok & ~b_ok)), int(np.sum(~a_ok & b_ok))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact (binomial) McNemar p-value for discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return float(min(1.0, 2 * tail))
