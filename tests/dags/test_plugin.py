"""The Airflow UI plugin serves the registry from object storage (FastAPI app, in process)."""

from __future__ import annotations

import json
import os

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
    """The app as a logged-in user with access sees it (Airflow's access check overridden)."""
    from fastapi.testclient import TestClient

    from plugins.model_registry_plugin import create_app

    app = create_app()
    app.dependency_overrides[app.state.require_access] = lambda: None
    return TestClient(app)


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


def _route_urls(app) -> list[str]:
    """One concrete URL per route of the app (path parameters filled), so a new route is covered too."""
    from fastapi.routing import APIRoute

    samples = {"run_id": "manual__r1", "path": "runs/manual__r1/scratch_small/curves.png"}
    urls = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            url = route.path_format
            for name in route.param_convertors:
                url = url.replace("{" + name + "}", samples[name])
            urls.append(url)
    return urls


def test_every_route_requires_an_airflow_login(registry, seaweed):
    """Without Airflow's access check overridden, nothing is served to an anonymous caller."""
    from fastapi.testclient import TestClient

    from plugins.model_registry_plugin import create_app

    app = create_app()
    urls = _route_urls(app)
    assert {"/", "/runs/manual__r1", "/api/summary"} <= set(urls) and len(urls) >= 4, urls
    anonymous = TestClient(app)
    for url in urls:
        response = anonymous.get(url)
        assert response.status_code in (401, 403), (url, response.status_code)
        for secret in (registry, "manual__r1", "0.812", seaweed.endpoint_url, "PNG"):
            assert secret not in response.text, (url, secret)
        assert response.headers["x-content-type-options"] == "nosniff", url
        assert "default-src 'none'" in response.headers["content-security-policy"], url


def test_every_response_carries_the_security_headers(registry, client, store):
    store.put_bytes(f"{MODEL}/runs/manual__r1/gate.json", b'{"promoted": true}')
    store.put_bytes(f"{MODEL}/runs/manual__r1/scratch_small/confusion.csv", b"true,pred\ncat,dog\n")
    for url in [*_route_urls(client.app), "/artifact/runs/manual__r1/gate.json",
                "/artifact/runs/manual__r1/scratch_small/confusion.csv", "/artifact/runs/manual__r1/missing.png",
                f"/artifact/versions/{registry}/model.keras"]:
        response = client.get(url)
        assert response.headers["x-content-type-options"] == "nosniff", url
        assert response.headers["referrer-policy"] == "no-referrer", url
        assert response.headers["cache-control"] == "no-store", url
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp, (url, csp)
        assert "frame-ancestors 'self'" in csp, (url, csp)
    for url in ("/", "/runs/manual__r1"):
        assert "sandbox" not in client.get(url).headers["content-security-policy"]  # pages of the plugin itself
    for url in ("/artifact/runs/manual__r1/gate.json", "/artifact/runs/manual__r1/scratch_small/confusion.csv",
                "/artifact/runs/manual__r1/scratch_small/curves.png", f"/artifact/versions/{registry}/model_card.html"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-security-policy"].startswith("sandbox;"), url
    csv = client.get("/artifact/runs/manual__r1/scratch_small/confusion.csv")
    assert csv.headers["content-disposition"] == 'attachment; filename="confusion.csv"'
    assert client.get("/artifact/runs/manual__r1/gate.json").headers["content-type"] == "application/json"


def test_stored_html_gets_its_images_embedded_and_runs_no_script(registry, client, store):
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    store.put_bytes(f"{MODEL}/runs/manual__r1/scratch_small/confusion.png", png)
    label = "<script>alert(1)</script>"
    page = (f"<html><body><p>{label}</p><img src=\"scratch_small/confusion.png\" alt=\"c\">"
            "<img src='https://example.invalid/x.png'><img src=\"../../versions/x/model.keras.png\"></body></html>")
    store.put_bytes(f"{MODEL}/runs/manual__r1/report.html", page.encode())

    response = client.get("/artifact/runs/manual__r1/report.html")

    assert response.status_code == 200
    assert 'src="data:image/png;base64,iVBORw0KGgo' in response.text
    assert "https://example.invalid/x.png" in response.text  # left alone: the CSP stops it loading
    csp = response.headers["content-security-policy"]
    assert csp.startswith("sandbox;") and "img-src data:;" in csp and "script-src" not in csp


def test_store_errors_do_not_reveal_the_endpoint(registry, client, monkeypatch):
    """A store that is down (or a wrong endpoint) is a 502 with a generic text; details go to the log."""
    from scripts.airflow_stack import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": endpoint}}
    monkeypatch.setenv("AIRFLOW_CONN_ML_OBJECT_STORE", json.dumps(conn))
    for url in ("/", "/runs/manual__r1", "/api/summary", "/artifact/runs/manual__r1/report.html"):
        response = client.get(url)
        # browser.render_run shows "no report for run" for any StorageError, so that page is a 200.
        if url != "/runs/manual__r1":
            assert response.status_code == 502, (url, response.status_code)
            assert "object store is unavailable" in response.text
        assert endpoint not in response.text and "127.0.0.1" not in response.text, (url, response.text)
        assert os.environ["ML_S3_BUCKET"] not in response.text, url


def test_plugin_module_imports_no_fastapi_until_the_app_is_asked_for():
    """Every Airflow component imports plugins; only the api-server needs the app."""
    import subprocess
    import sys

    from tests.airflow_env import REPO

    code = ("import json, sys; import plugins.model_registry_plugin as p; "
            "before = sorted({'fastapi', 'airflow.api_fastapi.core_api.security'} & set(sys.modules)); "
            "p.ModelRegistryPlugin().fastapi_apps; "
            "print(json.dumps([before, 'airflow.api_fastapi.core_api.security' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], True], out.stdout + out.stderr[-2000:]


def test_overview_links_a_versions_kaggle_submission_and_serves_it(registry, store, tmp_path, client):
    from ml.registry.versions import publish_version

    assert "submission.csv" not in client.get("/").text  # the fixture's version has none
    files = {}
    for name, body in (("model.keras", b"not a model"), ("submission.csv", b"id,cat,dog\na1,0.9,0.1\n")):
        (tmp_path / name).write_bytes(body)
        files[name] = tmp_path / name
    version = "20261124T090000Z-def456"
    publish_version(store, MODEL, version, files, {"candidate": "scratch_small", "run_id": "manual__r2",
                                                   "submission": {"rows": 1, "classes": 2}})

    link = f"/model-registry/artifact/versions/{version}/submission.csv"
    assert link in client.get("/").text
    served = client.get(link.removeprefix("/model-registry"))
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("text/csv")
    assert served.content == b"id,cat,dog\na1,0.9,0.1\n"
