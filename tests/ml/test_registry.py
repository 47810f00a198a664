"""The architecture registry, the preprocessing layer, model builders and weights resolution."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.errors import ConfigError, UnknownArchitectureError
from ml.models import registry
from ml.models.registry import (
    ArchitectureSpec,
    architecture_names,
    candidate_names,
    get_architecture,
    parse_candidate,
)

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {
    "mobilenet",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_b0",
    "resnet50_v2",
    "inception_v3",
    "xception",
    "densenet121",
    "vgg16",
}


def test_registry_import_does_not_import_tensorflow() -> None:
    code = (
        "import sys, ml.models.registry as r, ml.models, ml.models.weights, ml.models.layers, "
        "ml.models.scratch, ml.models.transfer, ml.training.fit, ml.training.finetune, "
        "ml.training.bottleneck, ml.training.predict, ml.training.hardware, ml.training.input_pipeline, "
        "ml.training.settings, ml.training.callbacks, ml.training.data, ml.training.resources, "
        "ml.data.image_cache; r.candidate_names(); r.parse_candidate('transfer_mobilenet_v2'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_required_architectures_and_candidates() -> None:
    assert REQUIRED <= set(architecture_names())
    names = candidate_names()
    assert {"scratch_small", "scratch_tiny", "scratch_residual", "transfer_mobilenet_v2"} <= set(names)
    assert all(n.startswith(("scratch_", "transfer_")) for n in names)
    assert "finetune_mobilenet_v2" in candidate_names(include_finetune=True)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scratch_small", ("scratch", "small")),
        ("transfer_mobilenet_v2", ("transfer", "mobilenet_v2")),
        ("finetune_inception_v3", ("finetune", "inception_v3")),
        ("transfer_efficientnet_v2_b0", ("transfer", "efficientnet_v2_b0")),
    ],
)
def test_parse_candidate(name: str, expected: tuple[str, str]) -> None:
    assert parse_candidate(name) == expected


@pytest.mark.parametrize("name", ["transfer_nope", "scratch_huge", "mobilenet_v2", "", "finetune_"])
def test_unknown_candidate_lists_known_ones(name: str) -> None:
    with pytest.raises(UnknownArchitectureError, match="known: .*transfer_mobilenet_v2"):
        parse_candidate(name)


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        get_architecture("resnet9000")
    assert "resnet9000" in str(info.value) and "mobilenet_v2" in str(info.value)
    assert get_architecture("transfer_vgg16").constructor == "VGG16"


def test_duplicate_registration_raises() -> None:
    spec = get_architecture("vgg16")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_architecture(spec)
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_scratch(registry.get_scratch_variant("small"))


@pytest.mark.parametrize(
    ("arch", "size", "alpha", "expected"),
    [
        ("mobilenet", 32, 0.25, "mobilenet_2_5_224_tf_no_top.h5"),
        ("mobilenet", 128, 1.0, "mobilenet_1_0_128_tf_no_top.h5"),
        ("mobilenet_v2", 96, 0.35, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"),
        ("mobilenet_v2", 100, None, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
        ("mobilenet_v3_small", 96, None, "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
        ("efficientnet_v2_b0", 96, None, "efficientnetv2-b0_notop.h5"),
        ("inception_v3", 299, None, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ],
)
def test_weights_file_names(arch: str, size: int, alpha: float | None, expected: str) -> None:
    assert get_architecture(arch).weights_file_name(size, alpha) == expected


def test_alpha_rules() -> None:
    with pytest.raises(ConfigError, match="no 'alpha' option"):
        get_architecture("vgg16").resolve_alpha(0.5)
    with pytest.raises(ConfigError, match="ImageNet weights only for alpha"):
        get_architecture("mobilenet_v2").weights_file_name(96, 0.3)
    with pytest.raises(ConfigError, match="image_size >= 75"):
        get_architecture("inception_v3").check_size(64)


# Every entry at its minimum size takes ~0.3-2 s to build, so none is marked slow.
@pytest.mark.parametrize("arch", architecture_names())
def test_every_architecture_builds_with_its_boundary(arch: str) -> None:
    import keras

    spec = get_architecture(arch)
    size = spec.min_size
    backbone = spec.build_backbone(size, weights=None)

    names = [layer.name for layer in backbone.layers]
    assert spec.finetune_boundary in names
    assert backbone.output_shape[0] is None and len(backbone.output_shape) == 4
    assert isinstance(backbone, keras.Model)
    x = np.zeros((1, size, size, 3), dtype="float32")
    assert tuple(backbone(x, training=False).shape) == (1, *backbone.output_shape[1:])


@pytest.mark.parametrize(
    "mode_arch", [("tf", "mobilenet_v2"), ("torch", "densenet"), ("caffe", "vgg16"), ("caffe", "resnet50")]
)
def test_image_preprocessing_matches_keras(mode_arch: tuple[str, str]) -> None:
    import keras

    from ml.models.layers import ImagePreprocessing

    mode, module = mode_arch
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = getattr(keras.applications, module).preprocess_input(x.copy())

    got = keras.ops.convert_to_numpy(ImagePreprocessing(mode=mode)(x))

    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_image_preprocessing_none_and_bad_mode() -> None:
    from ml.models.layers import ImagePreprocessing

    x = np.arange(24, dtype="float32").reshape(1, 2, 4, 3)
    np.testing.assert_array_equal(np.asarray(ImagePreprocessing(mode="none")(x)), x)
    with pytest.raises(ConfigError, match="mode must be one of"):
        ImagePreprocessing(mode="imagenet")


@pytest.mark.parametrize("variant", ["tiny", "small", "residual"])
def test_scratch_models_build_and_round_trip(variant: str, tmp_path: Path) -> None:
    from ml.models import load_model
    from ml.models.scratch import build_scratch

    model = build_scratch(variant, 3, 32, {"width": 4} if variant != "tiny" else None)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")

    after = load_model(tmp_path / "m.keras").predict(x, verbose=0)

    assert before.shape == (2, 3)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_scratch_rejects_bad_options() -> None:
    from ml.models.scratch import build_scratch

    with pytest.raises(ConfigError, match="unknown option 'depht'"):
        build_scratch("small", 3, 32, {"depht": 3})
    with pytest.raises(ConfigError, match="halves a 32 px input"):
        build_scratch("small", 3, 32, {"depth": 6})


def test_transfer_model_layout(tmp_path: Path) -> None:
    from ml.models import load_model
    from ml.models.transfer import build_transfer, find_backbone

    model = build_transfer("mobilenet_v2", 3, 32, options={"alpha": 0.35, "head_units": 8})
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    model.save(tmp_path / "t.keras")

    loaded = load_model(tmp_path / "t.keras")

    assert not find_backbone(loaded).trainable
    assert loaded.get_layer("preprocess").mode == "tf"
    assert loaded.get_layer("head").get_layer("head_dense").units == 8
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-5, atol=1e-6)


def test_load_model_refuses_missing_and_bad_files(tmp_path: Path) -> None:
    from ml.errors import ModelVerificationError
    from ml.models import load_model

    with pytest.raises(ModelVerificationError, match="does not exist"):
        load_model(tmp_path / "nope.keras")
    (tmp_path / "bad.keras").write_bytes(b"garbage")
    with pytest.raises(ModelVerificationError, match="cannot load"):
        load_model(tmp_path / "bad.keras")


# --- weights -----------------------------------------------------------------------------------


def test_weights_none_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ml.models.weights import resolve_weights

    with caplog.at_level(logging.WARNING, logger="ml.models.weights"):
        assert resolve_weights("none", "mobilenet", 32, cache_dir=tmp_path) is None
    assert "NOT PRETRAINED" in caplog.text


def test_weights_imagenet_offline_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.models import weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def offline(self: ArchitectureSpec, *args: object, **kwargs: object) -> None:
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(ArchitectureSpec, "build_backbone", offline)
    with pytest.raises(ConfigError) as info:
        weights.resolve_weights("imagenet", "mobilenet_v2", 96, cache_dir=tmp_path, alpha=0.35)
    message = str(info.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5" in message
    assert str(tmp_path / "keras_home" / "models") in message


def test_weights_imagenet_cached_file_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.models import weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    assert weights.resolve_weights("imagenet", "vgg16", 64, cache_dir=tmp_path) == "imagenet"


def test_weights_local_file_loads_into_a_fresh_backbone(tmp_path: Path) -> None:
    from ml.models.transfer import build_backbone
    from ml.models.weights import resolve_weights

    source = build_backbone("mobilenet", 32, alpha=0.25)
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)

    resolved = resolve_weights(str(path), "mobilenet", 32, cache_dir=tmp_path)
    target = build_backbone("mobilenet", 32, alpha=0.25, weights=resolved)

    assert resolved == str(path.resolve())
    for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.h5"), "mobilenet", 32, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="must end with"):
        resolve_weights(str(tmp_path / "weights.bin"), "mobilenet", 32, cache_dir=tmp_path)


class _FakeBucket:
    def __init__(self, objects: dict[str, bytes], calls: list[str]) -> None:
        self.objects, self.calls = objects, calls

    def download_file(self, key: str, path: str) -> None:
        self.calls.append(key)
        Path(path).write_bytes(self.objects[key])


class _FakeStore:
    """Stands in for the object-store client (the real one is tested against SeaweedFS)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.calls, self.buckets = objects, [], []

    def for_bucket(self, bucket: str) -> _FakeBucket:
        self.buckets.append(bucket)
        return _FakeBucket(self.objects, self.calls)


