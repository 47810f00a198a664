"""Fault 5: corrupted decoded-image cache and bottleneck files are detected, rebuilt, never trained on.

The corruption is done to the real files on disk (truncation, one flipped bit) between two
training runs. The next `train_stage` must notice it by size/checksum, rebuild the file
(new mtime, a warning in the log, content identical to a clean build) before training, and
train to a sane result.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from tests.faults.conftest import new_bucket_name, store_for, tiny_config

pytestmark = pytest.mark.faults


def _flip_bit(path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x10]))


def _truncate(path, keep: float = 0.6) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


@pytest.fixture(scope="module")
def env(module_seaweed, sample_source, tmp_path_factory):
    bucket = new_bucket_name()
    store = store_for(module_seaweed, bucket)
    work = tmp_path_factory.mktemp("work")
    config = tiny_config(work, bucket, module_seaweed.endpoint_url, source=sample_source)
    from ml.data.snapshot import local_dataset
    from ml.pipeline import ingest_stage

    dataset = ingest_stage(config, store)
    return {"config": config, "store": store, "dataset_dir": str(local_dataset(config, store, dataset)), "work": work}


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupted_image_cache_is_rebuilt_before_training(env, damage, caplog):
    from ml.data.image_cache import IMAGES_FILE, ImageCache, cache_folder
    from ml.pipeline import prepare_stage, train_stage
    from ml.registry.runs import cache_root

    config, store, dataset_dir = env["config"], env["store"], env["dataset_dir"]
    prepare_stage(dataset_dir, config)
    dataset_hash = json.loads((Path(dataset_dir) / "dataset.json").read_text())["dataset_hash"]
    folder = cache_folder(cache_root(config), dataset_hash, config.train.image_size)
    images = folder / IMAGES_FILE
    clean = images.read_bytes()
    if damage == "truncate":
        _truncate(images)
    else:
        _flip_bit(images, len(clean) // 2)
    damaged_mtime = images.stat().st_mtime_ns
    caplog.set_level(logging.INFO)

    summary = train_stage(dataset_dir, "scratch_tiny", config, store, f"run-cache-{damage}")

    rebuilt = folder / IMAGES_FILE
    messages = [r.getMessage() for r in caplog.records]
    warned = [i for i, m in enumerate(messages) if "is damaged and will be rebuilt" in m and str(folder) in m]
    trained = [i for i, m in enumerate(messages) if m.startswith("trained scratch_tiny")]
    assert warned, "the damaged cache was not reported"
    assert trained and warned[0] < trained[0], "the rebuild must happen before training"
    assert rebuilt.stat().st_mtime_ns != damaged_mtime
    assert rebuilt.read_bytes() == clean, "the rebuilt cache differs from a clean build"
    ImageCache.load(folder, verify=True)  # passes its checksums again
    assert summary["val_accuracy"] is not None and math.isfinite(summary["val_accuracy"])
    assert math.isfinite(summary["val_loss"])


def test_corrupted_bottleneck_file_is_recomputed_not_trained_on(env, caplog):
    from ml.config import PipelineConfig
    from ml.models.weights import file_sha256
    from ml.pipeline import train_stage
    from ml.registry.runs import cache_root

    config, store, dataset_dir = env["config"], env["store"], env["dataset_dir"]
    # A frozen backbone without augmentation trains its head on cached bottleneck features.
    raw = config.to_dict()
    raw["train"].update({"candidates": ["transfer_mobilenet"], "augment": False,
                         "candidate_options": {"transfer_mobilenet": {"alpha": 0.25}}})
    tconfig = PipelineConfig.from_dict(raw)
    first = train_stage(dataset_dir, "transfer_mobilenet", tconfig, store, "run-bn-1")
    path = cache_root(tconfig) / first["bottleneck"]["path"]  # relative to the worker's cache root
    clean = np.load(path)
    header = len(path.read_bytes()) - clean.nbytes  # .npy header, then the float32 rows
    _flip_bit(path, header + clean.nbytes // 3)
    damaged_mtime = path.stat().st_mtime_ns
    caplog.set_level(logging.INFO)

    second = train_stage(dataset_dir, "transfer_mobilenet", tconfig, store, "run-bn-2")

    assert second["bottleneck"]["hit"] is False, "the damaged features were used"
    assert any("is damaged and will be recomputed" in r.getMessage() for r in caplog.records)
    assert path.stat().st_mtime_ns != damaged_mtime
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["sha256"] == file_sha256(path)
    np.testing.assert_allclose(np.load(path), clean, rtol=1e-5, atol=1e-5)
    assert math.isfinite(second["val_loss"])
    third = train_stage(dataset_dir, "transfer_mobilenet", tconfig, store, "run-bn-3")
    assert third["bottleneck"]["hit"] is True, "an intact bottleneck file must be reused"
