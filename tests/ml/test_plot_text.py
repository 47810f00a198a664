"""Plots draw every string that came from data literally: no mathtext, no TeX, no crash.

A class named ``x_{$^$}`` used to raise ValueError inside matplotlib's mathtext parser while
the confusion matrix was drawn; Airflow retried the evaluation twice as if it were transient.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.errors import DataError
from ml.evaluation.plots import (
    _TICK_LABEL_CHARS,
    confusion_figure,
    leaderboard_figure,
    learning_curves_figure,
    plot_confusion,
    plot_leaderboard,
    plot_learning_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Strings that break or get rewritten by mathtext/TeX, or stress layout and fonts.
HOSTILE = [
    "x_{$^$}",  # the reported crash: unbalanced braces inside $...$
    "$\\frac{$",
    "$a^^b$",
    "$\\alpha$ and $\\beta$",  # valid mathtext: would silently become Greek letters
    "price $5 or $6",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "\"><img src=x onerror=alert(1)>",
    "it's \"quoted\"",
    "C:\\new\\table\\$x$",
    "perro español",
    "50% off #1 & _under_ ~tilde^",
    "a" * 300,
]


def _texts_showing(fig, value: str) -> list:
    from matplotlib.text import Text

    # Long names are cut to the tick-label width; match on the start that survives.
    start = value[: _TICK_LABEL_CHARS - 1]
    return [t for t in fig.findobj(Text) if start and start in t.get_text()]


def _assert_literal(fig, values: list[str]) -> None:
    for value in values:
        shown = _texts_showing(fig, value)
        assert shown, f"{value!r} is not drawn at all"
        for text in shown:
            assert text.get_parse_math() is False, f"{text.get_text()!r} would be parsed as mathtext"
            assert text.get_usetex() is False, f"{text.get_text()!r} would be sent to TeX"
    fig.canvas.draw()  # the real rendering: raises if any text still goes through mathtext


@pytest.mark.parametrize("label", HOSTILE)
def test_confusion_with_hostile_class_names(tmp_path: Path, label: str) -> None:
    labels = [label, "plain", f"{label} 2"]
    confusion = [[3, 1, 0], [0, 4, 1], [1, 0, 5]]

    fig = confusion_figure(confusion, labels, title=f"title {label}")
    path = plot_confusion(confusion, labels, tmp_path / "confusion.png", title=f"title {label}")

    _assert_literal(fig, [label, f"title {label}"])
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5_000


@pytest.mark.parametrize("label", HOSTILE)
def test_leaderboard_with_hostile_names_statuses_and_version(tmp_path: Path, label: str) -> None:
    rows = [{"candidate": label, "accuracy": 0.8, "status": "ok", "chance_accuracy": 0.2},
            {"candidate": f"b {label}", "accuracy": 0.5, "status": label},
            {"candidate": "c", "accuracy": None, "status": label}]
    production = {"version": label, "metrics": {"accuracy": 0.6}}

    fig = leaderboard_figure(rows, production=production)
    path = plot_leaderboard(rows, tmp_path / "leaderboard.png", production=production)

    _assert_literal(fig, [label, f"b {label}", f"production {label}"])
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("label", HOSTILE)
def test_learning_curves_with_hostile_title_and_column(tmp_path: Path, label: str) -> None:
    history = tmp_path / "history.csv"
    # A learning-rate column called "lr" is labelled by its column name in the legend.
    history.write_text("epoch,loss,val_loss,accuracy,val_accuracy,lr\n"
                       "0,2.0,2.1,0.3,0.2,0.01\n1,1.5,1.7,0.5,0.4,0.001\n2,1.2,1.6,0.6,0.5,0.0001\n")

    fig = learning_curves_figure(history, label)
    path = plot_learning_curves(history, tmp_path / "curves.png", label)

    _assert_literal(fig, [label[:99]])
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_matplotlib_own_tick_labels_keep_mathtext(tmp_path: Path) -> None:
    """LITERAL is applied to data only: the log-scaled learning-rate axis still renders 10^-3."""
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,learning_rate\n0,2.0,0.01\n1,1.5,0.001\n2,1.2,0.0001\n")

    fig = learning_curves_figure(history, "x_{$^$}")
    fig.canvas.draw()

    lr_axis = fig.axes[-1]
    assert lr_axis.get_yscale() == "log"
    ticks = [t for t in lr_axis.get_yticklabels() if "mathdefault" in t.get_text()]
    assert ticks and all(t.get_parse_math() for t in ticks)


def test_a_drawing_error_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    """Whatever still trips matplotlib is deterministic: DataError (not retried), no file left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ml.evaluation.plots import _save_png

    fig = Figure()
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, "x_{$^$}")  # mathtext on: this is the crash plots.py used to hit

    with pytest.raises(DataError, match=r"could not draw .*broken\.png"):
        _save_png(fig, tmp_path / "broken.png")
    assert list(tmp_path.iterdir()) == []
