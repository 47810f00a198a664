"""Transfer-learning models: a frozen keras.applications backbone plus a small softmax head.

Model layout (every transfer and fine-tuned candidate, whatever path trained it)::

    image (RGB float32 [0, 255]) -> preprocess (ImagePreprocessing) -> <backbone> (training=False)
        -> avg_pool (GlobalAveragePooling2D) -> head (nested model: dropout [-> dense relu -> dropout]
        -> predictions softmax)

The head is its own nested model so the bottleneck path can train it on cached features and
then drop it onto the backbone unchanged. The backbone is always *called* with
``training=False``, so its BatchNormalization layers stay in inference mode even when
fine-tuning unfreezes them (keras-io's fine-tuning recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError
from ml.models.registry import (
    FROZEN_PHASE_OPTION_KEYS,
    TRAINING_OPTION_KEYS,
    TRANSFER_OPTION_KEYS,
    ArchitectureSpec,
    get_architecture,
    imagenet_builds_for_file,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

HEAD_NAME = "head"
POOL_NAME = "avg_pool"
PREPROCESS_NAME = "preprocess"


@dataclass(frozen=True)
class TransferOptions:
    """Validated transfer-candidate options (``TrainConfig.options_for(candidate)``)."""

    alpha: float | None
    dropout: float = 0.2
    head_units: int = 0  # 0: softmax straight on the pooled features


def transfer_options(
    arch: str | ArchitectureSpec, options: Mapping[str, Any] | None = None
) -> TransferOptions:
    """Check a transfer candidate's options; unknown keys raise ConfigError naming the allowed ones."""
    spec = arch if isinstance(arch, ArchitectureSpec) else get_architecture(arch)
    opts = dict(options or {})
    allowed = set(TRANSFER_OPTION_KEYS) | set(TRAINING_OPTION_KEYS) | set(FROZEN_PHASE_OPTION_KEYS)
    unknown = set(opts) - allowed
    if unknown:
        raise ConfigError(
            f"unknown options {sorted(unknown)} for transfer_{spec.name}; allowed: {sorted(allowed)}"
        )
    dropout = float(opts.get("dropout", 0.2))
    head_units = int(opts.get("head_units", 0))
    if not 0 <= dropout < 1:
        raise ConfigError(f"transfer_{spec.name}: dropout must be in [0, 1), got {dropout}")
    if head_units < 0:
        raise ConfigError(f"transfer_{spec.name}: head_units must be >= 0, got {head_units}")
    return TransferOptions(
        alpha=spec.resolve_alpha(opts.get("alpha")), dropout=dropout, head_units=head_units
    )


def _made_for_hint(file_name: str) -> str:
    """'' or, for a Keras ImageNet file name, which candidate settings the file was made for."""
    hints = []
    for arch, alpha, size in imagenet_builds_for_file(file_name):
        width, alpha_option = (f" alpha {alpha}", f"alpha: {alpha}, ") if alpha is not None else ("", "")
        hints.append(f". {file_name} is Keras' ImageNet file for {arch}{width} at {size} px: train candidate "
                     f"transfer_{arch} with train.candidate_options "
                     f"{{transfer_{arch}: {{{alpha_option}image_size: {size}}}}}")
    return "".join(hints)


def build_backbone(
    arch: str | ArchitectureSpec, image_size: int, *, alpha: float | None = None, weights: str | None = None
) -> keras.Model:
    """A frozen headless backbone.

    Args:
        arch: Registry name or spec.
        image_size: Input size in pixels.
        alpha: MobileNet width multiplier.
        weights: None (random), "imagenet" (Keras' cache), or a local weights file
            (``.weights.h5``, legacy ``.h5`` or ``.keras``) loaded with ``load_weights``.
    """
    spec = arch if isinstance(arch, ArchitectureSpec) else get_architecture(arch)
    if weights in (None, "imagenet"):
        backbone = spec.build_backbone(image_size, alpha=alpha, weights=weights)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights file {path} for {spec.name} does not exist")
        backbone = spec.build_backbone(image_size, alpha=alpha, weights=None)
        try:
            backbone.load_weights(str(path))
        except (ValueError, OSError) as exc:
            raise ConfigError(
                f"weights file {path} does not fit {spec.name} at {image_size}px (alpha={alpha}): {exc}"
                + _made_for_hint(path.name)
            ) from exc
        log.info("loaded backbone weights for %s from %s", spec.name, path)
    backbone.trainable = False
    return backbone


