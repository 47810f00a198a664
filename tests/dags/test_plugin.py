"""The Airflow UI plugin serves the registry from object storage (FastAPI app, in process)."""

from __future__ import annotations

import json

import pytest

MODEL = "image-classifier"


@pytest.fixture
def registry(store, seaweed, tmp_path, monkeypatch):
    """A store holding one promoted version, a promotion log entry and a run report."""
    from ml.registry.versions import append_promotion_log, make_pointer, publish_version, swap_pointer

    files = {}
    for name, body in (("model.keras", b"not really a model"), ("labels.json", b'["cat", "dog"]'),
                       ("model_card.html", b"<html>card</html>")):
        (tmp_path / name).write_bytes(body)
        files[name] = tmp_path / name
    version = "20261123T170000Z-abc123"
    publish_version(store, MODEL, version, files, {"candidate": "scratch_small", "run_id": "manual__r1",
                                                   "metrics": {"accuracy": 0.8125, "log_loss": 0.5}})
    swap_pointer(store, MODEL, make_pointer(store, MODEL, version, candidate="scratch_small"), expected_etag=None)
    append_promotion_log(store, MODEL, {"action": "promote", "version": version, "from": None, "to": version,
                                        "run_id": "manual__r1", "reasons": ["first model: accuracy 0.812 > chance"]})
    report = {"run_id": "manual__r1", "decision": {"promoted": True, "version": version,
                                                   "reasons": ["first model: accuracy 0.812 > chance"]},
              "leaderboard": [{"rank": 1, "candidate": "scratch_small", "accuracy": 0.8125},
                              {"rank": 2, "candidate": "transfer_mobilenet_v2", "accuracy": 0.5}]}
    store.put_json(f"{MODEL}/runs/manual__r1/report.json", report)
    store.put_bytes(f"{MODEL}/runs/manual__r1/scratch_small/curves.png", b"\x89PNG fake")
    conn = {"conn_type": "aws", "login": seaweed.access_key, "password": seaweed.secret_key,
            "extra": {"endpoint_url": seaweed.endpoint_url}}
    monkeypatch.setenv("AIRFLOW_CONN_ML_OBJECT_STORE", json.dumps(conn))
    monkeypatch.setenv("ML_S3_BUCKET", store.bucket)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    return version


@pytest.fixture
def client():
    from fastapi.testclient import TestClient

    from plugins.model_registry_plugin import create_app

    return TestClient(create_app())


def test_overview_shows_production_versions_and_decisions(registry, client):
    page = client.get("/")

    assert page.status_code == 200
    assert registry in page.text
    assert "0.812" in page.text
    assert "first model: accuracy 0.812 &gt; chance" in page.text
    assert "manual__r1" in page.text


def test_run_page_shows_leaderboard_with_plot_links(registry, client):
    page = client.get("/runs/manual__r1")

    assert page.status_code == 200
    assert "transfer_mobilenet_v2" in page.text
    assert "/model-registry/artifact/runs/manual__r1/scratch_small/curves.png" in page.text
    assert client.get("/artifact/runs/manual__r1/scratch_small/curves.png").content == b"\x89PNG fake"


def test_models_and_escapes_are_not_served(registry, client):
    assert client.get(f"/artifact/versions/{registry}/model.keras").status_code == 403
    assert client.get("/artifact/runs/../production.json").status_code in (403, 404)
    assert client.get(f"/artifact/versions/{registry}/model_card.html").status_code == 200


def test_plugin_registers_an_external_view_and_the_app():
    from plugins.model_registry_plugin import ModelRegistryPlugin

    assert ModelRegistryPlugin.fastapi_apps[0]["url_prefix"] == "/model-registry"
    assert ModelRegistryPlugin.external_views[0]["href"] == "/model-registry/"
