"""What a fit reads from the image cache: train/val rows, labels and class weights."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ml.errors import DataError

if TYPE_CHECKING:
    from ml.data.image_cache import ImageCache

log = logging.getLogger(__name__)


class TrainData:
    """Rows, labels and class weights of a dataset's train/val splits (built by `from_cache`)."""

    def __init__(
        self,
        cache: ImageCache,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        class_weight: dict[int, float] | None,
        imbalance: float,
    ) -> None:
        self.cache = cache
        self.train_rows, self.val_rows = train_rows, val_rows
        self.class_weight, self.imbalance = class_weight, imbalance
        self.labels = cache.labels
        self.num_classes = len(self.labels)

    @property
    def has_val(self) -> bool:
        return len(self.val_rows) > 0

    @classmethod
    def from_cache(cls, cache: ImageCache, class_weight_threshold: float) -> TrainData:
        """The cache's train/val rows, class-weighted when their imbalance exceeds the threshold.

        Raises:
            DataError: fewer than 2 labels, or no 'train' rows.
        """
        train_rows, val_rows = cache.split_indices("train"), cache.split_indices("val")
        if len(cache.labels) < 2:
            raise DataError(f"dataset {cache.dataset_hash[:12]} has {len(cache.labels)} label(s); need >= 2")
        if len(train_rows) == 0:
            raise DataError(
                f"dataset {cache.dataset_hash[:12]} has no 'train' rows in its manifest "
                "(run the prepare/split stage first)"
            )
        if len(val_rows) == 0:
            log.warning(
                "dataset %s has no 'val' rows: early stopping and LR schedule watch training loss",
                cache.dataset_hash[:12],
            )
        weights, ratio = class_weights(cache.label_indices(train_rows), len(cache.labels), class_weight_threshold)
        return cls(cache, train_rows, val_rows, weights, ratio)


def class_weights(
    labels: np.ndarray, num_classes: int, threshold: float
) -> tuple[dict[int, float] | None, float]:
    """'balanced' class weights (n / (k * n_c)) when max/min class count exceeds `threshold`.

    Returns:
        (weights or None, imbalance ratio). Classes absent from `labels` get weight 1.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    if ratio <= threshold:
        return None, ratio
    total, k = counts.sum(), len(present)
    weights = {i: (float(total / (k * c)) if c else 1.0) for i, c in enumerate(counts)}
    log.info(
        "class imbalance %.2f > %.2f: balanced class weights %s",
        ratio,
        threshold,
        {i: round(w, 3) for i, w in weights.items()},
    )
    return weights, ratio
