"""The promotion gate: may this challenger replace the production model?

`decide` compares the challenger with the champion (the production model evaluated on the
same test split) and returns a `GateDecision` whose reasons are sentences with the numbers
behind them, so a run report or a log line explains itself. Rules, in order:

1. Floors: challenger accuracy >= ``min_accuracy``; log loss <= ``max_log_loss`` (if set).
2. No champion (or an allowed label change): accuracy must beat chance (1 / n_classes) by
   ``min_gain_over_chance``.
3. A label set different from the champion's is refused unless ``allow_label_change``.
4. The primary metric (accuracy: higher is better; log_loss: lower is better) must improve by
   at least ``min_delta``.
5. Optional exact McNemar test on the paired predictions: the challenger's advantage must be
   significant at ``mcnemar_alpha``.
6. No class's recall may drop by more than ``max_class_recall_drop``.

``force_promote`` promotes anyway and says so; every check is still reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import MLError

if TYPE_CHECKING:
    from ml.config import GateConfig

_EPS = 1e-9  # float slack so that an improvement of exactly min_delta passes (0.82 - 0.81 < 0.01 in floats)
_HIGHER_IS_BETTER = {"accuracy": True, "log_loss": False}
_MAX_CLASSES_LISTED = 5


@dataclass
class CandidateEval:
    """One model evaluated on the gate's test split.

    Attributes:
        name: candidate or version name (for messages).
        y_pred: predicted class indices into `labels`, one per test example.
        metrics: accuracy, log_loss, top5_accuracy, macro_f1 and per_class
            ({label: {precision, recall, f1, support}}).
        labels: class names, index = output unit.
    """

    name: str
    y_pred: np.ndarray
    metrics: dict[str, Any]
    labels: list[str]


@dataclass
class GateDecision:
    """The gate's verdict and why."""

    promote: bool
    reasons: list[str]
    metric: str
    challenger_score: float | None
    champion_score: float | None
    delta: float | None  # improvement in the metric's better direction (positive = better)
    mcnemar_p: float | None = None
    forced: bool = False
    challenger: str = ""
    champion: str | None = None
    failed_checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for XCom, the run report and the promotion log)."""
        return asdict(self)

    def summary(self) -> str:
        """One line: verdict and reasons."""
        verdict = "PROMOTE" if self.promote else "KEEP PRODUCTION"
        return f"{verdict} {self.challenger}: " + "; ".join(self.reasons)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs (binomial, p = 1/2).

    p = min(1, 2 * P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2); 1.0 when there are no
    discordant pairs. Exact integer arithmetic, so large test sets do not underflow.
    """
    if b < 0 or c < 0:
        raise MLError(f"McNemar counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def _score(metrics: dict[str, Any], metric: str, who: str) -> float:
    if metric not in metrics:
        raise MLError(f"{who} metrics have no {metric!r}; got keys {sorted(metrics)}")
    return float(metrics[metric])


def _recalls(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], metrics: dict[str, Any]
) -> dict[str, float]:
    """Per-class recall from metrics['per_class'], else computed from the predictions."""
    per_class = metrics.get("per_class") or {}
    out: dict[str, float] = {}
    for i, label in enumerate(labels):
        if label in per_class and "recall" in per_class[label]:
            if float(per_class[label].get("support", 1)) > 0:
                out[label] = float(per_class[label]["recall"])
            continue
        mask = y_true == i
        if mask.any():
            out[label] = float(np.mean(y_pred[mask] == i))
    return out


def _align(pred: np.ndarray, from_labels: list[str], to_labels: list[str]) -> np.ndarray:
    """Re-index predictions made over `from_labels` onto `to_labels` (same set, other order)."""
    mapping = np.array([to_labels.index(label) for label in from_labels])
    return mapping[pred]


