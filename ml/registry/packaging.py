"""Packaging the gate's winner as a version: lineage, model card, dataset profile, verified exports.

Everything a consumer or an auditor needs travels with the model: ``lineage.json`` (data, code,
config, gate decision), ``model_card.html``, ``dataset_profile.json`` (the next run measures drift
against it), and SavedModel/TFLite exports that ship only once they agree with ``model.keras`` on
golden test images (``golden.npz`` goes with them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.io import fresh_dir, read_json, write_atomic, write_json
from ml.registry import layout
from ml.registry.runs import cache_root, ensure_candidate_local, local_run_dir

if TYPE_CHECKING:
    from ml.config import PipelineConfig
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """The git commit the code runs from ("unknown" outside a checkout)."""
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_file = head.parent / ref[5:]
            return ref_file.read_text().strip() if ref_file.exists() else ref[5:]
        return ref
    except OSError:
        return "unknown"


def lineage(version: str, candidate: str, run_id: str, dataset: Mapping[str, Any], decision: Mapping[str, Any],
            config: PipelineConfig, train_summary: Mapping[str, Any]) -> dict[str, Any]:
    """Where a version came from: data, code, config, training and the gate's decision."""
    import ml

    return {
        "version": version, "candidate": candidate, "run_id": run_id,
        "dataset_hash": dataset["dataset_hash"], "dataset_source": dataset.get("source"),
        "parent_version": decision.get("champion_version"), "code_version": code_version(),
        "ml_package_version": ml.__version__, "config": config.to_dict(), "train_summary": dict(train_summary),
        "airflow": {k: os.environ[k] for k in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID") if k in os.environ},
        "gate": {k: v for k, v in decision.items() if k != "expected_etag"},
        "created_at": datetime.now(UTC).isoformat(),
    }


def kaggle_submission(cand_dir: Path, dataset_dir: Path, stage: Path) -> dict[str, Any] | None:
    """``submission.csv`` for a Kaggle-competition dataset (sample-submission columns and rows), else None."""
    from ml.serving.predictor import load_local
    from ml.serving.submission import competition_sample, write_submission

    sample = competition_sample(dataset_dir)
    if sample is None:
        log.info("promote: the dataset has no Kaggle test set (unlabelled images + sample_submission.csv): "
                 "no %s", layout.SUBMISSION_FILE)
        return None
    started = time.monotonic()
    result = write_submission(load_local(cand_dir), dataset_dir, stage / layout.SUBMISSION_FILE,
                              sample_submission=sample)
    result["seconds"] = round(time.monotonic() - started, 2)
    log.info("promote: submission.csv with %d rows x %d classes in %.1f s (upload it to the competition)",
             result["rows"], result["classes"], result["seconds"])
    return result


def publish_challenger(version: str, dataset: Mapping[str, Any], dataset_dir: Path, evaluation: Mapping[str, Any],
                       decision: Mapping[str, Any], config: PipelineConfig, store: ObjectStore, run_id: str, *,
                       quality: Mapping[str, Any] | None) -> dict[str, Any]:
    """Build the version folder of the gate's challenger and publish it (COMPLETE last).

    Returns:
        {"uri", "sha256", "metrics", "labels"} of the published version.
    """
    from ml.data.drift import dataset_profile
    from ml.evaluation.model_card import render_model_card
    from ml.evaluation.scoring import score_fields, with_confusion
    from ml.registry.exports import build_exports, golden_images, verify_exports
    from ml.registry.versions import publish_version

    candidate = decision["challenger"]
    cand_dir = ensure_candidate_local(store, config, run_id, candidate)
    metrics = read_json(cand_dir / "metrics.json")
    labels = read_json(cand_dir / "labels.json")
    summary = read_json(cand_dir / layout.CANDIDATE_MARKER)
    origin = lineage(version, candidate, run_id, dataset, decision, config, summary)
    stage = fresh_dir(local_run_dir(config, run_id) / "version" / version)
    write_json(stage / "lineage.json", origin)
    write_json(stage / "metrics.json", metrics)
    images = {name: cand_dir / f"{name}.png" for name in ("curves", "confusion") if (cand_dir / f"{name}.png").exists()}
    card = render_model_card(model_name=config.storage.model_name, version=version, candidate=candidate,
                             metrics=with_confusion(metrics, cand_dir, len(labels)), labels=labels,
                             dataset=dict(dataset), quality=dict(quality or {}),
                             leaderboard=list(evaluation["leaderboard"]), decision=dict(decision), lineage=origin,
                             images=images)
    write_atomic(stage / "model_card.html", card)
    # The next run measures drift against this (see ml.pipeline.should_train).
    write_json(stage / "dataset_profile.json", dataset_profile(dataset_dir))
    files = {name: cand_dir / name for name in ("model.keras", "labels.json", "preprocessing.json")}
    files.update({name: stage / name for name in ("metrics.json", "lineage.json", "model_card.html",
                                                  "dataset_profile.json")})
    # Serving exports ship only once they agree with model.keras on golden test images.
    image_size = int(read_json(cand_dir / "preprocessing.json")["image_size"])
    golden = golden_images(dataset_dir, image_size, cache_root(config))
    exports = build_exports(cand_dir / "model.keras", stage / "exports", golden_images=golden)
    checked = verify_exports(exports, model_path=cand_dir / "model.keras")["checked"]
    files.update(exports)
    submission = kaggle_submission(cand_dir, dataset_dir, stage)
    if submission is not None:
        files[layout.SUBMISSION_FILE] = Path(submission["path"])
    export_info = {name: {"bytes": path.stat().st_size,
                          "max_abs_diff": checked[name]["max_abs_diff"] if name in checked else None}
                   for name, path in exports.items()}
    log.info("promote: exports verified on %d golden test images: %s", len(golden),
             ", ".join(f"{name} {meta['bytes'] / 1024:.1f} KB" for name, meta in sorted(export_info.items())))
    scores = score_fields(metrics)
    info = publish_version(store, config.storage.model_name, version, files,
                           {"candidate": candidate, "run_id": run_id, "metrics": scores, "labels": labels,
                            "dataset_hash": dataset["dataset_hash"], "exports": export_info,
                            "submission": None if submission is None else
                            {k: submission[k] for k in ("rows", "classes", "undecodable", "seconds")}})
    return {"uri": info["uri"], "sha256": info["sha256"], "metrics": scores, "labels": labels}
