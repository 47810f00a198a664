"""Serving exports: SavedModel and TFLite agree with model.keras on golden inputs, or are refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from ml.errors import ModelVerificationError
from ml.registry import exports as ex

SIZE = 32
LABELS = ["blue_square", "green_bar", "red_disc"]


def _model_folder(folder: Path, seed: int) -> Path:
    """A tiny model (preprocessing layer + conv + softmax) with labels.json and preprocessing.json."""
    import keras

    from ml.models.layers import custom_objects

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = custom_objects()["ImagePreprocessing"](mode="tf")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    folder.mkdir(parents=True, exist_ok=True)
    keras.Model(inputs, outputs).save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(LABELS))
    (folder / "preprocessing.json").write_text(json.dumps(
        {"image_size": SIZE, "color_order": "RGB", "input_range": [0, 255], "dtype": "float32"}))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict:
    """Model A with its exports (one TFLite conversion), and model B's SavedModel and TFLite."""
    root = tmp_path_factory.mktemp("exports")
    model_a = _model_folder(root / "a", seed=1)
    model_b = _model_folder(root / "b", seed=2)
    golden = ex.golden_images(tiny_dataset, SIZE, root / "cache")
    exports = ex.build_exports(model_a / "model.keras", root / "a_exports", golden_images=golden)
    other_zip = ex.export_saved_model(_load(model_b), root / "b_exports" / ex.SAVED_MODEL_FILE)
    other = {ex.SAVED_MODEL_FILE: other_zip,
             ex.TFLITE_FILE: ex.convert_tflite(other_zip, root / "b_exports" / ex.TFLITE_FILE)}
    return {"a": model_a, "b": model_b, "golden": golden, "exports": exports, "other": other, "root": root}


def _load(folder: Path):
    from ml.models import load_model

    return load_model(folder / "model.keras")


def _copy_exports(built: dict, dest: Path) -> Path:
    dest.mkdir()
    for name, path in built["exports"].items():
        shutil.copy(path, dest / name)
    shutil.copy(built["a"] / "model.keras", dest / "model.keras")
    return dest


def test_build_exports_writes_every_artifact(built: dict) -> None:
    exports = built["exports"]

    assert set(exports) == {ex.SAVED_MODEL_FILE, ex.TFLITE_FILE, ex.GOLDEN_FILE}
    assert all(p.stat().st_size > 0 for p in exports.values())
    golden = ex.load_golden(exports[ex.GOLDEN_FILE])
    assert golden["inputs"].shape == (6, SIZE, SIZE, 3) and golden["inputs"].dtype == np.float32
    assert golden["expected"].shape == (6, len(LABELS))
    assert golden["labels"] == LABELS
    np.testing.assert_array_equal(golden["inputs"], built["golden"].astype(np.float32))
    with np.load(exports[ex.GOLDEN_FILE]) as raw:
        assert raw["inputs"].dtype == np.uint8  # cache pixels are stored losslessly, 4x smaller


def test_exports_agree_with_the_keras_model(built: dict) -> None:
    result = ex.verify_exports(built["exports"], model_path=built["a"] / "model.keras")

    assert set(result["checked"]) == {"model.keras", ex.SAVED_MODEL_FILE, ex.TFLITE_FILE}
    for check in result["checked"].values():
        assert check["max_abs_diff"] <= ex.DEFAULT_ATOL
        assert check["top1_agreement"] == 1.0


def test_verify_exports_reads_a_folder(built: dict, tmp_path: Path) -> None:
    folder = _copy_exports(built, tmp_path / "version")

    result = ex.verify_exports(folder)

    assert set(result["checked"]) == {"model.keras", ex.SAVED_MODEL_FILE, ex.TFLITE_FILE}


@pytest.mark.parametrize("name", [ex.SAVED_MODEL_FILE, ex.TFLITE_FILE])
def test_export_of_another_model_is_refused_by_name(built: dict, tmp_path: Path, name: str) -> None:
    folder = _copy_exports(built, tmp_path / "version")
    shutil.copy(built["other"][name], folder / name)

    with pytest.raises(ModelVerificationError, match=rf"^{name.replace('.', r'[.]')} .*disagrees"):
        ex.verify_exports(folder)


def test_golden_of_another_model_is_refused(built: dict, tmp_path: Path) -> None:
    folder = _copy_exports(built, tmp_path / "version")
    ex.write_golden(_load(built["b"]), built["golden"], folder / ex.GOLDEN_FILE)

    with pytest.raises(ModelVerificationError, match=r"^model[.]keras .*disagrees"):
        ex.verify_exports(folder)


def test_damaged_saved_model_archive_is_refused(built: dict, tmp_path: Path) -> None:
    folder = _copy_exports(built, tmp_path / "version")
    (folder / ex.SAVED_MODEL_FILE).write_bytes(b"not a zip")

    with pytest.raises(ModelVerificationError, match=r"saved_model[.]zip.*not a readable zip"):
        ex.verify_exports(folder)


