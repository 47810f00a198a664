"""Serving exports of a model version, checked against each other on golden inputs.

A promoted version carries, beside ``model.keras``:

    saved_model.zip   a TF SavedModel (``serving_default`` signature) for TF Serving; entries sit
                      at the archive root, so unzip it into ``<model_base_path>/<n>/``
    model.tflite      the same model for TFLite / LiteRT (float32; optional: a failed conversion is
                      logged and skipped, it never blocks a promotion)
    golden.npz        ``inputs`` (N x S x S x 3 RGB pixels in [0, 255] from the dataset's test
                      split; uint8 when they are whole numbers, so cast to float32 before feeding),
                      ``expected`` (N x K float32 probabilities of ``model.keras``) and ``labels``
                      (class names, index = output unit)

`verify_exports` runs every export on the golden inputs and refuses the set unless each one gives
the same top-1 class as ``model.keras`` and probabilities within ``atol``; the pipeline calls it
before publishing. A consumer checks its own runtime (TF Serving client, TFLite on a phone, ONNX...)
the same way with `verify_runtime`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import DataError, ModelVerificationError
from ml.io import atomic_path, read_json, write_atomic, write_npz

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

SAVED_MODEL_FILE = "saved_model.zip"
TFLITE_FILE = "model.tflite"
GOLDEN_FILE = "golden.npz"
KERAS_FILE = "model.keras"
SERVING_SIGNATURE = "serving_default"
GOLDEN_COUNT = 8
DEFAULT_ATOL = 1e-3  # float32 runtimes differ by ~1e-6 on these models; 1e-3 only flags real drift
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same SavedModel zips to the same bytes

PredictFn = Callable[[np.ndarray], Any]


# -- golden inputs ---------------------------------------------------------------------------------
def golden_images(
    dataset_dir: str | Path, image_size: int, cache_root: str | Path, *, n: int = GOLDEN_COUNT,
    split: str = "test",
) -> np.ndarray:
    """The first `n` images of a split (ordered by sha256, so any worker picks the same ones).

    Returns:
        uint8 array (n, image_size, image_size, 3), RGB, read from the decoded-image cache.

    Raises:
        DataError: the split has no images.
    """
    from ml.data.image_cache import build_image_cache

    cache = build_image_cache(dataset_dir, image_size, cache_root)
    rows = cache.split_indices(split)
    if len(rows) == 0:
        raise DataError(f"dataset {dataset_dir}: the {split!r} split is empty, no golden inputs to take")
    sha = cache.index["sha256"].to_numpy()[rows].astype(str)
    chosen = rows[np.argsort(sha, kind="stable")[:n]]
    return cache.gather(chosen)


def load_golden(path: str | Path) -> dict[str, Any]:
    """golden.npz as {inputs: float32 N x S x S x 3, expected: float32 N x K, labels: list[str]}."""
    path = Path(path)
    if not path.is_file():
        raise ModelVerificationError(f"golden inputs {path} do not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            golden = {"inputs": data["inputs"].astype(np.float32),
                      "expected": data["expected"].astype(np.float32),
                      "labels": [str(x) for x in data["labels"]] if "labels" in data.files else []}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ModelVerificationError(f"{path} is not a golden file (inputs, expected): {exc}") from None
    inputs, expected = golden["inputs"], golden["expected"]
    if inputs.ndim != 4 or expected.ndim != 2 or len(inputs) != len(expected) or len(inputs) == 0:
        raise ModelVerificationError(
            f"{path}: inputs {inputs.shape} and expected {expected.shape} must be (N, S, S, 3) and "
            "(N, K) with N > 0"
        )
    return golden


def write_golden(model: keras.Model, images: np.ndarray, path: str | Path, *,
                 labels: list[str] | None = None) -> Path:
    """Write golden.npz: the images and `model`'s probabilities for them (fed as float32 [0, 255])."""
    images = np.asarray(images)
    inputs = images.astype(np.float32)
    if inputs.ndim != 4 or inputs.shape[-1] != 3 or len(inputs) == 0:
        raise DataError(f"golden images must be a non-empty (N, S, S, 3) array, got shape {inputs.shape}")
    expected = np.asarray(model(inputs, training=False), dtype=np.float32)
    # Cache pixels are uint8: stored as such they take a quarter of the bytes and lose nothing.
    stored = images if images.dtype == np.uint8 else inputs
    return write_npz(path, inputs=stored, expected=expected, labels=np.asarray(labels or [], dtype=str))


