"""The model registry on object storage: immutable versions, the production pointer, the log.

Layout under ``<model_name>/`` in the bucket::

    versions/<version>/<file>...          written once each (If-None-Match: *)
    versions/<version>/version.json       files with sha256 and size, plus the publisher's metadata
    versions/<version>/COMPLETE           written last: a version without it does not exist
    production.json                       the pointer, replaced only by conditional writes
    promotions/<utc-timestamp>-<version>.json   one immutable object per promotion or rollback

No locks: write-once keys make versions immutable, and If-Match on the pointer's ETag makes
two racing promotions resolve to exactly one winner (the loser gets `PromotionConflict`).
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.errors import (  # noqa: F401 - IncompleteVersionError is re-exported for callers
    IncompleteVersionError,
    ObjectExistsError,
    PromotionConflict,
    StorageError,
    UnsafeNameError,
)
from ml.io import file_digest, sha256_file  # noqa: F401 - sha256_file is re-exported for callers
from ml.registry import layout

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

MODEL_FILE = layout.MODEL_FILE
VERSION_FILE = layout.VERSION_FILE
COMPLETE_MARKER = layout.COMPLETE_MARKER
POINTER_FILE = layout.POINTER_FILE
_RESERVED = frozenset({VERSION_FILE, COMPLETE_MARKER})




# -- keys and ids --------------------------------------------------------------------------------
def new_version_id(now: datetime) -> str:
    """A sortable, unique version id like ``20261123T170501Z-3fa2c1`` (UTC second + 6 hex)."""
    if now.tzinfo is None:
        raise StorageError(f"new_version_id needs a timezone-aware datetime, got naive {now.isoformat()}")
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def version_prefix(model_name: str, version: str) -> str:
    """``<model_name>/versions/<version>/`` (the version id is checked: it may come from the store)."""
    _check_version(version)
    return layout.version_prefix(model_name, version)


def pointer_key(model_name: str) -> str:
    """``<model_name>/production.json``."""
    return layout.pointer_key(model_name)


def _key(model_name: str, version: str, name: str) -> str:
    """A file of a version (`layout.version_key`; the version id is checked)."""
    _check_version(version)
    return layout.version_key(model_name, version, name)


def _check_version(version: str) -> None:
    """A StorageError for a version id that is not a plain name (`ml.registry.layout.check_version`)."""
    try:
        layout.check_version(version)
    except UnsafeNameError as exc:
        raise StorageError(str(exc)) from None


def _utc_now() -> datetime:
    return datetime.now(UTC)




# -- versions ------------------------------------------------------------------------------------
def publish_version(
    store: ObjectStore, model_name: str, version: str, files: dict[str, Path], metadata: dict[str, Any]
) -> dict[str, Any]:
    """Upload a model version once, then mark it COMPLETE.

    Args:
        files: file name in the version folder -> local path; must include ``model.keras``
            (typically also labels.json, preprocessing.json, metrics.json, model_card.html,
            lineage.json).
        metadata: stored in version.json; by convention holds ``metrics``, ``labels``,
            ``run_id``, ``dataset_hash`` and ``candidate``, which the pointer copies.

    Returns:
        The version.json content plus ``uri`` (the version folder).

    Raises:
        ObjectExistsError: the version is already COMPLETE, or one of its keys holds other bytes.
    """
    _check_version(version)
    if MODEL_FILE not in files:
        raise StorageError(
            f"publish_version({version!r}): files must include {MODEL_FILE!r}, got {sorted(files)}"
        )
    for name, path in files.items():
        if name in _RESERVED or not layout.is_name(name):
            raise StorageError(
                f"publish_version({version!r}): invalid file name {name!r} (plain names only, "
                f"not {sorted(_RESERVED)})"
            )
        if not Path(path).is_file():
            raise StorageError(f"publish_version({version!r}): {name!r} -> {path} is not a file")
    prefix = version_prefix(model_name, version)
    if store.exists(_key(model_name, version, COMPLETE_MARKER)):
        raise ObjectExistsError(
            f"version {version} of {model_name} is already published at "
            f"{store.uri(prefix)}; versions are immutable"
        )

    entries: dict[str, dict[str, Any]] = {}
    for name in sorted(files):
        path = Path(files[name])
        store.put_file_once(_key(model_name, version, name), path)
        entries[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    info: dict[str, Any] = {
        "model_name": model_name,
        "version": version,
        "created_at": str(metadata.get("created_at") or _utc_now().isoformat()),
        "sha256": entries[MODEL_FILE]["sha256"],
        "files": entries,
        "metadata": metadata,
    }
    try:
        store.put_json(_key(model_name, version, VERSION_FILE), info, if_none_match=True)
    except ObjectExistsError:
        existing = store.get_json(_key(model_name, version, VERSION_FILE))
        if existing.get("files") != entries:
            raise ObjectExistsError(
                f"{store.uri(_key(model_name, version, VERSION_FILE))} already exists and describes other "
                "files; publish under a new version id"
            ) from None
        info = existing
    # The marker goes last: readers and swap_pointer treat a version without it as absent.
    store.put_json(
        _key(model_name, version, COMPLETE_MARKER),
        {"version": version, "sha256": info["sha256"], "completed_at": _utc_now().isoformat()},
        if_none_match=True,
    )
    log.info(
        "published %s version %s (%d files, model sha256 %s) at %s",
        model_name,
        version,
        len(entries),
        info["sha256"][:12],
        store.uri(prefix),
    )
    return {**info, "uri": store.uri(prefix)}


def is_complete(store: ObjectStore, model_name: str, version: str) -> bool:
    """Whether the version's COMPLETE marker exists."""
    return store.exists(_key(model_name, version, COMPLETE_MARKER))


