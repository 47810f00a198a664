"""Fault 8: a model file in the store is replaced after promotion.

The replacement is a valid, loadable Keras model (other weights), so only the sha256 check can
catch it. Consumers must refuse it and a running `ModelClient` must keep serving the version it
had; a damaged local cache is discarded and fetched again.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml.errors import ModelVerificationError
from tests.faults.conftest import MODEL, new_bucket_name, run_to_gate, store_for, tiny_config

pytestmark = pytest.mark.faults


def _perturbed_copy(model_path, dest, scale: float):
    """A loadable model.keras like `model_path` but with every weight shifted."""
    from ml.models import load_model

    model = load_model(model_path, compile=False)
    model.set_weights([w + scale for w in model.get_weights()])
    model.save(dest)
    return dest


@pytest.fixture(scope="module")
def promoted(module_seaweed, sample_source, tmp_path_factory):
    from ml.pipeline import promote_stage

    bucket = new_bucket_name()
    store = store_for(module_seaweed, bucket)
    work = tmp_path_factory.mktemp("work")
    config = tiny_config(work, bucket, module_seaweed.endpoint_url, source=sample_source)
    run = run_to_gate(config, store, "run-v1")
    result = promote_stage(run["dataset"], run["evaluation"], run["decision"], config, store, "run-v1")
    assert result["promoted"]
    cand = work / "runs" / "run-v1" / "scratch_tiny"
    images = sorted((sample_source / "train").glob("*.jpg"))[:4]
    return {"store": store, "config": config, "v1": result["version"], "cand": cand, "images": images,
            "work": work}


def test_tampered_new_version_is_refused_and_previous_keeps_serving(promoted, tmp_path, caplog):
    from ml.registry.versions import promote, publish_version, read_pointer, version_prefix
    from ml.serving.predictor import ModelClient, load_production

    store, cand = promoted["store"], promoted["cand"]
    client = ModelClient(store, MODEL, cache_dir=tmp_path / "consumer")
    serving = client.refresh()
    assert serving.version == promoted["v1"]
    before = client.predict(promoted["images"])
    # A new version is promoted properly ...
    v2_files = {"model.keras": _perturbed_copy(cand / "model.keras", tmp_path / "v2.keras", 0.01),
                "labels.json": cand / "labels.json", "preprocessing.json": cand / "preprocessing.json"}
    labels = json.loads((cand / "labels.json").read_text())
    publish_version(store, MODEL, "v2-tampered", v2_files, {"labels": labels, "metrics": {}})
    _, etag = read_pointer(store, MODEL)
    promote(store, MODEL, "v2-tampered", expected_etag=etag, actor="test", reason="newer")
    # ... then its model.keras is replaced in the store by another valid model.
    forged = _perturbed_copy(cand / "model.keras", tmp_path / "forged.keras", -0.05)
    store.put_file(version_prefix(MODEL, "v2-tampered") + "model.keras", forged)

    now = client.refresh()

    assert now is serving, "the client swapped in a tampered model"
    assert "sha256" in client.last_error and "v2-tampered" in client.last_error
    assert client.predict(promoted["images"]) == before
    with pytest.raises(ModelVerificationError, match="sha256"):
        load_production(store, MODEL, cache_dir=tmp_path / "fresh-consumer")
    assert not (tmp_path / "fresh-consumer" / MODEL / "v2-tampered").exists(), "unverified bytes were cached"
    assert not (tmp_path / "consumer" / MODEL / "v2-tampered").exists()


def test_tampered_local_cache_is_discarded_and_fetched_again(promoted, tmp_path, caplog):
    import logging

    from ml.serving.predictor import load_version

    store, v1 = promoted["store"], promoted["v1"]
    cache = tmp_path / "consumer"
    first = load_version(store, MODEL, v1, cache_dir=cache)
    cached = cache / MODEL / v1 / "model.keras"
    _perturbed_copy(cached, tmp_path / "forged.keras", 0.2)
    cached.write_bytes((tmp_path / "forged.keras").read_bytes())
    caplog.set_level(logging.WARNING)

    again = load_version(store, MODEL, v1, cache_dir=cache, expected_sha256=first.sha256)

    assert any("discarding cached" in r.getMessage() for r in caplog.records)
    assert again.sha256 == first.sha256
    x = np.random.default_rng(0).uniform(0, 255, (2, again.image_size, again.image_size, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(again.model(x)), np.asarray(first.model(x)), atol=1e-6)
