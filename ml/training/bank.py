"""Augmented bottleneck bank: the frozen phase of a transfer candidate with augmentation, on features.

A frozen backbone maps an augmented image to the same features every time, so instead of
pushing every distorted image through it every epoch, ``views`` augmented copies of every
training image are run through it once and stored with the un-augmented features:
``<cache_root>/bottlenecks/<dataset_hash>/bank-<arch>-<size>-<key>.npy``, a
(views + 1) x n_train x D float32 array, view 0 un-augmented. The key covers everything the
numbers depend on (dataset, training rows, architecture, size, alpha, weights id, augmentation
settings, views, seed), so every task and later run with the same settings shares one bank; it
is checked like the bottleneck cache (`ml.training.bottleneck.load_or_build`: sha256 sidecar
written last, shape check, rebuilt under a lock when damaged).

Each epoch the head sees every training image once, as one of its views + 1 stored versions,
drawn by `view_schedule` from (seed, epoch): the same seed gives the same epochs, whatever
ran before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ml.training.bottleneck import FORMAT_VERSION, extract, load_or_build

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ml.data.image_cache import ImageCache
    from ml.training.input_pipeline import AugmentConfig

log = logging.getLogger(__name__)

# Seeds of the views' augmenters are spread apart: view v draws with seed + VIEW_SEED_STRIDE * v
# (an augmenter uses seed .. seed + 6 for its layers, see build_augmenter).
VIEW_SEED_STRIDE = 1009


@dataclass(frozen=True)
class Bank:
    """Un-augmented and augmented features of the training rows.

    Attributes:
        features: (views + 1) x n_train x D float32 (read-only memmap); [0] un-augmented.
        rows: The image-cache rows of the training images, in bank order.
        path: The .npy file.
        hit: True when the bank came from the cache (not computed now).
    """

    features: np.ndarray
    rows: np.ndarray
    path: Path
    hit: bool

    @property
    def views(self) -> int:
        """Augmented views per image (the un-augmented one not counted)."""
        return int(self.features.shape[0]) - 1


def bank_path(
    cache_root: Path | str,
    dataset_hash: str,
    rows: np.ndarray,
    *,
    architecture: str,
    image_size: int,
    weights_id: str,
    alpha: float | None,
    augment: AugmentConfig,
    views: int,
    seed: int,
) -> Path:
    """Where the bank of one (dataset, rows, backbone, weights, size, augmentation, views, seed) lives."""
    key = json.dumps(
        {
            "rows": hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest(),
            "arch": architecture,
            "size": int(image_size),
            "alpha": alpha,
            "weights": weights_id,
            "augment": asdict(augment),
            "views": int(views),
            "seed": int(seed),
            "v": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_root) / "bottlenecks" / dataset_hash / f"bank-{architecture}-{int(image_size)}-{digest}.npy"


def load_or_build_bank(
    cache: ImageCache,
    extractor: keras.Model,
    path: Path,
    *,
    rows: np.ndarray,
    clean: np.ndarray,
    augment: AugmentConfig,
    views: int,
    seed: int,
    batch_size: int = 64,
) -> Bank:
    """The bank at `path`, built on a miss: `views` augmented passes of `rows` through `extractor`.

    Args:
        cache: The image cache the rows refer to.
        extractor: image -> pooled features model (`ml.models.transfer.feature_extractor`).
        path: From `bank_path`.
        rows: Image-cache rows of the training images.
        clean: Un-augmented features of every cache row (`ml.training.bottleneck.load_or_compute`).
        augment: The candidate's distortions.
        views: Augmented views per image (>= 1).
        seed: Base seed of the views' augmenters.
        batch_size: Images per forward pass.
    """
    from ml.training.input_pipeline import split_dataset

    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)

    def build() -> np.ndarray:
        bank = np.empty((views + 1, n, clean.shape[1]), dtype=np.float32)
        bank[0] = clean[rows]
        for view in range(1, views + 1):
            started = time.monotonic()
            images = split_dataset(
                cache, "train", batch_size=batch_size, rows=rows, augment=augment, seed=seed + VIEW_SEED_STRIDE * view
            ).map(lambda x, y: x)
            bank[view] = extract(extractor, images, n)
            log.info("bank: view %d/%d of %d images in %.1fs", view, views, n, time.monotonic() - started)
        return bank

    meta = {"dataset_hash": cache.dataset_hash, "image_size": cache.image_size, "views": views, "seed": seed}
    features, hit = load_or_build(path, (views + 1, n), build, meta, what="bottleneck bank")
    return Bank(features, rows, path, hit)


def view_schedule(seed: int, epoch: int, n_images: int, n_views: int) -> np.ndarray:
    """Which stored view (0 = un-augmented) each image trains on in `epoch`: a function of its arguments only."""
    return np.random.default_rng([int(seed), int(epoch)]).integers(0, n_views, size=n_images)


def epoch_order(seed: int, epoch: int, n_images: int) -> np.ndarray:
    """The shuffled order of the images in `epoch` (independent of `view_schedule`'s draws)."""
    return np.random.default_rng([int(seed), int(epoch), 1]).permutation(n_images)


def bank_dataset(
    bank: Bank, labels: np.ndarray, *, epochs: int, batch_size: int, seed: int, start_epoch: int = 0
) -> tuple[tf.data.Dataset, int]:
    """(features, one-hot labels) batches of epochs `start_epoch` .. `epochs` - 1, one view per image each.

    Batches never span two epochs; fit it with the returned ``steps_per_epoch`` (Keras then
    keeps one iterator across epochs, so epoch e draws `view_schedule(seed, e, ...)`).

    Args:
        bank: From `load_or_build_bank`.
        labels: One-hot float32 labels of `bank.rows` (n_train x k).
        epochs: The fit's epochs.
        batch_size: Feature vectors per step.
        seed: Seed of the views and order.
        start_epoch: The first epoch (a resumed fit's ``initial_epoch``).

    Returns:
        (dataset, steps_per_epoch).
    """
    import tensorflow as tf

    n, n_views = bank.features.shape[1], bank.features.shape[0]
    steps = -(-n // batch_size)
    features = bank.features

    def epoch_batches(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = epoch_order(seed, epoch, n)
        return view_schedule(seed, epoch, n, n_views)[order], order

    def gather(views: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Fancy indexing on the memmap reads only the chosen vectors (a copy, batch x D).
        return np.asarray(features[views, images], dtype=np.float32), labels[images]

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        views, images = tf.numpy_function(
            lambda e: epoch_batches(int(e)), [epoch], (tf.int64, tf.int64), stateful=False
        )
        return tf.data.Dataset.from_tensor_slices((tf.ensure_shape(views, [n]), tf.ensure_shape(images, [n]))).batch(
            batch_size
        )

    def load(views: tf.Tensor, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [views, images], (tf.float32, tf.float32), stateful=False)
        x.set_shape((None, features.shape[2]))
        y.set_shape((None, labels.shape[1]))
        return x, y

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(one_epoch).map(load)
    return ds.prefetch(tf.data.AUTOTUNE), steps
