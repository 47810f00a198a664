"""PNG figures for a run: confusion matrix, learning curves, leaderboard.

Matplotlib is imported inside each function and used through `Figure` + the Agg canvas, not
pyplot: no global figure state, no GUI backend, safe in a Celery worker thread. Every PNG is
written to a temporary name and renamed into place.

Class names, candidate names, versions, titles and CSV column names come from users' data, so
every Text they reach is drawn literally (`LITERAL`: no mathtext, no TeX). Otherwise a class
called ``x_{$^$}`` is parsed as mathtext and raises ValueError deep in matplotlib (which Airflow
then retries as if transient), and ``$\\alpha$`` would be drawn as a Greek letter. Text that
matplotlib writes itself (tick formatters' ``$\\mathdefault{10^{-3}}$`` on log axes) keeps mathtext.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import DataError
from ml.io import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# Beyond this many classes tick labels overlap even in small type: show class indices instead
# and point readers to confusion.csv / labels.json for the names.
MAX_LABELLED_CLASSES = 40
# Cell values are printed only when they stay legible.
MAX_ANNOTATED_CLASSES = 15
_DPI = 100
_TICK_LABEL_CHARS = 24
# At ~0.5 em a character, 100 characters of 11-12 pt title are ~8 in wide: about the narrowest
# figure (the 7.5 in confusion matrix). Longer titles are cut with "…".
_TITLE_CHARS = 100
# Bar annotations ("0.812 (over budget)", 8 pt): 40 characters are ~2.2 in, which fits right of
# the bars of an 8 in wide figure.
_STATUS_CHARS = 40
# Text properties for every string that may come from data: drawn as typed.
LITERAL: dict[str, Any] = {"parse_math": False, "usetex": False}


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=_DPI)
    except ValueError as exc:
        # Drawing the same data again fails the same way: a DataError, never retried.
        raise DataError(f"matplotlib could not draw {path}: {exc}") from exc
    data = buffer.getvalue()
    if not data:
        raise DataError(f"matplotlib produced an empty PNG for {path}")
    out = write_atomic(path, data)
    log.info("wrote %s (%d bytes)", out, len(data))
    return out


def _short(label: str, limit: int = _TICK_LABEL_CHARS) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _literal_legend(ax: Any, **kwargs: Any) -> None:
    """`ax.legend` whose entries (labels from data) are drawn literally."""
    legend = ax.legend(**kwargs)
    for text in legend.get_texts():
        text.set_parse_math(False)
        text.set_usetex(False)


def plot_confusion(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    labels: Sequence[str],
    path: str | Path,
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draw a confusion matrix (rows = true class) as a heatmap PNG.

    Args:
        confusion: K x K counts.
        labels: the K class names (drawn literally).
        path: where to write the PNG.
        normalize: colour by row fraction (recall per true class) instead of raw counts, so
            rare classes are as visible as common ones.
        title: heading; the overall accuracy is appended.

    Figure size grows with K; beyond `MAX_LABELLED_CLASSES` classes the axes show class
    indices every few classes instead of names.
    """
    return _save_png(confusion_figure(confusion, labels, normalize=normalize, title=title), path)


