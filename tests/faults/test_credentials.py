"""Fault 7: wrong or revoked credentials (S3 for real, Kaggle through a fake at the API boundary).

A rejected credential must give one clear error naming the endpoint (or Kaggle source), must not
be retried many times (HTTP requests are counted at botocore's send hook), and the secret must
never appear in a log line (DEBUG, botocore included), an exception, an artifact in the work
dir or an object in the store.
"""

from __future__ import annotations

import logging
import traceback
import uuid

import pytest

from ml.errors import SourceError, StorageError
from tests.faults.conftest import MODEL, new_bucket_name, run_to_gate, start_weed, store_for, tiny_config

pytestmark = pytest.mark.faults

REAL_SECRET = "Fault7RealSecret" + uuid.uuid4().hex  # recognisable, and valid on this module's store
WRONG_SECRET = "Fault7WrongSecret" + uuid.uuid4().hex
KAGGLE_KEY = "Fault7KaggleKey" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def secret_server(tmp_path_factory):
    server = start_weed(tmp_path_factory.mktemp("weed"), access_key="FAULT7ACCESSKEY00001", secret_key=REAL_SECRET)
    try:
        yield server
    finally:
        server.stop()


def _count_requests(store) -> list[str]:
    """Every HTTP request the store's client sends (retries included)."""
    sent: list[str] = []
    store._client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    return sent


def _log_text(caplog) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info:
            parts.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(parts)


def _files_containing(root, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _debug_logs(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("botocore", "boto3", "urllib3", "ml"):
        caplog.set_level(logging.DEBUG, logger=name)


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
@pytest.mark.parametrize("stage", ["should_train", "ingest_s3", "publish"])
def test_rejected_s3_credentials_fail_once_clearly_and_never_leak(secret_server, tmp_path, caplog, wrong, stage):
    from ml import pipeline as P

    bucket = new_bucket_name()
    store_for(secret_server, bucket)  # the bucket exists; only the credentials are wrong
    creds = {"secret_key": WRONG_SECRET} if wrong == "secret" else {"access_key": "FAULT7REVOKEDKEY0001"}
    bad = store_for(secret_server, bucket, create=False, **creds)
    config = tiny_config(tmp_path / "work", bucket, secret_server.endpoint_url)
    sent = _count_requests(bad)
    _debug_logs(caplog)

    with pytest.raises(StorageError) as failure:
        if stage == "should_train":
            P.should_train({"dataset_hash": "0" * 64}, config, bad)
        elif stage == "ingest_s3":
            P.ingest_stage(config, bad, source=f"s3://{bucket}/datasets/dogs")
        else:
            (tmp_path / "summary.json").write_text("{}")
            bad.put_file(f"{MODEL}/runs/r/scratch_tiny/train_summary.json", tmp_path / "summary.json")

    message = str(failure.value)
    assert f"credentials for {secret_server.endpoint_url} were rejected" in message
    assert "AWS_SECRET_ACCESS_KEY or the Airflow connection" in message
    assert len(sent) == 1, f"an auth failure was sent {len(sent)} times: {sent}"
    text = "\n".join([message, repr(failure.value), "".join(traceback.format_exception(failure.value)),
                      _log_text(caplog)])
    for secret in (WRONG_SECRET, REAL_SECRET):
        assert secret not in text
        assert _files_containing(tmp_path, secret) == []


def test_secret_never_in_logs_artifacts_or_store_after_a_full_run(secret_server, sample_source, tmp_path, caplog):
    from ml.pipeline import promote_stage

    bucket = new_bucket_name()
    store = store_for(secret_server, bucket)
    config = tiny_config(tmp_path / "work", bucket, secret_server.endpoint_url, source=sample_source)
    _debug_logs(caplog)

    run = run_to_gate(config, store, "run-secret", validate=True)
    result = promote_stage(run["dataset"], run["evaluation"], run["decision"], config, store, "run-secret",
                           quality=run["quality"])

    assert result["promoted"] is True
    assert REAL_SECRET not in _log_text(caplog)
    assert REAL_SECRET not in repr(store) and REAL_SECRET not in repr(secret_server)
    assert _files_containing(tmp_path / "work", REAL_SECRET) == []
    keys = store.list_keys("")
    assert len(keys) > 20
    leaked = [k for k in keys if REAL_SECRET.encode() in store.get_bytes(k)]
    assert leaked == []
    assert REAL_SECRET not in str(result) and REAL_SECRET not in str(run["decision"])


class _FakeResponse:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


class FakeKaggleApi:
    """The Kaggle client at its API boundary: rejects the key the way the real one reports it."""

    calls: list[str] = []

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def authenticate(self) -> None:
        import os

        import requests

        FakeKaggleApi.calls.append("authenticate")
        key = os.environ.get("KAGGLE_KEY", "")
        if self.mode == "revoked":
            raise requests.HTTPError(f"401 Client Error: Unauthorized for url: https://www.kaggle.com/api/v1/"
                                     f"competitions/list?key={key}", response=_FakeResponse(401))

    def competition_download_files(self, name: str, path: str, quiet: bool = True) -> None:
        import os

        FakeKaggleApi.calls.append("download")
        raise RuntimeError(f"upstream refused token {os.environ.get('KAGGLE_KEY')} for {name}")


@pytest.mark.parametrize("mode", ["revoked", "garbled"])
def test_rejected_kaggle_key_fails_once_clearly_and_never_leaks(monkeypatch, tmp_path, caplog, mode):
    import os

    from ml import pipeline as P
    from ml.data import kaggle

    FakeKaggleApi.calls = []
    monkeypatch.setattr(kaggle, "api_factory", lambda: FakeKaggleApi(mode))
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    config = tiny_config(tmp_path / "work", "unused-bucket", None)
    _debug_logs(caplog)

    with pytest.raises(SourceError) as failure:
        P.ingest_stage(config, None, source="kaggle:competitions/dog-breed-identification",
                       kaggle_credentials=("fault7user", KAGGLE_KEY))

    message = str(failure.value)
    assert "competitions/dog-breed-identification" in message
    if mode == "revoked":
        assert "refused the credentials" in message and "401" in message
        assert FakeKaggleApi.calls == ["authenticate"]
    else:
        assert "***" in message
        assert FakeKaggleApi.calls == ["authenticate", "download"]
    assert "KAGGLE_KEY" not in os.environ, "the key was left in the environment"
    text = "\n".join([message, "".join(traceback.format_exception(failure.value)), _log_text(caplog)])
    assert KAGGLE_KEY not in text
    assert _files_containing(tmp_path, KAGGLE_KEY) == []
