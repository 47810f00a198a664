"""The deadline alert fires on a real `airflow standalone`: a run still going at its maximum run time
is recorded like a failed task (runs/<run_id>/failures/), and the run itself carries on to the end.

The DAG reads ML_MAX_RUN_MINUTES at parse time; here it is 1 minute. The alert counts from the run's
logical date (what the UI's trigger form and `AirflowStack.trigger` set), here 90 s before the trigger.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.faults.conftest import MODEL, airflow_stack, new_bucket_name, store_for

pytestmark = pytest.mark.faults


@pytest.mark.timeout(900)
def test_a_run_past_its_maximum_run_time_is_recorded_as_late_and_still_finishes(own_seaweed, sample_source,
                                                                                 tmp_path):
    from ml.registry.layout import FAILURES_DIR, run_key
    from ml.registry.runs import LATE_RUN_TASK

    bucket = new_bucket_name("deadline")
    direct = store_for(own_seaweed, bucket)
    stack = airflow_stack(tmp_path / "stack", own_seaweed, bucket,
                          {"storage": {"model_name": MODEL}, "data": {"min_images_per_class": 5}},
                          extra_env={"ML_MAX_RUN_MINUTES": "1"})
    stack.prepare()
    stack.start()
    try:
        stack.wait_for_dag()
        run_id = "faults__late_run"
        # Logically due 90 s ago, as a scheduled run that waited behind another would be: its 1-minute deadline
        # has passed when it starts, and the run (ingest + validate alone take ~20 s) is still going when the
        # scheduler checks. (A run that merely takes longer than a minute was too fast on a quiet machine.)
        logical_date = datetime.now(UTC) - timedelta(seconds=90)
        conf = {"source": str(sample_source), "candidates": ["scratch_tiny"], "epochs": 12, "image_size": 32,
                "finetune_top_k": 0, "force": True}
        state = stack.wait_run(stack.trigger(conf, run_id, logical_date=logical_date), timeout=600)
        assert state == "success", f"run ended {state}; see {stack.log_file}"

        failures = run_key(MODEL, run_id, FAILURES_DIR) + "/"
        waited = time.monotonic() + 60  # the callback may land just after the run ends
        records = []
        while time.monotonic() < waited and not records:
            records = [direct.get_json(k) for k in direct.list_keys(failures)]
            time.sleep(2)
        late = [r for r in records if r["task_id"] == LATE_RUN_TASK]
        assert len(late) == 1, f"records under {failures}: {records}; scheduler log: {stack.log_file}"
        assert f"run {run_id} missed its deadline" in late[0]["error"]
        assert "maximum run time of 1 min (ML_MAX_RUN_MINUTES)" in late[0]["error"]
        assert [r for r in records if r["task_id"] != LATE_RUN_TASK] == []  # no task failed
    finally:
        stack.stop()
