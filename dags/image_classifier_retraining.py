"""
### Image classifier retraining

Retrains image classifiers on a labelled image dataset and publishes the best one to
S3-compatible object storage, only when it beats the model in production.

**ingest** (Kaggle, `s3://`, `.zip` or folder → content-addressed dataset + manifest) →
**validate** (Great Expectations suite; stops the run on failing expectations) →
**should_train** (skips when production was trained on this exact data, unless `force`) →
**prepare** (decoded-image cache shared by the trainers) →
**train** (one mapped task per candidate, in the `training` pool) →
**finetune** (top-k transfer candidates, backbone unfrozen from its boundary layer) →
**search** (when `search.enabled`: successive halving over trials `<base>__t<NN>`; `rung_<r>` is mapped over
the trials still in, `survivors_<r>` keeps the top 1/η; survivors resume from their checkpoints; off, every
task maps over zero trials and is skipped) →
**evaluate** (builds each `ensemble_top<k>` candidate from the k best on validation, then scores every
candidate and the production model on the same test split) →
**gate** (min_delta, floors, per-class non-regression) →
**approve** (optional, `gate.require_approval` / the `require_approval` param: an Airflow user approves or
rejects the promotion under Browse → Required Actions; asked only when the gate says promote) →
**promote** (immutable version, conditional pointer swap; emits the production Asset).

All ML logic lives in the `ml` package (`ml/pipeline.py`); every task here calls one
function. Credentials come from the connections `ml_object_store` (AWS type: login = access
key, password = secret, extra `{"endpoint_url": ...}`) and `kaggle_default` (login =
username, password = key), or from the environment when those are not defined.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import (
    Asset,
    DeadlineAlert,
    DeadlineReference,
    Param,
    SyncCallback,
    TaskGroup,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy, RetryAction, RetryRule

from ml.config import (
    IMAGE_SIZE_RANGE,
    MAX_RUN_MINUTES_ENV,
    PRODUCTION_ASSET_NAME,
    PRODUCTION_ASSET_URI,
    SEARCH_RUNGS_RANGE,
    GateConfig,
    max_run_minutes,
)
from ml.models.registry import candidate_choices, candidate_names
from ml.registry.approval import COMMENT_PARAM, MAX_COMMENT_CHARS, OPTIONS, REJECT

PRODUCTION_MODEL = Asset(name=PRODUCTION_ASSET_NAME, uri=PRODUCTION_ASSET_URI)
# Cron or preset (default weekly); "none": triggers only; "asset:<uri>": data-aware. From the
# environment, not the YAML file: the scheduler parses this file every few seconds (no I/O).
_SPEC = os.environ.get("ML_RETRAIN_SCHEDULE", "@weekly").strip()
SCHEDULE = None if _SPEC.lower() in ("", "none") else (
    [Asset(_SPEC.removeprefix("asset:"))] if _SPEC.startswith("asset:") else _SPEC)
# A run still going this long after its logical date (scheduled runs: when due; the UI's trigger form: now) is
# recorded like a failed task; "none": no alert. Not from queued_at: Airflow 3.3 cannot clear such runs (ml.config).
MAX_RUN_MINUTES = max_run_minutes(os.environ.get(MAX_RUN_MINUTES_ENV))
DEADLINE = None if MAX_RUN_MINUTES is None else DeadlineAlert(
    reference=DeadlineReference.DAGRUN_LOGICAL_DATE, interval=timedelta(minutes=MAX_RUN_MINUTES), name="max_run_time",
    # By path: dags/_shared is importable where callbacks run (the bundle is on sys.path), not at parse time.
    callback=SyncCallback("_shared.alerts.record_late_run", kwargs={"max_run_minutes": MAX_RUN_MINUTES}))
# Deterministic failures: retrying cannot help, so fail at once (I/O errors still retry).
NO_RETRY_ON_BAD_INPUT = ExceptionRetryPolicy(rules=[
    RetryRule(exception=f"ml.errors.{name}", action=RetryAction.FAIL, reason="bad input or config: a retry cannot help")
    for name in ("ConfigError", "DataError", "UnknownArchitectureError", "ModelVerificationError", "StorageAuthError")])
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "mlops", "retries": 2, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10), "retry_policy": NO_RETRY_ON_BAD_INPUT,
    "execution_timeout": timedelta(hours=1)}
# Training tasks: the `training` pool and queue; with several executors (Airflow 3) the one named by
# ML_TRAINING_EXECUTOR, e.g. KubernetesExecutor with the GPU pod template ML_TRAINING_POD_TEMPLATE.
_POD_TEMPLATE = os.environ.get("ML_TRAINING_POD_TEMPLATE")
TRAINING = dict(pool="training", queue="training", map_index_template="{{ candidate_label }}",
                execution_timeout=timedelta(hours=6), executor=os.environ.get("ML_TRAINING_EXECUTOR") or None,
                executor_config={"pod_template_file": _POD_TEMPLATE} if _POD_TEMPLATE else {})


def _param(kind: str, title: str, description: str, **schema: Any) -> Param:
    """An optional trigger-form field: empty (null) keeps the deployment's config file value."""
    return Param(None, type=["null", kind], title=title, description=description, **schema)


