from __future__ import annotations

import pytest

from tests import airflow_env

airflow_env.configure()


@pytest.fixture(scope="session")
def dagbag():
    """All DAGs in dags/, parsed the way the dag processor parses them (ML_MAX_RUN_MINUTES unset: the default)."""
    import os

    from ml.config import MAX_RUN_MINUTES_ENV

    airflow_env.migrate()
    from airflow.dag_processing.dagbag import DagBag

    before = os.environ.get(MAX_RUN_MINUTES_ENV)
    os.environ.pop(MAX_RUN_MINUTES_ENV, None)
    try:
        return DagBag(dag_folder=str(airflow_env.REPO / "dags"))
    finally:
        if before is None:
            os.environ.pop(MAX_RUN_MINUTES_ENV, None)
        else:
            os.environ[MAX_RUN_MINUTES_ENV] = before