def read_version(store: ObjectStore, model_name: str, version: str) -> dict[str, Any]:
    """version.json of a COMPLETE version, plus ``uri``; IncompleteVersionError otherwise."""
    _check_version(version)
    prefix = version_prefix(model_name, version)
    if not is_complete(store, model_name, version):
        raise IncompleteVersionError(
            f"version {version} of {model_name} has no {COMPLETE_MARKER} marker at "
            f"{store.uri(prefix)}: it is missing or was never finished"
        )
    return {**store.get_json(_key(model_name, version, VERSION_FILE)), "uri": store.uri(prefix)}


def list_versions(store: ObjectStore, model_name: str) -> list[dict[str, Any]]:
    """Complete versions, oldest first: {version, created_at, metrics, is_production, candidate, sha256, uri,
    submission (rows and classes of its Kaggle ``submission.csv``, or None)}."""
    root = layout.versions_root(model_name)
    complete = sorted(
        {
            key[len(root) :].split("/", 1)[0]
            for key in store.list_keys(root)
            if key.endswith("/" + COMPLETE_MARKER)
        }
    )
    for bad in [v for v in complete if not layout.is_name(v)]:
        # A crafted key must not take the whole listing down; it is not a version either.
        log.warning("ignoring %s: %r is not a valid version id", store.uri(root + bad), bad[:80])
        complete.remove(bad)
    pointer, _ = read_pointer(store, model_name)
    production = pointer.get("version") if pointer else None
    out = []
    for version in complete:
        info = store.get_json(_key(model_name, version, VERSION_FILE))
        out.append(
            {
                "version": version,
                "created_at": info.get("created_at"),
                "metrics": (info.get("metadata") or {}).get("metrics", {}),
                "is_production": version == production,
                "candidate": (info.get("metadata") or {}).get("candidate"),
                "sha256": info.get("sha256"),
                "uri": store.uri(version_prefix(model_name, version)),
                "submission": (info.get("metadata") or {}).get("submission"),
            }
        )
    return out


