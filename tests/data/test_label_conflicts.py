"""Label noise is quarantined, not fatal: identical bytes under two labels, below and above the limit."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from ml.config import DataConfig, PipelineConfig
from ml.data.quality import validate_dataset
from ml.data.sample import make_sample_dataset
from ml.errors import ConfigError, DataQualityError

# 4 classes x 50 = 200 images of 32 px; the sample's classes are 50 each, well above these minimums.
CONFIG = DataConfig(min_width=16, min_height=16, warn_images_per_class=10)


def _with_cross_class_copies(root: Path, copies: int) -> Path:
    """A 200-image folder-per-class sample where `copies` files of one class hold another class's bytes."""
    src = root / "src"
    make_sample_dataset(src, classes=4, per_class=50, size=32, seed=11, layout="folders")
    first, second = sorted(p for p in src.iterdir() if p.is_dir())[:2]
    for i in range(copies):
        # Overwrite (not add) so the dataset keeps 200 files: each pair is 2 conflicting images.
        shutil.copyfile(sorted(first.iterdir())[i], sorted(second.iterdir())[i])
    return src


def _ingested(tmp_path: Path, copies: int, config: DataConfig = CONFIG) -> Path:
    from ml.data.ingest import ingest

    return Path(ingest(str(_with_cross_class_copies(tmp_path, copies)), tmp_path / "work", config)["dataset_dir"])


def test_one_cross_class_duplicate_in_200_images_is_a_warning_naming_both_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = _ingested(tmp_path, copies=1)

    with caplog.at_level(logging.WARNING, logger="ml.data.quality"):
        report = validate_dataset(dataset, CONFIG, out_dir=tmp_path / "out")

    assert report.success, report.summary()
    report.raise_for_failures()  # the run goes on
    stats = report.statistics
    assert stats["n_images"] == 200 and stats["n_label_conflicts"] == 2 and stats["label_conflict_fraction"] == 0.01
    [group] = stats["label_conflicts"]
    files = {(f["path"], f["label"]) for f in group["files"]}
    assert len(files) == 2 and len({label for _, label in files}) == 2
    [warning] = [w for w in report.warnings if "label conflict" in w]
    for path, label in files:
        assert repr(path) in warning and repr(label) in warning
        assert repr(path) in caplog.text
    html = (tmp_path / "out" / "quality.html").read_text()
    assert "Label conflicts (quarantined)" in html and all(path in html for path, _ in files)
    checks = {c["check"]: (c["severity"], c["success"]) for c in report.result["checks"]}
    assert checks["no_label_conflicts"] == ("warning", False)
    assert checks["label_conflict_fraction"] == ("failing", True)


def test_conflicts_above_the_fraction_fail_naming_the_setting(tmp_path: Path) -> None:
    dataset = _ingested(tmp_path, copies=2)  # 4 of 200 images = 2%

    report = validate_dataset(dataset, CONFIG)

    assert not report.success
    [failure] = report.failures
    assert failure.startswith("4 of 200 images (2.0%) have identical bytes under different labels")
    assert "more than data.max_label_conflict_fraction=1.0%" in failure
    with pytest.raises(DataQualityError, match="data.max_label_conflict_fraction"):
        report.raise_for_failures()
    # The same data passes when the deployment allows more label noise.
    assert validate_dataset(dataset, DataConfig(**{**CONFIG.__dict__, "max_label_conflict_fraction": 0.02})).success


def test_validate_stage_goes_on_and_the_run_report_lists_the_conflicts(tmp_path: Path) -> None:
    from ml.evaluation.report import quality_section
    from ml.pipeline import ingest_stage, validate_stage

    source = _with_cross_class_copies(tmp_path, copies=1)
    config = PipelineConfig(data=DataConfig(**{**CONFIG.__dict__, "source": str(source)}), work_dir=tmp_path / "w")

    quality = validate_stage(ingest_stage(config, None), config, None, "manual__conflicts")

    assert quality["success"] is True
    [group] = quality["label_conflicts"]
    html = quality_section(quality)
    assert "Label conflicts (quarantined)" in html
    assert all(f["path"] in html and f["label"] in html for f in group["files"])


@pytest.mark.parametrize("value", [-0.01, 1.5, "1%", True, None])
def test_max_label_conflict_fraction_is_validated(value: object) -> None:
    with pytest.raises(ConfigError, match=r"data.max_label_conflict_fraction must be a number in \[0, 1\]"):
        DataConfig(max_label_conflict_fraction=value)  # type: ignore[arg-type]


def test_max_label_conflict_fraction_defaults_to_one_percent() -> None:
    assert DataConfig().max_label_conflict_fraction == 0.01
    assert PipelineConfig.from_dict({"data": {"max_label_conflict_fraction": 0.05}}).data.max_label_conflict_fraction \
        == 0.05
