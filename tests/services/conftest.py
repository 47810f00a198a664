"""Fixtures for tests that need this machine's PostgreSQL and Redis (marker `services`).

Each fixture skips with the reason when its service is unreachable, and owns what it creates:
a fresh database (dropped afterwards) and one empty Redis database index under a random key
prefix (its keys deleted afterwards). Endpoints: ML_TEST_PG_HOST/PORT/USER and
ML_TEST_REDIS_HOST/PORT/DB, default 127.0.0.1:5432 (user postgres, trust auth) and
127.0.0.1:6379 db 13.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.services.airflow_cluster import ScratchDatabase, ScratchRedis, tcp_reachable

PG_HOST = os.environ.get("ML_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("ML_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("ML_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("ML_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("ML_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("ML_TEST_REDIS_DB", "13"))


@pytest.fixture(scope="module")
def scratch_postgres() -> Iterator[ScratchDatabase]:
    """A fresh `ml_celery_test_<hex>` database, dropped (sessions included) at the end."""
    db = ScratchDatabase(PG_HOST, PG_PORT, PG_USER)
    reason = tcp_reachable(PG_HOST, PG_PORT, timeout=2) or db.check()
    if reason:
        pytest.skip(f"PostgreSQL is not usable: {reason}")
    db.create()
    try:
        yield db
    finally:
        db.drop()


@pytest.fixture(scope="module")
def scratch_redis() -> Iterator[ScratchRedis]:
    """Redis database REDIS_DB, only if empty; our prefixed keys are deleted at the end."""
    r = ScratchRedis(REDIS_HOST, REDIS_PORT, REDIS_DB)
    reason = tcp_reachable(REDIS_HOST, REDIS_PORT, timeout=2) or r.claim()
    if reason:
        pytest.skip(f"Redis is not usable: {reason}")
    try:
        yield r
    finally:
        leftovers = r.cleanup()
        if leftovers:
            # Not deleted: they are not under our prefix, so they may be someone else's.
            print(f"note: Redis db {r.db} still holds keys outside {r.prefix!r}: {leftovers[:10]}")
