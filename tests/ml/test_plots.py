"""Tests of ml.evaluation.plots: every figure is a real, non-empty PNG written atomically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml.errors import DataError
from ml.evaluation.plots import plot_confusion, plot_leaderboard, plot_learning_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    # IHDR is the first chunk: width and height as big-endian uint32 at bytes 16..24.
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("n_classes", [3, 120])
@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_png_for_small_and_large_k(tmp_path: Path, n_classes: int, normalize: bool) -> None:
    rng = np.random.default_rng(n_classes)
    confusion = rng.integers(0, 3, size=(n_classes, n_classes)) + np.eye(n_classes, dtype=int) * 10
    confusion[0] = 0  # a class with no test images must not divide by zero
    labels = [f"<breed {i}> with a rather long name" for i in range(n_classes)]

    path = plot_confusion(confusion, labels, tmp_path / "confusion.png", normalize=normalize)

    width, height = _png_size(path)
    assert path.stat().st_size > 5_000
    assert min(width, height) >= 500
    if n_classes == 120:
        assert min(width, height) >= 1500  # ~10+ px per class
    assert _no_temp_files(tmp_path)


def test_confusion_shape_mismatch_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3 x 3"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "c.png")


HISTORY_FULL = "epoch,accuracy,learning_rate,loss,val_accuracy,val_loss\n" + "\n".join(
    f"{e},{0.3 + e * 0.1},{1e-3 / (e + 1)},{2 - e * 0.3},{0.25 + e * 0.08},{2.1 - e * 0.2}" for e in range(5))


@pytest.mark.parametrize(
    "content",
    [
        HISTORY_FULL,
        "epoch,loss\n0,2.0\n1,1.5\n",  # no accuracy, no validation
        "accuracy,val_accuracy\n0.2,0.1\n0.4,0.3\n",  # no epoch column, no loss
        "epoch,accuracy,loss,val_accuracy,val_loss\n",  # header only
        "",  # empty file
    ],
    ids=["full", "loss-only", "no-epoch", "header-only", "empty"],
)
def test_learning_curves_tolerate_missing_columns(tmp_path: Path, content: str) -> None:
    history = tmp_path / "history.csv"
    history.write_text(content)

    path = plot_learning_curves(history, tmp_path / "out" / "curves.png", "transfer_mobilenet_v2")

    assert path.stat().st_size > 5_000
    assert _png_size(path)[0] > 600
    assert _no_temp_files(path.parent)


def test_learning_curves_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.csv"):
        plot_learning_curves(tmp_path / "nope.csv", tmp_path / "c.png", "x")


def test_leaderboard_png_with_production_failed_and_over_budget(tmp_path: Path) -> None:
    rows = [
        {"candidate": "transfer_mobilenet_v2", "accuracy": 0.676, "status": "ok", "chance_accuracy": 1 / 120},
        {"candidate": "transfer_inception_v3", "accuracy": 0.582, "status": "over budget"},
        {"candidate": "scratch_small", "accuracy": 0.146, "status": "ok"},
        {"candidate": "scratch_big", "accuracy": None, "status": "failed"},
    ]

    production = {"version": "v3", "metrics": {"accuracy": 0.61}}

    path = plot_leaderboard(rows, tmp_path / "leaderboard.png", production=production)

    assert path.stat().st_size > 5_000
    assert _no_temp_files(tmp_path)


def test_leaderboard_png_by_log_loss(tmp_path: Path) -> None:
    rows = [{"candidate": "a", "log_loss": 1.2}, {"candidate": "b", "log_loss": 3.9}]

    path = plot_leaderboard(rows, tmp_path / "lb.png", metric="log_loss")

    assert path.read_bytes().startswith(PNG_MAGIC)


def test_leaderboard_png_needs_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least one"):
        plot_leaderboard([], tmp_path / "lb.png")


def test_plots_do_not_use_pyplot(tmp_path: Path) -> None:
    # pyplot keeps global figures and may pick a GUI backend; a fresh interpreter shows whether
    # plotting pulled it in.
    code = ("import sys; from ml.evaluation.plots import plot_confusion; "
            f"plot_confusion([[1, 0], [0, 1]], ['a', 'b'], {str(tmp_path / 'c.png')!r}); "
            "sys.exit('matplotlib.pyplot' in sys.modules)")

    repo = Path(__file__).resolve().parents[2]

    result = subprocess.run([sys.executable, "-c", code], cwd=repo, check=False)

    assert result.returncode == 0
    assert (tmp_path / "c.png").is_file()