PARAMS = {
    "source": _param("string", "Dataset source", "kaggle:competitions/<slug>, kaggle:datasets/<owner>/<slug>, "
                     "s3://bucket/prefix, a .zip or a folder. Empty: data.source from the config file."),
    "candidates": _param("array", "Candidates", "Models to train in parallel, one task each. Empty: train.candidates.",
                         examples=candidate_names(), items={"type": "string", "enum": candidate_choices()}, minItems=1),
    "epochs": _param("integer", "Epochs", "Maximum epochs per candidate (early stopping may end sooner). "
                     "Empty: train.epochs.", minimum=1, maximum=200),
    "image_size": _param("integer", "Image size (px)", "Square input size for every candidate. "
                         "Empty: train.image_size.", minimum=IMAGE_SIZE_RANGE[0], maximum=IMAGE_SIZE_RANGE[1]),
    "weights": _param("string", "Backbone weights", "imagenet (Keras cache; pre-stage it on air-gapped workers), "
                      "none, a weights file path or an s3:// URI. Empty: train.weights."),
    "finetune_top_k": _param("integer", "Fine-tune top k", "How many of the best transfer candidates to fine-tune. "
                             "Empty: train.finetune_top_k.", minimum=0, maximum=10),
    "min_delta": _param("number", "Minimum improvement", "A challenger must beat production by this much on the "
                        "gate metric. Empty: gate.min_delta.", minimum=0, maximum=1),
    "search": _param("boolean", "Hyperparameter search", "Run the config file's search block (search.bases, "
                     "space, rungs): its trials become candidates. Empty: search.enabled."),
    "force": Param(False, type="boolean", title="Force",
                   description="Train even if production saw this exact dataset; promote if floors pass."),
    "allow_label_change": Param(False, type="boolean", title="Allow a different label set",
                                description="Needed to replace a production model whose classes differ."),
    "require_approval": _param("boolean", "Require human approval", "Ask an Airflow user to approve before "
                               "production moves (Required Actions); reject or no answer keeps production. "
                               "Empty: gate.require_approval."),
}
# The model registry's pages (plugins/model_registry_plugin.py URL_PREFIX): the approval request links there.
REGISTRY_PATH = "/model-registry"


def _config(params: dict | None = None):
    from ml.config import PipelineConfig, overrides_from_params

    params = get_current_context()["params"] if params is None else params
    return PipelineConfig.load(overrides=overrides_from_params(params))


def _store(config):
    from _shared.connections import object_store

    return object_store(config)


def _run_id() -> str:
    return get_current_context()["run_id"]


def _on_failure(context) -> None:
    """One concise line per failed task, recorded through the same store the tasks use."""
    from ml.registry.runs import record_failure

    ti, config = context["task_instance"], _config(context["params"])
    record_failure(config, _store(config), context["run_id"], ti.task_id,
                   getattr(ti, "rendered_map_index", None) or ti.map_index, context.get("exception"))


@task(retries=3)
def ingest() -> dict:
    """Fetch the source into a content-addressed dataset folder with manifest and splits."""
    from _shared.connections import kaggle_credentials

    from ml.pipeline import ingest_stage

    config = _config()
    return ingest_stage(config, _store(config), kaggle_credentials=kaggle_credentials())


@task  # retries are for the store; a failing suite is a DataError and fails at once
def validate(dataset: dict) -> dict:
    """Great Expectations suite over the manifest; failing expectations stop the run."""
    from ml.pipeline import validate_stage

    config = _config()
    return validate_stage(dataset, config, _store(config), _run_id())


