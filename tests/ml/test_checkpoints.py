"""Resumable training: a fit stopped after epoch k and resumed from the store equals an uninterrupted one.

The "kill" here is an exception raised right after the k-th checkpoint is published (the worst
moment for the previous epoch's state: it has just been deleted); the fault suite
(tests/faults/test_train_kill.py) SIGKILLs real processes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.config import TrainConfig

SIZE = 32
EPOCHS = 6
KILL_AFTER = 4  # after the warm-up: early stopping holds a best epoch and best weights by then


class _Killed(RuntimeError):
    """Stands in for the task dying right after a checkpoint was written."""


def _config(candidate: str, **kwargs: Any) -> TrainConfig:
    base = {"candidates": (candidate,), "epochs": EPOCHS, "head_epochs": EPOCHS, "image_size": SIZE, "batch_size": 8,
            "weights": "none",
            "seed": 7}
    return TrainConfig(**{**base, **kwargs})


def _train(dataset: Path, out: Path, cache_root: Path, config: TrainConfig, checkpoints: Any) -> dict[str, Any]:
    from ml.training.fit import train_candidate

    return train_candidate(dataset, config.candidates[0], out, config, cache_root=cache_root, checkpoints=checkpoints)


def _kill_after(monkeypatch: pytest.MonkeyPatch, epochs_done: int) -> None:
    from ml.training.checkpoints import CheckpointStore

    original = CheckpointStore.save

    def save_then_die(self: CheckpointStore, done: int, payload: bytes) -> dict[str, Any]:
        pointer = original(self, done, payload)
        if done == epochs_done:
            raise _Killed(f"killed after epoch {done}")
        return pointer

    monkeypatch.setattr(CheckpointStore, "save", save_then_die)


def _weights(out: Path) -> list[np.ndarray]:
    from ml.models import load_model

    return [np.asarray(v) for v in load_model(out / "model.keras", compile=False).weights]


@pytest.mark.parametrize(("candidate", "options"), [
    ("scratch_tiny", {}),  # images, augmentation and dropout on: every random draw restored or re-derived
    ("transfer_mobilenet", {"alpha": 0.25, "augment": False}),  # the head on cached bottleneck features
    ("transfer_mobilenet", {"alpha": 0.25, "bank_views": 2}),  # the head on the augmented bank: views by epoch
])
def test_resumed_training_is_identical_to_an_uninterrupted_one(
    candidate: str, options: dict[str, Any], tiny_dataset: Path, tmp_path: Path, store: Any,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.training.checkpoints import CheckpointStore, unpack_state

    config = _config(candidate, candidate_options={candidate: options})
    straight_ckpt = CheckpointStore.for_candidate(store, "m", "run-straight", candidate)
    straight = _train(tiny_dataset, tmp_path / "straight", tmp_path / "cache-a", config, straight_ckpt)

    resumed_ckpt = CheckpointStore.for_candidate(store, "m", "run-killed", candidate)
    with monkeypatch.context() as patch:
        _kill_after(patch, KILL_AFTER)
        with pytest.raises(_Killed):
            _train(tiny_dataset, tmp_path / "killed", tmp_path / "cache-b", config, resumed_ckpt)
    assert store.get_json(resumed_ckpt.prefix + "latest.json")["epochs_done"] == KILL_AFTER
    # Another worker: fresh work dir and caches, nothing local from the killed try.
    with caplog.at_level(logging.INFO, logger="ml.training.checkpoints"):
        resumed = _train(tiny_dataset, tmp_path / "retry", tmp_path / "cache-c", config, resumed_ckpt)

    assert f"resuming {candidate} at epoch {KILL_AFTER + 1} of {EPOCHS}" in caplog.text
    history = (tmp_path / "retry" / "history.csv").read_text()
    assert history == (tmp_path / "straight" / "history.csv").read_text()
    assert [int(line.split(",")[0]) for line in history.splitlines()[1:]] == list(range(EPOCHS))
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "retry"), strict=True):
        np.testing.assert_array_equal(a, b)
    for key in ("val_loss", "val_accuracy", "best_epoch", "epochs_run"):
        assert resumed[key] == straight[key], key
    assert resumed["epochs_run"] == EPOCHS
    # The last states of both fits match field by field: callback counters and every saved array.
    (_, a_bytes), (_, b_bytes) = straight_ckpt.load(), resumed_ckpt.load()
    (a_groups, a_meta), (b_groups, b_meta) = unpack_state(a_bytes), unpack_state(b_bytes)
    assert a_meta["callbacks"] == b_meta["callbacks"] and a_meta["history"] == b_meta["history"]
    assert a_meta["callbacks"]["es_best"] is not None, "early stopping was past its warm-up"
    for group in a_groups:
        for x, y in zip(a_groups[group], b_groups[group], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=group)


def test_a_damaged_or_foreign_checkpoint_is_ignored(
    tiny_dataset: Path, tmp_path: Path, store: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.training.checkpoints import CheckpointStore

    config = _config("scratch_tiny", epochs=3)
    ckpt = CheckpointStore.for_candidate(store, "m", "run-damaged", "scratch_tiny")
    with monkeypatch.context() as patch:
        _kill_after(patch, 2)
        with pytest.raises(_Killed):
            _train(tiny_dataset, tmp_path / "killed", tmp_path / "cache", config, ckpt)
    state_key = ckpt.prefix + store.get_json(ckpt.prefix + "latest.json")["state"]
    good = store.get_bytes(state_key)
    assert [k.rsplit("/", 1)[1] for k in store.list_keys(ckpt.prefix)] == ["epoch-00002.npz", "latest.json"]

    store.put_bytes(state_key, good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped
    with caplog.at_level(logging.INFO, logger="ml.training.checkpoints"):
        summary = _train(tiny_dataset, tmp_path / "after-damage", tmp_path / "cache", config, ckpt)
    assert "fails its sha256" in caplog.text and "resuming" not in caplog.text
    assert summary["epochs_run"] == 3

    # A state of other settings (here another learning rate) is not resumed either.
    ckpt.delete()
    with monkeypatch.context() as patch:
        _kill_after(patch, 2)
        with pytest.raises(_Killed):
            _train(tiny_dataset, tmp_path / "killed-2", tmp_path / "cache", config, ckpt)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ml.training.checkpoints"):
        _train(tiny_dataset, tmp_path / "other", tmp_path / "cache", _config("scratch_tiny", epochs=3,
                                                                              learning_rate=5e-4), ckpt)
    assert "made with other settings" in caplog.text and "resuming" not in caplog.text


def test_checkpoint_keys_live_under_the_run() -> None:
    from ml.errors import UnsafeNameError
    from ml.registry import layout

    assert layout.checkpoint_prefix("m", "manual__2026-01-01T00:00:00+00:00", "scratch_tiny") == (
        "m/runs/manual__2026-01-01T00~3a00~3a00~2b00~3a00/checkpoints/scratch_tiny/")
    assert layout.checkpoint_state_name(3) == "epoch-00003.npz"
    with pytest.raises(UnsafeNameError):
        layout.checkpoint_state_name(0)


def test_interval_and_a_failed_save_does_not_end_the_fit(
    tiny_dataset: Path, tmp_path: Path, store: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.errors import StorageError
    from ml.training.checkpoints import CheckpointStore

    original, attempted = CheckpointStore.save, []

    def flaky(self: CheckpointStore, done: int, payload: bytes) -> dict[str, Any]:
        attempted.append(done)
        if done == 2:
            raise StorageError("cannot reach object store endpoint 127.0.0.1:1")
        return original(self, done, payload)

    monkeypatch.setattr(CheckpointStore, "save", flaky)
    ckpt = CheckpointStore.for_candidate(store, "m", "run-flaky", "scratch_tiny")
    with caplog.at_level(logging.WARNING, logger="ml.training.checkpoints"):
        summary = _train(tiny_dataset, tmp_path / "out", tmp_path / "cache",
                         _config("scratch_tiny", epochs=4, checkpoint_every_epochs=2), ckpt)

    assert attempted == [2, 4], "every 2 epochs"
    assert "after 2 epochs not saved" in caplog.text
    assert summary["epochs_run"] == 4
    assert store.get_json(ckpt.prefix + "latest.json")["epochs_done"] == 4


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_checkpoint_interval_is_validated(value: Any) -> None:
    from ml.errors import ConfigError

    with pytest.raises(ConfigError, match="train.checkpoint_every_epochs"):
        TrainConfig(checkpoint_every_epochs=value)


def test_callback_counters_and_learning_rate_survive_a_resume(tmp_path: Path, store: Any) -> None:
    import keras

    from ml.training.callbacks import make_callbacks
    from ml.training.checkpoints import CheckpointStore

    target = CheckpointStore.for_candidate(store, "m", "run-counters", "scratch_tiny")
    staging = tmp_path / "staging"
    staging.mkdir()

    def fresh() -> tuple[Any, list[Any]]:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        model.optimizer.build(model.trainable_variables)
        callbacks = make_callbacks(staging, tmp_path / "out", patience=8, has_val=True, checkpoints=target,
                                   candidate="scratch_tiny")
        stateful = [callbacks[0], callbacks[1], callbacks[2], callbacks[-1]]  # early stop, plateau, CSV, checkpoint
        for callback in stateful:
            callback.set_model(model)
        stateful[-1].track([], "same settings")
        return model, stateful

    model, (stop, plateau, csv, checkpoint) = fresh()
    for callback in (stop, plateau, csv, checkpoint):
        callback.on_train_begin()
    stop.wait, stop.best, stop.best_epoch = 2, 0.5, 3
    stop.best_weights = [np.full((2, 1), 7.0, np.float32), np.zeros(1, np.float32)]
    plateau.wait, plateau.cooldown_counter, plateau.best = 1, 1, 0.6
    model.optimizer.learning_rate = 2.5e-4  # as ReduceLROnPlateau sets it
    logs = {"loss": 1.0, "val_loss": 0.7}
    csv.on_epoch_end(4, dict(logs))
    checkpoint.on_epoch_end(4, dict(logs))

    model2, (stop2, plateau2, csv2, checkpoint2) = fresh()
    resumed = checkpoint2.resume(model2, 10)
    for callback in (stop2, plateau2, csv2, checkpoint2):  # Keras' order: they reset, then the checkpoint restores
        callback.on_train_begin()

    assert resumed.epochs_done == 5 and not resumed.finished and resumed.history == {"loss": [1.0], "val_loss": [0.7]}
    assert (stop2.wait, stop2.best, stop2.best_epoch) == (2, 0.5, 3)
    np.testing.assert_array_equal(stop2.best_weights[0], np.full((2, 1), 7.0))
    assert (plateau2.wait, plateau2.cooldown_counter, plateau2.best) == (1, 1, 0.6)
    assert float(np.asarray(model2.optimizer.learning_rate)) == pytest.approx(2.5e-4)
    for a, b in zip(model.variables + model.optimizer.variables, model2.variables + model2.optimizer.variables,
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert csv2.append and (staging / "history.csv").read_text().splitlines()[1].startswith("4,")

    # Early stopping ended the fit right after a save: the retry trains no further epoch.
    model.stop_training = True
    checkpoint.on_epoch_end(5, dict(logs))
    model3, (*_, checkpoint3) = fresh()
    assert checkpoint3.resume(model3, 10).finished


@pytest.mark.parametrize("every", [1, 3])  # 3: the shorter fit's last epoch (2) is saved anyway
def test_a_search_trials_next_rung_resumes_where_its_previous_rung_ended(
    every: int, tiny_dataset: Path, tmp_path: Path, store: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.training.checkpoints import CheckpointStore
    from ml.training.fit import train_candidate
    from ml.training.search import Trial, trial_train_config

    trial = Trial("scratch_tiny__t01", "scratch_tiny", {"learning_rate": 0.002})
    base = _config("scratch_tiny", checkpoint_every_epochs=every)
    straight_ckpt = CheckpointStore.for_candidate(store, "m", "run-straight", trial.name)
    straight = train_candidate(tiny_dataset, trial.name, tmp_path / "straight", trial_train_config(base, trial, 4),
                               cache_root=tmp_path / "cache-a", checkpoints=straight_ckpt)
    ckpt = CheckpointStore.for_candidate(store, "m", "run-rungs", trial.name)
    rung_1 = train_candidate(tiny_dataset, trial.name, tmp_path / "rung-1", trial_train_config(base, trial, 2),
                             cache_root=tmp_path / "cache-b", checkpoints=ckpt)
    assert rung_1["epochs_run"] == 2 and store.get_json(ckpt.prefix + "latest.json")["epochs_done"] == 2

    # Rung 2 on another worker: fresh folders and caches, only the store in common.
    with caplog.at_level(logging.INFO, logger="ml.training.checkpoints"):
        rung_2 = train_candidate(tiny_dataset, trial.name, tmp_path / "rung-2", trial_train_config(base, trial, 4),
                                 cache_root=tmp_path / "cache-c", checkpoints=ckpt)

    assert f"resuming {trial.name} at epoch 3 of 4 (2 completed epochs restored)" in caplog.text
    assert "made with other settings" not in caplog.text
    assert rung_2["epochs_run"] == 4 and rung_2["resumed_epochs"] == 2 and rung_1["resumed_epochs"] == 0
    history = (tmp_path / "rung-2" / "history.csv").read_text()
    assert [int(line.split(",")[0]) for line in history.splitlines()[1:]] == [0, 1, 2, 3]
    # Resuming is continuing: 2 + 2 epochs are the 4 epochs of one uninterrupted fit.
    assert history == (tmp_path / "straight" / "history.csv").read_text()
    assert rung_2["val_loss"] == straight["val_loss"]
