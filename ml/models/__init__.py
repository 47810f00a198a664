"""Models: the architecture registry, scratch and transfer builders, safe model loading.

`load_model` is what every consumer (evaluation, serving, fine-tuning) uses to read a
``model.keras``: this project's custom layers are registered first and ``safe_mode=True``
refuses Lambda layers and other arbitrary code.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from ml.errors import ModelVerificationError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

__all__ = ["load_model", "custom_objects"]


def custom_objects() -> dict[str, type]:
    """This project's serialisable layers by class name (registered with Keras on first call)."""
    from ml.models.layers import custom_objects as _custom_objects

    return dict(_custom_objects())


def load_model(path: str | Path, *, compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model with this project's custom layers, in Keras safe mode.

    Args:
        path: A ``.keras`` file.
        compile: Also restore the optimizer, loss and metrics (default False: inference only,
            which is what evaluation and serving need and avoids optimizer-state warnings).

    Raises:
        ModelVerificationError: the file is missing or cannot be deserialised safely.
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelVerificationError(f"model file {path} does not exist")
    objects = custom_objects()
    try:
        return keras.saving.load_model(path, custom_objects=objects, compile=compile, safe_mode=True)
    except (ValueError, TypeError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelVerificationError(f"cannot load model {path} safely: {exc}") from exc
