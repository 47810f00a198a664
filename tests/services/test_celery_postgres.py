"""The production configuration on this machine's PostgreSQL and Redis.

`docker/docker-compose.yaml` run as local processes: CeleryExecutor, a PostgreSQL metadata
database, a Redis broker, the api-server, scheduler, dag-processor and triggerer, the
`airflow-worker` service and the `airflow-worker-training` service scaled to two replicas, all
with the compose file's commands and environment keys. The retraining DAG runs end to end on a
tiny generated dataset; then the scheduler is restarted with LocalExecutor against the same
database and the same conf runs again (another bucket, another work dir), so the promoted
models and the wall times of the two executors can be compared.

    .venv/bin/pytest -m services tests/services -q        # the numbers are printed either way

Needs, beyond requirements.txt: asyncpg (Airflow 3's async engine on PostgreSQL) and
celery<5.7 (apache-airflow-providers-celery 3.26 imports a helper celery 5.7 removed). What the
test sets beyond the compose file is listed, with reasons, in HOST_ONLY_ENV and DETERMINISM_ENV.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ml.registry import layout
from tests.services.airflow_cluster import (
    AIRFLOW,
    REPO,
    VENV_BIN,
    AirflowCluster,
    all_healthy,
    compose_services,
    free_port,
    health,
    http_json,
    service_command,
    substitute,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

DAG_ID = "image_classifier_retraining"
MODEL = "image-classifier"
# 48 px, 15 epochs: at 32 px / 3 epochs neither net beats chance by the gate's floor
# (min_gain_over_chance 0.10; measured 0.348 vs 0.333), so nothing would be promoted.
SAMPLE = {"classes": 3, "per_class": 60, "size": 48, "seed": 5}
CONF = {"candidates": ["scratch_tiny", "scratch_small"], "epochs": 15, "image_size": 48, "finetune_top_k": 0,
        "force": True}
TRAINING_REPLICAS = 2  # `docker compose up --scale airflow-worker-training=2`
COMPOSE_VARIABLES = {"TRAINING_POOL_SLOTS": "2", "TRAINING_CONCURRENCY": "1"}
RUN_TIMEOUT_S = 300
STARTUP_TIMEOUT_S = 180
# What compose leaves to the image or to separate hosts, and a single host has to set (and why).
HOST_ONLY_ENV = {
    "AIRFLOW_HOME": "the image's /opt/airflow",
    "AIRFLOW__CORE__DAGS_FOLDER": "the image copies dags/ to /opt/airflow/dags",
    "AIRFLOW__CORE__PLUGINS_FOLDER": "the image copies plugins/ to /opt/airflow/plugins",
    "PYTHONPATH": "the image's ENV PYTHONPATH=/opt/ml",
    "ML_CONFIG": "the image's ENV ML_CONFIG",
    "TF_CPP_MIN_LOG_LEVEL": "the image's ENV",
    "AIRFLOW__API__HOST": "containers listen on 0.0.0.0; here loopback only",
    "AIRFLOW__API__PORT": "8080 in the container; a free port here",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": "8793 in every container; one free port per process here",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": "8794 in the container; a free port here",
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": "compose owns its Redis; here a shared one",
    "ML_RETRAIN_SCHEDULE": "no scheduled run may start during the test",
    "AWS_EC2_METADATA_DISABLED": "offline: never ask a metadata service for credentials",
}
# Nothing beyond the compose file: augmentation runs in a sequential tf.data map
# (ml/training/input_pipeline.py), so the same seed gives the same model in any process. Before
# that fix, test probabilities differed by up to 0.04 between two runs of one executor.
DETERMINISM_ENV: dict[str, str] = {}


@dataclass
class TaskRecord:
    task_id: str
    map_index: int
    state: str
    start: datetime | None
    end: datetime | None
    hostname: str | None
    queue: str | None
    service: str | None = None  # which of our processes ran it (by session id), when observed

    @property
    def label(self) -> str:
        return self.task_id + (f"[{self.map_index}]" if self.map_index >= 0 else "")

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds() if self.start and self.end else 0.0


@dataclass
class RunRecord:
    executor: str
    run_id: str
    state: str
    start: datetime
    end: datetime
    client_seconds: float  # trigger request -> final state seen
    tasks: list[TaskRecord] = field(default_factory=list)
    xcom: dict[str, str] = field(default_factory=dict)  # "task_id[map_index]" -> the value as JSON text

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def ran(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.start and t.end]

    def busy_seconds(self) -> float:
        """Length of the union of task intervals: time at least one task was running."""
        spans = sorted((t.start, t.end) for t in self.ran())
        total, cur_start, cur_end = 0.0, None, None
        for s, e in spans:
            if cur_end is None or s > cur_end:
                if cur_end is not None:
                    total += (cur_end - cur_start).total_seconds()
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        if cur_end is not None:
            total += (cur_end - cur_start).total_seconds()
        return total

    def timing(self) -> dict[str, float]:
        """run: dag_run start -> end; overhead: run - sum of task durations (the issue's definition;
        negative when tasks overlap); idle: run time with no task running (scheduling + queueing)."""
        task_sum = sum(t.seconds for t in self.ran())
        return {"run_s": round(self.seconds, 1), "client_s": round(self.client_seconds, 1),
                "task_sum_s": round(task_sum, 1), "overhead_s": round(self.seconds - task_sum, 1),
                "busy_s": round(self.busy_seconds(), 1), "idle_s": round(self.seconds - self.busy_seconds(), 1)}

    def by_task(self, task_id: str) -> list[TaskRecord]:
        return sorted((t for t in self.tasks if t.task_id == task_id), key=lambda t: t.map_index)


# --------------------------------------------------------------------------- the cluster


def _compose_environment(db, redis, seaweed, *, bucket: str, work_dir: Path, api_port: int) -> dict[str, str]:
    """The compose file's x-airflow-common environment, with this host's values."""
    from cryptography.fernet import Fernet

    conn = {"conn_type": "aws", "login": seaweed.access_key, "password": seaweed.secret_key,
            "extra": {"endpoint_url": seaweed.endpoint_url, "region_name": "us-east-1"}}
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db.url("postgresql+psycopg2"),
        "AIRFLOW__CELERY__RESULT_BACKEND": db.url("db+postgresql+psycopg2"),
        "AIRFLOW__CELERY__BROKER_URL": redis.url,
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW_CONN_ML_OBJECT_STORE": json.dumps(conn),
        "ML_S3_ENDPOINT_URL": seaweed.endpoint_url,
        "ML_S3_BUCKET": bucket,
        "ML_WORK_DIR": str(work_dir),
    }


def _environment(compose_env: dict[str, str], redis, *, home: Path, api_port: int) -> dict[str, str]:
    """`compose_env` plus HOST_ONLY_ENV and DETERMINISM_ENV over a scrubbed copy of this process's environment."""
    import os

    host_only = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "PYTHONPATH": str(REPO),
        "ML_CONFIG": str(REPO / "config" / "pipeline.yaml"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": redis.prefix,
        "ML_RETRAIN_SCHEDULE": "none",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    assert set(host_only) == set(HOST_ONLY_ENV)
    # Nothing of the caller's Airflow, pipeline or AWS settings leaks in (pytest may have set an
    # SQLite AIRFLOW_HOME for other tests); the keys travel in the connection only.
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "_AIRFLOW", "ML_", "AWS_", "TF_", "KAGGLE_"))}
    base["PATH"] = f"{VENV_BIN}:{base.get('PATH', '/usr/bin:/bin')}"
    return {**base, **compose_env, **host_only, **DETERMINISM_ENV}


