"""Evaluation: test-split metrics, leaderboard, figures, run report and model card.

Only numpy is imported eagerly; matplotlib and pandas are imported inside the plotting
functions, so ``import ml.evaluation`` stays cheap for the scheduler and the CLI.
"""

from __future__ import annotations

from ml.evaluation.leaderboard import (
    apply_budgets,
    best_candidate,
    build_leaderboard,
    format_leaderboard_table,
    write_leaderboard,
)
from ml.evaluation.metrics import confusion_csv, evaluate_predictions, mcnemar_exact_p, mcnemar_table
from ml.evaluation.model_card import render_model_card
from ml.evaluation.plots import plot_confusion, plot_leaderboard, plot_learning_curves
from ml.evaluation.report import build_run_report, measure_latency_ms, model_size_bytes, write_run_report

__all__ = [
    "apply_budgets",
    "best_candidate",
    "build_leaderboard",
    "build_run_report",
    "confusion_csv",
    "evaluate_predictions",
    "format_leaderboard_table",
    "mcnemar_exact_p",
    "mcnemar_table",
    "measure_latency_ms",
    "model_size_bytes",
    "plot_confusion",
    "plot_leaderboard",
    "plot_learning_curves",
    "render_model_card",
    "write_leaderboard",
    "write_run_report",
]