def test_missing_golden_is_refused(built: dict, tmp_path: Path) -> None:
    folder = _copy_exports(built, tmp_path / "version")
    (folder / ex.GOLDEN_FILE).unlink()

    with pytest.raises(ModelVerificationError, match="golden.npz is missing"):
        ex.verify_exports(folder)


def test_verify_runtime_round_trip_through_the_predictor(built: dict) -> None:
    from ml.serving.predictor import load_local

    predictor = load_local(built["a"])

    result = ex.verify_runtime(predictor.predict_proba, built["exports"][ex.GOLDEN_FILE], name="predictor")

    assert result["n"] == 6 and result["max_abs_diff"] <= ex.DEFAULT_ATOL


def test_predictor_runtimes_agree_with_model_keras(built: dict, tmp_path: Path) -> None:
    from ml.serving.predictor import load_local

    folder = tmp_path / "with_tflite"
    shutil.copytree(built["a"], folder)
    shutil.copy(built["exports"][ex.TFLITE_FILE], folder / ex.TFLITE_FILE)
    golden = ex.load_golden(built["exports"][ex.GOLDEN_FILE])
    inputs = list(golden["inputs"])

    compiled, tflite = load_local(folder), load_local(folder, runtime="tflite")
    # Batch shapes change between calls (the interpreter re-allocates only then).
    by_tflite = [tflite.predict_proba(inputs), tflite.predict_proba(inputs[:1]), tflite.predict_proba(inputs)]

    assert tflite.runtime == "tflite" and compiled.runtime == "compiled"
    np.testing.assert_allclose(compiled.predict_proba(inputs), golden["expected"], atol=1e-5)
    np.testing.assert_allclose(by_tflite[0], golden["expected"], atol=ex.DEFAULT_ATOL)
    np.testing.assert_allclose(by_tflite[1], golden["expected"][:1], atol=ex.DEFAULT_ATOL)
    np.testing.assert_array_equal(by_tflite[2], by_tflite[0])
    assert ex.verify_runtime(tflite.predict_proba, built["exports"][ex.GOLDEN_FILE], name="tflite")["ok"]


def test_verify_runtime_refuses_a_runtime_that_drifts(built: dict) -> None:
    from ml.serving.predictor import load_local

    predictor = load_local(built["b"])  # another model behind the same interface

    with pytest.raises(ModelVerificationError, match="^phone app disagrees"):
        ex.verify_runtime(predictor.predict_proba, built["exports"][ex.GOLDEN_FILE], name="phone app")


@pytest.mark.parametrize(
    ("actual", "ok"),
    [
        ([[0.4996, 0.5004, 0.0]], True),  # a tie within atol: top-1 may flip without a disagreement
        ([[0.6, 0.4, 0.0]], False),  # same top-1, probabilities drift by 0.1
        ([[0.2, 0.8, 0.0]], False),  # top-1 flips on a clear decision
        ([[0.5, 0.5]], False),  # wrong number of classes
    ],
)
def test_compare_to_golden(actual: list, ok: bool) -> None:
    expected = np.array([[0.5, 0.5, 0.0]], np.float32) if ok else np.array([[0.7, 0.3, 0.0]], np.float32)
    if ok:
        assert ex.compare_to_golden("rt", expected, actual)["ok"]
    else:
        with pytest.raises(ModelVerificationError, match="^rt"):
            ex.compare_to_golden("rt", expected, actual)


def test_failed_tflite_conversion_is_skipped_with_a_warning(
    built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(saved_model: Path, dest: Path) -> Path:
        dest.write_bytes(b"partial")
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(ex, "convert_tflite", broken)

    with caplog.at_level(logging.WARNING, logger="ml.registry.exports"):
        exports = ex.build_exports(built["a"] / "model.keras", tmp_path, golden_images=built["golden"][:2])

    assert set(exports) == {ex.SAVED_MODEL_FILE, ex.GOLDEN_FILE}
    assert not (tmp_path / ex.TFLITE_FILE).exists()
    assert "converter exploded" in caplog.text
    assert set(ex.verify_exports(exports, model_path=built["a"] / "model.keras")["checked"]) == {
        "model.keras", ex.SAVED_MODEL_FILE}


def test_golden_images_are_deterministic_and_from_the_test_split(built: dict, tiny_dataset: Path) -> None:
    from ml.data.image_cache import build_image_cache

    cache = build_image_cache(tiny_dataset, SIZE, built["root"] / "cache")
    test_rows = cache.split_indices("test")
    by_sha = test_rows[np.argsort(cache.index["sha256"].to_numpy()[test_rows].astype(str))]

    first = ex.golden_images(tiny_dataset, SIZE, built["root"] / "cache", n=4)

    np.testing.assert_array_equal(first, cache.gather(by_sha[:4]))
    np.testing.assert_array_equal(first, ex.golden_images(tiny_dataset, SIZE, built["root"] / "cache", n=4))
