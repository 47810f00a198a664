"""Human approval before promotion, end to end on a real `airflow standalone` through its REST API.

One stack serves every case (runs are sequential: max_active_runs=1; every task reads the ML_CONFIG
file when it runs, so a case may rewrite it before its run). Users of the simple auth manager:
admin, alice (the one configured approver) and bob; all three have the admin role, so only the
request's assigned users keep bob out. The gate promotes every run (force_promote), so whether
production moves is the human's decision alone.

- approval off: no request is made, production moves, the extra cost is measured;
- Approve by alice (bob first gets 403): production moves, the promotion log names alice;
- Reject by alice: production kept, reason "rejected by alice: <comment>";
- nobody answers within gate.approval_timeout_hours (0.01 h = 36 s): production kept, "no decision".
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import yaml

from scripts.airflow_stack import DAG_ID, StackError
from tests.faults.conftest import MODEL, airflow_stack, new_bucket_name, start_weed, store_for

pytestmark = pytest.mark.faults

APPROVE_TASK = "release.approve"
ANSWER_AFTER_S = 5  # see Approval.wait_for_request
USERS = "admin:admin,alice:admin,bob:admin"
BASE_CONFIG = {"storage": {"model_name": MODEL}, "data": {"min_images_per_class": 5},
               "gate": {"force_promote": True, "approvers": ["alice"], "approval_timeout_hours": 1}}


def _conf(sample_source, **extra: Any) -> dict:
    return {"source": str(sample_source), "candidates": ["scratch_tiny"], "epochs": 2, "image_size": 32,
            "finetune_top_k": 0, "force": True, **extra}


class Approval:
    """The shared stack, its store, and REST calls as a chosen user."""

    def __init__(self, stack: Any, store: Any, config_file: Any) -> None:
        self.stack, self.store, self.config_file = stack, store, config_file
        self._tokens: dict[str, str] = {}

    def token(self, user: str) -> str:
        if user not in self._tokens:
            passwords = json.loads((self.stack.home / "simple_auth_manager_passwords.json.generated").read_text())
            self._tokens[user] = self.stack._http("POST", "/auth/token", {"username": user, "password":
                                                                          passwords[user]})["access_token"]
        return self._tokens[user]

    def call(self, user: str, method: str, path: str, body: Any = None) -> Any:
        return self.stack._http(method, path, body, token=self.token(user))

    def hitl_path(self, run_id: str) -> str:
        return f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{APPROVE_TASK}/-1/hitlDetails"

    def respond(self, user: str, run_id: str, option: str, comment: str | None = None) -> Any:
        return self.call(user, "PATCH", self.hitl_path(run_id),
                         {"chosen_options": [option], "params_input": {"comment": comment}})

    def wait_for_request(self, run_id: str, timeout: float = 600) -> None:
        """Until release.approve waits for an answer (state awaiting_input)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.stack.task(run_id, APPROVE_TASK)
            if task is not None and task.state == "awaiting_input":
                time.sleep(ANSWER_AFTER_S)  # a reviewer reads before answering
                return
            if task is not None and task.state in ("skipped", "failed", "upstream_failed", "success"):
                raise AssertionError(f"{APPROVE_TASK} ended {task.state} without asking; see {self.stack.log_file}")
            if self.stack.run_state(run_id) in ("success", "failed"):
                raise AssertionError(f"run {run_id} ended before asking; see {self.stack.log_file}")
            time.sleep(1)
        raise AssertionError(f"{APPROVE_TASK} of {run_id} did not ask within {timeout:.0f} s")

    def answer_and_wait(self, user: str, run_id: str, option: str, comment: str,
                        timeout: float = 300) -> tuple[dict, str, int]:
        """Answer the request, then wait for the run: (the last answer, the run's state, how often it asked again).

        Airflow 3.3.2 can lose an answer: when the scheduler handles the asking try's "workload finished"
        executor event only after the answer has moved the task on, it takes the event for an external state
        change and retries the task (the same race as apache/airflow#71580 for deferred tasks), and the retry
        writes a new request, dropping the answer. Seen here within seconds of the request, under load. The
        request then shows up again in Required Actions, and a reviewer answers it again; so does this.
        """
        answered = self.respond(user, run_id, option, comment)
        asked_try, asked_again = self.stack.task(run_id, APPROVE_TASK).try_number, 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.stack.run_state(run_id)
            if state in ("success", "failed"):
                return answered, state, asked_again
            task = self.stack.task(run_id, APPROVE_TASK)
            if task is not None and task.state == "awaiting_input" and task.try_number > asked_try:
                time.sleep(ANSWER_AFTER_S)
                answered = self.respond(user, run_id, option, comment)
                asked_try, asked_again = task.try_number, asked_again + 1
                print(f"{run_id}: Airflow asked again (try {asked_try}) after losing the answer; answered again")
            time.sleep(1)
        return answered, "timed out", asked_again

    def pointer(self) -> dict | None:
        from ml.registry.versions import read_pointer

        return read_pointer(self.store, MODEL)[0]

    def log_of(self, run_id: str) -> list[dict]:
        from ml.registry.versions import promotion_history

        return [e for e in promotion_history(self.store, MODEL) if e.get("run_id") == run_id]

    def task_seconds(self, run_id: str, task_id: str) -> tuple[str | None, str | None]:
        rows = self.stack._query("SELECT start_date, end_date FROM task_instance WHERE dag_id = ? AND run_id = ? "
                                 "AND task_id = ?", (DAG_ID, run_id, task_id))
        return rows[0] if rows else (None, None)


