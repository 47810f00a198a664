"""Retention on a real SeaweedFS: old runs go, production and rollback targets never do."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ml.errors import ConfigError
from ml.registry import versions as v
from ml.registry.retention import apply_retention
from ml.registry.store import ObjectStore

MODEL = "image-classifier"
V_FIRST = "20200101T000000Z-aaaaaa"  # promoted, then replaced: a rollback target
V_PROD = "20200102T000000Z-bbbbbb"  # production
V_LOSER = "20200103T000000Z-cccccc"  # published, never promoted


def _put_run(store: ObjectStore, run_id: str) -> list[str]:
    prefix = f"{MODEL}/runs/{run_id}"
    keys = [f"{prefix}/scratch_small/model.keras", f"{prefix}/scratch_small/train_summary.json",
            f"{prefix}/report.json"]
    for key in keys:
        store.put_bytes(key, b"{}")
    return keys


def _publish(store: ObjectStore, tmp_path: Path, version: str, run_id: str) -> None:
    model = tmp_path / f"{version}.keras"
    model.write_bytes(version.encode())
    v.publish_version(store, MODEL, version, {"model.keras": model}, {"run_id": run_id, "labels": ["a", "b"]})


@pytest.fixture
def history(store: ObjectStore, tmp_path: Path) -> dict:
    """Five runs; names sort opposite to their age, so ordering by name would keep the wrong ones.

    run-e: nothing published; run-d: V_FIRST (promoted, then replaced); run-c: V_LOSER (lost the
    gate); run-b: V_PROD (production), a second later; run-a: the newest run, a second after that.
    """
    keys = {run_id: _put_run(store, run_id) for run_id in ("run-e", "run-d", "run-c")}
    for run_id in ("run-b", "run-a"):
        time.sleep(1.05)  # S3 Last-Modified has one-second resolution
        keys[run_id] = _put_run(store, run_id)
    _publish(store, tmp_path, V_FIRST, "run-d")
    v.promote(store, MODEL, V_FIRST, expected_etag=None, actor="test", reason="first")
    _publish(store, tmp_path, V_LOSER, "run-c")
    _publish(store, tmp_path, V_PROD, "run-b")
    _, etag = v.read_pointer(store, MODEL)
    v.promote(store, MODEL, V_PROD, expected_etag=etag, actor="test", reason="better")
    return keys


def _run_ids(result: dict, what: str) -> list[str]:
    return sorted(r["run_id"] for r in result["runs"][what])


def test_keeps_newest_runs_and_the_runs_behind_production_and_rollback_targets(
    store: ObjectStore, history: dict
) -> None:
    result = apply_retention(store, MODEL, keep_runs=1)

    assert _run_ids(result, "removed") == ["run-c", "run-e"]
    assert _run_ids(result, "kept") == ["run-a", "run-b", "run-d"]
    reasons = {r["run_id"]: r["reason"] for r in result["runs"]["kept"]}
    assert "newest" in reasons["run-a"] and V_PROD in reasons["run-b"] and V_FIRST in reasons["run-d"]
    for run_id in ("run-c", "run-e"):
        assert store.list_keys(f"{MODEL}/runs/{run_id}/") == []
    for run_id in ("run-a", "run-b", "run-d"):
        assert store.list_keys(f"{MODEL}/runs/{run_id}/") == sorted(history[run_id])
    assert result["objects_removed"] == 6
    # versions are untouched without prune_versions
    assert {x["version"] for x in v.list_versions(store, MODEL)} == {V_FIRST, V_PROD, V_LOSER}


def test_dry_run_deletes_nothing(store: ObjectStore, history: dict) -> None:
    before = store.list_keys(f"{MODEL}/")

    result = apply_retention(store, MODEL, keep_runs=2, dry_run=True, prune_versions=True,
                             now=datetime.now(UTC) + LATER)

    assert store.list_keys(f"{MODEL}/") == before
    assert _run_ids(result, "removed") == ["run-c", "run-e"]
    assert [r["version"] for r in result["versions"]["removed"]] == [V_LOSER]
    assert result["dry_run"] is True


LATER = timedelta(days=2)  # `now` for retention: every object the fixtures wrote is past the grace period


def test_prune_versions_removes_only_never_promoted_old_versions(
    store: ObjectStore, history: dict, tmp_path: Path
) -> None:
    fresh = v.new_version_id(datetime.now(UTC))  # a promotion claimed it and may be publishing it right now
    _publish(store, tmp_path, fresh, "run-a")
    store.put_json(f"{MODEL}/runs/run-a/promotion.json", {"version": fresh, "challenger": "scratch_small"})

    result = apply_retention(store, MODEL, keep_runs=5, prune_versions=True, now=datetime.now(UTC) + LATER)

    assert [r["version"] for r in result["versions"]["removed"]] == [V_LOSER]
    assert store.list_keys(v.version_prefix(MODEL, V_LOSER)) == []
    kept = {r["version"]: r["reason"] for r in result["versions"]["kept"]}
    assert kept[V_PROD] == "production"
    assert "rollback target" in kept[V_FIRST]
    assert "claimed by run run-a" in kept[fresh]
    assert result["runs"]["removed"] == []
    # production and its rollback target still resolve
    assert v.make_pointer(store, MODEL, V_PROD)["version"] == V_PROD
    assert v.rollback(store, MODEL, V_FIRST, reason="test", actor="test")["version"] == V_FIRST


def test_after_a_rollback_the_replaced_version_stays_protected(store: ObjectStore, history: dict) -> None:
    v.rollback(store, MODEL, V_FIRST, reason="regression", actor="test")

    result = apply_retention(store, MODEL, keep_runs=1, prune_versions=True)

    kept = {r["version"]: r["reason"] for r in result["versions"]["kept"]}
    assert kept[V_FIRST] == "production"
    assert "rollback target" in kept[V_PROD]
    assert _run_ids(result, "kept") == ["run-a", "run-b", "run-d"]


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_runs_must_be_positive(store: ObjectStore, keep: int) -> None:
    with pytest.raises(ConfigError, match="keep_runs must be at least 1"):
        apply_retention(store, MODEL, keep_runs=keep)


def test_cli_retention_dry_run(store: ObjectStore, history: dict, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from ml.cli import main

    monkeypatch.setenv("ML_S3_BUCKET", store.bucket)
    monkeypatch.setenv("ML_S3_ENDPOINT_URL", store.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", store._access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store._secret_key)
    before = store.list_keys(f"{MODEL}/")

    code = main(["retention", "--keep-runs", "1", "--dry-run"])

    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(r["run_id"] for r in out["runs"]["removed"]) == ["run-c", "run-e"]
    assert store.list_keys(f"{MODEL}/") == before


# -- races with rollbacks and promotions (issue 11) -------------------------------------------------


def test_grace_counts_from_the_objects_not_the_version_id(store: ObjectStore, history: dict) -> None:
    """A promote cleared a day after its claim republishes under the old id: its fresh objects protect it."""
    result = apply_retention(store, MODEL, keep_runs=5, prune_versions=True)  # real now: objects just written

    kept = {r["version"]: r["reason"] for r in result["versions"]["kept"]}
    assert "in flight" in kept[V_LOSER]  # its id says 2020, its objects say now
    assert v.is_complete(store, MODEL, V_LOSER)


def test_a_claimed_version_is_never_pruned(store: ObjectStore, history: dict) -> None:
    store.put_json(f"{MODEL}/runs/run-c/promotion.json", {"version": V_LOSER, "challenger": "scratch_small"})

    result = apply_retention(store, MODEL, keep_runs=5, prune_versions=True, now=datetime.now(UTC) + LATER)

    assert result["versions"]["removed"] == []
    assert v.is_complete(store, MODEL, V_LOSER)


def test_a_rollback_onto_the_version_being_deleted_wins(store: ObjectStore, history: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollback lands after retention's first check, before the marker goes: the marker comes back."""
    marker = v.version_prefix(MODEL, V_LOSER) + v.COMPLETE_MARKER
    real_get = store.get_with_etag

    def get_then_rollback(key: str):
        found = real_get(key)
        if key == marker:  # retention saves the marker just before deleting it
            monkeypatch.setattr(store, "get_with_etag", real_get)
            v.rollback(store, MODEL, V_LOSER, reason="operator", actor="test")
        return found

    monkeypatch.setattr(store, "get_with_etag", get_then_rollback)

    result = apply_retention(store, MODEL, keep_runs=5, prune_versions=True, now=datetime.now(UTC) + LATER)

    kept = {r["version"]: r["reason"] for r in result["versions"]["kept"]}
    assert "restored" in kept[V_LOSER]
    pointer, _ = v.read_pointer(store, MODEL)
    assert pointer["version"] == V_LOSER
    assert v.is_complete(store, MODEL, V_LOSER)
    assert v.make_pointer(store, MODEL, V_LOSER)["sha256"] == pointer["sha256"]  # files all there


def test_a_rollback_that_loses_to_the_delete_gives_the_pointer_back(store: ObjectStore, history: dict,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention deletes the whole version between rollback's check and its write: the pointer is restored."""
    before, _ = v.read_pointer(store, MODEL)
    real_put = store.put_json

    def delete_then_put(key: str, obj, **kwargs):
        if key == v.pointer_key(MODEL) and obj.get("version") == V_LOSER:
            monkeypatch.setattr(store, "put_json", real_put)
            apply_retention(store, MODEL, keep_runs=5, prune_versions=True, now=datetime.now(UTC) + LATER)
        return real_put(key, obj, **kwargs)

    monkeypatch.setattr(store, "put_json", delete_then_put)

    with pytest.raises(v.IncompleteVersionError, match="restored"):
        v.rollback(store, MODEL, V_LOSER, reason="operator", actor="test")

    after, _ = v.read_pointer(store, MODEL)
    assert after == before
    assert store.list_keys(v.version_prefix(MODEL, V_LOSER)) == []
