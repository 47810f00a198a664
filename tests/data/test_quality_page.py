"""The data-quality page: self-contained, script-free, every value from the data escaped.

It replaced GX's Data Docs page (quality_gx.html), which loaded scripts and CSS from public CDNs
and printed an unexpected label such as ``<script>alert(1)</script>`` raw.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from ml.config import DataConfig
from ml.data.quality import QualityReport, validate_dataset
from ml.data.quality_page import render_html
from tests.data.conftest import TINY_CONFIG
from tests.html_safety import assert_escaped, assert_safe

HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "x_{$^$}", "{{7*7}}",
           "perro español"]
INTRUDER = HOSTILE[0]


@pytest.fixture(scope="module")
def hostile_run(good_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[QualityReport, Path]:
    """The good dataset relabelled: every class a hostile name, one image an unexpected hostile label."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(good_dataset, root / "ds")
    manifest = pd.read_parquet(root / "ds" / "manifest.parquet")
    old = sorted(manifest["label"].unique())
    manifest["label"] = manifest["label"].map(dict(zip(old, HOSTILE[1:], strict=False)))
    manifest.loc[manifest.index[0], "label"] = INTRUDER
    manifest.to_parquet(root / "ds" / "manifest.parquet", index=False)
    config = DataConfig(**{**TINY_CONFIG.__dict__, "allowed_labels": tuple(HOSTILE[1:]), "min_images_per_class": 1})

    report = validate_dataset(root / "ds", config, out_dir=root / "out")
    return report, root / "out"


def test_unexpected_hostile_label_fails_the_suite_and_is_shown_escaped(hostile_run) -> None:
    report, out = hostile_run
    page = (out / "quality.html").read_text(encoding="utf-8")

    assert not report.success
    assert any("are not in data.allowed_labels" in f and INTRUDER in f for f in report.failures)
    assert_safe(page, source="quality.html")
    for hostile in HOSTILE:
        assert_escaped(page, hostile, source="quality.html")
    assert "<td>{{7*7}}</td>" in page and "<td>49</td>" not in page  # per-class table: no template ran


def test_page_carries_observed_values_counts_and_examples(hostile_run) -> None:
    _, out = hostile_run
    page = (out / "quality.html").read_text(encoding="utf-8")
    row = next(r for r in page.split("<tr>") if r.startswith("<td>allowed_labels</td>"))

    assert "ok_images.label" in row
    assert "1 of 18 unexpected (5.6%)" in row
    assert "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code> × 1" in row
    assert "&quot;perro español&quot;" in row  # the rule: value_set, items quoted
    assert "class='failing'>FAIL" in row


def test_no_gx_data_docs_page_is_written(hostile_run) -> None:
    _, out = hostile_run

    assert sorted(p.name for p in out.iterdir()) == ["quality.html", "quality.json"]


def test_hand_made_report_with_hostile_everywhere_renders_safely() -> None:
    """Every slot of the page that can hold data: failures, statistics keys/values, GX results."""
    bad = HOSTILE[1]
    suite = {"results": [{
        "expectation_config": {"type": "expect_column_values_to_be_in_set",
                               "kwargs": {"column": bad, "value_set": [bad, *map(str, range(20))]},
                               "meta": {"check": "allowed_labels"}},
        "result": {"element_count": 3, "unexpected_count": 2, "unexpected_percent": 66.7,
                   "partial_unexpected_list": [bad, bad]},
        "exception_info": {"raised_exception": False},
    }, {
        "expectation_config": {"type": "expect_column_values_to_be_between", "kwargs": {"column": "n_ok"},
                               "meta": {"check": "broken"}},
        "result": {"observed_value": bad},
        "exception_info": {"raised_exception": True, "exception_message": f"no column {bad}"},
    }]}
    checks = [{"check": "allowed_labels", "frame": bad, "severity": "failing", "success": False,
               "expectation": "expect_column_values_to_be_in_set"},
              {"check": "broken", "frame": "per_class", "severity": "warning", "success": False,
               "expectation": bad}]
    report = QualityReport(False, [f"label {bad} is odd"], [f"warn {bad}"],
                           {"images_per_class": {bad: 3}, bad: {bad: bad}, "status_counts": {bad: 1}},
                           {"checks": checks, "suites": {"ok_images": suite}})

    page = render_html(report)

    assert_safe(page, source="render_html")
    assert_escaped(page, bad, source="render_html")
    assert "… 11 more" in page  # the rule's value_set is cut at 10 values
    assert "could not run: no column &quot;&gt;&lt;img" in page
