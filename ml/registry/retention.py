"""Retention: remove old runs' artifacts from the store, never what production may need.

Every run leaves ``<model>/runs/<run_id>/...`` (candidates, plots, reports); they pile up. This
keeps the newest `keep_runs` runs (by their objects' last-modified time) and, whatever their age,
every run that produced a protected version. A version is protected when production points at it
or the promotion log names it (every earlier champion is a rollback target).

Versions themselves are deleted only with ``prune_versions=True``, and then only versions never
in production, older than a grace period (a promotion may be publishing one right now).
Deletion removes the marker objects first (a candidate's ``train_summary.json``, a version's
``COMPLETE``), so a reader never takes a half-deleted folder for a complete one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

RUN_MARKER = "train_summary.json"  # ml.pipeline.CANDIDATE_MARKER
DEFAULT_VERSION_GRACE = timedelta(days=1)
_MAX_HEADS_PER_RUN = 50  # when a run has no JSON at its top levels, date it by at most this many objects
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def apply_retention(store: ObjectStore, model_name: str, *, keep_runs: int, dry_run: bool = False,
                    prune_versions: bool = False, version_grace: timedelta = DEFAULT_VERSION_GRACE,
                    now: datetime | None = None) -> dict[str, Any]:
    """Delete the artifacts of runs beyond the newest `keep_runs`, keeping what production needs.

    Args:
        keep_runs: how many of the newest runs to keep (at least 1: the newest may be running).
        dry_run: report what would be removed, delete nothing.
        prune_versions: also delete versions that were never in production (nor named in the
            promotion log) and are older than `version_grace`.
        now: the current time (for tests).

    Returns:
        {"model_name", "dry_run", "keep_runs", "protected_versions",
         "runs": {"removed": [{run_id, objects, last_modified}], "kept": [{run_id, reason}]},
         "versions": {"removed": [{version, objects}], "kept": [{version, reason}]},
         "objects_removed"}; with dry_run, "removed" lists what would go.
    """
    from ml.pipeline import safe_run_id
    from ml.registry.versions import COMPLETE_MARKER, VERSION_FILE, promotion_history, read_pointer, version_prefix

    if keep_runs < 1:
        raise ConfigError(
            f"keep_runs must be at least 1 (the newest run may still be running), got {keep_runs}"
        )
    now = now or datetime.now(UTC)
    pointer, _ = read_pointer(store, model_name)
    production = pointer.get("version") if pointer else None
    protected = _protected_versions(production, promotion_history(store, model_name))
    version_keys = _group(store.list_keys(f"{model_name}/versions/"), f"{model_name}/versions/")

    # A run that produced a protected version stays: its report and leaderboard explain that version.
    protected_runs: dict[str, str] = {}
    if pointer and pointer.get("run_id"):
        protected_runs[safe_run_id(str(pointer["run_id"]))] = f"produced production version {production}"
    for version in sorted(protected):
        if version_prefix(model_name, version) + VERSION_FILE not in version_keys.get(version, ()):
            continue
        info = store.get_json(version_prefix(model_name, version) + VERSION_FILE)
        run_id = (info.get("metadata") or {}).get("run_id")
        if run_id:
            why = "production" if version == production else "in the promotion history (a rollback target)"
            protected_runs.setdefault(safe_run_id(str(run_id)), f"produced version {version}, {why}")

    runs_root = f"{model_name}/runs/"
    runs = _group(store.list_keys(runs_root), runs_root)
    ages = {run_id: _run_time(store, runs_root + run_id + "/", keys) for run_id, keys in runs.items()}
    newest_first = sorted(runs, key=lambda r: (ages[r], r), reverse=True)
    result_runs: dict[str, list[dict[str, Any]]] = {"removed": [], "kept": []}
    removed_objects = 0
    for rank, run_id in enumerate(newest_first):
        if rank < keep_runs:
            result_runs["kept"].append({"run_id": run_id, "reason": f"among the newest {keep_runs} runs"})
            continue
        if run_id in protected_runs:
            result_runs["kept"].append({"run_id": run_id, "reason": protected_runs[run_id]})
            continue
        keys = runs[run_id]
        if not dry_run:
            _delete_folder(store, runs_root + run_id + "/", [k for k in keys if k.endswith("/" + RUN_MARKER)])
        removed_objects += len(keys)
        result_runs["removed"].append({"run_id": run_id, "objects": len(keys),
                                       "last_modified": ages[run_id].isoformat()})

    result_versions: dict[str, list[dict[str, Any]]] = {"removed": [], "kept": []}
    for version in sorted(version_keys):
        reason = _keep_version_reason(version, production, protected, prune_versions, version_grace, now,
                                      store, version_keys[version])
        if reason is None and not dry_run:
            current, _ = read_pointer(store, model_name)  # re-read: a rollback may have just chosen it
            if current and current.get("version") == version:
                reason = "production (pointed at while retention ran)"
        if reason is not None:
            result_versions["kept"].append({"version": version, "reason": reason})
            continue
        keys = version_keys[version]
        if not dry_run:
            markers = [k for k in keys if k.endswith("/" + COMPLETE_MARKER)]
            _delete_folder(store, version_prefix(model_name, version), markers)
        removed_objects += len(keys)
        result_versions["removed"].append({"version": version, "objects": len(keys)})

    log.info("retention of %s%s: %d runs removed, %d kept; %d versions removed, %d kept; %d objects %s",
             model_name, " (dry run)" if dry_run else "", len(result_runs["removed"]),
             len(result_runs["kept"]),
             len(result_versions["removed"]), len(result_versions["kept"]), removed_objects,
             "would be removed" if dry_run else "removed")
    return {"model_name": model_name, "dry_run": dry_run, "keep_runs": keep_runs,
            "protected_versions": sorted(protected), "runs": result_runs, "versions": result_versions,
            "objects_removed": removed_objects}


def _protected_versions(production: str | None, history: list[dict[str, Any]]) -> set[str]:
    """Production plus every version the promotion log names (champions past and present)."""
    protected = {production} if production else set()
    for entry in history:
        for field in ("version", "from", "to"):
            value = entry.get(field)
            if isinstance(value, str) and value and value != "none":
                protected.add(value)
    return protected


def _group(keys: list[str], root: str) -> dict[str, list[str]]:
    """Keys under `root` by their first path segment (keys directly under `root` are ignored)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        head, sep, _ = key[len(root):].partition("/")
        if head and sep:
            groups.setdefault(head, []).append(key)
    return groups


