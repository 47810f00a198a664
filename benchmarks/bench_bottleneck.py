"""2. Frozen-phase epoch on cached bottleneck features vs an epoch through the frozen backbone.

Both sides are the project's own training paths for a transfer candidate, on the same image
cache, model, batch size and seed: `fit_model` (what runs when augmentation is on: every
epoch pushes every image through the frozen backbone) and `fit_on_bottlenecks` (augmentation
off: the backbone runs once per image, `load_or_compute` stores the pooled features, and the
head trains on them). Seconds per epoch are the median over epochs 2+ (epoch 1 traces the
tf.function); the one-off feature extraction is reported separately, with the number of
epochs after which it has paid for itself.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any

from benchmarks.common import (
    CACHE_ROOT,
    Result,
    Settings,
    epoch_timer,
    fmt,
    generated_dataset,
    log,
    median,
    steady_epochs,
)

ARCH = "mobilenet_v2"
ALPHA = 0.35
IMAGE_SIZE = 96


def run(settings: Settings) -> Result:
    from ml.config import TrainConfig
    from ml.data.image_cache import build_image_cache
    from ml.models.transfer import build_transfer
    from ml.models.weights import weights_id
    from ml.training.data import TrainData
    from ml.training.fit import compile_model, fit_model, fit_on_bottlenecks, seed_everything
    from ml.training.hardware import configure_hardware
    from ml.training.settings import CandidateSettings

    candidate = f"transfer_{ARCH}"
    config = TrainConfig(
        candidates=(candidate,),
        epochs=2 if settings.quick else 3,
        image_size=IMAGE_SIZE,
        weights="none",  # timing only: ImageNet weights cost the same FLOPs
        augment=False,
        seed=settings.seed,
        candidate_options={candidate: {"alpha": ALPHA}},
    )
    run_cfg = CandidateSettings.for_candidate(config, candidate)
    hardware = configure_hardware()
    cache = build_image_cache(generated_dataset(settings.images, settings.seed), IMAGE_SIZE, CACHE_ROOT)
    data = TrainData.from_cache(cache, config.class_weight_threshold)
    n_train = len(data.train_rows)

    def model() -> Any:
        seed_everything(config.seed)
        with hardware.scope():
            m = build_transfer(ARCH, data.num_classes, IMAGE_SIZE, options=run_cfg.transfer, weights=None)
            compile_model(m, run_cfg.learning_rate, config.label_smoothing)
        return m

    # Baseline: every epoch through the frozen backbone.
    timer = epoch_timer()
    fit_model(model(), data, run_cfg, [timer])  # config.augment=False: no augmentation either side
    backbone_seconds = list(timer.seconds)
    backbone_epoch = median(steady_epochs(backbone_seconds))
    log.info("bottleneck: backbone epochs %s s", [round(s, 2) for s in backbone_seconds])

    # Project: features computed once (into a fresh root: no hit from an earlier run), then head epochs.
    features_root = settings.work / "bottleneck-bench"
    shutil.rmtree(features_root, ignore_errors=True)
    head_cfg = dataclasses.replace(run_cfg, epochs=config.epochs + 2)  # head epochs are ms: more samples
    timer = epoch_timer()
    started = time.perf_counter()
    _, _, info = fit_on_bottlenecks(
        model(),
        data,
        head_cfg,
        [timer],
        cache_root=features_root,
        weights_id=weights_id(None, ARCH, IMAGE_SIZE, alpha=ALPHA, seed=config.seed),
        hardware=hardware,
    )
    if info["hit"]:
        raise RuntimeError(f"bottleneck features were a cache hit ({info['path']}); extraction was not timed")
    head_epoch = median(steady_epochs(timer.seconds))
    # Extraction = everything before the head's fit starts: one forward pass over all images,
    # storing the .npy with its checksum, compiling the head.
    extraction = (timer.train_begin or started) - started
    log.info(
        "bottleneck: extraction %.2f s, head epochs %s s", extraction, [round(s, 3) for s in timer.seconds]
    )
    saved_per_epoch = backbone_epoch - head_epoch
    break_even = extraction / saved_per_epoch if saved_per_epoch > 0 else None
    return Result(
        name="bottleneck",
        title=f"frozen {ARCH} a{ALPHA} {IMAGE_SIZE}px epoch, {n_train} train imgs",
        baseline=fmt(backbone_epoch, "s/epoch", 2),
        project=fmt(head_epoch, "s/epoch", 3),
        ratio=backbone_epoch / head_epoch,
        ratio_meaning="s/epoch through the frozen backbone / s/epoch on cached features",
        notes=[
            f"one-off feature extraction: {extraction:.2f} s for {int(info['features'][0])} images"
            + (f", paid back after {break_even:.1f} epochs" if break_even is not None else "")
        ],
        details={
            "architecture": ARCH,
            "alpha": ALPHA,
            "image_size": IMAGE_SIZE,
            "train_images": n_train,
            "cached_images": len(cache),
            "batch_size": run_cfg.batch_size,
            "backbone_epoch_seconds": [round(s, 3) for s in backbone_seconds],
            "backbone_epoch_s": backbone_epoch,
            "head_epoch_s": head_epoch,
            "head_epoch_seconds": [round(s, 4) for s in timer.seconds],
            "extraction_s": extraction,
            "extraction_images": int(info["features"][0]),
            "break_even_epochs": break_even,
        },
    )
