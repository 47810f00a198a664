"""The demo's choice of backbone weights (scripts/devstack.py): ImageNet when it can, else a stand-in, said so."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.models import pretext, weights


@pytest.fixture()
def devstack(monkeypatch: pytest.MonkeyPatch):
    from scripts import devstack as module

    return module


def test_imagenet_in_the_keras_cache_is_used_and_named(devstack, monkeypatch, capsys) -> None:
    monkeypatch.setattr(weights, "imagenet_source", lambda *a, **k: "cached")
    monkeypatch.setattr(pretext, "pretext_weights", lambda *a, **k: pytest.fail("must not pretrain"))

    assert devstack.demo_weights() == "imagenet"
    assert "weights: ImageNet (mobilenet_2_5_224_tf_no_top.h5 is in the Keras cache" in capsys.readouterr().out


def test_offline_the_demo_transfers_from_pretext_weights_and_says_what_imagenet_would_do(
    devstack, monkeypatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.setattr(weights, "imagenet_source", lambda *a, **k: "offline")
    file = devstack.REPO / ".demo" / "weights" / "k" / "pretext.weights.h5"
    seen = {}

    def fake_pretext(cache_dir, recipe):
        seen["recipe"] = recipe
        return {"path": str(file), "cached": True, "classes": ["pretext_circle"], "held_out_accuracy": 0.4}

    monkeypatch.setattr(pretext, "pretext_weights", fake_pretext)

    assert devstack.demo_weights() == str(file)
    out = capsys.readouterr().out
    assert "weights: OFFLINE - no ImageNet file mobilenet_2_5_224_tf_no_top.h5" in out
    assert "with ImageNet weights (online, or mobilenet_2_5_224_tf_no_top.h5 pre-staged in" in out
    # The stand-in is made for the demo's own backbone, width and size (config/demo.yaml).
    assert (seen["recipe"].architecture, seen["recipe"].alpha, seen["recipe"].image_size) == ("mobilenet", 0.25, 64)
