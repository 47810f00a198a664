"""Airflow UI plugin: a "Model registry" page (production model, versions, gate decisions, runs).

A FastAPI app mounted by the api-server at /model-registry, shown inside the Airflow UI as an
external view (navigation: Browse → Model registry). Pages are rendered by
`ml.registry.browser` from what the pipeline published to object storage; credentials come
from the `ml_object_store` connection (or the environment), as in the DAG.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/model-registry"


def _store():
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from ml.config import PipelineConfig
    from ml.registry.store import ObjectStore

    config = PipelineConfig.load()
    try:
        conn = Connection.get_connection_from_secrets("ml_object_store")
    except AirflowNotFoundException:
        return ObjectStore.from_config(config.storage), config.storage.model_name
    extra = conn.extra_dejson
    store = ObjectStore(config.storage.bucket, endpoint_url=extra.get("endpoint_url") or config.storage.endpoint_url,
                        access_key=conn.login, secret_key=conn.password,
                        region=extra.get("region_name") or config.storage.region)
    return store, config.storage.model_name


def create_app():
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response

    from ml.errors import StorageError
    from ml.registry import browser

    app = FastAPI(title="Model registry", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def overview() -> str:
        store, model = _store()
        try:
            return browser.render_overview(store, model, base_url=URL_PREFIX)
        except StorageError as exc:
            raise HTTPException(status_code=502, detail=f"object store unavailable: {exc}") from None

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(run_id: str) -> str:
        store, model = _store()
        try:
            return browser.render_run(store, model, run_id, base_url=URL_PREFIX)
        except PermissionError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @app.get("/artifact/{path:path}")
    def artifact(path: str) -> Response:
        store, model = _store()
        try:
            body, content_type = browser.read_artifact(store, model, path)
        except PermissionError as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        except StorageError:
            raise HTTPException(status_code=404, detail=f"no artifact {path}") from None
        return Response(content=body, media_type=content_type)

    @app.get("/api/summary")
    def summary() -> dict:
        store, model = _store()
        return browser.registry_summary(store, model)

    return app


class ModelRegistryPlugin(AirflowPlugin):
    name = "model_registry"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Model registry"}]
    external_views = [{
        "name": "Model registry",
        "href": f"{URL_PREFIX}/",
        "url_route": "model-registry",
        "destination": "nav",
        "category": "browse",
    }]