def _wait_workers_ready(cluster: AirflowCluster, names: list[str]) -> None:
    cluster.wait_for("celery workers ready", lambda: all(cluster.log_contains(n, " ready.") for n in names),
                     STARTUP_TIMEOUT_S, watch=names)


def _start_celery_services(cluster: AirflowCluster, services: dict, work_root: Path) -> list[str]:
    """Every long-running compose service: api-server, scheduler, dag-processor, triggerer, workers.

    Each gets its own ML_WORK_DIR, as separate hosts or containers would: they share nothing but
    the object store and the metadata DB.
    """
    for name, compose_name in (("api-server", "airflow-apiserver"), ("scheduler", "airflow-scheduler"),
                               ("dag-processor", "airflow-dag-processor"), ("triggerer", "airflow-triggerer")):
        cluster.start(name, service_command(services[compose_name], COMPOSE_VARIABLES),
                      env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                           "ML_WORK_DIR": str(work_root / name)})
    workers = []
    for compose_name, replicas in (("airflow-worker", 1), ("airflow-worker-training", TRAINING_REPLICAS)):
        for i in range(1, replicas + 1):
            name = f"{compose_name}-{i}"
            # One host: celery node names must differ (containers differ by hostname).
            argv = [*service_command(services[compose_name], COMPOSE_VARIABLES), "--celery-hostname", f"{name}@%h"]
            cluster.start(name, argv, env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                                           "ML_WORK_DIR": str(work_root / name)})
            workers.append(name)
    return workers


