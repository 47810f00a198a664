"""The optional human approval between gate and promote: wired so it asks only when needed, never
blocks otherwise, takes its timeout and respondents from the run's config, and leaves promote to log
every outcome."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest

DAG_ID = "image_classifier_retraining"


@pytest.fixture
def tasks(dagbag):
    return dagbag.dags[DAG_ID].task_dict


def test_approve_sits_between_gate_and_promote(tasks):
    from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

    ask, approve, promote = tasks["release.needs_approval"], tasks["release.approve"], tasks["release.promote"]

    assert "release.gate" in ask.upstream_task_ids
    assert set(approve.upstream_task_ids) == {"release.needs_approval"}
    assert {"release.gate", "release.approve"} <= set(promote.upstream_task_ids)
    assert isinstance(approve, HITLOperator)
    # Not ApprovalOperator: its Reject would skip promote, which must run to log "keep".
    assert not isinstance(approve, ApprovalOperator)


def test_a_skipped_approval_does_not_skip_promote(tasks):
    """needs_approval skips only release.approve; promote runs on the gate's success with approve skipped."""
    ask, promote = tasks["release.needs_approval"], tasks["release.promote"]

    assert ask.ignore_downstream_trigger_rules is False
    assert set(ask.downstream_task_ids) == {"release.approve"}
    assert promote.trigger_rule == "none_failed_min_one_success"


def test_the_request_offers_approve_or_reject_with_a_comment_and_times_out_to_reject(tasks):
    approve = tasks["release.approve"]

    assert approve.options == ["Approve", "Reject"]
    assert approve.defaults == ["Reject"]  # a timeout resumes the task with Reject (production kept)
    assert approve.multiple is False
    assert set(approve.serialized_params) == {"comment"}  # not the DAG's trigger params
    assert approve.execution_timeout is not None  # the execute phase stays bounded; the wait is response_timeout


@pytest.mark.parametrize(("gate", "timeout", "users"), [
    ({"approval_timeout_hours": 2.5, "approvers": ["alice", "bob"]}, timedelta(hours=2.5),
     [{"id": "alice", "name": "alice"}, {"id": "bob", "name": "bob"}]),
    ({}, timedelta(hours=24), None),  # defaults: a day, anyone with access
])
def test_timeout_and_respondents_come_from_the_runs_config(tasks, tmp_path, gate, timeout, users):
    from ml.config import PipelineConfig
    from ml.pipeline import approval_stage

    config = PipelineConfig.from_dict({"work_dir": str(tmp_path), "gate": {"require_approval": True, **gate}})
    decision = {"promote": True, "challenger": "scratch_small", "reasons": ["beats chance"]}
    request = approval_stage({"dataset_hash": "d" * 64}, {"leaderboard": []}, decision, config, None, "manual__1")
    approve = copy.copy(tasks["release.approve"])

    approve.use_request(request)

    assert approve.response_timeout == timeout
    assert approve.assigned_users == users
    assert approve.body == request["body"] and "scratch\\_small" in approve.body


def test_require_approval_is_a_nullable_trigger_param(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    params = dagbag.dags[DAG_ID].params
    assert params["require_approval"] is None  # empty: gate.require_approval from the config file
    for value in (True, False, None):
        trial = copy.deepcopy(params)
        trial["require_approval"] = value
        trial.validate()
    with pytest.raises(ParamValidationError):
        trial = copy.deepcopy(params)
        trial["require_approval"] = "yes"
        trial.validate()
