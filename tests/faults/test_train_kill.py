"""Fault 1: a training process SIGKILLed mid-epoch, then retried.

`train_stage` runs in a subprocess (what an Airflow worker's task process is), is killed with
SIGKILL once its history shows completed epochs, and is run again. The kill must leave nothing
a reader would take as complete: no marker and no half-published files under the candidate's
keys in the store, no final-named files in the local candidate folder. The retry must complete
and publish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.faults.conftest import PYTHON, new_bucket_name, store_for, subprocess_env, tiny_config

pytestmark = pytest.mark.faults

TRAIN = """
import json, sys
from ml.config import PipelineConfig
from ml.pipeline import train_stage
from ml.registry.store import ObjectStore
config = PipelineConfig.from_dict(json.loads(sys.argv[1]))
store = ObjectStore.from_config(config.storage)
print(json.dumps(train_stage(sys.argv[2], "scratch_tiny", config, store, "run-kill")))
"""
FINAL_NAMES = ("model.keras", "labels.json", "preprocessing.json", "history.csv", "train_summary.json")
EPOCHS = 12


def _history_rows(cand_dir) -> int:
    """Completed epochs in any history.csv under the folder (CSVLogger flushes one row per epoch)."""
    rows = 0
    for path in cand_dir.rglob("history.csv"):
        try:
            rows = max(rows, len(path.read_text().splitlines()) - 1)
        except OSError:
            pass
    return rows


def test_training_killed_mid_epoch_leaves_nothing_complete_and_retry_publishes(own_seaweed, sample_source,
                                                                               tmp_path):
    from ml.pipeline import ensure_candidate_local, ingest_stage, local_run_dir, prepare_stage, run_prefix

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    # Many epochs and no early stopping: the kill lands while training is still going.
    config = tiny_config(tmp_path / "work", bucket, own_seaweed.endpoint_url, source=sample_source,
                         train={"epochs": EPOCHS, "early_stopping_patience": 1000})
    dataset = ingest_stage(config, store)
    prepare_stage(dataset["dataset_dir"], config)
    env = subprocess_env(AWS_ACCESS_KEY_ID=own_seaweed.access_key,
                         AWS_SECRET_ACCESS_KEY=own_seaweed.secret_key)
    argv = [PYTHON, "-c", TRAIN, json.dumps(config.to_dict()), dataset["dataset_dir"]]
    cand_dir = local_run_dir(config, "run-kill") / "scratch_tiny"
    prefix = f"{run_prefix(config, 'run-kill')}/scratch_tiny/"

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while _history_rows(cand_dir) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    epochs_done = _history_rows(cand_dir)
    assert proc.poll() is None, f"training ended before the kill: {proc.stdout.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)

    assert proc.returncode == -signal.SIGKILL, f"ended by itself: {proc.stdout.read().decode()[-2000:]}"
    assert 2 <= epochs_done < EPOCHS
    assert store.list_keys(prefix) == [], "a killed attempt published objects"
    leftovers = sorted(p.name for p in cand_dir.iterdir())
    assert not set(FINAL_NAMES) & set(leftovers), f"final-named files after the kill: {leftovers}"
    assert any(name.startswith(".staging-") for name in leftovers), "the kill did not land mid-training"

    retry = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]
    summary = json.loads(retry.stdout.strip().splitlines()[-1])
    assert summary["epochs_run"] == EPOCHS
    keys = store.list_keys(prefix)
    assert {prefix + name for name in FINAL_NAMES} <= set(keys)
    assert not [p.name for p in cand_dir.iterdir() if p.name.startswith(".staging-")], "staging left behind"
    # A reader on another worker gets the complete candidate from the store, marker last.
    other = tiny_config(tmp_path / "other-worker", bucket, own_seaweed.endpoint_url)
    fetched = ensure_candidate_local(store, other, "run-kill", "scratch_tiny")
    assert json.loads((fetched / "train_summary.json").read_text())["epochs_run"] == EPOCHS
    assert (fetched / "model.keras").read_bytes() == (cand_dir / "model.keras").read_bytes()
