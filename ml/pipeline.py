"""The pipeline's stages as plain functions: the DAG's tasks and the CLI call these.

Each stage takes a `PipelineConfig`, an `ObjectStore` and small JSON-able values, does one
step, publishes its artifacts to the store (temporary names first, the marker object last),
and returns a small JSON-able dict for XCom. Every stage is idempotent for the same inputs:
a retried task finds what its previous attempt published and reuses it.

Local scratch space lives under `config.work_dir`; nothing there is authoritative, so a
worker that lacks a file downloads it from the store again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import PipelineConfig
from ml.errors import DataError, PromotionConflict

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

# Files a trained candidate publishes; train_summary.json is written last and marks completion.
CANDIDATE_FILES = ("model.keras", "labels.json", "preprocessing.json", "history.csv")
CANDIDATE_MARKER = "train_summary.json"
EVAL_FILES = ("metrics.json", "confusion.png", "confusion.csv", "curves.png", "predictions.npz")


# --------------------------------------------------------------------------- paths and keys


def run_prefix(config: PipelineConfig, run_id: str) -> str:
    """Store prefix of one run's artifacts (`ml.registry.layout.run_prefix`)."""
    from ml.registry.layout import run_prefix as layout_run_prefix

    return layout_run_prefix(config.storage.model_name, run_id)


def local_run_dir(config: PipelineConfig, run_id: str) -> Path:
    """This worker's folder of a run: the same reversible segment as the store's prefix."""
    from ml.registry.layout import run_segment

    return config.work_dir / "runs" / run_segment(run_id)


def cache_root(config: PipelineConfig) -> Path:
    return config.work_dir / "cache"


def new_run_id() -> str:
    """A run id for runs started outside Airflow (the CLI)."""
    return "manual__" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# --------------------------------------------------------------------------- ingest / validate


def ingest_stage(config: PipelineConfig, store: ObjectStore | None, *, source: str | None = None,
                 kaggle_credentials: tuple[str, str] | None = None) -> dict[str, Any]:
    """Fetch the source into a content-addressed dataset folder with its manifest and splits."""
    from ml.data.ingest import ingest

    src = source or config.data.source
    if not src:
        raise DataError("no dataset source given: set data.source in the config or pass a source")
    config.security.check_source(src)
    started = time.perf_counter()
    summary = ingest(src, config.work_dir, config.data, store=store, kaggle_credentials=kaggle_credentials)
    log.info("ingest: %s -> dataset %s: %d images ok, %d quarantined, %d classes (%.1f s)",
             src, summary["dataset_hash"][:12], summary.get("n_ok", 0), summary.get("n_quarantined", 0),
             len(summary.get("labels", [])), time.perf_counter() - started)
    return _small(summary)


def validate_stage(dataset_dir: str | Path, config: PipelineConfig, store: ObjectStore | None,
                   run_id: str) -> dict[str, Any]:
    """Run the data-quality suite; publish its JSON/HTML beside the run; raise on failures."""
    from ml.data.quality import validate_dataset

    out_dir = local_run_dir(config, run_id) / "quality"
    report = validate_dataset(Path(dataset_dir), config.data, out_dir=out_dir)
    uris: dict[str, str] = {}
    if store is not None:
        for path in sorted(out_dir.glob("*")):
            key = f"{run_prefix(config, run_id)}/quality/{path.name}"
            store.put_file(key, path)
            uris[path.name] = store.uri(key)
    for line in report.summary().splitlines():
        log.info("quality: %s", line)
    result = {"success": report.success, "failures": list(report.failures),
              "warnings": list(report.warnings), "uris": uris}
    _write_json(out_dir / "summary.json", result)
    report.raise_for_failures()
    return result


# --------------------------------------------------------------------------- skip check


