"""Training one candidate: scratch CNN or frozen-backbone transfer model, to a candidate folder.

`train_candidate` writes ``model.keras``, ``labels.json``, ``preprocessing.json``,
``history.csv`` and ``train_summary.json`` into ``out_dir``. Everything is written in a
staging folder first and moved into place at the end, ``train_summary.json`` last, so a task
killed half-way leaves nothing half-written under the final names (and no summary that
would mark the folder complete). TensorBoard logs stream to ``out_dir/tensorboard``.

Transfer candidates without augmentation use cached bottleneck features
(`ml.training.bottleneck`): the backbone runs once per image, the head trains on features,
and the full model (input -> preprocessing -> backbone -> head) is assembled and saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.config import TrainConfig
from ml.errors import ConfigError, DataError, ModelVerificationError
from ml.models.registry import get_architecture, parse_candidate

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ml.data.image_cache import ImageCache
    from ml.training.hardware import Hardware
    from ml.training.input_pipeline import AugmentConfig

log = logging.getLogger(__name__)

ARTIFACTS = ("model.keras", "labels.json", "preprocessing.json", "history.csv")
SUMMARY_FILE = "train_summary.json"  # written last: its presence marks a complete folder
CHECKPOINT_FILE = "checkpoint.keras"
TENSORBOARD_DIR = "tensorboard"
RELOAD_TOLERANCE = 1e-4  # max |p_saved - p_memory| on one batch of probabilities


def train_candidate(
    dataset_dir: Path,
    candidate: str,
    out_dir: Path,
    config: TrainConfig,
    *,
    cache_root: Path,
    store: Any = None,
) -> dict[str, Any]:
    """Train one ``scratch_*`` or ``transfer_*`` candidate and write its folder.

    Args:
        dataset_dir: Dataset folder (manifest.parquet with splits, dataset.json).
        candidate: Candidate name from `ml.models.registry.candidate_names()`.
        out_dir: Candidate folder to write (created).
        config: Training settings; per-candidate overrides via ``config.options_for``
            (model options, ``augment``, ``augmentation``, ``image_size``, ``batch_size``,
            ``epochs``, ``learning_rate``).
        cache_root: Root of the decoded-image and bottleneck caches.
        store: Object-store client, for ``s3://`` weights.

    Returns:
        The train summary (also written as train_summary.json).
    """
    from ml.data.image_cache import build_image_cache
    from ml.models.weights import resolve_weights, weights_id
    from ml.training.hardware import configure_hardware
    from ml.training.input_pipeline import AugmentConfig

    started = time.monotonic()
    kind, name = parse_candidate(candidate)
    if kind == "finetune":
        raise ConfigError(
            f"{candidate} is made by ml.training.finetune.finetune_candidate from a trained "
            "transfer candidate, not by train_candidate"
        )
    options = config.options_for(candidate)
    settings = run_settings(config, options)
    seed_everything(config.seed)
    hardware = configure_hardware()
    cache = build_image_cache(dataset_dir, settings["image_size"], cache_root)
    augment = AugmentConfig.from_options(options, default_on=config.augment)
    data = TrainData.from_cache(cache, config, settings)
    out_dir = Path(out_dir)
    extra: dict[str, Any] = {"bottleneck": None, "weights": None, "weights_id": None}

    with staging_dir(out_dir) as staging:
        callbacks = make_callbacks(staging, out_dir, config.early_stopping_patience, data.has_val)
        if kind == "scratch":
            from ml.models.scratch import SCRATCH_PREPROCESS, build_scratch

            model_options = {k: v for k, v in options.items() if k not in _TRAINING_KEYS}
            with hardware.scope():
                model = build_scratch(name, data.num_classes, settings["image_size"], model_options)
                compile_model(model, settings["learning_rate"], config.label_smoothing)
            history, val = fit_model(model, data, augment, settings, config, callbacks)
            preprocess, architecture = SCRATCH_PREPROCESS, candidate
        else:
            from ml.models.transfer import build_transfer, transfer_options

            spec = get_architecture(name)
            topts = transfer_options(spec, options)
            resolved = resolve_weights(
                config.weights,
                spec,
                settings["image_size"],
                store=store,
                cache_dir=Path(cache_root),
                alpha=topts.alpha,
            )
            extra["weights"] = config.weights
            extra["weights_id"] = weights_id(
                resolved, spec, settings["image_size"], alpha=topts.alpha, seed=config.seed
            )
            with hardware.scope():
                model = build_transfer(
                    name, data.num_classes, settings["image_size"], options=options, weights=resolved
                )
                compile_model(model, settings["learning_rate"], config.label_smoothing)
            if augment is None:
                history, val, extra["bottleneck"] = _fit_on_bottlenecks(
                    model,
                    data,
                    settings,
                    config,
                    callbacks,
                    cache_root,
                    spec.name,
                    topts.alpha,
                    extra["weights_id"],
                    hardware,
                )
            else:
                history, val = fit_model(model, data, augment, settings, config, callbacks)
            preprocess, architecture = spec.preprocess, spec.name

        summary = finish_candidate(
            model,
            staging,
            out_dir,
            data=data,
            history=history,
            val=val,
            started=started,
            base={
                "candidate": candidate,
                "architecture": architecture,
                "kind": kind,
                "parent": None,
                "preprocess": preprocess,
                "hardware": hardware.description,
                "augment": asdict(augment) if augment is not None else None,
                "options": _jsonable(options),
                **extra,
            },
            settings=settings,
        )
    return summary


# --- shared with fine-tuning -------------------------------------------------------------------

_TRAINING_KEYS = ("augment", "augmentation", "batch_size", "epochs", "learning_rate", "image_size")


def run_settings(
    config: TrainConfig,
    options: Mapping[str, Any],
    *,
    epochs: int | None = None,
    learning_rate: float | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """image_size, batch_size, epochs, learning_rate: config values, candidate overrides, then arguments."""
    settings = {
        "image_size": int(image_size or options.get("image_size", config.image_size)),
        "batch_size": int(options.get("batch_size", config.batch_size)),
        "epochs": int(epochs or options.get("epochs", config.epochs)),
        "learning_rate": float(learning_rate or options.get("learning_rate", config.learning_rate)),
    }
    if not 8 <= settings["image_size"] <= 1024:
        raise ConfigError(f"image_size must be in [8, 1024], got {settings['image_size']}")
    if settings["batch_size"] < 1 or settings["epochs"] < 1 or not 0 < settings["learning_rate"] < 1:
        raise ConfigError(
            f"invalid training settings {settings}: batch_size and epochs must be >= 1, "
            "learning_rate in (0, 1)"
        )
    return settings


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds (keras.utils.set_random_seed)."""
    import keras

    keras.utils.set_random_seed(int(seed))


