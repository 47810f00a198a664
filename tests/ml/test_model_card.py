"""Tests of the HTML documents (model card, run report) and the latency/size helpers."""

from __future__ import annotations

import base64
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ml.errors import ConfigError, DataError
from ml.evaluation.leaderboard import build_leaderboard
from ml.evaluation.metrics import evaluate_predictions
from ml.evaluation.model_card import render_model_card
from ml.evaluation.plots import plot_confusion
from ml.evaluation.report import build_run_report, measure_latency_ms, model_size_bytes, write_run_report

EVIL = "<script>alert('x')</script>"
LABELS = ["beagle", EVIL, "pug & co"]


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    parser = _TagCollector()
    parser.feed(page)
    return parser.tags


@pytest.fixture
def metrics() -> dict:
    y = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1],
                      [0.1, 0.1, 0.8], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]])
    return evaluate_predictions(y, probs, LABELS)


@pytest.fixture
def dataset() -> dict:
    return {"dataset_hash": "ab" * 32, "source": "zip:///data/<dogs>.zip", "layout": "folders",
            "labels": LABELS, "counts": {label: 10 for label in LABELS}, "n_images": 31, "n_ok": 30,
            "n_quarantined": 1, "splits": {"train": 20, "val": 2, "test": 8}}


@pytest.fixture
def leaderboard(metrics: dict) -> list[dict]:
    return build_leaderboard([
        {"candidate": "scratch_small", "accuracy": 0.4, "log_loss": 1.1, "status": "ok"},
        {"candidate": "transfer_mobilenet_v2", **{k: metrics[k] for k in ("accuracy", "log_loss", "ece")},
         "status": "ok", "params": 2_300_000, "model_bytes": 9_000_000, "latency_ms": 12.0},
        {"candidate": "scratch_<b>bold</b>", "status": "failed", "error": "ResourceExhausted <oom>"},
    ])


QUALITY = {"success": True, "failures": [],
           "warnings": ["class <script>alert('x')</script> has 10 images (< 100)"],
           "n_checked": 31}
DECISION = {"promote": True, "reasons": ["first model: accuracy 0.75 beats chance 0.33 by >= 0.10"],
            "challenger": "transfer_mobilenet_v2"}


def _card(metrics: dict, dataset: dict, leaderboard: list[dict], images: dict | None) -> str:
    return render_model_card(
        model_name="dog-breeds", version="20250101T000000-abcd", candidate="transfer_mobilenet_v2",
        metrics=metrics, labels=LABELS, dataset=dataset, quality=QUALITY, leaderboard=leaderboard,
        decision=DECISION, lineage={"run_id": "manual__<now>", "dataset_hash": dataset["dataset_hash"],
                                    "preprocessing": {"image_size": 96}, "config": {"train": {"epochs": 2}}},
        images=images)


def test_model_card_escapes_labels_and_has_no_script(metrics, dataset, leaderboard) -> None:
    page = _card(metrics, dataset, leaderboard, None)

    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "pug &amp; co" in page
    assert "scratch_&lt;b&gt;bold&lt;/b&gt;" in page
    assert {tag for tag, _ in _tags(page)} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "strong", "code", "ul", "li",
        "table", "thead", "tbody", "tr", "th", "td", "details", "summary", "ol", "pre", "div", "figure",
        "img", "figcaption", "sup"}


def test_model_card_sections_and_facts(metrics, dataset, leaderboard) -> None:
    page = _card(metrics, dataset, leaderboard, None)

    for heading in ("Summary", "Intended use and limitations", "Data", "Data quality",
                    "Metrics on the test split", "Leaderboard of this run", "Gate decision", "Figures",
                    "Lineage"):
        assert f">{heading}</h" in page
    assert "96 x 96 pixels" in page
    assert f"held-out test split of {metrics['n']} images" in page
    assert "safety-critical" in page
    assert f"{metrics['accuracy'] * 100:.1f}%" in page
    assert "Promote" in page and "first model: accuracy 0.75" in page
    assert "manual__&lt;now&gt;" in page
    assert "transfer_mobilenet_v2" in page


