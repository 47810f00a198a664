"""The registry on a real SeaweedFS: immutable versions, conditional pointer, races, rollback."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ml.errors import ObjectExistsError, PromotionConflict, StorageError
from ml.registry import versions as v
from ml.registry.store import ObjectStore

MODEL = "dogs"
REPO = Path(__file__).resolve().parents[2]


def _files(tmp_path: Path, tag: str) -> dict[str, Path]:
    folder = tmp_path / tag
    folder.mkdir()
    (folder / "model.keras").write_bytes(f"weights of {tag}".encode() * 100)
    (folder / "labels.json").write_text('["cat", "dog"]')
    return {"model.keras": folder / "model.keras", "labels.json": folder / "labels.json"}


def _publish(store: ObjectStore, tmp_path: Path, version: str, accuracy: float = 0.5) -> dict:
    return v.publish_version(
        store,
        MODEL,
        version,
        _files(tmp_path, version),
        {
            "metrics": {"accuracy": accuracy},
            "labels": ["cat", "dog"],
            "run_id": f"run-{version}",
            "dataset_hash": "d" * 64,
            "candidate": f"cand-{version}",
        },
    )


def test_new_version_id_is_sortable_and_unique() -> None:
    t0 = datetime(2026, 11, 23, 17, 5, 1, tzinfo=UTC)
    earlier = v.new_version_id(t0)
    later = v.new_version_id(t0 + timedelta(seconds=1))
    same_second = v.new_version_id(t0)

    assert re.fullmatch(r"20261123T170501Z-[0-9a-f]{6}", earlier)
    assert earlier < later and same_second != earlier


def test_new_version_id_converts_to_utc_and_refuses_naive_times() -> None:
    cet = datetime(2026, 11, 23, 18, 5, 1, tzinfo=timezone(timedelta(hours=1)))

    assert v.new_version_id(cet).startswith("20261123T170501Z-")
    with pytest.raises(StorageError, match="timezone-aware"):
        v.new_version_id(datetime(2026, 11, 23))


def test_publish_version_uploads_files_then_version_json_then_complete(
    store: ObjectStore, tmp_path: Path
) -> None:
    info = _publish(store, tmp_path, "v1")

    prefix = f"{MODEL}/versions/v1/"
    model_bytes = (tmp_path / "v1" / "model.keras").read_bytes()
    assert store.list_keys(prefix) == [
        prefix + k for k in ("COMPLETE", "labels.json", "model.keras", "version.json")
    ]
    assert info["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert info["files"]["model.keras"] == {"sha256": info["sha256"], "size": len(model_bytes)}
    assert store.get_json(prefix + "version.json")["metadata"]["run_id"] == "run-v1"
    assert info["uri"] == f"s3://{store.bucket}/{prefix}"
    assert v.read_version(store, MODEL, "v1")["sha256"] == info["sha256"]


def test_published_version_is_immutable(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "v1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.keras").write_bytes(b"different weights")

    with pytest.raises(ObjectExistsError, match="already published"):
        v.publish_version(store, MODEL, "v1", {"model.keras": other / "model.keras"}, {})

    assert (
        store.get_bytes(f"{MODEL}/versions/v1/model.keras") == (tmp_path / "v1" / "model.keras").read_bytes()
    )


def test_interrupted_publish_resumes_with_same_bytes_but_not_other_bytes(
    store: ObjectStore, tmp_path: Path
) -> None:
    files = _files(tmp_path, "half")
    # a publish that died after its first upload, before version.json and COMPLETE
    store.put_file(f"{MODEL}/versions/half/labels.json", files["labels.json"], if_none_match=True)
    store.put_bytes(f"{MODEL}/versions/bad/model.keras", b"someone else's weights", if_none_match=True)

    resumed = v.publish_version(store, MODEL, "half", files, {})

    assert v.is_complete(store, MODEL, "half") and resumed["version"] == "half"
    with pytest.raises(ObjectExistsError, match="different content"):
        v.publish_version(store, MODEL, "bad", _files(tmp_path, "bad"), {})
    assert not v.is_complete(store, MODEL, "bad")


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"labels.json": "labels"}, "must include 'model.keras'"),
        ({"model.keras": "model", "COMPLETE": "labels"}, "invalid file name 'COMPLETE'"),
        ({"model.keras": "model", "sub/x.json": "labels"}, "invalid file name 'sub/x.json'"),
        ({"model.keras": "nope"}, "is not a file"),
    ],
)
def test_publish_version_validates_files(store: ObjectStore, tmp_path: Path, files: dict, match: str) -> None:
    real = _files(tmp_path, "x")
    paths = {
        name: real["model.keras"]
        if src == "model"
        else real["labels.json"]
        if src == "labels"
        else tmp_path / "missing"
        for name, src in files.items()
    }

    with pytest.raises(StorageError, match=match):
        v.publish_version(store, MODEL, "v9", paths, {})


def test_invalid_version_id_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="invalid version id '../x'"):
        v.publish_version(store, MODEL, "../x", _files(tmp_path, "x"), {})


def test_first_promotion_creates_pointer_and_a_second_first_promotion_conflicts(
    store: ObjectStore, tmp_path: Path
) -> None:
    _publish(store, tmp_path, "v1", 0.6)
    _publish(store, tmp_path, "v2", 0.7)
    assert v.read_pointer(store, MODEL) == (None, None)

    etag = v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "v1"), None)

    with pytest.raises(PromotionConflict, match="another promotion created .*production.json first"):
        v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "v2"), None)
    pointer, read_etag = v.read_pointer(store, MODEL)
    assert read_etag == etag
    assert pointer["version"] == "v1" and pointer["metrics"] == {"accuracy": 0.6}
    assert pointer["uri"] == f"s3://{store.bucket}/{MODEL}/versions/v1/model.keras"
    assert pointer["candidate"] == "cand-v1" and pointer["run_id"] == "run-v1"
    assert set(pointer) >= {
        "version",
        "uri",
        "sha256",
        "metrics",
        "labels",
        "promoted_at",
        "run_id",
        "dataset_hash",
    }


def test_swap_with_stale_etag_conflicts_and_leaves_pointer(store: ObjectStore, tmp_path: Path) -> None:
    for name in ("v1", "v2", "v3"):
        _publish(store, tmp_path, name)
    first = v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "v1"), None)
    second = v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "v2"), first)

    with pytest.raises(PromotionConflict, match=r"changed since it was read .*another promotion won"):
        v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "v3"), first)

    pointer, etag = v.read_pointer(store, MODEL)
    assert pointer["version"] == "v2" and etag == second


def test_repeating_the_same_swap_is_not_a_conflict(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "v1")
    pointer = v.make_pointer(store, MODEL, "v1")
    etag = v.swap_pointer(store, MODEL, pointer, None)

    # a retry of the very same write (e.g. its response was lost) finds its own pointer in place
    again = v.swap_pointer(store, MODEL, pointer, None)

    assert again == etag


def test_pointer_refuses_incomplete_version(store: ObjectStore, tmp_path: Path) -> None:
    info = _publish(store, tmp_path, "v1")
    store.put_file(f"{MODEL}/versions/v2/model.keras", tmp_path / "v1" / "model.keras")  # no COMPLETE
    forged = {**v.make_pointer(store, MODEL, "v1"), "version": "v2"}

    with pytest.raises(v.IncompleteVersionError, match="v2 of dogs has no COMPLETE marker"):
        v.swap_pointer(store, MODEL, forged, None)
    with pytest.raises(v.IncompleteVersionError):
        v.make_pointer(store, MODEL, "v2")
    assert v.read_pointer(store, MODEL) == (None, None)
    assert info["version"] == "v1"


def test_pointer_refuses_sha256_that_does_not_match_version(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "v1")
    pointer = {**v.make_pointer(store, MODEL, "v1"), "sha256": "0" * 64}

    with pytest.raises(StorageError, match="refusing to point at it"):
        v.swap_pointer(store, MODEL, pointer, None)


def test_racing_promoters_in_threads_exactly_one_wins(store: ObjectStore, tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(5)]
    for name in ["base", *names]:
        _publish(store, tmp_path, name)
    base_etag = v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "base"), None)
    pointers = {name: v.make_pointer(store, MODEL, name) for name in names}
    barrier = threading.Barrier(len(names))
    results: dict[str, str] = {}

    def promoter(name: str) -> None:
        barrier.wait()
        try:
            v.swap_pointer(store, MODEL, pointers[name], base_etag)
            results[name] = "won"
        except PromotionConflict:
            results[name] = "conflict"

    threads = [threading.Thread(target=promoter, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    winners = [n for n, r in results.items() if r == "won"]
    assert len(winners) == 1 and list(results.values()).count("conflict") == len(names) - 1
    assert v.read_pointer(store, MODEL)[0]["version"] == winners[0]


_CHILD = """
import json, sys, time
from pathlib import Path
from ml.errors import PromotionConflict
from ml.registry.store import ObjectStore
from ml.registry import versions as v
endpoint, bucket, model, name, etag, go = sys.argv[1:7]
store = ObjectStore(bucket, endpoint_url=endpoint)
pointer = v.make_pointer(store, model, name)
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.005)
try:
    v.swap_pointer(store, model, pointer, etag)
    print("won", flush=True)
