"""The promotion gate on constructed predictions: every rule, its edges and its reasons."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ml.config import GateConfig
from ml.errors import MLError
from ml.registry.gate import CandidateEval, decide, mcnemar_exact_p

LABELS = ["a", "b", "c", "d"]


def _eval(
    name: str,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    labels: list[str] = LABELS,
    log_loss: float = 1.0,
    with_per_class: bool = True,
) -> CandidateEval:
    y_pred = np.asarray(y_pred)
    per_class = {}
    for i, label in enumerate(labels):
        mask = y_true == i
        recall = float(np.mean(y_pred[mask] == i)) if mask.any() else 0.0
        per_class[label] = {"precision": 0.0, "recall": recall, "f1": 0.0, "support": int(mask.sum())}
    metrics = {
        "accuracy": float(np.mean(y_pred == y_true)),
        "log_loss": log_loss,
        "top5_accuracy": 1.0,
        "macro_f1": 0.0,
    }
    if with_per_class:
        metrics["per_class"] = per_class
    return CandidateEval(name=name, y_pred=y_pred, metrics=metrics, labels=list(labels))


def _with_correct(y_true: np.ndarray, n_correct: int, *, offset: int = 0) -> np.ndarray:
    """Predictions right on examples [offset, offset + n_correct) (cyclically), wrong elsewhere."""
    n = len(y_true)
    pred = (y_true + 1) % len(LABELS)
    idx = (np.arange(n_correct) + offset) % n
    pred[idx] = y_true[idx]
    return pred


Y = np.tile(np.arange(4), 25)  # 100 examples, 25 per class


def _cfg(**kw) -> GateConfig:
    base = {"min_delta": 0.01, "max_class_recall_drop": None, "min_gain_over_chance": 0.1}
    return GateConfig(**{**base, **kw})


def test_first_model_must_beat_chance_by_margin() -> None:
    good = _eval("c1", Y, _with_correct(Y, 36))  # 0.36 >= 0.25 + 0.10
    weak = _eval("c2", Y, _with_correct(Y, 34))  # 0.34 < 0.35

    yes = decide(y_true=Y, challenger=good, champion=None, labels=LABELS, config=_cfg())
    no = decide(y_true=Y, challenger=weak, champion=None, labels=LABELS, config=_cfg())

    assert yes.promote and not no.promote
    assert any(
        "no production model: challenger accuracy 0.360 vs chance 0.250 (1/4 classes): +0.110 >= "
        "min_gain_over_chance 0.100" in r
        for r in yes.reasons
    )
    assert "beat_chance" in no.failed_checks
    assert not any("floor" in r for r in yes.reasons)  # min_accuracy 0 cannot fail: not reported
    assert yes.champion_score is None and yes.delta is None


def test_first_model_exactly_at_chance_margin_passes() -> None:
    exact = _eval("c", Y, _with_correct(Y, 35))  # 0.35 = 0.25 + 0.10 exactly (floats differ by ~1e-17)

    assert decide(y_true=Y, challenger=exact, champion=None, labels=LABELS, config=_cfg()).promote


@pytest.mark.parametrize(
    ("n_ch", "n_champ", "min_delta", "promote"),
    [
        (81, 79, 0.01, True),  # +0.02
        (80, 79, 0.01, True),  # exactly min_delta
        (79, 79, 0.01, False),  # tie
        (79, 79, 0.0, True),  # tie with min_delta 0 is "no worse"
        (78, 79, 0.0, False),  # worse
    ],
)
def test_accuracy_must_improve_by_min_delta(n_ch: int, n_champ: int, min_delta: float, promote: bool) -> None:
    ch = _eval("new", Y, _with_correct(Y, n_ch))
    champ = _eval("prod", Y, _with_correct(Y, n_champ))

    d = decide(y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(min_delta=min_delta))

    assert d.promote is promote
    assert d.delta == pytest.approx((n_ch - n_champ) / 100)
    sign = ">=" if promote else "<"
    assert any(
        f"challenger accuracy {n_ch / 100:.3f} vs production {n_champ / 100:.3f}: improvement "
        f"{(n_ch - n_champ) / 100:+.3f} {sign} min_delta {min_delta:.3f}" in r
        for r in d.reasons
    )


@pytest.mark.parametrize(
    ("ch_loss", "champ_loss", "promote"),
    [
        (0.50, 0.60, True),  # lower is better
        (0.60, 0.50, False),  # higher loss is worse even though the number is bigger
        (0.59, 0.60, True),  # exactly min_delta 0.01
        (0.595, 0.60, False),
    ],
)
def test_log_loss_is_lower_is_better(ch_loss: float, champ_loss: float, promote: bool) -> None:
    ch = _eval("new", Y, _with_correct(Y, 80), log_loss=ch_loss)
    champ = _eval("prod", Y, _with_correct(Y, 80), log_loss=champ_loss)

    d = decide(y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(metric="log_loss"))

    assert d.promote is promote
    assert d.metric == "log_loss" and d.delta == pytest.approx(champ_loss - ch_loss)
    assert any("(lower is better)" in r for r in d.reasons)


def test_floors_block_even_a_better_model() -> None:
    ch = _eval("new", Y, _with_correct(Y, 60), log_loss=2.5)
    champ = _eval("prod", Y, _with_correct(Y, 50))

    d = decide(
        y_true=Y,
        challenger=ch,
        champion=champ,
        labels=LABELS,
        config=_cfg(min_accuracy=0.7, max_log_loss=2.0),
    )

    assert not d.promote
    assert {"min_accuracy", "max_log_loss"} <= set(d.failed_checks)
    assert "challenger accuracy 0.600 < floor min_accuracy 0.700" in d.reasons
    assert "challenger log_loss 2.500 > ceiling max_log_loss 2.000" in d.reasons


def test_non_finite_metric_is_refused() -> None:
    ch = _eval("new", Y, _with_correct(Y, 90), log_loss=math.nan)
    champ = _eval("prod", Y, _with_correct(Y, 50), log_loss=1.0)

    d = decide(y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(metric="log_loss"))

    assert not d.promote and "finite_metric" in d.failed_checks


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (0, 0, 1.0),  # no discordant pairs
        (5, 0, 2 / 32),  # all one way, n=5: 0.0625
        (6, 0, 2 / 64),  # all one way, n=6: 0.03125
        (0, 6, 2 / 64),  # symmetric
        (1, 1, 1.0),  # capped at 1
        (3, 1, 0.625),  # 2 * (1 + 4) / 16
    ],
)
def test_mcnemar_exact_p(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact_p(b, c) == pytest.approx(expected)


def test_mcnemar_handles_large_counts_without_underflow() -> None:
    p = mcnemar_exact_p(1200, 900)

    assert 0 < p < 1e-9


def _discordant(b: int, c: int, both_right: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y_true, challenger and champion predictions with b / c discordant pairs."""
    n = both_right + b + c + 10  # 10 both wrong
    y = np.arange(n) % 4
    wrong = (y + 1) % 4
    ch = wrong.copy()
    champ = wrong.copy()
    ch[:both_right] = champ[:both_right] = y[:both_right]
    ch[both_right : both_right + b] = y[both_right : both_right + b]
    champ[both_right + b : both_right + b + c] = y[both_right + b : both_right + b + c]
    return y, ch, champ


