"""Fault 1: a training process SIGKILLed mid-epoch, then retried -- and resumed where it was killed.

Twice: first `train_stage` in a plain subprocess, killed and run again by the test (fast, and
it pins the staging protocol); then the real thing, a DAG run on `airflow standalone` whose
`training.train` task process (the PID Airflow records for the task instance) is SIGKILLed
mid-epoch, failed by its supervisor and retried by Airflow's own `retries`, after the worker's
whole ML_WORK_DIR was wiped (the retry meets a fresh worker: nothing but the store and the
metadata DB). Either way the kill must leave nothing a reader would take as complete: no marker
and no half-published files under the candidate's keys in the store, no final-named files in
the local candidate folder. The retry must resume from the last epoch checkpoint in the store
(no completed epoch trained twice), publish, delete the checkpoints, and the run go on to promote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from ml.registry import layout
from tests.faults.conftest import (
    MODEL,
    PYTHON,
    airflow_stack,
    assert_pointer_verifiable,
    new_bucket_name,
    store_for,
    subprocess_env,
    tiny_config,
)

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


def _assert_nothing_complete(store, prefix: str, cand_dir) -> None:
    assert store.list_keys(prefix) == [], "a killed attempt published objects"
    leftovers = sorted(p.name for p in cand_dir.iterdir())
    assert not set(FINAL_NAMES) & set(leftovers), f"final-named files after the kill: {leftovers}"
    assert any(name.startswith(".staging-") for name in leftovers), "the kill did not land mid-training"


def test_training_killed_mid_epoch_leaves_nothing_complete_and_retry_publishes(own_seaweed, sample_source,
                                                                               tmp_path):
    from ml.pipeline import ingest_stage, prepare_stage
    from ml.registry.runs import ensure_candidate_local, local_run_dir, run_key

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    # Many epochs and no early stopping: the kill lands while training is still going.
    config = tiny_config(tmp_path / "work", bucket, own_seaweed.endpoint_url, source=sample_source,
                         train={"epochs": EPOCHS, "early_stopping_patience": 1000})
    from ml.data.snapshot import local_dataset

    dataset = ingest_stage(config, store)
    prepare_stage(dataset, config)
    env = subprocess_env(AWS_ACCESS_KEY_ID=own_seaweed.access_key,
                         AWS_SECRET_ACCESS_KEY=own_seaweed.secret_key)
    argv = [PYTHON, "-c", TRAIN, json.dumps(config.to_dict()), str(local_dataset(config, store, dataset))]
    cand_dir = local_run_dir(config, "run-kill") / "scratch_tiny"
    prefix = f"{run_key(config, 'run-kill')}/scratch_tiny/"

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
    _assert_nothing_complete(store, prefix, cand_dir)
    checkpoints = layout.checkpoint_prefix(MODEL, "run-kill", "scratch_tiny")
    assert store.get_json(checkpoints + "latest.json")["epochs_done"] >= 1, "no checkpoint before the kill"

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
    assert store.list_keys(checkpoints) == [], "checkpoints outlived the published candidate"


AIRFLOW_EPOCHS = 40  # scratch_tiny on the sample: ~0.3 s an epoch, so the kill lands well before the end
TRAIN_TASK = "training.train"


@pytest.mark.timeout(900)
def test_airflow_retries_a_training_task_killed_mid_epoch(own_seaweed, sample_source, tmp_path):
    from ml.registry.runs import local_run_dir, run_key

    bucket = new_bucket_name()
    store = store_for(own_seaweed, bucket)
    # No early stopping, and force_promote so the tiny model's promotion proves the run got to the end.
    stack = airflow_stack(tmp_path / "stack", own_seaweed, bucket, {
        "storage": {"model_name": MODEL},
        "data": {"min_images_per_class": 5},
        "train": {"early_stopping_patience": 1000, "batch_size": 32},
        "gate": {"force_promote": True},
    })
    conf = {"source": str(sample_source), "candidates": ["scratch_tiny"], "epochs": AIRFLOW_EPOCHS,
            "image_size": 32, "finetune_top_k": 0, "force": True}
    run_id = "faults__train_kill"
    config = tiny_config(stack.work_dir, bucket, own_seaweed.endpoint_url)
    cand_dir = local_run_dir(config, run_id) / "scratch_tiny"
    prefix = f"{run_key(config, run_id)}/scratch_tiny/"
    checkpoints = layout.checkpoint_prefix(MODEL, run_id, "scratch_tiny")

    stack.prepare()
    stack.start()
    try:
        stack.wait_for_dag()
        stack.trigger(conf, run_id)
        deadline = time.monotonic() + 420
        task = None
        while time.monotonic() < deadline:
            task = stack.task(run_id, TRAIN_TASK, 0)
            if task and task.state == "running" and task.pid and _history_rows(cand_dir) >= 2:
                break
            assert stack.run_state(run_id) not in ("success", "failed"), "the run ended before the kill"
            time.sleep(0.05)
        else:
            pytest.fail(f"training never got 2 epochs in; task {task}; logs under {stack.home / 'logs'}")
        epochs_done = _history_rows(cand_dir)
        assert stack.owns(task.pid), f"pid {task.pid} is not a process of our stack"
        assert task.try_number == 1
        os.kill(task.pid, signal.SIGKILL)

        # Airflow notices the dead task process and schedules the retry (retries=2, retry_delay 20 s).
        while (t := stack.task(run_id, TRAIN_TASK, 0)) and t.try_number == 1 and t.state == "running":
            assert time.monotonic() < deadline, f"Airflow did not notice the killed task: {t}"
            time.sleep(0.1)
        after_kill = stack.task(run_id, TRAIN_TASK, 0)
        assert 2 <= epochs_done < AIRFLOW_EPOCHS
        # The epochs the killed try completed and checkpointed: the retry must not train them again.
        resume_at = store.get_json(checkpoints + "latest.json")["epochs_done"]
        assert resume_at >= 1
        killed_rows = (next(cand_dir.glob(".staging-*/history.csv")).read_text().splitlines()
                       if list(cand_dir.glob(".staging-*/history.csv")) else [])
        assert after_kill.try_number == 1, f"the retry started before the test could wipe the work dir: {after_kill}"
        assert after_kill.state in ("up_for_retry", "failed"), after_kill
        _assert_nothing_complete(store, prefix, cand_dir)
        # The retry meets a fresh worker (retry_delay is 20 s): no dataset, no caches, no run folder.
        shutil.rmtree(stack.work_dir)
        stack.work_dir.mkdir()

        state = stack.wait_run(run_id, timeout=600)
        final = stack.task(run_id, TRAIN_TASK, 0)
        first_try_log = stack.task_log(run_id, TRAIN_TASK, 0, try_number=1)
        retry_log = stack.task_log(run_id, TRAIN_TASK, 0, try_number=2)
    finally:
        stack.stop()

    assert state == "success", f"run ended {state}; logs under {stack.home / 'logs'}"
    assert (final.state, final.try_number) == ("success", 2), final
    assert stack.tries(run_id, TRAIN_TASK, 0)[:1] == [(1, "failed")]
    # The supervisor saw its task process die of the signal (not a timeout, not a Python error).
    assert '"signal_name":"SIGKILL"' in first_try_log, first_try_log[-3000:]
    # The retry resumed at the checkpointed epoch, and saved only the epochs after it.
    assert (f"resuming scratch_tiny at epoch {resume_at + 1} of {AIRFLOW_EPOCHS} ({resume_at} completed epochs "
            f"restored) from s3://{bucket}/{checkpoints}epoch-{resume_at:05d}.npz") in retry_log, retry_log[-3000:]
    saved = [int(n) for n in re.findall(r"checkpoint scratch_tiny: (\d+) epochs done", retry_log)]
    assert saved == list(range(resume_at + 1, AIRFLOW_EPOCHS + 1)), f"epochs the retry trained: {saved}"
    summary = store.get_json(prefix + "train_summary.json")
    assert summary["epochs_run"] == AIRFLOW_EPOCHS, "the curves do not cover every epoch"
    history = store.get_bytes(prefix + "history.csv").decode().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(AIRFLOW_EPOCHS)), "an epoch twice or missing"
    # The restored rows are the killed try's own, byte for byte (history.csv travelled in the checkpoint).
    assert history[: resume_at + 1] == killed_rows[: resume_at + 1]
    assert {prefix + name for name in FINAL_NAMES} <= set(store.list_keys(prefix))
    assert store.list_keys(checkpoints) == [], "checkpoints outlived the published candidate"
    assert not [p.name for p in cand_dir.iterdir() if p.name.startswith(".staging-")], "staging left behind"
    assert_pointer_verifiable(store)
