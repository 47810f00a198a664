"""Serving from a real SeaweedFS: fetch once, verify every load, refuse tampering, keep serving."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ml.errors import DataError, ModelVerificationError, StorageError
from ml.registry import versions as v
from ml.registry.store import ObjectStore
from ml.serving import predictor as serving
from ml.serving.predictor import ModelClient, load_local, load_production, load_version

MODEL = "pets"
LABELS = ["cat", "dog", "fox"]
SIZE = 32


def _build_model(seed: int, n_classes: int = 3):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two model folders (different weights) and one whose outputs disagree with its labels."""
    out = {}
    for name, seed, n in (("a", 1, 3), ("b", 2, 3), ("wrong_units", 3, 5)):
        folder = tmp_path_factory.mktemp(f"model_{name}")
        _build_model(seed, n).save(folder / "model.keras")
        (folder / "labels.json").write_text(json.dumps(LABELS))
        (folder / "preprocessing.json").write_text(
            json.dumps(
                {"image_size": SIZE, "color_order": "RGB", "input_range": [0, 255], "dtype": "float32"}
            )
        )
        out[name] = folder
    return out


def _files(folder: Path) -> dict[str, Path]:
    return {n: folder / n for n in ("model.keras", "labels.json", "preprocessing.json")}


def _publish_and_promote(store: ObjectStore, folder: Path, version: str) -> dict:
    v.publish_version(store, MODEL, version, _files(folder), {"labels": LABELS, "metrics": {"accuracy": 0.5}})
    _, etag = v.read_pointer(store, MODEL)
    return v.promote(store, MODEL, version, expected_etag=etag, actor="test", reason="test")


def _image(tmp_path: Path, color: tuple[int, int, int], name: str = "img.png") -> Path:
    import cv2

    rgb = np.zeros((50, 70, 3), np.uint8)
    rgb[:] = color
    path = tmp_path / name
    cv2.imwrite(str(path), rgb[:, :, ::-1])  # OpenCV writes BGR
    return path


def test_load_production_predicts_with_training_preprocessing(
    store: ObjectStore, model_dirs: dict, tmp_path: Path
) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    img = _image(tmp_path, (200, 10, 30))

    predictor = load_production(store, MODEL, cache_dir=tmp_path / "cache")
    top = predictor.predict([img, np.full((20, 20, 3), 128, np.uint8)], top_k=2)
    probs = predictor.predict_proba([img])

    reference = _build_model(1)  # same seed, same weights: the expected output by hand
    by_hand = np.asarray(reference(np.full((1, SIZE, SIZE, 3), (200, 10, 30), np.float32)))
    assert predictor.version == "v1" and predictor.labels == LABELS and predictor.image_size == SIZE
    assert predictor.model_path == tmp_path / "cache" / MODEL / "v1" / "model.keras"
    assert np.allclose(probs, by_hand, atol=1e-5)
    assert len(top) == 2 and len(top[0]) == 2
    assert top[0][0]["label"] == LABELS[int(np.argmax(probs[0]))]
    assert top[0][0]["probability"] >= top[0][1]["probability"]
    assert (tmp_path / "cache" / MODEL / "v1" / "model.keras").is_file()


