"""The manifest: one row per image with its content hash, geometry, format, pHash and status.

Images are checked by a thread pool (OpenCV and hashlib release the GIL, so both cores work).
Headers are read before any pixel is decoded, so a decompression bomb is refused
from its declared size. Nothing here raises on a bad image: it is quarantined with a reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

COLUMNS = (
    "path",
    "label",
    "sha256",
    "width",
    "height",
    "channels",
    "format",
    "bytes",
    "phash",
    "status",
    "split",
)
# The two files of a published dataset folder (written by ml.data.ingest, read everywhere).
MANIFEST_FILE = "manifest.parquet"
DATASET_FILE = "dataset.json"
OK = "ok"
LABEL_CONFLICT = "label conflict"
DUPLICATE = "duplicate"
# Bytes read per image at most (DataConfig.max_image_bytes): a 100 Mpx camera JPEG is ~40 MB.
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024**2
# Below this many images a pool costs more to start than it saves.
POOL_MIN_IMAGES = 200

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"WEBP", 8, "webp"),  # after b"RIFF" + 4 size bytes
)


def detect_format(data: bytes) -> str:
    """Image format from the magic bytes ("" when not a known image format)."""
    for magic, offset, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (name != "webp" or data[:4] == b"RIFF"):
            return name
    return ""


def phash(gray: np.ndarray) -> str:
    """64-bit perceptual hash as 16 hex digits: DCT of a 32x32 thumbnail, 8x8 lowest frequencies
    compared with their median."""
    import cv2

    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def _channels(mode: str, info: dict[str, Any]) -> int:
    """Channels of the original image from Pillow's mode (a palette counts as colour)."""
    if mode == "P":
        return 4 if "transparency" in info else 3
    if mode.startswith("I;16"):
        return 1
    return {
        "1": 1,
        "L": 1,
        "I": 1,
        "F": 1,
        "LA": 2,
        "La": 2,
        "PA": 4,
        "RGB": 3,
        "YCbCr": 3,
        "LAB": 3,
        "HSV": 3,
        "RGBA": 4,
        "RGBa": 4,
        "RGBX": 4,
        "CMYK": 4,
    }.get(mode, 3)


def _truncated(fmt: str, data: bytes) -> bool:
    """OpenCV decodes a cut-off JPEG as a grey-padded image; catch it by the missing end marker."""
    if fmt == "jpeg":
        # FF D9 cannot occur inside entropy-coded data (FF is byte-stuffed), so its absence in
        # the tail means the stream was cut. Some cameras pad after EOI: look at the last 4 KiB.
        return b"\xff\xd9" not in data[-4096:]
    if fmt == "png":
        return b"IEND" not in data[-64:]
    return False


