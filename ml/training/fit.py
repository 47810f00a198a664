"""Training one candidate: scratch CNN or frozen-backbone transfer model, to a candidate folder.

`train_candidate` writes ``model.keras``, ``labels.json``, ``preprocessing.json``,
``history.csv`` and ``train_summary.json`` into ``out_dir``. Everything is written in a
staging folder first (`ml.io.staging_dir`) and moved into place at the end,
``train_summary.json`` last, so a task killed half-way leaves nothing half-written under the
final names (and no summary that would mark the folder complete). TensorBoard logs stream to
``out_dir/tensorboard``.

Transfer candidates train their head on cached features: the bottleneck cache without
augmentation (`ml.training.bottleneck`), the augmented bank with it (`ml.training.bank`, unless
``frozen_phase: backbone``): the backbone runs once per image (per view), the head trains on
features, and the full model (input -> preprocessing -> backbone -> head) is assembled and saved.

What a candidate trains with comes from `ml.training.settings.CandidateSettings`, resolved once
per call; the callbacks from `ml.training.callbacks`; rows and class weights from
`ml.training.data`. `ml.training.finetune` reuses the fit loop and `finish_candidate`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.config import TrainConfig
from ml.data.images import DECODE
from ml.errors import ModelVerificationError
from ml.io import staging_dir, to_jsonable, write_json
from ml.training.callbacks import HISTORY_FILE, make_callbacks
from ml.training.data import TrainData
from ml.training.resources import limit_heap_retention, peak_rss_mb
from ml.training.settings import CandidateSettings

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ml.training.checkpoints import CheckpointStore
    from ml.training.hardware import Hardware

log = logging.getLogger(__name__)

ARTIFACTS = ("model.keras", "labels.json", "preprocessing.json", HISTORY_FILE)
SUMMARY_FILE = "train_summary.json"  # written last: its presence marks a complete folder
RELOAD_TOLERANCE = 1e-4  # max |p_saved - p_memory| on one batch of probabilities


def train_candidate(
    dataset_dir: Path,
    candidate: str,
    out_dir: Path,
    config: TrainConfig,
    *,
    cache_root: Path,
    store: Any = None,
    checkpoints: CheckpointStore | None = None,
) -> dict[str, Any]:
    """Train one ``scratch_*`` or ``transfer_*`` candidate and write its folder.

    Args:
        dataset_dir: Dataset folder (manifest.parquet with splits, dataset.json).
        candidate: Candidate name from `ml.models.registry.candidate_names()`.
        out_dir: Candidate folder to write (created).
        config: Training settings; per-candidate overrides in ``config.candidate_options``
            (model options, ``augment``, ``augmentation``, ``image_size``, ``batch_size``,
            ``epochs``, ``learning_rate``), resolved by `CandidateSettings.for_candidate`.
        cache_root: Root of the decoded-image and bottleneck caches.
        store: Object-store client, for ``s3://`` weights.
        checkpoints: Where per-epoch state is saved and resumed from (`ml.training.checkpoints`).

    Returns:
        The train summary (also written as train_summary.json).
    """
    from ml.data.image_cache import build_image_cache
    from ml.training.hardware import configure_hardware

    started = time.monotonic()
    settings = CandidateSettings.for_candidate(config, candidate)  # every check before any work
    seed_everything(settings.seed)
    limit_heap_retention()
    hardware = configure_hardware()
    cache = build_image_cache(dataset_dir, settings.image_size, cache_root)
    data = TrainData.from_cache(cache, settings.class_weight_threshold)
    out_dir = Path(out_dir)
    extra: dict[str, Any] = {"bottleneck": None, "weights": None, "weights_id": None, "frozen_phase_s": None}

    with staging_dir(out_dir) as staging:
        callbacks = make_callbacks(
            staging, out_dir, settings.early_stopping_patience, data.has_val, checkpoints=checkpoints,
            candidate=candidate, checkpoint_every=config.checkpoint_every_epochs,
        )
        if settings.kind == "scratch":
            from ml.models.scratch import build_scratch

            with hardware.scope():
                model = build_scratch(settings.name, data.num_classes, settings.image_size, settings.scratch_options)
                compile_model(model, settings.learning_rate, settings.label_smoothing)
            history, val = fit_model(model, data, settings, callbacks)
        else:
            from ml.models.transfer import build_transfer
            from ml.models.weights import resolve_weights, weights_id

            spec, alpha = settings.spec, settings.alpha
            resolved = resolve_weights(
                config.weights, spec, settings.image_size, store=store, cache_dir=Path(cache_root), alpha=alpha
            )
            extra["weights"] = config.weights
            extra["weights_id"] = weights_id(resolved, spec, settings.image_size, alpha=alpha, seed=settings.seed)
            with hardware.scope():
                model = build_transfer(
                    spec.name, data.num_classes, settings.image_size, options=settings.transfer, weights=resolved
                )
                compile_model(model, settings.learning_rate, settings.label_smoothing)
            frozen_started = time.monotonic()
            if settings.head_on_features is not None:
                history, val, extra["bottleneck"] = fit_on_bottlenecks(
                    model, data, settings, callbacks, cache_root=Path(cache_root), weights_id=extra["weights_id"],
                    hardware=hardware,
                )
            else:
                log.info("%s: frozen phase through the backbone (frozen_phase=backbone), augmented, %d epochs",
                         settings.candidate, settings.epochs)
                history, val = fit_model(model, data, settings, callbacks)
            # Feature extraction (on a cache miss) + the head's fit, or the fit through the backbone.
            extra["frozen_phase_s"] = round(time.monotonic() - frozen_started, 2)
        from ml.training.checkpoints import find_checkpoint

        # Epochs restored from a checkpoint rather than trained here (a retry, a search trial's next rung).
        extra["resumed_epochs"] = getattr(find_checkpoint(callbacks), "resumed_epochs", 0)
        return finish_candidate(
            model, staging, out_dir, settings, data=data, history=history, val=val, started=started,
            hardware=hardware, extra=extra,
        )


# --- shared with fine-tuning -------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds (keras.utils.set_random_seed)."""
    import keras

    keras.utils.set_random_seed(int(seed))