def confusion_figure(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    labels: Sequence[str],
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Figure:
    """The figure `plot_confusion` saves (same arguments but the path)."""
    matrix = np.asarray(confusion, dtype=np.float64)
    n_classes = len(labels)
    if matrix.ndim != 2 or matrix.shape != (n_classes, n_classes):
        raise DataError(f"confusion must be {n_classes} x {n_classes} to match labels, "
                        f"got shape {matrix.shape}")
    total = matrix.sum()
    accuracy = float(np.trace(matrix) / total) if total else float("nan")
    if normalize:
        row_sums = matrix.sum(axis=1, keepdims=True)
        values = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    else:
        values = matrix

    # ~0.13 in per class keeps 120 classes at ~1700 px square: each cell >= 10 px.
    side = float(min(max(6.0, 3.0 + 0.13 * n_classes), 20.0))
    fig = _new_figure(side + 1.5, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, interpolation="nearest", cmap="Blues", vmin=0.0,
                      vmax=1.0 if normalize else max(1.0, float(values.max())), aspect="equal")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of true class" if normalize else "images")

    if n_classes <= MAX_LABELLED_CLASSES:
        font = 9 if n_classes <= 15 else 7 if n_classes <= 25 else 5.5
        names = [_short(str(label)) for label in labels]
        ax.set_xticks(range(n_classes), names, rotation=90, fontsize=font, **LITERAL)
        ax.set_yticks(range(n_classes), names, fontsize=font, **LITERAL)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    else:
        step = 10 if n_classes <= 200 else int(math.ceil(n_classes / 20))
        ticks = list(range(0, n_classes, step))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.set_xlabel("predicted class index (names in labels.json / confusion.csv)")
        ax.set_ylabel("true class index")

    if n_classes <= MAX_ANNOTATED_CLASSES:
        threshold = (1.0 if normalize else values.max()) / 2
        for i in range(n_classes):
            for j in range(n_classes):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > threshold else "black")

    heading = _short(str(title), _TITLE_CHARS) if title else "Confusion matrix"
    ax.set_title(f"{heading}\naccuracy {accuracy:.1%} on {int(total)} images, {n_classes} classes"
                 + (" (row-normalised)" if normalize else ""), fontsize=11, **LITERAL)
    return fig


def _read_history(history_csv: Path) -> Any:
    import pandas as pd

    if not history_csv.is_file():
        raise DataError(f"training history {history_csv} does not exist")
    try:
        frame = pd.read_csv(history_csv)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"training history {history_csv} is not a readable CSV: {exc}") from None
    return frame


def plot_learning_curves(history_csv: str | Path, path: str | Path, title: str) -> Path:
    """Plot loss and accuracy per epoch, train vs validation, from a Keras CSVLogger file.

    Columns used when present: ``epoch``, ``loss``, ``val_loss``, ``accuracy``,
    ``val_accuracy``, ``learning_rate`` (``lr`` in older Keras); missing ones are skipped, and
    an empty history still gives a figure saying so. The best validation epoch is marked.
    `title` (usually the candidate's name) is drawn literally.
    """
    return _save_png(learning_curves_figure(history_csv, title), path)


