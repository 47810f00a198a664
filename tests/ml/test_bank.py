"""The augmented bottleneck bank: its key, its fused-warp views, its integrity checks and the per-epoch draws."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.training.bank import (
    BANK_VERSION,
    Bank,
    augment_batch,
    augment_image,
    bank_dataset,
    bank_path,
    epoch_order,
    load_or_build_bank,
    view_schedule,
)
from ml.training.input_pipeline import AugmentConfig

SIZE = 32
ROWS = np.arange(10, dtype=np.int64)
KEY: dict[str, Any] = {
    "architecture": "mobilenet",
    "image_size": 96,
    "weights_id": "file-abc",
    "alpha": 0.25,
    "augment": AugmentConfig(),
    "views": 5,
    "seed": 1337,
}


def _path(tmp: Path, dataset_hash: str = "d" * 64, rows: np.ndarray = ROWS, **changes: Any) -> Path:
    return bank_path(tmp, dataset_hash, rows, **{**KEY, **changes})


@pytest.mark.parametrize(
    "change",
    [
        {"dataset_hash": "e" * 64},
        {"rows": ROWS[:-1]},
        {"architecture": "mobilenet_v2"},
        {"image_size": 128},
        {"weights_id": "file-def"},
        {"alpha": 0.5},
        {"augment": AugmentConfig(rotation=0.1)},
        {"augment": AugmentConfig(flip=False)},
        {"views": 6},
        {"seed": 1338},
    ],
    ids=lambda change: next(iter(change)),
)
def test_bank_key_changes_with_every_keyed_setting(tmp_path: Path, change: dict[str, Any]) -> None:
    assert _path(tmp_path, **change) != _path(tmp_path)
    assert _path(tmp_path) == _path(tmp_path)  # and only with them


def test_bank_key_names_the_view_format_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Views made by the fused warp differ from the Keras layers' (version 1): never read one as the other.
    assert BANK_VERSION == 2
    current = _path(tmp_path)
    monkeypatch.setattr("ml.training.bank.BANK_VERSION", 1)
    assert _path(tmp_path) != current


OFF = AugmentConfig(flip=False, rotation=0, zoom=0, translation=0, crop=0, brightness=0, contrast=0)


def _image(seed: int = 0, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def test_augment_image_with_every_distortion_off_is_the_identity() -> None:
    image = _image()
    np.testing.assert_array_equal(augment_image(image, OFF, np.random.default_rng(1)), image)


def test_augment_image_flip_is_an_exact_mirror_and_colour_jitter_a_per_channel_map() -> None:
    image = _image()
    flips = [augment_image(image, dataclasses.replace(OFF, flip=True), np.random.default_rng(s)) for s in range(16)]
    mirrored = [np.array_equal(out, image[:, ::-1]) for out in flips]
    assert all(m or np.array_equal(out, image) for m, out in zip(mirrored, flips, strict=True))
    assert 0 < sum(mirrored) < 16  # p = 0.5
    # Brightness only: every pixel moves by the same offset (clipped to [0, 255]).
    flat = np.full((8, 8, 3), 128, dtype=np.uint8)
    out = augment_image(flat, dataclasses.replace(OFF, brightness=0.3), np.random.default_rng(2)).astype(int)
    assert len(np.unique(out)) == 1 and out[0, 0, 0] != 128 and abs(out[0, 0, 0] - 128) <= 0.3 * 255 + 1


def test_augment_image_geometry_moves_pixels_within_its_ranges() -> None:
    image = _image(size=64)
    for name, value in (("rotation", 0.1), ("zoom", 0.2), ("translation", 0.2), ("crop", 0.2)):
        outs = [augment_image(image, dataclasses.replace(OFF, **{name: value}), np.random.default_rng(s))
                for s in range(4)]
        assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outs)
        assert all(not np.array_equal(out, image) for out in outs), name
        assert not np.array_equal(outs[0], outs[1]), name


def test_views_depend_on_seed_view_and_row_only_not_on_the_batch() -> None:
    images = np.stack([_image(i, 32) for i in range(4)])
    rows = np.array([7, 3, 11, 5])
    augment = AugmentConfig()
    full = augment_batch(images, rows, augment, seed=4, view=1)

    np.testing.assert_array_equal(full, augment_batch(images, rows, augment, seed=4, view=1))
    # The same image under the same row in another batch, alone: the same pixels.
    np.testing.assert_array_equal(augment_batch(images[2:3], rows[2:3], augment, seed=4, view=1), full[2:3])
    assert not np.array_equal(full, augment_batch(images, rows, augment, seed=4, view=2))
    assert not np.array_equal(full, augment_batch(images, rows, augment, seed=5, view=1))
    assert not np.array_equal(full, images)


def test_view_schedule_is_a_function_of_seed_and_epoch() -> None:
    first = [view_schedule(7, epoch, 500, 6) for epoch in range(4)]
    again = [view_schedule(7, epoch, 500, 6) for epoch in reversed(range(4))][::-1]
    other_seed = [view_schedule(8, epoch, 500, 6) for epoch in range(4)]

    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])  # a different view each epoch
    assert not np.array_equal(first[0], other_seed[0])
    assert set(np.concatenate(first).tolist()) == set(range(6))  # the un-augmented view 0 included
    np.testing.assert_array_equal(np.sort(epoch_order(7, 2, 500)), np.arange(500))


def _epochs(bank: Bank, labels: np.ndarray, seed: int, epochs: int = 3, batch: int = 4) -> list[np.ndarray]:
    ds, steps = bank_dataset(bank, labels, epochs=epochs, batch_size=batch, seed=seed)
    batches = [x for x, _ in ds.as_numpy_iterator()]
    assert len(batches) == steps * epochs  # batches never span two epochs
    return [np.concatenate(batches[e * steps : (e + 1) * steps]) for e in range(epochs)]


def test_bank_dataset_trains_on_one_view_per_image_per_epoch_chosen_by_seed(tmp_path: Path) -> None:
    views, n, dim = 4, 10, 3
    # Vector (v, i, *) holds 100 v + i: every batch row tells which view of which image it is.
    values = 100.0 * np.arange(views + 1)[:, None] + np.arange(n)[None, :]
    bank = Bank(np.repeat(values[..., None], dim, axis=2).astype(np.float32), ROWS, tmp_path / "b.npy", hit=False)
    labels = np.eye(2, dtype=np.float32)[np.arange(n) % 2]

    first, again, other = _epochs(bank, labels, 5), _epochs(bank, labels, 5), _epochs(bank, labels, 6)

    for epoch, (a, b) in enumerate(zip(first, again, strict=True)):
        np.testing.assert_array_equal(a, b)
        image, view = (a[:, 0] % 100).astype(int), (a[:, 0] // 100).astype(int)
        np.testing.assert_array_equal(np.sort(image), np.arange(n))  # every image once
        np.testing.assert_array_equal(view, view_schedule(5, epoch, n, views + 1)[image])
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    ds, _ = bank_dataset(bank, labels, epochs=1, batch_size=n, seed=5)
    x, y = next(iter(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(y, labels[(x[:, 0] % 100).astype(int)])  # labels follow their image


@pytest.fixture(scope="module")
def tiny_cache(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ml.data.image_cache import build_image_cache

    return build_image_cache(tiny_dataset, SIZE, tmp_path_factory.mktemp("cache"))


def _extractor() -> Any:
    import keras

    # Mean pixel per channel: cheap, and it changes when the augmentation does.
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.GlobalAveragePooling2D()])


def _build(cache: Any, path: Path, views: int = 2) -> Bank:
    rows = cache.split_indices("train")
    clean = np.asarray(_extractor().predict(cache.gather(np.arange(len(cache))).astype(np.float32), verbose=0))
    augment = AugmentConfig(rotation=0.2, brightness=0.3)
    return load_or_build_bank(cache, _extractor(), path, rows=rows, clean=clean, augment=augment, views=views, seed=3)


def test_bank_is_built_once_then_shared(tiny_cache: Any, tmp_path: Path) -> None:
    first = _build(tiny_cache, tmp_path / "bank.npy")
    second = _build(tiny_cache, tmp_path / "bank.npy")

    assert first.hit is False and second.hit is True
    assert first.features.shape == (3, len(tiny_cache.split_indices("train")), 3)
    np.testing.assert_array_equal(first.features, second.features)
    assert not np.allclose(first.features[0], first.features[1])  # the views are augmented
    assert not np.allclose(first.features[1], first.features[2])  # and differ from each other


def test_same_seed_builds_the_same_bank_and_another_seed_another(tiny_cache: Any, tmp_path: Path) -> None:
    rows = tiny_cache.split_indices("train")
    clean = np.asarray(_extractor().predict(tiny_cache.gather(np.arange(len(tiny_cache))).astype(np.float32),
                                            verbose=0))

    def build(name: str, seed: int, batch_size: int) -> np.ndarray:
        return np.array(load_or_build_bank(
            tiny_cache, _extractor(), tmp_path / name, rows=rows, clean=clean, augment=AugmentConfig(), views=3,
            seed=seed, batch_size=batch_size,
        ).features)

    first = build("a.npy", 3, 8)
    np.testing.assert_allclose(build("b.npy", 3, 5), first, atol=1e-5)  # fresh build, other batching
    other = build("c.npy", 4, 8)
    np.testing.assert_array_equal(other[0], first[0])  # view 0 un-augmented either way
    assert not np.allclose(other[1:], first[1:])


@pytest.mark.parametrize("damage", ["flip a byte", "drop the sidecar", "other shape"])
def test_damaged_bank_is_rebuilt_not_trusted(
    tiny_cache: Any, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bank.npy"
    good = np.array(_build(tiny_cache, path).features)
    if damage == "flip a byte":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "drop the sidecar":
        path.with_suffix(".json").unlink()
    else:  # a bank built with another view count under this name (a stale or foreign file)
        _build(tiny_cache, tmp_path / "other.npy", views=1)
        path.write_bytes((tmp_path / "other.npy").read_bytes())
        path.with_suffix(".json").write_bytes((tmp_path / "other.json").read_bytes())

    with caplog.at_level(logging.WARNING, logger="ml.training.bottleneck"):
        rebuilt = _build(tiny_cache, path)

    assert rebuilt.hit is False
    np.testing.assert_allclose(rebuilt.features, good, atol=1e-6)
    if damage != "drop the sidecar":
        assert "bottleneck bank" in caplog.text


def test_bank_settings_are_part_of_the_candidate_settings() -> None:
    from ml.config import TrainConfig
    from ml.errors import ConfigError
    from ml.training.settings import DEFAULT_BANK_VIEWS, CandidateSettings

    def settings(options: dict[str, Any], **config: Any) -> CandidateSettings:
        return CandidateSettings.for_candidate(
            TrainConfig(candidates=("transfer_mobilenet",), candidate_options={"transfer_mobilenet": options},
                        **config),
            "transfer_mobilenet",
        )

    default = settings({})
    assert (default.frozen_phase, default.bank_views, default.head_on_features) == ("bank", DEFAULT_BANK_VIEWS, "bank")
    assert default.epochs == TrainConfig().head_epochs  # a head on features trains to early stopping
    assert default.learning_rate == TrainConfig().head_learning_rate
    assert settings({"augment": False}).learning_rate == TrainConfig().head_learning_rate
    assert settings({"learning_rate": 0.02}).learning_rate == 0.02
    assert settings({"augment": False}).head_on_features == "bottlenecks"
    # A head on features gets its own (longer) early-stopping patience; through the backbone, the config's.
    assert default.early_stopping_patience == TrainConfig().head_early_stopping_patience
    assert settings({"augment": False}).early_stopping_patience == TrainConfig().head_early_stopping_patience
    assert settings({}, head_early_stopping_patience=12).early_stopping_patience == 12
    assert settings({"frozen_phase": "backbone"}).early_stopping_patience == TrainConfig().early_stopping_patience
    through = settings({"frozen_phase": "backbone", "epochs": 4})
    assert through.head_on_features is None and through.epochs == 4
    assert through.learning_rate == TrainConfig().learning_rate
    assert settings({"frozen_phase": "backbone"}).epochs == TrainConfig().epochs
    assert settings({"bank_views": 9}).bank_views == 9
    assert dataclasses.replace(default, kind="finetune").head_on_features is None
    with pytest.raises(ConfigError, match=r"transfer_mobilenet\.frozen_phase must be one of \['bank', 'backbone'\]"):
        settings({"frozen_phase": "gpu"})
    with pytest.raises(ConfigError, match=r"transfer_mobilenet\.bank_views must be"):
        settings({"bank_views": 0})
    with pytest.raises(ConfigError, match="unknown option 'bank_views' for scratch_small"):
        CandidateSettings.for_candidate(
            TrainConfig(candidates=("scratch_small",), candidate_options={"scratch_small": {"bank_views": 4}}),
            "scratch_small",
        )