def compile_model(model: keras.Model, learning_rate: float, label_smoothing: float) -> None:
    """Adam + categorical cross-entropy on one-hot targets (label smoothing needs one-hot)."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def fit_model(
    model: keras.Model, data: TrainData, settings: CandidateSettings, callbacks: list[Any]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Fit on the image cache (augmented as `settings` says).

    Returns:
        (history, {loss, accuracy} on val with the restored best weights; {} without val rows).
    """
    from ml.training.input_pipeline import one_hot, split_dataset

    bs, k = settings.batch_size, data.num_classes
    state: list[Any] = []
    train = one_hot(
        split_dataset(
            data.cache, "train", batch_size=bs, shuffle=True, seed=settings.seed, augment=settings.augment,
            rows=data.train_rows, state=state,
        ),
        k,
    )
    val = one_hot(split_dataset(data.cache, "val", batch_size=bs, rows=data.val_rows), k) if data.has_val else None
    return _fit(model, train, val, data, settings, callbacks, data_state=state)


def fit_on_bottlenecks(
    model: keras.Model,
    data: TrainData,
    settings: CandidateSettings,
    callbacks: list[Any],
    *,
    cache_root: Path,
    weights_id: str,
    hardware: Hardware,
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, Any]]:
    """Train a transfer model's head on cached backbone features (computed on a cache miss).

    Without augmentation the head trains on the bottleneck cache (`ml.training.bottleneck`); with
    augmentation (``settings.head_on_features == "bank"``) on the augmented bank
    (`ml.training.bank`), one view per image per epoch. Validation uses un-augmented features.

    Returns:
        (history, val scores as `fit_model`, {source, path, hit, features shape, ...} of the features).
    """
    import tensorflow as tf

    from ml.models.transfer import HEAD_NAME, feature_extractor
    from ml.training.bottleneck import bottleneck_path, load_or_compute
    from ml.training.input_pipeline import shuffled_each_epoch

    path = bottleneck_path(
        cache_root, data.cache.dataset_hash, settings.name, settings.image_size, weights_id, settings.alpha
    )
    extractor = feature_extractor(model)
    # >= 32 images per forward pass: extraction is inference only, bigger batches are faster.
    extract_batch = max(settings.batch_size, 32)
    found = load_or_compute(data.cache, extractor, path, batch_size=extract_batch)
    head = model.get_layer(HEAD_NAME)
    with hardware.scope():
        compile_model(head, settings.learning_rate, settings.label_smoothing)
    k, bs = data.num_classes, settings.batch_size
    state: list[Any] = []

    def features_ds(rows: np.ndarray, shuffle: bool) -> tf.data.Dataset:
        feats = np.asarray(found.features[rows], dtype=np.float32)
        labels = tf.one_hot(data.cache.label_indices(rows), k, dtype=tf.float32)
        if shuffle:
            ds = shuffled_each_epoch((feats, labels), settings.seed, state)
        else:
            ds = tf.data.Dataset.from_tensor_slices((feats, labels))
        return ds.batch(bs).prefetch(tf.data.AUTOTUNE)

    val = features_ds(data.val_rows, False) if data.has_val else None
    # Paths relative to the worker's cache root: the summary travels (XCom, the store), the folder does not.
    info: dict[str, Any] = {"source": settings.head_on_features, "path": path.relative_to(cache_root).as_posix(),
                            "hit": found.hit,
                            "features": list(found.features.shape)}
    steps = None
    if settings.head_on_features == "bank":
        from ml.training.bank import bank_dataset, bank_path, load_or_build_bank

        assert settings.augment is not None  # head_on_features == "bank" implies augmentation
        where = bank_path(
            cache_root, data.cache.dataset_hash, data.train_rows, architecture=settings.name,
            image_size=settings.image_size, weights_id=weights_id, alpha=settings.alpha, augment=settings.augment,
            views=settings.bank_views, seed=settings.seed,
        )
        bank = load_or_build_bank(
            data.cache, extractor, where, rows=data.train_rows, clean=found.features, augment=settings.augment,
            views=settings.bank_views, seed=settings.seed, batch_size=extract_batch,
        )
        labels = np.eye(k, dtype=np.float32)[data.cache.label_indices(bank.rows)]
        steps = -(-len(bank.rows) // bs)

        def train(start_epoch: int) -> tf.data.Dataset:  # epochs start_epoch.. (a resumed fit starts later)
            return bank_dataset(
                bank, labels, epochs=settings.epochs, batch_size=bs, seed=settings.seed, start_epoch=start_epoch
            )[0]
        info.update({"bank_path": Path(bank.path).relative_to(cache_root).as_posix(), "bank_hit": bank.hit,
                     "bank_views": bank.views,
                     "bank": list(bank.features.shape)})
        log.info(
            "%s: frozen phase trains the head on the augmented bottleneck bank (%d augmented views + 1 "
            "un-augmented of %d images, one per image per epoch; %s), up to %d epochs",
            settings.candidate, bank.views, len(bank.rows), "cache hit" if bank.hit else "built now", settings.epochs,
        )
    else:
        train = features_ds(data.train_rows, True)
        log.info("%s: frozen phase trains the head on cached bottleneck features (no augmentation), up to %d epochs",
                 settings.candidate, settings.epochs)
    # The head's weights are shared with `model`, so training it trains the full model's head;
    # the checkpoint callback saves the head only (callbacks see the model being fitted).
    history, scores = _fit(head, train, val, data, settings, callbacks, data_state=state, steps_per_epoch=steps)
    return history, scores, info


def _fit(
    model: keras.Model,
    train: tf.data.Dataset | Callable[[int], tf.data.Dataset],
    val: tf.data.Dataset | None,
    data: TrainData,
    settings: CandidateSettings,
    callbacks: list[Any],
    *,
    data_state: Sequence[Any] = (),
    steps_per_epoch: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """model.fit for `settings.epochs` (the datasets shuffle themselves), then the val scores.

    With an epoch checkpoint among `callbacks`, first resume from its latest state (model,
    optimizer, callbacks, `data_state`: the input pipeline's random state) and fit only the
    epochs left; the returned curves cover every epoch. `train` may be a function of the first
    epoch to fit returning all remaining epochs back to back, each `steps_per_epoch` batches
    (`ml.training.bank.bank_dataset`).
    """
    from ml.training.checkpoints import Resumed, find_checkpoint, fingerprint

    checkpoint, resumed = find_checkpoint(callbacks), Resumed()
    if checkpoint is not None:
        callbacks = [c for c in callbacks if c is not checkpoint] + [checkpoint]  # last: see epoch_checkpoint
        checkpoint.track(data_state, fingerprint(settings, data.cache.dataset_hash, model))
        resumed = checkpoint.resume(model, settings.epochs)
    initial_epoch = settings.epochs if resumed.finished else resumed.epochs_done
    if callable(train):
        train = train(initial_epoch)
    history = model.fit(
        train,
        validation_data=val,
        # Early stopping had ended the fit: no epoch left, but on_train_end still restores the best weights.
        initial_epoch=initial_epoch,
        epochs=settings.epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        class_weight=data.class_weight,
        shuffle=False,
        verbose=2,
    )
    scores = model.evaluate(val, verbose=0, return_dict=True) if val is not None else {}
    curves = {name: [float(v) for v in resumed.history.get(name, [])] + [float(v) for v in values]
              for name, values in history.history.items()}
    for name, values in resumed.history.items():
        curves.setdefault(name, [float(v) for v in values])
    return curves, {name: float(v) for name, v in scores.items()}


def finish_candidate(
    model: keras.Model,
    staging: Path,
    out_dir: Path,
    settings: CandidateSettings,
    *,
    data: TrainData,
    history: Mapping[str, list[float]],
    val: Mapping[str, float],
    started: float,
    hardware: Hardware,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Save the model and metadata in `staging`, verify the saved model, publish to `out_dir`.

    Args:
        model: The trained model.
        staging: The staging folder (holds history.csv already).
        out_dir: The candidate folder to publish to.
        settings: What the candidate was trained with.
        data: The rows it was trained on.
        history: Per-epoch metrics from the fit.
        val: Val scores with the restored best weights.
        started: `time.monotonic()` when training began.
        hardware: What it ran on.
        extra: Kind-specific summary fields (weights, bottleneck, fine-tuning boundary, ...).

    Returns:
        The train summary, as written to train_summary.json.
    """
    from ml.models.transfer import count_trainable

    model_path = staging / "model.keras"
    model.save(model_path)
    max_diff = verify_reload(model, model_path, data)
    write_json(staging / "labels.json", data.labels)
    write_json(
        staging / "preprocessing.json",
        {
            "image_size": settings.image_size,
            "color_order": "RGB",
            "input_range": [0, 255],
            "dtype": "float32",
            "resize": "cv2.INTER_AREA, aspect ratio ignored",
            "decode": DECODE,  # the cache's decode + resize: a consumer must use the same (ml.data.images)
            "preprocess": settings.preprocess,
            "architecture": settings.architecture,
        },
    )
    if not (staging / HISTORY_FILE).exists():
        raise ModelVerificationError(f"{staging}: training wrote no {HISTORY_FILE}")
    monitor = "val_loss" if "val_loss" in history else "loss"
    curve = history.get(monitor, [])
    # JSON-safe before writing, so the returned summary (XCom) and the file hold the same values.
    summary = to_jsonable(
        {
            "candidate": settings.candidate,
            "architecture": settings.architecture,
            "kind": settings.kind,
            "parent": settings.parent,
            "preprocess": settings.preprocess,
            "hardware": hardware.description,
            "augment": asdict(settings.augment) if settings.augment is not None else None,
            "options": settings.options,
            **extra,
            "val_accuracy": val.get("accuracy"),
            "val_loss": val.get("loss"),
            "best_epoch": int(np.argmin(curve)) + 1 if curve else None,
            "epochs_run": len(curve),
            "epochs": settings.epochs,
            "image_size": settings.image_size,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
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
    )
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


def publish(staging: Path, out_dir: Path) -> None:
    """Move finished artifacts into `out_dir`: summary removed first, replaced last."""
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    for name in ARTIFACTS:
        os.replace(staging / name, out_dir / name)
    os.replace(staging / SUMMARY_FILE, out_dir / SUMMARY_FILE)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