def learning_curves_figure(history_csv: str | Path, title: str) -> Figure:
    """The figure `plot_learning_curves` saves."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    frame = _read_history(Path(history_csv))
    has_lr = any(col in frame.columns for col in ("learning_rate", "lr"))
    n_panels = 3 if has_lr else 2
    fig = _new_figure(4.2 * n_panels, 4.0)
    if "epoch" in frame.columns:
        epochs = pd.to_numeric(frame["epoch"], errors="coerce").to_numpy() + 1  # CSVLogger counts from 0
    else:
        epochs = np.arange(1, len(frame) + 1)

    best_epoch = None
    if "val_loss" in frame.columns and frame["val_loss"].notna().any():
        best_epoch = epochs[int(np.nanargmin(pd.to_numeric(frame["val_loss"], errors="coerce").to_numpy()))]

    panels = [("loss", "loss", ["loss", "val_loss"]), ("accuracy", "accuracy", ["accuracy", "val_accuracy"])]
    if has_lr:
        lr_column = "learning_rate" if "learning_rate" in frame.columns else "lr"
        panels.append(("learning rate", "learning rate", [lr_column]))
    for index, (name, ylabel, columns) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, n_panels, index)
        drawn = 0
        for column in columns:
            if column in frame.columns:
                values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
                if np.isfinite(values).any():
                    style = "--" if column.startswith("val_") else "-"
                    label = "validation" if column.startswith("val_") else ("train" if name != "learning rate"
                                                                            else column)
                    ax.plot(epochs, values, style, marker="o", markersize=3, label=label)
                    drawn += 1
        if name == "learning rate" and drawn:
            values = pd.to_numeric(frame[columns[0]], errors="coerce").to_numpy(dtype=float)
            if np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 10:
                ax.set_yscale("log")
        if name == "accuracy" and drawn:
            ax.set_ylim(0.0, 1.0)
        if best_epoch is not None and drawn and name != "learning rate":
            ax.axvline(best_epoch, color="grey", linewidth=0.8, linestyle=":",
                       label=f"best val loss (epoch {best_epoch:g})")
        if drawn:
            _literal_legend(ax, fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    heading = _short(str(title), _TITLE_CHARS)
    fig.suptitle(heading if len(frame) else f"{heading} (empty history)", **LITERAL)
    return fig


def plot_leaderboard(
    rows: Sequence[dict],
    path: str | Path,
    *,
    production: dict | None = None,
    metric: str = "accuracy",
) -> Path:
    """Horizontal bar chart of `metric` per candidate, best at the top.

    Failed candidates are listed with no bar, candidates over budget are drawn hatched, the
    production model's score on the same split is a vertical line, and chance (1/K) a dotted
    one when rows carry ``chance_accuracy``. Names, statuses and versions are drawn literally.
    """
    return _save_png(leaderboard_figure(rows, production=production, metric=metric), path)


def leaderboard_figure(
    rows: Sequence[dict],
    *,
    production: dict | None = None,
    metric: str = "accuracy",
) -> Figure:
    """The figure `plot_leaderboard` saves."""
    if not rows:
        raise DataError("plot_leaderboard needs at least one leaderboard row")
    names = [str(row.get("candidate", "?")) for row in rows]
    values: list[float] = []
    for row in rows:
        value = row.get(metric)
        finite_number = isinstance(value, (int, float)) and math.isfinite(value)
        values.append(float(value) if finite_number else float("nan"))
    height = max(2.5, 0.45 * len(rows) + 1.5)
    fig = _new_figure(8.0, height)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(rows))[::-1]  # first row (best) at the top
    colours = {"ok": "#3b75af", "over budget": "#e08b2c", "failed": "#aaaaaa"}
    finite = [v for v in values if math.isfinite(v)]
    scale_max = max(finite + [1e-9])
    for pos, row, value in zip(positions, rows, values, strict=True):
        status = _short(str(row.get("status", "ok")), _STATUS_CHARS)
        if math.isfinite(value):
            ax.barh(pos, value, color=colours.get(status, "#3b75af"),
                    hatch="//" if status == "over budget" else None)
            suffix = "" if status == "ok" else f" ({status})"
            ax.text(value + scale_max * 0.01, pos, f"{value:.3f}{suffix}", va="center", fontsize=8, **LITERAL)
        else:
            ax.text(scale_max * 0.01, pos, status if status != "ok" else "no score", va="center",
                    fontsize=8, color="#777777", **LITERAL)
    prod_value = None
    if production:
        nested = production.get("metrics")
        prod_metrics = nested if isinstance(nested, dict) else production
        candidate_value = prod_metrics.get(metric)
        if isinstance(candidate_value, (int, float)) and math.isfinite(candidate_value):
            prod_value = float(candidate_value)
            version = production.get("version")
            ax.axvline(prod_value, color="#c0392b", linewidth=1.5,
                       label=f"production{f' {_short(str(version), _STATUS_CHARS)}' if version else ''}: "
                             f"{prod_value:.3f}")
    chance = next((row.get("chance_accuracy") for row in rows if row.get("chance_accuracy")), None)
    if metric in ("accuracy", "top5_accuracy") and chance:
        ax.axvline(float(chance), color="black", linewidth=0.8, linestyle=":",
                   label=f"chance: {float(chance):.3f}")
    ax.set_yticks(positions, [_short(n) for n in names], fontsize=9, **LITERAL)
    upper = max(finite + ([prod_value] if prod_value is not None else []) + [1e-9])
    if metric in ("accuracy", "top5_accuracy", "macro_f1"):
        ax.set_xlim(0.0, min(1.0, upper * 1.25) if upper < 0.8 else 1.08)
    else:
        ax.set_xlim(0.0, upper * 1.25)
    ax.set_xlabel(metric.replace("_", " ") + (" (lower is better)" if metric in ("log_loss", "ece") else ""),
                  **LITERAL)
    ax.set_title(f"Candidates by {metric.replace('_', ' ')} on the test split", **LITERAL)
    if ax.get_legend_handles_labels()[0]:
        _literal_legend(ax, fontsize=8, loc="best")
    ax.grid(True, axis="x", alpha=0.3)
    return fig
