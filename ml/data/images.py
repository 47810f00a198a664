"""Decoding images the same way everywhere: manifest, training cache and serving.

OpenCV decodes to BGR; everything in this project works in RGB uint8, so that a consumer
reproduces training's input exactly (see `preprocessing.json`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.errors import DataError

COLOR_ORDER = "RGB"
RESIZE_INTERPOLATION = "area"  # cv2.INTER_AREA: the least aliasing when shrinking photos


def decode_rgb(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array of shape (H, W, 3).

    `cv2.IMREAD_COLOR` applies the EXIF orientation, converts grayscale, CMYK and 16-bit
    images to 8-bit 3-channel, and drops alpha. Raises DataError naming `source` when the
    bytes are not a decodable image.
    """
    import cv2

    if not data:
        raise DataError(f"{source}: empty file")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{source}: not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read and decode an image file (see `decode_rgb`)."""
    path = Path(path)
    return decode_rgb(path.read_bytes(), source=str(path))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB image to (size, size, 3) uint8, ignoring aspect ratio as training does."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