# -- building --------------------------------------------------------------------------------------
def export_saved_model(model: keras.Model, dest_zip: str | Path) -> Path:
    """Export `model` as a TF SavedModel (Keras 3 ``model.export``) zipped into `dest_zip`."""
    dest_zip = Path(dest_zip)
    dest_zip.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".saved_model-", dir=dest_zip.parent) as tmp:
        folder = Path(tmp) / "saved_model"
        model.export(str(folder), format="tf_saved_model", verbose=False)
        _zip_folder(folder, dest_zip)
    return dest_zip


def convert_tflite(saved_model: str | Path, dest: str | Path) -> Path:
    """Convert a SavedModel (folder or saved_model.zip) to a float32 TFLite flatbuffer at `dest`."""
    import tensorflow as tf

    dest = Path(dest)
    with _saved_model_dir(Path(saved_model)) as folder:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder))
        content = converter.convert()
    return write_atomic(dest, content)


def build_exports(model_path: str | Path, out_dir: str | Path, *, golden_images: np.ndarray,
                  tflite: bool = True) -> dict[str, Path]:
    """Export a ``.keras`` model for serving and record golden inputs/outputs.

    Args:
        model_path: the ``model.keras`` (a ``labels.json`` beside it goes into golden.npz).
        out_dir: where saved_model.zip, model.tflite and golden.npz are written.
        golden_images: (N, S, S, 3) RGB pixels (uint8 or float in [0, 255]), e.g. `golden_images()`.
        tflite: also convert to TFLite; a failed conversion is logged and skipped.

    Returns:
        File name -> path of what was built: ``saved_model.zip``, ``golden.npz`` and, when the
        conversion worked, ``model.tflite``.

    Raises:
        ModelVerificationError: the model cannot be loaded or exported as a SavedModel.
    """

    from ml.models import load_model

    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path, compile=False)
    labels_file = model_path.with_name("labels.json")
    labels = read_json(labels_file) if labels_file.is_file() else None
    out = {GOLDEN_FILE: write_golden(model, golden_images, out_dir / GOLDEN_FILE, labels=labels)}
    try:
        out[SAVED_MODEL_FILE] = export_saved_model(model, out_dir / SAVED_MODEL_FILE)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
        raise ModelVerificationError(f"cannot export {model_path} as a TF SavedModel: {exc}") from exc
    if tflite:
        try:
            out[TFLITE_FILE] = convert_tflite(out[SAVED_MODEL_FILE], out_dir / TFLITE_FILE)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types; TFLite is optional
            (out_dir / TFLITE_FILE).unlink(missing_ok=True)
            log.warning("exports: TFLite conversion of %s failed, publishing without model.tflite: %s: %s",
                        model_path, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc) else "")
    sizes = {name: path.stat().st_size for name, path in out.items()}
    log.info("exports of %s: .keras %.1f KB, SavedModel (zip) %.1f KB, TFLite %s, golden %d images",
             model_path.name, model_path.stat().st_size / 1024, sizes[SAVED_MODEL_FILE] / 1024,
             f"{sizes[TFLITE_FILE] / 1024:.1f} KB" if TFLITE_FILE in sizes else "not built",
             len(golden_images))
    return out


# -- runtimes --------------------------------------------------------------------------------------
def keras_predict_fn(model_path: str | Path) -> PredictFn:
    """A batch -> probabilities function running a ``.keras`` model (loaded in safe mode)."""
    from ml.models import load_model

    model = load_model(model_path, compile=False)
    return lambda x: model(x, training=False)


