"""Fine-tuning a trained transfer candidate: unfreeze the top of the backbone, train at a low LR.

The registry names each backbone's boundary layer (MobileNetV2 ``block_16_expand``,
InceptionV3 ``mixed9``, ...): that layer and everything after it become trainable, except
BatchNormalization layers, which stay frozen; the backbone is also *called* with
``training=False`` in every transfer model, so their moving statistics never change
(keras-io's fine-tuning recipe; the dog-breed study saw unfrozen blocks overfit fast).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import TrainConfig
from ml.errors import ConfigError, DataError
from ml.models.registry import ArchitectureSpec, get_architecture, parse_candidate

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


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
    dataset_dir: Path, transfer_dir: Path, out_dir: Path, config: TrainConfig, *, cache_root: Path
) -> dict[str, Any]:
    """Fine-tune the transfer candidate in `transfer_dir` into ``finetune_<arch>`` in `out_dir`.

    Learning rate ``config.learning_rate * config.finetune_lr_factor`` and
    ``config.finetune_epochs`` epochs, unless ``config.options_for('finetune_<arch>')`` sets
    ``learning_rate``/``epochs``; other options (augmentation) fall back to the transfer
    candidate's. Writes the same files as `ml.training.fit.train_candidate`, with ``parent``
    = the transfer candidate.

    Returns:
        The train summary.
    """
    from ml.data.image_cache import build_image_cache
    from ml.models import load_model
    from ml.training.fit import (
        TrainData,
        compile_model,
        finish_candidate,
        fit_model,
        make_callbacks,
        run_settings,
        seed_everything,
        staging_dir,
    )
    from ml.training.hardware import configure_hardware
    from ml.training.input_pipeline import AugmentConfig

    started = time.monotonic()
    transfer_dir, out_dir = Path(transfer_dir), Path(out_dir)
    summary_path = transfer_dir / "train_summary.json"
    if not summary_path.is_file() or not (transfer_dir / "model.keras").is_file():
        raise DataError(
            f"{transfer_dir} is not a complete candidate folder (train_summary.json and model.keras "
            "are required)"
        )
    parent_summary = json.loads(summary_path.read_text())
    parent = parent_summary["candidate"]
    kind, arch = parse_candidate(parent)
    if kind != "transfer":
        raise ConfigError(f"only transfer candidates can be fine-tuned, {transfer_dir} holds {parent!r}")
    spec = get_architecture(arch)
    candidate = f"finetune_{arch}"
    own = config.options_for(candidate)
    options = {**config.options_for(parent), **own}
    settings = run_settings(
        config,
        options,
        image_size=int(parent_summary["image_size"]),
        epochs=int(own.get("epochs", config.finetune_epochs)),
        learning_rate=float(own.get("learning_rate", config.learning_rate * config.finetune_lr_factor)),
    )
    seed_everything(config.seed)
    hardware = configure_hardware()
    cache = build_image_cache(dataset_dir, settings["image_size"], cache_root)
    parent_labels = json.loads((transfer_dir / "labels.json").read_text())
    if parent_labels != cache.labels:
        raise DataError(
            f"{transfer_dir / 'labels.json'} differs from dataset {cache.dataset_hash[:12]}'s labels; "
            "fine-tune on the dataset the transfer candidate was trained on"
        )
    data = TrainData.from_cache(cache, config, settings)
    augment = AugmentConfig.from_options(options, default_on=config.augment)

    with staging_dir(out_dir) as staging:
        with hardware.scope():
            model = load_model(transfer_dir / "model.keras", compile=False)
            unfrozen = unfreeze_from_boundary(model, spec)
            compile_model(model, settings["learning_rate"], config.label_smoothing)
        log.info(
            "fine-tuning %s from %s: %d backbone layers unfrozen from %s, lr=%g, %d epochs",
            candidate,
            parent,
            len(unfrozen),
            spec.finetune_boundary,
            settings["learning_rate"],
            settings["epochs"],
        )
        callbacks = make_callbacks(staging, out_dir, config.early_stopping_patience, data.has_val)
        history, val = fit_model(model, data, augment, settings, config, callbacks)
        return finish_candidate(
            model,
            staging,
            out_dir,
            data=data,
            history=history,
            val=val,
            started=started,
            base={
                "candidate": candidate,
                "architecture": arch,
                "kind": "finetune",
                "parent": parent,
                "preprocess": spec.preprocess,
                "hardware": hardware.description,
                "augment": asdict(augment) if augment is not None else None,
                "options": json.loads(json.dumps(options, default=str)),
                "bottleneck": None,
                "weights": parent_summary.get("weights"),
                "weights_id": parent_summary.get("weights_id"),
                "finetune_boundary": spec.finetune_boundary,
                "unfrozen_layers": len(unfrozen),
                "parent_val_accuracy": parent_summary.get("val_accuracy"),
            },
            settings=settings,
        )
