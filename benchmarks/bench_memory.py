"""4. Peak RSS of a training task: the pipeline (memmap cache + tf.data) vs float32 arrays in memory.

Each approach runs in its own child process (``python -m benchmarks.bench_memory --child
...``), so neither inherits the other's heap; the child reports its peak RSS as one JSON line.
The peak is VmHWM from /proc/self/status, which starts afresh at exec: ``ru_maxrss`` does
not (Linux preserves it across execve, so a child spawned by a 2 GB parent reports >= 2 GB
even if it used 9 MB) and is recorded for reference only. Both train the same small model (``scratch_tiny``)
for one epoch on the same generated 224 px images, validation included:

- ``pipeline``: `ml.training.fit.train_candidate` itself (augmentation off), i.e. a real
  training task, on the image cache the parent built beforehand (the build streams through
  a bounded window; its cost is benchmark 1).
- ``arrays``: the seeds' notebooks' approach, made as lean as it gets: every train and val
  image decoded into preallocated float32 arrays (no Python list of images, no
  train_test_split copy), then ``model.fit(x, y, validation_data=...)``.

Peak RSS (VmHWM) counts every resident file page mapped into the process: TensorFlow's shared
libraries (~590 MB), and it counted the cache's memmap pages while batches were gathered through
the memmap (750 MB at 5,000 x 224 px); `ImageCache.gather` now unmaps the pages it copied
(madvise MADV_DONTNEED), so they stay in the kernel's page cache only. The peak *anonymous*
memory (sampled every 50 ms) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    CACHE_ROOT,
    REPO_ROOT,
    MemorySampler,
    Result,
    Settings,
    fmt,
    generated_dataset,
    log,
    peak_rss_mb,
    proc_status_mb,
)

IMAGE_SIZE = 224
BATCH_SIZE = 32
MODEL = "scratch_tiny"
RESULT_PREFIX = "BENCH_MEMORY_RESULT "
CHILD_TIMEOUT_S = 1200


def run(settings: Settings) -> Result:
    from ml.data.image_cache import build_image_cache

    dataset_dir = generated_dataset(settings.memory_images, settings.seed, size=IMAGE_SIZE)
    cache = build_image_cache(dataset_dir, IMAGE_SIZE, CACHE_ROOT)
    children = {approach: _run_child(approach, dataset_dir, settings) for approach in ("arrays", "pipeline")}
    arrays, pipeline = children["arrays"], children["pipeline"]
    anon_ratio = arrays["peak_anon_mb"] / pipeline["peak_anon_mb"]
    float32_gb = (arrays["train_images"] + arrays["val_images"]) * IMAGE_SIZE**2 * 3 * 4 / 1e9
    return Result(
        name="memory",
        title=f"peak RSS, 1 epoch {MODEL} on {len(cache)} {IMAGE_SIZE}px imgs",
        baseline=fmt(arrays["peak_rss_mb"], "MiB", 0),
        project=fmt(pipeline["peak_rss_mb"], "MiB", 0),
        ratio=arrays["peak_rss_mb"] / pipeline["peak_rss_mb"],
        ratio_meaning="peak RSS of float32 arrays / peak RSS of the pipeline (separate processes)",
        notes=[
            f"peak anonymous memory: arrays {arrays['peak_anon_mb']:,.0f} MiB, pipeline "
            f"{pipeline['peak_anon_mb']:,.0f} MiB ({anon_ratio:.2f}x); "
            f"float32 train+val arrays alone {float32_gb:.2f} GB",
            f"peak RSS right after importing TensorFlow: {pipeline['peak_rss_after_tf_import_mb']:,.0f} MiB; "
            f"child wall time: arrays {arrays['seconds']:.0f} s, pipeline {pipeline['seconds']:.0f} s "
            "(train_candidate also saves and verifies the model)",
        ],
        details={
            "images": len(cache),
            "image_size": IMAGE_SIZE,
            "model": MODEL,
            "float32_train_val_gb": round(float32_gb, 2),
            "cache_file_mb": round(len(cache) * IMAGE_SIZE**2 * 3 / 2**20, 1),
            "arrays": arrays,
            "pipeline": pipeline,
            "peak_anon_ratio": anon_ratio,
        },
    )


def _run_child(approach: str, dataset_dir: Path, settings: Settings) -> dict[str, Any]:
    out_dir = settings.work / f"memory-{approach}"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_memory",
        "--child",
        approach,
        "--dataset",
        str(dataset_dir),
        "--out",
        str(out_dir),
        "--seed",
        str(settings.seed),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log.info("memory: %s child starting", approach)
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"memory child {approach!r} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    log.info(
        "memory: %s child peak RSS %.0f MiB (anon %.0f MiB) in %.1f s",
        approach,
        result["peak_rss_mb"],
        result["peak_anon_mb"],
        time.perf_counter() - started,
    )
    return result


# --- child process ---------------------------------------------------------------------------------


def _child(approach: str, dataset_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train once with `approach` and return the process's memory figures."""
    import keras  # noqa: F401  (imported first: the framework's own footprint is the floor)
    import tensorflow as tf  # noqa: F401

    from ml.config import TrainConfig

    after_import = proc_status_mb("VmHWM")["VmHWM"]
    config = TrainConfig(
        candidates=(MODEL,),
        epochs=1,
        image_size=IMAGE_SIZE,
        batch_size=BATCH_SIZE,
        weights="none",
        augment=False,
        seed=seed,
    )
    started = time.perf_counter()
    with MemorySampler() as sampler:
        if approach == "pipeline":
            counts = _train_pipeline(dataset_dir, out_dir, config)
        else:
            counts = _train_arrays(dataset_dir, config)
    status = proc_status_mb("VmHWM", "RssAnon", "RssFile")
    return {
        "approach": approach,
        **counts,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_after_tf_import_mb": round(after_import, 1),
        "peak_rss_mb": round(status["VmHWM"], 1),
        "peak_anon_mb": round(sampler.peak["RssAnon"], 1),
        "peak_file_mb": round(sampler.peak["RssFile"], 1),
        # Not the headline: Linux keeps ru_maxrss across execve, so it starts at the peak RSS
        # of the parent that spawned this process (see README.md).
        "ru_maxrss_mb": round(peak_rss_mb(), 1),
    }