def report_drift(dataset: Mapping[str, Any], pointer: Mapping[str, Any], config: PipelineConfig,
                 store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """Compare this dataset with production's (its version's dataset_profile.json); publish drift.json."""
    from ml.data.drift import compare_profiles, dataset_profile
    from ml.errors import StorageError

    try:
        reference = store.get_json(f"{config.storage.model_name}/versions/{pointer['version']}/dataset_profile.json")
    except StorageError:
        log.info("drift: production version %s has no dataset profile to compare with", pointer["version"])
        return None
    drift = compare_profiles(dataset_profile(dataset["dataset_dir"]), reference)
    for finding in drift["findings"] or ["no notable change from production's dataset"]:
        log.info("drift: %s", finding)
    _write_json(local_run_dir(config, run_id) / "drift.json", drift)
    store.put_json(f"{run_prefix(config, run_id)}/drift.json", drift)
    return drift


def should_train(dataset: Mapping[str, Any], config: PipelineConfig, store: ObjectStore | None,
                 run_id: str | None = None) -> dict[str, Any]:
    """Decide whether this run trains at all: not when production already saw this exact data.

    Returns {"train": bool, "reason": str}. `gate.force` trains regardless. When a production
    model exists, drift against its dataset is measured and published first (see report_drift).
    """
    if store is None:
        return {"train": True, "reason": "no object store configured"}
    from ml.registry.versions import read_pointer

    pointer, _etag = read_pointer(store, config.storage.model_name)
    if pointer is None:
        return {"train": True, "reason": "no production model yet"}
    drift = report_drift(dataset, pointer, config, store, run_id) if run_id else None
    if drift and drift["label_set_changed"] and not config.gate.allow_label_change:
        log.warning("drift: the label set differs from production's; the gate will refuse to replace it "
                    "unless allow_label_change is set")
    if config.gate.force:
        return {"train": True, "reason": "force is set"}
    if pointer.get("dataset_hash") == dataset["dataset_hash"]:
        return {"train": False,
                "reason": f"production version {pointer['version']} was trained on this exact dataset "
                          f"({dataset['dataset_hash'][:12]}); set force=true to retrain anyway"}
    return {"train": True, "reason": f"dataset changed since production version {pointer['version']}"}


# --------------------------------------------------------------------------- prepare / train


def prepare_stage(dataset_dir: str | Path, config: PipelineConfig) -> dict[str, Any]:
    """Build the decoded-image cache the training tasks share; report split sizes."""
    import pandas as pd

    from ml.data.image_cache import build_image_cache
    from ml.data.splits import split_counts

    dataset_dir = Path(dataset_dir)
    manifest = pd.read_parquet(dataset_dir / "manifest.parquet")
    started = time.perf_counter()
    cache = build_image_cache(dataset_dir, config.train.image_size, cache_root(config))
    counts = split_counts(manifest)
    log.info("prepare: splits %s; image cache %s at %d px ready in %.1f s", counts.get("total", counts),
             getattr(cache, "path", "?"), config.train.image_size, time.perf_counter() - started)
    return {"splits": _jsonable(counts), "image_size": config.train.image_size}


def train_stage(dataset_dir: str | Path, candidate: str, config: PipelineConfig, store: ObjectStore | None,
                run_id: str) -> dict[str, Any]:
    """Train one candidate and publish its folder; reuse a previous attempt's published result."""
    from ml.registry.layout import check_candidate
    from ml.training.fit import train_candidate

    check_candidate(candidate)  # before any folder named after it is touched
    published = _published_summary(store, config, run_id, candidate)
    if published is not None:
        log.info("train %s: already published by an earlier attempt, reusing it", candidate)
        return published
    out_dir = _fresh_dir(local_run_dir(config, run_id) / candidate)
    summary = train_candidate(Path(dataset_dir), candidate, out_dir, config.train,
                              cache_root=cache_root(config), store=store)
    return _publish_candidate(store, config, run_id, candidate, out_dir, summary)


def select_for_finetuning(results: Sequence[Mapping[str, Any]], config: PipelineConfig) -> list[str]:
    """The top-k transfer candidates by validation accuracy (k = train.finetune_top_k)."""
    transfer = [r for r in results if r and str(r.get("candidate", "")).startswith("transfer_")]
    transfer.sort(key=lambda r: (-float(r.get("val_accuracy") or 0.0), r["candidate"]))
    chosen = [r["candidate"] for r in transfer[: config.train.finetune_top_k]]
    log.info("fine-tuning: %s", ", ".join(chosen) if chosen else "no transfer candidate to fine-tune")
    return chosen


def finetune_stage(dataset_dir: str | Path, transfer_candidate: str, config: PipelineConfig,
                   store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Fine-tune a trained transfer candidate (unfreeze from its boundary layer) and publish it."""
    from ml.registry.layout import check_candidate
    from ml.training.finetune import finetune_candidate

    check_candidate(transfer_candidate)
    candidate = check_candidate("finetune_" + transfer_candidate.removeprefix("transfer_"))
    published = _published_summary(store, config, run_id, candidate)
    if published is not None:
        log.info("finetune %s: already published by an earlier attempt, reusing it", candidate)
        return published
    transfer_dir = ensure_candidate_local(store, config, run_id, transfer_candidate)
    out_dir = _fresh_dir(local_run_dir(config, run_id) / candidate)
    summary = finetune_candidate(Path(dataset_dir), transfer_dir, out_dir, config.train,
                                 cache_root=cache_root(config))
    return _publish_candidate(store, config, run_id, candidate, out_dir, summary)


# --------------------------------------------------------------------------- evaluate


def evaluate_stage(dataset_dir: str | Path, results: Sequence[Mapping[str, Any] | None], config: PipelineConfig,
                   store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Score every candidate and the production model on the test split; publish the leaderboard."""
    from ml.evaluation.leaderboard import (
        apply_budgets,
        best_candidate,
        build_leaderboard,
        format_leaderboard_table,
        write_leaderboard,
    )

    dataset_dir = Path(dataset_dir)
    entries: list[dict[str, Any]] = []
    for result in results:
        if not result:
            continue
        candidate = result["candidate"]
        metrics = evaluate_candidate(dataset_dir, candidate, config, store, run_id)
        entries.append({**_cost_fields(result), **_score_fields(metrics), "candidate": candidate, "status": "ok"})
    if not entries:
        raise DataError("no candidate finished training: nothing to evaluate")

    production = evaluate_production(dataset_dir, config, store, run_id)
    rows = build_leaderboard(entries, metric=config.gate.metric)
    rows = apply_budgets(rows, max_model_mb=config.gate.max_model_mb, max_latency_ms=config.gate.max_latency_ms)
    best = best_candidate(rows)
    if best is None:
        raise DataError("every candidate is over the size/latency budget (gate.max_model_mb, gate.max_latency_ms): "
                        + "; ".join(f"{r['candidate']}: {', '.join(r.get('budget_reasons', []))}" for r in rows))
    out_dir = local_run_dir(config, run_id) / "leaderboard"
    paths = write_leaderboard(rows, out_dir, production=production)
    uris = {}
    if store is not None:
        for name, path in paths.items():
            key = f"{run_prefix(config, run_id)}/leaderboard/{Path(path).name}"
            store.put_file(key, Path(path))
            uris[name] = store.uri(key)
    table = format_leaderboard_table(rows, production=production)
    log.info("leaderboard on the test split (%d images):\n%s", rows[0].get("n", 0), table)
    return {"leaderboard": _jsonable(rows), "best": best["candidate"], "production": _jsonable(production),
            "uris": uris}


def evaluate_candidate(dataset_dir: Path, candidate: str, config: PipelineConfig, store: ObjectStore | None,
                       run_id: str) -> dict[str, Any]:
    """Predict the test split with one candidate; write metrics, plots and predictions beside it."""
    import numpy as np

    from ml.evaluation.metrics import confusion_csv, confusion_matrix, evaluate_predictions
    from ml.evaluation.plots import plot_confusion, plot_learning_curves
    from ml.evaluation.report import measure_latency_ms, model_size_bytes
    from ml.models import load_model
    from ml.training.predict import predict_split

    cand_dir = ensure_candidate_local(store, config, run_id, candidate)
    if (cand_dir / "metrics.json").exists() and (cand_dir / "predictions.npz").exists():
        return json.loads((cand_dir / "metrics.json").read_text())
    model_path = cand_dir / "model.keras"
    y_true, probs, labels = predict_split(model_path, dataset_dir, "test", cache_root=cache_root(config))
    metrics = evaluate_predictions(y_true, probs, labels)
    model = load_model(model_path)
    size = int(model.inputs[0].shape[1])
    example = np.random.default_rng(0).uniform(0, 255, size=(1, size, size, 3)).astype("float32")
    metrics["latency_ms"] = measure_latency_ms(lambda x: model(x, training=False), example)
    metrics["model_bytes"] = model_size_bytes(model_path)
    # From the predictions, not metrics["confusion"]: metrics.json leaves it out for many classes.
    plot_confusion(confusion_matrix(y_true, probs.argmax(axis=1), len(labels)), labels, cand_dir / "confusion.png")
    confusion_csv(y_true, probs.argmax(axis=1), labels, cand_dir / "confusion.csv")
    if (cand_dir / "history.csv").exists():
        plot_learning_curves(cand_dir / "history.csv", cand_dir / "curves.png", title=candidate)
    _atomic_npz(cand_dir / "predictions.npz", y_true=y_true, probs=probs)
    _write_json(cand_dir / "metrics.json", metrics)
    log.info("evaluate %s: accuracy %.3f, top-5 %.3f, log loss %.3f on %d test images",
             candidate, metrics["accuracy"], metrics["top5_accuracy"], metrics["log_loss"], metrics["n"])
    if store is not None:
        prefix = f"{run_prefix(config, run_id)}/{candidate}"
        for name in EVAL_FILES:
            if (cand_dir / name).exists() and name != "metrics.json":
                store.put_file(f"{prefix}/{name}", cand_dir / name)
        store.put_file(f"{prefix}/metrics.json", cand_dir / "metrics.json")
    return metrics


def evaluate_production(dataset_dir: Path, config: PipelineConfig, store: ObjectStore | None,
                        run_id: str) -> dict[str, Any] | None:
    """Score the current production model on this run's test split (same images as challengers)."""
    if store is None:
        return None
    from ml.registry.versions import read_pointer

    pointer, _etag = read_pointer(store, config.storage.model_name)
    if pointer is None:
        log.info("no production model yet: the first challenger only has to beat chance")
        return None
    return evaluate_version(dataset_dir, pointer["version"], config, store, run_id)


def evaluate_version(dataset_dir: Path, version: str, config: PipelineConfig, store: ObjectStore,
                     run_id: str) -> dict[str, Any]:
    """Score a stored version on this run's test split, aligning its label order with the dataset's."""
    import numpy as np

    from ml.evaluation.metrics import evaluate_predictions
    from ml.serving.predictor import load_version
    from ml.training.predict import predict_split

    out_dir = local_run_dir(config, run_id) / "production" / version
    cached = out_dir / "metrics.json"
    if cached.exists():
        return json.loads(cached.read_text())
    predictor = load_version(store, config.storage.model_name, version, cache_dir=config.work_dir / "models")
    dataset_labels = json.loads((dataset_dir / "dataset.json").read_text())["labels"]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_npz(out_dir / "predictions.npz", y_true=y_true, probs=probs)
    _write_json(cached, metrics)
    log.info("production %s on this run's test split: accuracy %.3f, log loss %.3f",
             version, metrics["accuracy"], metrics["log_loss"])
    return metrics


# --------------------------------------------------------------------------- gate / promote


def gate_stage(dataset_dir: str | Path, evaluation: Mapping[str, Any], config: PipelineConfig,
               store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Compare the best challenger with production on the same test images; explain the decision."""
    from ml.registry.versions import read_pointer

    if store is None:
        raise DataError("the gate needs the object store (the production pointer lives there)")
    dataset_dir = Path(dataset_dir)
    pointer, etag = read_pointer(store, config.storage.model_name)
    decision = _decide(dataset_dir, evaluation["best"], pointer, config, store, run_id)
    decision.update({"champion_version": pointer["version"] if pointer else None, "expected_etag": etag})
    verdict = "PROMOTE" if decision["promote"] else "KEEP PRODUCTION"
    log.info("gate: %s %s", verdict, evaluation["best"])
    for reason in decision["reasons"]:
        log.info("gate:   - %s", reason)
    _write_json(local_run_dir(config, run_id) / "gate.json", decision)
    if store is not None:
        store.put_json(f"{run_prefix(config, run_id)}/gate.json", decision)
    return decision


def _decide(dataset_dir: Path, challenger_name: str, pointer: Mapping[str, Any] | None, config: PipelineConfig,
            store: ObjectStore, run_id: str) -> dict[str, Any]:
    import numpy as np

    from ml.registry.gate import CandidateEval, decide

    labels = json.loads((dataset_dir / "dataset.json").read_text())["labels"]
    cand_dir = ensure_candidate_local(store, config, run_id, challenger_name)
    preds = np.load(cand_dir / "predictions.npz")
    metrics = json.loads((cand_dir / "metrics.json").read_text())
    challenger = CandidateEval(name=challenger_name, y_pred=preds["probs"].argmax(axis=1), metrics=metrics,
                               labels=list(labels))
    champion = None
    if pointer is not None:
        champ_metrics = evaluate_version(dataset_dir, pointer["version"], config, store, run_id)
        champ_preds = np.load(local_run_dir(config, run_id) / "production" / pointer["version"] / "predictions.npz")
        champion = CandidateEval(name=f"production:{pointer['version']}", y_pred=champ_preds["probs"].argmax(axis=1),
                                 metrics=champ_metrics, labels=list(champ_metrics.get("labels", labels)))
    decision = decide(y_true=preds["y_true"], challenger=challenger, champion=champion, labels=list(labels),
                      config=config.gate)
    out = decision.to_dict()
    out["challenger"] = challenger_name
    return out


def promote_stage(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], decision: Mapping[str, Any],
                  config: PipelineConfig, store: ObjectStore, run_id: str, *,
                  actor: str = "cli", quality: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Publish the winner as an immutable version and move the pointer with a conditional write.

    If another promotion moved the pointer since the gate read it, re-gate against the new
    champion (on this run's test split) once and either promote properly or stop with the reason.
    """
    from ml.registry.versions import append_promotion_log, make_pointer, read_pointer, swap_pointer

    dataset_dir = Path(dataset["dataset_dir"])
    model_name = config.storage.model_name
    result: dict[str, Any] = {"promoted": False, "decision": dict(decision), "run_id": run_id}
    if decision["promote"]:
        version, version_info = _claim_version(store, config, run_id, decision["challenger"])
        if version_info is None:
            version_info = _publish_version(version, dataset, evaluation, decision, config, store, run_id,
                                            quality=quality)
        expected = decision.get("expected_etag")
        for attempt in (1, 2):
            resumed = False
            pointer = make_pointer(store, model_name, version, candidate=decision["challenger"])
            try:
                swap_pointer(store, model_name, pointer, expected_etag=expected)
            except PromotionConflict as conflict:
                current, expected = read_pointer(store, model_name)
                if current is None or current.get("version") != version:
                    log.warning("promote: %s", conflict)
                    if attempt == 2 or current is None:
                        raise
                    regated = _decide(dataset_dir, decision["challenger"], current, config, store, run_id)
                    _log_promotion(store, model_name, run_id, actor, decision["champion_version"], version,
                                   promoted=False, reasons=[f"lost the pointer race to {current['version']}"]
                                   + regated["reasons"])
                    if not regated["promote"]:
                        result.update({"decision": regated, "reason": "re-gated against the new champion "
                                       f"{current['version']} and lost"})
                        log.info("promote: keeping %s: %s", current["version"], "; ".join(regated["reasons"]))
                        break
                    decision = {**decision, **regated, "champion_version": current["version"]}
                    continue
                # An earlier try of this run moved the pointer, then died before it could say so.
                log.info("promote: production is already at %s (moved by an earlier try of this run)", version)
                pointer, resumed = current, True
            # A swap that succeeded just now cannot be in the log yet; one an earlier try made may be.
            if not resumed or not _promotion_logged(store, model_name, run_id, version):
                append_promotion_log(store, model_name, {
                    "at": pointer["promoted_at"], "action": "promote", "version": version,
                    "from": decision.get("champion_version"), "to": version, "run_id": run_id, "actor": actor,
                    "candidate": decision["challenger"], "reasons": list(decision["reasons"]),
                })
            result.update({"promoted": True, "version": version, "uri": pointer["uri"],
                           "version_uri": pointer.get("version_uri")})
            log.info("promote: production is now %s (%s)", version, version_info["uri"])
            break
    else:
        current, _ = read_pointer(store, model_name)
        result["reason"] = "; ".join(decision["reasons"])
        result["version"] = current["version"] if current else None
        result["uri"] = current["uri"] if current else None
        _log_promotion(store, model_name, run_id, actor, result["version"], None, promoted=False,
                       reasons=list(decision["reasons"]))
        log.info("promote: production unchanged (%s): %s", result["version"], result["reason"])
    write_run_report(dataset, evaluation, result, config, store, run_id, quality=quality)
    return result


def _promotion_logged(store: ObjectStore, model_name: str, run_id: str, version: str) -> bool:
    """Whether the promotion log already records this run moving production to `version`."""
    from ml.registry.versions import promotion_history

    return any(e.get("action") == "promote" and e.get("run_id") == run_id and e.get("to") == version
               for e in promotion_history(store, model_name))


def _claim_version(store: ObjectStore, config: PipelineConfig, run_id: str,
                   challenger: str) -> tuple[str, dict[str, Any] | None]:
    """The version id this run's promotion publishes, the same for every try of the task.

    A retried or cleared `promote` (say the store died mid-upload or at the pointer swap) takes
    over what an earlier try claimed in ``runs/<run_id>/promotion.json``: a COMPLETE version is
    reused as it is (returned with its info: nothing to upload again); an unfinished one is
    deleted -- no reader takes a version without COMPLETE and `swap_pointer` refuses it -- and
    published again. Without this, every such retry would leave a stray version behind.

    Returns:
        (version, its info if it is already complete, else None).
    """
    from ml.registry.versions import is_complete, new_version_id, read_version, version_prefix

    model_name = config.storage.model_name
    key = f"{run_prefix(config, run_id)}/promotion.json"
    claim = store.get_json(key) if store.exists(key) else None
    if claim is not None:
        version = str(claim["version"])
        if is_complete(store, model_name, version):
            if claim.get("challenger") == challenger:
                info = read_version(store, model_name, version)
                log.info("promote: reusing version %s, published by an earlier try of this run", version)
                return version, {"uri": info["uri"], "sha256": info["sha256"],
                                 "metrics": info["metadata"].get("metrics", {}),
                                 "labels": info["metadata"].get("labels", [])}
        else:
            removed = store.delete_prefix(version_prefix(model_name, version))
            log.info("promote: deleted %d objects of version %s, left unfinished by an earlier try", removed, version)
            if claim.get("challenger") == challenger:
                return version, None
    version = new_version_id(datetime.now(UTC))
    store.put_json(key, {"version": version, "challenger": challenger, "claimed_at": datetime.now(UTC).isoformat()})
    return version, None


def _log_promotion(store: ObjectStore, model_name: str, run_id: str, actor: str, current: str | None,
                   challenger_version: str | None, *, promoted: bool, reasons: list[str]) -> None:
    from ml.registry.versions import append_promotion_log

    target = challenger_version if promoted else current
    append_promotion_log(store, model_name, {
        "at": datetime.now(UTC).isoformat(), "action": "promote" if promoted else "keep",
        "version": target or "none", "from": current, "to": target, "run_id": run_id, "actor": actor,
        "reasons": reasons,
    })


def _publish_version(version: str, dataset: Mapping[str, Any], evaluation: Mapping[str, Any],
                     decision: Mapping[str, Any], config: PipelineConfig, store: ObjectStore, run_id: str, *,
                     quality: Mapping[str, Any] | None) -> dict[str, Any]:
    import ml
    from ml.evaluation.model_card import render_model_card
    from ml.registry.exports import build_exports, golden_images, verify_exports
    from ml.registry.versions import publish_version

    candidate = decision["challenger"]
    cand_dir = ensure_candidate_local(store, config, run_id, candidate)
    metrics = json.loads((cand_dir / "metrics.json").read_text())
    labels = json.loads((cand_dir / "labels.json").read_text())
    summary = json.loads((cand_dir / CANDIDATE_MARKER).read_text())
    lineage = {
        "version": version, "candidate": candidate, "run_id": run_id,
        "dataset_hash": dataset["dataset_hash"], "dataset_source": dataset.get("source"),
        "parent_version": decision.get("champion_version"), "code_version": _code_version(),
        "ml_package_version": ml.__version__, "config": config.to_dict(), "train_summary": summary,
        "airflow": {k: os.environ[k] for k in ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID") if k in os.environ},
        "gate": {k: v for k, v in decision.items() if k != "expected_etag"},
        "created_at": datetime.now(UTC).isoformat(),
    }
    stage = _fresh_dir(local_run_dir(config, run_id) / "version" / version)
    _write_json(stage / "lineage.json", lineage)
    _write_json(stage / "metrics.json", metrics)
    images = {name: cand_dir / f"{name}.png" for name in ("curves", "confusion") if (cand_dir / f"{name}.png").exists()}
    card = render_model_card(model_name=config.storage.model_name, version=version, candidate=candidate,
                             metrics=_with_confusion(metrics, cand_dir, len(labels)), labels=labels,
                             dataset=dict(dataset), quality=dict(quality or {}),
                             leaderboard=list(evaluation["leaderboard"]), decision=dict(decision), lineage=lineage,
                             images=images)
    (stage / "model_card.html").write_text(card)
    files = {name: cand_dir / name for name in ("model.keras", "labels.json", "preprocessing.json")}
    from ml.data.drift import dataset_profile

    # The next run measures drift against this (see should_train).
    _write_json(stage / "dataset_profile.json", dataset_profile(dataset["dataset_dir"]))
    files.update({name: stage / name for name in ("metrics.json", "lineage.json", "model_card.html",
                                                  "dataset_profile.json")})
    # Serving exports (SavedModel, TFLite) ship only once they agree with model.keras on golden
    # test images; golden.npz goes with them so a consumer can check its own runtime the same way.
    image_size = int(json.loads((cand_dir / "preprocessing.json").read_text())["image_size"])
    golden = golden_images(dataset["dataset_dir"], image_size, cache_root(config))
    exports = build_exports(cand_dir / "model.keras", stage / "exports", golden_images=golden)
    checked = verify_exports(exports, model_path=cand_dir / "model.keras")["checked"]
    files.update(exports)
    export_info = {name: {"bytes": path.stat().st_size,
                          "max_abs_diff": checked[name]["max_abs_diff"] if name in checked else None}
                   for name, path in exports.items()}
    log.info("promote: exports verified on %d golden test images: %s", len(golden),
             ", ".join(f"{name} {meta['bytes'] / 1024:.1f} KB" for name, meta in sorted(export_info.items())))
    info = publish_version(store, config.storage.model_name, version, files,
                           {"candidate": candidate, "run_id": run_id, "metrics": _score_fields(metrics),
                            "labels": labels, "dataset_hash": dataset["dataset_hash"],
                            "exports": export_info})
    return {"uri": info.get("uri", store.uri(f"{config.storage.model_name}/versions/{version}/")),
            "sha256": info["sha256"], "metrics": _score_fields(metrics), "labels": labels}


def write_run_report(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], result: Mapping[str, Any],
                     config: PipelineConfig, store: ObjectStore | None, run_id: str, *,
                     quality: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The run report (JSON + HTML): data, quality, leaderboard, production's score, decision."""
    from ml.evaluation.report import build_run_report
    from ml.evaluation.report import write_run_report as write_report_files

    drift_file = local_run_dir(config, run_id) / "drift.json"
    if drift_file.exists():
        dataset = {**dataset, "drift": json.loads(drift_file.read_text())}
    report = build_run_report(run_id=run_id, dataset=dict(dataset), quality=dict(quality) if quality else None,
                              leaderboard=list(evaluation["leaderboard"]), production=evaluation.get("production"),
                              decision={**result.get("decision", {}), "promoted": result.get("promoted"),
                                        "version": result.get("version"), "uri": result.get("uri")},
                              config=config.to_dict())
    out_dir = local_run_dir(config, run_id) / "report"
    paths = write_report_files(report, out_dir)
    uris = {}
    if store is not None:
        for name, path in paths.items():
            key = f"{run_prefix(config, run_id)}/{Path(path).name}"
            store.put_file(key, Path(path))
            uris[name] = store.uri(key)
    return uris


# --------------------------------------------------------------------------- helpers


def ensure_candidate_local(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str) -> Path:
    """The candidate's folder on this worker, downloaded from the store when missing.

    Every key listed under the candidate's prefix is checked before anything is written: a
    crafted key (``../x``, an absolute path, a hidden name) raises UnsafeNameError.
    """
    from ml.registry.layout import check_candidate, check_relative_path

    local = local_run_dir(config, run_id) / check_candidate(candidate)
    if (local / CANDIDATE_MARKER).exists():
        return local
    if store is None:
        raise DataError(f"candidate {candidate!r} of run {run_id} is not in {local} and no store is configured")
    prefix = f"{run_prefix(config, run_id)}/{candidate}/"
    keys = store.list_keys(prefix)
    if prefix + CANDIDATE_MARKER not in keys:
        raise DataError(f"candidate {candidate!r} was not published for run {run_id} (no {prefix}{CANDIDATE_MARKER})")
    wanted = []
    for key in keys:
        rel = key[len(prefix):]
        if rel and not rel.startswith("tensorboard/"):
            wanted.append((key, check_relative_path(rel, f"file of candidate {candidate}")))
    for key, rel in wanted:
        store.download_file(key, local.joinpath(*rel.parts))
    return local


def published_candidates(config: PipelineConfig, store: ObjectStore | None, run_id: str) -> list[dict[str, Any]]:
    """Summaries of every candidate this run published (the marker object exists), by name."""
    if store is None:
        base = local_run_dir(config, run_id)
        return [json.loads(p.read_text()) for p in sorted(base.glob(f"*/{CANDIDATE_MARKER}"))]
    from ml.registry.layout import check_candidate

    prefix = f"{run_prefix(config, run_id)}/"
    keys = sorted(k for k in store.list_keys(prefix) if k.count("/") == prefix.count("/") + 1
                  and k.endswith("/" + CANDIDATE_MARKER))
    summaries = []
    for key in keys:
        summary = store.get_json(key)
        name = key[len(prefix):].split("/", 1)[0]
        if not isinstance(summary, dict) or summary.get("candidate") != check_candidate(name):
            raise DataError(f"{store.uri(key)} does not describe candidate {name!r}: refusing to evaluate it")
        summaries.append(summary)
    return summaries


def _published_summary(store: ObjectStore | None, config: PipelineConfig, run_id: str,
                       candidate: str) -> dict[str, Any] | None:
    if store is None:
        return None
    key = f"{run_prefix(config, run_id)}/{candidate}/{CANDIDATE_MARKER}"
    found = store.get_with_etag(key)
    return json.loads(found[0]) if found else None


def _publish_candidate(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str,
                       out_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    summary = dict(summary)
    summary["candidate"] = candidate
    if store is not None:
        prefix = f"{run_prefix(config, run_id)}/{candidate}"
        for path in sorted(out_dir.rglob("*")):
            if path.is_file() and path.name != CANDIDATE_MARKER:
                store.put_file(f"{prefix}/{path.relative_to(out_dir).as_posix()}", path)
        summary["uri"] = store.uri(f"{prefix}/")
        # The marker goes last: a reader that sees it sees a complete candidate.
        store.put_file(f"{prefix}/{CANDIDATE_MARKER}", out_dir / CANDIDATE_MARKER)
    return _small(summary)


def _fresh_dir(path: Path) -> Path:
    """An empty folder: leftovers of a killed attempt are removed, never trained on."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _with_confusion(metrics: Mapping[str, Any], cand_dir: Path, n_classes: int) -> Mapping[str, Any]:
    """`metrics` with the K x K confusion (for the model card), recomputed from predictions.npz when
    metrics.json left it out for having many classes."""
    if "confusion" in metrics or not (cand_dir / "predictions.npz").exists():
        return metrics
    import numpy as np

    from ml.evaluation.metrics import confusion_matrix

    with np.load(cand_dir / "predictions.npz") as preds:
        matrix = confusion_matrix(preds["y_true"], preds["probs"].argmax(axis=1), n_classes)
    return {**metrics, "confusion": matrix.tolist()}


def _score_fields(metrics: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "top5_accuracy", "log_loss", "macro_f1", "ece", "n", "latency_ms", "model_bytes")
    return {k: metrics[k] for k in keys if k in metrics}


def _cost_fields(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {"train_wall_time_s": summary.get("wall_time_s"), "peak_rss_mb": summary.get("peak_rss_mb"),
            "params": summary.get("params"), "val_accuracy": summary.get("val_accuracy"),
            "architecture": summary.get("architecture"), "weights": summary.get("weights")}


def _code_version() -> str:
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_file = head.parent / ref[5:]
            return ref_file.read_text().strip() if ref_file.exists() else ref[5:]
        return ref
    except OSError:
        return "unknown"


def _write_json(path: Path, obj: Any) -> None:
    from ml.evaluation.metrics import write_atomic

    write_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True))


def _atomic_npz(path: Path, **arrays: Any) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays and Paths to plain JSON types (NaN/inf become null)."""
    from ml.evaluation.leaderboard import to_jsonable

    return to_jsonable(obj)


def _small(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What goes to XCom: JSON types only, no big per-image lists."""
    return _jsonable({k: v for k, v in summary.items() if k not in ("items", "rows", "manifest")})


def record_failure(run_id: str, task_id: str, label: Any, error: BaseException | None) -> None:
    """Write a one-line failure summary to the log and to the run's folder (and the store if reachable).

    Called from the DAG's failure callback, so it never raises.
    """
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0] if error else "unknown error"
    line = f"task {task_id} [{label}] failed: {type(error).__name__ if error else 'Error'}: {first_line}"
    log.error("%s", line)
    try:
        from ml.registry.layout import run_segment

        config = PipelineConfig.load()
        entry = {"at": datetime.now(UTC).isoformat(), "task_id": task_id, "label": str(label), "error": line}
        _write_json(local_run_dir(config, run_id) / "failures" / f"{run_segment(f'{task_id}-{label}')}.json", entry)
        from ml.registry.store import ObjectStore

        store = ObjectStore.from_config(config.storage)
        store.put_json(f"{run_prefix(config, run_id)}/failures/{run_segment(f'{task_id}-{label}')}.json", entry)
    except Exception as exc:  # noqa: BLE001 - a callback must not mask the original failure
        log.warning("could not record the failure summary: %s", type(exc).__name__)
