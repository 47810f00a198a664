"""The pipeline's stages as plain functions: the DAG's tasks and the CLI call these.

Each stage takes a `PipelineConfig`, an `ObjectStore` and small JSON-able values, does one step
by calling the module that owns it, publishes what it made under the run's prefix in the store,
and returns a small JSON-able dict for XCom. Every stage is idempotent for the same inputs: a
retried task finds what its previous attempt published and reuses it.

    ingest -> validate -> should_train -> prepare -> train / finetune -> (ensemble) evaluate -> gate -> promote

Where the pieces live: store keys `ml.registry.layout`, run artifacts `ml.registry.runs`,
scoring `ml.evaluation.scoring`, version packaging `ml.registry.packaging`, the promotion
protocol `ml.registry.promotion`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import PipelineConfig
from ml.data.snapshot import DatasetRef, local_dataset, publish_snapshot
from ml.errors import DataError
from ml.io import fresh_dir, read_json, to_jsonable, write_json
from ml.registry import layout
from ml.registry.runs import (
    cache_root,
    ensure_candidate_local,
    local_run_dir,
    publish_candidate,
    published_summary,
    read_run_json,
    run_key,
    small,
    unpublish_candidate,
    upload_run_files,
    write_run_json,
)

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


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
    if store is None:  # one process, no store: later stages find the folder by its path
        return small(summary)
    # Workers share nothing but the store: later tasks materialise the dataset by its hash.
    snapshot = publish_snapshot(store, config.storage.model_name, Path(summary["dataset_dir"]))
    return small({**{k: v for k, v in summary.items() if k != "dataset_dir"}, "dataset_uri": snapshot["uri"]})


def validate_stage(dataset: DatasetRef, config: PipelineConfig, store: ObjectStore | None,
                   run_id: str) -> dict[str, Any]:
    """Run the data-quality suite; publish its JSON/HTML beside the run; raise on failures."""
    from ml.data.quality import validate_dataset

    out_dir = local_run_dir(config, run_id) / layout.QUALITY_DIR
    report = validate_dataset(local_dataset(config, store, dataset), config.data, out_dir=out_dir)
    uris = upload_run_files(store, config, run_id, sorted(out_dir.glob("*")), folder=layout.QUALITY_DIR)
    for line in report.summary().splitlines():
        log.info("quality: %s", line)
    result = {"success": report.success, "failures": list(report.failures),
              "warnings": list(report.warnings), "uris": uris}
    if report.statistics.get("label_conflicts"):
        result["label_conflicts"] = report.statistics["label_conflicts"]
    write_json(out_dir / "summary.json", result)
    report.raise_for_failures()
    return result


def report_drift(dataset: Mapping[str, Any], pointer: Mapping[str, Any], config: PipelineConfig,
                 store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """Compare this dataset with production's (its version's dataset_profile.json); publish drift.json."""
    from ml.data.drift import compare_profiles, dataset_profile
    from ml.errors import StorageError

    try:
        reference = store.get_json(layout.version_key(config.storage.model_name, pointer["version"],
                                                      "dataset_profile.json"))
    except StorageError:
        log.info("drift: production version %s has no dataset profile to compare with", pointer["version"])
        return None
    drift = compare_profiles(dataset_profile(local_dataset(config, store, dataset)), reference)
    for finding in drift["findings"] or ["no notable change from production's dataset"]:
        log.info("drift: %s", finding)
    write_json(local_run_dir(config, run_id) / layout.DRIFT_FILE, drift)
    store.put_json(run_key(config, run_id, layout.DRIFT_FILE), drift)
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


# --------------------------------------------------------------------------- training


def prepare_stage(dataset: DatasetRef, config: PipelineConfig, store: ObjectStore | None = None) -> dict[str, Any]:
    """Build this worker's decoded-image cache (a training task on another worker rebuilds its own)."""
    import pandas as pd

    from ml.data.image_cache import build_image_cache
    from ml.data.splits import split_counts

    dataset_dir = local_dataset(config, store, dataset)
    manifest = pd.read_parquet(dataset_dir / "manifest.parquet")
    started = time.perf_counter()
    cache = build_image_cache(dataset_dir, config.train.image_size, cache_root(config))
    counts = split_counts(manifest)
    log.info("prepare: splits %s; image cache %s at %d px ready in %.1f s", counts.get("total", counts),
             getattr(cache, "path", "?"), config.train.image_size, time.perf_counter() - started)
    return {"splits": to_jsonable(counts), "image_size": config.train.image_size}


