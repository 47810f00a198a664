"""A real browser (headless Chromium) against the real api-server: login, registry, reports, trigger form."""

from __future__ import annotations

import runpy
from typing import Any
from urllib.parse import quote, unquote, urlparse

import pytest

from tests.airflow_env import REPO
from tests.ui.conftest import HOSTILE_APPROVAL, PRIVATE_MARKERS, RUN_ID, VERSION

pytestmark = pytest.mark.ui

DAG_ID = "image_classifier_retraining"
WAIT_S = 30


def _wait(driver: Any, condition: Any, timeout: float = WAIT_S, message: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message)


def _by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def login(driver: Any, server: Any) -> None:
    """Through Airflow's own login form (simple auth manager), as a person would."""
    from selenium.webdriver.support import expected_conditions as ec

    user, password = server.admin_credentials()
    driver.get(server.url + "/auth/login")
    _wait(driver, ec.presence_of_element_located((_by("CSS_SELECTOR"), "input[name=username]"))).send_keys(user)
    driver.find_element(_by("CSS_SELECTOR"), "input[name=password]").send_keys(password)
    driver.find_element(_by("CSS_SELECTOR"), "button[type=submit]").click()
    _wait(driver, lambda d: "/auth/login" not in d.current_url)
    assert any(c["name"] == "_token" for c in driver.get_cookies())


@pytest.fixture(scope="module")
def admin(ui_server: Any, browser_factory: Any) -> Any:
    driver = browser_factory()
    login(driver, ui_server)
    return driver


def open_registry_view(driver: Any, server: Any) -> None:
    """Browse → Model registry: the external view's iframe, switched into."""
    from selenium.webdriver.support import expected_conditions as ec

    driver.switch_to.default_content()
    driver.get(server.url + "/plugin/model-registry")
    _wait(driver, ec.frame_to_be_available_and_switch_to_it((_by("CSS_SELECTOR"), "iframe[title='Model registry']")))
    _wait(driver, ec.presence_of_element_located((_by("TAG_NAME"), "h1")))


def click(driver: Any, link_text: str) -> None:
    from selenium.webdriver.support import expected_conditions as ec

    _wait(driver, ec.element_to_be_clickable((_by("LINK_TEXT"), link_text))).click()


def document(driver: Any) -> dict[str, Any]:
    """What the current (i)frame shows: its URL, type, first image's width, whether a stored script ran."""
    return driver.execute_script(
        "const img = document.querySelector('img');"
        "return {href: location.href, type: document.contentType, title: document.title,"
        "        image_width: img ? img.naturalWidth : null, image_src: img ? img.src.slice(0, 30) : null,"
        "        pwned: document.body ? document.body.getAttribute('data-pwned') : null,"
        "        text: document.body ? document.body.innerText : ''};")


def wait_document(driver: Any, path_end: str) -> dict[str, Any]:
    _wait(driver, lambda d: d.execute_script("return document.readyState === 'complete' && location.href")
          .endswith(path_end))
    return document(driver)


def test_registry_opens_inside_the_airflow_ui_after_login(admin, ui_server):
    open_registry_view(admin, ui_server)
    shown = document(admin)

    assert shown["href"] == ui_server.url + "/model-registry/"
    assert VERSION in shown["text"] and "0.817" in shown["text"]
    assert "first model: accuracy 0.817 > chance" in shown["text"]
    # The approval's approver and comment (typed by people) show as text; neither runs.
    assert f"approved by {HOSTILE_APPROVAL['by']}" in shown["text"] and "ship it <img src=x" in shown["text"]
    assert shown["pwned"] is None and shown["title"] != "pwned"


def test_run_page_report_and_plots_show_and_stored_scripts_do_not_run(admin, ui_server):
    open_registry_view(admin, ui_server)
    click(admin, RUN_ID)
    run_page = wait_document(admin, f"/model-registry/runs/{RUN_ID}")
    assert "transfer_mobilenet_v2" in run_page["text"]
    assert f"human approval: approved by {HOSTILE_APPROVAL['by']}" in run_page["text"]
    assert run_page["pwned"] is None and run_page["title"] != "pwned"

    click(admin, "full run report")
    report = wait_document(admin, f"/artifact/runs/{RUN_ID}/report.html")
    assert f"Run report: {RUN_ID}" in report["text"]
    assert report["image_src"].startswith("data:image/png;base64,")  # embedded when served
    assert report["image_width"] == 64  # the 64x48 curves PNG rendered
    assert report["pwned"] is None and report["title"] != "pwned"
    # The figure's link (to the same PNG) works from inside the sandbox too.
    admin.find_element(_by("CSS_SELECTOR"), "figure a").click()
    _wait(admin, lambda d: d.execute_script("return location.protocol") == "data:")
    assert document(admin)["image_width"] == 64

    # The run page's own links reach the artifacts (it is not sandboxed: the cookie goes along).
    for link, path_end, check in (
            ("curves", "scratch_small/curves.png", lambda shown: shown["image_width"] == 64),
            ("metrics", "scratch_small/metrics.json", lambda shown: '"accuracy": 0.8173' in shown["text"]),
            ("model card", f"versions/{VERSION}/model_card.html", lambda shown: shown["image_width"] == 8),
            ("data-quality report", "quality/quality.html", lambda shown: "Data quality" in shown["text"])):
        open_registry_view(admin, ui_server)
        click(admin, RUN_ID)
        wait_document(admin, f"/runs/{RUN_ID}")
        click(admin, link)
        shown = wait_document(admin, path_end)
        assert check(shown), (link, shown)
        assert shown["pwned"] is None and shown["title"] != "pwned", link

    # Opened on its own (a sandboxed frame inside the UI runs in another renderer, whose console
    # the driver does not collect): Chromium says why the stored script did not run.
    admin.switch_to.default_content()
    admin.get_log("browser")  # drop what came before
    admin.get(f"{ui_server.url}/model-registry/artifact/runs/{RUN_ID}/quality/quality.html")
    shown = wait_document(admin, "quality/quality.html")
    assert "Data quality" in shown["text"] and shown["pwned"] is None and shown["title"] != "pwned"
    console = [entry["message"] for entry in admin.get_log("browser")]
    assert any("Blocked script execution" in line and "sandboxed" in line for line in console), console
    assert any("cdn.example.invalid/gx.css" in line and "Content Security Policy" in line for line in console), console