class TrainData:
    """Rows, labels and class weights of a dataset's train/val splits (built by `from_cache`)."""

    def __init__(
        self,
        cache: ImageCache,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        class_weight: dict[int, float] | None,
        imbalance: float,
    ) -> None:
        self.cache = cache
        self.train_rows, self.val_rows = train_rows, val_rows
        self.class_weight, self.imbalance = class_weight, imbalance
        self.labels = cache.labels
        self.num_classes = len(self.labels)

    @property
    def has_val(self) -> bool:
        return len(self.val_rows) > 0

    @classmethod
    def from_cache(cls, cache: ImageCache, config: TrainConfig, settings: Mapping[str, Any]) -> TrainData:
        train_rows, val_rows = cache.split_indices("train"), cache.split_indices("val")
        if len(cache.labels) < 2:
            raise DataError(f"dataset {cache.dataset_hash[:12]} has {len(cache.labels)} label(s); need >= 2")
        if len(train_rows) == 0:
            raise DataError(
                f"dataset {cache.dataset_hash[:12]} has no 'train' rows in its manifest "
                "(run the prepare/split stage first)"
            )
        if len(val_rows) == 0:
            log.warning(
                "dataset %s has no 'val' rows: early stopping and LR schedule watch training loss",
                cache.dataset_hash[:12],
            )
        weights, ratio = class_weights(
            cache.label_indices(train_rows), len(cache.labels), config.class_weight_threshold
        )
        return cls(cache, train_rows, val_rows, weights, ratio)


