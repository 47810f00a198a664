"""The whole DAG on a dataset whose class names are attacks: every page it writes stays inert.

Five classes named ``<script>alert(1)</script>``, ``"><img src=x onerror=alert(1)>``, ``x_{$^$}``
(crashed matplotlib's mathtext), ``{{7*7}}`` (a template engine would print 49) and ``perro español``
go through `dag.test()` exactly like tests/e2e/test_dag_end_to_end.py, against a real SeaweedFS.
The run must promote; every HTML page in the store and the work dir, and the registry pages,
must pass tests/html_safety.py and show the names only as escaped text; the PNG plots must exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.airflow_env import REPO
from tests.html_safety import assert_escaped, assert_safe

pytestmark = pytest.mark.e2e

DAG_ID = "image_classifier_retraining"
MODEL = "image-classifier"
HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "x_{$^$}", "{{7*7}}", "perro español"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Pages that list the classes: each name must be there, intact, as text.
CLASS_PAGES = ("report.html", "quality.html", "model_card.html")


@pytest.fixture(scope="module")
def hostile_run(pipeline_env, tmp_path_factory):
    """One DAG run on the hostile dataset (module-scoped: every test below inspects the same run)."""
    from airflow.dag_processing.dagbag import DagBag

    from ml.data.sample import make_sample_dataset

    root = tmp_path_factory.mktemp("hostile")
    # 5 x 48 images of 32 px: enough for scratch_tiny to beat chance (0.2) in a few epochs.
    make_sample_dataset(root / "data", class_names=HOSTILE, per_class=48, size=32, seed=13)
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        # allowed_labels set on purpose: GX's Data Docs page used to print these raw.
        "data": {"allowed_labels": HOSTILE},
        # The first model only has to reach chance; the test is about what the pages show.
        "gate": {"min_gain_over_chance": 0.0, "max_class_recall_drop": None},
    }, allow_unicode=True), encoding="utf-8")
    patch = pytest.MonkeyPatch()
    patch.setenv("ML_CONFIG", str(config))
    try:
        dag = DagBag(dag_folder=str(REPO / "dags")).dags[DAG_ID]
        run = dag.test(run_conf={"source": str(root / "data"), "candidates": ["scratch_tiny"], "epochs": 6,
                                 "image_size": 32, "finetune_top_k": 0})
    finally:
        patch.undo()
    return run


def _safe(run_id: str) -> str:
    from ml.registry.layout import run_segment

    return run_segment(run_id)


def _check_page(text: str, source: str) -> None:
    assert_safe(text, source=source)
    lists_classes = source.endswith(CLASS_PAGES)
    for hostile in HOSTILE:
        assert_escaped(text, hostile, source=source, must_appear=lists_classes)


def test_run_succeeds_and_promotes(pipeline_env, hostile_run) -> None:
    store = pipeline_env["store"]

    states = {ti.task_id: ti.state for ti in hostile_run.get_task_instances()}
    assert hostile_run.state == "success", states
    decision = store.get_json(f"{MODEL}/runs/{_safe(hostile_run.run_id)}/gate.json")
    assert decision["promote"] is True, decision["reasons"]
    pointer = store.get_json(f"{MODEL}/production.json")
    labels = store.get_json(f"{MODEL}/versions/{pointer['version']}/labels.json")
    assert sorted(labels) == sorted(HOSTILE)  # "{{7*7}}" stayed a name, no 49


def test_every_stored_page_is_inert_and_escapes_the_names(pipeline_env, hostile_run) -> None:
    store = pipeline_env["store"]
    keys = [k for prefix in (f"{MODEL}/runs/", f"{MODEL}/versions/") for k in store.list_keys(prefix)
            if k.endswith(".html")]
    names = {k.rsplit("/", 1)[-1] for k in keys}

    assert {"report.html", "quality.html", "leaderboard.html", "model_card.html"} <= names, keys
    assert "quality_gx.html" not in names
    for key in keys:
        _check_page(store.get_bytes(key).decode("utf-8"), key)


def test_every_local_page_is_inert_and_escapes_the_names(pipeline_env, hostile_run) -> None:
    pages = sorted(Path(pipeline_env["work"]).rglob("*.html"))

    assert {"report.html", "quality.html", "model_card.html"} <= {p.name for p in pages}, pages
    for page in pages:
        _check_page(page.read_text(encoding="utf-8"), str(page))


def test_registry_pages_are_inert(pipeline_env, hostile_run) -> None:
    from ml.registry.browser import render_overview, render_run

    store = pipeline_env["store"]
    pages = {"overview": render_overview(store, MODEL, base_url="/model-registry"),
             "run": render_run(store, MODEL, _safe(hostile_run.run_id), base_url="/model-registry")}

    assert _safe(hostile_run.run_id) in pages["overview"]
    for name, page in pages.items():
        _check_page(page, f"registry {name} page")


def test_plots_were_drawn(pipeline_env, hostile_run) -> None:
    """The confusion matrix has the names as tick labels: it used to crash in mathtext."""
    store = pipeline_env["store"]
    prefix = f"{MODEL}/runs/{_safe(hostile_run.run_id)}/scratch_tiny"

    for name in ("confusion.png", "curves.png"):
        data = store.get_bytes(f"{prefix}/{name}")
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    metrics = json.loads(store.get_bytes(f"{prefix}/metrics.json"))
    assert sorted(metrics["per_class"]) == sorted(HOSTILE)


def test_report_and_model_card_list_confused_classes(pipeline_env, hostile_run) -> None:
    """Through the DAG: the best candidate's confused pairs and per-class precision/recall are shown."""
    store = pipeline_env["store"]
    report = store.get_json(f"{MODEL}/runs/{_safe(hostile_run.run_id)}/report.json")
    pointer = store.get_json(f"{MODEL}/production.json")
    card = store.get_bytes(f"{MODEL}/versions/{pointer['version']}/model_card.html").decode("utf-8")
    page = store.get_bytes(f"{MODEL}/runs/{_safe(hostile_run.run_id)}/report.html").decode("utf-8")

    confusions = report["confusions"]
    assert confusions["candidate"] == "scratch_tiny"
    assert sorted(confusions["per_class"]) == sorted(HOSTILE)
    assert {"n_errors", "pairs", "suggestion"} <= set(confusions["confused_pairs"])
    for pair in confusions["confused_pairs"]["pairs"]:
        assert {pair["a"], pair["b"]} <= set(HOSTILE)
    assert "<h2>Confused classes</h2>" in page and "<h3>Confused classes</h3>" in card
    for text in (page, card):
        assert "Per-class precision and recall (5 classes" in text
