"""Point Airflow at a throw-away home before anything imports it (shared by the DAG and e2e tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def configure() -> Path:
    """Set AIRFLOW_HOME and friends once per test session; returns the home folder."""
    if "ML_TEST_AIRFLOW_HOME" not in os.environ:
        home = Path(tempfile.mkdtemp(prefix="ml-test-airflow-"))
        os.environ.update({
            "ML_TEST_AIRFLOW_HOME": str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        })
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return Path(os.environ["AIRFLOW_HOME"])


_migrated = False


def migrate() -> None:
    """`airflow db migrate` once per session (about 10 s on SQLite)."""
    global _migrated
    if _migrated:
        return
    configure()
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    subprocess.run([str(airflow), "pools", "set", "training", "2", "trainings"], check=True,
                   capture_output=True, env=os.environ.copy())
    _migrated = True