def test_second_load_uses_cache_but_still_verifies(
    store: ObjectStore, model_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    load_production(store, MODEL, cache_dir=tmp_path)
    downloads: list[str] = []
    real_download = ObjectStore.download_file
    monkeypatch.setattr(
        ObjectStore,
        "download_file",
        lambda self, key, path: downloads.append(key) or real_download(self, key, path),
    )
    checked: list[str] = []
    real_verify = serving._verify_files
    monkeypatch.setattr(
        serving, "_verify_files", lambda *a, **k: checked.append(k["where"]) or real_verify(*a, **k)
    )

    again = load_production(store, MODEL, cache_dir=tmp_path)

    assert again.version == "v1"
    assert downloads == []
    assert checked == [f"{MODEL} version v1 (cached)"]


def test_tampered_cache_is_discarded_and_fetched_again(
    store: ObjectStore, model_dirs: dict, tmp_path: Path
) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    first = load_production(store, MODEL, cache_dir=tmp_path)
    cached = tmp_path / MODEL / "v1" / "model.keras"
    cached.write_bytes((model_dirs["b"] / "model.keras").read_bytes())

    again = load_production(store, MODEL, cache_dir=tmp_path)

    assert again.sha256 == first.sha256
    assert cached.read_bytes() == (model_dirs["a"] / "model.keras").read_bytes()


def test_client_refuses_tampered_new_version_and_keeps_serving_the_old(
    store: ObjectStore, model_dirs: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    client = ModelClient(store, MODEL, cache_dir=tmp_path)
    assert client.refresh().version == "v1"
    _publish_and_promote(store, model_dirs["b"], "v2")
    # someone overwrites the stored model with a plain (unconditional) put
    store.put_bytes(f"{MODEL}/versions/v2/model.keras", (model_dirs["a"] / "model.keras").read_bytes())

    with caplog.at_level(logging.ERROR, logger="ml.serving.predictor"):
        serving_now = client.refresh()

    assert serving_now.version == "v1"
    assert "model.keras has sha256" in client.last_error and "refusing to load it" in client.last_error
    assert "keeping version v1 in service" in caplog.text
    assert not (tmp_path / MODEL / "v2").exists()  # unverified bytes never stay in the cache
    with pytest.raises(ModelVerificationError, match="refusing to load it"):
        load_version(store, MODEL, "v2", cache_dir=tmp_path)


def test_client_follows_a_good_promotion(store: ObjectStore, model_dirs: dict, tmp_path: Path) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    client = ModelClient(store, MODEL, cache_dir=tmp_path)
    before = client.predict([np.zeros((SIZE, SIZE, 3), np.uint8)])
    _publish_and_promote(store, model_dirs["b"], "v2")

    after = client.refresh()

    assert after.version == "v2" and client.last_error is None
    assert before[0][0]["label"] in LABELS


def test_client_without_production_model_raises(store: ObjectStore, tmp_path: Path) -> None:
    client = ModelClient(store, MODEL, cache_dir=tmp_path)

    with pytest.raises(ModelVerificationError, match="no production model yet"):
        client.refresh()


def test_pointer_sha_disagreeing_with_version_is_refused(
    store: ObjectStore, model_dirs: dict, tmp_path: Path
) -> None:
    pointer = _publish_and_promote(store, model_dirs["a"], "v1")
    forged = {k: val for k, val in pointer.items() if k != "etag"} | {"sha256": "f" * 64}
    store.put_json(f"{MODEL}/production.json", forged)

    with pytest.raises(ModelVerificationError, match="production.json says f{64}"):
        load_production(store, MODEL, cache_dir=tmp_path)


def test_incomplete_version_cannot_be_loaded(store: ObjectStore, model_dirs: dict, tmp_path: Path) -> None:
    store.put_file(f"{MODEL}/versions/half/model.keras", model_dirs["a"] / "model.keras")

    with pytest.raises(ModelVerificationError, match="no COMPLETE marker"):
        load_version(store, MODEL, "half", cache_dir=tmp_path)


def test_load_local_and_output_label_mismatch(model_dirs: dict) -> None:
    local = load_local(model_dirs["a"] / "model.keras")

    assert local.version is None and local.labels == LABELS
    assert (
        local.predict([np.zeros((8, 8), np.uint8)], top_k=10)[0][0]["label"] in LABELS
    )  # grayscale ok, k capped
    with pytest.raises(ModelVerificationError, match="5 outputs but labels.json lists 3 classes"):
        load_local(model_dirs["wrong_units"])


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((10, 10, 4), np.uint8), r"shape \(H, W, 3\)"),
        (np.full((10, 10, 3), 300.0), r"must be in \[0, 255\]"),
    ],
)
def test_bad_input_arrays_are_rejected(model_dirs: dict, image: np.ndarray, match: str) -> None:
    predictor = load_local(model_dirs["a"])

    with pytest.raises(DataError, match=match):
        predictor.predict_proba([image])


# -- a hostile store: names and sizes read back from it are checked before anything is written ------


def _forge_version(store: ObjectStore, version: str, files: dict[str, dict], *, preprocessing: dict | None = None,
                   bodies: dict[str, bytes] | None = None) -> None:
    """Write a version the way an attacker with write access to the bucket could: raw objects, COMPLETE."""
    prefix = v.version_prefix(MODEL, version)
    for name, body in (bodies or {}).items():
        store.put_bytes(prefix + name, body)
    if preprocessing is not None:
        store.put_json(prefix + "preprocessing.json", preprocessing)
    info = {"model_name": MODEL, "version": version, "sha256": files["model.keras"]["sha256"], "files": files,
            "metadata": {"labels": LABELS}}
    store.put_json(prefix + "version.json", info)
    store.put_json(prefix + "COMPLETE", {"version": version})
    pointer, etag = v.read_pointer(store, MODEL)
    forged = {**(pointer or {}), "version": version, "sha256": files["model.keras"]["sha256"]}
    store.put_json(v.pointer_key(MODEL), forged)


def _outside(root: Path, cache: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_relative_to(cache)]


def _good_files(folder: Path) -> dict[str, dict]:
    return {n: {"sha256": v.sha256_file(p), "size": p.stat().st_size} for n, p in _files(folder).items()}


@pytest.mark.parametrize("name", ["../../../escaped.txt", "../../escaped.txt", "{tmp}/escaped.txt", "sub/escaped.txt",
                                  ".escaped"])
