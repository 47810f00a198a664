"""Which classes a model mixes up: confused pairs from the test confusion matrix, and what to do about it.

A pair {A, B} is ranked by its row-normalised confusion, ``rate(A as B) + rate(B as A)`` where
``rate(A as B) = C[A, B] / images of A``, so a small class that is half mistaken for another ranks
above a big class that loses a handful of images. When one pair holds most of the test errors the
summary says so in plain words ("consider merging A and B, or more data for them").

Labels come from users' files: the HTML here goes through `esc`, like every page of the product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ml.errors import DataError
from ml.evaluation.html import esc, num, pct

TOP_PAIRS = 10
# "Most of the errors": one pair above half of them. Below 3 errors a share means nothing
# (1 error of 1 is 100%), so no suggestion is made.
DOMINANT_SHARE = 0.5
MIN_ERRORS_FOR_ADVICE = 3
# The same cap as metrics.MAX_CONFUSION_CLASSES: pages list at most this many classes (worst first).
MAX_LISTED_CLASSES = 200


def confused_pairs(confusion: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], *,
                   k: int = TOP_PAIRS) -> dict[str, Any]:
    """The k most confused class pairs of a K x K confusion matrix (rows = true class).

    Returns:
        ``n_errors`` (off-diagonal images), ``pairs`` ([{a, b, a_as_b, b_as_a, rate_a_as_b,
        rate_b_as_a, rate, errors, share_of_errors}], highest ``rate`` first, ``a`` the class more
        often mistaken), ``dominant`` (the pair holding more than half of the errors, or None) and
        ``suggestion`` (a plain sentence, or None).
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    n_classes = len(labels)
    if matrix.shape != (n_classes, n_classes):
        raise DataError(f"confusion must be {n_classes} x {n_classes} to match labels, got {matrix.shape}")
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    n_errors = int(off.sum())
    support = matrix.sum(axis=1).astype(np.float64)
    rates = np.divide(off, support[:, None], out=np.zeros(off.shape, dtype=np.float64), where=support[:, None] > 0)
    # Unordered pairs i < j: both directions summed (upper triangle only, so no pair twice).
    pair_rate = np.triu(rates + rates.T, k=1)
    pair_errors = np.triu(off + off.T, k=1)
    # Highest rate first, then most images; only pairs with at least one error.
    order = np.lexsort((-pair_errors.ravel(), -pair_rate.ravel()))
    pairs = []
    for index in order:
        i, j = divmod(int(index), n_classes)
        if len(pairs) == k or pair_errors[i, j] == 0:
            break
        if off[j, i] > off[i, j]:
            i, j = j, i
        pairs.append(_pair(labels, off, rates, i, j, n_errors))
    dominant = None
    if n_errors >= MIN_ERRORS_FOR_ADVICE and n_classes > 1:
        i, j = divmod(int(np.argmax(pair_errors)), n_classes)
        if pair_errors[i, j] / n_errors > DOMINANT_SHARE:
            if off[j, i] > off[i, j]:
                i, j = j, i
            dominant = _pair(labels, off, rates, i, j, n_errors)
    return {"n_errors": n_errors, "pairs": pairs, "dominant": dominant, "suggestion": _suggestion(dominant)}


def _pair(labels: Sequence[str], off: np.ndarray, rates: np.ndarray, i: int, j: int, n_errors: int) -> dict:
    errors = int(off[i, j] + off[j, i])
    return {"a": str(labels[i]), "b": str(labels[j]), "a_as_b": int(off[i, j]), "b_as_a": int(off[j, i]),
            "rate_a_as_b": float(rates[i, j]), "rate_b_as_a": float(rates[j, i]),
            "rate": float(rates[i, j] + rates[j, i]), "errors": errors,
            "share_of_errors": float(errors / n_errors) if n_errors else 0.0}


def _suggestion(dominant: Mapping[str, Any] | None) -> str | None:
    if dominant is None:
        return None
    return (f"{dominant['errors']} of the test errors ({dominant['share_of_errors'] * 100:.0f}%) are between "
            f"{dominant['a']!r} and {dominant['b']!r}: consider merging {dominant['a']!r} and {dominant['b']!r}, "
            "or more data for them.")


def confusion_section(summary: Mapping[str, Any] | None, per_class: Mapping[str, Mapping[str, Any]] | None,
                      *, candidate: str | None = None) -> str:
    """HTML: the suggestion, the confused-pairs table and per-class precision/recall (collapsed)."""
    parts = []
    if candidate:
        parts.append(f"<p>Test split of <code>{esc(candidate)}</code>.</p>")
    if summary is None:
        parts.append("<p class=\"muted\">No confusion analysis was recorded.</p>")
    else:
        if summary.get("suggestion"):
            parts.append(f"<p class=\"warn\"><strong>Suggestion:</strong> {esc(summary['suggestion'])}</p>")
        pairs = summary.get("pairs") or []
        if pairs:
            rows = "".join(
                f"<tr><td>{esc(p['a'])}</td><td>{esc(p['b'])}</td>"
                f"<td class=\"num\">{esc(p['a_as_b'])} ({esc(pct(p['rate_a_as_b']))})</td>"
                f"<td class=\"num\">{esc(p['b_as_a'])} ({esc(pct(p['rate_b_as_a']))})</td>"
                f"<td class=\"num\">{esc(pct(p['share_of_errors']))}</td></tr>"
                for p in pairs)
            parts.append(f"<p>{esc(summary.get('n_errors', '?'))} misclassified test images; the most confused "
                         "pairs by row-normalised rate (share of class A's images predicted as B, and back):</p>"
                         "<table><tr><th>class A</th><th>class B</th><th>A predicted as B</th>"
                         "<th>B predicted as A</th><th>share of all errors</th></tr>" + rows + "</table>")
        else:
            parts.append("<p class=\"ok\">No test image was misclassified.</p>")
    if per_class:
        parts.append(per_class_table(per_class))
    return "\n".join(parts)


def per_class_table(per_class: Mapping[str, Mapping[str, Any]], *, limit: int = MAX_LISTED_CLASSES) -> str:
    """Per-class precision/recall/F1 (worst F1 first), at most `limit` rows, in a <details> block."""
    rows = sorted(per_class.items(), key=lambda kv: (kv[1].get("f1", 0.0), str(kv[0])))
    shown = rows[:limit]
    body = "".join(
        f"<tr><td>{esc(label)}</td><td class=\"num\">{esc(num(s.get('precision')))}</td>"
        f"<td class=\"num\">{esc(num(s.get('recall')))}</td><td class=\"num\">{esc(num(s.get('f1')))}</td>"
        f"<td class=\"num\">{esc(s.get('support', '-'))}</td></tr>"
        for label, s in shown)
    note = (f" ({len(shown)} worst shown; all {len(rows)} are in metrics.json)" if len(rows) > len(shown) else "")
    return (f"<details><summary>Per-class precision and recall ({len(rows)} classes, worst F1 first{note})"
            "</summary><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>test images</th>"
            f"</tr>{body}</table></details>")
