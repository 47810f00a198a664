"""Input pipeline, training, bottleneck cache, fine-tuning and prediction on a tiny dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml.config import TrainConfig
from ml.data.images import DECODE
from ml.errors import ConfigError, DataError

SIZE = 32
ARTIFACTS = {"model.keras", "labels.json", "preprocessing.json", "history.csv", "train_summary.json"}
MOBILENET = {"alpha": 0.25, "augment": False}


def _config(candidate: str, options: dict[str, Any] | None = None, **kwargs: Any) -> TrainConfig:
    base = {
        "candidates": (candidate,),
        "epochs": 1,
        "image_size": SIZE,
        "batch_size": 8,
        "weights": "none",
        "candidate_options": {candidate: options or {}},
    }
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def scratch_run(
    tiny_dataset: Path, cache_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """scratch_tiny trained for 2 epochs; captures the in-memory model before it is saved."""
    import ml.training.fit as fit

    captured: dict[str, Any] = {}
    original = fit.verify_reload

    def spy(model: Any, path: Path, data: Any) -> float:
        captured["model"] = model
        return original(model, path, data)

    out = tmp_path_factory.mktemp("scratch") / "scratch_tiny"
    mp = pytest.MonkeyPatch()
    mp.setattr(fit, "verify_reload", spy)
    try:
        summary = fit.train_candidate(
            tiny_dataset,
            "scratch_tiny",
            out,
            _config("scratch_tiny", epochs=2, class_weight_threshold=0.5),
            cache_root=cache_root,
        )
    finally:
        mp.undo()
    return {"summary": summary, "out": out, "model": captured["model"]}


@pytest.fixture(scope="module")
def backbone_weights(tiny_dataset: Path, cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A MobileNet (alpha 0.25, 32 px) weights file whose features are not degenerate.

    A randomly initialised backbone in inference mode shrinks activations to ~1e-18 (its
    BatchNormalization layers assume unit variance), so nothing could learn through it. One
    forward pass in training mode with momentum 0 sets every BN layer's moving statistics to
    the batch's: a stand-in for pretrained weights that needs no download.
    """
    import keras

    from ml.data.image_cache import build_image_cache
    from ml.models.layers import ImagePreprocessing
    from ml.models.transfer import build_backbone

    backbone = build_backbone("mobilenet", SIZE, alpha=0.25)
    backbone.trainable = True  # BN updates its statistics only when trainable
    cache = build_image_cache(tiny_dataset, SIZE, cache_root)
    images = ImagePreprocessing(mode="tf")(cache.gather(cache.split_indices("all")).astype(np.float32))
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    backbone(images, training=True)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_calibrated.weights.h5"
    backbone.save_weights(path)
    return str(path)