def saved_model_predict_fn(saved_model: str | Path) -> PredictFn:
    """A function calling a SavedModel's ``serving_default`` signature, as TF Serving does.

    `saved_model` is a SavedModel folder or a saved_model.zip (extracted to a temporary folder).
    """
    import tensorflow as tf

    with _saved_model_dir(Path(saved_model)) as folder:
        loaded = tf.saved_model.load(str(folder))
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ModelVerificationError(
            f"{saved_model} has no {SERVING_SIGNATURE!r} signature (has {sorted(loaded.signatures)})"
        )
    signature = loaded.signatures[SERVING_SIGNATURE]
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise ModelVerificationError(f"{saved_model}: expected one input, the signature has {sorted(inputs)}")
    (input_name,) = inputs

    def predict(x: np.ndarray) -> np.ndarray:
        outputs = signature(**{input_name: tf.constant(x, dtype=tf.float32)})
        if len(outputs) != 1:
            raise ModelVerificationError(f"{saved_model}: expected one output, got {sorted(outputs)}")
        return next(iter(outputs.values())).numpy()

    predict.keepalive = loaded  # type: ignore[attr-defined]  # the signature needs its object alive
    return predict


def tflite_predict_fn(path: str | Path) -> PredictFn:
    """A function running a ``.tflite`` model with the TFLite interpreter (LiteRT when installed)."""
    from ml.serving.runtimes import TFLiteRunner

    return TFLiteRunner(path)


