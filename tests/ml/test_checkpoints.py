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
    base = {"candidates": (candidate,), "epochs": EPOCHS, "image_size": SIZE, "batch_size": 8, "weights": "none",
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


@pytest.mark.parametrize("candidate", ["scratch_tiny"])
def test_resumed_training_is_identical_to_an_uninterrupted_one(
    candidate: str, tiny_dataset: Path, tmp_path: Path, store: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ml.training.checkpoints import CheckpointStore

    # Augmentation and dropout on: every random draw of the fit must be restored or re-derived.
    config = _config(candidate)
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