def test_model_card_embeds_pngs_and_skips_bad_ones(tmp_path, metrics, dataset, leaderboard) -> None:
    png = plot_confusion(metrics["confusion"], LABELS, tmp_path / "confusion.png")
    not_png = tmp_path / "curves.png"
    not_png.write_text("not an image")

    page = _card(metrics, dataset, leaderboard, {"confusion": png, "curves": not_png,
                                                  "leaderboard": tmp_path / "missing.png"})

    sources = [attrs["src"] for tag, attrs in _tags(page) if tag == "img"]
    assert len(sources) == 1
    assert sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == png.read_bytes()
    assert not re.search(r"(src|href)=\"(https?:|//)", page)  # no external assets


def test_model_card_without_image_size_points_to_preprocessing(metrics, dataset, leaderboard) -> None:
    page = render_model_card(
        model_name="m", version="v1", candidate="c", metrics=metrics, labels=LABELS, dataset=dataset,
        quality=None, leaderboard=[], decision=None, lineage={}, images=None)

    assert "see preprocessing.json" in page
    assert "No data-quality result" in page


# --- run report ---------------------------------------------------------------------------


def test_run_report_json_and_html(tmp_path, dataset, leaderboard, metrics) -> None:
    config = {"storage": {"bucket": "ml-models", "secret_access_key": "hunter2"}, "train": {"epochs": 2}}
    production = {"version": "v0", "metrics": {"accuracy": 0.5, "log_loss": 1.3}}

    report = build_run_report(run_id="manual__2025", dataset=dataset, quality=QUALITY,
                              leaderboard=leaderboard, production=production, decision=DECISION,
                              config=config)
    paths = write_run_report(report, tmp_path / "run")

    data = json.loads(paths["json"].read_text())
    assert data["summary"]["best_candidate"] == "transfer_mobilenet_v2"
    assert data["summary"]["production_accuracy"] == 0.5
    assert data["summary"]["promote"] is True and data["summary"]["quality_passed"] is True
    assert data["leaderboard"][0]["images"] == {"curves": "transfer_mobilenet_v2/curves.png",
                                                "confusion": "transfer_mobilenet_v2/confusion.png"}
    assert data["leaderboard"][-1]["images"] == {}  # the failed candidate has no figures
    page = paths["html"].read_text()
    assert "hunter2" not in page and "hunter2" not in paths["json"].read_text()
    assert "<script" not in page.lower()
    assert "ResourceExhausted &lt;oom&gt;" in page
    links = {attrs.get("href") for tag, attrs in _tags(page) if tag == "a"}
    assert "transfer_mobilenet_v2/curves.png" in links and "scratch_small/confusion.png" in links
    assert "production v0" in page and "+37.5 accuracy points" in page


def test_run_report_without_production_quality_or_decision(tmp_path, dataset) -> None:
    report = build_run_report(run_id="r1", dataset=dataset, quality=None, leaderboard=[], production=None,
                              decision=None, config={})

    page = write_run_report(report, tmp_path)["html"].read_text()

    assert report["summary"]["best_candidate"] is None
    assert "No production model yet" in page and "No eligible candidate" in page


# --- latency and size -----------------------------------------------------------------------


def test_measure_latency_reports_median_ms_and_batches_one_image() -> None:
    shapes = []

    def predict(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        time.sleep(0.002)
        return batch.mean(axis=(1, 2, 3))

    latency = measure_latency_ms(predict, np.zeros((32, 32, 3), np.float32), repeats=5, warmup=2)

    assert 2.0 <= latency < 200.0
    assert shapes == [(1, 32, 32, 3)] * 7


@pytest.mark.parametrize(("example", "kwargs", "error"), [
    (np.zeros((2, 8, 8, 3)), {}, DataError),
    (np.zeros((8, 8)), {}, DataError),
    (np.zeros((8, 8, 3)), {"repeats": 0}, ConfigError),
])
def test_measure_latency_rejects_bad_input(example, kwargs, error) -> None:
    with pytest.raises(error):
        measure_latency_ms(lambda x: x, example, **kwargs)


def test_model_size_of_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "model.keras").write_bytes(b"x" * 1234)
    saved = tmp_path / "saved_model" / "variables"
    saved.mkdir(parents=True)
    (saved / "a").write_bytes(b"y" * 100)
    (tmp_path / "saved_model" / "b.pb").write_bytes(b"z" * 50)

    assert model_size_bytes(tmp_path / "model.keras") == 1234
    assert model_size_bytes(tmp_path / "saved_model") == 150
    with pytest.raises(DataError, match="does not exist"):
        model_size_bytes(tmp_path / "missing.keras")
