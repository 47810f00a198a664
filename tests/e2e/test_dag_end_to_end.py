"""The retraining DAG end to end through Airflow (`dag.test()`) against a real SeaweedFS."""

from __future__ import annotations

import json

import pytest

from tests.airflow_env import REPO

pytestmark = pytest.mark.e2e

DAG_ID = "image_classifier_retraining"
MODEL = "image-classifier"


def _run(conf: dict):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags[DAG_ID]
    return dag.test(run_conf=conf)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from ml.data.sample import make_sample_dataset

    dest = tmp_path_factory.mktemp("sample") / "dog-breeds"
    make_sample_dataset(dest, classes=3, per_class=120, size=48, seed=3)
    return dest


def test_first_run_promotes_then_worse_challenger_keeps_production(pipeline_env, sample):
    store = pipeline_env["store"]
    conf = {"source": str(sample), "candidates": ["scratch_small", "transfer_mobilenet_v2"], "epochs": 20,
            "image_size": 48, "finetune_top_k": 1}

    first = _run(conf)

    assert first.state == "success"
    found = store.get_with_etag(f"{MODEL}/production.json")
    assert found is not None, "no production.json after the first run"
    pointer_bytes, etag = found
    pointer = json.loads(pointer_bytes)
    version_files = set(store.list_keys(f"{MODEL}/versions/{pointer['version']}/"))
    for name in ("COMPLETE", "model.keras", "labels.json", "preprocessing.json", "metrics.json", "lineage.json",
                 "model_card.html", "saved_model.zip", "golden.npz", "dataset_profile.json"):
        assert f"{MODEL}/versions/{pointer['version']}/{name}" in version_files, name
    _check_submission(store, pointer["version"], sample)
    report = store.get_json(f"{MODEL}/runs/{_safe(first.run_id)}/report.json")
    names = {row["candidate"] for row in report["leaderboard"]}
    assert {"scratch_small", "transfer_mobilenet_v2", "finetune_mobilenet_v2"} <= names
    # Tasks hand each other hashes, URIs and small dicts: nothing in XCom points at a worker's disk.
    xcom = _xcom_values(first.run_id)
    assert "data.ingest" in xcom and json.loads(xcom["data.ingest"])["dataset_uri"].startswith("s3://")
    for task, value in xcom.items():
        assert str(pipeline_env["work"]) not in value and "dataset_dir" not in value, (task, value[:300])

    # The promoted model loads through ml.serving and beats chance on the held-out split.
    from ml.serving.predictor import load_production
    from ml.serving.smoke import smoke_test

    predictor = load_production(store, MODEL, cache_dir=pipeline_env["work"] / "consumer")
    dataset_dir = pipeline_env["work"] / "datasets" / pointer["dataset_hash"]
    result = smoke_test(predictor, dataset_dir, n_images=100)
    assert result["accuracy"] > 1 / 3

    # A worse challenger (random frozen backbone, one epoch) must leave production untouched.
    second = _run({**conf, "candidates": ["transfer_mobilenet_v2"], "epochs": 1, "finetune_top_k": 0,
                   "force": True})

    assert second.state == "success"
    assert store.get_with_etag(f"{MODEL}/production.json") == (pointer_bytes, etag)
    decision = store.get_json(f"{MODEL}/runs/{_safe(second.run_id)}/gate.json")
    assert decision["promote"] is False
    assert decision["reasons"]
    drift = store.get_json(f"{MODEL}/runs/{_safe(second.run_id)}/drift.json")
    assert drift["findings"] == [] and drift["reference_dataset"] == pointer["dataset_hash"]
    from ml.registry.versions import promotion_history

    assert [entry["action"] for entry in promotion_history(store, MODEL)] == ["promote", "keep"]


def _check_submission(store, version: str, sample) -> None:
    """A Kaggle-layout source: the version carries submission.csv in the sample's column and row order."""
    import csv
    import io

    text = store.get_bytes(f"{MODEL}/versions/{version}/submission.csv").decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    expected = list(csv.reader((sample / "sample_submission.csv").open(encoding="utf-8")))
    assert rows[0] == expected[0]
    assert [r[0] for r in rows[1:]] == [r[0] for r in expected[1:]]
    for row in rows[1:]:
        assert abs(sum(float(p) for p in row[1:]) - 1.0) < 1e-4, row
    info = store.get_json(f"{MODEL}/versions/{version}/version.json")
    assert info["metadata"]["submission"]["rows"] == len(expected) - 1 and "submission.csv" in info["files"]


def test_same_data_again_skips_training(pipeline_env, sample):
    """Without force, a run on the dataset production was trained on stops before training."""
    store = pipeline_env["store"]
    before = store.get_with_etag(f"{MODEL}/production.json")
    if before is None:
        pytest.skip("needs the production model of the previous test")

    run = _run({"source": str(sample), "candidates": ["scratch_tiny"], "epochs": 1, "image_size": 48})

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["data.should_train"] == "success"
    assert states["training.train"] == "skipped"
    assert store.get_with_etag(f"{MODEL}/production.json") == before


def _xcom_values(run_id: str) -> dict[str, str]:
    """Every XCom value of a run as JSON text, by task (and map index)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == DAG_ID, XComModel.run_id == run_id).all()
        return {r.task_id + (f"[{r.map_index}]" if r.map_index >= 0 else ""): json.dumps(r.value, default=str)
                for r in rows}


def _safe(run_id: str) -> str:
    from ml.registry.layout import run_segment

    return run_segment(run_id)


def test_failing_quality_suite_stops_before_training(pipeline_env, tmp_path):
    """A dataset that fails a failing-severity expectation never reaches a training task."""
    from ml.data.sample import make_sample_dataset

    store = pipeline_env["store"]
    before = store.get_with_etag(f"{MODEL}/production.json")
    tiny = make_sample_dataset(tmp_path / "too-small", classes=2, per_class=3, size=32, seed=1)["dest"]

    run = _run({"source": str(tiny), "candidates": ["scratch_tiny"], "epochs": 1, "image_size": 32})

    states = {ti.task_id: (ti.state, ti.try_number) for ti in run.get_task_instances()}
    assert run.state == "failed"
    assert states["data.validate"] == ("failed", 1)  # deterministic: no retry
    assert states["training.train"][0] in ("upstream_failed", None)
    assert store.get_with_etag(f"{MODEL}/production.json") == before