def train_stage(dataset: DatasetRef, candidate: str, config: PipelineConfig, store: ObjectStore | None,
                run_id: str) -> dict[str, Any]:
    """Train one candidate and publish its folder; reuse a previous attempt's published result."""
    from ml.training.fit import train_candidate

    layout.check_candidate(candidate)  # before any folder named after it is touched
    checkpoints = _checkpoints(store, config, run_id, candidate)
    published = published_summary(store, config, run_id, candidate)
    if published is not None:
        log.info("train %s: already published by an earlier attempt, reusing it", candidate)
        _drop_checkpoints(checkpoints, candidate)  # an attempt killed between its publish and the cleanup
        return published
    dataset_dir = local_dataset(config, store, dataset)
    out_dir = fresh_dir(local_run_dir(config, run_id) / candidate)
    summary = train_candidate(dataset_dir, candidate, out_dir, config.train, cache_root=cache_root(config),
                              store=store, checkpoints=checkpoints)
    return _published(store, config, run_id, candidate, out_dir, summary, checkpoints)


def _checkpoints(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str) -> Any:
    """Where a candidate's per-epoch training state goes: the run's prefix in the store (any worker resumes)."""
    if store is None:
        return None
    from ml.training.checkpoints import CheckpointStore

    return CheckpointStore.for_candidate(store, config.storage.model_name, run_id, candidate)


def _published(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str, out_dir: Path,
               summary: Mapping[str, Any], checkpoints: Any) -> dict[str, Any]:
    """Publish the candidate, then delete its checkpoints: a retry now reuses the published folder."""
    result = publish_candidate(store, config, run_id, candidate, out_dir, summary)
    _drop_checkpoints(checkpoints, candidate)
    return result


def _drop_checkpoints(checkpoints: Any, candidate: str) -> None:
    if checkpoints is not None and (removed := checkpoints.delete()):
        log.info("train %s: published; %d checkpoint objects deleted from %s", candidate, removed, checkpoints.uri)


def select_for_finetuning(results: Sequence[Mapping[str, Any]], config: PipelineConfig) -> list[str]:
    """The top-k transfer candidates by validation accuracy (k = train.finetune_top_k)."""
    transfer = [r for r in results if r and str(r.get("candidate", "")).startswith("transfer_")]
    transfer.sort(key=lambda r: (-float(r.get("val_accuracy") or 0.0), r["candidate"]))
    chosen = [r["candidate"] for r in transfer[: config.train.finetune_top_k]]
    log.info("fine-tuning: %s", ", ".join(chosen) if chosen else "no transfer candidate to fine-tune")
    return chosen


