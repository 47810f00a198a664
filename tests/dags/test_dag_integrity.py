"""The DAG files import cleanly, fast, without heavy modules, and declare the pipeline we expect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from tests.airflow_env import REPO

DAG_ID = "image_classifier_retraining"
DAG_FILE = REPO / "dags" / f"{DAG_ID}.py"
HEAVY = ("tensorflow", "keras", "great_expectations", "boto3", "botocore", "kaggle", "cv2", "matplotlib", "sklearn")


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert DAG_ID in dagbag.dags


def test_pipeline_shape(dagbag):
    dag = dagbag.dags[DAG_ID]
    upstream = {tid: set(task.upstream_task_ids) for tid, task in dag.task_dict.items()}
    assert upstream["data.validate"] == {"data.ingest"}
    assert {"data.should_train"} <= upstream["training.prepare"]
    assert "training.prepare" in upstream["training.train"]
    assert "training.pick_for_finetuning" in upstream["training.finetune"]
    assert {"training.train", "training.finetune"} <= upstream["release.evaluate"]
    assert "release.evaluate" in upstream["release.gate"]
    assert "release.gate" in upstream["release.promote"]
    assert upstream["release.announce"] == {"release.promote", "release.promoted"}
    # The search: rung_1 over the planned trials, then survivors_<r> -> rung_<r+1>, three rungs at most; evaluate
    # waits for every rung (skipped ones included: none_failed_min_one_success).
    assert "data.should_train" in upstream["search.plan"]
    assert "search.plan" in upstream["search.rung_1"]
    for rung in (1, 2):
        assert upstream[f"search.survivors_{rung}"] == {f"search.rung_{rung}"}
        assert f"search.survivors_{rung}" in upstream[f"search.rung_{rung + 1}"]
    assert {"search.rung_1", "search.rung_2", "search.rung_3"} <= upstream["release.evaluate"]
    assert "search.rung_4" not in upstream


def test_operational_policy(dagbag):
    dag = dagbag.dags[DAG_ID]
    tasks = dag.task_dict
    # Tasks that touch the store retry (it may be restarting); deterministic failures fail at
    # once through the retry policy (the e2e test of a failing quality suite checks it does).
    for tid in ("data.ingest", "data.validate", "data.should_train", "training.train", "release.evaluate",
                "release.promote"):
        assert tasks[tid].retries >= 1, tid
        assert tasks[tid].retry_exponential_backoff, tid
        failing_at_once = {rule.exception for rule in tasks[tid].retry_policy.rules}
        assert {"ml.errors.DataError", "ml.errors.StorageAuthError"} <= failing_at_once, tid
    for tid, task in tasks.items():
        assert task.execution_timeout is not None and task.execution_timeout <= timedelta(hours=6), tid
    for tid in ("training.train", "training.finetune", "search.rung_1", "search.rung_2", "search.rung_3"):
        assert tasks[tid].pool == "training"
        assert tasks[tid].queue == "training"
        assert tasks[tid].map_index_template, tid
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert [o.name for o in tasks["release.announce"].outlets] == ["image_classifier_production"]


def test_params_reject_bad_values(dagbag):
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    params = dagbag.dags[DAG_ID].params
    params.validate()  # the defaults are valid
    for name, bad in (("epochs", 0), ("image_size", 8), ("candidates", ["transfer_nonexistent"]),
                      ("candidates", []), ("min_delta", -1)):
        trial = copy.deepcopy(params)
        with pytest.raises(ParamValidationError):
            trial[name] = bad
            trial.validate()


def test_default_params_leave_the_config_file_in_charge(dagbag):
    """A scheduled run (all params at their defaults) must do what config/pipeline.yaml says, not
    what the DAG file's defaults happen to be; only the per-run switches have a value."""
    from ml.config import overrides_from_params

    defaults = dagbag.dags[DAG_ID].params.dump()

    assert overrides_from_params(defaults) == {"gate": {"force": False, "allow_label_change": False}}


def test_dag_file_parses_fast_without_heavy_imports():
    # Airflow itself is imported first: what we measure is what the DAG file adds.
    code = f"""
import json, sys, time, runpy
import airflow.sdk
started = time.perf_counter()
runpy.run_path({str(DAG_FILE)!r})
elapsed = time.perf_counter() - started
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))
print(json.dumps({{"seconds": elapsed, "heavy": heavy}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["seconds"] < 1.0, result


@pytest.mark.parametrize(("spec", "expected"), [("@daily", "@daily"), ("none", None),
                                                ("asset:s3://raw-images/dogs/", "asset")])
def test_schedule_comes_from_the_environment(spec, expected):
    code = f"""