# -- the production pointer -----------------------------------------------------------------------
def read_pointer(store: ObjectStore, model_name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(pointer, ETag) of production.json, or (None, None) before the first promotion."""
    found = store.get_with_etag(pointer_key(model_name))
    if found is None:
        return None, None
    data, etag = found
    try:
        pointer = json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{store.uri(pointer_key(model_name))} is not valid JSON: {exc}") from None
    # Readers build keys and cache folders from the pointer's version: check it where it is read.
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise StorageError(f"{store.uri(pointer_key(model_name))} is not a pointer object with a 'version'")
    try:
        layout.check_version(pointer["version"])
    except UnsafeNameError as exc:
        raise StorageError(f"{store.uri(pointer_key(model_name))}: {exc}") from None
    return pointer, etag


def make_pointer(
    store: ObjectStore,
    model_name: str,
    version: str,
    *,
    promoted_at: datetime | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The pointer content for a COMPLETE version, filled from its version.json metadata.

    Keys: version, uri (of model.keras), version_uri, sha256, metrics, labels, promoted_at,
    run_id, dataset_hash, candidate; `overrides` replace any of them (e.g. ``metrics=`` from evaluation).
    """
    info = read_version(store, model_name, version)
    meta = info.get("metadata") or {}
    prefix = version_prefix(model_name, version)
    pointer = {
        "version": version,
        "uri": store.uri(_key(model_name, version, MODEL_FILE)),
        "version_uri": store.uri(prefix),
        "sha256": info["sha256"],
        "metrics": meta.get("metrics", {}),
        "labels": meta.get("labels", []),
        "promoted_at": (promoted_at or _utc_now()).isoformat(),
        "run_id": meta.get("run_id"),
        "dataset_hash": meta.get("dataset_hash"),
        "candidate": meta.get("candidate"),
    }
    pointer.update(overrides)
    return pointer


def swap_pointer(
    store: ObjectStore, model_name: str, pointer: dict[str, Any], expected_etag: str | None
) -> str:
    """Replace production.json iff it still has `expected_etag` (None: iff it does not exist yet).

    Returns:
        The new pointer's ETag.

    Raises:
        IncompleteVersionError: the pointer names a version without COMPLETE.
        PromotionConflict: another promotion changed the pointer since `expected_etag` was read.
    """
    version = str(pointer.get("version") or "")
    info = read_version(store, model_name, version)  # refuses incomplete or missing versions
    if pointer.get("sha256") != info["sha256"]:
        raise StorageError(
            f"pointer for {model_name} version {version} has sha256 {pointer.get('sha256')!r} but "
            f"the version's model.keras has {info['sha256']!r}; refusing to point at it"
        )
    key = pointer_key(model_name)
    previous = store.get_with_etag(key) if expected_etag is not None else None
    try:
        if expected_etag is None:
            etag = store.put_json(key, pointer, if_none_match=True)
        else:
            etag = store.put_json(key, pointer, if_match=expected_etag)
    except (ObjectExistsError, PromotionConflict):
        current, current_etag = read_pointer(store, model_name)
        if current == pointer and current_etag is not None:
            # Our own write landed but its response was lost and the retried PUT was refused
            # (or a task retry repeats the same swap): the pointer is exactly ours, so we won.
            log.info("production pointer of %s already holds this promotion of %s", model_name, version)
            return current_etag
        now = current.get("version") if current else None
        if expected_etag is None:
            what = f"another promotion created {store.uri(key)} first (now at version {now})"
        else:
            what = (
                f"{store.uri(key)} changed since it was read (expected ETag {expected_etag}, now at "
                f"version {now}): another promotion won"
            )
        raise PromotionConflict(
            f"{what}; {model_name} version {version} was not promoted -- re-run the gate "
            "against the new production model"
        ) from None
    if not is_complete(store, model_name, version):
        # Retention deleted the version's marker between our check and our write (it deletes the
        # marker first, then looks at the pointer again): give the pointer back, or drop a first one.
        if previous is not None and previous[1] == expected_etag:
            store.put_bytes(key, previous[0], if_match=etag, content_type="application/json")
        else:
            store.delete(key)
        raise IncompleteVersionError(
            f"version {version} of {model_name} lost its {COMPLETE_MARKER} marker while being promoted (retention "
            f"is deleting it); {store.uri(key)} was restored -- promote another version"
        )
    log.info("production pointer of %s now at version %s (ETag %s)", model_name, version, etag)
    return etag


# -- the promotion log ---------------------------------------------------------------------------
def append_promotion_log(store: ObjectStore, model_name: str, entry: dict[str, Any]) -> str:
    """Store one immutable log object for a promotion/rollback; returns its key.

    `entry` must have ``version``; ``at`` (UTC ISO time) is added when missing. By convention
    entries also carry ``action`` (promote / rollback / keep), ``from``, ``to``, ``actor``,
    ``reasons`` (list of sentences) and ``run_id``.
    """
    version = str(entry.get("version") or "")
    _check_version(version)
    for _ in range(5):  # same microsecond and version: take the next timestamp
        now = _utc_now()
        record = {"at": now.isoformat(), **entry}
        key = layout.promotion_log_key(model_name, now, version)
        try:
            store.put_json(key, record, if_none_match=True)
            return key
        except ObjectExistsError:
            continue
    raise StorageError(f"could not write a unique promotion log entry for {model_name} version {version}")


def promotion_history(store: ObjectStore, model_name: str) -> list[dict[str, Any]]:
    """Every promotion log entry, oldest first (each with its ``key``)."""
    keys = store.list_keys(layout.promotions_root(model_name))  # timestamped names sort chronologically
    return [{**store.get_json(key), "key": key} for key in keys if key.endswith(".json")]


# -- workflows -----------------------------------------------------------------------------------
def promote(
    store: ObjectStore,
    model_name: str,
    version: str,
    *,
    expected_etag: str | None,
    actor: str,
    reason: str,
    gate: dict[str, Any] | None = None,
    **pointer_overrides: Any,
) -> dict[str, Any]:
    """Point production at `version` (conditional on `expected_etag`) and log it.

    `expected_etag` must be the ETag read together with the champion the gate compared
    against (`read_pointer`), so a promotion decided against a stale champion loses.
    Returns the new pointer (with ``etag``).
    """
    previous, _ = read_pointer(store, model_name)
    pointer = make_pointer(store, model_name, version, **pointer_overrides)
    etag = swap_pointer(store, model_name, pointer, expected_etag)
    append_promotion_log(
        store,
        model_name,
        {
            "action": "promote",
            "version": version,
            "from": previous.get("version") if previous else None,
            "to": version,
            "actor": actor,
            "reasons": [reason],
            "sha256": pointer["sha256"],
            "metrics": pointer.get("metrics", {}),
            "run_id": pointer.get("run_id"),
            "gate": gate,
        },
    )
    return {**pointer, "etag": etag}


def rollback(
    store: ObjectStore, model_name: str, to_version: str, *, reason: str, actor: str
) -> dict[str, Any]:
    """Move production back to an earlier COMPLETE version with the same conditional write, and log it.

    Returns the new pointer (with ``etag``). Rolling back to the current version changes nothing.
    """
    current, etag = read_pointer(store, model_name)
    if current is None:
        raise StorageError(
            f"{model_name} has no production pointer at {store.uri(pointer_key(model_name))}; "
            "nothing to roll back"
        )
    if current.get("version") == to_version:
        log.info("%s is already at version %s; rollback changes nothing", model_name, to_version)
        return {**current, "etag": etag}
    pointer = make_pointer(store, model_name, to_version)
    new_etag = swap_pointer(store, model_name, pointer, etag)
    append_promotion_log(
        store,
        model_name,
        {
            "action": "rollback",
            "version": to_version,
            "from": current.get("version"),
            "to": to_version,
            "actor": actor,
            "reasons": [reason],
            "sha256": pointer["sha256"],
        },
    )
    log.warning(
        "rolled %s back from version %s to %s (%s, by %s)",
        model_name,
        current.get("version"),
        to_version,
        reason,
        actor,
    )
    return {**pointer, "etag": new_etag}
