"""Resolving the ``train.weights`` setting to something a backbone builder can load.

``imagenet``  Keras' download cache (``$KERAS_HOME/models/``, default ``~/.keras/models/``). An
              air-gapped worker fails with the exact file name to pre-stage there.
``none``      random initialisation (logged loudly: the model is not pretrained).
a path        a local ``.h5`` / ``.weights.h5`` / ``.keras`` file for the headless backbone.
``s3://b/k``  downloaded once through the object-store client into a local cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from ml.errors import ConfigError
from ml.io import atomic_path, sha256_file, write_atomic
from ml.models.registry import ArchitectureSpec, get_architecture

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".h5", ".keras")

# Old name of ml.io.sha256_file, still imported by tests/faults; new code imports ml.io.sha256_file.
file_sha256 = sha256_file


def keras_models_dir() -> Path:
    """Where Keras caches downloaded application weights (``$KERAS_HOME/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve_weights(
    spec: str,
    arch: str | ArchitectureSpec,
    image_size: int,
    *,
    store: Any = None,
    cache_dir: Path | str,
    alpha: float | None = None,
) -> str | None:
    """Turn a weights setting into None, "imagenet" or a local file path.

    Args:
        spec: "imagenet", "none", a local weights path, or ``s3://bucket/key``.
        arch: Registry architecture (decides the ImageNet file name).
        image_size: Input size (MobileNets' ImageNet file depends on it).
        store: Object-store client with ``for_bucket(bucket).download_file(key, path)``;
            needed for s3:// only.
        cache_dir: Folder for downloaded weight files.
        alpha: MobileNet width multiplier (part of the ImageNet file name).

    Raises:
        ConfigError: unknown setting, missing file, no ImageNet file offline (naming the file
            and the folder to put it in), or an s3:// URI without a store.
    """
    arch_spec = arch if isinstance(arch, ArchitectureSpec) else get_architecture(arch)
    value = (spec or "").strip()
    if value.lower() == "none":
        log.warning(
            "WEIGHTS: %s is NOT PRETRAINED (weights='none'): the backbone starts from random "
            "initialisation; set train.weights to 'imagenet' or a weights file for transfer learning",
            arch_spec.name,
        )
        return None
    if value.lower() == "imagenet":
        _ensure_imagenet(arch_spec, image_size, alpha)
        return "imagenet"
    if value.startswith("s3://"):
        return str(_download_s3(value, store, Path(cache_dir)))
    if value.startswith(("http://", "https://", "gs://")):
        raise ConfigError(
            f"weights {value!r}: only 'imagenet', 'none', a local path or s3:// URIs are supported"
        )
    path = Path(value).expanduser()
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(
            f"weights file {path} must end with one of {WEIGHT_SUFFIXES} "
            "('imagenet', 'none', a local .h5/.keras path, or an s3:// URI)"
        )
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    return str(path.resolve())


def weights_id(
    resolved: str | None,
    arch: str | ArchitectureSpec,
    image_size: int,
    *,
    alpha: float | None = None,
    seed: int = 0,
) -> str:
    """A short identity of the weights, for cache keys (bottleneck features)."""
    arch_spec = arch if isinstance(arch, ArchitectureSpec) else get_architecture(arch)
    if resolved is None:
        # Random init is reproducible only for the same seed.
        return f"random-seed{seed}"
    if resolved == "imagenet":
        return "imagenet-" + arch_spec.weights_file_name(image_size, alpha).removesuffix(".h5")
    return "file-" + sha256_file(resolved)[:16]


# Where keras.applications downloads its weight files from.
KERAS_WEIGHTS_HOST = "storage.googleapis.com"


def imagenet_source(arch: str | ArchitectureSpec, image_size: int, *, alpha: float | None = None,
                    timeout: float = 3.0) -> str:
    """Where ImageNet weights would come from: "cached", "reachable" (download host answers) or "offline".

    A TCP connect with `timeout` seconds, no download: callers that want the file then ask
    `resolve_weights("imagenet", ...)`, which fetches it.
    """
    import socket

    spec = arch if isinstance(arch, ArchitectureSpec) else get_architecture(arch)
    if (keras_models_dir() / spec.weights_file_name(image_size, alpha)).is_file():
        return "cached"
    try:
        with socket.create_connection((KERAS_WEIGHTS_HOST, 443), timeout=timeout):
            return "reachable"
    except OSError:
        return "offline"


def _ensure_imagenet(spec: ArchitectureSpec, image_size: int, alpha: float | None) -> None:
    file_name = spec.weights_file_name(image_size, alpha)
    folder = keras_models_dir()
    if (folder / file_name).is_file():
        return
    log.info("ImageNet weights %s not in %s: downloading through Keras", file_name, folder)
    try:
        # Building once with weights="imagenet" makes Keras fetch (and hash-check) its file.
        spec.build_backbone(max(image_size, spec.min_size), alpha=alpha, weights="imagenet")
    except Exception as exc:  # keras' get_file raises a bare Exception on URL/HTTP errors
        raise ConfigError(
            f"ImageNet weights for {spec.name} are not cached and could not be downloaded ({exc}). "
            f"On an offline worker, pre-stage the file {file_name} in {folder}/ "
            f"(i.e. $KERAS_HOME/models/), or set train.weights to a local path or s3:// URI"
        ) from exc


def _download_s3(uri: str, store: Any, cache_dir: Path) -> Path:
    if store is None:
        raise ConfigError(f"weights {uri} is an s3:// URI but no object-store client was given")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ConfigError(f"weights URI {uri!r} must look like s3://bucket/key.h5")
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(f"weights URI {uri} must name a file ending with one of {WEIGHT_SUFFIXES}")
    # Keyed by the URI's sha256: one download per URI; the sidecar detects a damaged copy.
    folder = cache_dir / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    target = folder / name
    sidecar = folder / (name + ".sha256")
    if target.is_file() and sidecar.is_file() and sidecar.read_text().strip() == sha256_file(target):
        log.info("weights %s: using cached copy %s", uri, target)
        return target
    with atomic_path(target) as tmp:
        store.for_bucket(bucket).download_file(key, str(tmp))
        digest = sha256_file(tmp)
    write_atomic(sidecar, digest + "\n")
    log.info("weights %s: downloaded to %s (sha256 %s)", uri, target, digest[:12])
    return target
