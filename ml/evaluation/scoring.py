"""Scoring models on a run's test split: the run's candidates and the stored production version.

Every candidate and production are scored on the same test images, so the gate compares like with
like. Results are written beside the model (metrics.json last, predictions.npz for the gate's
paired tests) and reused when a retried task finds them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.io import read_json, write_json, write_npz
from ml.registry.runs import cache_root, ensure_candidate_local, local_run_dir, publish_evaluation

if TYPE_CHECKING:
    from ml.config import PipelineConfig
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

# The leaderboard's score columns (from metrics.json) and cost columns (from train_summary.json).
SCORE_FIELDS = ("accuracy", "top5_accuracy", "log_loss", "macro_f1", "ece", "n", "latency_ms", "model_bytes")
COST_FIELDS = {"train_wall_time_s": "wall_time_s", "peak_rss_mb": "peak_rss_mb", "params": "params",
               "val_accuracy": "val_accuracy", "architecture": "architecture", "weights": "weights",
               # A fine-tuned candidate's parent and its validation comparison (ml.training.finetune).
               "parent": "parent", "vs_parent_val": "vs_parent",
               # A search trial's base, settings and the rung it reached (ml.training.search.search_info).
               "search": "search"}


def score_fields(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The headline scores of a metrics dict (what the leaderboard, the pointer and XCom carry)."""
    return {k: metrics[k] for k in SCORE_FIELDS if k in metrics}


def cost_fields(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The cost columns of a train summary, under their leaderboard names."""
    return {column: summary.get(key) for column, key in COST_FIELDS.items()}


def evaluate_candidate(dataset_dir: Path, candidate: str, config: PipelineConfig, store: ObjectStore | None,
                       run_id: str) -> dict[str, Any]:
    """Predict the test split with one candidate; write metrics, plots and predictions beside it."""
    import numpy as np

    from ml.evaluation.metrics import confusion_csv, confusion_matrix, evaluate_predictions
    from ml.evaluation.plots import plot_confusion, plot_learning_curves
    from ml.evaluation.report import measure_latency_ms, model_size_bytes
    from ml.serving.predictor import load_local
    from ml.training.predict import predict_split

    cand_dir = ensure_candidate_local(store, config, run_id, candidate)
    if (cand_dir / "metrics.json").exists() and (cand_dir / "predictions.npz").exists():
        return read_json(cand_dir / "metrics.json")
    model_path = cand_dir / "model.keras"
    y_true, probs, labels = predict_split(model_path, dataset_dir, "test", cache_root=cache_root(config))
    metrics = evaluate_predictions(y_true, probs, labels)
    # Latency of the serving path a consumer gets (Predictor, compiled runtime), not of an eager call.
    predictor = load_local(cand_dir)
    size = predictor.image_size
    example = np.random.default_rng(0).integers(0, 256, size=(1, size, size, 3), dtype=np.uint8)
    metrics["latency_ms"] = measure_latency_ms(predictor.predict_proba, example)
    metrics["model_bytes"] = model_size_bytes(model_path)
    # From the predictions, not metrics["confusion"]: metrics.json leaves it out for many classes.
    predicted = probs.argmax(axis=1)
    plot_confusion(confusion_matrix(y_true, predicted, len(labels)), labels, cand_dir / "confusion.png")
    confusion_csv(y_true, predicted, labels, cand_dir / "confusion.csv")
    if (cand_dir / "history.csv").exists():
        plot_learning_curves(cand_dir / "history.csv", cand_dir / "curves.png", title=candidate)
    write_npz(cand_dir / "predictions.npz", y_true=y_true, probs=probs)
    write_json(cand_dir / "metrics.json", metrics)
    log.info("evaluate %s: accuracy %.3f, top-5 %.3f, log loss %.3f on %d test images",
             candidate, metrics["accuracy"], metrics["top5_accuracy"], metrics["log_loss"], metrics["n"])
    publish_evaluation(store, config, run_id, candidate, cand_dir)
    return metrics


def production_dir(config: PipelineConfig, run_id: str, version: str) -> Path:
    """Where a stored version's scores on this run's test split are kept on this worker."""
    return local_run_dir(config, run_id) / "production" / version


def evaluate_version(dataset_dir: Path, version: str, config: PipelineConfig, store: ObjectStore,
                     run_id: str) -> dict[str, Any]:
    """Score a stored version on this run's test split, aligning its label order with the dataset's."""
    import numpy as np

    from ml.evaluation.metrics import evaluate_predictions
    from ml.serving.predictor import load_version
    from ml.training.predict import predict_split

    out_dir = production_dir(config, run_id, version)
    cached = out_dir / "metrics.json"
    if cached.exists():
        return read_json(cached)
    predictor = load_version(store, config.storage.model_name, version, cache_dir=config.work_dir / "models")
    dataset_labels = read_json(dataset_dir / "dataset.json")["labels"]
    y_true, probs, _ = predict_split(predictor.model_path, dataset_dir, "test", cache_root=cache_root(config))
    same_labels = list(predictor.labels) == list(dataset_labels)
    if not same_labels:
        # Re-index the production model's outputs onto the dataset's classes; classes it never
        # learned get probability 0, so its score is honest about what it cannot predict.
        aligned = np.zeros((probs.shape[0], len(dataset_labels)), dtype="float32")
        index = {label: i for i, label in enumerate(dataset_labels)}
        for j, label in enumerate(predictor.labels):
            if label in index:
                aligned[:, index[label]] = probs[:, j]
        probs = aligned
    metrics = evaluate_predictions(y_true, probs, dataset_labels)
    metrics.update({"candidate": "production", "version": version, "labels": list(predictor.labels),
                    "same_labels": same_labels})
    write_npz(out_dir / "predictions.npz", y_true=y_true, probs=probs)
    write_json(cached, metrics)
    log.info("production %s on this run's test split: accuracy %.3f, log loss %.3f",
             version, metrics["accuracy"], metrics["log_loss"])
    return metrics


def with_confusion(metrics: Mapping[str, Any], cand_dir: Path, n_classes: int) -> Mapping[str, Any]:
    """`metrics` with the K x K confusion (for the model card), recomputed from predictions.npz when
    metrics.json left it out for having many classes."""
    if "confusion" in metrics or not (cand_dir / "predictions.npz").exists():
        return metrics
    import numpy as np

    from ml.evaluation.metrics import confusion_matrix

    with np.load(cand_dir / "predictions.npz") as preds:
        matrix = confusion_matrix(preds["y_true"], preds["probs"].argmax(axis=1), n_classes)
    return {**metrics, "confusion": matrix.tolist()}
