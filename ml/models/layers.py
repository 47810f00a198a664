"""Serialisable custom layers: the architecture's input preprocessing lives inside the model.

Models take RGB float32 pixels in [0, 255]; `ImagePreprocessing` reproduces
`keras.applications.imagenet_utils.preprocess_input`'s modes exactly, so a consumer only
decodes, resizes and feeds. No Lambda layers: models load with ``safe_mode=True``.

Keras is imported lazily (the classes are defined on first use and registered under the
``ml`` package), so importing this module stays cheap. ``from ml.models.layers import
ImagePreprocessing`` works through the module-level ``__getattr__``.
"""

from __future__ import annotations

import functools
from typing import Any

PREPROCESS_MODES = ("tf", "torch", "caffe", "none")

# ImageNet statistics used by keras.applications (imagenet_utils._preprocess_tensor_input).
_TORCH_MEAN = (0.485, 0.456, 0.406)  # RGB, after scaling to [0, 1]
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # BGR, pixels in [0, 255]

_LAYER_NAMES = ("ImagePreprocessing", "ProbabilityAverage")


@functools.cache
def custom_objects() -> dict[str, type]:
    """Define (once) and register this project's custom layers; returns {name: class}."""
    import keras
    from keras import ops

    from ml.errors import ConfigError

    @keras.saving.register_keras_serializable(package="ml")
    class ImagePreprocessing(keras.layers.Layer):
        """Map RGB [0, 255] pixels to what a backbone expects (keras.applications modes).

        Modes: ``tf`` scales to [-1, 1]; ``torch`` scales to [0, 1] then normalises with the
        ImageNet mean/std; ``caffe`` reorders RGB to BGR and subtracts the ImageNet BGR mean;
        ``none`` passes pixels through (the backbone normalises itself, e.g. EfficientNet).
        """

        def __init__(self, mode: str = "tf", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if mode not in PREPROCESS_MODES:
                raise ConfigError(f"ImagePreprocessing mode must be one of {PREPROCESS_MODES}, got {mode!r}")
            self.mode = mode

        def call(self, inputs: Any) -> Any:
            x = ops.cast(inputs, self.compute_dtype)
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "torch":
                mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
                std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
                return (x / 255.0 - mean) / std
            if self.mode == "caffe":
                bgr = ops.flip(x, axis=-1)
                return bgr - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
            return x

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "mode": self.mode}

    @keras.saving.register_keras_serializable(package="ml")
    class ProbabilityAverage(keras.layers.Layer):
        """Weighted mean of several (N, K) probability tensors: sum_i weights[i] * inputs[i].

        The weights are fixed (an ensemble's, chosen on validation), non-negative and sum to 1.
        """

        def __init__(self, member_weights: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            values = [float(w) for w in (member_weights or [])]
            if len(values) < 2 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
                raise ConfigError(f"ProbabilityAverage needs >= 2 non-negative weights summing to 1, got {values}")
            self.member_weights = values

        def call(self, inputs: Any) -> Any:
            if len(inputs) != len(self.member_weights):
                raise ConfigError(f"ProbabilityAverage has {len(self.member_weights)} weights for {len(inputs)} inputs")
            total = inputs[0] * self.member_weights[0]
            for tensor, weight in zip(inputs[1:], self.member_weights[1:], strict=True):
                total = total + ops.cast(tensor, total.dtype) * weight
            return total

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape[0]

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "member_weights": list(self.member_weights)}

    return {"ImagePreprocessing": ImagePreprocessing, "ProbabilityAverage": ProbabilityAverage}


def __getattr__(name: str) -> Any:
    # PEP 562: the layer classes exist only once Keras is imported.
    if name in _LAYER_NAMES:
        return custom_objects()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
