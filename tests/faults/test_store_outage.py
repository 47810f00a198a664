"""Faults 2 and 3: the object store dies during an upload, during the pointer swap, and between stages.

The store is this test's own SeaweedFS; it is SIGKILLed (no shutdown) at the exact request
through `FaultProxy`, then restarted on the same data dir, ports and credentials. The failed
call must raise a clear StorageError after the client's bounded retries, production.json must
be byte-for-byte unchanged, and re-running the failed stage must finish the promotion without
any manual cleanup.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from ml.errors import PromotionConflict, StorageError
from tests.faults.conftest import (
    MODEL,
    assert_pointer_verifiable,
    kill_weed,
    new_bucket_name,
    run_to_gate,
    seed_production,
    store_for,
    tiny_config,
)

pytestmark = pytest.mark.faults

# The request line of a version's model.keras upload, whatever the version id.
VERSION_MODEL_PUT = re.compile(rb"PUT /[^ ]+/versions/[^/ ]+/model\.keras ")
BIG_BYTES = 48 * 1024 * 1024  # big enough that the kill lands mid-body (killed after 8 MiB arrived)


def _small_version_files(tmp_path, model_bytes: bytes) -> dict:
    (tmp_path / "model.keras").write_bytes(model_bytes)
    (tmp_path / "labels.json").write_text('["a", "b"]')
    (tmp_path / "preprocessing.json").write_text('{"image_size": 32}')
    return {n: tmp_path / n for n in ("model.keras", "labels.json", "preprocessing.json")}


def test_store_killed_during_big_upload_then_publish_resumes(own_seaweed, fault_proxy, tmp_path):
    from ml.registry.versions import promote, publish_version, read_pointer

    bucket = new_bucket_name()
    direct = store_for(own_seaweed, bucket)
    v0 = tmp_path / "v0"
    v0.mkdir()
    publish_version(direct, MODEL, "v0", _small_version_files(v0, b"champion"), {"labels": ["a", "b"]})
    promote(direct, MODEL, "v0", expected_etag=None, actor="test", reason="seed")
    pointer_before = direct.get_with_etag(f"{MODEL}/production.json")
    v1 = tmp_path / "v1"
    v1.mkdir()
    files = _small_version_files(v1, b"")
    with (v1 / "model.keras").open("wb") as fh:
        fh.write(os.urandom(BIG_BYTES))
    via_proxy = store_for(own_seaweed, bucket, endpoint=fault_proxy.endpoint, create=False)
    fault_proxy.arm(f"PUT /{bucket}/{MODEL}/versions/v1/model.keras".encode(),
                    lambda: kill_weed(own_seaweed), after_bytes=8 * 1024 * 1024)

    with pytest.raises(StorageError) as failure:
        publish_version(via_proxy, MODEL, "v1", files, {"labels": ["a", "b"]})
    gave_up_after = time.monotonic() - fault_proxy.fired_at

    assert fault_proxy.fired.is_set(), "the store was not killed during the model upload"
    message = str(failure.value)
    assert "cannot reach object store endpoint" in message and fault_proxy.endpoint in message
    assert "versions/v1/model.keras" in message
    assert gave_up_after < 30, f"the client took {gave_up_after:.1f} s to give up (retries must be bounded)"
    own_seaweed.restart()
    assert direct.get_with_etag(f"{MODEL}/production.json") == pointer_before
    assert not direct.exists(f"{MODEL}/versions/v1/COMPLETE")

    # The retry of the same publish resumes (identical objects accepted), completes, promotes.
    info = publish_version(direct, MODEL, "v1", files, {"labels": ["a", "b"]})
    promote(direct, MODEL, "v1", expected_etag=pointer_before[1], actor="test", reason="retry")

    pointer, _ = read_pointer(direct, MODEL)
    assert pointer["version"] == "v1" and pointer["sha256"] == info["sha256"]
    assert_pointer_verifiable(direct)
    print(f"store killed mid-upload: StorageError {gave_up_after:.2f} s after the kill")


@pytest.fixture
def gated_run(own_seaweed, sample_source, tmp_path):
    """A trained, evaluated, gated run whose champion is an earlier version of the same model."""
    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    config = tiny_config(tmp_path / "work", bucket, own_seaweed.endpoint_url, source=sample_source)
    # The champion: the run's own candidate published under another version id.
    seed_run = "seed-run"
    from ml import pipeline as P

    dataset = P.ingest_stage(config, store)
    P.train_stage(dataset, "scratch_tiny", config, store, seed_run)
    seed_production(config, store, seed_run, "scratch_tiny", "v0-champion")
    run = run_to_gate(config, store, "run-1")
    assert run["decision"]["promote"] and run["decision"]["expected_etag"]
    return {"config": config, "store": store, "bucket": bucket, **run}


def test_store_killed_at_pointer_swap_then_promote_stage_rerun_finishes(own_seaweed, fault_proxy, gated_run):
    from ml.pipeline import promote_stage
    from ml.registry.versions import promotion_history

    config, bucket, direct = gated_run["config"], gated_run["bucket"], gated_run["store"]
    before = direct.get_with_etag(f"{MODEL}/production.json")
    via_proxy = store_for(own_seaweed, bucket, endpoint=fault_proxy.endpoint, create=False)
    fault_proxy.arm(f"PUT /{bucket}/{MODEL}/production.json".encode(), lambda: kill_weed(own_seaweed))
    args = (gated_run["dataset"], gated_run["evaluation"], gated_run["decision"], config)

    with pytest.raises(StorageError) as failure:
        promote_stage(*args, via_proxy, "run-1")
    gave_up_after = time.monotonic() - fault_proxy.fired_at

    assert fault_proxy.fired.is_set(), "the store was not killed at the pointer swap"
    assert not isinstance(failure.value, PromotionConflict)
    assert "cannot reach object store endpoint" in str(failure.value)
    assert "production.json" in str(failure.value)
    assert gave_up_after < 30
    own_seaweed.restart()
    assert direct.get_with_etag(f"{MODEL}/production.json") == before, "production.json changed"

    # Re-running the failed stage (as an Airflow retry would) finishes the promotion.
    result = promote_stage(*args, direct, "run-1")

    assert result["promoted"] is True
    pointer = assert_pointer_verifiable(direct)
    assert pointer["version"] == result["version"] != "v0-champion"
    promotes = [e for e in promotion_history(direct, MODEL)
                if e["action"] == "promote" and e.get("run_id") == "run-1"]
    assert len(promotes) == 1 and promotes[0]["from"] == "v0-champion"
    # The re-run reused the version the failed try had published: no stray copy is left behind.
    assert _versions(direct) == {"v0-champion": True, result["version"]: True}
    print(f"store killed at the swap: StorageError {gave_up_after:.2f} s after the kill")


def _versions(store) -> dict[str, bool]:
    """Every version folder in the store -> whether it is COMPLETE."""
    keys = store.list_keys(f"{MODEL}/versions/")
    return {v: f"{MODEL}/versions/{v}/COMPLETE" in keys for v in {k.split("/")[2] for k in keys}}


def test_store_killed_mid_version_upload_then_promote_stage_rerun_republishes_same_version(
        own_seaweed, fault_proxy, gated_run):
    from ml.pipeline import promote_stage

    config, bucket, direct = gated_run["config"], gated_run["bucket"], gated_run["store"]
    before = direct.get_with_etag(f"{MODEL}/production.json")
    via_proxy = store_for(own_seaweed, bucket, endpoint=fault_proxy.endpoint, create=False)
    fault_proxy.arm(VERSION_MODEL_PUT, lambda: kill_weed(own_seaweed), after_bytes=4096)
    args = (gated_run["dataset"], gated_run["evaluation"], gated_run["decision"], config)

    with pytest.raises(StorageError):
        promote_stage(*args, via_proxy, "run-1")
    own_seaweed.restart()
    unfinished = [v for v, complete in _versions(direct).items() if not complete]

    assert fault_proxy.fired.is_set(), "the store was not killed during the version upload"
    assert direct.get_with_etag(f"{MODEL}/production.json") == before, "production.json changed"
    assert len(unfinished) == 1, _versions(direct)

    result = promote_stage(*args, direct, "run-1")

    assert result["promoted"] is True and result["version"] == unfinished[0]
    assert _versions(direct) == {"v0-champion": True, unfinished[0]: True}
    assert_pointer_verifiable(direct)


def test_promote_stage_rerun_after_it_already_promoted_changes_nothing(gated_run):
    """A retry of a promote task whose first try swapped the pointer (and logged) but died before
    reporting success: same version, one log entry, pointer untouched."""
    from ml.pipeline import promote_stage
    from ml.registry.versions import promotion_history

    config, direct = gated_run["config"], gated_run["store"]
    args = (gated_run["dataset"], gated_run["evaluation"], gated_run["decision"], config, direct, "run-1")
    first = promote_stage(*args)
    pointer_after_first = direct.get_with_etag(f"{MODEL}/production.json")

    again = promote_stage(*args)

    assert first["promoted"] and again["promoted"] and again["version"] == first["version"]
    assert direct.get_with_etag(f"{MODEL}/production.json") == pointer_after_first
    promotes = [e for e in promotion_history(direct, MODEL) if e["action"] == "promote" and e.get("run_id") == "run-1"]
    assert len(promotes) == 1, promotes
    assert _versions(direct) == {"v0-champion": True, first["version"]: True}


def test_store_restarted_between_stages_next_stage_reconnects(own_seaweed, sample_source, tmp_path):
    """Restarts between stages (graceful and SIGKILL); each next stage runs on a fresh worker.

    A fresh work dir per stage (as on another Airflow worker) makes the stage read what earlier
    stages published from the store right away, so a store that answers before it can serve
    its stored objects fails the run.
    """
    from ml import pipeline as P
    from ml.registry.runs import run_key

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)  # one client for the whole run: it must reconnect by itself
    endpoint = own_seaweed.endpoint_url

    def worker(name: str):
        return tiny_config(tmp_path / name, bucket, endpoint, source=sample_source)

    first = worker("w1")
    dataset = P.ingest_stage(first, store)
    P.prepare_stage(dataset, first)
    results = [P.train_stage(dataset, "scratch_tiny", first, store, "run-r")]
    own_seaweed.restart()  # graceful stop + start on the same ports
    evaluation = P.evaluate_stage(dataset, results, worker("w2"), store, "run-r")
    kill_weed(own_seaweed)
    own_seaweed.restart()  # after a crash
    decision = P.gate_stage(dataset, evaluation, worker("w3"), store, "run-r")
    own_seaweed.restart()
    result = P.promote_stage(dataset, evaluation, decision, worker("w4"), store, "run-r")

    assert own_seaweed.endpoint_url == endpoint
    assert result["promoted"] is True
    assert_pointer_verifiable(store)
    # Everything the run published before the restarts survived them.
    assert store.exists(f"{run_key(first, 'run-r')}/scratch_tiny/train_summary.json")
    assert json.loads(store.get_bytes(f"{run_key(first, 'run-r')}/gate.json"))["promote"] is True


def test_store_down_between_stages_fails_clearly_and_retry_after_restart_works(own_seaweed, tmp_path):
    """While the store is down a stage fails fast with a StorageError; after a restart it carries on."""
    from ml.registry.versions import read_pointer

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket, connect_timeout=2.0)
    store.put_json(f"{MODEL}/probe.json", {"ok": True})
    kill_weed(own_seaweed)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            read_pointer(store, MODEL)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=reader)
    thread.start()
    thread.join(60)
    took = time.monotonic() - started

    assert not thread.is_alive(), "a read against a dead store hung"
    assert len(errors) == 1 and isinstance(errors[0], StorageError)
    assert own_seaweed.endpoint_url in str(errors[0])
    assert took < 20
    own_seaweed.restart()
    assert store.get_json(f"{MODEL}/probe.json") == {"ok": True}
    assert read_pointer(store, MODEL) == (None, None)


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_restart_returns_only_once_stored_objects_are_readable(own_seaweed, how):
    """A stage right after a restart reads at once, with no retry to paper over a half-ready store."""
    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    for i in range(3):
        store.put_json(f"{MODEL}/probe-{i}.json", {"i": i})
    impatient = store_for(own_seaweed, bucket, create=False, max_attempts=1)

    for i in range(3):
        if how == "sigkill":
            kill_weed(own_seaweed)
        own_seaweed.restart()
        assert impatient.get_json(f"{MODEL}/probe-{i}.json") == {"i": i}
