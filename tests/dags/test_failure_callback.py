"""The failure callback records through the same store as the tasks: the `ml_object_store` connection."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest

from ml.registry import layout
from tests import airflow_env

MODEL = "image-classifier"


@pytest.fixture
def dag_module(store, seaweed, monkeypatch, tmp_path):
    """The DAG file's module with credentials ONLY in the connection (no AWS_* in the environment)."""
    conn = {"conn_type": "aws", "login": seaweed.access_key, "password": seaweed.secret_key,
            "extra": {"endpoint_url": seaweed.endpoint_url}}
    monkeypatch.setenv("AIRFLOW_CONN_ML_OBJECT_STORE", json.dumps(conn))
    monkeypatch.setenv("ML_S3_BUCKET", store.bucket)
    monkeypatch.setenv("ML_WORK_DIR", str(tmp_path / "work"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ML_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(airflow_env.REPO / "dags"))  # as the dag-processor has it
    return importlib.import_module("image_classifier_retraining")


def test_a_failed_task_is_recorded_in_the_store_with_connection_credentials(dag_module, store):
    run_id = "manual__2026-11-23T17:05:01+00:00"
    ti = SimpleNamespace(task_id="training.train", map_index=1, rendered_map_index="scratch_small")
    context = {"task_instance": ti, "run_id": run_id, "params": {}, "exception": ValueError("boom\nmore")}

    dag_module._on_failure(context)

    keys = store.list_keys(layout.run_key(MODEL, run_id, layout.FAILURES_DIR) + "/")
    assert len(keys) == 1
    entry = store.get_json(keys[0])
    assert entry["error"] == "task training.train [scratch_small] failed: ValueError: boom"
    assert entry["label"] == "scratch_small"


def test_failure_file_names_of_different_tasks_never_collide():
    from ml.registry.runs import _failure_file_name

    names = {_failure_file_name(t, label) for t, label in
             (("training.train", "a:b"), ("training.train", "a_b"), ("training.train", "a+b"), ("x", "y"))}

    assert len(names) == 4
    assert all(layout.is_name(n) for n in names)


def test_a_late_run_is_recorded_like_a_failed_task(dag_module, store):
    from _shared.alerts import record_late_run

    run_id = "scheduled__2026-11-23T00:00:00+00:00"
    ti = SimpleNamespace(task_id="training.train", map_index=0, rendered_map_index="scratch_small")
    dag_module._on_failure({"task_instance": ti, "run_id": run_id, "params": {}, "exception": ValueError("boom")})
    # What Airflow passes a deadline callback: the run as the REST API shows it, and the deadline
    # (Deadline.handle_miss: DAGRunResponse.model_dump, whose id field is dag_run_id; there is no run_id).
    from airflow.api_fastapi.core_api.datamodels.dag_run import DAGRunResponse

    assert "dag_run_id" in DAGRunResponse.model_fields and "run_id" not in DAGRunResponse.model_fields
    context = {"dag_run": {"dag_id": "image_classifier_retraining", "dag_run_id": run_id, "conf": {}},
               "deadline": {"id": "0199", "deadline_time": "2026-11-23T08:00:00+00:00"}}

    record_late_run(context=context, max_run_minutes=480)

    entries = [store.get_json(k) for k in store.list_keys(layout.run_key(MODEL, run_id, layout.FAILURES_DIR) + "/")]
    assert len(entries) == 2
    late = next(e for e in entries if e["task_id"] == "dag_run")
    task = next(e for e in entries if e["task_id"] == "training.train")
    assert set(late) == set(task)  # the same kind of record as a failed task's
    assert late["error"] == (f"run {run_id} missed its deadline 2026-11-23T08:00:00+00:00: still running after "
                             "its maximum run time of 480 min (ML_MAX_RUN_MINUTES)")