def class_weights(
    labels: np.ndarray, num_classes: int, threshold: float
) -> tuple[dict[int, float] | None, float]:
    """'balanced' class weights (n / (k * n_c)) when max/min class count exceeds `threshold`.

    Returns:
        (weights or None, imbalance ratio). Classes absent from `labels` get weight 1.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    if ratio <= threshold:
        return None, ratio
    total, k = counts.sum(), len(present)
    weights = {i: (float(total / (k * c)) if c else 1.0) for i, c in enumerate(counts)}
    log.info(
        "class imbalance %.2f > %.2f: balanced class weights %s",
        ratio,
        threshold,
        {i: round(w, 3) for i, w in weights.items()},
    )
    return weights, ratio


def compile_model(model: keras.Model, learning_rate: float, label_smoothing: float) -> None:
    """Adam + categorical cross-entropy on one-hot targets (label smoothing needs one-hot)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def one_hot(ds: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    """Map (x, int label) batches to (x, one-hot float32)."""
    import tensorflow as tf

    return ds.map(
        lambda x, y: (x, tf.one_hot(y, num_classes, dtype=tf.float32)), num_parallel_calls=tf.data.AUTOTUNE
    )


WARMUP_EPOCHS = 3  # epochs before early stopping may act


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space (VmHWM), MiB.

    Not ru_maxrss: Linux carries it across execve, so a task started by a big parent (an Airflow
    worker) would report the parent's peak (seen: 1,933 MB reported for a 9 MB child).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_callbacks(
    staging: Path, out_dir: Path, patience: int, has_val: bool
) -> list[keras.callbacks.Callback]:
    """Early stopping (best weights restored), LR decay on plateaus, CSV history, TensorBoard, checkpoint."""
    import keras

    monitor = "val_loss" if has_val else "loss"
    tensorboard = out_dir / TENSORBOARD_DIR
    # Logs of an earlier, failed attempt would interleave with this one's.
    shutil.rmtree(tensorboard, ignore_errors=True)
    callbacks = [
        # From-scratch nets with batch norm have erratic validation loss for the first epochs
        # (running statistics still settling): without a warm-up, early stopping "restored"
        # epoch 1 of a net that went on to learn (seen on the sample data: 0.38 vs 0.76 val).
        keras.callbacks.EarlyStopping(
            monitor=monitor, patience=max(1, patience), restore_best_weights=True,
            start_from_epoch=WARMUP_EPOCHS,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, factor=0.5, patience=max(3, patience // 2), cooldown=1, min_lr=1e-6
        ),
        keras.callbacks.CSVLogger(str(staging / "history.csv")),
        atomic_checkpoint(staging / CHECKPOINT_FILE, monitor),
    ]
    if tensorboard_available():
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir=str(tensorboard), write_graph=False, profile_batch=0)
        )
    else:
        log.info("tensorboard is not installed: no TensorBoard logs (history.csv has the curves)")
    return callbacks


def tensorboard_available() -> bool:
    """tf.summary needs the tensorboard package (not a dependency of tensorflow-cpu wheels here)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def atomic_checkpoint(path: Path, monitor: str) -> keras.callbacks.Callback:
    """Save the best model so far to `path` via a temporary file and a rename."""
    import keras

    class AtomicCheckpoint(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = np.inf

        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            value = (logs or {}).get(monitor)
            if value is None or not value < self.best:
                return
            self.best = float(value)
            tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.keras")
            try:
                self.model.save(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    return AtomicCheckpoint()


def fit_model(
    model: keras.Model,
    data: TrainData,
    augment: AugmentConfig | None,
    settings: Mapping[str, Any],
    config: TrainConfig,
    callbacks: list[Any],
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Fit on the image cache; returns (history, {loss, accuracy} on val with the restored best weights)."""
    from ml.training.input_pipeline import split_dataset

    bs, k = settings["batch_size"], data.num_classes
    train = one_hot(
        split_dataset(
            data.cache,
            "train",
            batch_size=bs,
            shuffle=True,
            seed=config.seed,
            augment=augment,
            rows=data.train_rows,
        ),
        k,
    )
    val = (
        one_hot(split_dataset(data.cache, "val", batch_size=bs, rows=data.val_rows), k)
        if data.has_val
        else None
    )
    history = model.fit(
        train,
        validation_data=val,
        epochs=settings["epochs"],
        callbacks=callbacks,
        class_weight=data.class_weight,
        shuffle=False,
        verbose=2,
    )
    scores = model.evaluate(val, verbose=0, return_dict=True) if val is not None else {}
    return _history(history), {k_: float(v) for k_, v in scores.items()}


def _fit_on_bottlenecks(
    model: keras.Model,
    data: TrainData,
    settings: Mapping[str, Any],
    config: TrainConfig,
    callbacks: list[Any],
    cache_root: Path,
    arch: str,
    alpha: float | None,
    wid: str,
    hardware: Hardware,
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, Any]]:
    import tensorflow as tf

    from ml.models.transfer import HEAD_NAME, feature_extractor
    from ml.training.bottleneck import bottleneck_path, load_or_compute

    path = bottleneck_path(cache_root, data.cache.dataset_hash, arch, settings["image_size"], wid, alpha)
    found = load_or_compute(
        data.cache, feature_extractor(model), path, batch_size=max(settings["batch_size"], 32)
    )
    head = model.get_layer(HEAD_NAME)
    with hardware.scope():
        compile_model(head, settings["learning_rate"], config.label_smoothing)
    k, bs = data.num_classes, settings["batch_size"]

    def features_ds(rows: np.ndarray, shuffle: bool) -> tf.data.Dataset:
        feats = np.asarray(found.features[rows], dtype=np.float32)
        labels = tf.one_hot(data.cache.label_indices(rows), k, dtype=tf.float32)
        ds = tf.data.Dataset.from_tensor_slices((feats, labels))
        if shuffle:
            ds = ds.shuffle(len(rows), seed=config.seed, reshuffle_each_iteration=True)
        return ds.batch(bs).prefetch(tf.data.AUTOTUNE)

    val = features_ds(data.val_rows, False) if data.has_val else None
    # The head's weights are shared with `model`, so training it trains the full model's head;
    # the checkpoint callback saves the head only (callbacks see the model being fitted).
    history = head.fit(
        features_ds(data.train_rows, True),
        validation_data=val,
        epochs=settings["epochs"],
        callbacks=callbacks,
        class_weight=data.class_weight,
        shuffle=False,
        verbose=2,
    )
    scores = head.evaluate(val, verbose=0, return_dict=True) if val is not None else {}
    info = {"path": str(path), "hit": found.hit, "features": list(found.features.shape)}
    return _history(history), {k_: float(v) for k_, v in scores.items()}, info