def test_weights_s3_downloaded_once_and_redownloaded_when_damaged(tmp_path: Path) -> None:
    from ml.models.weights import resolve_weights

    store = _FakeStore({"w/backbone.weights.h5": b"weights-bytes"})
    first = resolve_weights(
        "s3://models/w/backbone.weights.h5", "mobilenet", 32, store=store, cache_dir=tmp_path
    )
    second = resolve_weights(
        "s3://models/w/backbone.weights.h5", "mobilenet", 32, store=store, cache_dir=tmp_path
    )
    Path(first).write_bytes(b"damaged")
    third = resolve_weights(
        "s3://models/w/backbone.weights.h5", "mobilenet", 32, store=store, cache_dir=tmp_path
    )

    assert first == second == third
    assert store.buckets[0] == "models" and store.calls == ["w/backbone.weights.h5"] * 2
    assert Path(third).read_bytes() == b"weights-bytes"
    with pytest.raises(ConfigError, match="no object-store client"):
        resolve_weights("s3://models/w/backbone.weights.h5", "mobilenet", 32, cache_dir=tmp_path)


def test_weights_from_a_real_object_store(store: Any, tmp_path: Path) -> None:
    from ml.models.transfer import build_backbone
    from ml.models.weights import resolve_weights

    source = build_backbone("mobilenet", 32, alpha=0.25)
    source.save_weights(tmp_path / "b.weights.h5")
    store.put_file("weights/mobilenet.weights.h5", tmp_path / "b.weights.h5")
    uri = f"s3://{store.bucket}/weights/mobilenet.weights.h5"

    resolved = resolve_weights(uri, "mobilenet", 32, store=store, cache_dir=tmp_path / "cache")
    target = build_backbone("mobilenet", 32, alpha=0.25, weights=resolved)

    assert Path(resolved).is_relative_to(tmp_path / "cache")
    for a, b in zip(source.get_weights(), target.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("mobilenet_2_5_224_tf_no_top.h5", [("mobilenet", 0.25, 224)]),
        ("mobilenet_1_0_128_tf_no_top.h5", [("mobilenet", 1.0, 128)]),
        ("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5", [("mobilenet_v2", 0.35, 96)]),
        ("efficientnetv2-b0_notop.h5", [("efficientnet_v2_b0", None, 224)]),
        ("backbone.weights.h5", []),
    ],
)
def test_imagenet_builds_for_file_names_the_build_a_keras_file_was_made_for(
    file_name: str, expected: list[tuple[str, float | None, int]]
) -> None:
    assert registry.imagenet_builds_for_file(file_name) == expected
    for arch, alpha, size in expected:
        assert get_architecture(arch).weights_file_name(size, alpha) == file_name


def test_a_keras_file_that_does_not_fit_says_which_candidate_settings_it_was_made_for(tmp_path: Path) -> None:
    from ml.models.transfer import build_backbone

    path = tmp_path / "mobilenet_2_5_224_tf_no_top.h5"  # the name Keras gives MobileNet v1 alpha 0.25's file
    build_backbone("mobilenet", 32, alpha=0.25).save(path)  # legacy HDF5, as Keras publishes them
    build_backbone("mobilenet", 32, alpha=0.25, weights=str(path))  # fits the build it was made for

    with pytest.raises(ConfigError) as info:
        build_backbone("mobilenet_v2", 96, weights=str(path))
    message = str(info.value)
    assert "does not fit mobilenet_v2 at 96px" in message
    assert "Keras' ImageNet file for mobilenet alpha 0.25 at 224 px" in message
    options = "{transfer_mobilenet: {alpha: 0.25, image_size: 224}}"
    assert f"train candidate transfer_mobilenet with train.candidate_options {options}" in message