def _run_time(store: ObjectStore, prefix: str, keys: list[str]) -> datetime:
    """When a run last wrote: the newest of its reports and candidate markers (JSON at depth <= 2)."""
    dated = [k for k in keys if k.endswith(".json") and k[len(prefix):].count("/") <= 1]
    times = []
    for key in dated or keys[:_MAX_HEADS_PER_RUN]:
        head = store.head(key)
        if head is not None and head.get("last_modified") is not None:
            times.append(head["last_modified"])
    return max(times) if times else _EPOCH


def _version_time(version: str, store: ObjectStore, keys: list[str]) -> datetime | None:
    try:  # ids look like 20261123T170501Z-3fa2c1 (ml.registry.versions.new_version_id)
        return datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        pass
    times = [h["last_modified"] for h in (store.head(k) for k in keys[:_MAX_HEADS_PER_RUN])
             if h is not None and h.get("last_modified") is not None]
    return max(times) if times else None


def _keep_version_reason(version: str, production: str | None, protected: set[str], prune: bool,
                         grace: timedelta, now: datetime, store: ObjectStore, keys: list[str]) -> str | None:
    """Why a version stays, or None when it may be deleted."""
    if version == production:
        return "production"
    if version in protected:
        return "in the promotion history (a rollback target)"
    if not prune:
        return "versions are kept unless prune_versions is set"
    published = _version_time(version, store, keys)
    if published is None:
        return "its publish time is unknown"
    if now - published < grace:
        return f"published less than {grace} ago (a promotion may be in flight)"
    return None


def _delete_folder(store: ObjectStore, prefix: str, markers: list[str]) -> None:
    for key in markers:  # markers first: a half-deleted folder must not look complete
        store.delete(key)
    store.delete_prefix(prefix)