def finetune_stage(dataset: DatasetRef, transfer_candidate: str, config: PipelineConfig,
                   store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Fine-tune a trained transfer candidate (unfreeze from its boundary layer) and publish it."""
    from ml.training.finetune import finetune_candidate

    layout.check_candidate(transfer_candidate)
    candidate = layout.check_candidate("finetune_" + transfer_candidate.removeprefix("transfer_"))
    published = published_summary(store, config, run_id, candidate)
    if published is not None:
        log.info("finetune %s: already published by an earlier attempt, reusing it", candidate)
        _drop_checkpoints(_checkpoints(store, config, run_id, candidate), candidate)
        return published
    dataset_dir = local_dataset(config, store, dataset)
    transfer_dir = ensure_candidate_local(store, config, run_id, transfer_candidate)
    out_dir = fresh_dir(local_run_dir(config, run_id) / candidate)
    checkpoints = _checkpoints(store, config, run_id, candidate)
    summary = finetune_candidate(dataset_dir, transfer_dir, out_dir, config.train, cache_root=cache_root(config),
                                 checkpoints=checkpoints)
    return _published(store, config, run_id, candidate, out_dir, summary, checkpoints)


def ensemble_stage(dataset: DatasetRef, config: PipelineConfig, store: ObjectStore | None,
                   run_id: str) -> list[dict[str, Any]]:
    """Build and publish every ``ensemble_top<k>`` of train.candidates from the run's published candidates."""
    from ml.models.registry import is_ensemble
    from ml.registry.runs import published_candidates
    from ml.training.ensemble import build_ensemble_candidate, score_members

    results, pending = [], []
    for name in config.train.ensembles:
        published = published_summary(store, config, run_id, layout.check_candidate(name))
        if published is None:
            pending.append(name)
        else:
            log.info("ensemble %s: already published by an earlier attempt, reusing it", name)
            results.append(published)
    if not pending:
        return results
    from ml.training.search import is_eliminated

    # Search trials that stopped before the last rung are not members: the search ranked them out on validation.
    members = [s["candidate"] for s in published_candidates(config, store, run_id)
               if not is_ensemble(s["candidate"]) and not is_eliminated(s)]
    folders = {name: ensure_candidate_local(store, config, run_id, name) for name in members}
    dataset_dir = local_dataset(config, store, dataset)
    scored = score_members(dataset_dir, folders, cache_root=cache_root(config))
    for name in pending:
        out_dir = fresh_dir(local_run_dir(config, run_id) / name)
        summary = build_ensemble_candidate(dataset_dir, name, scored, out_dir, config.train, metric=config.gate.metric)
        results.append(publish_candidate(store, config, run_id, name, out_dir, summary))
    return results


# --------------------------------------------------------------------------- hyperparameter search


def search_plan_stage(config: PipelineConfig) -> list[str]:
    """The search's trial names (none when ``search.enabled`` is false); logs the plan once."""
    from ml.training.search import plan_search

    plan = plan_search(config.search)
    if plan.note:
        log.warning("search: %s", plan.note)
    if plan.trials:
        log.info("search: %d trials, rungs to %s epochs, eta %d, survivors by %s; %d epochs in all:\n%s",
                 len(plan.trials), list(plan.rung_epochs), plan.eta, plan.metric, plan.cost,
                 "\n".join(f"  {t.name}: {t.describe()}" for t in plan.trials))
    return [t.name for t in plan.trials]


def search_trial_stage(dataset: DatasetRef, trial_name: str, rung: int, config: PipelineConfig,
                       store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Train one trial to its rung's epochs, resuming from its previous rung's checkpoint; publish it.

    The trial's candidate folder holds its latest rung (its summary's ``search.rung`` says which);
    ``search/rung-<r>/<trial>.json`` is written after it, so a retried task that finds it reuses it.
    The checkpoints stay for the next rung; after the last rung they are deleted (after the record).
    """
    from ml.training.fit import SUMMARY_FILE, train_candidate
    from ml.training.search import plan_search, search_info, trial_train_config

    plan = plan_search(config.search)
    trial = plan.trial(trial_name)
    if not 1 <= rung <= plan.rungs:
        raise DataError(f"search rung {rung} of {trial.name}: this search has rungs 1 to {plan.rungs}")
    parts = layout.search_rung_parts(rung, trial.name)
    record = read_run_json(store, config, run_id, parts)
    if record is not None:
        log.info("search rung %d %s: already published by an earlier attempt, reusing it", rung, trial.name)
        return record
    epochs = plan.rung_epochs[rung - 1]
    checkpoints = _checkpoints(store, config, run_id, trial.name)
    if rung > 1:
        unpublish_candidate(store, config, run_id, trial.name)
    dataset_dir = local_dataset(config, store, dataset)
    out_dir = fresh_dir(local_run_dir(config, run_id) / trial.name)
    summary = train_candidate(dataset_dir, trial.name, out_dir, trial_train_config(config.train, trial, epochs),
                              cache_root=cache_root(config), store=store, checkpoints=checkpoints)
    summary = {**summary, "search": search_info(trial, rung, plan)}
    write_json(out_dir / SUMMARY_FILE, summary)  # the marker carries the rung too
    publish_candidate(store, config, run_id, trial.name, out_dir, summary)
    record = to_jsonable({"trial": trial.name, "base": trial.base, "params": dict(trial.params), "rung": rung,
                          "epochs": epochs, "epochs_run": summary.get("epochs_run"),
                          "val_accuracy": summary.get("val_accuracy"), "val_loss": summary.get("val_loss")})
    write_run_json(store, config, run_id, parts, record)
    if rung == plan.rungs:  # after the record: a retry killed before it still resumes instead of starting over
        _drop_checkpoints(checkpoints, trial.name)
    log.info("search rung %d/%d %s (%s): %s epochs run of %d (%d resumed), val_accuracy %s, val_loss %s", rung,
             plan.rungs, trial.name, trial.describe(), record["epochs_run"], epochs, summary.get("resumed_epochs") or 0,
             _fmt(record["val_accuracy"]), _fmt(record["val_loss"]))
    return record


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def search_survivors_stage(rung: int, config: PipelineConfig, store: ObjectStore | None, run_id: str) -> list[str]:
    """The trials that go on after `rung`: the top 1/eta of its published results ([] after the last rung).

    Reads every entrant's ``search/rung-<r>/<trial>.json`` (not XCom: a cleared or retried rung task is read as
    published), writes ``search/survivors-<r>.json`` and deletes the eliminated trials' checkpoints.
    """
    from ml.training.search import plan_search, rank_results, select_survivors

    plan = plan_search(config.search)
    if rung >= plan.rungs or not plan.trials:
        return []
    entrants = _search_entrants(rung, plan, config, store, run_id)
    results = []
    for name in entrants:
        record = read_run_json(store, config, run_id, layout.search_rung_parts(rung, name))
        if record is None:
            where = "/".join(layout.search_rung_parts(rung, name))
            raise DataError(f"search rung {rung}: {name} published no result ({where}); clear its rung task")
        results.append(record)
    survivors = select_survivors(results, plan.metric, plan.eta)
    ranked = rank_results(results, plan.metric)
    for record in ranked:
        log.info("search rung %d: %-24s %s=%s %s", rung, record["trial"], plan.metric, _fmt(record.get(plan.metric)),
                 f"-> rung {rung + 1}" if record["trial"] in survivors else "eliminated")
    for name in entrants:
        if name not in survivors:
            _drop_checkpoints(_checkpoints(store, config, run_id, name), name)
    write_run_json(store, config, run_id, layout.search_survivors_parts(rung),
                   {"rung": rung, "metric": plan.metric, "eta": plan.eta, "survivors": survivors,
                    "ranked": [r["trial"] for r in ranked]})
    return survivors


def _search_entrants(rung: int, plan: Any, config: PipelineConfig, store: ObjectStore | None,
                     run_id: str) -> list[str]:
    if rung == 1:
        return [t.name for t in plan.trials]
    previous = read_run_json(store, config, run_id, layout.search_survivors_parts(rung - 1))
    if previous is None:
        raise DataError(f"search rung {rung}: no survivors of rung {rung - 1} were published")
    return [plan.trial(name).name for name in previous["survivors"]]


def search_stage(dataset: DatasetRef, config: PipelineConfig, store: ObjectStore | None,
                 run_id: str) -> list[dict[str, Any]]:
    """The whole search in this process (the CLI; the DAG maps each rung): the trials' published summaries."""
    from ml.models.registry import trial_base
    from ml.registry.runs import published_candidates

    names = search_plan_stage(config)
    if not names:
        return []
    for rung in range(1, config.search.rungs + 1):
        for name in names:
            search_trial_stage(dataset, name, rung, config, store, run_id)
        names = search_survivors_stage(rung, config, store, run_id)
        if not names:
            break
    return [s for s in published_candidates(config, store, run_id) if trial_base(s["candidate"]) is not None]