@pytest.fixture(scope="module")
def transfer_run(
    tiny_dataset: Path, cache_root: Path, backbone_weights: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """transfer_mobilenet (alpha 0.25, no augmentation: bottleneck path), trained once."""
    from ml.training.fit import train_candidate

    out = tmp_path_factory.mktemp("transfer") / "transfer_mobilenet"
    config = _config("transfer_mobilenet", MOBILENET, epochs=2, weights=backbone_weights)
    summary = train_candidate(tiny_dataset, "transfer_mobilenet", out, config, cache_root=cache_root)
    return {"summary": summary, "out": out, "config": config}


# --- input pipeline ----------------------------------------------------------------------------


def test_split_dataset_yields_float_batches(tiny_dataset: Path, cache_root: Path) -> None:
    from ml.data.image_cache import build_image_cache
    from ml.training.input_pipeline import split_dataset

    cache = build_image_cache(tiny_dataset, SIZE, cache_root)
    batches = list(split_dataset(cache, "train", batch_size=10).as_numpy_iterator())

    assert [len(x) for x, _ in batches] == [10, 10, 4]
    images, labels = batches[0]
    assert images.dtype == np.float32 and images.shape == (10, SIZE, SIZE, 3)
    rows = cache.split_indices("train")[:10]
    np.testing.assert_array_equal(images, cache.gather(rows).astype(np.float32))
    np.testing.assert_array_equal(labels, cache.label_indices(rows))


def test_shuffle_is_seeded_and_augmentation_keeps_range(tiny_dataset: Path, cache_root: Path) -> None:
    from ml.data.image_cache import build_image_cache
    from ml.training.input_pipeline import AugmentConfig, split_dataset

    cache = build_image_cache(tiny_dataset, SIZE, cache_root)

    def labels(seed: int) -> list[int]:
        ds = split_dataset(cache, "train", batch_size=24, shuffle=True, seed=seed)
        return [int(v) for v in next(iter(ds))[1]]

    augmented = split_dataset(cache, "train", batch_size=24, shuffle=False, seed=3, augment=AugmentConfig())
    aug_images = next(iter(augmented))[0].numpy()
    plain = cache.gather(cache.split_indices("train")).astype(np.float32)

    assert labels(1) == labels(1)
    assert sorted(labels(1)) == sorted(cache.label_indices(cache.split_indices("train")).tolist())
    assert aug_images.shape == plain.shape and aug_images.dtype == np.float32
    assert aug_images.min() >= 0 and aug_images.max() <= 255
    assert not np.allclose(aug_images, plain)


@pytest.mark.parametrize(
    ("options", "default_on", "expected"),
    [
        ({}, True, "on"),
        ({}, False, None),
        ({"augment": False}, True, None),
        ({"augmentation": {"rotation": 0.2, "flip": False}}, True, "on"),
        (
            {
                "augmentation": {
                    "flip": False,
                    "rotation": 0,
                    "zoom": 0,
                    "translation": 0,
                    "crop": 0,
                    "brightness": 0,
                    "contrast": 0,
                }
            },
            True,
            None,
        ),
    ],
)
def test_augment_options(options: dict[str, Any], default_on: bool, expected: str | None) -> None:
    from ml.training.input_pipeline import AugmentConfig

    result = AugmentConfig.from_options(options, default_on=default_on)
    assert (result is not None) == (expected == "on")


def test_augment_options_reject_unknown_keys() -> None:
    from ml.training.input_pipeline import AugmentConfig

    with pytest.raises(ConfigError, match="unknown augmentation keys \\['hue'\\]"):
        AugmentConfig.from_options({"augmentation": {"hue": 0.1}})
    with pytest.raises(ConfigError, match="rotation must be in"):
        AugmentConfig(rotation=2.0)


@pytest.mark.parametrize(
    ("counts", "threshold", "weighted"),
    [([10, 10, 10], 1.5, False), ([20, 10, 5], 1.5, True), ([20, 10, 5], 5.0, False)],
)
def test_class_weights(counts: list[int], threshold: float, weighted: bool) -> None:
    from ml.training.data import class_weights

    labels = np.repeat(np.arange(len(counts)), counts)
    weights, ratio = class_weights(labels, len(counts), threshold)

    assert ratio == pytest.approx(max(counts) / min(counts))
    assert (weights is not None) == weighted
    if weights:
        # balanced: every class contributes the same total weight
        totals = [weights[i] * c for i, c in enumerate(counts)]
        assert totals == pytest.approx([totals[0]] * len(counts))


# --- training ----------------------------------------------------------------------------------


def test_scratch_training_writes_a_complete_folder(scratch_run: dict[str, Any], tiny_dataset: Path) -> None:
    out, summary = scratch_run["out"], scratch_run["summary"]

    # No staging or checkpoint left behind; TensorBoard event files beside the artifacts.
    assert {p.name for p in out.iterdir()} == ARTIFACTS | {"tensorboard"}
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert json.loads((out / "train_summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (
        json.loads((out / "labels.json").read_text())
        == json.loads((tiny_dataset / "dataset.json").read_text())["labels"]
    )
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep == {
        "image_size": SIZE,
        "color_order": "RGB",
        "input_range": [0, 255],
        "dtype": "float32",
        "resize": "cv2.INTER_AREA, aspect ratio ignored",
        "decode": DECODE,  # what the cache did, for a consumer to do the same
        "preprocess": "tf",
        "architecture": "scratch_tiny",
    }
    history = pd.read_csv(out / "history.csv")
    assert len(history) == summary["epochs_run"] == 2
    assert {"accuracy", "loss", "val_accuracy", "val_loss"} <= set(history.columns)
    assert (
        summary["candidate"] == "scratch_tiny" and summary["kind"] == "scratch" and summary["parent"] is None
    )
    assert 0 <= summary["val_accuracy"] <= 1 and summary["val_loss"] > 0
    assert summary["params"] > 0 and summary["model_bytes"] == (out / "model.keras").stat().st_size
    assert summary["peak_rss_mb"] > 0 and summary["wall_time_s"] > 0
    assert summary["train_images"] == 24 and summary["val_images"] == 6 and summary["image_size"] == SIZE
    assert summary["class_weighted"] is True  # threshold 0.5 < ratio 1.0: the class_weight path ran


def test_saved_model_reloads_safely_and_predicts_the_same(
    scratch_run: dict[str, Any], tiny_dataset: Path, cache_root: Path
) -> None:
    from ml.data.image_cache import build_image_cache
    from ml.models import load_model

    cache = build_image_cache(tiny_dataset, SIZE, cache_root)
    batch = cache.gather(cache.split_indices("test")).astype(np.float32)
    before = np.asarray(scratch_run["model"](batch, training=False))

    after = load_model(scratch_run["out"] / "model.keras").predict(batch, verbose=0)

    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-5)


def test_predict_split(scratch_run: dict[str, Any], tiny_dataset: Path, cache_root: Path) -> None:
    from ml.models import load_model
    from ml.training.predict import predict_split

    y_true, probs, labels = predict_split(
        scratch_run["out"] / "model.keras", tiny_dataset, "test", cache_root=cache_root, batch_size=4
    )

    manifest = pd.read_parquet(tiny_dataset / "manifest.parquet")
    test = manifest[(manifest["split"] == "test") & (manifest["status"] == "ok")].sort_values("path")
    assert labels == sorted(manifest["label"].unique())
    assert [labels[i] for i in y_true] == test["label"].tolist()
    assert probs.shape == (6, 3) and probs.dtype == np.float32
    from ml.data.images import load_resized

    first = load_resized(tiny_dataset / test["path"].iloc[0], SIZE).astype(np.float32)
    direct = load_model(scratch_run["out"] / "model.keras").predict(first[None], verbose=0)[0]
    np.testing.assert_allclose(probs[0], direct, rtol=1e-5, atol=1e-6)


def test_bottleneck_path_for_transfer_without_augmentation(
    transfer_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path
) -> None:
    from ml.data.image_cache import build_image_cache
    from ml.models import load_model
    from ml.models.transfer import HEAD_NAME, feature_extractor
    from ml.training.fit import train_candidate

    first = transfer_run["summary"]
    second = train_candidate(
        tiny_dataset, "transfer_mobilenet", tmp_path / "again", transfer_run["config"], cache_root=cache_root
    )

    assert first["bottleneck"]["hit"] is False and second["bottleneck"]["hit"] is True
    assert first["bottleneck"]["path"] == second["bottleneck"]["path"]
    assert first["bottleneck"]["features"] == [36, 256]
    # The saved full model = preprocessing -> backbone -> head trained on the cached features.
    model = load_model(transfer_run["out"] / "model.keras")
    cache = build_image_cache(tiny_dataset, SIZE, cache_root)
    features = np.load(cache_root / first["bottleneck"]["path"])
    rows = cache.split_indices("val")
    images = cache.gather(rows).astype(np.float32)
    np.testing.assert_allclose(feature_extractor(model).predict(images, verbose=0), features[rows], atol=1e-5)
    np.testing.assert_allclose(
        model.predict(images, verbose=0),
        model.get_layer(HEAD_NAME).predict(features[rows], verbose=0),
        atol=1e-5,
    )
    assert features[rows].std(axis=0).mean() > 1e-3  # calibrated backbone: informative features
    assert first["architecture"] == "mobilenet" and first["augment"] is None
    assert first["weights_id"].startswith("file-")


def test_damaged_bottleneck_cache_is_recomputed(
    transfer_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path
) -> None:
    from ml.training.fit import train_candidate

    path = cache_root / transfer_run["summary"]["bottleneck"]["path"]
    good = np.load(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))

    summary = train_candidate(
        tiny_dataset, "transfer_mobilenet", tmp_path / "again", transfer_run["config"], cache_root=cache_root
    )

    assert summary["bottleneck"]["hit"] is False
    np.testing.assert_allclose(np.load(path), good, atol=1e-6)


