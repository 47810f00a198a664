"""The callbacks of every fit: what they watch, and a checkpoint that is never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest


class _FakeModel:
    """Stands in for a keras.Model: `save` writes the epoch it was called for, or dies half-way."""

    def __init__(self) -> None:
        self.epoch = 0
        self.fail = False
        self.saved_to: list[Path] = []

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.saved_to.append(path)
        path.write_bytes(b"half-")
        if self.fail:
            raise OSError("No space left on device")
        path.write_bytes(f"model of epoch {self.epoch}".encode())


def test_checkpoint_keeps_the_best_epoch_and_survives_a_failed_save(tmp_path: Path) -> None:
    from ml.training.callbacks import atomic_checkpoint

    path = tmp_path / "checkpoint.keras"
    model = _FakeModel()
    checkpoint = atomic_checkpoint(path, "val_loss")
    checkpoint.set_model(model)

    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    model.epoch = 1
    checkpoint.on_epoch_end(1, {"val_loss": 2.0})  # worse: not saved
    checkpoint.on_epoch_end(2, {"loss": 0.1})  # the monitored value is missing: not saved
    assert path.read_bytes() == b"model of epoch 0"
    model.epoch, model.fail = 3, True
    with pytest.raises(OSError, match="No space left"):
        checkpoint.on_epoch_end(3, {"val_loss": 0.5})

    assert path.read_bytes() == b"model of epoch 0", "a failed save must not replace the last good checkpoint"
    assert list(tmp_path.iterdir()) == [path], "the temporary file must be removed"
    # Keras chooses the format by extension: the temporary name must keep .keras.
    assert all(p.suffix == ".keras" and p != path for p in model.saved_to)


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
    assert "AtomicCheckpoint" in by_type
    assert ("TensorBoard" in by_type) == tensorboard_available()
    assert not stale.exists(), "logs of an earlier attempt would interleave with this one's"
    assert all(isinstance(c, keras.callbacks.Callback) for c in callbacks)
