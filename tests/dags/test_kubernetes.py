"""The Kubernetes route for the `training` queue, validated offline.

The pod template goes through the same code KubernetesExecutor runs (the cncf.kubernetes provider's
PodGenerator and the kubernetes client models), the DAG is parsed with two executors configured,
and the Helm values are checked for what this project relies on. No cluster, no chart rendering.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.airflow_env import REPO

TEMPLATE = REPO / "docker" / "k8s" / "training-pod-template.yaml"
VALUES = REPO / "docker" / "helm" / "values.yaml"

pytest.importorskip("airflow.providers.cncf.kubernetes", reason="apache-airflow-providers-cncf-kubernetes")


def _pod():
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    return PodGenerator.deserialize_model_file(str(TEMPLATE))


def test_the_pod_template_round_trips_through_the_kubernetes_models():
    from kubernetes.client import ApiClient

    pod = _pod()
    raw = yaml.safe_load(TEMPLATE.read_text())

    assert ApiClient().sanitize_for_serialization(pod)["spec"]["containers"][0]["name"] == "base"
    # Nothing of the file was dropped on the way in (an unknown or misspelt field would be).
    assert ApiClient().sanitize_for_serialization(pod) == json.loads(json.dumps(raw))


def test_each_training_pod_gets_one_gpu_and_shares_no_disk():
    pod = _pod()
    base = next(c for c in pod.spec.containers if c.name == "base")

    assert base.resources.limits["nvidia.com/gpu"] == "1" and base.resources.requests["nvidia.com/gpu"] == "1"
    assert any(t.key == "nvidia.com/gpu" for t in pod.spec.tolerations)
    volumes = {v.name: v for v in pod.spec.volumes}
    assert all(v.persistent_volume_claim is None and v.host_path is None and v.nfs is None for v in volumes.values())
    work_mount = next(m for m in base.volume_mounts if m.mount_path == "/opt/ml-work")
    assert volumes[work_mount.name].empty_dir is not None
    env = {e.name: e for e in base.env}
    assert env["ML_WORK_DIR"].value == "/opt/ml-work"
    # Credentials only from a secret: no literal value in the template.
    assert env["AIRFLOW_CONN_ML_OBJECT_STORE"].value is None
    assert env["AIRFLOW_CONN_ML_OBJECT_STORE"].value_from.secret_key_ref.name == "ml-object-store"


def test_the_executor_reconciles_the_template_with_its_task_pod():
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
    from kubernetes.client import models as k8s

    task_pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="task", labels={"dag_id": "image_classifier_retraining"}),
                         spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", args=["airflow", "tasks"])]))

    merged = PodGenerator.reconcile_pods(_pod(), task_pod)

    base = merged.spec.containers[0]
    assert base.args == ["airflow", "tasks"] and base.resources.limits["nvidia.com/gpu"] == "1"
    assert merged.metadata.labels["dag_id"] == "image_classifier_retraining"
    assert merged.metadata.labels["app.kubernetes.io/component"] == "training"


PARSE = """
import json
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder={dags!r}).dags["image_classifier_retraining"]
print(json.dumps({{t.task_id: [t.executor, t.executor_config] for t in dag.tasks}}))
"""


def test_training_tasks_name_the_kubernetes_executor_when_the_deployment_says_so(tmp_path):
    from tests import airflow_env

    airflow_env.migrate()
    env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor,KubernetesExecutor",
           "ML_TRAINING_EXECUTOR": "KubernetesExecutor", "ML_TRAINING_POD_TEMPLATE": str(TEMPLATE),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "dags")])}
    done = subprocess.run([sys.executable, "-c", PARSE.format(dags=str(REPO / "dags"))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = json.loads(done.stdout.strip().splitlines()[-1])

    training = ("training.train", "training.finetune", "search.rung_1", "search.rung_2", "search.rung_3")
    for tid in training:
        assert tasks[tid] == ["KubernetesExecutor", {"pod_template_file": str(TEMPLATE)}], tid
    assert all(executor is None for tid, (executor, _) in tasks.items() if tid not in training)


def test_helm_values_run_two_executors_with_no_shared_disk_and_secrets_only_from_secrets():
    values = yaml.safe_load(VALUES.read_text())
    env = {e["name"]: e["value"] for e in values["env"]}

    assert values["executor"].split(",") == ["CeleryExecutor", "KubernetesExecutor"]
    assert env["ML_TRAINING_EXECUTOR"] == "KubernetesExecutor"
    assert env["ML_TRAINING_POD_TEMPLATE"] == "/opt/airflow/pod_templates/" + TEMPLATE.name
    assert values["workers"]["persistence"]["enabled"] is False
    assert all(v.get("emptyDir") is not None for v in values["workers"]["extraVolumes"])
    assert {s["envName"] for s in values["secret"]} >= {"AIRFLOW_CONN_ML_OBJECT_STORE"}
    text = VALUES.read_text().lower()
    assert "password:" not in text and "aws_secret_access_key" not in text
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "docker/k8s /opt/airflow/pod_templates" in dockerfile  # the image ships the template
