"""Tiny datasets for the quality-suite tests (made offline, in a few hundred milliseconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.config import DataConfig
from ml.data.ingest import ingest
from ml.data.sample import make_sample_dataset

# Thresholds scaled to a 3 x 6 image dataset.
TINY_CONFIG = DataConfig(
    val_percent=20.0,
    test_percent=20.0,
    seed=5,
    min_images_per_class=3,
    warn_images_per_class=5,
    min_width=16,
    min_height=16,
)


@pytest.fixture(scope="session")
def good_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published dataset folder (manifest.parquet + dataset.json) that passes the suite."""
    root = tmp_path_factory.mktemp("good")
    make_sample_dataset(root / "src", classes=3, per_class=6, size=32, seed=21)
    return Path(ingest(str(root / "src"), root / "work", TINY_CONFIG)["dataset_dir"])
