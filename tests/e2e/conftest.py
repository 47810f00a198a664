from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import airflow_env

airflow_env.configure()


@pytest.fixture(scope="module")
def pipeline_env(seaweed, tmp_path_factory) -> Iterator[dict]:
    """Airflow home + a fresh bucket + a work dir, wired to the DAG through env and a connection."""
    from ml.registry.store import ObjectStore

    airflow_env.migrate()
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    store = ObjectStore(bucket, endpoint_url=seaweed.endpoint_url, access_key=seaweed.access_key,
                        secret_key=seaweed.secret_key)
    store.ensure_bucket()
    work = tmp_path_factory.mktemp("work")
    conn = {"conn_type": "aws", "login": seaweed.access_key, "password": seaweed.secret_key,
            "extra": {"endpoint_url": seaweed.endpoint_url}}
    # No deadline alert under dag.test(): Airflow 3.3's dag.test() builds its scheduler DAG from an
    # in-memory serialization, whose alerts are dicts, not the database ids DagRun.update_state looks
    # up (AttributeError: 'dict' object has no attribute 'hex' when the run finishes). The scheduler
    # reads the DAG from the database and gets ids: tests/dags/test_dag_integrity.py checks that path.
    env = {"AIRFLOW_CONN_ML_OBJECT_STORE": json.dumps(conn), "ML_S3_BUCKET": bucket,
           "ML_S3_ENDPOINT_URL": seaweed.endpoint_url, "ML_WORK_DIR": str(work), "ML_MAX_RUN_MINUTES": "none"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"store": store, "work": Path(work), "bucket": bucket, "seaweed": seaweed}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
