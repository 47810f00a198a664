"""Airflow UI plugin: a "Model registry" page (production model, versions, gate decisions, runs).

A FastAPI app mounted by the api-server at /model-registry, shown inside the Airflow UI as an
external view (navigation: Browse → Model registry). Pages are rendered by
`ml.registry.browser` from what the pipeline published to object storage; credentials come
from the `ml_object_store` connection (or the environment), as in the DAG.

Security (DESIGN.md invariant 7):

- Airflow does not authenticate plugin apps (a mounted app inherits no router dependencies), so
  this app requires, on every route, an Airflow user allowed to read the retraining DAG's runs,
  through Airflow's own security dependencies (Bearer token or the UI's `_token` cookie).
  Anonymous browsers are sent to the login page; anything else gets 401/403 and no data.
- Every response carries `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
  `Cache-Control: no-store` and a Content-Security-Policy that allows no script: the pages
  rendered here get `PAGE_CSP`; whatever is read from the store (reports, Great Expectations
  pages, JSON, CSV, plots) is served under `ARTIFACT_CSP`, i.e. in a CSP sandbox (an opaque
  origin: even a script that got into a stored page could neither run nor use the user's
  Airflow cookie). Images of stored HTML pages are embedded as data: URIs when served.
- Error texts are generic: the store's endpoint, bucket and exception text go to the
  api-server log only.

The app is built lazily, on first access of `ModelRegistryPlugin.fastapi_apps` (only the
api-server and `airflow plugins` read it), so the schedulers, workers and task processes that
import this module import neither FastAPI nor Airflow's API security module.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

URL_PREFIX = "/model-registry"
# The DAG whose runs publish the registry (dags/image_classifier_retraining.py; dag_id = file stem).
REGISTRY_DAG_ID = "image_classifier_retraining"

# Pages this plugin renders itself: styles inline, images from here or data:, no script at all,
# framed only by the Airflow UI (the external view is an iframe of the same origin).
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'self'; "
            "base-uri 'none'; form-action 'none'")
# Anything read from the store. `sandbox` gives the document an opaque origin and no scripts,
# forms, popups or top navigation; `default-src 'none'` also stops it loading anything (GX's
# Data Docs page links CSS from a CDN: it renders unstyled here, by design). Images are data:
# URIs only: a sandboxed document's requests do not carry the SameSite=Lax `_token` cookie, so
# same-origin image URLs come back 401 (measured with headless Chromium 156 and `img-src 'self'`:
# the report's <img> request reached the api-server without the cookie, 401, a broken image).
ARTIFACT_CSP = ("sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'; "
                "base-uri 'none'; form-action 'none'")
# Everything else (JSON API, errors, redirects): nothing may load or run.
DEFAULT_CSP = "sandbox; default-src 'none'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Registry data is per-user (behind a login): never kept by a shared cache or the back button.
    "Cache-Control": "no-store",
}

STORE_UNAVAILABLE = "the model registry's object store is unavailable; the api-server log has the details"
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


def _store() -> tuple[ObjectStore, str]:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from ml.config import PipelineConfig
    from ml.registry.store import store_from_credentials

    config = PipelineConfig.load()
    try:
        conn = Connection.get_connection_from_secrets("ml_object_store")
    except AirflowNotFoundException:
        return store_from_credentials(config.storage), config.storage.model_name
    store = store_from_credentials(config.storage, login=conn.login, password=conn.password,
                                   extra=conn.extra_dejson)
    return store, config.storage.model_name


def create_app() -> FastAPI:
    """The registry's FastAPI app; every route requires read access to the retraining DAG's runs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ml.errors import ConfigError, MissingObjectError, StorageError
    from ml.registry import browser

    # Who may see the registry: whoever may read the runs of the DAG that publishes it. Everything
    # shown here (production, versions, gate decisions, run reports, lineage with the actor) is
    # output of those runs, so this is the same line the Airflow UI draws for the runs themselves:
    # a role, team or custom auth-manager policy barred from that DAG is barred here too.
    # requires_authenticated() would admit any logged-in user (even one without that DAG), and no
    # AccessView fits (PLUGINS is about listing plugins, not reading their data).
    require_access = requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=REGISTRY_DAG_ID)

    # App-wide, so no route added later can forget it.
    app = FastAPI(title="Model registry", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_access)])
    app.state.require_access = require_access  # tests override it (app.dependency_overrides)
    app.add_middleware(SecurityHeadersMiddleware)

    def fail(status: int, public: str, what: str, exc: Exception) -> HTTPException:
        log.warning("model registry: %s: %s: %s", what, type(exc).__name__, exc)
        return HTTPException(status_code=status, detail=public)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # A browser without a session (no or expired cookie) is sent to Airflow's login page,
        # which brings it back here; scripts and API clients get the 401 itself.
        if exc.status_code == 401 and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(get_auth_manager().get_url_login(next_url=target), status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette sends this from outside the middleware stack: the headers are set here.
        log.error("model registry: %s %s failed", request.method, request.url.path, exc_info=exc)
        return PlainTextResponse("internal error in the model registry; the api-server log has the details",
                                 status_code=500, headers={**SECURITY_HEADERS, "Content-Security-Policy": DEFAULT_CSP})

    def open_store() -> tuple[ObjectStore, str]:
        try:
            return _store()
        except ConfigError as exc:
            raise fail(500, "the model registry's configuration is invalid; the api-server log has the details",
                       "configuration", exc) from None

    def page(text: str) -> HTMLResponse:
        return HTMLResponse(text, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/", response_class=HTMLResponse)
    def overview() -> HTMLResponse:
        store, model = open_store()
        try:
            return page(browser.render_overview(store, model, base_url=URL_PREFIX))
        except StorageError as exc:
            raise fail(502, STORE_UNAVAILABLE, "overview", exc) from None

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(run_id: str) -> HTMLResponse:
        store, model = open_store()
        try:
            return page(browser.render_run(store, model, run_id, base_url=URL_PREFIX))
        except PermissionError as exc:
            raise fail(400, "not a valid run id", f"run {run_id!r}", exc) from None
        except StorageError as exc:
            raise fail(502, STORE_UNAVAILABLE, f"run {run_id!r}", exc) from None

    @app.get("/artifact/{path:path}")
    def artifact(path: str) -> Response:
        store, model = open_store()

        def read(artifact_path: str) -> tuple[bytes, str]:
            return browser.read_artifact(store, model, artifact_path)

        try:
            body, content_type = read(path)
            if content_type.startswith("text/html"):
                body = browser.embed_png_links(body.decode("utf-8", errors="replace"), path, read).encode()
        except PermissionError as exc:
            raise fail(403, "not served here: only reports and plots under runs/ and versions/",
                       f"artifact {path!r}", exc) from None
        except MissingObjectError as exc:
            raise fail(404, "no such artifact", f"artifact {path!r}", exc) from None
        except StorageError as exc:
            raise fail(502, STORE_UNAVAILABLE, f"artifact {path!r}", exc) from None
        headers = {"Content-Security-Policy": ARTIFACT_CSP}
        if content_type.startswith("text/csv"):
            name = _SAFE_FILENAME.sub("_", posixpath.basename(path)) or "artifact.csv"
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(content=body, media_type=content_type, headers=headers)

    @app.get("/api/summary")
    def summary() -> dict[str, Any]:
        store, model = open_store()
        try:
            return browser.registry_summary(store, model)
        except StorageError as exc:
            raise fail(502, STORE_UNAVAILABLE, "summary", exc) from None

    return app


class SecurityHeadersMiddleware:
    """ASGI middleware: the security headers on every response of the app, errors included.

    A route's own Content-Security-Policy wins; responses without one get `DEFAULT_CSP`.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name.lower().encode(), value.encode())
                         for name, value in {**SECURITY_HEADERS, "Content-Security-Policy": DEFAULT_CSP}.items()
                         if name.lower().encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _LazyFastAPIApps:
    """`fastapi_apps` built on first access (class or instance), then cached."""

    def __init__(self) -> None:
        self._apps: list[dict[str, Any]] | None = None

    def __get__(self, instance: object, owner: type | None = None) -> list[dict[str, Any]]:
        if self._apps is None:
            self._apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Model registry"}]
        return self._apps


class ModelRegistryPlugin(AirflowPlugin):
    """The registry page under Browse, served by the api-server at /model-registry."""

    name = "model_registry"
    fastapi_apps = _LazyFastAPIApps()  # type: ignore[assignment]
    external_views = [{
        "name": "Model registry",
        "href": f"{URL_PREFIX}/",
        "url_route": "model-registry",
        "destination": "nav",
        "category": "browse",
    }]
