"""The search run in one process (`ml.pipeline.search_stage`, what `python -m ml run` calls) against a real store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest


def test_search_stage_trains_rung_after_rung_and_reuses_what_it_published(
    tiny_dataset: Path, tmp_path: Path, store: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.config import PipelineConfig
    from ml.pipeline import search_stage
    from ml.registry import layout

    config = PipelineConfig.from_dict({
        "storage": {"bucket": store.bucket}, "work_dir": str(tmp_path / "work"),
        "train": {"candidates": ["scratch_tiny"], "image_size": 32, "batch_size": 8, "seed": 3},
        "search": {"enabled": True, "bases": ["scratch_tiny"], "max_trials": 3, "eta": 2, "rungs": 2,
                   "min_epochs": 1, "seed": 5, "space": {"learning_rate": [0.001, 0.003, 0.01]}},
    })
    model = config.storage.model_name

    with caplog.at_level(logging.INFO):
        summaries = search_stage(tiny_dataset, config, store, "run-1")

    by_name = {s["candidate"]: s for s in summaries}
    assert sorted(by_name) == ["scratch_tiny__t01", "scratch_tiny__t02", "scratch_tiny__t03"]
    survivors = store.get_json(layout.run_key(model, "run-1", *layout.search_survivors_parts(1)))["survivors"]
    assert len(survivors) == 1  # 3 // 2
    for name, summary in by_name.items():
        rung = 2 if name in survivors else 1
        assert summary["search"]["rung"] == rung and summary["epochs_run"] == rung
        assert summary["resumed_epochs"] == (1 if name in survivors else 0)
        assert store.get_json(layout.run_key(model, "run-1", *layout.search_rung_parts(1, name)))["epochs"] == 1
    assert f"resuming {survivors[0]} at epoch 2 of 2" in caplog.text
    assert store.list_keys(f"{layout.run_prefix(model, 'run-1')}/checkpoints/") == []

    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = search_stage(tiny_dataset, config, store, "run-1")
    assert {s["candidate"]: s["search"]["rung"] for s in again} == {n: s["search"]["rung"] for n, s in by_name.items()}
    assert caplog.text.count("already published by an earlier attempt, reusing it") == 4  # 3 + 1 rung tasks
    assert "trained scratch_tiny" not in caplog.text
