from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ml.config import DataConfig
from ml.data.quality import QualityReport, validate_dataset
from ml.errors import DataError, DataQualityError
from tests.data.conftest import TINY_CONFIG


def bad_copy(good: Path, dest: Path) -> Path:
    """The good dataset with one instance of every failing problem (and the warnings)."""
    shutil.copytree(good, dest)
    m = pd.read_parquet(dest / "manifest.parquet")
    labels = sorted(m["label"].unique())
    rows = {label: m.index[m["label"] == label].tolist() for label in labels}
    # class 0 keeps 2 ok images: the rest are quarantined as undecodable
    for i in rows[labels[0]][2:]:
        m.loc[i, ["status", "split", "channels", "phash"]] = ["undecodable", "", 0, ""]
    a, b = rows[labels[1]][:2]
    m.loc[[a, b], "status"] = "label conflict"
    m.loc[[a, b], "split"] = ""
    m.loc[rows[labels[1]][2], "width"] = 8
    m.loc[rows[labels[1]][3], "status"] = "duplicate"
    m.loc[rows[labels[1]][3], "split"] = ""
    train, test = rows[labels[2]][0], rows[labels[2]][1]
    m.loc[[train, test], "phash"] = "0123456789abcdef"
    m.loc[train, "split"], m.loc[test, "split"] = "train", "test"
    m.loc[rows[labels[2]][2], "label"] = "stowaway"
    m.to_parquet(dest / "manifest.parquet", index=False)
    return dest