def _history(history: Any) -> dict[str, list[float]]:
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def finish_candidate(
    model: keras.Model,
    staging: Path,
    out_dir: Path,
    *,
    data: TrainData,
    history: Mapping[str, list[float]],
    val: Mapping[str, float],
    started: float,
    base: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Save the model and metadata in `staging`, verify the saved model, publish to `out_dir`."""
    from ml.models.transfer import count_trainable

    model_path = staging / "model.keras"
    model.save(model_path)
    max_diff = verify_reload(model, model_path, data)
    write_json(staging / "labels.json", data.labels)
    write_json(
        staging / "preprocessing.json",
        {
            "image_size": settings["image_size"],
            "color_order": "RGB",
            "input_range": [0, 255],
            "dtype": "float32",
            "resize": "cv2.INTER_AREA, aspect ratio ignored",
            "preprocess": base["preprocess"],
            "architecture": base["architecture"],
        },
    )
    if not (staging / "history.csv").exists():
        raise ModelVerificationError(f"{staging}: training wrote no history.csv")
    monitor = "val_loss" if "val_loss" in history else "loss"
    curve = history.get(monitor, [])
    summary = {
        **base,
        "val_accuracy": val.get("accuracy"),
        "val_loss": val.get("loss"),
        "best_epoch": int(np.argmin(curve)) + 1 if curve else None,
        "epochs_run": len(curve),
        "epochs": settings["epochs"],
        "image_size": settings["image_size"],
        "batch_size": settings["batch_size"],
        "learning_rate": settings["learning_rate"],
        "num_classes": data.num_classes,
        "train_images": len(data.train_rows),
        "val_images": len(data.val_rows),
        "class_weighted": data.class_weight is not None,
        "imbalance_ratio": round(data.imbalance, 3),
        "dataset_hash": data.cache.dataset_hash,
        "params": int(model.count_params()),
        "trainable_params": count_trainable(model),
        "model_bytes": model_path.stat().st_size,
        "reload_max_abs_diff": max_diff,
        "wall_time_s": round(time.monotonic() - started, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_json(staging / SUMMARY_FILE, summary)
    publish(staging, out_dir)
    log.info(
        "trained %s: val_accuracy=%s val_loss=%s epochs=%d params=%d %.1f MB in %.1fs -> %s",
        summary["candidate"],
        _fmt(summary["val_accuracy"]),
        _fmt(summary["val_loss"]),
        summary["epochs_run"],
        summary["params"],
        summary["model_bytes"] / 1e6,
        summary["wall_time_s"],
        out_dir,
    )
    return summary


def verify_reload(model: keras.Model, path: Path, data: TrainData) -> float:
    """Reload the saved file in safe mode and compare its probabilities with `model`'s on one batch."""
    from ml.models import load_model

    rows = data.val_rows if data.has_val else data.train_rows
    batch = data.cache.gather(rows[:16]).astype(np.float32)
    reloaded = load_model(path, compile=False)
    # Direct calls run eagerly: no tf.function trace for a one-off batch.
    diff = float(
        np.max(np.abs(np.asarray(reloaded(batch, training=False)) - np.asarray(model(batch, training=False))))
    )
    if not diff <= RELOAD_TOLERANCE:
        raise ModelVerificationError(
            f"{path}: reloaded model differs from the trained one by {diff:.2e} (> {RELOAD_TOLERANCE})"
        )
    return diff


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_json(path: Path, payload: Any) -> None:
    """Write JSON (the staging folder makes it atomic as a whole)."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A private staging folder inside `out_dir`, removed on exit (after publish or on failure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out_dir)
    staging = out_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_dead_staging(out_dir: Path) -> None:
    """Delete staging folders left by killed attempts (their process no longer runs)."""
    for old in out_dir.glob(".staging-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.info("removing staging folder %s of a dead attempt", old)
            shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staging: Path, out_dir: Path) -> None:
    """Move finished artifacts into `out_dir`: summary removed first, replaced last."""
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    for name in ARTIFACTS:
        os.replace(staging / name, out_dir / name)
    os.replace(staging / SUMMARY_FILE, out_dir / SUMMARY_FILE)