@pytest.fixture
def anonymous(browser_factory: Any) -> Any:
    """A browser with a fresh profile: no Airflow session."""
    return browser_factory()


def test_anonymous_browser_sees_no_registry_data(ui_server, anonymous):
    for path in ("/model-registry/", f"/model-registry/runs/{RUN_ID}",
                 f"/model-registry/artifact/runs/{RUN_ID}/report.html", "/model-registry/api/summary",
                 "/plugin/model-registry"):
        anonymous.get(ui_server.url + path)
        _wait(anonymous, lambda d: "/auth/login" in d.current_url)
        _wait(anonymous, lambda d: d.find_elements(_by("CSS_SELECTOR"), "input[name=username]"))
        source = anonymous.page_source
        for marker in (*PRIVATE_MARKERS, ui_server.bucket):
            assert marker not in source, (path, marker)
    assert not any(c["name"] == "_token" for c in anonymous.get_cookies())


def open_trigger_form(driver: Any, server: Any) -> Any:
    from selenium.webdriver.support import expected_conditions as ec

    driver.switch_to.default_content()
    driver.get(f"{server.url}/dags/{DAG_ID}")
    _wait(driver, ec.element_to_be_clickable((_by("CSS_SELECTOR"), "button[aria-label='Trigger Dag']"))).click()
    return _wait(driver, ec.visibility_of_element_located((_by("CSS_SELECTOR"), ".chakra-dialog__content")))


def submit_trigger_form(driver: Any, form: Any) -> str:
    """Press the form's Trigger button; returns the id of the run the UI then shows."""
    button = [b for b in form.find_elements(_by("TAG_NAME"), "button") if b.text.strip() == "Trigger"][-1]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    _wait(driver, lambda d: button.is_enabled(), timeout=10,
          message="the form's Trigger button stayed disabled (a required param without a value?)")
    button.click()
    _wait(driver, lambda d: f"/dags/{DAG_ID}/runs/" in d.current_url)
    return unquote(urlparse(driver.current_url).path.split(f"/dags/{DAG_ID}/runs/", 1)[1].split("/")[0])


def run_conf(server: Any, run_id: str) -> dict[str, Any]:
    return server.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}")["conf"]


def task_config(server: Any, conf: dict[str, Any]) -> Any:
    """The PipelineConfig a task of this run builds: Airflow's param merge, then the DAG's `_config()` path."""
    from airflow.sdk.definitions.param import process_params

    from ml.config import PipelineConfig, overrides_from_params

    dag = runpy.run_path(str(REPO / "dags" / f"{DAG_ID}.py"))[DAG_ID]()
    params = process_params(dag, dag.get_task("data.ingest"), conf, suppress_exception=False)
    return PipelineConfig.load(server.config_file, overrides=overrides_from_params(params))


def test_trigger_form_submits_with_its_defaults(admin, ui_server):
    form = open_trigger_form(admin, ui_server)
    assert "Dataset source" in form.text

    run_id = submit_trigger_form(admin, form)

    conf = run_conf(ui_server, run_id)
    assert conf.get("source") is None, conf
    config = task_config(ui_server, conf)
    assert config.data.source.endswith("no-such-dataset")  # the config file's, untouched
    assert config.train.epochs == 8


def test_trigger_form_value_reaches_the_run_and_the_task_config(admin, ui_server):
    form = open_trigger_form(admin, ui_server)
    form.find_element(_by("NAME"), "element_epochs").send_keys("3")

    run_id = submit_trigger_form(admin, form)

    conf = run_conf(ui_server, run_id)
    assert conf["epochs"] == 3, conf
    config = task_config(ui_server, conf)
    assert config.train.epochs == 3
    assert config.data.source.endswith("no-such-dataset")
    assert config.train.candidates == ("scratch_tiny",)
