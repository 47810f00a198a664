"""Kaggle submission: columns in sample_submission.csv order, every id, atomic writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ml.errors import DataError, ModelVerificationError
from ml.serving.submission import write_submission

SIZE = 32
LABELS = ["cat", "dog", "fox"]
COLOURS = {"a1": (220, 30, 30), "b2": (30, 220, 30), "c3": (30, 30, 220), "d4": (200, 200, 40),
           "e5": (90, 90, 90)}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory):
    import keras

    from ml.serving.predictor import load_local

    keras.utils.set_random_seed(7)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    folder = tmp_path_factory.mktemp("model")
    keras.Model(inputs, outputs).save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(LABELS))
    (folder / "preprocessing.json").write_text(json.dumps(
        {"image_size": SIZE, "color_order": "RGB", "input_range": [0, 255], "dtype": "float32"}))
    return load_local(folder)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A dataset folder with five unlabelled images (ids a1..e5), as ingest leaves it."""
    import cv2

    folder = tmp_path / "dataset" / "unlabelled"
    folder.mkdir(parents=True)
    for image_id, colour in COLOURS.items():
        rgb = np.zeros((40, 50, 3), np.uint8)
        rgb[:] = colour
        cv2.imwrite(str(folder / f"{image_id}.jpg"), rgb[:, :, ::-1])
    return folder.parent


def _sample(path: Path, classes: list[str], ids: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *classes])
        for image_id in ids:
            writer.writerow([image_id, *["0.333"] * len(classes)])
    return path


def _read(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def test_columns_and_rows_follow_a_shuffled_sample_submission(predictor, dataset: Path,
                                                              tmp_path: Path) -> None:
    order, ids = ["fox", "cat", "dog"], ["d4", "a1", "e5", "c3", "b2"]
    sample = _sample(tmp_path / "sample_submission.csv", order, ids)
    out = tmp_path / "out" / "submission.csv"

    result = write_submission(predictor, dataset, out, sample_submission=sample)

    header, got_ids, probs = _read(out)
    assert header == ["id", *order]
    assert got_ids == ids
    assert result["rows"] == 5 and result["classes"] == 3
    expected = predictor.predict_proba([dataset / "unlabelled" / f"{i}.jpg" for i in ids])
    np.testing.assert_allclose(probs, expected[:, [LABELS.index(c) for c in order]], atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_without_a_sample_columns_are_sorted_labels(predictor, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"

    result = write_submission(predictor, dataset, out)

    header, got_ids, probs = _read(out)
    assert header == ["id", *sorted(LABELS)]
    assert got_ids == sorted(COLOURS)
    assert probs.shape == (5, 3)
    assert result["columns_from"] == "labels"


def test_sample_in_the_dataset_folder_is_used(predictor, dataset: Path, tmp_path: Path) -> None:
    _sample(dataset / "sample_submission.csv", ["dog", "fox", "cat"], sorted(COLOURS))

    write_submission(predictor, dataset, tmp_path / "submission.csv", batch_size=2)

    assert _read(tmp_path / "submission.csv")[0] == ["id", "dog", "fox", "cat"]


def test_a_class_the_model_does_not_know_is_refused(predictor, dataset: Path, tmp_path: Path) -> None:
    sample = _sample(tmp_path / "sample.csv", ["cat", "dog", "wolf"], sorted(COLOURS))

    with pytest.raises(ModelVerificationError, match=r"does not know: \['wolf'\]"):
        write_submission(predictor, dataset, tmp_path / "submission.csv", sample_submission=sample)
    assert not (tmp_path / "submission.csv").exists()


def test_a_sample_id_without_an_image_is_refused(predictor, dataset: Path, tmp_path: Path) -> None:
    sample = _sample(tmp_path / "sample.csv", LABELS, [*sorted(COLOURS), "zz9"])

    with pytest.raises(DataError, match=r"1 ids with no image.*zz9"):
        write_submission(predictor, dataset, tmp_path / "submission.csv", sample_submission=sample)


def test_an_undecodable_image_gets_a_uniform_row(predictor, dataset: Path, tmp_path: Path) -> None:
    (dataset / "unlabelled" / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "submission.csv"

    result = write_submission(predictor, dataset, out)

    _, ids, probs = _read(out)
    assert result["undecodable"] == ["bad"]
    np.testing.assert_allclose(probs[ids.index("bad")], [1 / 3] * 3, atol=1e-6)
    assert len(ids) == 6


def test_a_failure_midway_leaves_the_previous_file(predictor, dataset: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "submission.csv"
    out.write_text("previous\n")
    calls = []

    def flaky(images, *, batch_size: int = 32):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        return np.full((len(images), 3), 1 / 3, np.float32)

    monkeypatch.setattr(predictor, "predict_proba", flaky)

    with pytest.raises(RuntimeError, match="worker lost"):
        write_submission(predictor, dataset, out, batch_size=2)

    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "submission.csv"]  # no temp file left


def test_no_unlabelled_folder_is_a_data_error(predictor, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no unlabelled/ folder"):
        write_submission(predictor, tmp_path, tmp_path / "submission.csv")


def test_cli_submit_passes_the_sample(predictor, dataset: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from ml.cli import main

    sample = _sample(tmp_path / "sample.csv", ["dog", "cat", "fox"], sorted(COLOURS))
    out = tmp_path / "submission.csv"

    code = main(["submit", "--dataset", str(dataset), "--out", str(out), "--model", str(predictor.path),
                 "--sample", str(sample)])

    assert code == 0
    assert _read(out)[0] == ["id", "dog", "cat", "fox"]
    assert "wrote 5 predictions for 3 classes" in capsys.readouterr().out