except PromotionConflict as exc:
    print("conflict", exc, flush=True)
"""


def test_racing_promoters_in_two_processes_exactly_one_wins(
    seaweed, store: ObjectStore, tmp_path: Path
) -> None:
    for name in ("base", "p1", "p2"):
        _publish(store, tmp_path, name)
    base_etag = v.swap_pointer(store, MODEL, v.make_pointer(store, MODEL, "base"), None)
    go = tmp_path / "go"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
    }
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                seaweed.endpoint_url,
                store.bucket,
                MODEL,
                name,
                base_etag,
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("p1", "p2")
    }
    for proc in procs.values():  # both have read their pointer and wait at the line
        assert proc.stdout.readline().strip() == "ready"

    go.touch()
    outputs = {name: proc.communicate(timeout=60) for name, proc in procs.items()}

    results = {name: out.split()[0] for name, (out, _) in outputs.items()}
    assert all(p.returncode == 0 for p in procs.values()), outputs
    assert sorted(results.values()) == ["conflict", "won"], outputs
    winner = next(n for n, r in results.items() if r == "won")
    assert v.read_pointer(store, MODEL)[0]["version"] == winner


def test_promote_rollback_and_history(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "v1", 0.6)
    _publish(store, tmp_path, "v2", 0.7)
    first = v.promote(store, MODEL, "v1", expected_etag=None, actor="test", reason="first model")
    v.promote(
        store,
        MODEL,
        "v2",
        expected_etag=first["etag"],
        actor="test",
        reason="better",
        gate={"promote": True},
        metrics={"accuracy": 0.71},
    )

    rolled = v.rollback(store, MODEL, "v1", reason="bad predictions in prod", actor="oncall")

    pointer, etag = v.read_pointer(store, MODEL)
    assert pointer["version"] == "v1" and etag == rolled["etag"]
    history = v.promotion_history(store, MODEL)
    assert [(h["action"], h["version"], h["from"], h["to"]) for h in history] == [
        ("promote", "v1", None, "v1"),
        ("promote", "v2", "v1", "v2"),
        ("rollback", "v1", "v2", "v1"),
    ]
    assert history[1]["metrics"] == {"accuracy": 0.71} and history[2]["reasons"] == [
        "bad predictions in prod"
    ]
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)


def test_rollback_edge_cases(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "v1")
    with pytest.raises(StorageError, match="no production pointer"):
        v.rollback(store, MODEL, "v1", reason="r", actor="a")
    v.promote(store, MODEL, "v1", expected_etag=None, actor="a", reason="r")

    same = v.rollback(store, MODEL, "v1", reason="r", actor="a")

    assert same["version"] == "v1" and len(v.promotion_history(store, MODEL)) == 1
    with pytest.raises(v.IncompleteVersionError):
        v.rollback(store, MODEL, "never-published", reason="r", actor="a")


def test_promotion_log_entries_are_separate_immutable_objects(store: ObjectStore) -> None:
    keys = [v.append_promotion_log(store, MODEL, {"version": "v1", "action": "promote"}) for _ in range(3)]

    assert len(set(keys)) == 3
    assert all(re.fullmatch(rf"{MODEL}/promotions/\d{{8}}T\d{{6}}\.\d{{6}}Z-v1\.json", k) for k in keys)
    with pytest.raises(ObjectExistsError):
        store.put_json(keys[0], {"tampered": True}, if_none_match=True)


def test_list_versions_shows_complete_versions_and_production(store: ObjectStore, tmp_path: Path) -> None:
    _publish(store, tmp_path, "20261101T000000Z-aaaaaa", 0.5)
    _publish(store, tmp_path, "20261102T000000Z-bbbbbb", 0.6)
    store.put_bytes(f"{MODEL}/versions/20261103T000000Z-cccccc/model.keras", b"half")  # never completed
    v.promote(store, MODEL, "20261101T000000Z-aaaaaa", expected_etag=None, actor="a", reason="r")

    listed = v.list_versions(store, MODEL)

    assert [(x["version"], x["metrics"]["accuracy"], x["is_production"]) for x in listed] == [
        ("20261101T000000Z-aaaaaa", 0.5, True),
        ("20261102T000000Z-bbbbbb", 0.6, False),
    ]
    assert all(x["created_at"] for x in listed)
    assert listed[1]["candidate"] == "cand-20261102T000000Z-bbbbbb"
