"""Run report, leaderboard and model card with hostile strings in every field that can hold data.

Each page must pass tests/html_safety.py (no script, no event handlers, nothing loaded from
elsewhere) and show every hostile string as text, escaped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.evaluation.leaderboard import build_leaderboard, write_leaderboard
from ml.evaluation.metrics import evaluate_predictions
from ml.evaluation.model_card import render_model_card
from ml.evaluation.plots import plot_confusion
from ml.evaluation.report import build_run_report, relative_link, render_run_report_html, write_run_report
from tests.html_safety import assert_escaped, assert_safe, find_problems

HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "x_{$^$}", "{{7*7}}",
           "perro español", "' onmouseover='alert(1)"]
EXTERNAL_LINKS = ["//evil.example/a.png", "https://evil.example/a.png", "javascript:alert(1)", "/etc/passwd",
                  "\\\\evil.example\\a.png", "../../other/a.png", "data:text/html,<script>alert(1)</script>",
                  " //evil.example/a.png", "a/\n/b.png"]


@pytest.fixture
def metrics() -> dict:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(HOSTILE)), 4)
    probs = rng.dirichlet(np.ones(len(HOSTILE)), size=len(y))
    probs[np.arange(len(y)), y] += 1.0  # mostly right, some confusions
    return evaluate_predictions(y, probs / probs.sum(axis=1, keepdims=True), HOSTILE)


@pytest.fixture
def rows() -> list[dict]:
    entries = [{"candidate": name, "accuracy": 0.9 - i / 20, "log_loss": 0.5, "status": "ok",
                "images": {name: f"{EXTERNAL_LINKS[i % len(EXTERNAL_LINKS)]}"}}
               for i, name in enumerate(HOSTILE)]
    entries[1].update(status="failed", error=f"boom {HOSTILE[0]}")
    entries[2].update(status="over budget", budget_reasons=[f"too big {HOSTILE[1]}"])
    return build_leaderboard(entries)


@pytest.fixture
def dataset() -> dict:
    return {"dataset_hash": HOSTILE[0], "source": HOSTILE[1], "layout": HOSTILE[2], "labels": HOSTILE,
            "counts": {name: 4 for name in HOSTILE}, "n_images": 24, "splits": {HOSTILE[3]: 24},
            "created_at": HOSTILE[4]}


QUALITY = {"success": False, "failures": [f"label(s) [{h!r}] are not allowed" for h in HOSTILE],
           "warnings": [{"check": h, "observed": h} for h in HOSTILE], HOSTILE[0]: HOSTILE[1]}
DECISION = {"promote": True, "reasons": [f"class {h} recall ok" for h in HOSTILE], HOSTILE[2]: HOSTILE}
PRODUCTION = {"version": HOSTILE[1], "candidate": HOSTILE[0], "metrics": {"accuracy": 0.5, "log_loss": 1.0}}


def _check(page: str, source: str, strings: list[str]) -> None:
    assert_safe(page, source=source)
    for hostile in strings:
        assert_escaped(page, hostile, source=source)


def test_run_report_is_safe_with_hostile_everything(tmp_path: Path, rows, dataset) -> None:
    report = build_run_report(run_id=HOSTILE[1], dataset=dataset, quality=QUALITY, leaderboard=rows,
                              production=PRODUCTION, decision=DECISION, config={"note": HOSTILE})

    paths = write_run_report(report, tmp_path)

    _check(paths["html"].read_text(encoding="utf-8"), "report.html", HOSTILE)


def test_run_report_keeps_only_relative_figure_links(rows, dataset) -> None:
    report = build_run_report(run_id="r1", dataset=dataset, quality=None, leaderboard=rows, production=None,
                              decision=None, config={})

    links = [link for row in report["leaderboard"] for link in row["images"].values()]

    assert links and all(relative_link(link) for link in links)
    assert not set(links) & set(EXTERNAL_LINKS)


def test_run_report_read_back_with_external_links_renders_none_of_them() -> None:
    """A report.json not made by build_run_report (edited, older) is checked again when rendered."""
    rows = [{"candidate": f"c{i}", "rank": i + 1, "accuracy": 0.5, "status": "ok",
             "images": {"curves": link, "ok": f"c{i}/curves.png"}} for i, link in enumerate(EXTERNAL_LINKS)]

    page = render_run_report_html({"run_id": "r1", "leaderboard": rows})

    assert_safe(page, source="report.html")
    assert page.count("<img ") == len(EXTERNAL_LINKS)  # each candidate's relative figure stays


@pytest.mark.parametrize("link", EXTERNAL_LINKS + ["", ".", "a/./b.png", "a//b.png", "a\tb.png"])
def test_relative_link_rejects_anything_leaving_the_run_folder(link: str) -> None:
    assert relative_link(link) is None


@pytest.mark.parametrize(("link", "url"), [
    ("scratch_tiny/curves.png", "scratch_tiny/curves.png"),
    ("a b/c#d?.png", "a%20b/c%23d%3F.png"),
    ("x/javascript:alert(1).png", "x/javascript%3Aalert%281%29.png"),
    ("perro español/c.png", "perro%20espa%C3%B1ol/c.png"),
    ("{{7*7}}/100%.png", "%7B%7B7%2A7%7D%7D/100%25.png"),
])
def test_relative_link_encodes_names(link: str, url: str) -> None:
    assert relative_link(link) == url


def test_leaderboard_html_is_safe_with_hostile_names(tmp_path: Path, rows) -> None:
    paths = write_leaderboard(rows, tmp_path, production=PRODUCTION)

    _check(paths["html"].read_text(encoding="utf-8"), "leaderboard.html", HOSTILE)


def test_model_card_is_safe_with_hostile_everything(tmp_path: Path, metrics, rows, dataset) -> None:
    png = plot_confusion(metrics["confusion"], HOSTILE, tmp_path / "confusion.png")
    not_png = tmp_path / "evil.png"
    not_png.write_text("<svg onload=alert(1)></svg>")

    page = render_model_card(
        model_name=HOSTILE[0], version=HOSTILE[1], candidate=HOSTILE[2], metrics=metrics, labels=HOSTILE,
        dataset=dataset, quality=QUALITY, leaderboard=rows, decision=DECISION,
        lineage={"run_id": HOSTILE[3], "config": {"labels": HOSTILE}, HOSTILE[4]: HOSTILE[5]},
        images={HOSTILE[0]: png, "confusion": not_png}, preprocessing={"image_size": 32})

    _check(page, "model_card.html", HOSTILE)
    assert page.count("<img ") == 1 and "data:image/png;base64," in page
    assert find_problems(page) == []
