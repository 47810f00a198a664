"""ObjectStore against a real SeaweedFS: conditional writes, reads, listing, errors, secrets."""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from ml.config import StorageConfig
from ml.errors import ObjectExistsError, PromotionConflict, StorageError
from ml.registry.store import MissingObjectError, ObjectStore


def test_put_and_get_round_trip(store: ObjectStore) -> None:
    etag = store.put_bytes("a/b.bin", b"\x00\x01payload", content_type="application/octet-stream")

    data, read_etag = store.get_with_etag("a/b.bin")

    assert data == b"\x00\x01payload"
    assert read_etag == etag
    assert store.head("a/b.bin")["size"] == 9
    assert store.head("a/b.bin")["content_type"] == "application/octet-stream"


def test_put_json_and_get_json(store: ObjectStore) -> None:
    store.put_json("m/meta.json", {"b": 2, "a": [1, 2]})

    assert store.get_json("m/meta.json") == {"a": [1, 2], "b": 2}
    assert store.head("m/meta.json")["content_type"] == "application/json"


def test_get_json_on_invalid_json_names_the_key(store: ObjectStore) -> None:
    store.put_bytes("bad.json", b"{not json")

    with pytest.raises(StorageError, match=r"bad\.json is not valid JSON"):
        store.get_json("bad.json")


def test_put_file_and_download_file(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * (3 * 1024 * 1024 + 7))  # > 1 MiB so the download streams several chunks
    store.put_file("files/src.bin", src)

    dest = store.download_file("files/src.bin", tmp_path / "out" / "dest.bin")

    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.bin"]  # no temp file left


def test_download_of_missing_key_leaves_nothing(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(MissingObjectError):
        store.download_file("nope.bin", tmp_path / "dest.bin")

    assert list(tmp_path.iterdir()) == []


def test_missing_key_reads(store: ObjectStore) -> None:
    assert store.get_with_etag("missing") is None
    assert store.head("missing") is None
    assert store.exists("missing") is False
    with pytest.raises(KeyError, match="missing does not exist"):
        store.get_bytes("missing")


def test_if_none_match_refuses_second_write_and_keeps_first(store: ObjectStore) -> None:
    store.put_bytes("immutable", b"first", if_none_match=True)

    with pytest.raises(ObjectExistsError, match=r"immutable refused: the key already exists"):
        store.put_bytes("immutable", b"second", if_none_match=True)

    assert store.get_bytes("immutable") == b"first"


def test_if_match_succeeds_with_current_etag_and_conflicts_with_stale(store: ObjectStore) -> None:
    first = store.put_bytes("pointer", b"v1")
    second = store.put_bytes("pointer", b"v2", if_match=first)

    with pytest.raises(PromotionConflict, match="no longer has ETag"):
        store.put_bytes("pointer", b"v3", if_match=first)

    assert second != first
    assert store.get_with_etag("pointer") == (b"v2", second)


def test_if_match_on_missing_key_conflicts(store: ObjectStore) -> None:
    with pytest.raises(PromotionConflict):
        store.put_bytes("never-written", b"x", if_match='"0123456789abcdef0123456789abcdef"')

    assert not store.exists("never-written")


def test_both_conditions_at_once_are_refused(store: ObjectStore) -> None:
    with pytest.raises(StorageError, match="not both"):
        store.put_bytes("k", b"x", if_none_match=True, if_match='"abc"')


def test_racing_if_none_match_writers_exactly_one_wins(store: ObjectStore) -> None:
    barrier = threading.Barrier(6)
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes("race", f"writer {i}".encode(), if_none_match=True)
            result = f"won {i}"
        except ObjectExistsError:
            result = "lost"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 5
    assert store.get_bytes("race") == f"writer {winners[0].split()[1]}".encode()


def test_list_keys_paginates_and_filters_by_prefix(store: ObjectStore) -> None:
    expected = [f"p/{i:02d}" for i in range(7)]
    for key in expected + ["q/other"]:
        store.put_bytes(key, b"x")

    assert store.list_keys("p/", page_size=2) == expected
    assert store.list_keys("nothing/") == []


def test_upload_dir_then_delete_prefix(store: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")

    keys = store.upload_dir(tmp_path, "run/1/")
    uploaded = store.get_bytes("run/1/sub/b.txt")
    deleted = store.delete_prefix("run/1/")

    assert keys == ["run/1/a.txt", "run/1/sub/b.txt"]
    assert uploaded == b"b"
    assert deleted == 2
    assert store.list_keys("run/") == []


def test_delete_is_idempotent_and_empty_prefix_refused(store: ObjectStore) -> None:
    store.put_bytes("gone", b"x")
    store.delete("gone")
    store.delete("gone")

    assert not store.exists("gone")
    with pytest.raises(StorageError, match="non-empty prefix"):
        store.delete_prefix("")


def test_ensure_bucket_is_idempotent_and_for_bucket_shares_endpoint(store: ObjectStore) -> None:
    other = store.for_bucket(store.bucket + "-other")
    other.ensure_bucket()
    other.ensure_bucket()
    other.put_bytes("k", b"other")

    assert other.bucket in store.list_buckets()
    assert not store.exists("k")


def test_missing_bucket_says_so(store: ObjectStore) -> None:
    missing = store.for_bucket("no-such-bucket-here")

    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist.*ensure_bucket"):
        missing.put_bytes("k", b"x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        missing.get_bytes("k")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/key", ("bucket", "key")),
        ("s3://bucket/a/b/c.json", ("bucket", "a/b/c.json")),
        ("s3://bucket", ("bucket", "")),
    ],
)
def test_parse_uri(uri: str, expected: tuple[str, str]) -> None:
    assert ObjectStore.parse_uri(uri) == expected


