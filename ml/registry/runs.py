"""A run's artifacts: its local folder on this worker and its prefix in the store.

Candidates are published file by file with the marker (``train_summary.json``) last, so a reader
that sees the marker sees a complete candidate; a worker that lacks a candidate downloads it by
its key, checking every listed name before anything is written (`layout.check_relative_path`).
Nothing local is authoritative: the store is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.errors import DataError
from ml.io import read_json, to_jsonable, write_json
from ml.registry import layout

if TYPE_CHECKING:
    from ml.config import PipelineConfig
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)


def local_run_dir(config: PipelineConfig, run_id: str) -> Path:
    """This worker's folder of a run: the same reversible segment as the store's prefix."""
    return config.work_dir / "runs" / layout.run_segment(run_id)


def cache_root(config: PipelineConfig) -> Path:
    """Root of this worker's rebuildable caches (decoded images, bottlenecks, weights)."""
    return config.work_dir / "cache"


def new_run_id() -> str:
    """A run id for runs started outside Airflow (the CLI)."""
    return "manual__" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_key(config: PipelineConfig, run_id: str, *parts: str) -> str:
    """The store key of a run-level object (`layout.run_key` for the configured model)."""
    return layout.run_key(config.storage.model_name, run_id, *parts)


def upload_run_files(store: ObjectStore | None, config: PipelineConfig, run_id: str, paths: Iterable[Path],
                     *, folder: str | None = None) -> dict[str, str]:
    """Upload files to the run's prefix (or its `folder`); returns {file name: s3 URI}."""
    if store is None:
        return {}
    uris = {}
    for path in paths:
        key = run_key(config, run_id, *([folder] if folder else []), Path(path).name)
        store.put_file(key, Path(path))
        uris[Path(path).name] = store.uri(key)
    return uris