import json, os, runpy
os.environ["ML_RETRAIN_SCHEDULE"] = {spec!r}
dag = runpy.run_path({str(DAG_FILE)!r})["image_classifier_retraining"]()
timetable = dag.timetable
kind = "asset" if type(timetable).__name__.startswith("Asset") else str(dag.schedule)
print(json.dumps({{"kind": kind, "none": type(timetable).__name__ == "NullTimetable"}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if expected is None:
        assert result["none"]
    elif expected == "asset":
        assert result["kind"] == "asset"
    else:
        assert expected in str(result["kind"])


def test_deadline_alert_records_a_late_run_after_the_default_maximum_run_time(dagbag):
    from airflow.sdk import DeadlineReference
    from airflow.serialization.serialized_objects import DagSerialization

    from ml.config import DEFAULT_MAX_RUN_MINUTES

    dag = dagbag.dags[DAG_ID]

    assert len(dag.deadline) == 1
    alert = dag.deadline[0]
    # Not DAGRUN_QUEUED_AT: clearing a task of such a run fails in Airflow 3.3 (apache/airflow#70368).
    assert alert.reference == DeadlineReference.DAGRUN_LOGICAL_DATE
    assert alert.interval == timedelta(minutes=DEFAULT_MAX_RUN_MINUTES)
    assert alert.callback.path == "_shared.alerts.record_late_run"
    assert alert.callback.kwargs == {"max_run_minutes": DEFAULT_MAX_RUN_MINUTES}
    # What the scheduler gets: the alert survives serialization.
    assert "_shared.alerts.record_late_run" in json.dumps(DagSerialization.to_dict(dag), default=str)


def test_the_scheduler_finds_the_deadline_alert_in_the_database(dagbag):
    """What the scheduler reads: the DAG from the database, its alert by id (dag.test() cannot show this)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import sync_bag_to_db
    from airflow.models.deadline_alert import DeadlineAlert as DeadlineAlertModel
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.sdk.definitions.deadline import DagRunLogicalDateDeadline
    from airflow.utils.session import create_session

    from ml.config import DEFAULT_MAX_RUN_MINUTES

    with create_session() as session:
        DagBundlesManager().sync_bundles_to_db(session=session)
    sync_bag_to_db(dagbag, "dags-folder", None)  # as the dag-processor stores it
    with create_session() as session:
        dag = SerializedDagModel.get_dag(DAG_ID, session=session)
        alerts = [DeadlineAlertModel.get_by_id(alert_id, session=session) for alert_id in dag.deadline]

        assert [a.name for a in alerts] == ["max_run_time"]
        assert alerts[0].reference_class.__name__ == DagRunLogicalDateDeadline.__name__
        assert alerts[0].interval.get("__data__") == DEFAULT_MAX_RUN_MINUTES * 60
        assert "_shared.alerts.record_late_run" in json.dumps(alerts[0].callback_def)


_DEADLINE_PROBE = """
import json, os, runpy
os.environ["ML_MAX_RUN_MINUTES"] = {value!r}
dag = runpy.run_path({path!r})["image_classifier_retraining"]()
print(json.dumps([[a.interval.total_seconds(), a.callback.kwargs] for a in dag.deadline or []]))
"""


@pytest.mark.parametrize(("value", "expected"), [
    ("17", [[17 * 60.0, {"max_run_minutes": 17}]]), (" 1440 ", [[1440 * 60.0, {"max_run_minutes": 1440}]]),
    ("none", []), ("", [[480 * 60.0, {"max_run_minutes": 480}]])])  # unset/empty: the default, 8 h
def test_deadline_interval_comes_from_the_environment(value, expected):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'dags'}"}
    out = subprocess.run([sys.executable, "-c", _DEADLINE_PROBE.format(value=value, path=str(DAG_FILE))],
                         capture_output=True, text=True, env=env)

    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("value", ["0", "-5", "90m", "1.5", "100000"])
def test_a_bad_maximum_run_time_fails_the_dag_import_naming_the_variable(value):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'dags'}"}
    out = subprocess.run([sys.executable, "-c", _DEADLINE_PROBE.format(value=value, path=str(DAG_FILE))],
                         capture_output=True, text=True, env=env)

    assert out.returncode != 0
    assert "ConfigError: ML_MAX_RUN_MINUTES must be a whole number of minutes in [1, 10080]" in out.stderr
    assert repr(value) in out.stderr


def test_ensembles_are_trigger_choices_and_never_trained(dagbag):
    """ensemble_top<k> is picked in the form, built by release.evaluate (after every training task),
    and never mapped to a training task."""
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    from ml.config import PipelineConfig, overrides_from_params

    params = copy.deepcopy(dagbag.dags[DAG_ID].params)
    params["candidates"] = ["scratch_small", "transfer_mobilenet_v2", "ensemble_top2"]
    params.validate()
    config = PipelineConfig.load(overrides=overrides_from_params(params.dump()))
    assert config.train.trained_candidates == ("scratch_small", "transfer_mobilenet_v2")
    assert config.train.ensembles == ("ensemble_top2",)
    with pytest.raises(ParamValidationError):
        params["candidates"] = ["scratch_small", "ensemble_top9"]
        params.validate()
    evaluate = dagbag.dags[DAG_ID].task_dict["release.evaluate"]
    assert {"training.train", "training.finetune"} <= set(evaluate.upstream_task_ids)
    assert evaluate.trigger_rule == "none_failed_min_one_success"
