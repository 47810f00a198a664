"""Augmented bottleneck bank: the frozen phase of a transfer candidate with augmentation, on features.

A frozen backbone maps an augmented image to the same features every time, so instead of
pushing every distorted image through it every epoch, ``views`` augmented copies of every
training image are run through it once and stored with the un-augmented features:
``<cache_root>/bottlenecks/<dataset_hash>/bank-<arch>-<size>-<key>.npy``, a
(views + 1) x n_train x D float32 array, view 0 un-augmented. The key covers everything the
numbers depend on (dataset, training rows, architecture, size, alpha, weights id, augmentation
settings, views, seed, `BANK_VERSION`), so every task and later run with the same settings
shares one bank; it is checked like the bottleneck cache (`ml.training.bottleneck.load_or_build`:
sha256 sidecar written last, shape check, rebuilt under a lock when damaged).

A view is made by `augment_image`: ONE affine warp per image (``cv2.warpAffine`` of the flip,
rotation, crop/zoom and shift combined in a single 2 x 3 matrix, reflected borders) and the
brightness/contrast jitter as one per-channel lookup table, all on uint8, with the same ranges
as the Keras layers of `ml.training.input_pipeline.build_augmenter` (which the through-the-
backbone path keeps). Its draws come from ``numpy.random.default_rng([seed, view, row])``: a
view of an image is a function of (seed, view, cache row) alone, whatever the batch, thread or
order, so the same seed builds the same bank. (Chained Keras layers on float32 resample the
image once per layer; the fused warp resamples once. One view of animals3's 408 training images
at 224 px, 2 shared cores: pixels 1.1 s fused vs 10.6 s Keras layers, pixels + MobileNet a0.25
2.5 s vs 21.1 s; ``python -m benchmarks.bench_bank --view-speed 3``, benchmarks/README.md.)

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

from ml.training.bottleneck import load_or_build

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ml.data.image_cache import ImageCache
    from ml.training.input_pipeline import AugmentConfig

log = logging.getLogger(__name__)

# In the bank key: 2 = views made by the fused warp (`augment_image`); 1 = chained Keras layers.
# Views of another version differ, so a bank of version 1 is never read as one of version 2.
BANK_VERSION = 2


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
            "v": BANK_VERSION,
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
        seed: Seed of the views (`augment_image`).
        batch_size: Images per forward pass.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)

    def build() -> np.ndarray:
        started = time.monotonic()
        bank = np.empty((views + 1, n, clean.shape[1]), dtype=np.float32)
        bank[0] = clean[rows]
        if n:
            # One predict() over every view: one tf.function trace; batches never mix two views.
            dim = int(extractor.output_shape[-1])
            out = extractor.predict(_views_dataset(cache, rows, augment, views, seed, batch_size), verbose=0)
            bank[1:] = np.asarray(out, dtype=np.float32).reshape(views, n, dim)
        log.info("bank: %d augmented views of %d images (fused warp) in %.1fs", views, n, time.monotonic() - started)
        return bank

    meta = {"dataset_hash": cache.dataset_hash, "image_size": cache.image_size, "views": views, "seed": seed,
            "augmentation": "fused affine warp + colour LUT (ml.training.bank.augment_image)"}
    features, hit = load_or_build(path, (views + 1, n), build, meta, what="bottleneck bank")
    return Bank(features, rows, path, hit)


def _views_dataset(
    cache: ImageCache, rows: np.ndarray, augment: AugmentConfig, views: int, seed: int, batch_size: int
) -> tf.data.Dataset:
    """float32 [0, 255] batches of views 1..`views` of `rows`, view-major, in row order."""
    import tensorflow as tf

    size = cache.image_size
    starts = [(view, i) for view in range(1, views + 1) for i in range(0, len(rows), batch_size)]

    def make(view: np.int64, start: np.int64) -> np.ndarray:
        batch = rows[int(start) : int(start) + batch_size]
        return augment_batch(cache.gather(batch), batch, augment, seed=seed, view=int(view))

    def load(view: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
        pixels = tf.numpy_function(make, [view, start], tf.uint8, stateful=False)
        pixels.set_shape((None, size, size, 3))
        return tf.cast(pixels, tf.float32)

    views_t, starts_t = (np.array(column, dtype=np.int64) for column in zip(*starts, strict=True))
    # Parallel is safe: a view's pixels depend on (seed, view, row) only; `deterministic` keeps the order.
    ds = tf.data.Dataset.from_tensor_slices((views_t, starts_t))
    return ds.map(load, num_parallel_calls=2, deterministic=True).prefetch(2)


def augment_batch(
    images: np.ndarray, rows: np.ndarray, augment: AugmentConfig, *, seed: int, view: int
) -> np.ndarray:
    """`augment_image` of every image of a uint8 B x S x S x 3 batch (cache rows `rows`), a new array."""
    out = np.empty_like(images)
    for i, (image, row) in enumerate(zip(images, rows, strict=True)):
        out[i] = augment_image(image, augment, np.random.default_rng([int(seed), int(view), int(row)]))
    return out


def augment_image(image: np.ndarray, augment: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One distorted copy of a uint8 H x W x 3 image: a single affine warp, then the colour jitter.

    The ranges are `build_augmenter`'s: horizontal flip with p = 0.5; rotation uniform in
    +-``rotation`` turns; scale 1 / ((1 + c)(1 + z)) with c uniform in [-``crop``, 0] (zoom in
    only: a random crop) and z in +-``zoom`` (Keras' RandomZoom: z > 0 zooms out); a shift
    uniform in +-``translation`` of the width and height; borders reflected; brightness + b x 255
    with b uniform in +-``brightness``; contrast (x - channel mean) x k + channel mean with k
    uniform in 1 +- ``contrast``. Every draw is made, in this order, even for a distortion that
    is off, so switching one off does not change the others' draws.
    """
    import cv2

    h, w = image.shape[:2]
    flip = rng.random() < 0.5
    angle = rng.uniform(-1.0, 1.0) * augment.rotation * 360.0  # degrees, counter-clockwise
    crop = rng.uniform(-augment.crop, 0.0)
    zoom = rng.uniform(-augment.zoom, augment.zoom)
    shift = rng.uniform(-1.0, 1.0, size=2) * augment.translation * np.array([w, h])
    brightness = rng.uniform(-1.0, 1.0) * augment.brightness * 255.0
    contrast = 1.0 + rng.uniform(-1.0, 1.0) * augment.contrast

    # Output pixel = input at M^-1 (output): M maps input to output coordinates, about the centre.
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    matrix = np.vstack([cv2.getRotationMatrix2D(centre, angle, 1.0 / ((1.0 + crop) * (1.0 + zoom))), [0, 0, 1]])
    if augment.flip and flip:
        matrix = matrix @ np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    matrix[:2, 2] += shift
    identity = np.allclose(matrix, np.eye(3))
    warped = image if identity else cv2.warpAffine(
        image, matrix[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    if not (augment.brightness or augment.contrast):
        return np.array(warped)
    # Brightness then contrast is one affine map per channel: y = k x + (1 - k) mean + b, as a LUT.
    mean = warped.reshape(-1, 3).mean(axis=0) + brightness
    values = np.arange(256, dtype=np.float64)[:, None]
    table = np.clip(np.rint(contrast * (values + brightness) + (1.0 - contrast) * mean), 0, 255).astype(np.uint8)
    return cv2.LUT(warped, table.reshape(256, 1, 3))


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