def test_client_refuses_file_names_that_leave_its_cache(
    store: ObjectStore, model_dirs: dict, tmp_path: Path, name: str
) -> None:
    name = name.format(tmp=tmp_path)  # an absolute path outside the consumer's folder
    _publish_and_promote(store, model_dirs["a"], "v1")
    root = tmp_path / "consumer"
    cache = root / "cache"
    client = ModelClient(store, MODEL, cache_dir=cache)
    assert client.refresh().version == "v1"
    files = {**_good_files(model_dirs["b"]), name: {"sha256": "0" * 64, "size": 5}}
    _forge_version(store, "v2", files, bodies={n: p.read_bytes() for n, p in _files(model_dirs["b"]).items()})
    with contextlib.suppress(StorageError):  # SeaweedFS refuses keys with '..'; other stores may not
        store.put_bytes(v.version_prefix(MODEL, "v2") + name, b"owned")

    served = client.refresh()

    assert served.version == "v1"
    assert "file name in version.json" in (client.last_error or "")
    assert _outside(root, cache) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_client_refuses_an_object_larger_than_version_json_says(
    store: ObjectStore, model_dirs: dict, tmp_path: Path
) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    client = ModelClient(store, MODEL, cache_dir=tmp_path / "cache")
    client.refresh()
    files = _good_files(model_dirs["b"])
    bodies = {n: p.read_bytes() for n, p in _files(model_dirs["b"]).items()}
    bodies["labels.json"] = b" " * (4 * 1024 * 1024)  # 4 MiB where 30-odd bytes were promised
    _forge_version(store, "v2", files, bodies=bodies)

    assert client.refresh().version == "v1"
    assert "larger than the" in (client.last_error or "")
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("size", [10**6, 0, "x"])
def test_absurd_preprocessing_is_refused(store: ObjectStore, model_dirs: dict, tmp_path: Path, size) -> None:
    folder = tmp_path / "forged"
    folder.mkdir()
    for name, path in _files(model_dirs["b"]).items():
        (folder / name).write_bytes(path.read_bytes())
    (folder / "preprocessing.json").write_text(json.dumps({"image_size": size, "color_order": "RGB",
                                                           "input_range": [0, 255]}))

    with pytest.raises(ModelVerificationError, match="image_size"):
        load_local(folder)


def test_a_pointer_naming_a_path_is_refused_and_the_client_keeps_serving(
    store: ObjectStore, model_dirs: dict, tmp_path: Path
) -> None:
    _publish_and_promote(store, model_dirs["a"], "v1")
    client = ModelClient(store, MODEL, cache_dir=tmp_path / "cache")
    client.refresh()
    pointer, _ = v.read_pointer(store, MODEL)
    store.put_json(v.pointer_key(MODEL), {**pointer, "version": "../../../tmp/x"})

    assert client.refresh().version == "v1"
    assert "invalid version id" in (client.last_error or "")


# -- runtimes: the model runs compiled or as TFLite, never eagerly ----------------------------------


def test_compiled_runtime_agrees_with_keras_and_traces_once_per_shape(model_dirs: dict) -> None:
    predictor = load_local(model_dirs["a"])
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32) for n in (1, 1, 5, 7, 32, 1)]

    outputs = [predictor.predict_proba(list(batch)) for batch in batches]

    reference = _build_model(1)
    for batch, probs in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(probs, np.asarray(reference(batch)), atol=1e-5)
    assert predictor.runtime == "compiled"
    # One trace for the first shape, one with a free batch dimension for every later batch size.
    assert predictor._run.graph_function.experimental_get_tracing_count() == 2


def test_unknown_runtime_is_refused_with_the_known_ones(model_dirs: dict, store: ObjectStore, tmp_path: Path) -> None:
    from ml.errors import ConfigError

    with pytest.raises(ConfigError, match=r"runtime must be one of compiled, tflite; got 'eager'"):
        load_local(model_dirs["a"], runtime="eager")
    with pytest.raises(ConfigError, match="runtime must be one of"):
        ModelClient(store, MODEL, cache_dir=tmp_path, runtime="onnx")


def test_tflite_runtime_without_a_tflite_file_says_so(model_dirs: dict) -> None:
    with pytest.raises(ModelVerificationError, match=r"runtime 'tflite' needs model\.tflite.*use runtime 'compiled'"):
        load_local(model_dirs["a"], runtime="tflite")


def test_cli_runtime_is_validated(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from ml.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--runtime", "eager", str(tmp_path / "x.jpg")])

    assert exit_info.value.code == 2
    assert "argument --runtime: invalid choice: 'eager' (choose from 'compiled', 'tflite')" in capsys.readouterr().err


def test_cli_predict_runs_the_runtime_asked_for(
    model_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ml import cli

    monkeypatch.setenv("ML_WORK_DIR", str(tmp_path))
    seen = []
    real = serving.load_local
    def load_local_spy(path: Path, *, runtime: str) -> serving.Predictor:
        seen.append(runtime)
        return real(path, runtime=runtime)

    monkeypatch.setattr(serving, "load_local", load_local_spy)
    image = _image(tmp_path, (10, 200, 30))

    assert cli.main(["predict", "--model", str(model_dirs["a"]), str(image)]) == 0
    assert cli.main(["predict", "--model", str(model_dirs["a"]), "--runtime", "tflite", str(image)]) == 2
    assert seen == ["compiled", "tflite"]
    assert "needs model.tflite" in capsys.readouterr().err