def _read_capped(path: str, max_bytes: int) -> tuple[bytes | None, str]:
    """(content, "") or (None, why not): stat first, and never read more than `max_bytes` + 1."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None, "not a regular file"
            if info.st_size > max_bytes:
                return None, f"too many bytes ({info.st_size} > {max_bytes})"
            data = fh.read(max_bytes + 1)  # + 1: a file that grew since the stat is caught too
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if len(data) > max_bytes:
        return None, f"too many bytes (more than {max_bytes})"
    return data, ""


def inspect_image(path: str, max_pixels: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> dict[str, Any]:
    """Check one file; never raises for bad content (the reason goes in `status`).

    Args:
        path: The file.
        max_pixels: Images whose header declares more pixels are quarantined undecoded.
        max_bytes: Files larger than this are quarantined unread.
    """
    import io

    import cv2
    from PIL import Image

    row: dict[str, Any] = {
        "sha256": "",
        "width": 0,
        "height": 0,
        "channels": 0,
        "format": "",
        "bytes": 0,
        "phash": "",
        "status": OK,
    }
    data, problem = _read_capped(path, max_bytes)
    if data is None:
        row["status"] = problem
        with contextlib.suppress(OSError):
            row["bytes"] = int(os.stat(path).st_size)
        return row
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        row["status"] = "empty file"
        return row
    fmt = detect_format(data)
    row["format"] = fmt
    if not fmt:
        row["status"] = "not an image"
        return row
    # Header only: Pillow parses size and mode lazily, without decoding pixels.
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            row["channels"] = _channels(im.mode, im.info)
    except Image.DecompressionBombError:  # Pillow's own limit, ~179 Mpx
        row["status"] = "too many pixels"
        return row
    except Exception:  # noqa: BLE001 - Pillow raises many types for malformed headers
        row["status"] = "undecodable"
        return row
    row["width"], row["height"] = int(width), int(height)
    if width * height > max_pixels:
        row["status"] = "too many pixels"
        return row
    if _truncated(fmt, data):
        row["status"] = "truncated"
        return row
    flags = cv2.IMREAD_COLOR  # applies EXIF orientation, as ml.data.images.decode_rgb does
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if decoded is None or decoded.size == 0:
        row["status"] = "undecodable"
        return row
    # Decoded (post-EXIF-rotation) size is what training sees.
    row["height"], row["width"] = int(decoded.shape[0]), int(decoded.shape[1])
    row["phash"] = phash(cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY))
    return row


def _inspect_chunk(paths: Sequence[str], max_pixels: int, max_bytes: int) -> list[dict[str, Any]]:
    import cv2

    cv2.setNumThreads(1)  # the pool already uses every core
    return [inspect_image(p, max_pixels, max_bytes) for p in paths]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def build_manifest(
    items: list[tuple[Path, str]],
    dataset_dir: Path,
    *,
    max_pixels: int,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    workers: int | None = None,
) -> pd.DataFrame:
    """Inspect every (image path, label) and return the manifest DataFrame (columns `COLUMNS`).

    Args:
        items: Image paths (absolute, or relative to `dataset_dir`) with their labels.
        dataset_dir: Folder the `path` column is made relative to.
        max_pixels: Images whose header declares more pixels are quarantined undecoded.
        max_bytes: Files larger than this are quarantined unread ("too many bytes").
        workers: Threads to use; None means one per available core, 1 means in the calling thread.

    Returns:
        One row per item, in input order; `split` is "" (see `ml.data.splits.assign_splits`).
    """
    import pandas as pd

    dataset_dir = Path(dataset_dir)
    rel_paths: list[str] = []
    abs_paths: list[str] = []
    for path, _ in items:
        path = Path(path)
        full = path if path.is_absolute() else dataset_dir / path
        try:
            rel = full.relative_to(dataset_dir)
        except ValueError:
            raise DataError(f"image {path} is not inside the dataset folder {dataset_dir}") from None
        rel_paths.append(rel.as_posix())
        abs_paths.append(str(full))
    started = time.monotonic()
    workers = workers or _default_workers()
    if workers <= 1 or len(items) < POOL_MIN_IMAGES:
        rows = _inspect_chunk(abs_paths, max_pixels, max_bytes)
    else:
        rows = _inspect_in_pool(abs_paths, max_pixels, max_bytes, workers)
    frame = pd.DataFrame(
        rows, columns=["sha256", "width", "height", "channels", "format", "bytes", "phash", "status"]
    )
    frame.insert(0, "path", pd.Series(rel_paths, dtype=object))
    frame.insert(1, "label", pd.Series([label for _, label in items], dtype=object))
    frame["split"] = ""
    frame = frame.astype({"width": "int64", "height": "int64", "channels": "int64", "bytes": "int64"})
    _mark_duplicates(frame)
    seconds = max(time.monotonic() - started, 1e-9)
    n_ok = int((frame["status"] == OK).sum())
    log.info(
        "manifest: %d images in %.1f s (%.0f images/s, %d workers), %d ok, %d quarantined",
        len(frame),
        seconds,
        len(frame) / seconds,
        workers,
        n_ok,
        len(frame) - n_ok,
    )
    return frame[list(COLUMNS)]


def _inspect_in_pool(paths: list[str], max_pixels: int, max_bytes: int, workers: int) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    # Threads, not processes: OpenCV decoding, hashlib and the DCT release the GIL, so threads
    # keep both cores busy (3,150 images/s vs 2,200-4,000 for a forkserver pool on 2,000 96 px
    # JPEGs), and they cannot deadlock a task process that already runs threads (Airflow, TF)
    # or break a caller script without an `if __name__ == "__main__"` guard.
    # ~8 chunks per worker balances load.
    size = max(16, -(-len(paths) // (workers * 8)))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="manifest") as pool:
        results = pool.map(_inspect_chunk, chunks, [max_pixels] * len(chunks), [max_bytes] * len(chunks))
        return [row for chunk in results for row in chunk]


def _mark_duplicates(frame: pd.DataFrame) -> None:
    """Same bytes under two labels: every copy is a label conflict. Same label: copies after the
    first (by path, so input order does not matter) are duplicates."""
    ok = frame[frame["status"] == OK]
    for _, group in ok.groupby("sha256", sort=False):
        if len(group) < 2:
            continue
        if group["label"].nunique() > 1:
            frame.loc[group.index, "status"] = LABEL_CONFLICT
        else:
            ordered = group.sort_values("path", kind="stable")
            frame.loc[ordered.index[1:], "status"] = DUPLICATE


def dataset_hash(manifest: pd.DataFrame) -> str:
    """sha256 over the sorted ``"<sha256>\\t<label>\\n"`` lines of the ok rows."""
    ok = manifest[manifest["status"] == OK]
    lines = sorted(f"{sha}\t{label}\n" for sha, label in zip(ok["sha256"], ok["label"], strict=True))
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()
