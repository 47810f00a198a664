"""Fault 2, through Airflow: the object store dies during a real DAG run's promotion.

A DAG run on `airflow standalone` reaches the store through `FaultProxy`, which SIGKILLs the
SeaweedFS process the moment the `release.promote` task is 4 KiB into uploading the new
version's model.keras, or sends its conditional PUT of production.json. The task must fail
after its own retries with a clear error, production.json must be byte-for-byte what the
previous run promoted, and once the store is back, clearing the run's failed tasks (the UI's
"Clear failed", here through the REST API) must finish the promotion without any manual
cleanup: the version the failed tries started is finished (or reused), not left beside a copy.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.faults.conftest import (
    MODEL,
    airflow_stack,
    assert_pointer_verifiable,
    kill_weed,
    new_bucket_name,
    store_for,
)

pytestmark = pytest.mark.faults

PROMOTE_TASK = "release.promote"
KILL_POINTS = {
    "mid_upload": (re.compile(rb"PUT /[^ ]+/versions/[^/ ]+/model\.keras "), 4096),
    "pointer_swap": (re.compile(rb"PUT /[^ ]+/production\.json "), 0),
}


def _conf(sample_source) -> dict:
    return {"source": str(sample_source), "candidates": ["scratch_tiny"], "epochs": 2, "image_size": 32,
            "finetune_top_k": 0, "force": True}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kill_at", sorted(KILL_POINTS))
def test_store_killed_during_dag_promotion_then_clearing_failed_tasks_promotes(kill_at, own_seaweed, fault_proxy,
                                                                               sample_source, tmp_path):
    from ml.registry.versions import promotion_history, read_pointer

    bucket = new_bucket_name()
    direct = store_for(own_seaweed, bucket)
    stack = airflow_stack(tmp_path / "stack", own_seaweed, bucket, {
        "storage": {"model_name": MODEL}, "data": {"min_images_per_class": 5},
        "gate": {"force_promote": True},  # every run promotes, so the second one must swap the pointer
    }, endpoint_url=fault_proxy.endpoint)
    stack.prepare()
    stack.start()
    try:
        stack.wait_for_dag()
        assert stack.wait_run(stack.trigger(_conf(sample_source), "faults__champion"), timeout=420) == "success"
        before = direct.get_with_etag(f"{MODEL}/production.json")
        champion, _ = read_pointer(direct, MODEL)
        assert before is not None and champion is not None

        marker, after_bytes = KILL_POINTS[kill_at]
        fault_proxy.arm(marker, lambda: kill_weed(own_seaweed), after_bytes=after_bytes)
        run_id = stack.trigger(_conf(sample_source), f"faults__store_dies_{kill_at}")
        first = stack.wait_run(run_id, timeout=600)
        promote = stack.task(run_id, PROMOTE_TASK)
        tries = stack.tries(run_id, PROMOTE_TASK)
        logs = [stack.task_log(run_id, PROMOTE_TASK, try_number=n) for n in range(1, promote.try_number + 1)]

        assert fault_proxy.fired.is_set(), f"the store was not killed ({kill_at})"
        assert first == "failed"
        assert (promote.state, promote.try_number) == ("failed", 3), promote  # retries=2 were used up
        assert [state for _, state in tries] == ["failed", "failed"], tries
        assert all("cannot reach object store endpoint" in text for text in logs), logs[-1][-3000:]
        assert stack.task(run_id, "release.announce").state == "upstream_failed"

        own_seaweed.restart()
        assert direct.get_with_etag(f"{MODEL}/production.json") == before, "production.json changed"

        cleared = stack.clear_failed(run_id)
        assert any(PROMOTE_TASK in label for label in cleared), cleared
        second = stack.wait_run(run_id, timeout=420)
        promote_after = stack.task(run_id, PROMOTE_TASK)
    finally:
        stack.stop()

    assert second == "success"
    assert promote_after.state == "success"
    pointer = assert_pointer_verifiable(direct)
    assert pointer["version"] != champion["version"]
    moves = [e for e in promotion_history(direct, MODEL) if e["action"] == "promote" and e.get("run_id") == run_id]
    assert len(moves) == 1 and moves[0]["from"] == champion["version"] and moves[0]["to"] == pointer["version"]
    # The champion and the new version, both complete: the failed tries left nothing beside them.
    keys = direct.list_keys(f"{MODEL}/versions/")
    versions = {k.split("/")[2] for k in keys}
    assert versions == {champion["version"], pointer["version"]}, sorted(keys)
    assert all(f"{MODEL}/versions/{v}/COMPLETE" in keys for v in versions), sorted(keys)
    print(f"cleared {cleared}; promoted {pointer['version']} over {champion['version']} "
          f"({time.strftime('%H:%M:%S')})")