def _check_celery_provider_compatible() -> None:
    """Fail early and clearly: provider 3.26 imports a helper that celery 5.7 removed."""
    from importlib.metadata import version

    try:
        from celery.backends.database import retry  # noqa: F401 - what the provider imports
    except ImportError:
        pytest.fail(f"apache-airflow-providers-celery {version('apache-airflow-providers-celery')} cannot load "
                    f"with celery {version('celery')} (celery.backends.database.retry is gone): the "
                    "CeleryExecutor and `airflow celery worker` fail to start; pin celery<5.7 in constraints.txt")


def _token(base_url: str, home: Path) -> str:
    passwords = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
    return http_json("POST", f"{base_url}/auth/token", {"username": "admin", "password": passwords["admin"]})[
        "access_token"]


def _run_dag(cluster: AirflowCluster, db, base_url: str, token: str, executor: str, source: Path) -> RunRecord:
    """Trigger the DAG with CONF, follow it in the metadata DB, return its task records."""
    run_id = f"services_{executor.lower()}_{uuid.uuid4().hex[:8]}"
    placements: dict[tuple[str, int], str] = {}
    started = time.monotonic()
    http_json("POST", f"{base_url}/api/v2/dags/{DAG_ID}/dagRuns", {"dag_run_id": run_id, "logical_date": None,
                                                                    "conf": {**CONF, "source": str(source)}},
              token=token)

    def probe() -> str | None:
        for task_id, map_index, pid in db.query(
                "SELECT task_id, map_index, pid FROM task_instance WHERE dag_id=%s AND run_id=%s "
                "AND state='running' AND pid IS NOT NULL", (DAG_ID, run_id)):
            where = cluster.session_of(pid)
            if where:
                placements.setdefault((task_id, map_index), where)
        rows = db.query("SELECT state FROM dag_run WHERE dag_id=%s AND run_id=%s", (DAG_ID, run_id))
        return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

    state = cluster.wait_for(f"{executor} run {run_id}", probe, RUN_TIMEOUT_S, interval=1.0,
                             watch=[n for n in cluster.services])
    client_seconds = time.monotonic() - started
    (start, end), = db.query("SELECT start_date, end_date FROM dag_run WHERE dag_id=%s AND run_id=%s",
                             (DAG_ID, run_id))
    rows = db.query("SELECT task_id, map_index, state, start_date, end_date, hostname, queue FROM task_instance "
                    "WHERE dag_id=%s AND run_id=%s", (DAG_ID, run_id))
    tasks = [TaskRecord(*row, service=placements.get((row[0], row[1]))) for row in rows]
    xcom = {f"{task_id}[{map_index}]": json.dumps(value, default=str) for task_id, map_index, value in db.query(
        "SELECT task_id, map_index, value FROM xcom WHERE dag_id=%s AND run_id=%s", (DAG_ID, run_id))}
    return RunRecord(executor, run_id, state, start, end, client_seconds, tasks, xcom)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from ml.data.sample import make_sample_dataset

    dest = tmp_path_factory.mktemp("services-sample") / "dog-breeds"
    make_sample_dataset(dest, **SAMPLE)
    return dest


