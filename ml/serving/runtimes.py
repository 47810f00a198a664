"""How a loaded model is run: a compiled TensorFlow function or the version's TFLite file.

Calling a Keras model eagerly pays Python and op-dispatch overhead on every layer: one 224 px
image through MobileNet v1 alpha 0.25 took 147 ms eagerly, 12 ms under ``tf.function`` and 2 ms
through ``model.tflite`` on 2 cores (issue 13). The `Predictor` therefore never calls the model
eagerly; `RUNTIMES` are what a consumer can ask for:

- ``compiled`` (default): ``tf.function(reduce_retracing=True)`` around ``model(x, training=False)``,
  traced once for the first input shape and once more, with a free batch dimension, when a
  second batch size arrives; every later call reuses that graph.
- ``tflite``: the version's ``model.tflite`` in the TFLite interpreter (LiteRT when installed);
  tensors are re-allocated only when the batch shape changes.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import ConfigError

COMPILED, TFLITE = "compiled", "tflite"
RUNTIMES = (COMPILED, TFLITE)
TFLITE_FILE = "model.tflite"

PredictFn = Callable[[np.ndarray], np.ndarray]


def check_runtime(runtime: str) -> str:
    """`runtime` when it is one of `RUNTIMES`; ConfigError naming the allowed ones otherwise."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    return runtime


def compiled_predict_fn(model: Any) -> PredictFn:
    """float32 batch -> probabilities (numpy) through a traced ``tf.function`` of `model`."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def serve(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    def predict(x: np.ndarray) -> np.ndarray:
        return serve(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()

    predict.graph_function = serve  # type: ignore[attr-defined]  # tests count its traces
    return predict


class TFLiteRunner:
    """A TFLite interpreter as a batch -> probabilities function (thread-safe, one call at a time).

    Args:
        path: the ``.tflite`` file.
        num_threads: interpreter threads (default: the CPUs this process may use).
    """

    def __init__(self, path: str | Path, *, num_threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter  # noqa: N806
        self.path = Path(path)
        threads = num_threads if num_threads is not None else len(os.sched_getaffinity(0))
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it moves to ai_edge_litert; it still works in TF 2.21.
            warnings.simplefilter("ignore")
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        (self._input,) = self._interpreter.get_input_details()
        (self._output,) = self._interpreter.get_output_details()
        self._shape: tuple[int, ...] | None = None
        self._lock = threading.Lock()  # an interpreter holds one set of tensors: one call at a time

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            if x.shape != self._shape:
                # Re-allocating costs about as much as a small model's inference: only on a new shape.
                self._interpreter.resize_tensor_input(self._input["index"], list(x.shape))
                self._interpreter.allocate_tensors()
                self._shape = x.shape
            self._interpreter.set_tensor(self._input["index"], x)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output["index"]))


def predict_fn(runtime: str, model: Any, folder: Path | None, *, where: str) -> PredictFn:
    """The function a `Predictor` runs for `runtime` (see the module docstring).

    Raises:
        ConfigError: unknown runtime.
        ModelVerificationError: ``tflite`` asked for but the folder has no model.tflite.
    """
    from ml.errors import ModelVerificationError

    if check_runtime(runtime) == COMPILED:
        return compiled_predict_fn(model)
    path = folder / TFLITE_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise ModelVerificationError(
            f"{where}: runtime 'tflite' needs {TFLITE_FILE}, which this model does not have "
            "(a candidate folder, or a version whose TFLite conversion failed); use runtime 'compiled'"
        )
    return TFLiteRunner(path)
