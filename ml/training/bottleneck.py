"""Cached "bottleneck" features (retrain.py's trick) for transfer candidates without augmentation.

(With augmentation, `ml.training.bank` stores augmented views the same way: `load_or_build`.)

A frozen backbone gives the same pooled features for an image every epoch, so they are
computed once per (dataset_hash, architecture, image_size, alpha, weights id) and stored as
``<cache_root>/bottlenecks/<dataset_hash>/<arch>-<size>-<key>.npy`` (N x D float32, rows in
image-cache order) with a ``.json`` sidecar holding its sha256. A damaged file is recomputed;
two builders at once serialise on a file lock and the second reuses the first one's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.io import atomic_path, exclusive_lock, sha256_file, write_json

if TYPE_CHECKING:
    import keras

    from ml.data.image_cache import ImageCache

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Bottlenecks:
    """Pooled backbone features of every cached image.

    Attributes:
        features: N x D float32 (read-only memmap), row i = image-cache row i.
        path: The .npy file.
        hit: True when the features came from the cache (not computed now).
    """

    features: np.ndarray
    path: Path
    hit: bool


def bottleneck_path(
    cache_root: Path | str,
    dataset_hash: str,
    architecture: str,
    image_size: int,
    weights_id: str,
    alpha: float | None = None,
) -> Path:
    """Where the features of one (dataset, architecture, size, alpha, weights) live."""
    key = json.dumps(
        {
            "arch": architecture,
            "size": int(image_size),
            "alpha": alpha,
            "weights": weights_id,
            "v": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_root) / "bottlenecks" / dataset_hash / f"{architecture}-{int(image_size)}-{digest}.npy"


def load_or_compute(
    cache: ImageCache, extractor: keras.Model, path: Path, *, batch_size: int = 64
) -> Bottlenecks:
    """Features for every row of `cache` from `path`, computing and storing them if needed.

    Args:
        cache: The image cache the rows refer to.
        extractor: image -> pooled features model (`ml.models.transfer.feature_extractor`).
        path: From `bottleneck_path`.
        batch_size: Images per forward pass.
    """
    n = len(cache)

    def compute() -> np.ndarray:
        from ml.training.input_pipeline import split_dataset

        started = time.monotonic()
        # One predict() over a streamed dataset: one tf.function trace, batches from the memmap.
        images = split_dataset(cache, "all", batch_size=batch_size).map(lambda x, y: x)
        features = extract(extractor, images, n)
        log.info("bottlenecks: computed %d x %d features in %.1fs", *features.shape, time.monotonic() - started)
        return features

    meta = {"dataset_hash": cache.dataset_hash, "image_size": cache.image_size}
    features, hit = load_or_build(path, (n,), compute, meta, what="bottleneck cache")
    return Bottlenecks(features, path, hit=hit)


def extract(extractor: keras.Model, images: Any, n: int) -> np.ndarray:
    """Pooled features (n x D float32) of an image dataset, in its order."""
    dim = int(extractor.output_shape[-1])
    return np.asarray(extractor.predict(images, verbose=0), dtype=np.float32).reshape(n, dim)


def load_or_build(
    path: Path, leading: tuple[int, ...], build: Callable[[], np.ndarray], meta: Mapping[str, Any], *, what: str
) -> tuple[np.ndarray, bool]:
    """A verified float32 array from `path`, or `build()`'s stored there (under a lock) when missing or damaged.

    Args:
        path: The .npy file; its ``.json`` sidecar holds the sha256 and is written last.
        leading: The expected leading dimensions (rows, or views x rows); anything else is rebuilt.
        build: Computes the array on a miss.
        meta: Extra sidecar fields (what the array was built from).
        what: Names the cache in log lines.

    Returns:
        (read-only memmap of the array, True when it came from the cache).
    """
    found = _try_load(path, leading, what)
    if found is not None:
        log.info("%s: hit %s (%s)", what, path, " x ".join(map(str, found.shape)))
        return found, True
    with exclusive_lock(path.with_suffix(".lock")):
        found = _try_load(path, leading, what)
        if found is not None:  # another builder finished while we waited for the lock
            return found, True
        array = np.ascontiguousarray(build(), dtype=np.float32)
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, array)
            digest = sha256_file(tmp)  # of the bytes written, before anyone can read them under `path`
        # The sidecar last: without it (or with another file's digest) the array is never used.
        write_json(
            _sidecar(path), {**meta, "sha256": digest, "shape": list(array.shape), "version": FORMAT_VERSION}
        )
        log.info("%s: stored %s -> %s", what, " x ".join(map(str, array.shape)), path)
    return np.load(path, mmap_mode="r"), False


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _try_load(path: Path, leading: tuple[int, ...], what: str) -> np.ndarray | None:
    sidecar = _sidecar(path)
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if meta.get("sha256") != sha256_file(path):
            raise ValueError("sha256 mismatch")
        features = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("%s %s is damaged and will be recomputed: %s", what, path, exc)
        return None
    if features.ndim != len(leading) + 1 or features.shape[: len(leading)] != tuple(leading):
        log.warning("%s %s has shape %s, expected %s x D: recomputing", what, path, features.shape, leading)
        return None
    return features
