"""tf.data pipelines that stream batches from the decoded-image cache.

Row indices (not pixels) are sliced, shuffled and batched; each batch is then gathered from
the uint8 memmap with ``tf.numpy_function`` and cast to float32 in the map, so memory holds a
few batches, never the dataset. Training batches are augmented with Keras preprocessing
layers (retrain.py's distortions: flips, crop/scale, brightness, plus rotation, translation
and contrast), configured per candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ml.data.image_cache import ImageCache

log = logging.getLogger(__name__)

# Batches in flight, bounded: AUTOTUNE may buffer up to half the machine's RAM (tf.data's default
# ram_budget), and a float32 batch of 32 x 224 px is 19 MB. Two parallel gathers and two batches
# prefetched keep a 2-core CPU busy (the model step, not the gather, is the slow part).
PARALLEL_BATCHES = 2
PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class AugmentConfig:
    """Random distortions of training images; 0 / False switches one off.

    Attributes:
        flip: Random horizontal flips.
        rotation: Max rotation as a fraction of a full turn (0.05 = +-18 degrees).
        zoom: Max zoom in or out as a fraction of the size.
        translation: Max shift as a fraction of the size.
        crop: Max random crop (then scaled back to size) as a fraction of the size:
            retrain.py's ``random_crop``.
        brightness: Max brightness change as a fraction of the [0, 255] range.
        contrast: Max contrast change factor.
    """

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    translation: float = 0.1
    crop: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "flip" and not 0 <= float(value) < 1:
                raise ConfigError(f"augmentation.{f.name} must be in [0, 1), got {value}")

    @property
    def enabled(self) -> bool:
        return any(bool(v) for v in asdict(self).values())

    @classmethod
    def from_options(cls, options: Mapping[str, Any], default_on: bool = True) -> AugmentConfig | None:
        """Read a candidate's ``augment`` (bool) and ``augmentation`` (dict) options.

        Returns None when augmentation is off for the candidate.
        """
        if not bool(options.get("augment", default_on)):
            return None
        raw = dict(options.get("augmentation") or {})
        allowed = {f.name for f in fields(cls)}
        unknown = set(raw) - allowed
        if unknown:
            raise ConfigError(f"unknown augmentation keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        config = cls(**raw)
        return config if config.enabled else None


def build_augmenter(config: AugmentConfig, seed: int) -> keras.Sequential:
    """A Keras preprocessing-layer stack for pixels in [0, 255] (applied in tf.data)."""
    import keras
    from keras import layers

    stack: list[keras.layers.Layer] = []
    if config.flip:
        stack.append(layers.RandomFlip("horizontal", seed=seed))
    if config.crop:
        # Zooming in only = a random crop scaled back to the full size.
        stack.append(layers.RandomZoom((-config.crop, 0.0), fill_mode="reflect", seed=seed + 1))
    if config.zoom:
        stack.append(layers.RandomZoom(config.zoom, fill_mode="reflect", seed=seed + 2))
    if config.rotation:
        stack.append(layers.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 3))
    if config.translation:
        stack.append(
            layers.RandomTranslation(
                config.translation, config.translation, fill_mode="reflect", seed=seed + 4
            )
        )
    if config.brightness:
        stack.append(layers.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 5))
    if config.contrast:
        stack.append(layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 6))
    return keras.Sequential(stack, name="augmentation")


def split_dataset(
    cache: ImageCache,
    split: str,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: AugmentConfig | None = None,
    rows: Any = None,
    state: list[Any] | None = None,
) -> tf.data.Dataset:
    """(images float32 [0, 255] B x S x S x 3, labels int32 B) batches of one split.

    Args:
        cache: An opened image cache.
        split: "train", "val", "test" or "all".
        batch_size: Images per batch (the last batch may be smaller).
        shuffle: Reshuffle the rows every epoch with `seed` (training).
        seed: Shuffle and augmentation seed.
        augment: Distortions to apply (training only), or None.
        rows: Explicit cache rows instead of the split's (overrides `split`).
        state: A list that receives the pipeline's random-state variables (the shuffle's epoch
            counter, the augmentation seed generators): what a checkpoint saves so that a resumed
            fit draws what an uninterrupted one would (`ml.training.checkpoints`).
    """
    import numpy as np
    import tensorflow as tf

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rows = cache.split_indices(split) if rows is None else np.asarray(rows, dtype=np.int64)
    labels = cache.label_indices(rows).astype(np.int32)
    size = cache.image_size

    def gather(batch_rows: np.ndarray) -> np.ndarray:
        return cache.gather(batch_rows)

    def load(batch_rows: tf.Tensor, batch_labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels = tf.numpy_function(gather, [batch_rows], tf.uint8, stateful=False)
        pixels.set_shape((None, size, size, 3))
        return tf.cast(pixels, tf.float32), batch_labels

    state = [] if state is None else state
    if shuffle and len(rows):
        ds = shuffled_each_epoch((rows, labels), seed, state)
    else:
        ds = tf.data.Dataset.from_tensor_slices((rows, labels))
    ds = ds.batch(batch_size).map(load, num_parallel_calls=PARALLEL_BATCHES)
    if augment is not None:
        augmenter = build_augmenter(augment, seed)
        state.extend(augmenter.variables)  # seed generator states: advanced once per batch

        def distort(images: tf.Tensor, batch_labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            out = augmenter(images, training=True)
            return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 255.0), batch_labels

        # Sequential: the augmentation layers draw from a stateful seed generator, and a parallel
        # map hands the draws out in thread order, so the same seed gave a different model
        # (max |dp| 0.038 between two identical runs; bit-identical once sequential).
        ds = ds.map(distort)
    return ds.prefetch(PREFETCH_BATCHES)


def shuffled_each_epoch(arrays: tuple[Any, ...], seed: int, state: list[Any]) -> tf.data.Dataset:
    """``Dataset.from_tensor_slices(arrays)`` in a new order every iteration (epoch), seeded.

    The order of iteration ``e`` is a pure function of ``(seed, e)``, and ``e`` is a variable
    appended to `state`: a checkpoint saves it, and a resumed fit that sets it back sees the order
    an uninterrupted fit would have seen at that epoch. (``Dataset.shuffle(...,
    reshuffle_each_iteration=True)`` keeps its counter inside the op, where no checkpoint reaches:
    a resumed fit would replay epoch 0's order.) The counter moves when an iteration yields its
    first element, so an iterator Keras creates and drops unread does not count.
    """
    import tensorflow as tf

    n = len(arrays[0])
    tensors = tuple(tf.constant(a) for a in arrays)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="shuffle_epoch")
    state.append(epoch)
    base = tf.constant(int(seed), dtype=tf.int64)

    def one_epoch(_: tf.Tensor) -> tf.data.Dataset:
        current = epoch.assign_add(1) - 1
        order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([base, current])))
        return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(t, order) for t in tensors))

    ds = tf.data.Dataset.range(1).flat_map(one_epoch)
    return ds.apply(tf.data.experimental.assert_cardinality(n))


def one_hot(ds: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    """Map (x, int label) batches to (x, one-hot float32): label smoothing needs one-hot targets."""
    import tensorflow as tf

    return ds.map(
        lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)), num_parallel_calls=tf.data.AUTOTUNE
    )
