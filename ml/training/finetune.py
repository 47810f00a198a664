"""Fine-tuning a trained transfer candidate: unfreeze the top of the backbone, train at a low LR.

The registry names each backbone's boundary layer (MobileNetV2 ``block_16_expand``,
InceptionV3 ``mixed9``, ...): that layer and everything after it become trainable, except
BatchNormalization layers, which stay frozen; the backbone is also *called* with
``training=False`` in every transfer model, so their moving statistics never change
(keras-io's fine-tuning recipe; the dog-breed study saw unfrozen blocks overfit fast).

It starts from the parent's saved model (its best frozen head: early stopping restored it), at
a low learning rate that decays every epoch, with early stopping from the first epoch (the best
epoch's weights are kept). When the result is still worse on validation than the parent, the
train summary says so (``vs_parent.worse``) and a warning names both; the parent stays a
candidate of its own, so the gate can still pick it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import TrainConfig
from ml.errors import ConfigError, DataError
from ml.models.registry import ArchitectureSpec

if TYPE_CHECKING:
    import keras

    from ml.training.checkpoints import CheckpointStore

log = logging.getLogger(__name__)

# Per-epoch LR factor on top of ReduceLROnPlateau: 0.8^2 = 0.64x by the 3rd (default last) epoch.
LR_DECAY_PER_EPOCH = 0.8


def unfreeze_from_boundary(model: keras.Model, spec: ArchitectureSpec) -> list[str]:
    """Make the backbone trainable from `spec.finetune_boundary` on, BatchNormalization excluded.

    Returns:
        Names of the backbone layers that are now trainable.
    """
    import keras

    from ml.models.transfer import find_backbone

    backbone = find_backbone(model)
    names = [layer.name for layer in backbone.layers]
    if spec.finetune_boundary not in names:
        raise ConfigError(
            f"fine-tune boundary layer {spec.finetune_boundary!r} of {spec.name} is not in backbone "
            f"{backbone.name!r}"
        )
    start = names.index(spec.finetune_boundary)
    backbone.trainable = True  # recursive: then re-freeze what must stay frozen
    unfrozen = []
    for i, layer in enumerate(backbone.layers):
        frozen = i < start or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
        if not frozen and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


def finetune_candidate(
    dataset_dir: Path,
    transfer_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    cache_root: Path,
    checkpoints: CheckpointStore | None = None,
) -> dict[str, Any]:
    """Fine-tune the transfer candidate in `transfer_dir` into ``finetune_<arch>`` in `out_dir`.

    Settings come from `CandidateSettings.for_finetune`: learning rate ``config.learning_rate *
    config.finetune_lr_factor`` and ``config.finetune_epochs`` epochs, unless
    ``config.options_for('finetune_<arch>')`` sets ``learning_rate``/``epochs``; other options
    (augmentation) fall back to the transfer candidate's; the image size is the transfer
    candidate's. Writes the same files as `ml.training.fit.train_candidate`, with ``parent`` =
    the transfer candidate. With `checkpoints`, each epoch's state is saved there and a retry
    resumes from it (`ml.training.checkpoints`).

    Returns:
        The train summary.
    """
    import keras

    from ml.data.image_cache import build_image_cache
    from ml.io import staging_dir
    from ml.models import load_model
    from ml.training.callbacks import make_callbacks
    from ml.training.data import TrainData
    from ml.training.fit import compile_model, finish_candidate, fit_model, seed_everything
    from ml.training.hardware import configure_hardware
    from ml.training.resources import limit_heap_retention
    from ml.training.settings import CandidateSettings

    started = time.monotonic()
    transfer_dir, out_dir = Path(transfer_dir), Path(out_dir)
    summary_path = transfer_dir / "train_summary.json"
    if not summary_path.is_file() or not (transfer_dir / "model.keras").is_file():
        raise DataError(
            f"{transfer_dir} is not a complete candidate folder (train_summary.json and model.keras "
            "are required)"
        )
    parent_summary = json.loads(summary_path.read_text(encoding="utf-8"))
    parent = parent_summary.get("candidate") if isinstance(parent_summary, dict) else None
    if not isinstance(parent, str):
        raise DataError(f"{summary_path} names no candidate (its 'candidate' is {parent!r})")
    settings = CandidateSettings.for_finetune(config, parent, parent_summary.get("image_size"), source=transfer_dir)
    spec = settings.spec
    seed_everything(settings.seed)
    limit_heap_retention()
    hardware = configure_hardware()
    cache = build_image_cache(dataset_dir, settings.image_size, cache_root)
    parent_labels = json.loads((transfer_dir / "labels.json").read_text(encoding="utf-8"))
    if parent_labels != cache.labels:
        raise DataError(
            f"{transfer_dir / 'labels.json'} differs from dataset {cache.dataset_hash[:12]}'s labels; "
            "fine-tune on the dataset the transfer candidate was trained on"
        )
    data = TrainData.from_cache(cache, settings.class_weight_threshold)

    with staging_dir(out_dir) as staging:
        with hardware.scope():
            model = load_model(transfer_dir / "model.keras", compile=False)
            unfrozen = unfreeze_from_boundary(model, spec)
            compile_model(model, settings.learning_rate, settings.label_smoothing)
        log.info(
            "fine-tuning %s from %s: %d backbone layers unfrozen from %s, lr=%g, %d epochs",
            settings.candidate,
            settings.parent,
            len(unfrozen),
            spec.finetune_boundary,
            settings.learning_rate,
            settings.epochs,
        )
        callbacks = make_callbacks(
            staging, out_dir, settings.early_stopping_patience, data.has_val, checkpoints=checkpoints,
            candidate=settings.candidate, checkpoint_every=config.checkpoint_every_epochs, warmup_epochs=0,
        )
        callbacks.append(keras.callbacks.LearningRateScheduler(decayed_lr))
        history, val = fit_model(model, data, settings, callbacks)
        vs_parent = compare_with_parent(val, parent_summary)
        if vs_parent["worse"]:
            log.warning(
                "%s is worse on validation than its parent %s (val accuracy %s vs %s, val loss %s vs %s): "
                "fine-tuning did not help; %s stays a candidate and can still win the gate",
                settings.candidate, settings.parent, _fmt(val.get("accuracy")),
                _fmt(parent_summary.get("val_accuracy")), _fmt(val.get("loss")),
                _fmt(parent_summary.get("val_loss")), settings.parent,
            )
        extra = {
            "bottleneck": None,
            "weights": parent_summary.get("weights"),
            "weights_id": parent_summary.get("weights_id"),
            "finetune_boundary": spec.finetune_boundary,
            "unfrozen_layers": len(unfrozen),
            "parent_val_accuracy": parent_summary.get("val_accuracy"),
            "parent_val_loss": parent_summary.get("val_loss"),
            "vs_parent": vs_parent,
        }
        return finish_candidate(
            model, staging, out_dir, settings, data=data, history=history, val=val, started=started,
            hardware=hardware, extra=extra,
        )


def decayed_lr(epoch: int, lr: float) -> float:
    """`keras.callbacks.LearningRateScheduler` rule: the current LR times `LR_DECAY_PER_EPOCH` after epoch 0."""
    return float(lr) if epoch == 0 else float(lr) * LR_DECAY_PER_EPOCH


def compare_with_parent(val: Mapping[str, float], parent_summary: Mapping[str, Any]) -> dict[str, Any]:
    """Validation of a fine-tuned model against its parent's (both with their best weights restored).

    Worse = lower val accuracy, or the same accuracy at a higher val loss. Without val scores on
    either side nothing can be said (``worse`` False, deltas None).

    Returns:
        {worse, val_accuracy_delta, val_loss_delta} (deltas: fine-tuned minus parent).
    """
    def delta(key: str) -> float | None:
        mine, theirs = val.get(key), parent_summary.get(f"val_{key}")
        if not isinstance(mine, (int, float)) or not isinstance(theirs, (int, float)):
            return None
        return float(mine) - float(theirs)

    acc, loss = delta("accuracy"), delta("loss")
    worse = acc is not None and (acc < 0 or (acc == 0 and loss is not None and loss > 0))
    return {"worse": bool(worse), "val_accuracy_delta": acc, "val_loss_delta": loss}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