def decide(
    *,
    y_true: np.ndarray,
    challenger: CandidateEval,
    champion: CandidateEval | None,
    labels: list[str],
    config: GateConfig,
) -> GateDecision:
    """Decide whether `challenger` replaces `champion` (None: nothing in production yet).

    Args:
        y_true: true class indices into `labels` for the test split both were evaluated on.
        challenger / champion: their predictions and metrics on that split.
        labels: the class names of the current dataset (index = class id in `y_true`).
        config: thresholds.
    """
    y_true = np.asarray(y_true).astype(int)
    y_ch = np.asarray(challenger.y_pred).astype(int)
    if y_ch.shape != y_true.shape:
        raise MLError(
            f"challenger {challenger.name!r} has {y_ch.shape[0] if y_ch.ndim else 0} predictions for "
            f"{y_true.shape[0]} test labels"
        )
    if list(challenger.labels) != list(labels):
        raise MLError(
            f"challenger {challenger.name!r} labels differ from the test split's labels; "
            f"got {len(challenger.labels)} vs {len(labels)} classes"
        )
    if not labels:
        raise MLError("decide() needs a non-empty label list")

    metric = config.metric
    higher = _HIGHER_IS_BETTER[metric]
    reasons: list[str] = []
    failed: list[str] = []
    ch_acc = _score(challenger.metrics, "accuracy", f"challenger {challenger.name!r}")
    ch_score = _score(challenger.metrics, metric, f"challenger {challenger.name!r}")
    decision = GateDecision(
        promote=False,
        reasons=reasons,
        metric=metric,
        challenger_score=ch_score,
        champion_score=None,
        delta=None,
        challenger=challenger.name,
        champion=champion.name if champion else None,
        failed_checks=failed,
    )

    def check(ok: bool, name: str, sentence: str) -> None:
        reasons.append(sentence)
        if not ok:
            failed.append(name)

    # 1. floors
    if not math.isfinite(ch_score):
        check(False, "finite_metric", f"challenger {metric} is {ch_score}, not a finite number")
    if config.min_accuracy > 0:  # a floor of 0 cannot fail; don't clutter the reasons with it
        ok = ch_acc >= config.min_accuracy - _EPS
        check(
            ok,
            "min_accuracy",
            f"challenger accuracy {ch_acc:.3f} {'>=' if ok else '<'} floor min_accuracy "
            f"{config.min_accuracy:.3f}",
        )
    if config.max_log_loss is not None:
        loss = _score(challenger.metrics, "log_loss", f"challenger {challenger.name!r}")
        ok = math.isfinite(loss) and loss <= config.max_log_loss + _EPS
        check(
            ok,
            "max_log_loss",
            f"challenger log_loss {loss:.3f} {'<=' if ok else '>'} "
            f"ceiling max_log_loss {config.max_log_loss:.3f}",
        )

    # 2./3. who do we compare against?
    compare = champion is not None
    if champion is not None and set(champion.labels) != set(labels):
        added = sorted(set(labels) - set(champion.labels))
        removed = sorted(set(champion.labels) - set(labels))
        change = (
            f"label set changed from production {champion.name!r} ({len(champion.labels)} classes) to "
            f"{len(labels)} classes: added {added[:_MAX_CLASSES_LISTED]}, "
            f"removed {removed[:_MAX_CLASSES_LISTED]}"
        )
        if config.allow_label_change:
            reasons.append(
                f"{change}; allowed by allow_label_change, so the comparison with production on "
                f"{metric} is skipped and the challenger is judged against chance"
            )
        else:
            check(
                False,
                "label_change",
                f"{change}; refusing (set gate.allow_label_change to accept a new label set)",
            )
        compare = False
    if champion is None or (not compare and config.allow_label_change):
        chance = 1.0 / len(labels)
        gain = ch_acc - chance
        ok = gain >= config.min_gain_over_chance - _EPS
        check(
            ok,
            "beat_chance",
            f"{'no production model: ' if champion is None else ''}challenger accuracy {ch_acc:.3f} "
            f"vs chance {chance:.3f} (1/{len(labels)} classes): {gain:+.3f} {'>=' if ok else '<'} "
            f"min_gain_over_chance {config.min_gain_over_chance:.3f}",
        )

    # 4.-6. against the champion on the same test split
    if compare and champion is not None:
        y_champ = np.asarray(champion.y_pred).astype(int)
        if y_champ.shape != y_true.shape:
            raise MLError(
                f"production {champion.name!r} has {y_champ.shape[0] if y_champ.ndim else 0} predictions "
                f"for {y_true.shape[0]} test labels"
            )
        if list(champion.labels) != list(labels):  # same set, other order: re-index its predictions
            y_champ = _align(y_champ, list(champion.labels), list(labels))
        try:
            champ_score: float | None = _score(champion.metrics, metric, f"production {champion.name!r}")
        except MLError:
            champ_score = None
        if champ_score is None or not math.isfinite(champ_score):
            check(
                False,
                "champion_metric",
                f"production {champion.name!r} has no usable {metric} "
                f"({champion.metrics.get(metric)!r}); cannot compare",
            )
        else:
            delta = ch_score - champ_score if higher else champ_score - ch_score
            decision.champion_score, decision.delta = champ_score, delta
            ok = delta >= config.min_delta - _EPS
            direction = "" if higher else " (lower is better)"
            check(
                ok,
                "min_delta",
                f"challenger {metric} {ch_score:.3f} vs production {champ_score:.3f}{direction}: improvement "
                f"{delta:+.3f} {'>=' if ok else '<'} min_delta {config.min_delta:.3f}",
            )

        if config.mcnemar_alpha is not None:
            ch_right, champ_right = y_ch == y_true, y_champ == y_true
            b = int(np.sum(ch_right & ~champ_right))  # only the challenger is right
            c = int(np.sum(~ch_right & champ_right))  # only production is right
            p = mcnemar_exact_p(b, c)
            decision.mcnemar_p = p
            ok = p < config.mcnemar_alpha and b > c
            if ok:
                verdict = f"< alpha {config.mcnemar_alpha}: significant in the challenger's favour"
            elif p >= config.mcnemar_alpha:
                verdict = f">= alpha {config.mcnemar_alpha}: not significant"
            else:
                verdict = f"< alpha {config.mcnemar_alpha}: significant in production's favour"
            check(
                ok,
                "mcnemar",
                f"McNemar exact test on {len(y_true)} paired predictions: challenger alone "
                f"right on {b}, production alone right on {c}, p = {p:.4f} {verdict}",
            )

        if config.max_class_recall_drop is not None:
            ch_rec = _recalls(y_true, y_ch, list(labels), challenger.metrics)
            champ_rec = _recalls(y_true, y_champ, list(labels), champion.metrics)
            drops = sorted(
                ((champ_rec[k] - ch_rec[k], k) for k in ch_rec.keys() & champ_rec.keys()), reverse=True
            )
            bad = [(d, k) for d, k in drops if d > config.max_class_recall_drop + _EPS]
            if bad:
                listed = ", ".join(
                    f"{k} {champ_rec[k]:.3f} -> {ch_rec[k]:.3f} (-{d:.3f})"
                    for d, k in bad[:_MAX_CLASSES_LISTED]
                )
                more = f" and {len(bad) - _MAX_CLASSES_LISTED} more" if len(bad) > _MAX_CLASSES_LISTED else ""
                check(
                    False,
                    "class_recall_drop",
                    f"recall dropped by more than max_class_recall_drop "
                    f"{config.max_class_recall_drop:.3f} on {len(bad)} classes: "
                    f"{listed}{more}",
                )
            elif drops:
                worst, label = drops[0]
                check(
                    True,
                    "class_recall_drop",
                    f"largest per-class recall drop {max(worst, 0.0):.3f} ({label}) "
                    f"<= max_class_recall_drop {config.max_class_recall_drop:.3f}",
                )

    if config.force_promote:
        decision.forced = True
        decision.promote = True
        reasons.insert(
            0,
            "forced by gate.force_promote: promoting regardless of the checks"
            + (f" (failed: {', '.join(failed)})" if failed else " (all checks passed)"),
        )
    else:
        decision.promote = not failed
    return decision
