from __future__ import annotations

import pytest

from tests import airflow_env

airflow_env.configure()


@pytest.fixture(scope="session")
def dagbag():
    """All DAGs in dags/, parsed the way the dag processor parses them."""
    airflow_env.migrate()
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(airflow_env.REPO / "dags"))