@pytest.mark.parametrize(
    ("b", "c", "promote", "phrase"),
    [
        (6, 0, True, "significant in the challenger's favour"),
        (5, 0, False, ">= alpha 0.05: not significant"),
        (3, 3, False, ">= alpha 0.05: not significant"),
        (0, 6, False, "significant in production's favour"),
    ],
)
def test_mcnemar_gate(b: int, c: int, promote: bool, phrase: str) -> None:
    y, ch_pred, champ_pred = _discordant(b, c)
    cfg = _cfg(min_delta=0.0, mcnemar_alpha=0.05)

    d = decide(
        y_true=y,
        challenger=_eval("new", y, ch_pred),
        champion=_eval("prod", y, champ_pred),
        labels=LABELS,
        config=cfg,
    )

    assert d.promote is promote
    assert d.mcnemar_p == pytest.approx(mcnemar_exact_p(b, c))
    assert any(
        f"challenger alone right on {b}, production alone right on {c}" in r and phrase in r
        for r in d.reasons
    )


def test_mcnemar_with_no_discordant_pairs_refuses() -> None:
    y, ch_pred, champ_pred = _discordant(0, 0)

    d = decide(
        y_true=y,
        challenger=_eval("new", y, ch_pred),
        champion=_eval("prod", y, champ_pred),
        labels=LABELS,
        config=_cfg(min_delta=0.0, mcnemar_alpha=0.05),
    )

    assert not d.promote and d.mcnemar_p == 1.0 and d.failed_checks == ["mcnemar"]