def build_head(
    feature_dim: int, num_classes: int, *, dropout: float = 0.2, head_units: int = 0
) -> keras.Model:
    """The classifier head on pooled backbone features (a nested model named ``head``)."""
    import keras
    from keras import layers

    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    features = keras.Input((feature_dim,), name="features")
    x = features
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    if head_units > 0:
        x = layers.Dense(
            head_units, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4), name="head_dense"
        )(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name="head_dense_dropout")(x)
    # float32 softmax even under mixed precision, for a numerically stable loss.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(features, outputs, name=HEAD_NAME)


def assemble_transfer(
    arch: str | ArchitectureSpec,
    backbone: keras.Model,
    head: keras.Model,
    image_size: int,
    *,
    name: str | None = None,
) -> keras.Model:
    """input -> preprocessing -> backbone(training=False) -> global average pool -> head."""
    import keras
    from keras import layers

    from ml.models.layers import custom_objects

    spec = arch if isinstance(arch, ArchitectureSpec) else get_architecture(arch)
    preprocessing = custom_objects()["ImagePreprocessing"]
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = preprocessing(mode=spec.preprocess, name=PREPROCESS_NAME)(inputs)
    x = backbone(x, training=False)
    x = layers.GlobalAveragePooling2D(name=POOL_NAME)(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=name or f"transfer_{spec.name}")


def build_transfer(
    arch: str,
    num_classes: int,
    image_size: int,
    *,
    options: Mapping[str, Any] | TransferOptions | None = None,
    weights: str | None = None,
) -> keras.Model:
    """A transfer model with a frozen backbone (see the module docstring for the layout).

    Args:
        arch: Registry architecture name (``mobilenet_v2``) or ``transfer_<arch>``.
        num_classes: Softmax units.
        image_size: Input size in pixels.
        options: ``alpha``, ``dropout``, ``head_units``: raw candidate options, or options
            `transfer_options` already checked (training passes its resolved settings' ones).
        weights: As `build_backbone` (already resolved by `ml.models.weights.resolve_weights`).
    """
    spec = get_architecture(arch)
    opts = options if isinstance(options, TransferOptions) else transfer_options(spec, options)
    backbone = build_backbone(spec, image_size, alpha=opts.alpha, weights=weights)
    head = build_head(
        int(backbone.output_shape[-1]), num_classes, dropout=opts.dropout, head_units=opts.head_units
    )
    model = assemble_transfer(spec, backbone, head, image_size)
    log.info(
        "built transfer_%s: %dpx alpha=%s weights=%s params=%d (trainable %d)",
        spec.name,
        image_size,
        opts.alpha,
        weights or "random",
        model.count_params(),
        count_trainable(model),
    )
    return model


def feature_extractor(model: keras.Model) -> keras.Model:
    """The transfer model up to the pooled features (what the head is trained on)."""
    import keras

    return keras.Model(model.inputs, model.get_layer(POOL_NAME).output, name="features")


def find_backbone(model: keras.Model) -> keras.Model:
    """The nested backbone model of a transfer/fine-tuned model."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != HEAD_NAME]
    if len(nested) != 1:
        raise ConfigError(
            f"model {model.name!r} is not a transfer model: expected one nested backbone, "
            f"found {[layer.name for layer in nested]}"
        )
    return nested[0]


def count_trainable(model: keras.Model) -> int:
    """Number of trainable parameters."""
    return int(sum(int(w.numpy().size) for w in model.trainable_weights))