def test_finetune_unfreezes_only_from_the_boundary(
    transfer_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path
) -> None:
    import keras

    from ml.models import load_model
    from ml.models.registry import get_architecture
    from ml.models.transfer import find_backbone
    from ml.training.finetune import finetune_candidate, unfreeze_from_boundary

    config = _config(
        "transfer_mobilenet",
        MOBILENET,
        finetune_epochs=1,
        learning_rate=0.05,
        weights=transfer_run["config"].weights,
    )
    summary = finetune_candidate(
        tiny_dataset, transfer_run["out"], tmp_path / "ft", config, cache_root=cache_root
    )

    assert summary["candidate"] == "finetune_mobilenet" and summary["parent"] == "transfer_mobilenet"
    assert summary["kind"] == "finetune" and summary["learning_rate"] == pytest.approx(0.005)
    assert {p.name for p in (tmp_path / "ft").iterdir()} == ARTIFACTS | {"tensorboard"}
    before = find_backbone(load_model(transfer_run["out"] / "model.keras"))
    after = find_backbone(load_model(tmp_path / "ft" / "model.keras"))
    names = [layer.name for layer in before.layers]
    boundary = names.index(get_architecture("mobilenet").finetune_boundary)
    changed = set()
    for i, (old, new) in enumerate(zip(before.layers, after.layers, strict=True)):
        same = all(np.array_equal(a, b) for a, b in zip(old.get_weights(), new.get_weights(), strict=True))
        if isinstance(old, keras.layers.BatchNormalization) or i < boundary:
            assert same, f"{old.name} must stay frozen"
        elif not same:
            changed.add(old.name)
    assert changed, "no layer after the boundary was trained"
    # The trainable flags themselves, on a fresh copy.
    model = load_model(transfer_run["out"] / "model.keras", compile=False)
    unfrozen = unfreeze_from_boundary(model, get_architecture("mobilenet"))
    backbone = find_backbone(model)
    assert unfrozen and unfrozen[0] == "conv_dw_12"
    assert all(
        not layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert all(not layer.trainable for layer in backbone.layers[:boundary])


def test_finetune_needs_a_complete_transfer_folder(
    scratch_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path
) -> None:
    from ml.training.finetune import finetune_candidate

    with pytest.raises(DataError, match="not a complete candidate folder"):
        finetune_candidate(
            tiny_dataset, tmp_path, tmp_path / "ft", _config("transfer_mobilenet"), cache_root=cache_root
        )
    with pytest.raises(ConfigError, match="only transfer candidates"):
        finetune_candidate(
            tiny_dataset,
            scratch_run["out"],
            tmp_path / "ft",
            _config("transfer_mobilenet"),
            cache_root=cache_root,
        )


def test_failed_training_leaves_no_artifacts(
    tiny_dataset: Path, cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ml.training.fit as fit

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("worker killed mid-epoch")

    monkeypatch.setattr(fit, "fit_model", killed)
    out = tmp_path / "scratch_tiny"
    dead = out / ".staging-999999999-deadbeef"  # left by a SIGKILLed attempt (no such pid)
    dead.mkdir(parents=True)
    (dead / "model.keras").write_bytes(b"half")
    with pytest.raises(KeyboardInterrupt):
        fit.train_candidate(tiny_dataset, "scratch_tiny", out, _config("scratch_tiny"), cache_root=cache_root)

    assert list(out.iterdir()) == []


def test_train_candidate_rejects_finetune_and_unknown_names(
    tiny_dataset: Path, cache_root: Path, tmp_path: Path
) -> None:
    from ml.errors import UnknownArchitectureError
    from ml.training.fit import train_candidate

    with pytest.raises(ConfigError, match="finetune_candidate"):
        train_candidate(
            tiny_dataset, "finetune_mobilenet", tmp_path, _config("scratch_tiny"), cache_root=cache_root
        )
    with pytest.raises(UnknownArchitectureError, match="known:"):
        train_candidate(
            tiny_dataset, "scratch_enormous", tmp_path, _config("scratch_tiny"), cache_root=cache_root
        )


def _count_options_for(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every TrainConfig.options_for call: the options are resolved once, by CandidateSettings."""
    calls: list[str] = []
    original = TrainConfig.options_for

    def counting(self: TrainConfig, candidate: str) -> dict[str, Any]:
        calls.append(candidate)
        return original(self, candidate)

    monkeypatch.setattr(TrainConfig, "options_for", counting)
    return calls


def _stop_at_fit(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt("stop once the model is built")


def test_train_candidate_resolves_the_options_once(
    tiny_dataset: Path, cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ml.training.fit as fit

    calls = _count_options_for(monkeypatch)
    monkeypatch.setattr(fit, "fit_model", _stop_at_fit)
    with pytest.raises(KeyboardInterrupt):
        fit.train_candidate(
            tiny_dataset, "scratch_tiny", tmp_path / "out", _config("scratch_tiny", {"depth": 2}), cache_root=cache_root
        )

    assert calls == ["scratch_tiny"]


def test_finetune_resolves_its_own_and_its_parents_options_once(
    transfer_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ml.training.fit as fit
    from ml.training.finetune import finetune_candidate

    calls = _count_options_for(monkeypatch)
    monkeypatch.setattr(fit, "fit_model", _stop_at_fit)
    with pytest.raises(KeyboardInterrupt):
        finetune_candidate(tiny_dataset, transfer_run["out"], tmp_path / "ft", transfer_run["config"],
                           cache_root=cache_root)

    assert sorted(calls) == ["finetune_mobilenet", "transfer_mobilenet"]


# --- augmented bottleneck bank, fine-tuning against its parent ----------------------------------


def test_transfer_with_augmentation_trains_its_head_on_the_bank(
    transfer_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.training.fit import train_candidate

    options = {"alpha": 0.25, "bank_views": 2, "epochs": 2}  # augmentation on: the default
    config = _config("transfer_mobilenet", options, weights=transfer_run["config"].weights)
    with caplog.at_level(logging.INFO, logger="ml.training.fit"):
        first = train_candidate(tiny_dataset, "transfer_mobilenet", tmp_path / "a", config, cache_root=cache_root)
    second = train_candidate(tiny_dataset, "transfer_mobilenet", tmp_path / "b", config, cache_root=cache_root)

    info = first["bottleneck"]
    assert info["source"] == "bank" and info["bank_views"] == 2 and first["augment"] is not None
    assert info["bank"] == [3, 24, 256]  # (2 views + un-augmented) x 24 train images x 256 features
    assert info["bank_hit"] is False and second["bottleneck"]["bank_hit"] is True
    assert second["bottleneck"]["bank_path"] == info["bank_path"]
    # Same un-augmented features as the bottleneck cache of the run without augmentation.
    assert info["path"] == transfer_run["summary"]["bottleneck"]["path"]
    assert "frozen phase trains the head on the augmented bottleneck bank" in caplog.text
    assert first["val_accuracy"] == pytest.approx(second["val_accuracy"])  # same seed, same views


def test_finetune_worse_than_its_parent_is_flagged(
    transfer_run: dict[str, Any], tiny_dataset: Path, cache_root: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    import ml.training.fit as fit
    from ml.training.finetune import finetune_candidate

    real_fit = fit.fit_model

    def overfitted(*args: Any, **kwargs: Any) -> tuple[dict[str, list[float]], dict[str, float]]:
        history, _ = real_fit(*args, **kwargs)
        return history, {"accuracy": 0.0, "loss": 50.0}  # what an overfitted fine-tune scores on val

    monkeypatch.setattr(fit, "fit_model", overfitted)
    config = _config("transfer_mobilenet", MOBILENET, finetune_epochs=1, weights=transfer_run["config"].weights)
    with caplog.at_level(logging.WARNING, logger="ml.training.finetune"):
        summary = finetune_candidate(tiny_dataset, transfer_run["out"], tmp_path / "ft", config, cache_root=cache_root)

    parent = transfer_run["summary"]
    assert summary["vs_parent"]["worse"] is True
    assert summary["vs_parent"]["val_accuracy_delta"] == pytest.approx(-parent["val_accuracy"])
    assert summary["parent_val_loss"] == parent["val_loss"]
    assert "finetune_mobilenet is worse on validation than its parent transfer_mobilenet" in caplog.text


@pytest.mark.parametrize(
    ("val", "worse"),
    [
        ({"accuracy": 0.80, "loss": 0.4}, True),
        ({"accuracy": 0.85, "loss": 0.6}, True),  # same accuracy, higher loss
        ({"accuracy": 0.85, "loss": 0.4}, False),
        ({"accuracy": 0.90, "loss": 0.9}, False),
        ({}, False),  # no val rows: nothing to compare
    ],
)
def test_compare_with_parent(val: dict[str, float], worse: bool) -> None:
    from ml.training.finetune import compare_with_parent

    result = compare_with_parent(val, {"val_accuracy": 0.85, "val_loss": 0.5})

    assert result["worse"] is worse
    if val:
        assert result["val_accuracy_delta"] == pytest.approx(val["accuracy"] - 0.85)
