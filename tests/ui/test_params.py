"""The trigger form's params: every one can be submitted as shown (no browser needed)."""

from __future__ import annotations

import runpy

from tests.airflow_env import REPO

DAG_FILE = REPO / "dags" / "image_classifier_retraining.py"


def test_every_param_that_defers_to_the_config_file_is_nullable_and_null():
    """A required param whose default is empty blocks the UI's Trigger button, so "Empty: <config key>"
    params must be nullable with default None (force/allow_label_change are real booleans)."""
    params = runpy.run_path(str(DAG_FILE))["PARAMS"]
    deferring = {name: p for name, p in params.items() if "Empty:" in (p.description or "")}

    assert {"source", "candidates", "epochs", "image_size", "weights", "finetune_top_k", "min_delta"} <= set(deferring)
    for name, param in deferring.items():
        types = param.schema.get("type")
        assert isinstance(types, list) and "null" in types, (name, types)
        assert param.value is None, (name, param.value)
    for name, param in params.items():
        types = param.schema.get("type")
        nullable = isinstance(types, list) and "null" in types
        assert nullable or param.value not in (None, "", []), f"{name}: required but empty by default"
