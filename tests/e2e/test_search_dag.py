"""Hyperparameter search through the retraining DAG (`dag.test()`) against a real SeaweedFS: 4 trials,
eta 2, 2 rungs -- rung_1 over 4 trials, survivors_1 keeps 2, rung_2 resumes them to 4 epochs, rung_3 is skipped."""

from __future__ import annotations

import logging
import time

import pytest
import yaml

from tests.e2e.test_dag_end_to_end import MODEL, _run, _safe

pytestmark = pytest.mark.e2e

SEARCH = {"enabled": False, "bases": ["scratch_tiny"], "max_trials": 4, "eta": 2, "rungs": 2, "min_epochs": 2,
          "metric": "val_accuracy", "seed": 11,
          "space": {"learning_rate": {"log_uniform": [1e-3, 1e-2]}, "dropout": [0.0, 0.1, 0.2]}}


def test_dag_searches_by_successive_halving_across_mapped_tasks(pipeline_env, tmp_path_factory, monkeypatch):
    from ml.config import SearchConfig
    from ml.data.sample import make_sample_dataset
    from ml.training.search import plan_search

    sample = tmp_path_factory.mktemp("sample") / "dogs"
    make_sample_dataset(sample, classes=3, per_class=40, size=40, seed=5)
    config_file = tmp_path_factory.mktemp("config") / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump({"search": SEARCH}))  # off in the file: the trigger param turns it on
    monkeypatch.setenv("ML_CONFIG", str(config_file))
    store = pipeline_env["store"]
    conf = {"source": str(sample), "candidates": ["scratch_tiny"], "epochs": 2, "image_size": 32,
            "finetune_top_k": 0, "force": True}
    plan = plan_search(SearchConfig(**{**SEARCH, "enabled": True}))

    # The resume line, whatever handlers Airflow's task logging installs (dag.test() runs tasks in this process).
    resume_log, handler = [], logging.Handler(logging.INFO)
    handler.emit = lambda record: resume_log.append(record.getMessage())
    logger = logging.getLogger("ml.training.checkpoints")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        run = _run({**conf, "search": True})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    seconds = time.monotonic() - started

    assert run.state == "success"
    tis = {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}
    assert sum(1 for (tid, _), state in tis.items() if tid == "search.rung_1" and state == "success") == 4
    assert sum(1 for (tid, _), state in tis.items() if tid == "search.rung_2" and state == "success") == 2
    assert {state for (tid, _), state in tis.items() if tid == "search.rung_3"} == {"skipped"}
    root = f"{MODEL}/runs/{_safe(run.run_id)}"
    survivors = store.get_json(f"{root}/search/survivors-1.json")["survivors"]
    assert len(survivors) == 2
    report = store.get_json(f"{root}/report.json")
    rows = {row["candidate"]: row for row in report["leaderboard"]}
    assert set(rows) == {"scratch_tiny", *(t.name for t in plan.trials)}
    for trial in plan.trials:
        row, summary = rows[trial.name], store.get_json(f"{root}/{trial.name}/train_summary.json")
        assert row["search"]["params"] == dict(trial.params) and row["accuracy"] is not None
        if trial.name in survivors:
            assert row["search"]["rung"] == 2 and row["status"] == "ok"
            assert summary["epochs_run"] == 4 and summary["resumed_epochs"] == 2, "resumed, not restarted"
        else:
            assert row["search"]["rung"] == 1 and row["status"] == "eliminated"
            assert summary["epochs_run"] == 2
    # Final-rung trials are candidates like any other; eliminated ones never reach the gate.
    assert store.get_json(f"{root}/gate.json")["challenger"] in {"scratch_tiny", *survivors}
    assert not [k for k in store.list_keys(f"{root}/checkpoints/") if "__t" in k], "search checkpoints cleaned up"
    for name in survivors:
        assert any(f"resuming {name} at epoch 3 of 4 (2 completed epochs restored)" in m for m in resume_log), name

    # Off (the file's default): the group maps over zero trials and costs only its skipped tasks.
    started = time.monotonic()
    off = _run(conf)
    off_seconds = time.monotonic() - started
    assert off.state == "success"
    off_tis = {ti.task_id: ti.state for ti in off.get_task_instances()}
    assert {off_tis[f"search.rung_{r}"] for r in (1, 2, 3)} == {"skipped"}
    assert off_tis["release.evaluate"] == "success"
    off_rows = store.get_json(f"{MODEL}/runs/{_safe(off.run_id)}/report.json")["leaderboard"]
    assert [row["candidate"] for row in off_rows] == ["scratch_tiny"]
    # The cost, for the README (`pytest -s` shows it): wall time of each run, time in the search group's tasks.
    for name, dag_run, wall in (("search on", run, seconds), ("search off", off, off_seconds)):
        tis_ = [ti for ti in dag_run.get_task_instances() if ti.task_id.startswith("search.")]
        print(f"[search cost] {name}: run {wall:.1f} s; search tasks {sum(ti.duration or 0.0 for ti in tis_):.1f} s "
              f"over {len(tis_)} task instances ({sorted({ti.state for ti in tis_})})")