@pytest.mark.parametrize("uri", ["http://bucket/key", "s3:///key", "bucket/key"])
def test_parse_uri_rejects_non_s3(uri: str) -> None:
    with pytest.raises(StorageError, match="s3://"):
        ObjectStore.parse_uri(uri)


def test_uri_round_trips(store: ObjectStore) -> None:
    assert ObjectStore.parse_uri(store.uri("x/y.json")) == (store.bucket, "x/y.json")


def test_rejected_credentials_never_leak_the_secret(seaweed, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Sup3rSecretValueThatMustNotLeak0123456789"
    bad = ObjectStore(
        "any-bucket", endpoint_url=seaweed.endpoint_url, access_key=seaweed.access_key, secret_key=secret
    )
    caplog.set_level(logging.DEBUG)

    with pytest.raises(StorageError) as info:
        bad.put_bytes("k", b"x")

    text = str(info.value)
    assert "credentials for http://127.0.0.1" in text and "were rejected" in text
    assert secret not in text and secret not in repr(info.value) and secret not in repr(bad)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert secret not in caplog.text


def test_unknown_access_key_is_rejected(seaweed) -> None:
    bad = ObjectStore(
        "any-bucket", endpoint_url=seaweed.endpoint_url, access_key="NOTAKEY", secret_key="whatever-secret"
    )

    with pytest.raises(StorageError, match=r"were rejected \(InvalidAccessKeyId\)"):
        bad.list_buckets()


def test_unreachable_endpoint_names_it() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = ObjectStore(
        "b-bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="a",
        secret_key="s",
        connect_timeout=1,
        max_attempts=1,
    )

    with pytest.raises(StorageError, match=f"cannot reach object store endpoint http://127.0.0.1:{port}"):
        dead.get_bytes("k")


def test_from_config_takes_credentials_from_env(seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    config = StorageConfig(bucket="from-config-bucket", endpoint_url=seaweed.endpoint_url)

    s = ObjectStore.from_config(config)
    s.ensure_bucket()
    s.put_json("x.json", {"ok": True})

    assert s.bucket == "from-config-bucket"
    assert json.loads(s.get_bytes("x.json")) == {"ok": True}


def test_store_from_credentials_prefers_the_connection_then_the_environment(monkeypatch) -> None:
    from ml.config import StorageConfig
    from ml.registry.store import store_from_credentials

    storage = StorageConfig(bucket="b", endpoint_url="http://config:1", region="eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENV_KEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENV_SECRET")

    from_conn = store_from_credentials(storage, login="CONN_KEY", password="CONN_SECRET",
                                       extra={"endpoint_url": "http://conn:2", "region_name": "us-west-2"})
    from_env = store_from_credentials(storage)

    assert (from_conn.endpoint_url, from_conn.region, from_conn._access_key) == ("http://conn:2", "us-west-2",
                                                                                 "CONN_KEY")
    assert (from_env.endpoint_url, from_env.region, from_env._access_key) == ("http://config:1", "eu-west-1",
                                                                              "ENV_KEY")
    assert "SECRET" not in repr(from_conn) + repr(from_env)
