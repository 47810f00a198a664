"""A real Airflow api-server on loopback serving a small published registry, and headless Chromium.

`airflow api-server` alone (after `db migrate` and `dags reserialize`) is all these tests need:
the plugin, the login, the REST API and the trigger form live there, and a triggered run only
has to be *created* (its conf is what is checked), not executed. Measured on this 2-core
machine: 21 s to a healthy server (9 s migrate, 4 s reserialize, 8 s api-server start); the
full `airflow standalone` takes as long (7 s migrate, 15 s to healthy, DAG already parsed) and
idles at ~5% of a core, but its scheduler would start the triggered runs' tasks, which is CPU
the browser tests do not need; the api-server alone leaves the runs queued.

The api-server reaches the store through `StoreSwitch`, a loopback TCP relay that a test can
turn off to see what the pages say when the store is down.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import airflow_env

airflow_env.configure()

MODEL = "image-classifier"
VERSION = "20261123T170000Z-abc123"
RUN_ID = "manual__r1"
# Data the registry holds; none of it may reach an anonymous caller.
PRIVATE_MARKERS = (VERSION, RUN_ID, "0.8173", "scratch_small")
# A label as a hostile dataset could carry it; stored pages contain it unescaped on purpose.
HOSTILE_LABEL = "<script>document.title='pwned';document.body.setAttribute('data-pwned','1')</script>"
# A human approval as the HITL step records it: approver name and comment are typed by people.
HOSTILE_APPROVAL = {"outcome": "approved", "by": f"mallory{HOSTILE_LABEL}", "at": "2026-12-03T08:00:00+00:00",
                    "comment": "ship it <img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


class StoreSwitch:
    """A TCP relay to the store's S3 port that can be switched off (new connections are dropped)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.down = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class UiServer:
    """The running api-server, its admin credentials and what was published for it."""

    url: str
    home: Path
    config_file: Path
    bucket: str
    switch: StoreSwitch
    stack: Any
    _token: str | None = field(default=None, repr=False)

    def admin_credentials(self) -> tuple[str, str]:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        return next(iter(passwords.items()))

    def token(self) -> str:
        """A JWT from `POST /auth/token` for the admin user (fetched once)."""
        if self._token is None:
            user, password = self.admin_credentials()
            body = json.dumps({"username": user, "password": password}).encode()
            result = self.request("POST", "/auth/token", body=body, headers={"Content-Type": "application/json"})
            assert result.status == 201, result.text
            self._token = json.loads(result.body)["access_token"]
        return self._token

    def request(self, method: str, path: str, *, token: str | None = None, body: bytes | None = None,
                headers: dict[str, str] | None = None, cookie: str | None = None) -> HttpResult:
        """One HTTP request without following redirects (a redirect is a result to look at)."""
        req = urllib.request.Request(self.url + path, method=method, data=body, headers=dict(headers or {}))
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if cookie:
            req.add_header("Cookie", cookie)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=60) as response:
                return HttpResult(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
        except urllib.error.HTTPError as exc:
            return HttpResult(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())

    def api(self, method: str, path: str, payload: Any = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        result = self.request(method, path, token=self.token(), body=body, headers={"Content-Type": "application/json"})
        assert result.status < 300, (method, path, result.status, result.text[:500])
        return json.loads(result.body) if result.body else None


def _png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def publish_registry(store: Any) -> None:
    """A promoted version, its pointer and log entry, a run report with plots, hostile HTML pages."""
    import tempfile

    from ml.registry.versions import append_promotion_log, make_pointer, publish_version, swap_pointer

    card = (f"<html><body><h1>Model card</h1><p>classes: cat, {HOSTILE_LABEL}</p>"
            "<img alt='embedded' src='data:image/png;base64,"
            + base64.b64encode(_png(8, 8, (0, 128, 0))).decode() + "'></body></html>")
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        lineage = {"actor": "airflow:image_classifier_retraining", "run_id": RUN_ID, "store": store.endpoint_url}
        for name, body in (("model.keras", b"not really a model"), ("labels.json", b'["cat", "dog"]'),
                           ("model_card.html", card.encode()), ("lineage.json", json.dumps(lineage).encode())):
            (Path(tmp) / name).write_bytes(body)
            files[name] = Path(tmp) / name
        publish_version(store, MODEL, VERSION, files, {"candidate": "scratch_small", "run_id": RUN_ID,
                                                       "metrics": {"accuracy": 0.8173, "log_loss": 0.5}})
    swap_pointer(store, MODEL, make_pointer(store, MODEL, VERSION, candidate="scratch_small"), expected_etag=None)
    append_promotion_log(store, MODEL, {"action": "promote", "version": VERSION, "from": None, "to": VERSION,
                                        "run_id": RUN_ID, "reasons": ["first model: accuracy 0.817 > chance"],
                                        "approval": HOSTILE_APPROVAL})
    report = {"run_id": RUN_ID, "decision": {"promoted": True, "version": VERSION, "approval": HOSTILE_APPROVAL,
                                             "reasons": ["first model: accuracy 0.817 > chance"]},
              "leaderboard": [{"rank": 1, "candidate": "scratch_small", "accuracy": 0.8173},
                              {"rank": 2, "candidate": "transfer_mobilenet_v2", "accuracy": 0.5}]}
    runs = f"{MODEL}/runs/{RUN_ID}"
    store.put_json(f"{runs}/report.json", report)
    store.put_bytes(f"{runs}/scratch_small/curves.png", _png(64, 48, (200, 30, 30)))
    store.put_bytes(f"{runs}/scratch_small/confusion.png", _png(40, 40, (30, 30, 200)))
    store.put_bytes(f"{runs}/scratch_small/metrics.json", b'{"accuracy": 0.8173}')
    store.put_bytes(f"{runs}/scratch_small/confusion.csv", b"true,predicted,count\ncat,dog,1\n")
    # The run report as ml.evaluation.report writes it: figures linked by relative path.
    store.put_bytes(f"{runs}/report.html", (
        f"<!doctype html><html><head><title>Run report</title></head><body><h1>Run report: {RUN_ID}</h1>"
        f"<p>label {HOSTILE_LABEL}</p><figure><a href=\"scratch_small/curves.png\">"
        "<img id=\"curves\" src=\"scratch_small/curves.png\" alt=\"scratch_small curves\"></a></figure>"
        "</body></html>").encode())
    # Great Expectations' Data Docs page shape: CDN styling and a script, here with a hostile label.
    store.put_bytes(f"{runs}/quality/quality.html", (
        "<html><head><link rel='stylesheet' href='https://cdn.example.invalid/gx.css'>"
        "<script src='https://cdn.example.invalid/gx.js'></script></head>"
        f"<body><h1>Data quality</h1><table><tr><td>{HOSTILE_LABEL}</td></tr></table></body></html>").encode())
    store.put_json(f"{runs}/quality/quality.json", {"success": True})
    store.put_json(f"{runs}/gate.json", {"promoted": True})


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"airflow api-server exited with {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=3):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the api-server did not answer on {url} within {timeout:.0f} s; see {log_file}")


@pytest.fixture(scope="session")
def ui_server(seaweed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    """`airflow api-server` on a free loopback port, its own home and SQLite DB, the registry published."""
    import yaml

    from ml.registry.store import ObjectStore
    from scripts.airflow_stack import AirflowStack, free_port, venv_bin

    root = tmp_path_factory.mktemp("ui-airflow")
    bucket = f"ui-{uuid.uuid4().hex[:10]}"
    store = ObjectStore(bucket, endpoint_url=seaweed.endpoint_url, access_key=seaweed.access_key,
                        secret_key=seaweed.secret_key)
    store.ensure_bucket()
    publish_registry(store)
    switch = StoreSwitch(seaweed.ports["s3"])
    config_file = root / "pipeline.yaml"
    # A run triggered from the form would fail fast at ingest (nothing trains in these tests).
    config_file.write_text(yaml.safe_dump({"data": {"source": str(root / "no-such-dataset")},
                                           "train": {"epochs": 8, "candidates": ["scratch_tiny"]}}))
    stack = AirflowStack(root, seaweed, api_port=free_port(), bucket=bucket, endpoint_url=switch.endpoint,
                         extra_env={"ML_CONFIG": str(config_file)})
    stack.prepare()
    stack.airflow("dags", "reserialize")
    log_file = root / "api-server.log"
    with log_file.open("ab") as log:
        proc = subprocess.Popen([str(venv_bin() / "airflow"), "api-server", "--host", "127.0.0.1",
                                 "--port", str(stack.api_port), "--workers", "1"],
                                env=stack.env(), cwd=airflow_env.REPO, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(stack.url, proc, log_file, timeout=180)
        yield UiServer(url=stack.url, home=stack.home, config_file=config_file, bucket=bucket, switch=switch,
                       stack=stack)
    finally:
        # The api-server forks uvicorn workers: stop the whole process group we started.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        switch.close()


def _require_chromium() -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            pytest.skip(f"{path} is missing: `apt-get install chromium chromium-driver` (.ci/run does it as root)")
    pytest.importorskip("selenium", reason="selenium is not installed (requirements.txt)")


@pytest.fixture(scope="session")
def browser_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Any]]:
    """Start headless Chromium with a fresh profile; every browser started is quit at the end."""
    _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    started: list[Any] = []

    def start() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1000"):
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP/sandbox reports in the console
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(60)
        started.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in started:
            driver.quit()


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """A failed browser test leaves a screenshot and the page source of every open browser in its tmp dir."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed:
        return
    for name in ("admin", "anonymous", "driver"):
        driver = request.node.funcargs.get(name)
        if driver is None or not hasattr(driver, "save_screenshot"):
            continue
        driver.save_screenshot(str(tmp_path / f"{name}.png"))
        (tmp_path / f"{name}.html").write_text(driver.page_source)
        print(f"screenshot of {name}'s browser: {tmp_path / f'{name}.png'}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
