"""Accelerator setup: mixed precision on one GPU, MirroredStrategy across several, CPU unchanged."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """What training runs on.

    Attributes:
        gpus: Number of visible GPUs.
        mixed_precision: Whether the global Keras policy is ``mixed_float16``.
        strategy: A tf.distribute strategy; build and compile models inside ``strategy.scope()``.
        description: One line for logs and train_summary.json.
    """

    gpus: int
    mixed_precision: bool
    strategy: Any
    description: str

    def scope(self) -> Any:
        """The strategy scope to build and compile models in."""
        return self.strategy.scope()


def configure_hardware(*, allow_mixed_precision: bool = True) -> Hardware:
    """Detect GPUs and configure TensorFlow/Keras for them (logged once per call).

    On CPU nothing is changed. With GPUs: memory growth on (so two tasks can share a card's
    pool slot without one grabbing all memory), the ``mixed_float16`` policy, and a
    MirroredStrategy when there is more than one GPU.
    """
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        desc = "CPU only: float32, default strategy"
        log.info("hardware: %s", desc)
        return Hardware(0, False, tf.distribute.get_strategy(), desc)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            # Already initialised in this process: the setting can no longer change.
            log.debug("memory growth for %s already fixed", gpu.name)
    mixed = allow_mixed_precision
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        desc = f"{len(gpus)} GPUs: MirroredStrategy, {'mixed_float16' if mixed else 'float32'}"
    else:
        strategy = tf.distribute.get_strategy()
        desc = f"1 GPU ({gpus[0].name}): {'mixed_float16' if mixed else 'float32'}"
    log.info("hardware: %s", desc)
    return Hardware(len(gpus), mixed, strategy, desc)
