"""Keras callbacks of every fit: early stopping, LR decay, CSV history, TensorBoard, epoch checkpoints.

Keras is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from ml.training.checkpoints import CheckpointStore

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"
# From-scratch nets with batch norm have erratic validation loss for the first epochs (running
# statistics still settling): without a warm-up, early stopping "restored" epoch 1 of a net that
# went on to learn (seen on the sample data: 0.38 vs 0.76 val accuracy).
WARMUP_EPOCHS = 3  # epochs before early stopping may act


def make_callbacks(
    staging: Path,
    out_dir: Path,
    patience: int,
    has_val: bool,
    *,
    checkpoints: CheckpointStore | None = None,
    candidate: str = "",
    checkpoint_every: int = 1,
    warmup_epochs: int = WARMUP_EPOCHS,
) -> list[keras.callbacks.Callback]:
    """Early stopping (best weights restored), LR decay on plateaus, CSV history, TensorBoard, checkpoint.

    Args:
        staging: The staging folder: history.csv is written there.
        out_dir: The candidate folder: TensorBoard logs stream to its ``tensorboard/`` (removed
            first: the logs of an earlier, failed attempt would interleave with this one's).
        patience: Epochs without improvement before stopping (at least 1); the LR halves after
            half of it (at least 3).
        has_val: Watch ``val_loss`` (True) or the training ``loss``.
        checkpoints: Where the candidate's per-epoch state goes (`ml.training.checkpoints`), so a
            retried task resumes; None: no checkpoints (a run without an object store).
        candidate: The candidate's name, for the checkpoint's logs.
        checkpoint_every: Save the state after every this many completed epochs (>= 1).
        warmup_epochs: Epochs before early stopping may act (0 for a fine-tune: it starts trained).
    """
    import keras

    monitor = "val_loss" if has_val else "loss"
    tensorboard = out_dir / TENSORBOARD_DIR
    shutil.rmtree(tensorboard, ignore_errors=True)
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=monitor, patience=max(1, patience), restore_best_weights=True, start_from_epoch=warmup_epochs
    )
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor=monitor, factor=0.5, patience=max(3, patience // 2), cooldown=1, min_lr=1e-6
    )
    csv_logger = keras.callbacks.CSVLogger(str(staging / HISTORY_FILE))
    callbacks = [early_stopping, plateau, csv_logger]
    if tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard), write_graph=False, profile_batch=0))
    else:
        log.info("tensorboard is not installed: no TensorBoard logs (history.csv has the curves)")
    if checkpoints is not None:
        from ml.training.checkpoints import epoch_checkpoint

        # Last: it saves the other callbacks' state once they are done with the epoch.
        callbacks.append(epoch_checkpoint(checkpoints, candidate=candidate, every=checkpoint_every,
                                          early_stopping=early_stopping, plateau=plateau, csv_logger=csv_logger))
    return callbacks


def tensorboard_available() -> bool:
    """tf.summary needs the tensorboard package (not a dependency of tensorflow-cpu wheels here)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