def _train_pipeline(dataset_dir: Path, out_dir: Path, config: Any) -> dict[str, Any]:
    from ml.data.image_cache import build_image_cache
    from ml.training.fit import train_candidate

    cache = build_image_cache(dataset_dir, IMAGE_SIZE, CACHE_ROOT)  # built by the parent: a verified hit
    summary = train_candidate(dataset_dir, MODEL, out_dir, config, cache_root=CACHE_ROOT)
    return {
        "train_images": len(cache.split_indices("train")),
        "val_images": len(cache.split_indices("val")),
        # What train_summary.json records (ru_maxrss: includes the spawning parent's peak).
        "train_summary_peak_rss_mb": summary["peak_rss_mb"],
    }


def _train_arrays(dataset_dir: Path, config: Any) -> dict[str, int]:
    import keras

    from ml.data.image_cache import read_dataset
    from ml.data.images import load_rgb, resize_square
    from ml.models.scratch import build_scratch
    from ml.training.fit import compile_model, seed_everything

    info, ok = read_dataset(dataset_dir)
    labels = list(info["labels"])
    k = len(labels)

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = ok[ok["split"] == split]
        x = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        for i, rel in enumerate(rows["path"]):
            x[i] = resize_square(load_rgb(dataset_dir / rel), IMAGE_SIZE)
        y = keras.utils.to_categorical([labels.index(v) for v in rows["label"]], k).astype(np.float32)
        return x, y

    x_train, y_train = arrays("train")
    x_val, y_val = arrays("val")
    seed_everything(config.seed)
    model = build_scratch(MODEL, k, IMAGE_SIZE)
    compile_model(model, config.learning_rate, config.label_smoothing)
    model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        batch_size=config.batch_size,
        epochs=config.epochs,
        shuffle=True,
        verbose=2,
    )
    return {"train_images": len(x_train), "val_images": len(x_val)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="memory benchmark child: one training task, reports peak RSS"
    )
    parser.add_argument("--child", choices=("pipeline", "arrays"), required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    result = _child(args.child, args.dataset, args.out, args.seed)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
