"""An ensemble_top2 candidate through the retraining DAG (`dag.test()`) against a real SeaweedFS."""

from __future__ import annotations

import pytest

from tests.e2e.test_dag_end_to_end import MODEL, _run, _safe

pytestmark = pytest.mark.e2e


def test_dag_builds_evaluates_and_ranks_an_ensemble(pipeline_env, tmp_path_factory):
    from ml.data.sample import make_sample_dataset

    sample = tmp_path_factory.mktemp("sample") / "dogs"
    make_sample_dataset(sample, classes=3, per_class=40, size=40, seed=5)
    store = pipeline_env["store"]

    run = _run({"source": str(sample), "candidates": ["scratch_tiny", "scratch_small", "ensemble_top2"],
                "epochs": 3, "image_size": 32, "finetune_top_k": 0, "force": True})

    assert run.state == "success"
    prefix = f"{MODEL}/runs/{_safe(run.run_id)}/ensemble_top2/"
    keys = set(store.list_keys(prefix))
    for name in ("model.keras", "members.json", "train_summary.json", "metrics.json", "predictions.npz"):
        assert prefix + name in keys, name
    members = store.get_json(prefix + "members.json")
    assert sorted(m["candidate"] for m in members) == ["scratch_small", "scratch_tiny"]
    report = store.get_json(f"{MODEL}/runs/{_safe(run.run_id)}/report.json")
    rows = {row["candidate"]: row for row in report["leaderboard"]}
    assert rows["ensemble_top2"]["params"] == rows["scratch_tiny"]["params"] + rows["scratch_small"]["params"]
