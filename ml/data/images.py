"""Decoding images the same way everywhere: manifest, training cache, golden vectors and serving.

OpenCV decodes to BGR; everything in this project works in RGB uint8, so that a consumer
reproduces training's input exactly (see `preprocessing.json`).

`decode_resize` is the one function that turns a file's bytes into model pixels: the
decoded-image cache, the serving `Predictor` and (through the cache) the golden vectors of
an export all call it, so train and serve see identical pixels. For a JPEG at least 2x, 4x
or 8x the target size it asks libjpeg for a DCT-domain reduced decode
(``cv2.IMREAD_REDUCED_COLOR_<f>``) and then area-resizes the smaller image. Both steps are box
averages, but on a different sampling grid than one full decode + area resize: on animals3 at
96 px the mean difference is 2 levels (of 255), up to ~100 on single pixels at sharp edges.
That is why every path must use this one function. `DECODE` records the rule in
preprocessing.json and the cache's meta.json; bump its version whenever the pixels change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import DataError

COLOR_ORDER = "RGB"
RESIZE_INTERPOLATION = "area"  # cv2.INTER_AREA: the least aliasing when shrinking photos
# Reduced JPEG decode factors libjpeg implements in the DCT domain (cv2.IMREAD_REDUCED_COLOR_<f>).
REDUCTION_FACTORS = (8, 4, 2)
# What preprocessing.json and the cache's meta.json say about the pixels (`decode_resize`).
DECODE: dict[str, Any] = {
    "function": "ml.data.images.decode_resize",
    "version": 2,
    "color_order": COLOR_ORDER,
    "jpeg_reduced_decode": "cv2.IMREAD_REDUCED_COLOR_<f>, largest f in (2, 4, 8) with "
    "min(width, height) >= f * image_size",
    "resize": "cv2.INTER_AREA, aspect ratio ignored",
}
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic...): they carry
# the size. 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


def decode_rgb(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array of shape (H, W, 3).

    `cv2.IMREAD_COLOR` applies the EXIF orientation, converts grayscale, CMYK and 16-bit
    images to 8-bit 3-channel, and drops alpha. Raises DataError naming `source` when the
    bytes are not a decodable image.
    """
    import cv2

    return cv2.cvtColor(_imdecode(data, cv2.IMREAD_COLOR, source), cv2.COLOR_BGR2RGB)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read and decode an image file (see `decode_rgb`)."""
    return decode_rgb(read_file(path), source=str(path))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB image to (size, size, 3) uint8, ignoring aspect ratio as training does."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None when `data` is not a readable JPEG.

    Walks the marker segments by their length fields only (no pixel is decoded), so it costs
    microseconds even with a large EXIF block in front of the frame header.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG we can size
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > end or length < 7:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return (width, height) if width and height else None
        pos += 2 + length
    return None


def reduction_factor(width: int, height: int, size: int) -> int:
    """The largest DCT reduction (8, 4, 2) that still leaves both sides >= `size`, else 1.

    The reduced image is then area-resized down to `size`, so it must never be smaller than the
    target: min(width, height) >= f * size guarantees that (libjpeg rounds reduced sides up).
    Orientation does not matter: the rule uses the shorter side only.
    """
    shorter = min(int(width), int(height))
    for factor in REDUCTION_FACTORS:
        if shorter >= factor * int(size):
            return factor
    return 1


def decode_resize(data: bytes, size: int, *, source: str = "<bytes>", out: np.ndarray | None = None) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (size, size, 3): the model's pixels (see `DECODE`).

    JPEGs large enough are decoded reduced in the DCT domain (`reduction_factor`), then every
    image is area-resized to `size` x `size`. The BGR -> RGB swap runs on the small image: a
    resize treats channels independently, so the pixels are the same as swapping first.

    `out`, when given, is a (size, size, 3) uint8 array the pixels are written into (and which is
    returned): the image cache decodes straight into its write buffer.

    Raises:
        DataError: naming `source`, when the bytes are empty or not a decodable image.
    """
    import cv2

    dims = jpeg_dimensions(data)
    factor = reduction_factor(dims[0], dims[1], size) if dims is not None else 1
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    bgr = _imdecode(data, flags, source)
    if factor > 1 and min(bgr.shape[:2]) < size:
        # A header that lied about the size (or a decoder that rounds down): decode in full instead.
        bgr = _imdecode(data, cv2.IMREAD_COLOR, source)
    small = resize_square(bgr, size)
    if out is None:
        return cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
    if out.shape != (size, size, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be a ({size}, {size}, 3) uint8 array, got {out.shape} {out.dtype}")
    if out.flags.c_contiguous:
        cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=out)
    else:  # OpenCV writes only into contiguous arrays
        out[...] = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
    return out


def load_resized(path: str | Path, size: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Read an image file and `decode_resize` it (into `out` when given)."""
    return decode_resize(read_file(path), size, source=str(path), out=out)


def read_file(path: str | Path) -> bytes:
    """A whole file's bytes in one unbuffered read (sized by fstat).

    A third of the cost of ``Path.read_bytes`` (0.02 vs 0.06 ms for a 10 kB JPEG): no pathlib
    object and no buffered reader, and less time holding the GIL while decoding threads wait.
    """
    with open(path, "rb", buffering=0) as fh:
        return fh.readall()


_OPENCV_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """Run a block with OpenCV's own thread pool at `n` threads, restoring the previous setting after.

    A decoding pool with one image per thread should turn OpenCV's pool off (n=1): otherwise each
    cv2.resize also fans out to OpenCV's workers, and the two pools compete for the same cores.
    The setting is process-wide, hence the lock (two builders in one process take turns).
    """
    import cv2

    with _OPENCV_THREADS_LOCK:
        previous = cv2.getNumThreads()
        cv2.setNumThreads(n)
        try:
            yield
        finally:
            cv2.setNumThreads(previous)


def _imdecode(data: bytes, flags: int, source: str) -> np.ndarray:
    import cv2

    if not data:
        raise DataError(f"{source}: empty file")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if bgr is None:
        raise DataError(f"{source}: not a decodable image")
    return bgr
