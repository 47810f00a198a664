"""The callbacks of every fit: what they watch, and where the epoch checkpoint goes."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(("has_val", "monitor"), [(True, "val_loss"), (False, "loss")])
def test_callbacks_watch_val_loss_when_there_is_a_val_split(tmp_path: Path, has_val: bool, monitor: str) -> None:
    import keras

    from ml.training.callbacks import WARMUP_EPOCHS, make_callbacks, tensorboard_available

    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    stale = out / "tensorboard" / "train" / "events.out.tfevents.old"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier attempt")

    callbacks = make_callbacks(staging, out, patience=8, has_val=has_val)

    by_type = {type(c).__name__: c for c in callbacks}
    stop, plateau = by_type["EarlyStopping"], by_type["ReduceLROnPlateau"]
    assert stop.monitor == plateau.monitor == monitor
    assert stop.patience == 8 and stop.restore_best_weights and stop.start_from_epoch == WARMUP_EPOCHS
    assert plateau.patience == 4 and plateau.factor == 0.5
    assert Path(by_type["CSVLogger"].filename) == staging / "history.csv"
    assert "EpochCheckpoint" not in by_type, "no store given: no checkpoint"
    assert ("TensorBoard" in by_type) == tensorboard_available()
    assert not stale.exists(), "logs of an earlier attempt would interleave with this one's"
    assert all(isinstance(c, keras.callbacks.Callback) for c in callbacks)


def test_the_epoch_checkpoint_comes_last(tmp_path: Path) -> None:
    from ml.training.callbacks import make_callbacks
    from ml.training.checkpoints import CheckpointStore, find_checkpoint

    target = CheckpointStore(store=None, prefix="m/runs/r/checkpoints/scratch_tiny/")  # type: ignore[arg-type]
    callbacks = make_callbacks(tmp_path, tmp_path / "out", patience=8, has_val=True, checkpoints=target,
                               candidate="scratch_tiny", checkpoint_every=2)

    checkpoint = find_checkpoint(callbacks)
    assert callbacks[-1] is checkpoint, "it saves the other callbacks' state after they saw the epoch"
    assert checkpoint.every == 2 and checkpoint.target is target
