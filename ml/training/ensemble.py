"""Build an ``ensemble_top<k>`` candidate from the run's trained candidates.

The k members are the best candidates of the run on the **validation** split, ranked by the gate's
metric (``gate.metric``), so the test split stays unseen until evaluation scores the ensemble like
any other candidate. Weights are uniform, or with ``weighting: inverse_log_loss`` proportional to
1 / validation log loss. The folder written is an ordinary candidate folder (model.keras,
labels.json, preprocessing.json, members.json, train_summary.json last); its cost columns (params,
training time) are the sums of its members'.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.errors import DataError
from ml.io import read_json, staging_dir, to_jsonable, write_json

if TYPE_CHECKING:
    import numpy as np

    from ml.config import TrainConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
MEMBERS_FILE = "members.json"
_LOG_LOSS_FLOOR = 1e-6  # a perfect member (log loss 0) must not get an infinite weight


@dataclass(frozen=True)
class MemberScore:
    """One trained candidate's validation predictions and scores."""

    candidate: str
    folder: Path
    y_true: np.ndarray
    probs: np.ndarray
    metrics: Mapping[str, Any]


def score_members(dataset_dir: Path, folders: Mapping[str, Path], *, cache_root: Path) -> list[MemberScore]:
    """Predict the validation split with every candidate folder (name -> folder with model.keras)."""
    from ml.evaluation.metrics import evaluate_predictions
    from ml.training.predict import predict_split

    scored = []
    for name in sorted(folders):
        y_true, probs, labels = predict_split(folders[name] / "model.keras", dataset_dir, "val", cache_root=cache_root)
        if len(y_true) == 0:
            raise DataError(f"dataset {dataset_dir} has no validation images: an ensemble picks its members on them")
        metrics = evaluate_predictions(y_true, probs, labels)
        scored.append(MemberScore(name, folders[name], y_true, probs, metrics))
        log.info("ensemble: %s on validation: accuracy %.3f, log loss %.3f", name, metrics["accuracy"],
                 metrics["log_loss"])
    return scored


def choose_members(scored: Sequence[MemberScore], k: int, metric: str) -> list[MemberScore]:
    """The k best by `metric` on validation (ties by name); DataError when fewer than k exist."""
    from ml.evaluation.leaderboard import HIGHER_IS_BETTER

    if len(scored) < k:
        raise DataError(f"ensemble_top{k} needs {k} trained candidates, this run has {len(scored)}: "
                        f"{[s.candidate for s in scored]}")
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    return sorted(scored, key=lambda s: (sign * float(s.metrics[metric]), s.candidate))[:k]


def member_weights(log_losses: Sequence[float], weighting: str) -> list[float]:
    """Averaging weights (sum 1): uniform, or proportional to 1 / validation log loss."""
    if weighting == "uniform":
        return [1.0 / len(log_losses)] * len(log_losses)
    inverse = [1.0 / max(float(loss), _LOG_LOSS_FLOOR) for loss in log_losses]
    return [value / sum(inverse) for value in inverse]


def build_ensemble_candidate(dataset_dir: Path, name: str, scored: Sequence[MemberScore], out_dir: Path,
                             config: TrainConfig, *, metric: str) -> dict[str, Any]:
    """Write the ``ensemble_top<k>`` candidate folder `name` into `out_dir`; returns its train summary."""
    from ml.evaluation.metrics import evaluate_predictions
    from ml.models import load_model
    from ml.models.ensemble import build_ensemble
    from ml.models.registry import ensemble_size, ensemble_weighting

    started = time.monotonic()
    weighting = ensemble_weighting(name, config.options_for(name))
    members = choose_members(scored, ensemble_size(name), metric)
    weights = member_weights([m.metrics["log_loss"] for m in members], weighting)
    summaries = [read_json(m.folder / SUMMARY_FILE) for m in members]
    labels = read_json(members[0].folder / "labels.json")
    for member in members[1:]:
        if read_json(member.folder / "labels.json") != labels:
            raise DataError(f"{member.folder}/labels.json differs from {members[0].folder}/labels.json: "
                            "ensemble members must predict the same classes")
    model = build_ensemble([load_model(m.folder / "model.keras") for m in members], weights,
                           names=[m.candidate for m in members], name=name)
    val_probs = sum(w * m.probs for w, m in zip(weights, members, strict=True))
    val = evaluate_predictions(members[0].y_true, val_probs, labels)
    image_size = int(model.input_shape[1])
    with staging_dir(out_dir) as staging:
        model.save(staging / "model.keras")
        write_json(staging / "labels.json", labels)
        write_json(staging / "preprocessing.json", {
            "image_size": image_size, "color_order": "RGB", "input_range": [0, 255], "dtype": "float32",
            "resize": "cv2.INTER_AREA, aspect ratio ignored", "preprocess": "per member, inside the model",
            "architecture": "ensemble", "members": [m.candidate for m in members]})
        write_json(staging / MEMBERS_FILE, [
            {"candidate": m.candidate, "weight": w, "val_accuracy": m.metrics["accuracy"],
             "val_log_loss": m.metrics["log_loss"], "image_size": s.get("image_size")}
            for m, w, s in zip(members, weights, summaries, strict=True)])
        summary = to_jsonable({
            "candidate": name, "architecture": "ensemble", "kind": "ensemble",
            "members": [m.candidate for m in members], "member_weights": weights, "weighting": weighting,
            "selected_by": f"validation {metric}", "weights": "members'",
            "val_accuracy": val["accuracy"], "val_loss": val["log_loss"], "image_size": image_size,
            "num_classes": len(labels), "dataset_hash": summaries[0].get("dataset_hash"),
            # Cost columns: what the members cost together (the ensemble adds no training).
            "params": sum(int(s.get("params") or 0) for s in summaries),
            "wall_time_s": round(sum(float(s.get("wall_time_s") or 0) for s in summaries), 2),
            "peak_rss_mb": max(float(s.get("peak_rss_mb") or 0) for s in summaries),
            "model_bytes": (staging / "model.keras").stat().st_size,
            "build_time_s": round(time.monotonic() - started, 2)})
        write_json(staging / SUMMARY_FILE, summary)
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
        for file in ("model.keras", "labels.json", "preprocessing.json", MEMBERS_FILE, SUMMARY_FILE):
            os.replace(staging / file, out_dir / file)  # the summary last: it marks the folder complete
    log.info("ensemble %s: %s (weights %s, %s) val accuracy %.3f, log loss %.3f; %d params",
             name, ", ".join(summary["members"]), ", ".join(f"{w:.3f}" for w in weights), weighting,
             val["accuracy"], val["log_loss"], summary["params"])
    return summary