# -- verification ----------------------------------------------------------------------------------
def compare_to_golden(name: str, expected: np.ndarray, actual: Any, *,
                      atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Check one runtime's probabilities against the golden ones.

    A top-1 difference counts only where the golden top-1 leads the runtime's top-1 class by more
    than `atol` (a tie within float noise is not a disagreement; the probability check covers it).

    Returns:
        {name, n, max_abs_diff, top1_agreement (fraction), ok: True}.

    Raises:
        ModelVerificationError: naming `name`, the rows whose top-1 differs and the max abs diff.
    """
    actual = np.asarray(actual, dtype=np.float32)
    if actual.shape != expected.shape:
        raise ModelVerificationError(
            f"{name}: output shape {actual.shape} differs from the golden {expected.shape} "
            "on the golden inputs"
        )
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    want, got = expected.argmax(axis=1), actual.argmax(axis=1)
    rows = np.arange(len(expected))
    margin = expected[rows, want] - expected[rows, got]
    wrong = np.flatnonzero((want != got) & (margin > atol))
    result = {"name": name, "n": int(len(expected)), "max_abs_diff": diff,
              "top1_agreement": float(np.mean(want == got)) if len(expected) else 1.0, "ok": True}
    if len(wrong) or not np.isfinite(diff) or diff > atol:
        problems = []
        if len(wrong):
            problems.append(f"top-1 differs on {len(wrong)} of {len(expected)} golden inputs (rows "
                            f"{wrong[:10].tolist()}: expected classes {want[wrong[:10]].tolist()}, "
                            f"got {got[wrong[:10]].tolist()})")
        if not np.isfinite(diff) or diff > atol:
            problems.append(f"max abs probability difference {diff:.3g} exceeds the tolerance {atol:g}")
        raise ModelVerificationError(f"{name} disagrees with the golden outputs of model.keras: "
                                     + "; ".join(problems))
    return result


def verify_runtime(predict_fn: PredictFn, golden_path: str | Path, *, atol: float = DEFAULT_ATOL,
                   name: str = "runtime") -> dict[str, Any]:
    """Check a consumer's runtime against golden.npz: same top-1, probabilities within `atol`.

    Args:
        predict_fn: float32 batch (N, S, S, 3) of RGB pixels in [0, 255] -> probabilities (N, K),
            e.g. ``Predictor.predict_proba`` or a TF Serving / TFLite client.
        golden_path: the version's golden.npz.
        name: what the error message calls the runtime.

    Raises:
        ModelVerificationError: the runtime disagrees (the message says how).
    """
    golden = load_golden(golden_path)
    result = compare_to_golden(name, golden["expected"], predict_fn(golden["inputs"]), atol=atol)
    log.info("%s agrees with %s: %d golden inputs, max abs diff %.2g", name, Path(golden_path).name,
             result["n"], result["max_abs_diff"])
    return result


def verify_exports(exports: str | Path | Mapping[str, str | Path], *, model_path: str | Path | None = None,
                   atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Run model.keras, the SavedModel and the TFLite model on golden.npz and require agreement.

    Args:
        exports: a folder holding golden.npz and the exports, or a mapping file name -> path
            (what `build_exports` returns).
        model_path: the ``model.keras``; default ``model.keras`` in the folder / mapping.
        atol: largest allowed absolute difference of any probability.

    Returns:
        {"n": golden inputs, "atol": atol, "checked": {"model.keras": {...}, "saved_model.zip": {...},
        "model.tflite": {...}}} with each runtime's max abs diff and top-1 agreement.

    Raises:
        ModelVerificationError: golden.npz or model.keras is missing, or an export disagrees
            (the message names it).
    """
    paths = _export_paths(exports)
    if model_path is not None:
        paths[KERAS_FILE] = Path(model_path)
    for required in (GOLDEN_FILE, KERAS_FILE):
        if required not in paths or not paths[required].is_file():
            raise ModelVerificationError(f"verify_exports: {required} is missing (have {sorted(paths)})")
    golden = load_golden(paths[GOLDEN_FILE])
    runners: dict[str, Callable[[Path], PredictFn]] = {
        KERAS_FILE: keras_predict_fn,
        SAVED_MODEL_FILE: saved_model_predict_fn,
        TFLITE_FILE: tflite_predict_fn,
    }
    checked = {}
    for name, runner in runners.items():
        if name not in paths:
            continue
        try:
            predict = runner(paths[name])
            actual = predict(golden["inputs"])
        except ModelVerificationError as exc:
            raise ModelVerificationError(f"{name} ({paths[name]}): {exc}") from exc
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            raise ModelVerificationError(f"{name} ({paths[name]}) cannot run the golden inputs: "
                                         f"{type(exc).__name__}: {exc}") from exc
        checked[name] = compare_to_golden(f"{name} ({paths[name]})", golden["expected"], actual, atol=atol)
    log.info("exports agree on %d golden inputs: %s", len(golden["inputs"]),
             ", ".join(f"{name} max abs diff {r['max_abs_diff']:.2g}" for name, r in checked.items()))
    return {"n": len(golden["inputs"]), "atol": atol, "checked": checked}


# -- helpers ---------------------------------------------------------------------------------------
def _export_paths(exports: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    if isinstance(exports, Mapping):
        return {str(name): Path(path) for name, path in exports.items()}
    folder = Path(exports)
    if not folder.is_dir():
        raise ModelVerificationError(f"verify_exports: {folder} is not a folder of exports")
    names = (KERAS_FILE, SAVED_MODEL_FILE, TFLITE_FILE, GOLDEN_FILE)
    return {name: folder / name for name in names if (folder / name).exists()}


def _zip_folder(folder: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            info = zipfile.ZipInfo(rel + "/" if path.is_dir() else rel, date_time=_ZIP_EPOCH)
            if path.is_dir():
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b"")
            else:
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with path.open("rb") as src, zf.open(info, "w") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)


@contextlib.contextmanager
def _saved_model_dir(path: Path) -> Iterator[Path]:
    """A SavedModel folder for `path`: the folder itself, or a zip safely extracted to a temp folder."""
    from ml.data.extract import safe_extract_zip

    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise ModelVerificationError(f"SavedModel {path} does not exist")
    with tempfile.TemporaryDirectory(prefix=".saved_model-") as tmp:
        dest = Path(tmp) / "saved_model"
        try:
            safe_extract_zip(path, dest)
        except DataError as exc:
            raise ModelVerificationError(f"SavedModel archive {path}: {exc}") from exc
        if not (dest / "saved_model.pb").is_file():
            raise ModelVerificationError(f"SavedModel archive {path} has no saved_model.pb at its root")
        yield dest