@task.short_circuit
def should_train(dataset: dict, quality: dict) -> bool:
    """Skip training when production was trained on this exact dataset (unless force)."""
    from ml.pipeline import should_train as decide

    config = _config()
    verdict = decide(dataset, config, _store(config), _run_id())
    logging.getLogger(__name__).info("should_train: %s (%s)", verdict["train"], verdict["reason"])
    return verdict["train"]


@task
def prepare(dataset: dict) -> list[str]:
    """Build the decoded-image cache; return the candidates to train."""
    from ml.pipeline import prepare_stage

    config = _config()
    prepare_stage(dataset, config)
    return list(config.train.trained_candidates)


@task(**TRAINING)
def train(dataset: dict, candidate: str) -> dict:
    """Train one candidate; publish model, history and summary under runs/<run_id>/<candidate>/."""
    from ml.pipeline import train_stage

    get_current_context()["candidate_label"] = candidate
    config = _config()
    return train_stage(dataset, candidate, config, _store(config), _run_id())


@task
def pick_for_finetuning(results: list[dict]) -> list[str]:
    """The top-k transfer candidates by validation accuracy."""
    from ml.pipeline import select_for_finetuning

    # By index: iterating a mapped result probes one past the end and logs an error.
    return select_for_finetuning([results[i] for i in range(len(results))], _config())


@task(**TRAINING)
def finetune(dataset: dict, transfer_candidate: str) -> dict:
    """Unfreeze the backbone from its boundary layer and train on at a lower learning rate."""
    from ml.pipeline import finetune_stage

    get_current_context()["candidate_label"] = "finetune_" + transfer_candidate.removeprefix("transfer_")
    config = _config()
    return finetune_stage(dataset, transfer_candidate, config, _store(config), _run_id())


@task
def search_trials() -> list[str]:
    """The search's trial names, drawn from search.seed (none when the search is off)."""
    from ml.pipeline import search_plan_stage

    return search_plan_stage(_config())


@task(**TRAINING)
def search_rung(dataset: dict, trial: str, rung: int) -> dict:
    """Train one trial to this rung's epochs (resuming its previous rung) and publish it."""
    from ml.pipeline import search_trial_stage

    get_current_context()["candidate_label"] = trial
    config = _config()
    return search_trial_stage(dataset, trial, rung, config, _store(config), _run_id())


@task
def survivors(rung: int) -> list[str]:
    """The top 1/eta of the rung's published results ([] after the last rung)."""
    from ml.pipeline import search_survivors_stage

    config = _config()
    return search_survivors_stage(rung, config, _store(config), _run_id())


# Skipped upstreams are fine (a fine-tune mapped over zero candidates is "skipped"); a failed
# training is not: the run stops there, and clearing that task resumes it. Results are read from
# the store, so retried or cleared tasks are picked up as published.
@task(trigger_rule="none_failed_min_one_success")
def evaluate(dataset: dict) -> dict:
    """Build the ensemble_top<k> candidates, then score every candidate and production on the test split."""
    from ml.pipeline import evaluate_stage
    from ml.registry.runs import published_candidates

    config = _config()
    store = _store(config)
    results = published_candidates(config, store, _run_id())
    return evaluate_stage(dataset, results, config, store, _run_id())


@task(retries=1)
def gate(dataset: dict, evaluation: dict) -> dict:
    """Champion/challenger decision with reasons (numbers included)."""
    from ml.pipeline import gate_stage

    config = _config()
    return gate_stage(dataset, evaluation, config, _store(config), _run_id())


@task.short_circuit(ignore_downstream_trigger_rules=False)  # skips release.approve only; promote still runs
def needs_approval(dataset: dict, evaluation: dict, decision: dict, quality: dict) -> dict:
    """The approval request when a human must approve (approval on, gate says promote); {} skips approve."""
    from airflow.configuration import conf

    from ml.pipeline import approval_stage

    config = _config()
    registry_url = (conf.get("api", "base_url", fallback="") or "").rstrip("/") + REGISTRY_PATH
    return approval_stage(dataset, evaluation, decision, config, _store(config), _run_id(),
                          registry_url=registry_url, quality=quality)


