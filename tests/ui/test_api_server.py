"""The registry plugin as a real api-server serves it: login required, safe headers, generic errors."""

from __future__ import annotations

import pytest

from tests.ui.conftest import HOSTILE_LABEL, PRIVATE_MARKERS, RUN_ID, VERSION

pytestmark = pytest.mark.ui

ARTIFACTS = ("runs/manual__r1/report.html", "runs/manual__r1/quality/quality.html",
             f"versions/{VERSION}/model_card.html", "runs/manual__r1/scratch_small/curves.png",
             "runs/manual__r1/scratch_small/metrics.json", "runs/manual__r1/scratch_small/confusion.csv",
             f"versions/{VERSION}/lineage.json")


def plugin_urls() -> list[str]:
    """Every route of the plugin's app, path parameters filled in (a route added later is covered too)."""
    from fastapi.routing import APIRoute

    from plugins.model_registry_plugin import URL_PREFIX, create_app

    samples = {"run_id": RUN_ID, "path": f"versions/{VERSION}/lineage.json"}
    urls = []
    for route in create_app().routes:
        if isinstance(route, APIRoute):
            url = route.path_format
            for name in route.param_convertors:
                url = url.replace("{" + name + "}", samples[name])
            urls.append(URL_PREFIX + url)
    assert len(urls) >= 4, urls
    return urls


def _assert_no_registry_data(body: str, where: str, server) -> None:
    for marker in (*PRIVATE_MARKERS, server.bucket, server.switch.endpoint):
        assert marker not in body, (where, marker)


def test_anonymous_callers_get_no_registry_data_on_any_route(ui_server):
    for url in plugin_urls() + [f"/model-registry/artifact/{path}" for path in ARTIFACTS]:
        api = ui_server.request("GET", url, headers={"Accept": "application/json"})
        assert api.status in (401, 403), (url, api.status)
        _assert_no_registry_data(api.text, url, ui_server)
        assert api.headers["x-content-type-options"] == "nosniff", url

        # A browser without a session is sent to Airflow's login page, which brings it back.
        page = ui_server.request("GET", url, headers={"Accept": "text/html,*/*;q=0.8"})
        assert page.status == 303, (url, page.status)
        assert page.headers["location"].startswith("/auth/login?next=%2Fmodel-registry%2F"), page.headers["location"]
        _assert_no_registry_data(page.text, url, ui_server)

        for forged in ("Bearer not-a-jwt", "Bearer " + ui_server.token()[:-4] + "AAAA"):
            bad = ui_server.request("GET", url, headers={"Authorization": forged, "Accept": "application/json"})
            assert bad.status in (401, 403), (url, forged[:12], bad.status)
            _assert_no_registry_data(bad.text, url, ui_server)


def test_a_logged_in_user_sees_every_route(ui_server):
    for url in plugin_urls():
        response = ui_server.request("GET", url, token=ui_server.token())
        assert response.status == 200, (url, response.status, response.text[:300])
    overview = ui_server.request("GET", "/model-registry/", token=ui_server.token())
    assert VERSION in overview.text and "0.817" in overview.text
    # The UI's own session cookie works as well as a Bearer token.
    with_cookie = ui_server.request("GET", "/model-registry/api/summary", cookie=f"_token={ui_server.token()}")
    assert with_cookie.status == 200 and VERSION in with_cookie.text


def test_pages_and_artifacts_carry_the_security_headers(ui_server):
    token = ui_server.token()
    for url in ("/model-registry/", f"/model-registry/runs/{RUN_ID}"):
        response = ui_server.request("GET", url, token=token)
        assert response.headers["content-security-policy"] == (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'self'; "
            "base-uri 'none'; form-action 'none'"), url
        assert response.headers["x-content-type-options"] == "nosniff", url
        assert response.headers["referrer-policy"] == "no-referrer", url
    for path in ARTIFACTS:
        response = ui_server.request("GET", f"/model-registry/artifact/{path}", token=token)
        assert response.status == 200, (path, response.status)
        csp = response.headers["content-security-policy"]
        assert csp.startswith("sandbox;") and "default-src 'none'" in csp and "script-src" not in csp, (path, csp)
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer", path
        if path.endswith((".json", ".csv")):
            assert not response.headers["content-type"].startswith("text/html"), path
        if path.endswith(".csv"):
            assert response.headers["content-disposition"].startswith("attachment;"), path
    report = ui_server.request("GET", f"/model-registry/artifact/runs/{RUN_ID}/report.html", token=token)
    assert HOSTILE_LABEL in report.text  # stored as is: the sandbox, not escaping here, keeps it inert
    assert 'src="data:image/png;base64,' in report.text


def test_store_down_is_a_502_that_names_no_endpoint(ui_server):
    token = ui_server.token()
    ui_server.switch.down = True
    try:
        for url in ("/model-registry/", "/model-registry/api/summary", f"/model-registry/runs/{RUN_ID}",
                    f"/model-registry/artifact/runs/{RUN_ID}/report.html"):
            response = ui_server.request("GET", url, token=token)
            assert response.status == 502, (url, response.status, response.text[:300])
            assert "object store is unavailable" in response.text, url
            for leak in (ui_server.switch.endpoint, f":{ui_server.switch.port}", "127.0.0.1", ui_server.bucket,
                         "s3://", "EndpointConnectionError"):
                assert leak not in response.text, (url, leak)
            assert response.headers["x-content-type-options"] == "nosniff", url
    finally:
        ui_server.switch.down = False
    assert ui_server.request("GET", "/model-registry/", token=token).status == 200
