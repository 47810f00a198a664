"""Offline pretrained backbones: the pretext task, the cached weights file, where ImageNet would come from."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from ml.data.sample import MAX_CLASSES, PRETEXT_TEXTURES, TEXTURES, class_names, pretext_images
from ml.errors import ConfigError
from ml.models import weights as W
from ml.models.pretext import PretextRecipe, pretext_weights

TINY = PretextRecipe(image_size=32, per_class=4, epochs=1, batch_size=16)


def test_pretext_task_shares_no_class_and_no_texture_with_any_sample() -> None:
    images, labels, names = pretext_images(per_class=3, size=32, seed=1)

    assert images.shape == (3 * len(names), 32, 32, 3) and images.dtype == np.uint8
    assert sorted(np.bincount(labels).tolist()) == [3] * len(names)
    assert not set(names) & set(class_names(MAX_CLASSES))
    assert not set(PRETEXT_TEXTURES) & set(TEXTURES)
    assert len(names) == 6 and all(n.startswith("pretext_") for n in names)
    again, _, _ = pretext_images(per_class=3, size=32, seed=1)
    assert np.array_equal(images, again)


def test_pretext_weights_are_trained_once_then_reused_and_load_into_the_backbone(tmp_path: Path) -> None:
    from ml.models.transfer import build_backbone

    first = pretext_weights(tmp_path, TINY)
    second = pretext_weights(tmp_path, TINY)

    assert first["cached"] is False and second["cached"] is True
    assert second["path"] == first["path"] and second["sha256"] == first["sha256"]
    assert first["path"].endswith(".weights.h5") and 0 <= first["held_out_accuracy"] <= 1
    backbone = build_backbone("mobilenet", 32, alpha=0.25, weights=first["path"])
    assert backbone.count_params() > 0
    # Another recipe is another file: nothing is reused across recipes.
    other = PretextRecipe(**{**TINY.__dict__, "seed": 1})
    assert other.key() != TINY.key()


def test_a_damaged_pretext_file_is_trained_again(tmp_path: Path) -> None:
    first = pretext_weights(tmp_path, TINY)
    Path(first["path"]).write_bytes(b"not weights")

    again = pretext_weights(tmp_path, TINY)

    assert again["cached"] is False and again["sha256"] == W.sha256_file(again["path"])


def test_pretext_recipe_is_validated() -> None:
    with pytest.raises(ConfigError, match="needs image_size >= 32"):
        PretextRecipe(image_size=16)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        PretextRecipe(epochs=0)


def test_imagenet_source_cached_reachable_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    calls: list[tuple] = []

    def offline(address: tuple, timeout: float) -> socket.socket:
        calls.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    assert W.imagenet_source("mobilenet", 48, alpha=0.25) == "offline"
    assert calls == [(W.KERAS_WEIGHTS_HOST, 443)]

    class Answered:
        def __enter__(self) -> Answered:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: Answered())
    assert W.imagenet_source("mobilenet", 48, alpha=0.25) == "reachable"

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mobilenet_2_5_224_tf_no_top.h5").write_bytes(b"x")
    monkeypatch.setattr(socket, "create_connection", offline)
    assert W.imagenet_source("mobilenet", 48, alpha=0.25) == "cached"
