"""3. Training throughput: the project's tf.data pipeline from the memmap cache vs in-memory arrays.

Same model (built twice with the same seed), batch size and rows; augmentation off on both
sides. The project side is `split_dataset(..., shuffle=True)` + `one_hot`, exactly what
`fit_model` feeds `model.fit`; the baseline is `model.fit(x, y, shuffle=True)` on float32
arrays already in memory (what the seeds' notebooks do). Single-epoch fits alternate between
the two (see `_interleaved`); images per second are the median over the timed epochs (a first,
untimed epoch traces the tf.function). A ratio near 1 means streaming from the cache costs no
training speed; the memory it saves is benchmark 4.

Two models: ``scratch_tiny`` (cheap per image, so input overhead shows most) and
``scratch_small`` (the default scratch candidate, compute-bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

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

IMAGE_SIZE = 96
BATCH_SIZE = 32


def _interleaved(
    model_fn: Callable[[], Any],
    fit_a: Callable[[Any, Any], None],
    fit_b: Callable[[Any, Any], None],
    measured: int,
) -> tuple[list[float], list[float]]:
    """Epoch seconds of A and B, one epoch at a time in turn (A B A B ...), the first of each untimed.

    Alternating single-epoch fits of two live models puts any slowdown from other users of
    the machine on both sides alike; the train function is traced once per model, in its
    first (warm-up) epoch, and reused by later `fit` calls.
    """
    model_a, model_b = model_fn(), model_fn()
    timer_a, timer_b = epoch_timer(), epoch_timer()
    for _ in range(measured + 1):
        fit_a(model_a, timer_a)
        fit_b(model_b, timer_b)
    return list(timer_a.seconds), list(timer_b.seconds)


def run(settings: Settings) -> list[Result]:
    import keras

    from ml.data.image_cache import build_image_cache
    from ml.models.scratch import build_scratch
    from ml.training.fit import compile_model, seed_everything
    from ml.training.input_pipeline import one_hot, split_dataset

    seed = settings.seed
    measured = 1 if settings.quick else 3  # timed epochs per side, after one warm-up epoch each
    cache = build_image_cache(generated_dataset(settings.images, seed), IMAGE_SIZE, CACHE_ROOT)
    rows = cache.split_indices("train")
    k = len(cache.labels)
    x = cache.gather(rows).astype(np.float32)  # the baseline's arrays: built before timing
    y = keras.utils.to_categorical(cache.label_indices(rows), k).astype(np.float32)

    ds = one_hot(split_dataset(cache, "train", batch_size=BATCH_SIZE, shuffle=True, seed=seed, rows=rows), k)

    def fit_pipeline(model: keras.Model, timer: keras.callbacks.Callback) -> None:
        model.fit(ds, epochs=1, callbacks=[timer], shuffle=False, verbose=0)

    def fit_arrays(model: keras.Model, timer: keras.callbacks.Callback) -> None:
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, callbacks=[timer], shuffle=True, verbose=0)

    results = []
    for variant in ("tiny", "small"):

        def model_fn(variant: str = variant) -> keras.Model:
            seed_everything(seed)
            model = build_scratch(variant, k, IMAGE_SIZE)
            compile_model(model, 1e-3, 0.0)
            return model

        arrays_s, pipe_s = _interleaved(model_fn, fit_arrays, fit_pipeline, measured)
        arrays_ips = len(rows) / median(steady_epochs(arrays_s))
        pipe_ips = len(rows) / median(steady_epochs(pipe_s))
        log.info(
            "pipeline scratch_%s: arrays %.1f img/s %s, pipeline %.1f img/s %s",
            variant,
            arrays_ips,
            [round(s, 2) for s in arrays_s],
            pipe_ips,
            [round(s, 2) for s in pipe_s],
        )
        results.append(
            Result(
                name=f"pipeline_{variant}",
                title=f"model.fit scratch_{variant} {IMAGE_SIZE}px bs{BATCH_SIZE}, {len(rows)} imgs",
                baseline=fmt(arrays_ips, "img/s"),
                project=fmt(pipe_ips, "img/s"),
                ratio=pipe_ips / arrays_ips,
                ratio_meaning="tf.data-from-memmap images/s / in-memory numpy images/s (1 = no overhead)",
                details={
                    "model": f"scratch_{variant}",
                    "image_size": IMAGE_SIZE,
                    "batch_size": BATCH_SIZE,
                    "train_images": int(len(rows)),
                    "measured_epochs": measured,
                    "arrays_epoch_seconds": [round(s, 3) for s in arrays_s],
                    "pipeline_epoch_seconds": [round(s, 3) for s in pipe_s],
                    "arrays_images_per_s": arrays_ips,
                    "pipeline_images_per_s": pipe_ips,
                },
            )
        )
    return results
