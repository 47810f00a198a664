"""Batch prediction over a dataset split, read from the decoded-image cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ml.errors import DataError

log = logging.getLogger(__name__)


def predict_split(
    model_path: Path | str,
    dataset_dir: Path | str,
    split: str,
    *,
    cache_root: Path | str,
    image_size: int | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predict class probabilities for every image of a split.

    Args:
        model_path: A ``model.keras`` (loaded in safe mode).
        dataset_dir: Dataset folder (manifest.parquet, dataset.json).
        split: "train", "val", "test" or "all".
        cache_root: Root of the decoded-image cache (built if missing).
        image_size: Input size; None reads it from the model's input shape.
        batch_size: Images per forward pass.

    Returns:
        (y_true int64 N, probabilities float32 N x K, labels) with labels in class-index order.

    Raises:
        DataError: the model's output width differs from the dataset's number of labels, or a
            ``labels.json`` beside the model disagrees with the dataset's labels.
    """
    from ml.data.image_cache import build_image_cache
    from ml.models import load_model
    from ml.training.input_pipeline import split_dataset

    model_path = Path(model_path)
    model = load_model(model_path, compile=False)
    size = int(image_size or model.input_shape[1])
    cache = build_image_cache(dataset_dir, size, cache_root)
    labels = cache.labels
    labels_file = model_path.with_name("labels.json")
    if labels_file.is_file():
        model_labels = json.loads(labels_file.read_text(encoding="utf-8"))
        if list(model_labels) != labels:
            raise DataError(
                f"{labels_file} lists {len(model_labels)} labels that differ from dataset "
                f"{cache.dataset_hash[:12]}'s {len(labels)} labels; the model cannot score it"
            )
    outputs = int(model.output_shape[-1])
    if outputs != len(labels):
        raise DataError(
            f"model {model_path} has {outputs} outputs but dataset {cache.dataset_hash[:12]} "
            f"has {len(labels)} labels"
        )
    rows = cache.split_indices(split)
    y_true = cache.label_indices(rows).astype(np.int64)
    if len(rows) == 0:
        log.warning("split %r of dataset %s is empty", split, cache.dataset_hash[:12])
        return y_true, np.zeros((0, outputs), dtype=np.float32), labels
    images = split_dataset(cache, split, batch_size=batch_size, rows=rows).map(lambda x, y: x)
    probs = np.asarray(model.predict(images, verbose=0), dtype=np.float32)
    log.info("predicted %d %s images with %s", len(rows), split, model_path)
    return y_true, probs, labels
