"""docker/docker-compose.yaml is valid and says what the rest of the project assumes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.airflow_env import REPO

COMPOSE = REPO / "docker" / "docker-compose.yaml"


@pytest.fixture(scope="module")
def resolved() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    out = subprocess.run([exe, "--env-file", str(REPO / "docker" / ".env.example"), "-f", str(COMPOSE), "config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_has_every_production_service(resolved):
    assert {"postgres", "redis", "object-store", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-training"} \
        <= set(resolved["services"])


def test_workers_split_queues_the_dag_uses(resolved):
    services = resolved["services"]
    training_cmd = _command(services["airflow-worker-training"])
    default_cmd = _command(services["airflow-worker"])
    assert "--queues training" in training_cmd
    assert "--queues default" in default_cmd
    # The DAG sends training to the queue the training worker listens on.
    dag_source = (REPO / "dags" / "image_classifier_retraining.py").read_text()
    assert 'queue="training"' in dag_source


def test_airflow_services_share_celery_postgres_and_the_store(resolved):
    for name, service in resolved["services"].items():
        if not name.startswith("airflow-"):
            continue
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert "ml_object_store".upper() in " ".join(env), name
        assert env["ML_WORK_DIR"] == "/opt/ml-work", name


def test_init_creates_pool_and_bucket(resolved):
    script = _command(resolved["services"]["airflow-init"])
    assert "airflow db migrate" in script
    assert "airflow pools set training" in script
    assert "ensure_bucket()" in script


def test_object_store_enforces_credentials(resolved):
    store = resolved["services"]["object-store"]
    assert store["command"][:2] == ["weed", "mini"]
    assert store["environment"]["AWS_ACCESS_KEY_ID"] and store["environment"]["AWS_SECRET_ACCESS_KEY"]


def test_dockerfile_builds_from_requirements_with_gpu_switch():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "FROM apache/airflow:${AIRFLOW_VERSION}" in text
    assert "ARG TENSORFLOW_PACKAGE=tensorflow-cpu" in text
    assert "-r /opt/ml/requirements.txt -c /opt/ml/constraints.txt" in text
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    pinned = [line for line in requirements if line.startswith("apache-airflow==")]
    version = pinned[0].split("==")[1]
    assert f"ARG AIRFLOW_VERSION={version}" in text


def _command(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else " ".join(command)