class PromotionApproval(HITLOperator):
    """Approve / Reject a promotion, with subject, body, timeout and respondents from `needs_approval`.

    Those come from the run's config (gate.approval_timeout_hours, gate.approvers), which this file may
    not read at parse time, so they are set when the task runs. Not ApprovalOperator: its Reject skips
    `promote`, which must run to log that production was kept. Defaults to Reject, so a timeout resumes
    the task (no answerer) instead of failing it.
    """

    def __init__(self, *, request_task_id: str, **kwargs: Any) -> None:
        kwargs.pop("params", None)  # the DAG's trigger params, passed in by Airflow: not form fields of this request
        comment = Param(None, type=["null", "string"], title="Comment", maxLength=MAX_COMMENT_CHARS,
                        description="Why: goes into the promotion log.")
        super().__init__(subject="Promote the challenger to production?", options=list(OPTIONS), defaults=REJECT,
                         params={COMMENT_PARAM: comment},
                         response_timeout=timedelta(hours=GateConfig.approval_timeout_hours), **kwargs)
        self.request_task_id = request_task_id

    def execute(self, context: Any) -> Any:
        self.use_request(context["ti"].xcom_pull(task_ids=self.request_task_id))
        return super().execute(context)

    def use_request(self, request: dict) -> None:
        """Take the run's request: Markdown body, timeout, assigned users (none: anyone with access)."""
        self.subject, self.body = request["subject"], request["body"]
        self.response_timeout = timedelta(hours=request["timeout_hours"])
        self.assigned_users = list(request["assigned_users"]) or None


# Runs when release.approve was skipped (nobody to ask) as well as after an answer.
@task(trigger_rule="none_failed_min_one_success")
def promote(dataset: dict, evaluation: dict, decision: dict, quality: dict, approval: dict | None = None) -> dict:
    """Apply the human's answer (if asked), publish an immutable version, move production.json."""
    from ml.pipeline import promote_stage

    config = _config()
    actor = f"airflow:{get_current_context()['dag'].dag_id}"
    return promote_stage(dataset, evaluation, decision, config, _store(config), _run_id(), actor=actor,
                         quality=quality, approval=approval)


@task.short_circuit(retries=0)
def promoted(result: dict) -> bool:
    """Only a real pointer move is announced to consumers."""
    return bool(result["promoted"])


@task(outlets=[PRODUCTION_MODEL], retries=0)
def announce(result: dict) -> None:
    """Emit the production-model Asset event (consumers' DAGs are scheduled on it)."""
    get_current_context()["outlet_events"][PRODUCTION_MODEL].extra = {"version": result["version"],
                                                                      "uri": result["uri"]}


@dag(dag_id=Path(__file__).stem, doc_md=__doc__, schedule=SCHEDULE,
     start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=1,
     default_args={**DEFAULT_ARGS, "on_failure_callback": _on_failure}, params=PARAMS, tags=["ml", "training"],
     deadline=DEADLINE)
def image_classifier_retraining():
    with TaskGroup("data"):
        dataset = ingest()
        quality = validate(dataset)
        go = should_train(dataset, quality)
    with TaskGroup("training"):
        candidates = prepare(dataset)
        go >> candidates
        trained = train.partial(dataset=dataset).expand(candidate=candidates)
        finetuned = finetune.partial(dataset=dataset).expand(transfer_candidate=pick_for_finetuning(trained))
    with TaskGroup("search"):
        trials = search_trials.override(task_id="plan")()
        go >> trials
        rungs = []
        for rung in range(1, SEARCH_RUNGS_RANGE[1] + 1):
            rungs.append(search_rung.override(task_id=f"rung_{rung}").partial(dataset=dataset, rung=rung)
                         .expand(trial=trials))
            if rung < SEARCH_RUNGS_RANGE[1]:
                trials = survivors.override(task_id=f"survivors_{rung}")(rung=rung)
                rungs[-1] >> trials
    with TaskGroup("release"):
        evaluation = evaluate(dataset)
        [trained, finetuned, *rungs] >> evaluation
        decision = gate(dataset, evaluation)
        request = needs_approval(dataset, evaluation, decision, quality)
        approval = PromotionApproval(task_id="approve", request_task_id=request.operator.task_id)
        request >> approval
        result = promote(dataset, evaluation, decision, quality, approval.output)
        promoted(result) >> announce(result)


image_classifier_retraining()