# --------------------------------------------------------------------------- evaluation


def evaluate_stage(dataset: DatasetRef, results: Sequence[Mapping[str, Any] | None], config: PipelineConfig,
                   store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Build the configured ensembles (`ensemble_stage`), score every candidate and the production model on
    the test split; publish the leaderboard."""
    from ml.evaluation.leaderboard import (
        apply_budgets,
        best_candidate,
        build_leaderboard,
        format_leaderboard_table,
        mark_eliminated,
        write_leaderboard,
    )
    from ml.evaluation.scoring import cost_fields, evaluate_candidate, score_fields

    # Ensembles need every member published, which is the case once training and fine-tuning are done.
    by_name = {r["candidate"]: r for r in filter(None, results)}
    by_name.update({r["candidate"]: r for r in ensemble_stage(dataset, config, store, run_id)})
    dataset_dir = local_dataset(config, store, dataset)
    entries = []
    for result in by_name.values():
        metrics = evaluate_candidate(dataset_dir, result["candidate"], config, store, run_id)
        entries.append({**cost_fields(result), **score_fields(metrics), "candidate": result["candidate"],
                        "status": "ok"})
    if not entries:
        raise DataError("no candidate finished training: nothing to evaluate")
    production = evaluate_production(dataset_dir, config, store, run_id)
    rows = mark_eliminated(build_leaderboard(entries, metric=config.gate.metric))
    rows = apply_budgets(rows, max_model_mb=config.gate.max_model_mb, max_latency_ms=config.gate.max_latency_ms)
    best = best_candidate(rows)
    if best is None:
        raise DataError("every candidate is over the size/latency budget (gate.max_model_mb, gate.max_latency_ms): "
                        + "; ".join(f"{r['candidate']}: {', '.join(r.get('budget_reasons', []))}" for r in rows))
    paths = write_leaderboard(rows, local_run_dir(config, run_id) / layout.LEADERBOARD_DIR, production=production)
    by_file = upload_run_files(store, config, run_id, [Path(p) for p in paths.values()], folder=layout.LEADERBOARD_DIR)
    uris = {name: by_file[Path(path).name] for name, path in paths.items() if Path(path).name in by_file}
    log.info("leaderboard on the test split (%d images):\n%s", rows[0].get("n", 0),
             format_leaderboard_table(rows, production=production))
    return {"leaderboard": to_jsonable(rows), "best": best["candidate"], "production": to_jsonable(production),
            "uris": uris}


def evaluate_production(dataset_dir: Path, config: PipelineConfig, store: ObjectStore | None,
                        run_id: str) -> dict[str, Any] | None:
    """Score the current production model on this run's test split (same images as challengers)."""
    if store is None:
        return None
    from ml.evaluation.scoring import evaluate_version
    from ml.registry.versions import read_pointer

    pointer, _etag = read_pointer(store, config.storage.model_name)
    if pointer is None:
        log.info("no production model yet: the first challenger only has to beat chance")
        return None
    return evaluate_version(dataset_dir, pointer["version"], config, store, run_id)


# --------------------------------------------------------------------------- gate and promotion


def gate_stage(dataset: DatasetRef, evaluation: Mapping[str, Any], config: PipelineConfig,
               store: ObjectStore | None, run_id: str) -> dict[str, Any]:
    """Compare the best challenger with production on the same test images; explain the decision."""
    from ml.registry.versions import read_pointer

    if store is None:
        raise DataError("the gate needs the object store (the production pointer lives there)")
    pointer, etag = read_pointer(store, config.storage.model_name)
    decision = decide(local_dataset(config, store, dataset), evaluation["best"], pointer, config, store, run_id)
    decision.update({"champion_version": pointer["version"] if pointer else None, "expected_etag": etag})
    log.info("gate: %s %s", "PROMOTE" if decision["promote"] else "KEEP PRODUCTION", evaluation["best"])
    for reason in decision["reasons"]:
        log.info("gate:   - %s", reason)
    write_json(local_run_dir(config, run_id) / layout.GATE_FILE, decision)
    store.put_json(run_key(config, run_id, layout.GATE_FILE), decision)
    return decision


def decide(dataset_dir: Path, challenger_name: str, pointer: Mapping[str, Any] | None, config: PipelineConfig,
           store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The gate's decision for a challenger against the champion `pointer` names (None: no champion)."""
    import numpy as np

    from ml.evaluation.scoring import evaluate_version, production_dir
    from ml.registry.gate import CandidateEval
    from ml.registry.gate import decide as gate_decide

    labels = read_json(dataset_dir / "dataset.json")["labels"]
    cand_dir = ensure_candidate_local(store, config, run_id, challenger_name)
    preds = np.load(cand_dir / "predictions.npz")
    metrics = read_json(cand_dir / "metrics.json")
    challenger = CandidateEval(name=challenger_name, y_pred=preds["probs"].argmax(axis=1), metrics=metrics,
                               labels=list(labels))
    champion = None
    if pointer is not None:
        champ_metrics = evaluate_version(dataset_dir, pointer["version"], config, store, run_id)
        champ_preds = np.load(production_dir(config, run_id, pointer["version"]) / "predictions.npz")
        champion = CandidateEval(name=f"production:{pointer['version']}", y_pred=champ_preds["probs"].argmax(axis=1),
                                 metrics=champ_metrics, labels=list(champ_metrics.get("labels", labels)))
    decision = gate_decide(y_true=preds["y_true"], challenger=challenger, champion=champion, labels=list(labels),
                           config=config.gate)
    return {**decision.to_dict(), "challenger": challenger_name}


def approval_stage(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], decision: Mapping[str, Any],
                   config: PipelineConfig, store: ObjectStore | None, run_id: str, *,
                   registry_url: str | None = None, quality: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The human-approval request for this run's promotion, or {} when nobody needs to be asked.

    Asked only when approval is on (`gate.require_approval`) and the gate says promote. The run
    report is published first, marked as awaiting approval, so the request can link to it.

    Returns:
        {} or {"subject", "body" (Markdown, data neutralised), "timeout_hours", "assigned_users"}.
    """
    from ml.registry.approval import approval_required, assigned_users, request_body, request_subject

    if not approval_required(decision, config):
        log.info("approval: not asked (%s)", "gate.require_approval is off" if not config.gate.require_approval
                 else "the gate keeps production")
        return {}
    pending = {"promoted": False, "awaiting_approval": True,
               "decision": {**decision, "reasons": [*decision.get("reasons", []),
                                                    "awaiting human approval (Airflow: Required Actions)"]}}
    uris = write_run_report(dataset, evaluation, pending, config, store, run_id, quality=quality)
    report_url = None
    if registry_url:
        report_url = f"{registry_url.rstrip('/')}/runs/{layout.run_segment(run_id)}"
    hours = config.gate.approval_timeout_hours
    body = request_body(decision, evaluation, run_id=run_id, timeout_hours=hours, report_uri=uris.get("html"),
                        report_url=report_url, approvers=config.gate.approvers)
    log.info("approval: asking %s to approve %s (answer within %g h)",
             ", ".join(config.gate.approvers) or "any user with access", decision.get("challenger"), hours)
    return {"subject": request_subject(decision), "body": body, "timeout_hours": hours,
            "assigned_users": assigned_users(config)}


def promote_stage(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], decision: Mapping[str, Any],
                  config: PipelineConfig, store: ObjectStore, run_id: str, *,
                  actor: str = "cli", quality: Mapping[str, Any] | None = None,
                  approval: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Publish the winner as an immutable version and move the pointer with a conditional write.

    If another promotion moved the pointer since the gate read it, re-gate against the new
    champion (on this run's test split) once and either promote properly or stop with the reason.
    With human approval on, `approval` is the reviewer's answer (the HITL task's result; None: no
    one was asked) and `ml.registry.approval.apply_approval` decides first: no approval, no move.
    """
    from ml.registry.approval import apply_approval, approval_summary, stale_approval
    from ml.registry.packaging import publish_challenger
    from ml.registry.promotion import claim_version, keep_production, move_pointer

    model_name = config.storage.model_name
    decision = apply_approval(decision, approval, config)
    if decision.get("approval"):
        log.info("promote: human approval: %s", approval_summary(decision["approval"]))
    if decision["promote"]:
        version, published = claim_version(store, model_name, run_id, decision["challenger"])
        dataset_dir = local_dataset(config, store, dataset)
        if published is None:
            publish_challenger(version, dataset, dataset_dir, evaluation, decision, config, store, run_id,
                               quality=quality)

        def regate(current: Mapping[str, Any]) -> dict[str, Any]:
            return stale_approval(decision, current) or decide(dataset_dir, decision["challenger"], current,
                                                               config, store, run_id)

        result = move_pointer(store, model_name, version, decision, run_id, actor=actor, regate=regate)
    else:
        result = keep_production(store, model_name, decision, run_id, actor=actor)
    result["run_id"] = run_id
    write_run_report(dataset, evaluation, result, config, store, run_id, quality=quality)
    return result


def write_run_report(dataset: Mapping[str, Any], evaluation: Mapping[str, Any], result: Mapping[str, Any],
                     config: PipelineConfig, store: ObjectStore | None, run_id: str, *,
                     quality: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The run report (JSON + HTML): data, quality, drift, leaderboard, production's score, decision."""
    from ml.evaluation.report import build_run_report
    from ml.evaluation.report import write_run_report as write_report_files

    drift = _run_json(config, store, run_id, layout.DRIFT_FILE)
    if drift is not None:
        dataset = {**dataset, "drift": drift}
    report = build_run_report(run_id=run_id, dataset=dict(dataset), quality=dict(quality) if quality else None,
                              leaderboard=list(evaluation["leaderboard"]), production=evaluation.get("production"),
                              decision={**result.get("decision", {}), "promoted": result.get("promoted"),
                                        "version": result.get("version"), "uri": result.get("uri"),
                                        **({"awaiting_approval": True} if result.get("awaiting_approval") else {})},
                              config=config.to_dict(),
                              confusions=_confusions(config, store, run_id, evaluation.get("best")))
    paths = write_report_files(report, local_run_dir(config, run_id) / "report")
    by_file = upload_run_files(store, config, run_id, [Path(p) for p in paths.values()])
    return {name: by_file[Path(path).name] for name, path in paths.items() if Path(path).name in by_file}


def _confusions(config: PipelineConfig, store: ObjectStore | None, run_id: str,
                candidate: str | None) -> dict[str, Any] | None:
    """The best candidate's confused pairs and per-class scores, from its metrics.json."""
    if not candidate:
        return None
    local = local_run_dir(config, run_id) / layout.check_candidate(candidate) / layout.METRICS_FILE
    if local.exists():
        metrics = read_json(local)
    elif store is not None:
        found = store.get_with_etag(layout.candidate_key(config.storage.model_name, run_id, candidate,
                                                         layout.METRICS_FILE))
        metrics = json.loads(found[0]) if found else None
    else:
        metrics = None
    if not isinstance(metrics, dict):
        return None
    return {"candidate": candidate, "confused_pairs": metrics.get("confused_pairs"),
            "per_class": metrics.get("per_class")}


def _run_json(config: PipelineConfig, store: ObjectStore | None, run_id: str, name: str) -> Any:
    """A run-level JSON file: this worker's copy, else the store's (another worker may have written it)."""
    local = local_run_dir(config, run_id) / name
    if local.exists():
        return read_json(local)
    if store is None:
        return None
    found = store.get_with_etag(run_key(config, run_id, name))
    return json.loads(found[0]) if found else None