@pytest.fixture(scope="module")
def runs(scratch_redis, scratch_postgres, seaweed, sample, tmp_path_factory) -> dict[str, Any]:
    """One DAG run on CeleryExecutor, then the same conf on LocalExecutor (same DB, another bucket)."""
    import importlib.util

    from ml.registry.store import ObjectStore

    if importlib.util.find_spec("asyncpg") is None:
        # Airflow 3 opens an async engine too: postgresql+psycopg2 -> postgresql+asyncpg.
        pytest.skip("Airflow on PostgreSQL needs asyncpg (its async metadata engine): pip install asyncpg")
    _check_celery_provider_compatible()

    root = tmp_path_factory.mktemp("services-airflow")
    home, logs = root / "airflow", root / "logs"
    home.mkdir()
    buckets = {"celery": f"svc-celery-{uuid.uuid4().hex[:8]}", "local": f"svc-local-{uuid.uuid4().hex[:8]}"}
    work = {name: root / f"work-{name}" for name in buckets}
    stores = {name: ObjectStore(b, endpoint_url=seaweed.endpoint_url, access_key=seaweed.access_key,
                                secret_key=seaweed.secret_key) for name, b in buckets.items()}
    api_port = free_port()
    base_url = f"http://127.0.0.1:{api_port}"
    compose_env = _compose_environment(scratch_postgres, scratch_redis, seaweed, bucket=buckets["celery"],
                                       work_dir=work["celery"], api_port=api_port)
    env = _environment(compose_env, scratch_redis, home=home, api_port=api_port)
    services = compose_services()
    cluster = AirflowCluster(env, logs)
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        # airflow-init, verbatim: migrate, the training pool, the bucket.
        variables = {**COMPOSE_VARIABLES, "S3_ACCESS_KEY": seaweed.access_key, "S3_SECRET_KEY": seaweed.secret_key}
        init = service_command(services["airflow-init"], variables)
        # The keys reach ensure-bucket through the service's environment, as in compose.
        init_env = {k: substitute(str(v), variables) for k, v in services["airflow-init"]["environment"].items()
                    if k.startswith("AWS_")}
        cluster.run(init, name="airflow-init", timeout=240, env=init_env)
        stores["local"].ensure_bucket()
        timings["init_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        workers = _start_celery_services(cluster, services, work["celery"])
        components = ("metadatabase", "scheduler", "dag_processor", "triggerer")
        cluster.wait_for("api-server health", lambda: all_healthy(health(base_url), components), STARTUP_TIMEOUT_S,
                         interval=2.0)
        cluster.wait_for(f"DAG {DAG_ID} serialized", lambda: scratch_postgres.query(
            "SELECT 1 FROM serialized_dag WHERE dag_id=%s", (DAG_ID,)), STARTUP_TIMEOUT_S, interval=2.0)
        _wait_workers_ready(cluster, workers)
        timings["startup_s"] = time.monotonic() - t0

        token = _token(base_url, home)
        http_json("PATCH", f"{base_url}/api/v2/dags/{DAG_ID}", {"is_paused": False}, token=token)
        celery = _run_dag(cluster, scratch_postgres, base_url, token, "CeleryExecutor", sample)
        broker_keys = scratch_redis.keys()

        # The same conf on LocalExecutor: workers and Celery scheduler stopped, a LocalExecutor
        # scheduler on the same metadata DB; its tasks (its children) use another bucket and work dir.
        for name in [*workers, "scheduler"]:
            cluster.stop(name)
        cluster.start("scheduler-local", [str(AIRFLOW), "scheduler"], env={
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "ML_S3_BUCKET": buckets["local"],
            "ML_WORK_DIR": str(work["local"]), "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        local = _run_dag(cluster, scratch_postgres, base_url, token, "LocalExecutor", sample)
    finally:
        # Before the assertions: an idle dag-processor still re-parses the DAG every 30 s.
        cluster.stop_all()
    yield {"celery": celery, "local": local, "stores": stores, "work": work, "timings": timings, "cluster": cluster,
           "workers": workers, "services": services, "env": env, "compose_env": compose_env,
           "broker_keys": broker_keys, "redis_prefix": scratch_redis.prefix}


# --------------------------------------------------------------------------- assertions


def _pointer(store) -> dict[str, Any]:
    found = store.get_with_etag(f"{MODEL}/production.json")
    assert found is not None, f"no production.json in {store.uri(MODEL + '/')}"
    return json.loads(found[0])


def _safe(run_id: str) -> str:
    from ml.registry.layout import run_segment

    return run_segment(run_id)


def test_celery_run_succeeds_and_promotes_a_complete_version(runs):
    celery, store = runs["celery"], runs["stores"]["celery"]

    assert celery.state == "success", {t.label: t.state for t in celery.tasks}
    assert {t.label: t.state for t in celery.by_task("training.train")} == {
        "training.train[0]": "success", "training.train[1]": "success"}
    pointer = _pointer(store)
    assert store.exists(f"{MODEL}/versions/{pointer['version']}/COMPLETE")
    assert pointer["run_id"] == celery.run_id
    assert pointer["candidate"] in CONF["candidates"]


def test_trainings_overlap_on_two_training_workers(runs):
    """Two trainings ran at the same time, each in its own worker (each worker has concurrency 1)."""
    celery, workers = runs["celery"], runs["workers"]
    a, b = celery.by_task("training.train")

    assert a.start < b.end and b.start < a.end, f"no overlap: {a.start}-{a.end} vs {b.start}-{b.end}"
    assert {a.queue, b.queue} == {"training"}
    training_workers = {w for w in workers if w.startswith("airflow-worker-training-")}
    assert a.service in training_workers and b.service in training_workers, (a.service, b.service)
    assert a.service != b.service
    # Everything else goes to the default queue, which only `airflow-worker` serves.
    others = {t.label: t.service for t in celery.ran() if t.task_id not in ("training.train", "training.finetune")}
    observed = {label: s for label, s in others.items() if s is not None}
    assert observed and set(observed.values()) == {"airflow-worker-1"}, observed


def test_broker_keys_stay_under_our_prefix(runs):
    assert runs["broker_keys"], "the broker wrote nothing to its Redis database"
    foreign = [k for k in runs["broker_keys"] if not k.startswith(runs["redis_prefix"])]
    assert not foreign, foreign


def test_promoted_model_matches_local_executor(runs, capsys):
    """Same seed, same data, another executor: same dataset, split, winner and test predictions."""
    import numpy as np
    import pandas as pd

    celery, local = runs["celery"], runs["local"]
    stores, work = runs["stores"], runs["work"]
    assert local.state == "success", {t.label: t.state for t in local.tasks}
    p_celery, p_local = _pointer(stores["celery"]), _pointer(stores["local"])

    assert p_celery["dataset_hash"] == p_local["dataset_hash"]
    assert p_celery["candidate"] == p_local["candidate"]
    assert p_celery["labels"] == p_local["labels"]
    # Each executor's own snapshot in its own bucket (Celery's workers kept no shared copy).
    manifests = [pd.read_parquet(_download(stores[n], layout.dataset_key(MODEL, p_celery["dataset_hash"],
                                                                         "manifest.parquet"), work[n] / "compare"))
                 .sort_values("sha256")[["sha256", "label", "split"]].reset_index(drop=True)
                 for n in ("celery", "local")]
    pd.testing.assert_frame_equal(*manifests)
    diffs: dict[str, float] = {}
    for candidate in CONF["candidates"]:
        preds = [np.load(_download(stores[n], f"{MODEL}/runs/{_safe(r.run_id)}/{candidate}/predictions.npz",
                                   work[n] / "compare"))
                 for n, r in (("celery", celery), ("local", local))]
        np.testing.assert_array_equal(preds[0]["y_true"], preds[1]["y_true"])
        diffs[candidate] = float(np.abs(preds[0]["probs"] - preds[1]["probs"]).max())
    with capsys.disabled():
        print(f"\n[services] promoted {p_celery['candidate']} (Celery) / {p_local['candidate']} (Local); test "
              f"accuracy {p_celery['metrics']['accuracy']:.4f} / {p_local['metrics']['accuracy']:.4f}; max |p_celery - "
              f"p_local| on the test split: " + ", ".join(f"{c} {d:.2e}" for c, d in diffs.items()))
    # Training is bit-for-bit reproducible across processes and executors on CPU: measured max
    # |diff| 0.0. With augmentation in a parallel map it was 0.038 here (every probability
    # differed), 0.037 between two CLI processes (one test argmax in 22 flipped).
    assert diffs == {c: 0.0 for c in CONF["candidates"]}, diffs
    scores = ("accuracy", "top5_accuracy", "log_loss", "macro_f1", "ece", "n")  # not latency: a timing
    assert {k: p_celery["metrics"][k] for k in scores} == {k: p_local["metrics"][k] for k in scores}


def test_compose_file_describes_what_ran(runs):
    """What ran is docker-compose.yaml: its services, their commands, its environment keys and values."""
    services, env, cluster = runs["services"], runs["env"], runs["cluster"]
    compose_env = services["airflow-scheduler"]["environment"]
    problems = []

    for key, value in compose_env.items():
        ours = env.get(key)
        if ours is None:
            problems.append(f"{key}: set by compose, not by the test")
        elif value.lstrip().startswith("{"):
            if _shape(json.loads(ours)) != _shape(json.loads(value.replace("${", "X{"))):
                problems.append(f"{key}: JSON fields differ")
        elif "://" in value:
            if urlsplit(ours).scheme != urlsplit(value).scheme:
                problems.append(f"{key}: compose uses {urlsplit(value).scheme}://, the test ran "
                                f"{urlsplit(ours).scheme}://")
        elif value.startswith("/"):
            if not Path(ours).is_absolute():  # a volume in compose, a temporary folder here
                problems.append(f"{key}: compose {value!r}, the test {ours!r}")
        elif "${" not in value and ours != value:
            problems.append(f"{key}: compose {value!r}, the test {ours!r}")
    problems += [f"{k}: set by the test only" for k in sorted(set(runs["compose_env"]) - set(compose_env))]
    # airflow-init adds the store keys for ensure-bucket (checked in tests/dags/test_deployment.py).
    shared = {n: {k: v for k, v in (s.get("environment") or {}).items()
                  if not (n == "airflow-init" and k.startswith("AWS_"))}
              for n, s in services.items() if n.startswith("airflow-")}
    if any(env != compose_env for env in shared.values()):
        problems.append("the airflow services no longer share one environment: the test must follow")
    for name, argv in cluster.started.items():
        compose_name = {"api-server": "airflow-apiserver", "scheduler": "airflow-scheduler",
                        "dag-processor": "airflow-dag-processor", "triggerer": "airflow-triggerer",
                        "scheduler-local": "airflow-scheduler"}.get(name, name.rsplit("-", 1)[0])
        expected = service_command(services[compose_name], COMPOSE_VARIABLES)
        if argv[:len(expected)] != expected or argv[len(expected):] not in ([], ["--celery-hostname", f"{name}@%h"]):
            problems.append(f"{name} ran {argv[1:]}, compose says {expected[1:]}")

    assert set(cluster.started) >= {"api-server", "scheduler", "dag-processor", "triggerer", "airflow-worker-1",
                                    "airflow-worker-training-1", "airflow-worker-training-2"}
    assert not problems, "docker/docker-compose.yaml does not describe what ran:\n" + "\n".join(problems)


def test_report_timings(runs, capsys):
    """Wall time of the same run under both executors, and how much of it no task was running."""
    celery, local = runs["celery"], runs["local"]
    rows = {"CeleryExecutor": celery.timing(), "LocalExecutor": local.timing()}

    with capsys.disabled():
        print(f"\n[services] airflow-init {runs['timings']['init_s']:.1f} s, services ready in "
              f"{runs['timings']['startup_s']:.1f} s")
        for name, t in rows.items():
            print(f"[services] {name:15} run {t['run_s']:6.1f} s (trigger->seen {t['client_s']:.1f}), sum of tasks "
                  f"{t['task_sum_s']:6.1f} s, run - sum {t['overhead_s']:6.1f} s, some task running "
                  f"{t['busy_s']:6.1f} s, none running {t['idle_s']:5.1f} s")
        for record in (celery, local):
            print(f"[services] {record.executor} tasks: " + ", ".join(
                f"{t.label.split('.')[-1]} {t.seconds:.1f}s@{t.service or '?'}" for t in
                sorted(record.ran(), key=lambda t: t.start)))
    for t in rows.values():
        assert 0 < t["busy_s"] <= t["run_s"] and t["task_sum_s"] >= t["busy_s"] - 0.01


def _shape(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    return type(obj).__name__


def _download(store, key: str, dest_dir: Path) -> Path:
    dest = dest_dir / key.replace("/", "__")
    store.download_file(key, dest)
    return dest


def test_workers_share_nothing_but_the_store(runs):
    """Each worker has its own ML_WORK_DIR: every one that trained materialised the dataset itself,
    and no XCom value points at a worker's disk (hashes, URIs and small dicts only)."""
    celery, work_root = runs["celery"], runs["work"]["celery"]
    assert celery.state == "success"
    digest = json.loads(celery.xcom["data.ingest[-1]"])["dataset_hash"]
    trainers = {t.service for t in celery.ran() if t.task_id in ("training.train", "training.finetune")} - {None}

    assert len(trainers) >= 2, trainers
    for service in trainers:
        assert (work_root / service / "datasets" / digest / "dataset.json").is_file(), service
    assert celery.xcom and all(str(work_root) not in value for value in celery.xcom.values()), celery.xcom
    assert all("dataset_dir" not in value for value in celery.xcom.values())