@pytest.fixture(scope="module")
def good_report(good_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[QualityReport, Path]:
    out = tmp_path_factory.mktemp("good_out")
    return validate_dataset(good_dataset, TINY_CONFIG, out_dir=out), out


def test_good_dataset_passes_and_writes_reports(good_report: tuple[QualityReport, Path]) -> None:
    report, out = good_report

    assert report.success, report.summary()
    assert report.failures == []
    assert report.statistics["n_classes"] == 3 and report.statistics["n_ok"] == 18
    assert report.statistics["near_duplicates_across_train_test"] == 0
    assert json.loads((out / "quality.json").read_text())["success"] is True
    assert "PASSED" in (out / "quality.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["quality.html", "quality.json"]  # no GX Data Docs page
    assert report.result["suites"]["per_class"]["success"] is True
    report.raise_for_failures()  # does not raise


def test_good_dataset_warns_about_small_classes(good_report: tuple[QualityReport, Path]) -> None:
    report, _ = good_report
    strict = report.statistics["images_per_class"]

    assert all(n == 6 for n in strict.values())
    assert report.warnings == []  # 6 >= warn_images_per_class 5, balanced, no duplicates


def test_bad_dataset_fails_with_readable_messages(good_dataset: Path, tmp_path: Path) -> None:
    labels = sorted(pd.read_parquet(good_dataset / "manifest.parquet")["label"].unique())
    config = DataConfig(
        **{
            **TINY_CONFIG.__dict__,
            "allowed_labels": tuple(labels),
            "min_classes": 5,
            "max_quarantined_fraction": 0.1,
            "warn_imbalance_ratio": 2.0,
        }
    )

    report = validate_dataset(bad_copy(good_dataset, tmp_path / "bad"), config, out_dir=tmp_path / "out")

    assert not report.success
    text = "\n".join(report.failures)
    assert f"class {labels[0]!r} has 2 ok images, minimum is 3" in text
    assert "class 'stowaway' has 1 ok images, minimum is 3" in text
    assert "7 of 18 images are quarantined (38.9%), maximum is 10.0%" in text
    assert "2 of 18 images (11.1%) have identical bytes under different labels (label conflict), more than " \
        "data.max_label_conflict_fraction=1.0%" in text
    assert "1 ok image(s) are narrower than 16 px (smallest 8 px)" in text
    assert "label(s) ['stowaway'] are not in data.allowed_labels" in text
    assert "the dataset has 4 class(es) with ok images, minimum is 5" in text
    assert "1 near-duplicate pair(s) straddle train and test" in text
    warnings = "\n".join(report.warnings)
    assert "1 duplicate file(s)" in warnings
    assert "2 image(s) with identical bytes under different labels were quarantined" in warnings
    assert "fewer than the recommended 5" in warnings and "ratio 5.0, warning above 2" in warnings
    assert "FAILED" in (tmp_path / "out" / "quality.html").read_text()
    with pytest.raises(DataQualityError, match="data quality suite failed with 8 failure") as err:
        report.raise_for_failures()
    assert err.value.failures == report.failures


def test_missing_columns_and_missing_manifest(good_dataset: Path, tmp_path: Path) -> None:
    shutil.copytree(good_dataset, tmp_path / "ds")
    pd.read_parquet(tmp_path / "ds" / "manifest.parquet").drop(columns=["sha256", "phash"]).to_parquet(
        tmp_path / "ds" / "manifest.parquet"
    )

    report = validate_dataset(tmp_path / "ds", TINY_CONFIG)

    assert not report.success and "lacks column(s) ['sha256', 'phash']" in report.failures[0]
    with pytest.raises(DataError, match="no manifest.parquet"):
        validate_dataset(tmp_path / "nothing", TINY_CONFIG)


def test_summary_lists_failures_and_truncates() -> None:
    report = QualityReport(
        False, [f"problem {i}" for i in range(13)], ["careful"], {"n_ok": 1, "n_images": 2}
    )

    text = report.summary()

    assert text.startswith("data quality FAILED: 1 ok of 2 images")
    assert "FAIL problem 9" in text and "problem 10" not in text and "and 3 more failures" in text
    assert "WARN careful" in text
    with pytest.raises(DataQualityError) as err:
        report.raise_for_failures()
    assert (
        "problem 9" in str(err.value)
        and "problem 10" not in str(err.value)
        and "and 3 more" in str(err.value)
    )
    assert len(err.value.failures) == 13


def edited_copy(good: Path, dest: Path, edit: object) -> Path:
    shutil.copytree(good, dest)
    manifest = pd.read_parquet(dest / "manifest.parquet")
    edit(manifest)  # type: ignore[operator]
    manifest.to_parquet(dest / "manifest.parquet", index=False)
    return dest


def test_more_classes_than_the_cap_fail(good_dataset: Path) -> None:
    config = DataConfig(**{**TINY_CONFIG.__dict__, "max_classes": 2})

    report = validate_dataset(good_dataset, config)

    assert "the dataset has 3 class(es) with ok images, more than data.max_classes=2" in report.failures


def test_long_and_control_character_labels_fail(good_dataset: Path, tmp_path: Path) -> None:
    def edit(m: pd.DataFrame) -> None:
        m.loc[0, "label"] = "x" * 300
        m.loc[1, "label"] = "bad\x1b[31mlabel"

    report = validate_dataset(edited_copy(good_dataset, tmp_path / "ds", edit), TINY_CONFIG)

    text = "\n".join(report.failures)
    assert "1 ok image(s) have a label longer than data.max_label_chars=200 characters, e.g. 'xxx" in text
    assert "1 ok image(s) have a label with control characters, e.g. 'bad\\x1b[31mlabel'" in text


def test_a_near_duplicate_chain_across_train_and_test_is_a_leak(good_dataset: Path, tmp_path: Path) -> None:
    # a ~ b (3 bits) and b ~ c (6 bits) but a and c are 9 bits apart: one group, train to test.
    def edit(m: pd.DataFrame) -> None:
        m.loc[[0, 1, 2], "phash"] = [f"{v:016x}" for v in (0, 0b111, 0b111111111)]
        m.loc[[0, 1, 2], "split"] = ["train", "val", "test"]

    report = validate_dataset(edited_copy(good_dataset, tmp_path / "ds", edit), TINY_CONFIG)

    paths = pd.read_parquet(good_dataset / "manifest.parquet")["path"].tolist()
    assert report.statistics["near_duplicate_groups"] == 1 and report.statistics["near_duplicate_images"] == 3
    assert report.statistics["near_duplicates_across_train_test"] == 1
    assert report.statistics["near_duplicate_groups_across_train_test"] == 1
    assert (
        f"1 near-duplicate pair(s) straddle train and test (leakage) in 1 near-duplicate group(s), "
        f"e.g. ['{paths[0]} ~ {paths[2]}']"
    ) in report.failures


def test_images_too_small_in_either_dimension_are_named_per_dimension(good_dataset: Path, tmp_path: Path) -> None:
    def edit(m: pd.DataFrame) -> None:
        m.loc[0, "height"] = 9
        m.loc[[1, 2], "width"] = 12

    report = validate_dataset(edited_copy(good_dataset, tmp_path / "ds", edit), TINY_CONFIG)

    paths = pd.read_parquet(good_dataset / "manifest.parquet")["path"].tolist()
    assert f"1 ok image(s) are shorter than 16 px (smallest 9 px), e.g. [{paths[0]!r}]" in report.failures
    assert f"2 ok image(s) are narrower than 16 px (smallest 12 px), e.g. [{paths[1]!r}, {paths[2]!r}]" in (
        report.failures
    )
    checks = {c["check"]: c["success"] for c in report.result["checks"]}
    assert checks["min_height"] is False and checks["min_width"] is False


def test_summary_truncates_warnings_like_failures() -> None:
    report = QualityReport(True, [], [f"careful {i}" for i in range(12)], {"n_ok": 2, "n_images": 2})

    text = report.summary()

    assert text.startswith("data quality PASSED")
    assert "WARN careful 9" in text and "careful 10" not in text and "and 2 more warnings" in text
    assert "FAIL" not in text
