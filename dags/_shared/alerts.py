"""The retraining DAG's deadline-alert callback: a late run is recorded like a failed task.

Airflow runs it on the executor (a `SyncCallback`) when a run is still going
`ML_MAX_RUN_MINUTES` after its logical date, with ``context = {"dag_run": {...}, "deadline": {...}}``
(the run as `DAGRunResponse` dumps it: its id is ``dag_run_id``).
It lives here, not in the DAG file, so its import path is an ordinary module of the DAG folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def record_late_run(context: Mapping[str, Any], max_run_minutes: int) -> None:
    """Write the late run's record to ``runs/<run_id>/failures/`` through the tasks' store."""
    from _shared.connections import object_store
    from ml.config import PipelineConfig, overrides_from_params
    from ml.registry.runs import record_late_run as record

    dag_run = context.get("dag_run") or {}  # the run as the REST API shows it (DAGRunResponse)
    run_id = dag_run.get("dag_run_id")
    if not run_id:
        log.error("deadline alert: the callback's context names no dag_run_id (keys: %s); nothing recorded",
                  sorted(dag_run))
        return
    deadline = (context.get("deadline") or {}).get("deadline_time")
    config = PipelineConfig.load(overrides=overrides_from_params(dag_run.get("conf") or {}))
    record(config, object_store(config), str(run_id), max_run_minutes=max_run_minutes,
           deadline=deadline)
