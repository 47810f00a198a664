"""A Kaggle submission: class probabilities for a dataset's unlabelled images.

Ingest keeps Kaggle's unlabelled ``test/`` images under ``<dataset_dir>/unlabelled/``. The CSV has
one row per image, ``id`` (the file stem) first, then one probability column per class: in
``sample_submission.csv``'s order when that file is available (given, or found in the dataset
folder), in sorted label order otherwise. With a sample file the rows are exactly its ids, in
its order, as Kaggle's scorer expects.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import DataError, ModelVerificationError
from ml.io import atomic_path, read_json

if TYPE_CHECKING:
    from ml.serving.predictor import Predictor

log = logging.getLogger(__name__)

UNLABELLED_DIR = "unlabelled"  # ml.data.ingest.UNLABELLED_DIR
SAMPLE_FILE = "sample_submission.csv"  # ml.data.ingest.SAMPLE_SUBMISSION, kept under unlabelled/
ID_COLUMN = "id"
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def write_submission(predictor: Predictor, dataset_dir: str | Path, out_path: str | Path, *,
                     sample_submission: str | Path | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Predict the unlabelled images and write the submission CSV atomically.

    Args:
        predictor: a loaded model (`ml.serving.predictor`); its labels name the output units.
        dataset_dir: the ingested dataset folder (holds ``unlabelled/``).
        out_path: the CSV to write (replaced only once complete).
        sample_submission: Kaggle's sample_submission.csv; default: the one in `dataset_dir`, if any.
        batch_size: images per forward pass.

    Returns:
        {"rows", "classes", "path", "columns_from" ("sample_submission.csv" path or "labels"),
        "undecodable" (ids written with the uniform distribution)}.

    Raises:
        DataError: no unlabelled images, or the sample lists ids that have no image.
        ModelVerificationError: the sample has a class the model does not know.
    """
    dataset_dir, out_path = Path(dataset_dir), Path(out_path)
    images = _unlabelled_images(dataset_dir)
    sample = Path(sample_submission) if sample_submission else _find_sample(dataset_dir)
    labels = list(predictor.labels)
    if sample is not None:
        classes, sample_ids = _read_sample(sample)
        unknown = [c for c in classes if c not in labels]
        if unknown:
            raise ModelVerificationError(
                f"{sample} has {len(unknown)} classes the model does not know: {unknown[:10]}; the model "
                f"(version {predictor.version}) predicts {len(labels)} classes: {labels[:10]}"
                f"{' ...' if len(labels) > 10 else ''}"
            )
        dropped = [c for c in labels if c not in classes]
        if dropped:
            log.warning("submission: the model's classes %s are not columns of %s and are left out",
                        dropped[:10], sample.name)
        missing = [i for i in sample_ids if i not in images]
        if missing:
            raise DataError(
                f"{sample} lists {len(missing)} ids with no image in {dataset_dir / UNLABELLED_DIR}, e.g. "
                f"{missing[:10]}"
            )
        extra = len(images) - len(sample_ids)
        if extra > 0:
            log.warning("submission: %d unlabelled images are not in %s and are left out", extra, sample.name)
        ids = sample_ids
    else:
        classes, ids = sorted(labels), sorted(images)
    columns = [labels.index(c) for c in classes]

    undecodable: list[str] = []
    with atomic_path(out_path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([ID_COLUMN, *classes])
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size]
                probs = _predict_batch(predictor, [images[i] for i in batch], undecodable, batch)
                for image_id, row in zip(batch, probs[:, columns], strict=True):
                    writer.writerow([image_id, *(format(float(p), ".8g") for p in row)])
    if undecodable:
        log.warning("submission: %d images could not be decoded and got uniform probabilities: %s",
                    len(undecodable), undecodable[:10])
    log.info("submission: %d rows x %d classes (columns from %s) written to %s",
             len(ids), len(classes), sample.name if sample else "sorted labels", out_path)
    return {"rows": len(ids), "classes": len(classes), "path": str(out_path),
            "columns_from": str(sample) if sample else "labels", "undecodable": undecodable}


def _unlabelled_images(dataset_dir: Path) -> dict[str, Path]:
    folder = dataset_dir / UNLABELLED_DIR
    if not folder.is_dir():
        raise DataError(
            f"{dataset_dir} has no {UNLABELLED_DIR}/ folder: ingest keeps Kaggle's unlabelled test/ images "
            "there only for Kaggle-layout sources that have them"
        )
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise DataError(
                f"{folder}: two images share the id {path.stem!r} ({images[path.stem].name}, {path.name})"
            )
        images[path.stem] = path
    if not images:
        raise DataError(f"{folder} holds no images to predict")
    return images


def competition_sample(dataset_dir: str | Path) -> Path | None:
    """The sample_submission.csv of a Kaggle-competition dataset (unlabelled images + sample), or None.

    What the promote step checks before it writes a version's submission.csv.
    """
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / UNLABELLED_DIR).is_dir():
        return None
    return _find_sample(dataset_dir)


def _find_sample(dataset_dir: Path) -> Path | None:
    """A sample_submission.csv kept with the dataset (its folder, or dataset.json extra.sample_submission)."""

    candidates = [dataset_dir / SAMPLE_FILE]
    info_file = dataset_dir / "dataset.json"
    if info_file.is_file():
        recorded = (read_json(info_file).get("extra") or {}).get("sample_submission")
        if recorded:
            candidates.insert(0, dataset_dir / recorded)
    return next((p for p in candidates if p.is_file()), None)


def _read_sample(path: Path) -> tuple[list[str], list[str]]:
    """(class columns, ids) of a sample submission."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[0].strip() != ID_COLUMN or len(header) < 2:
            raise DataError(f"{path}: the header must be '{ID_COLUMN},<class>,...', got {header}")
        classes = [c.strip() for c in header[1:]]
        ids = [row[0].strip() for row in reader if row and row[0].strip()]
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate class columns {duplicates[:10]}")
    if not ids:
        raise DataError(f"{path} lists no ids")
    return classes, ids


def _predict_batch(predictor: Predictor, paths: Sequence[Path], undecodable: list[str],
                   ids: Sequence[str]) -> np.ndarray:
    """Probabilities for a batch; an undecodable image gets a uniform row (Kaggle needs every id)."""
    try:
        return predictor.predict_proba(list(paths), batch_size=len(paths))
    except DataError:
        pass  # find the bad file(s) one by one; the rest of the batch still counts
    arrays, good = [], []
    for index, path in enumerate(paths):
        try:
            arrays.append(predictor.prepare([path])[0])
            good.append(index)
        except DataError as exc:
            log.warning("submission: %s", exc)
            undecodable.append(ids[index])
    probs = np.full((len(paths), len(predictor.labels)), 1.0 / len(predictor.labels), np.float32)
    if arrays:
        probs[good] = predictor.predict_proba(arrays, batch_size=len(arrays))
    return probs