def small(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What goes to XCom: JSON types only, no big per-image lists."""
    return to_jsonable({k: v for k, v in summary.items() if k not in ("items", "rows", "manifest")})


# -- candidates ---------------------------------------------------------------------------------------


def published_summary(store: ObjectStore | None, config: PipelineConfig, run_id: str,
                      candidate: str) -> dict[str, Any] | None:
    """The candidate's train summary if this run already published it (an earlier try did), else None."""
    if store is None:
        return None
    found = store.get_with_etag(layout.candidate_key(config.storage.model_name, run_id, candidate,
                                                     layout.CANDIDATE_MARKER))
    return json.loads(found[0]) if found else None


def publish_candidate(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str,
                      out_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Upload a trained candidate's folder, the marker last; returns the summary for XCom."""
    summary = {**summary, "candidate": candidate}
    if store is not None:
        model = config.storage.model_name
        for path in sorted(out_dir.rglob("*")):
            if path.is_file() and path.name != layout.CANDIDATE_MARKER:
                store.put_file(layout.candidate_key(model, run_id, candidate, path.relative_to(out_dir).as_posix()),
                               path)
        summary["uri"] = store.uri(layout.candidate_prefix(model, run_id, candidate))
        # The marker goes last: a reader that sees it sees a complete candidate.
        store.put_file(layout.candidate_key(model, run_id, candidate, layout.CANDIDATE_MARKER),
                       out_dir / layout.CANDIDATE_MARKER)
    return small(summary)


def unpublish_candidate(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str) -> None:
    """Remove a candidate's marker before its folder is overwritten (a search trial's next rung), so no reader
    takes the half-replaced folder for complete; `publish_candidate` writes the marker again last."""
    if store is not None:
        store.delete(layout.candidate_key(config.storage.model_name, run_id, candidate, layout.CANDIDATE_MARKER))


def write_run_json(store: ObjectStore | None, config: PipelineConfig, run_id: str, parts: Iterable[str],
                   obj: Any) -> None:
    """A small run-level JSON object: this worker's copy and the store's (the one other workers read)."""
    parts = tuple(parts)
    write_json(local_run_dir(config, run_id).joinpath(*parts), obj)
    if store is not None:
        store.put_json(layout.run_key(config.storage.model_name, run_id, *parts), obj)


def read_run_json(store: ObjectStore | None, config: PipelineConfig, run_id: str, parts: Iterable[str]) -> Any:
    """What `write_run_json` wrote, from the store when there is one (any worker may have written it), or None."""
    parts = tuple(parts)
    if store is None:
        local = local_run_dir(config, run_id).joinpath(*parts)
        return read_json(local) if local.exists() else None
    found = store.get_with_etag(layout.run_key(config.storage.model_name, run_id, *parts))
    return json.loads(found[0]) if found else None


def publish_evaluation(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str,
                       cand_dir: Path) -> None:
    """Upload what evaluation wrote beside a candidate, metrics.json last."""
    if store is None:
        return
    for name in layout.EVAL_FILES:
        if (cand_dir / name).exists():
            store.put_file(layout.candidate_key(config.storage.model_name, run_id, candidate, name), cand_dir / name)


def ensure_candidate_local(store: ObjectStore | None, config: PipelineConfig, run_id: str, candidate: str) -> Path:
    """The candidate's folder on this worker, downloaded from the store when missing.

    Every key listed under the candidate's prefix is checked before anything is written: a
    crafted key (``../x``, an absolute path, a hidden name) raises UnsafeNameError.
    """
    local = local_run_dir(config, run_id) / layout.check_candidate(candidate)
    if (local / layout.CANDIDATE_MARKER).exists():
        return local
    if store is None:
        raise DataError(f"candidate {candidate!r} of run {run_id} is not in {local} and no store is configured")
    prefix = layout.candidate_prefix(config.storage.model_name, run_id, candidate)
    keys = store.list_keys(prefix)
    if prefix + layout.CANDIDATE_MARKER not in keys:
        raise DataError(f"candidate {candidate!r} was not published for run {run_id} "
                        f"(no {prefix}{layout.CANDIDATE_MARKER})")
    wanted = []
    for key in keys:
        rel = key[len(prefix):]
        if rel and not rel.startswith(layout.TENSORBOARD_DIR + "/"):
            wanted.append((key, layout.check_relative_path(rel, f"file of candidate {candidate}")))
    for key, rel in wanted:
        store.download_file(key, local.joinpath(*rel.parts))
    return local


def published_candidates(config: PipelineConfig, store: ObjectStore | None, run_id: str) -> list[dict[str, Any]]:
    """Summaries of every candidate this run published (the marker object exists), by name."""
    if store is None:
        base = local_run_dir(config, run_id)
        return [read_json(p) for p in sorted(base.glob(f"*/{layout.CANDIDATE_MARKER}"))]
    prefix = f"{layout.run_prefix(config.storage.model_name, run_id)}/"
    keys = sorted(k for k in store.list_keys(prefix) if k.count("/") == prefix.count("/") + 1
                  and k.endswith("/" + layout.CANDIDATE_MARKER))
    summaries = []
    for key in keys:
        summary = store.get_json(key)
        name = key[len(prefix):].split("/", 1)[0]
        if not isinstance(summary, dict) or summary.get("candidate") != layout.check_candidate(name):
            raise DataError(f"{store.uri(key)} does not describe candidate {name!r}: refusing to evaluate it")
        summaries.append(summary)
    return summaries


# -- failures -----------------------------------------------------------------------------------------


def record_failure(config: PipelineConfig, store: ObjectStore | None, run_id: str, task_id: str, label: Any,
                   error: BaseException | None) -> None:
    """Write a one-line failure summary to the log, the run's folder and the store (when reachable).

    Called from the DAG's failure callback with the same store the tasks use, so it never raises.
    """
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0] if error else "unknown error"
    line = f"task {task_id} [{label}] failed: {type(error).__name__ if error else 'Error'}: {first_line}"
    _write_failure(config, store, run_id, task_id, label, line)


def record_late_run(config: PipelineConfig, store: ObjectStore | None, run_id: str, *, max_run_minutes: int,
                    deadline: Any) -> None:
    """Record that a run is still going at its deadline, as a failure record (same folder, same shape).

    Called from the DAG's deadline-alert callback; never raises, like `record_failure`.
    """
    line = (f"run {run_id} missed its deadline {deadline}: still running after its maximum run time of "
            f"{max_run_minutes} min (ML_MAX_RUN_MINUTES)")
    _write_failure(config, store, run_id, LATE_RUN_TASK, "deadline", line)


# The failure records of a late run carry this in place of a task id.
LATE_RUN_TASK = "dag_run"


def _write_failure(config: PipelineConfig, store: ObjectStore | None, run_id: str, task_id: str, label: Any,
                   line: str) -> None:
    log.error("%s", line)
    try:
        name = _failure_file_name(task_id, label)
        entry = {"at": datetime.now(UTC).isoformat(), "task_id": task_id, "label": str(label), "error": line}
        write_json(local_run_dir(config, run_id) / layout.FAILURES_DIR / name, entry)
        if store is not None:
            store.put_json(run_key(config, run_id, layout.FAILURES_DIR, name), entry)
    except Exception as exc:  # noqa: BLE001 - a callback must not mask the original failure
        log.warning("could not record the failure summary: %s", type(exc).__name__)


def _failure_file_name(task_id: str, label: Any) -> str:
    """A plain file name for one task's failure (readable part + a digest: distinct tasks never collide)."""
    text = f"{task_id}-{label}"
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:80] or "task"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.json"
