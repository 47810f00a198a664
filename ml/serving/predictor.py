"""Load a published model and predict, with the preprocessing it was trained with.

A consumer resolves ``production.json``, downloads the version's files once into
``<cache_dir>/<model_name>/<version>/`` (a temporary folder, renamed when complete), and
verifies every file's sha256 against version.json -- and model.keras against the pointer --
each time it loads, cached or not. A cached copy that fails is discarded and fetched again; a
stored copy that fails raises `ModelVerificationError`. `ModelClient` keeps serving its last
good model when a newly promoted one fails.

Inputs follow ``preprocessing.json``: image files and bytes go through
`ml.data.images.decode_resize`, the very function that filled the training cache (so train and
serve see identical pixels); arrays are resized with cv2.INTER_AREA (`resize_square`); the model
gets float32 RGB pixels in [0, 255], the architecture's own preprocessing being a layer inside it.
The model runs compiled (``tf.function``) or, with ``runtime="tflite"``, as the version's
model.tflite (`ml.serving.runtimes`): never eagerly.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import DataError, ModelVerificationError, StorageError
from ml.io import read_json, sha256_file
from ml.registry.layout import pointer_key, version_key
from ml.serving.runtimes import COMPILED, PredictFn, check_runtime, predict_fn

if TYPE_CHECKING:
    from ml.registry.store import ObjectStore

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
PREPROCESSING_FILE = "preprocessing.json"
_REQUIRED = (MODEL_FILE, LABELS_FILE, PREPROCESSING_FILE)
# Largest file a version may list (model.keras of a big backbone is ~0.5 GB; exports a few times that).
MAX_FILE_BYTES = 8 * 1024**3
# preprocessing.json's image_size bounds (the training config's range): a crafted 10^6 must not
# make a consumer allocate terabytes for one batch.
IMAGE_SIZE_RANGE = (8, 2048)
ImageInput = str | Path | bytes | np.ndarray


@dataclass
class Predictor:
    """A loaded model plus what it needs to turn images into class probabilities.

    Attributes:
        model: the Keras model (RGB float32 [0, 255] input of image_size x image_size).
        labels: class names, index = output unit.
        image_size: input height and width in pixels.
        version: the registry version, or None for a local model.
        sha256: sha256 of the model.keras that was loaded.
        preprocessing: preprocessing.json as stored with the model.
        path: the folder the files were loaded from.
        runtime: how the model runs: "compiled" (tf.function) or "tflite" (`ml.serving.runtimes`).
    """

    model: Any
    labels: list[str]
    image_size: int
    version: str | None = None
    sha256: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    runtime: str = "compiled"
    _run: PredictFn | None = field(default=None, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        """The model.keras that was loaded."""
        if self.path is None:
            raise ModelVerificationError(f"predictor for version {self.version} has no folder on disk")
        return self.path / MODEL_FILE

    def _prepare_one(self, image: ImageInput, index: int) -> np.ndarray:
        from ml.data.images import decode_resize, load_resized, resize_square

        if isinstance(image, (str, Path)):
            return load_resized(image, self.image_size).astype(np.float32)
        if isinstance(image, bytes):
            return decode_resize(image, self.image_size, source=f"image {index}").astype(np.float32)
        array = np.asarray(image)
        if array.ndim == 2:  # grayscale: replicate, as cv2.IMREAD_COLOR does for files
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3:
            raise DataError(f"image {index}: expected an RGB array of shape (H, W, 3), got {array.shape}")
        if array.dtype != np.uint8:
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
                raise DataError(
                    f"image {index}: pixel values must be in [0, 255] (RGB), got "
                    f"[{array.min()}, {array.max()}] of dtype {array.dtype}"
                )
            array = array.astype(np.float32)
        return resize_square(array, self.image_size).astype(np.float32)

    def prepare(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Decode/resize images to a float32 batch (N, size, size, 3) of RGB pixels in [0, 255]."""
        if len(images) == 0:
            return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        return np.stack([self._prepare_one(image, i) for i, image in enumerate(images)])

    def predict_proba(self, images: Sequence[ImageInput], *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape (N, n_classes), rows in input order."""
        batch = self.prepare(images)
        out = np.zeros((len(batch), len(self.labels)), np.float32)
        if self._run is None:
            self._run = predict_fn(self.runtime, self.model, self.path, where=f"model {self.version or self.path}")
        for start in range(0, len(batch), batch_size):
            out[start : start + batch_size] = self._run(batch[start : start + batch_size])
        return out

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """For each image, the `top_k` most probable labels: [{label, probability}, ...], best first."""
        probs = self.predict_proba(images)
        k = max(1, min(top_k, len(self.labels)))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            results.append([{"label": self.labels[i], "probability": float(row[i])} for i in order])
        return results


# -- loading ---------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ModelVerificationError(f"{what} {path} is missing") from None
    except ValueError as exc:
        raise ModelVerificationError(f"{what} {path} is not valid JSON: {exc}") from None


def _verify_files(
    folder: Path, files: dict[str, dict[str, Any]], *, expected_model_sha: str | None, where: str
) -> str:
    """Check each listed file's sha256 (and model.keras against the pointer); returns model sha256."""
    for name in _REQUIRED:
        if name not in files:
            raise ModelVerificationError(f"{where}: version.json lists no {name!r}; files: {sorted(files)}")
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelVerificationError(f"{where}: {name} is missing in {folder}")
        actual = sha256_file(path)
        if actual != meta.get("sha256"):
            raise ModelVerificationError(
                f"{where}: {name} has sha256 {actual} but version.json says "
                f"{meta.get('sha256')}; refusing to load it"
            )
    model_sha = str(files[MODEL_FILE]["sha256"])
    if expected_model_sha is not None and model_sha != expected_model_sha:
        raise ModelVerificationError(
            f"{where}: model.keras has sha256 {model_sha} but production.json says "
            f"{expected_model_sha}; refusing to load it"
        )
    return model_sha


def _load_folder(folder: Path, *, version: str | None, sha256: str, where: str, runtime: str) -> Predictor:
    """Load model.keras, labels.json and preprocessing.json from a (verified) folder; build its runtime."""
    from ml.models import load_model

    labels = _read_json(folder / LABELS_FILE, "labels file")
    preprocessing = _read_json(folder / PREPROCESSING_FILE, "preprocessing file")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ModelVerificationError(f"{where}: labels.json must be a non-empty list of class names")
    if not isinstance(preprocessing, dict):
        raise ModelVerificationError(f"{where}: preprocessing.json must be an object, got {preprocessing!r}")
    color, value_range = (
        preprocessing.get("color_order", "RGB"),
        list(preprocessing.get("input_range", [0, 255])),
    )
    if color != "RGB" or value_range != [0, 255]:
        raise ModelVerificationError(
            f"{where}: preprocessing.json asks for color_order {color!r} and input_range "
            f"{value_range}; this predictor feeds RGB in [0, 255] only"
        )
    try:
        size = int(preprocessing["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ModelVerificationError(f"{where}: preprocessing.json has no integer image_size") from None
    if not IMAGE_SIZE_RANGE[0] <= size <= IMAGE_SIZE_RANGE[1]:
        raise ModelVerificationError(
            f"{where}: preprocessing.json image_size {size} is outside {list(IMAGE_SIZE_RANGE)} pixels"
        )
    try:
        model = load_model(folder / MODEL_FILE, compile=False)
    except ModelVerificationError as exc:
        raise ModelVerificationError(f"{where}: {exc}") from exc
    out_units = model.output_shape[-1] if hasattr(model, "output_shape") else None
    if out_units is not None and out_units != len(labels):
        raise ModelVerificationError(
            f"{where}: the model has {out_units} outputs but labels.json lists {len(labels)} classes"
        )
    run = predict_fn(runtime, model, folder, where=where)
    log.info("loaded %s (%d classes, %d px, sha256 %s, runtime %s)", where, len(labels), size, sha256[:12],
             runtime)
    return Predictor(
        model=model,
        labels=labels,
        image_size=size,
        version=version,
        sha256=sha256,
        preprocessing=preprocessing,
        path=folder,
        runtime=runtime,
        _run=run,
    )


def _checked_files(files: Any, where: str) -> dict[str, dict[str, Any]]:
    """version.json's file table, refused unless every name is a plain file name and every size sane.

    The table comes from the store, which may have been tampered with: it is checked here, before
    a single byte is written, so a name like ``../../escaped.txt`` never reaches the filesystem.
    """
    from ml.errors import UnsafeNameError
    from ml.registry.layout import check_name

    if not isinstance(files, dict) or not files:
        raise ModelVerificationError(f"{where}: version.json has no file table")
    checked: dict[str, dict[str, Any]] = {}
    for name, meta in files.items():
        try:
            check_name(name, "file name in version.json")
        except UnsafeNameError as exc:
            raise ModelVerificationError(f"{where}: {exc}; refusing to download the version") from None
        size = meta.get("size") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
            raise ModelVerificationError(
                f"{where}: version.json lists {name!r} with size {size!r}; expected 0 to {MAX_FILE_BYTES} bytes"
            )
        checked[name] = meta
    return checked


def _download_version(store: ObjectStore, model_name: str, version: str, files: dict[str, Any], dest: Path) -> None:
    """Download every file into a temporary sibling folder, then rename it to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        for name, meta in files.items():
            # No more bytes than version.json promised: the sha256 check comes after the download.
            store.download_file(version_key(model_name, version, name), tmp / name, max_bytes=int(meta["size"]))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not "another process finished the same download first"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_version(
    store: ObjectStore,
    model_name: str,
    version: str,
    *,
    cache_dir: Path,
    expected_sha256: str | None = None,
    runtime: str = COMPILED,
) -> Predictor:
    """Fetch (once) and load a COMPLETE version, verifying sha256s every time.

    Args:
        expected_sha256: model.keras's sha256 from the pointer, checked as well when given.
        runtime: "compiled" or "tflite" (the version's model.tflite; `ml.serving.runtimes`).

    Raises:
        ModelVerificationError: missing/incomplete version, checksum mismatch or unloadable model.
    """
    from ml.registry.versions import read_version

    check_runtime(runtime)
    where = f"{model_name} version {version}"
    try:
        info = read_version(store, model_name, version)
    except StorageError as exc:
        raise ModelVerificationError(f"{where}: {exc}") from None
    files = _checked_files(info.get("files"), where)
    if expected_sha256 is not None and info.get("sha256") != expected_sha256:
        raise ModelVerificationError(
            f"{where}: version.json says model.keras sha256 {info.get('sha256')} but "
            f"production.json says {expected_sha256}; refusing to load it"
        )
    dest = Path(cache_dir) / model_name / version
    if dest.is_dir():
        try:
            sha = _verify_files(dest, files, expected_model_sha=expected_sha256, where=f"{where} (cached)")
            return _load_folder(dest, version=version, sha256=sha, where=where, runtime=runtime)
        except ModelVerificationError as exc:
            # A damaged cache must not pin us to bad bytes: drop it and fetch the stored copy.
            log.warning("discarding cached %s: %s", where, exc)
            shutil.rmtree(dest, ignore_errors=True)
    try:
        _download_version(store, model_name, version, files, dest)
    except StorageError as exc:
        raise ModelVerificationError(f"{where}: download failed: {exc}") from None
    try:
        sha = _verify_files(dest, files, expected_model_sha=expected_sha256, where=where)
    except ModelVerificationError:
        shutil.rmtree(dest, ignore_errors=True)  # never leave unverified bytes in the cache
        raise
    return _load_folder(dest, version=version, sha256=sha, where=where, runtime=runtime)


def load_production(
    store: ObjectStore, model_name: str, *, cache_dir: Path, runtime: str = COMPILED
) -> Predictor:
    """Load the version production.json points at (see `load_version`)."""
    from ml.registry.versions import read_pointer

    pointer, _ = read_pointer(store, model_name)
    if pointer is None:
        raise ModelVerificationError(
            f"{model_name} has no production model yet "
            f"({store.uri(pointer_key(model_name))} does not exist)"
        )
    return _load_pointer(store, model_name, pointer, cache_dir=cache_dir, runtime=runtime)


def _load_pointer(
    store: ObjectStore, model_name: str, pointer: dict[str, Any], *, cache_dir: Path, runtime: str
) -> Predictor:
    version, sha = pointer.get("version"), pointer.get("sha256")
    if not version or not sha:
        raise ModelVerificationError(
            f"{store.uri(pointer_key(model_name))} lacks version or sha256: {sorted(pointer)}"
        )
    return load_version(
        store, model_name, str(version), cache_dir=cache_dir, expected_sha256=str(sha), runtime=runtime
    )


def load_local(path: str | Path, *, runtime: str = COMPILED) -> Predictor:
    """Load a model folder (or its model.keras) with labels.json and preprocessing.json beside it.

    When a version.json is there too, its sha256s are checked. ``runtime="tflite"`` needs a
    model.tflite beside it.
    """
    check_runtime(runtime)
    path = Path(path)
    folder = path.parent if path.is_file() else path
    where = f"local model {folder}"
    if not (folder / MODEL_FILE).is_file():
        raise ModelVerificationError(f"{where}: no {MODEL_FILE} there")
    version_file = folder / "version.json"
    if version_file.is_file():
        info = _read_json(version_file, "version file")
        sha = _verify_files(folder, _checked_files(info.get("files"), where), expected_model_sha=None, where=where)
        return _load_folder(folder, version=info.get("version"), sha256=sha, where=where, runtime=runtime)
    return _load_folder(folder, version=None, sha256=sha256_file(folder / MODEL_FILE), where=where, runtime=runtime)


class ModelClient:
    """Serves the production model and follows promotions, never swapping in a bad model.

    `refresh()` re-reads production.json; a new version is loaded and verified before it
    replaces the current one. If it fails, the error is logged, kept in `last_error`, and the
    last good predictor keeps serving.
    """

    def __init__(self, store: ObjectStore, model_name: str, *, cache_dir: Path, runtime: str = COMPILED) -> None:
        self.store = store
        self.model_name = model_name
        self.cache_dir = Path(cache_dir)
        self.runtime = check_runtime(runtime)
        self.current: Predictor | None = None
        self.last_error: str | None = None

    def refresh(self) -> Predictor:
        """Follow production.json; returns the predictor now serving.

        Raises:
            ModelVerificationError: only when there is no good model at all to serve.
        """
        from ml.registry.versions import read_pointer

        try:
            pointer, _ = read_pointer(self.store, self.model_name)
        except StorageError as exc:
            return self._keep(
                ModelVerificationError(f"cannot read the production pointer of {self.model_name}: {exc}")
            )
        if pointer is None:
            return self._keep(ModelVerificationError(f"{self.model_name} has no production model yet"))
        current = self.current
        if (
            current is not None
            and current.version == pointer.get("version")
            and current.sha256 == pointer.get("sha256")
        ):
            return current
        try:
            predictor = _load_pointer(
                self.store, self.model_name, pointer, cache_dir=self.cache_dir, runtime=self.runtime
            )
        except ModelVerificationError as exc:
            return self._keep(exc)
        if current is not None:
            log.info(
                "%s: now serving version %s (was %s)", self.model_name, predictor.version, current.version
            )
        self.current, self.last_error = predictor, None
        return predictor

    def _keep(self, exc: ModelVerificationError) -> Predictor:
        self.last_error = str(exc)
        if self.current is None:
            raise exc
        log.error("%s: keeping version %s in service: %s", self.model_name, self.current.version, exc)
        return self.current

    @property
    def predictor(self) -> Predictor:
        """The serving predictor (loads production on first use)."""
        return self.current if self.current is not None else self.refresh()

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """`Predictor.predict` on the serving model."""
        return self.predictor.predict(images, top_k=top_k)