@pytest.fixture(scope="module")
def approval(tmp_path_factory: pytest.TempPathFactory, sample_source) -> Iterator[Approval]:
    server = start_weed(tmp_path_factory.mktemp("weed"))
    root = tmp_path_factory.mktemp("stack")
    bucket = new_bucket_name("approval")
    stack = airflow_stack(root, server, bucket, BASE_CONFIG,
                          extra_env={"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": USERS,
                                     "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                                     "ML_MAX_RUN_MINUTES": "none"})
    try:
        stack.prepare()
        stack.start()
        stack.wait_for_dag()
        yield Approval(stack, store_for(server, bucket), root / "pipeline.yaml")
    finally:
        stack.stop()
        server.stop()


def _seconds(start: str | None, end: str | None) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() if start and end else -1.0


@pytest.mark.timeout(600)
def test_approval_off_asks_nobody_and_promotes(approval, sample_source):
    run_id = "faults__approval_off"
    before = approval.pointer()

    state = approval.stack.wait_run(approval.stack.trigger(_conf(sample_source), run_id), timeout=540)

    assert state == "success", approval.stack.log_file
    assert approval.stack.task(run_id, APPROVE_TASK).state == "skipped"
    assert approval.stack.task(run_id, "release.promote").state == "success"
    listed = approval.call("admin", "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/hitlDetails")
    assert listed["total_entries"] == 0, listed
    after = approval.pointer()
    assert after is not None and after != before
    [entry] = approval.log_of(run_id)
    assert entry["action"] == "promote" and "approval" not in entry
    # The cost of the feature when it is off: the needs_approval task, and the gate -> promote gap.
    ask = _seconds(*approval.task_seconds(run_id, "release.needs_approval"))
    gate_end = approval.task_seconds(run_id, "release.gate")[1]
    gap = _seconds(gate_end, approval.task_seconds(run_id, "release.promote")[0])
    # For comparison, one plain hand-over between two tasks of the same run: evaluate end -> gate start.
    hand_over = _seconds(approval.task_seconds(run_id, "release.evaluate")[1],
                         approval.task_seconds(run_id, "release.gate")[0])
    print(f"approval off: release.needs_approval ran {ask:.1f} s; gate end -> promote start {gap:.1f} s "
          f"(evaluate end -> gate start {hand_over:.1f} s)")


@pytest.mark.timeout(600)
def test_only_the_assigned_approver_may_answer_and_approve_promotes(approval, sample_source):
    run_id = "faults__approval_approve"
    approval.stack.trigger(_conf(sample_source, require_approval=True), run_id)
    approval.wait_for_request(run_id)
    before = approval.pointer()

    detail = approval.call("admin", "GET", approval.hitl_path(run_id))
    with pytest.raises(StackError, match="HTTP 403"):
        approval.respond("bob", run_id, "Approve", "bob is not an approver")
    answered, state, _ = approval.answer_and_wait("alice", run_id, "Approve", "numbers look right")

    assert [u["id"] for u in detail["assigned_users"]] == ["alice"]
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert set(detail["params"]) == {"comment"}
    body = detail["body"]
    assert "### Leaderboard (test split, 1 candidate)" in body and "| 1 | scratch\\_tiny | " in body
    assert "### Gate decision: promote" in body and "forced" in body
    assert "[Open the run in the model registry](</model-registry/runs/faults__approval_approve>)" in body
    assert "runs\\/faults\\_\\_approval\\_approve\\/report\\.html" in body  # the store URI, as escaped text
    assert answered["responded_by"]["name"] == "alice"
    assert state == "success", approval.stack.log_file
    after = approval.pointer()
    assert after is not None and after != before
    [entry] = approval.log_of(run_id)
    assert entry["action"] == "promote" and entry["to"] == after["version"]
    assert entry["approval"]["outcome"] == "approved" and entry["approval"]["by"] == "alice"
    assert entry["approval"]["comment"] == "numbers look right" and entry["approval"]["at"]
    assert entry["reasons"][-1] == "approved by alice: numbers look right"


@pytest.mark.timeout(600)
def test_reject_keeps_production_with_the_reason(approval, sample_source):
    run_id = "faults__approval_reject"
    approval.stack.trigger(_conf(sample_source, require_approval=True), run_id)
    approval.wait_for_request(run_id)
    before = approval.pointer()

    _, state, _ = approval.answer_and_wait("alice", run_id, "Reject", "wait for the new labels")

    assert state == "success", approval.stack.log_file
    assert approval.pointer() == before
    [entry] = approval.log_of(run_id)
    assert entry["action"] == "keep" and entry["to"] == before["version"]
    assert entry["reasons"][0] == "rejected by alice: wait for the new labels"
    assert entry["approval"]["by"] == "alice"
    assert approval.stack.task(run_id, "release.announce").state == "skipped"


@pytest.mark.timeout(600)
def test_no_answer_within_the_timeout_keeps_production(approval, sample_source):
    run_id = "faults__approval_timeout"
    # From the config file this time (param empty): on, and 0.01 h = 36 s to answer.
    approval.config_file.write_text(yaml.safe_dump({**BASE_CONFIG, "gate": {
        **BASE_CONFIG["gate"], "require_approval": True, "approval_timeout_hours": 0.01}}))
    approval.stack.trigger(_conf(sample_source), run_id)
    approval.wait_for_request(run_id)
    before = approval.pointer()
    asked = time.monotonic()

    state = approval.stack.wait_run(run_id, timeout=300)
    waited = time.monotonic() - asked

    assert state == "success", approval.stack.log_file
    assert waited >= 30, f"resumed after {waited:.0f} s: before its 36 s timeout"
    assert approval.pointer() == before
    [entry] = approval.log_of(run_id)
    assert entry["action"] == "keep"
    assert entry["reasons"][0] == "no decision within 0.01 h: production kept"
    assert entry["approval"]["outcome"] == "timed out" and entry["approval"]["by"] is None
    detail = approval.call("admin", "GET", approval.hitl_path(run_id))
    assert detail["chosen_options"] == ["Reject"] and detail["responded_by_user"] is None
    print(f"timeout: resumed {waited:.0f} s after the request (timeout 36 s, scheduler sweep every 15 s)")
