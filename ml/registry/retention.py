"""Retention: remove old runs' artifacts from the store, never what production may need.

Every run leaves ``<model>/runs/<run>/...`` (candidates, plots, reports); they pile up. This keeps
the newest `keep_runs` runs (by their objects' last-modified time) and, whatever their age, every
run that produced a protected version. A version is protected when production points at it, the
promotion log names it (every earlier champion is a rollback target), or a run's
``promotion.json`` claims it (a promotion that may still be publishing it, or be cleared and
resume later with the same id).

Versions themselves are deleted only with ``prune_versions=True``, and then only unprotected
versions whose objects were all written longer than a grace period ago -- by the objects' own
times, not the version id's: a promote cleared a day after its claim resumes under the old id.

Racing a rollback or a promotion: a version is deleted in three steps -- its ``COMPLETE`` marker
first (from then on `swap_pointer` and every reader refuse it), then production and the log are
read *again*, and only then the rest. If a rollback or a promotion moved the pointer onto it in
between, the marker is put back and the version kept; `swap_pointer` checks the marker once more
after it wrote the pointer and restores the previous pointer if the marker went missing. Either
way the pointer never ends on a deleted version. Candidate folders lose their
``train_summary.json`` marker first too, so a reader never takes a half-deleted folder for a
complete one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError, UnsafeNameError
from ml.registry import layout

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

RUN_MARKER = layout.CANDIDATE_MARKER
CLAIM_FILE = layout.CLAIM_FILE
DEFAULT_VERSION_GRACE = timedelta(days=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class _Protected:
    """What must survive, as read from the store at one moment."""

    production: str | None
    production_run: str | None  # the run segment behind production
    logged: set[str] = field(default_factory=set)  # versions the promotion log names
    claimed: dict[str, str] = field(default_factory=dict)  # version -> run segment whose claim names it

    def reason(self, version: str) -> str | None:
        if version == self.production:
            return "production"
        if version in self.logged:
            return "in the promotion history (a rollback target)"
        if version in self.claimed:
            return f"claimed by run {self.claimed[version]}'s promotion (it may be publishing or resume)"
        return None


def apply_retention(store: ObjectStore, model_name: str, *, keep_runs: int, dry_run: bool = False,
                    prune_versions: bool = False, version_grace: timedelta = DEFAULT_VERSION_GRACE,
                    now: datetime | None = None) -> dict[str, Any]:
    """Delete the artifacts of runs beyond the newest `keep_runs`, keeping what production needs.

    Args:
        keep_runs: how many of the newest runs to keep (at least 1: the newest may be running).
        dry_run: report what would be removed, delete nothing.
        prune_versions: also delete versions that were never in production (nor named in the
            promotion log or a run's claim) whose objects are all older than `version_grace`.
        now: the current time (for tests).

    Returns:
        {"model_name", "dry_run", "keep_runs", "protected_versions",
         "runs": {"removed": [{run_id, objects, last_modified}], "kept": [{run_id, reason}]},
         "versions": {"removed": [{version, objects}], "kept": [{version, reason}]},
         "objects_removed"}; with dry_run, "removed" lists what would go.
    """
    if keep_runs < 1:
        raise ConfigError(
            f"keep_runs must be at least 1 (the newest run may still be running), got {keep_runs}"
        )
    now = now or datetime.now(UTC)
    runs_root = layout.runs_root(model_name)
    run_objects = _group(list(store.iter_objects(runs_root)), runs_root)
    version_root = layout.versions_root(model_name)
    version_objects = _group(list(store.iter_objects(version_root)), version_root)
    protected = _read_protection(store, model_name, run_objects)
    protected_runs = _protected_runs(store, model_name, protected, version_objects)

    ages = {run: _newest(objects) for run, objects in run_objects.items()}
    newest_first = sorted(run_objects, key=lambda r: (ages[r], r), reverse=True)
    result_runs: dict[str, list[dict[str, Any]]] = {"removed": [], "kept": []}
    removed_objects = 0
    for rank, run in enumerate(newest_first):
        if rank < keep_runs:
            result_runs["kept"].append({"run_id": run, "reason": f"among the newest {keep_runs} runs"})
            continue
        reason = protected_runs.get(run)
        if reason is None and not dry_run:
            # Re-read right before deleting: a rollback may have just made this run's version production.
            fresh = _read_protection(store, model_name, {}, full_log=False)
            if fresh.production_run == run:
                reason = f"produced production version {fresh.production} (pointed at while retention ran)"
        if reason is not None:
            result_runs["kept"].append({"run_id": run, "reason": reason})
            continue
        keys = [o["key"] for o in run_objects[run]]
        if not dry_run:
            markers = [k for k in keys if k.endswith("/" + RUN_MARKER)]
            _delete_folder(store, layout.folder_prefix(runs_root, run), markers)
        removed_objects += len(keys)
        result_runs["removed"].append({"run_id": run, "objects": len(keys),
                                       "last_modified": ages[run].isoformat()})

    result_versions: dict[str, list[dict[str, Any]]] = {"removed": [], "kept": []}
    for version in sorted(version_objects):
        objects = version_objects[version]
        if not layout.is_name(version):  # not a folder the pipeline writes: left for a human to look at
            result_versions["kept"].append({"version": version[:80], "reason": "not a valid version id"})
            continue
        reason = _keep_version_reason(version, protected, prune_versions, version_grace, now, objects)
        if reason is None and not dry_run:
            # Claims of the runs deleted above are gone now: read everything again before each delete.
            reason = _delete_version(store, model_name, version, objects)
        if reason is not None:
            result_versions["kept"].append({"version": version, "reason": reason})
            continue
        removed_objects += len(objects)
        result_versions["removed"].append({"version": version, "objects": len(objects)})

    log.info("retention of %s%s: %d runs removed, %d kept; %d versions removed, %d kept; %d objects %s",
             model_name, " (dry run)" if dry_run else "", len(result_runs["removed"]),
             len(result_runs["kept"]),
             len(result_versions["removed"]), len(result_versions["kept"]), removed_objects,
             "would be removed" if dry_run else "removed")
    all_protected = {protected.production} | protected.logged | set(protected.claimed)
    return {"model_name": model_name, "dry_run": dry_run, "keep_runs": keep_runs,
            "protected_versions": sorted(v for v in all_protected if v),
            "runs": {k: sorted(v, key=lambda r: r["run_id"]) for k, v in result_runs.items()},
            "versions": result_versions, "objects_removed": removed_objects}


def _read_protection(store: ObjectStore, model_name: str,
                     run_objects: dict[str, list[dict[str, Any]]], *, full_log: bool = True) -> _Protected:
    """Production, the versions the log names and (from `run_objects`) the versions runs claim.

    With ``full_log=False`` the log is read from its key names alone (``<time>-<version>.json``:
    every pointer move is logged under the version it moved to), one listing instead of a GET per
    entry -- cheap enough to repeat right before every delete.
    """
    from ml.registry.versions import promotion_history, read_pointer

    pointer, _ = read_pointer(store, model_name)
    production = pointer.get("version") if pointer else None
    production_run = _segment_of(pointer.get("run_id")) if pointer else None
    protected = _Protected(production, production_run)
    if full_log:
        entries = promotion_history(store, model_name)
    else:
        root = layout.promotions_root(model_name)
        entries = [{"version": key[len(root):].removesuffix(".json").partition("-")[2]}
                   for key in store.iter_keys(root)]
    for entry in entries:
        for name in ("version", "from", "to"):
            value = entry.get(name)
            if isinstance(value, str) and value and value != "none":
                protected.logged.add(value)
    for run, objects in run_objects.items():
        for obj in objects:
            if obj["key"].endswith(f"/{run}/{CLAIM_FILE}"):
                claim = store.get_json(obj["key"])
                if isinstance(claim, dict) and isinstance(claim.get("version"), str):
                    protected.claimed[claim["version"]] = run
    return protected


def _protected_runs(store: ObjectStore, model_name: str, protected: _Protected,
                    version_objects: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Run segment -> why it stays: a run that produced a protected version explains that version."""
    from ml.registry.versions import VERSION_FILE

    runs: dict[str, str] = {}
    if protected.production_run:
        runs[protected.production_run] = f"produced production version {protected.production}"
    for version in sorted(protected.logged | set(protected.claimed)):
        keys = {o["key"] for o in version_objects.get(version, [])}
        key = layout.version_key(model_name, version, VERSION_FILE)
        if key not in keys:
            continue
        run = _segment_of((store.get_json(key).get("metadata") or {}).get("run_id"))
        if run:
            why = "production" if version == protected.production else protected.reason(version)
            runs.setdefault(run, f"produced version {version}, {why}")
    return runs


def _segment_of(run_id: Any) -> str | None:
    try:
        return layout.run_segment(str(run_id)) if run_id else None
    except UnsafeNameError:
        return None


def _group(objects: list[dict[str, Any]], root: str) -> dict[str, list[dict[str, Any]]]:
    """Objects under `root` by their first path segment (objects directly under `root` are ignored)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        head, sep, _ = obj["key"][len(root):].partition("/")
        if head and sep:
            groups.setdefault(head, []).append(obj)
    return groups


def _newest(objects: list[dict[str, Any]]) -> datetime:
    """When a folder was last written: the newest last-modified time of its objects."""
    times = [o["last_modified"] for o in objects if o.get("last_modified") is not None]
    return max(times) if times else _EPOCH


def _keep_version_reason(version: str, protected: _Protected, prune: bool, grace: timedelta, now: datetime,
                         objects: list[dict[str, Any]]) -> str | None:
    """Why a version stays, or None when it may be deleted."""
    reason = protected.reason(version)
    if reason is not None:
        return reason
    if not prune:
        return "versions are kept unless prune_versions is set"
    written = _newest(objects)
    if written == _EPOCH:
        return "its publish time is unknown"
    if now - written < grace:
        return f"written less than {grace} ago (a promotion may be in flight)"
    return None


def _delete_version(store: ObjectStore, model_name: str, version: str,
                    objects: list[dict[str, Any]]) -> str | None:
    """Delete one version unless something protects it by now; returns why it was kept, else None."""
    prefix = layout.version_prefix(model_name, version)
    fresh = _read_protection(store, model_name, _claims_only(store, model_name), full_log=False)
    reason = fresh.reason(version)
    if reason is not None:
        return f"{reason} (found while retention ran)"
    marker = layout.version_key(model_name, version, layout.COMPLETE_MARKER)
    saved = store.get_with_etag(marker)
    if saved is not None:
        store.delete(marker)  # from here on nobody can point at it (swap_pointer needs COMPLETE)
        after = _read_protection(store, model_name, {}, full_log=False)
        reason = after.reason(version)
        if reason is not None:
            # A rollback or promotion moved onto it between our two reads: undo the tombstone.
            store.put_bytes(marker, saved[0], if_none_match=True, content_type="application/json")
            log.warning("retention: %s %s became %s while being deleted; kept it", model_name, version, reason)
            return f"{reason} (pointed at while retention ran; restored)"
    store.delete_prefix(prefix)
    return None


def _claims_only(store: ObjectStore, model_name: str) -> dict[str, list[dict[str, Any]]]:
    """Every run's claim object, grouped like `_group` (a fresh listing: claims may be new)."""
    root = layout.runs_root(model_name)
    claims = [o for o in store.iter_objects(root) if o["key"].endswith("/" + CLAIM_FILE)
              and o["key"][len(root):].count("/") == 1]
    return _group(claims, root)


def _delete_folder(store: ObjectStore, prefix: str, markers: list[str]) -> None:
    for key in markers:  # markers first: a half-deleted folder must not look complete
        store.delete(key)
    store.delete_prefix(prefix)
