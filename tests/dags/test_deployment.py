"""docker/docker-compose.yaml is valid and says what the rest of the project assumes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from tests.airflow_env import REPO

COMPOSE = REPO / "docker" / "docker-compose.yaml"


@pytest.fixture(scope="module")
def resolved() -> dict:
    return _config()


def _config(extra_env: dict[str, str] | None = None) -> dict:
    """`docker-compose config` with .env.example (and `extra_env` in the environment), parsed."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if k not in _env_example() and k != "AIRFLOW_API_BIND"}
    out = subprocess.run([exe, "--env-file", str(REPO / "docker" / ".env.example"), "-f", str(COMPOSE), "config"],
                         capture_output=True, text=True, env={**env, **(extra_env or {})})
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
    assert "python -m ml ensure-bucket" in script


def test_init_gets_the_store_keys_from_its_environment(resolved):
    env = resolved["services"]["airflow-init"]["environment"]
    example = _env_example()
    assert env["AWS_ACCESS_KEY_ID"] == example["S3_ACCESS_KEY"]
    assert env["AWS_SECRET_ACCESS_KEY"] == example["S3_SECRET_KEY"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")  # still the common env


def test_no_secret_on_any_command_line(resolved):
    """Command lines show in `ps` and `docker inspect`; secrets go through the environment only."""
    raw = yaml.safe_load(COMPOSE.read_text())
    secret_var = re.compile(r"\$\{?(\w*(SECRET|PASSWORD|PASSWD|TOKEN|KEY|FERNET|JWT)\w*)", re.IGNORECASE)
    secrets = [value for name, value in _env_example().items()
               if re.search("SECRET|PASSWORD|KEY", name) and value and name != "TENSORFLOW_PACKAGE"]
    assert len(secrets) >= 4, secrets
    for name in raw["services"]:
        for field in ("command", "entrypoint"):
            for spec, where in ((raw["services"][name].get(field), "file"),
                                (resolved["services"][name].get(field), "resolved")):
                text = "" if spec is None else spec if isinstance(spec, str) else " ".join(map(str, spec))
                assert not secret_var.search(text), (name, field, where, secret_var.search(text).group(0))
                for value in secrets:
                    assert value not in text, (name, field, where)


def test_api_server_is_published_on_loopback_unless_told_otherwise(resolved):
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert spec.startswith("127.0.0.1:"), (name, port)
    assert resolved["services"]["airflow-apiserver"]["ports"], "the api-server publishes the UI port"
    # The operator's switch: AIRFLOW_API_BIND (e.g. 0.0.0.0 behind a TLS proxy and a firewall).
    opened = _config(extra_env={"AIRFLOW_API_BIND": "0.0.0.0"})
    port = opened["services"]["airflow-apiserver"]["ports"][0]
    assert (port if isinstance(port, str) else port.get("host_ip", "")).startswith("0.0.0.0"), port


def test_ensure_bucket_cli_creates_the_bucket_from_environment_keys(seaweed):
    """The init step's `python -m ml ensure-bucket`: keys from the environment, idempotent, URI printed."""
    from ml.registry.store import ObjectStore

    bucket = f"init-{uuid.uuid4().hex[:10]}"
    env = {**_clean_env(), "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
           "ML_S3_ENDPOINT_URL": seaweed.endpoint_url, "ML_S3_BUCKET": bucket}
    for _ in range(2):  # a restarted init container runs it again
        out = subprocess.run([sys.executable, "-m", "ml", "ensure-bucket"], capture_output=True, text=True, env=env,
                             cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == f"s3://{bucket}/"
    store = ObjectStore(bucket, endpoint_url=seaweed.endpoint_url, access_key=seaweed.access_key,
                        secret_key=seaweed.secret_key)
    store.put_bytes("probe", b"ok")
    assert store.get_bytes("probe") == b"ok"


def test_ensure_bucket_cli_fails_clearly_with_bad_keys(seaweed):
    wrong = "not-the-secret-" + uuid.uuid4().hex
    env = {**_clean_env(), "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": wrong,
           "ML_S3_ENDPOINT_URL": seaweed.endpoint_url, "ML_S3_BUCKET": "init-refused"}
    out = subprocess.run([sys.executable, "-m", "ml", "ensure-bucket"], capture_output=True, text=True, env=env,
                         cwd=REPO)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "error: cannot create or reach bucket 'init-refused'" in out.stderr
    assert "Traceback" not in out.stderr and wrong not in out.stderr + out.stdout


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ML_"))} | {
        "PYTHONPATH": str(REPO), "AWS_EC2_METADATA_DISABLED": "true"}


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (REPO / "docker" / ".env.example").read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


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


def test_workers_share_no_data_volume(resolved):
    """Workers may run on different hosts: datasets and caches are never on a shared volume."""
    for name, service in resolved["services"].items():
        if not name.startswith("airflow-"):
            continue
        for volume in service.get("volumes", []):
            target = volume["target"] if isinstance(volume, dict) else volume.split(":")[1]
            assert target == "/opt/airflow/logs", (name, volume)  # logs only (remote logging on many hosts)
