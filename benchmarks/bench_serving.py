"""7. Serving latency: the consumer client (`Predictor`) vs a bare compiled call of the same model.

The model is the real one of benchmark 5: MobileNet v1 alpha 0.25 at 224 px with the ImageNet
weights file, plus a 3-class head, saved as a candidate folder and exported to TFLite as a
promotion does. Timed, interleaved round by round so load from other processes hits every
path alike (median of the rounds):

- ``bare compiled``: ``tf.function(lambda x: model(x, training=False))`` on a ready tf.Tensor,
  the floor any Python client can reach with TensorFlow;
- ``client``: ``Predictor.predict_proba`` on uint8 RGB arrays (the default ``compiled`` runtime,
  including its input checks and float conversion);
- ``client tflite``: the same with ``runtime="tflite"`` (the exported model.tflite);
- ``eager``: ``model(x)`` called eagerly, what the client did before (reference only).

Single image and batch 32. The headline ratio is bare compiled / client on one image: >= 0.83
means the client is within 1.2x of the bare call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Result, Settings, log, median

WEIGHTS_FILE = "mobilenet_2_5_224_tf_no_top.h5"
IMAGE_SIZE = 224
LABELS = ["cats", "dogs", "panda"]
BATCH = 32


def run(settings: Settings) -> Result:
    weights = settings.bench_data / "weights" / WEIGHTS_FILE
    if not weights.is_file():
        return Result(name="serving", title="serving latency", skipped=f"{weights} is missing (set ML_BENCH_DATA)")
    folder = _model_folder(settings.work / "serving-model", weights)
    paths = _paths(folder)
    rounds = (10, 4) if settings.quick else (40, 12)
    rng = np.random.default_rng(settings.seed)
    timings = {
        n: _interleaved(paths, rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), r)
        for n, r in zip((1, BATCH), rounds, strict=True)
    }
    one, batch = timings[1], timings[BATCH]
    ratio = one["bare compiled"] / one["client"]
    return Result(
        name="serving",
        title=f"1-image latency, MobileNet v1 0.25 @{IMAGE_SIZE}px",
        baseline=f"{one['bare compiled']:.2f} ms",
        project=f"{one['client']:.2f} ms",
        ratio=ratio,
        ratio_meaning="bare tf.function call ms / Predictor.predict_proba ms, one image (>= 0.83: within 1.2x)",
        notes=[
            "one image: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in one.items()),
            f"batch {BATCH}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in batch.items()),
            f"client tflite vs bare compiled, one image: {one['bare compiled'] / one['client tflite']:.2f}x",
        ],
        details={"image_size": IMAGE_SIZE, "rounds": dict(zip(("single", "batch"), rounds, strict=True)),
                 "median_ms_single": one, "median_ms_batch": batch},
    )


def _model_folder(folder: Path, weights: Path) -> Path:
    """A candidate-like folder: model.keras, labels.json, preprocessing.json, model.tflite."""
    import keras

    from ml.data.images import DECODE
    from ml.models.transfer import build_transfer
    from ml.registry.exports import convert_tflite, export_saved_model

    keras.utils.set_random_seed(0)
    model = build_transfer("mobilenet", len(LABELS), IMAGE_SIZE, options={"alpha": 0.25}, weights=str(weights))
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps(LABELS))
    (folder / "preprocessing.json").write_text(json.dumps({
        "image_size": IMAGE_SIZE, "color_order": "RGB", "input_range": [0, 255], "dtype": "float32",
        "decode": DECODE, "architecture": "mobilenet"}))
    started = time.perf_counter()
    convert_tflite(export_saved_model(model, folder / "saved_model.zip"), folder / "model.tflite")
    log.info("serving: model folder and TFLite export ready in %.0f s", time.perf_counter() - started)
    return folder


def _paths(folder: Path) -> dict[str, Callable[[np.ndarray], Any]]:
    import tensorflow as tf

    from ml.models import load_model
    from ml.serving.predictor import load_local

    model = load_model(folder / "model.keras", compile=False)
    bare = tf.function(lambda x: model(x, training=False))
    client, client_tflite = load_local(folder), load_local(folder, runtime="tflite")
    tensors: dict[int, Any] = {}

    def bare_call(images: np.ndarray) -> Any:
        # The bare call gets a ready float32 tensor: no conversion counted against it.
        x = tensors.setdefault(id(images), tf.constant(images, dtype=tf.float32))
        return bare(x).numpy()

    return {
        "bare compiled": bare_call,
        "client": lambda images: client.predict_proba(images, batch_size=BATCH),
        "client tflite": lambda images: client_tflite.predict_proba(images, batch_size=BATCH),
        "eager": lambda images: model(images.astype(np.float32), training=False).numpy(),
    }


def _interleaved(paths: dict[str, Callable[[np.ndarray], Any]], images: np.ndarray, rounds: int) -> dict[str, float]:
    """Median ms per path: each round calls every path once, so a burst of load hits them all."""
    for fn in paths.values():  # warm-up: tracing, tensor allocation
        fn(images)
        fn(images)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn(images)
            times[name].append((time.perf_counter() - start) * 1000.0)
    result = {name: median(values) for name, values in times.items()}
    log.info("serving, %d image(s): %s", len(images), ", ".join(f"{k} {v:.2f} ms" for k, v in result.items()))
    return result