def test_per_class_recall_regression_blocks_promotion() -> None:
    champ_pred = Y.copy()  # perfect
    ch_pred = Y.copy()
    ch_pred[Y == 2] = 3  # class "c" recall 1.0 -> 0.0, overall accuracy 0.75
    ch = _eval("new", Y, ch_pred)
    champ = _eval("prod", Y, champ_pred)
    champ.metrics["accuracy"] = 0.70  # pretend production is worse overall so only the class rule bites

    d = decide(
        y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(max_class_recall_drop=0.25)
    )

    assert not d.promote and d.failed_checks == ["class_recall_drop"]
    assert any("on 1 classes: c 1.000 -> 0.000 (-1.000)" in r for r in d.reasons)


def test_per_class_recall_is_computed_when_metrics_lack_it() -> None:
    ch_pred = Y.copy()
    ch_pred[Y == 1] = 0
    ch = _eval("new", Y, ch_pred, with_per_class=False)
    champ = _eval("prod", Y, Y.copy(), with_per_class=False)
    champ.metrics["accuracy"] = 0.5

    d = decide(y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(max_class_recall_drop=0.5))

    assert "class_recall_drop" in d.failed_checks


def test_label_change_is_refused_by_default_and_judged_on_chance_when_allowed() -> None:
    champ = _eval("prod", Y, _with_correct(Y, 95), labels=["a", "b", "c", "x"])
    ch = _eval("new", Y, _with_correct(Y, 50))

    refused = decide(y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg())
    allowed = decide(
        y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(allow_label_change=True)
    )

    assert not refused.promote and "label_change" in refused.failed_checks
    assert any("added ['d'], removed ['x']" in r and "allow_label_change" in r for r in refused.reasons)
    assert allowed.promote and allowed.champion_score is None
    assert any("comparison with production on accuracy is skipped" in r for r in allowed.reasons)


def test_champion_with_same_labels_in_other_order_is_realigned() -> None:
    reordered = ["d", "c", "b", "a"]
    champ_pred_in_its_order = 3 - Y  # champion is perfect, indices over its own order
    champ = _eval("prod", 3 - Y, champ_pred_in_its_order, labels=reordered)
    ch = _eval("new", Y, Y.copy())

    d = decide(
        y_true=Y,
        challenger=ch,
        champion=champ,
        labels=LABELS,
        config=_cfg(min_delta=0.0, mcnemar_alpha=0.05, max_class_recall_drop=0.1),
    )

    # both perfect after re-indexing: no discordant pairs, no recall drop
    assert d.mcnemar_p == 1.0
    assert d.failed_checks == ["mcnemar"]


def test_force_promotes_but_reports_failures() -> None:
    ch = _eval("new", Y, _with_correct(Y, 50))
    champ = _eval("prod", Y, _with_correct(Y, 80))

    d = decide(
        y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(force_promote=True, min_accuracy=0.6)
    )

    assert d.promote and d.forced
    assert d.reasons[0].startswith("forced by gate.force_promote") and "min_accuracy" in d.reasons[0]
    assert "challenger accuracy 0.500 < floor min_accuracy 0.600" in d.reasons


def test_decision_is_json_serialisable() -> None:
    ch = _eval("new", Y, _with_correct(Y, 81))
    champ = _eval("prod", Y, _with_correct(Y, 79))

    d = decide(y_true=Y, challenger=ch, champion=champ, labels=LABELS, config=_cfg(mcnemar_alpha=0.05))

    loaded = json.loads(json.dumps(d.to_dict()))
    assert loaded["metric"] == "accuracy" and loaded["challenger"] == "new" and loaded["champion"] == "prod"
    assert d.summary().startswith("KEEP PRODUCTION new:")  # 2 more right of 100 is not significant


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda ch: setattr(ch, "y_pred", ch.y_pred[:-1]), "99 predictions for 100 test labels"),
        (lambda ch: setattr(ch, "labels", ["a", "b"]), "labels differ"),
        (lambda ch: ch.metrics.pop("accuracy"), "no 'accuracy'"),
    ],
)
def test_malformed_inputs_raise(mutate, match: str) -> None:
    ch = _eval("new", Y, Y.copy())
    mutate(ch)

    with pytest.raises(MLError, match=match):
        decide(y_true=Y, challenger=ch, champion=None, labels=LABELS, config=_cfg())


@pytest.mark.parametrize("gain", [-0.1, 1.0, 1.5])
def test_min_gain_over_chance_outside_zero_to_one_is_refused_with_the_setting_named(gain: float) -> None:
    from ml.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gate\.min_gain_over_chance must be in \[0, 1\), got "):
        GateConfig(min_gain_over_chance=gain)
    GateConfig(min_gain_over_chance=0.0)  # the edges people use stay valid
    GateConfig(min_gain_over_chance=0.99)
