"""Resumable training: each completed epoch's state in the object store, and the resume step.

A killed training task (OOM, node drain, spot preemption) is retried by Airflow, maybe on another
worker with an empty ``ML_WORK_DIR``. What it needs to go on where the killed one stopped lives
under ``<model>/runs/<run>/checkpoints/<candidate>/`` (`ml.registry.layout.checkpoint_prefix`):

    epoch-00003.npz   one object per saved epoch: model variables (weights, batch-norm statistics,
                      dropout seed states), optimizer variables (step, learning rate, Adam moments),
                      early stopping's best weights, the input pipeline's random state (shuffle
                      epoch counter, augmentation seed states), and ``meta`` (JSON: epochs done,
                      callback counters, the curves and history.csv so far, a settings fingerprint)
    latest.json       written last: {epochs_done, state, sha256, bytes}; older states are deleted
                      after it

A reader trusts only the state ``latest.json`` names, and only if its sha256 matches: a task killed
between the two writes leaves the previous pointer, which still names a complete state. A state
made with other settings (a changed config, another dataset) is ignored with a warning.

`EpochCheckpoint.resume` runs in `ml.training.fit._fit` before ``model.fit``; the callback saves
after every ``train.checkpoint_every_epochs`` epochs. Restored training is bit-identical to an
uninterrupted one on CPU (tests/ml/test_checkpoints.py): every random draw of a fit is either in a
variable saved here or a pure function of (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import StorageError
from ml.registry import layout

if TYPE_CHECKING:
    import keras

    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_GROUPS = ("model", "optimizer", "best", "data")  # array groups inside a state object


@dataclass(frozen=True)
class CheckpointStore:
    """Where one candidate's checkpoints live: a store and its prefix (see `for_candidate`)."""

    store: ObjectStore
    prefix: str

    @classmethod
    def for_candidate(cls, store: ObjectStore, model_name: str, run_id: str, candidate: str) -> CheckpointStore:
        return cls(store, layout.checkpoint_prefix(model_name, run_id, candidate))

    @property
    def uri(self) -> str:
        return self.store.uri(self.prefix)

    def save(self, epochs_done: int, payload: bytes) -> dict[str, Any]:
        """Publish one state: the object first, the pointer last, then drop older states."""
        name = layout.checkpoint_state_name(epochs_done)
        self.store.put_bytes(self.prefix + name, payload)
        pointer = {"format": FORMAT_VERSION, "epochs_done": epochs_done, "state": name,
                   "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        self.store.put_json(self.prefix + layout.CHECKPOINT_POINTER, pointer)
        for key in self.store.list_keys(self.prefix):
            if key not in (self.prefix + name, self.prefix + layout.CHECKPOINT_POINTER):
                self.store.delete(key)
        return pointer

    def load(self) -> tuple[dict[str, Any], bytes] | None:
        """(pointer, verified state bytes) of the latest complete state, or None (none, or damaged)."""
        found = self.store.get_with_etag(self.prefix + layout.CHECKPOINT_POINTER)
        if found is None:
            return None
        where = self.store.uri(self.prefix + layout.CHECKPOINT_POINTER)
        try:
            pointer = json.loads(found[0])
            name = layout.check_name(pointer["state"], "checkpoint state name")
            expected, size = str(pointer["sha256"]), int(pointer["bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring checkpoint %s: unreadable pointer (%s); training from the start", where, exc)
            return None
        state = self.store.get_with_etag(self.prefix + name)
        if state is None or len(state[0]) != size or hashlib.sha256(state[0]).hexdigest() != expected:
            log.warning("ignoring checkpoint %s: %s is missing or fails its sha256; training from the start",
                        where, name)
            return None
        return pointer, state[0]

    def delete(self) -> int:
        """Remove every checkpoint of the candidate (after it is published); returns how many objects."""
        return self.store.delete_prefix(self.prefix)


@dataclass
class Resumed:
    """What `EpochCheckpoint.resume` restored before ``model.fit``."""

    epochs_done: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    finished: bool = False  # early stopping had already ended the fit


def fingerprint(settings: Any, dataset_hash: str, model: keras.Model) -> str:
    """A digest of what makes a state reusable: the candidate's settings, the data, the model's variables.

    The epoch target is left out: a fit to more epochs continues a shorter one's state (a search trial's
    next rung resumes its previous rung; `ml.training.search`), and every other setting must match.
    """
    shapes = [list(v.shape) for v in model.variables]
    text = json.dumps({"settings": repr(_without_epoch_target(settings)), "dataset": dataset_hash,
                       "model": model.name, "shapes": shapes}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_epoch_target(settings: Any) -> Any:
    """`settings` (a `CandidateSettings`) with ``epochs`` and its ``epochs`` option blanked."""
    if not (dataclasses.is_dataclass(settings) and hasattr(settings, "epochs")):
        return settings
    options = {k: v for k, v in dict(getattr(settings, "options", None) or {}).items() if k != "epochs"}
    return dataclasses.replace(settings, epochs=0, options=options)


def pack_state(groups: Mapping[str, Sequence[Any]], meta: Mapping[str, Any]) -> bytes:
    """One uncompressed .npz (weights do not compress; the save is on the epoch's critical path)."""
    arrays = {f"{group}/{i}": np.asarray(value) for group in _GROUPS for i, value in enumerate(groups.get(group, ()))}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_state(payload: bytes) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """The inverse of `pack_state` (no pickles: arrays and JSON only)."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
        groups: dict[str, list[np.ndarray]] = {}
        for group in _GROUPS:
            count = int(meta["counts"].get(group, 0))
            groups[group] = [archive[f"{group}/{i}"] for i in range(count)]
    return groups, meta


def epoch_checkpoint(
    target: CheckpointStore,
    *,
    candidate: str,
    every: int,
    early_stopping: Any,
    plateau: Any,
    csv_logger: Any,
) -> keras.callbacks.Callback:
    """The callback saving the fit's state to `target` after every `every` completed epochs.

    It must run after the callbacks whose state it saves (``make_callbacks`` and ``_fit`` put it
    last): their counters are final for the epoch, and on resume it restores them in
    ``on_train_begin``, after they reset themselves.
    """
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.target, self.candidate, self.every = target, candidate, max(1, int(every))
            self.data_state: list[Any] = []  # the input pipeline's random-state variables (`track`)
            self.fingerprint = ""
            self.history: dict[str, list[float]] = {}
            self._pending: dict[str, Any] | None = None
            self.saves: list[dict[str, float]] = []  # seconds and bytes of every save, for the summary
            self.resumed_epochs = 0  # completed epochs restored by `resume` (train_summary.json records it)

        def track(self, variables: Sequence[Any], fingerprint_value: str) -> None:
            self.data_state, self.fingerprint = list(variables), fingerprint_value

        def resume(self, model: keras.Model, epochs: int) -> Resumed:
            """Restore the latest matching state into `model` (and the pipeline); call before ``fit``."""
            self.history = {}
            found = self.target.load()
            if found is None:
                return Resumed()
            pointer, payload = found
            groups, meta = unpack_state(payload)
            if meta.get("fingerprint") != self.fingerprint or len(groups["data"]) != len(self.data_state):
                log.warning("ignoring checkpoint %s: it was made with other settings, data or model; "
                            "training %s from the start", self.target.uri, self.candidate)
                return Resumed()
            for variable, value in zip(model.variables, groups["model"], strict=True):
                variable.assign(value)
            model.optimizer.build(model.trainable_variables)
            for variable, value in zip(model.optimizer.variables, groups["optimizer"], strict=True):
                variable.assign(value)
            for variable, value in zip(self.data_state, groups["data"], strict=True):
                variable.assign(value)
            csv_logger.append = True
            with open(csv_logger.filename, "w", encoding="utf-8") as fh:
                fh.write(meta["history_csv"])
            self._pending = {**meta["callbacks"], "best_weights": groups["best"] or None}
            self.history = {k: list(v) for k, v in meta["history"].items()}
            done = int(meta["epochs_done"])
            self.resumed_epochs = done
            source = self.target.store.uri(self.target.prefix + pointer["state"])
            log.info("resuming %s at epoch %d of %d (%d completed epochs restored) from %s",
                     self.candidate, done + 1, epochs, done, source)
            return Resumed(done, {k: list(v) for k, v in self.history.items()}, bool(meta["stop_training"]))

        def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
            state, self._pending = self._pending, None
            if state is None:
                return
            early_stopping.wait, early_stopping.stopped_epoch = state["es_wait"], state["es_stopped_epoch"]
            early_stopping.best, early_stopping.best_epoch = state["es_best"], state["es_best_epoch"]
            early_stopping.best_weights = state["best_weights"]
            plateau.wait, plateau.cooldown_counter, plateau.best = (
                state["lr_wait"], state["lr_cooldown"], state["lr_best"])

        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            for name, value in (logs or {}).items():
                self.history.setdefault(name, []).append(float(value))
            done = epoch + 1
            # The fit's last epoch is always saved: a longer fit (a search trial's next rung) resumes from it.
            last = done == (self.params or {}).get("epochs")
            if done % self.every and not self.model.stop_training and not last:
                return
            started = time.perf_counter()
            csv_logger.csv_file.flush()
            with open(csv_logger.filename, encoding="utf-8") as fh:
                history_csv = fh.read()
            best = early_stopping.best_weights or []
            groups = {"model": [v.numpy() for v in self.model.variables],
                      "optimizer": [v.numpy() for v in self.model.optimizer.variables],
                      "best": best, "data": [v.numpy() for v in self.data_state]}
            meta = {
                "format": FORMAT_VERSION, "candidate": self.candidate, "epochs_done": done,
                "fingerprint": self.fingerprint, "stop_training": bool(self.model.stop_training),
                "history": self.history, "history_csv": history_csv,
                "counts": {name: len(values) for name, values in groups.items()},
                "callbacks": {
                    "es_wait": int(early_stopping.wait), "es_stopped_epoch": int(early_stopping.stopped_epoch),
                    "es_best": _float_or_none(early_stopping.best), "es_best_epoch": int(early_stopping.best_epoch),
                    "lr_wait": int(plateau.wait), "lr_cooldown": int(plateau.cooldown_counter),
                    "lr_best": _float_or_none(plateau.best),
                },
            }
            payload = pack_state(groups, meta)
            try:
                self.target.save(done, payload)
            except StorageError as exc:
                # The pointer still names the previous complete state: a store blip must not end a
                # long fit that would otherwise finish (its publish retries on its own).
                log.warning("checkpoint %s after %d epochs not saved (%s); training goes on, a retry would "
                            "resume from the previous checkpoint", self.candidate, done, exc)
                return
            seconds = time.perf_counter() - started
            self.saves.append({"seconds": seconds, "bytes": len(payload)})
            log.info("checkpoint %s: %d epochs done, %.1f MB in %.2f s -> %s", self.candidate, done,
                     len(payload) / 1e6, seconds, self.target.uri)

    return EpochCheckpoint()


def find_checkpoint(callbacks: Sequence[Any]) -> Any:
    """The `epoch_checkpoint` callback among `callbacks`, or None."""
    return next((c for c in callbacks if type(c).__name__ == "EpochCheckpoint"), None)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
