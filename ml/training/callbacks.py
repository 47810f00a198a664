"""Keras callbacks of every fit: early stopping, LR decay, CSV history, TensorBoard, checkpoint.

Keras is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ml.io import write_with

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.keras"
TENSORBOARD_DIR = "tensorboard"
# From-scratch nets with batch norm have erratic validation loss for the first epochs (running
# statistics still settling): without a warm-up, early stopping "restored" epoch 1 of a net that
# went on to learn (seen on the sample data: 0.38 vs 0.76 val accuracy).
WARMUP_EPOCHS = 3  # epochs before early stopping may act


def make_callbacks(
    staging: Path, out_dir: Path, patience: int, has_val: bool, *, warmup_epochs: int = WARMUP_EPOCHS
) -> list[keras.callbacks.Callback]:
    """Early stopping (best weights restored), LR decay on plateaus, CSV history, checkpoint, TensorBoard.

    Args:
        staging: The staging folder: history.csv and the checkpoint are written there.
        out_dir: The candidate folder: TensorBoard logs stream to its ``tensorboard/`` (removed
            first: the logs of an earlier, failed attempt would interleave with this one's).
        patience: Epochs without improvement before stopping (at least 1); the LR halves after
            half of it (at least 3).
        has_val: Watch ``val_loss`` (True) or the training ``loss``.
        warmup_epochs: Epochs before early stopping may act (0 for a fine-tune: it starts trained).
    """
    import keras

    monitor = "val_loss" if has_val else "loss"
    tensorboard = out_dir / TENSORBOARD_DIR
    shutil.rmtree(tensorboard, ignore_errors=True)
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor=monitor, patience=max(1, patience), restore_best_weights=True, start_from_epoch=warmup_epochs
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, factor=0.5, patience=max(3, patience // 2), cooldown=1, min_lr=1e-6
        ),
        keras.callbacks.CSVLogger(str(staging / HISTORY_FILE)),
        atomic_checkpoint(staging / CHECKPOINT_FILE, monitor),
    ]
    if tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard), write_graph=False, profile_batch=0))
    else:
        log.info("tensorboard is not installed: no TensorBoard logs (history.csv has the curves)")
    return callbacks


def tensorboard_available() -> bool:
    """tf.summary needs the tensorboard package (not a dependency of tensorflow-cpu wheels here)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def atomic_checkpoint(path: Path, monitor: str) -> keras.callbacks.Callback:
    """A callback saving the best model so far (lowest `monitor`) to `path`, atomically (`ml.io.write_with`)."""
    import keras

    class AtomicCheckpoint(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = float("inf")

        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            value = (logs or {}).get(monitor)
            if value is None or not value < self.best:
                return
            self.best = float(value)
            # Keras picks the format from the extension: the temporary name must end in .keras too.
            write_with(path, self.model.save, suffix=".keras")

    return AtomicCheckpoint()
