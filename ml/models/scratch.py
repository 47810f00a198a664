"""From-scratch CNNs: plain or residual conv blocks, batch norm, L2, global average pooling.

The seeds' baseline (the dog-breed study's from-scratch CNN): a few conv blocks of
conv-BN-ReLU, max pooling and dropout, then global average pooling, dropout and a softmax.
Inputs are RGB float32 in [0, 255]; the ``tf`` preprocessing (scale to [-1, 1]) is a layer
inside the model like every other candidate's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError
from ml.models.registry import get_scratch_variant

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

SCRATCH_PREPROCESS = "tf"
# Keras' default 0.99 leaves the moving statistics near their initial values after the few
# hundred steps a small dataset gives, so validation (inference mode) lags far behind training.
BN_MOMENTUM = 0.9


def build_scratch(
    variant: str, num_classes: int, image_size: int, options: Mapping[str, Any] | None = None
) -> keras.Model:
    """Build a from-scratch classifier.

    Args:
        variant: Registry variant (``small``, ``tiny``, ``residual``) or ``scratch_<variant>``.
        num_classes: Softmax units (one per label, in sorted label order).
        image_size: Input height and width in pixels.
        options: Overrides of the variant's defaults (depth, width, residual, dropout,
            head_dropout, l2); training-only keys (e.g. ``augment``) are ignored here.
    """
    import keras
    from keras import layers

    from ml.models.layers import custom_objects

    spec = get_scratch_variant(variant)
    opts = spec.resolve_options(options)
    depth, width = int(opts["depth"]), int(opts["width"])
    residual, dropout = bool(opts["residual"]), float(opts["dropout"])
    head_dropout, l2 = float(opts["head_dropout"]), float(opts["l2"])
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    if depth < 1 or width < 1:
        raise ConfigError(
            f"scratch_{spec.name}: depth and width must be >= 1, got depth={depth} width={width}"
        )
    if image_size // 2**depth < 1:
        # Every block halves the feature map: 32 px allows at most 5 blocks.
        raise ConfigError(
            f"scratch_{spec.name}: depth {depth} halves a {image_size} px input below 1 px; "
            f"use depth <= {max(1, image_size.bit_length() - 1)}"
        )
    for name, value in (("dropout", dropout), ("head_dropout", head_dropout)):
        if not 0 <= value < 1:
            raise ConfigError(f"scratch_{spec.name}: {name} must be in [0, 1), got {value}")

    preprocessing = custom_objects()["ImagePreprocessing"]
    reg = keras.regularizers.L2(l2) if l2 > 0 else None

    def conv_bn(x: Any, filters: int, name: str, relu: bool = True) -> Any:
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"{name}_conv"
        )(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing(mode=SCRATCH_PREPROCESS, name="preprocess")(inputs)
    for i in range(depth):
        filters = width * 2**i
        prefix = f"block{i + 1}"
        if residual:
            shortcut = x
            y = conv_bn(x, filters, f"{prefix}a")
            y = conv_bn(y, filters, f"{prefix}b", relu=False)
            if shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(
                    filters, 1, use_bias=False, kernel_regularizer=reg, name=f"{prefix}_proj_conv"
                )(shortcut)
                shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{prefix}_proj_bn")(shortcut)
            x = layers.ReLU(name=f"{prefix}_out")(layers.Add(name=f"{prefix}_add")([y, shortcut]))
        else:
            x = conv_bn(x, filters, f"{prefix}a")
            x = conv_bn(x, filters, f"{prefix}b")
        x = layers.MaxPooling2D(2, name=f"{prefix}_pool")(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if head_dropout > 0:
        x = layers.Dropout(head_dropout, name="head_dropout")(x)
    # float32 softmax even under mixed precision, for a numerically stable loss.
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, dtype="float32", name="predictions"
    )(x)
    model = keras.Model(inputs, outputs, name=f"scratch_{spec.name}")
    log.info(
        "built scratch_%s: depth=%d width=%d residual=%s params=%d",
        spec.name,
        depth,
        width,
        residual,
        model.count_params(),
    )
    return model
