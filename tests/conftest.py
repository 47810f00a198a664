"""Shared fixtures: one real SeaweedFS per test session, and a fresh bucket per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# Tests never consult a cloud metadata service for credentials (it would hang offline).
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A `weed mini` on loopback with generated credentials, shared by the whole session."""
    from ml.errors import StorageError
    from ml.registry.seaweed import SeaweedServer, find_weed

    try:
        find_weed()
    except StorageError as exc:
        pytest.skip(f"SeaweedFS is not installed: {exc}")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start(timeout=90)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(seaweed: object) -> object:
    """An ObjectStore on a new, empty bucket of the session's SeaweedFS."""
    from ml.registry.store import ObjectStore

    s = ObjectStore(
        f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=seaweed.endpoint_url,  # type: ignore[attr-defined]
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
    )  # type: ignore[attr-defined]
    s.ensure_bucket()
    return s
