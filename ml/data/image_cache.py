"""Decoded-image cache: each ok image decoded and resized once per (dataset_hash, image_size).

Layout under ``cache_root``::

    <dataset_hash>/<size>/images.u8      N x S x S x 3 uint8, C order (a raw np.memmap)
    <dataset_hash>/<size>/index.parquet  row, path, sha256, label, label_index, split
    <dataset_hash>/<size>/meta.json      shape, labels, per-chunk sha256, format version

A cache folder is built under a temporary name and renamed into place, so a reader never
sees a half-written cache; an exclusive file lock makes a second concurrent builder (two
training tasks at once) wait and then reuse the first one's result instead of decoding
twice. `build_image_cache` verifies the per-chunk checksums of an existing cache and
rebuilds it, with a warning, when it is truncated or corrupted.

Memory stays bounded: images are decoded a block of rows at a time and written to the file, and readers gather one
batch of uint8 rows at a time (never the whole dataset as float32) from a read-only mapping of
the file. `ImageCache.gather` unmaps the pages it has copied, and the neighbours a fault mapped
with them, in whole 2 MiB blocks (``madvise(MADV_DONTNEED)``): they stay in the kernel's page
cache, not in the reader's RSS (one epoch over 5,000 images at 224 px would otherwise leave
~750 MB resident). No file descriptor is kept open, so tf.data's threads share nothing but the mapping.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.data.images import DECODE, opencv_threads
from ml.data.manifest import DATASET_FILE, MANIFEST_FILE, OK
from ml.errors import CacheCorruptError, DataError  # noqa: F401 - re-exported for callers
from ml.io import exclusive_lock, temporary_sibling, write_json  # lock re-exported for ml.training.bottleneck

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: ml.data.images.decode_resize (reduced JPEG decode)
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"
CHUNK_BYTES = 16 * 1024 * 1024  # checksum block: ~16 MiB of pixels
RELEASE_ALIGN_BYTES = 2 * 1024 * 1024  # gathered rows are unmapped in whole 2 MiB blocks (the largest folio x86 maps)
PARALLEL_MIN_IMAGES = 64  # below this, a thread pool costs more than it saves
DECODE_BLOCK = 32  # rows one decoding task writes: few enough tasks to cost nothing, enough to share the cores
MAX_DEFAULT_WORKERS = 8  # default decoding threads: one per usable CPU, capped so a big shared worker is not swamped
SPLITS = ("train", "val", "test")
# Square sizes (pixels) a cache may be built at: below 8 px nothing is left of a photo; 2048^2 x 3
# bytes = 12 MB per image. ml/training/settings.py's IMAGE_SIZE_RANGE is the training-side rule.
IMAGE_SIZE_RANGE = (8, 2048)

@dataclass
class ImageCache:
    """A verified, opened decoded-image cache (read-only).

    Attributes:
        folder: ``<cache_root>/<dataset_hash>/<size>``.
        meta: Contents of meta.json.
        index: One row per cached image: row, path, sha256, label, label_index, split.
    """

    folder: Path
    meta: dict[str, Any]
    index: pd.DataFrame
    _images: np.ndarray | None = field(default=None, repr=False)
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls, dataset_dir: Path | str, image_size: int, cache_root: Path | str, *, workers: int | None = None
    ) -> ImageCache:
        """Open the cache for a dataset, building or rebuilding it when needed (see `build_image_cache`)."""
        return build_image_cache(dataset_dir, image_size, cache_root, workers=workers)

    @classmethod
    def load(cls, folder: Path | str, *, verify: bool = True) -> ImageCache:
        """Open an existing cache folder.

        Raises:
            CacheCorruptError: files missing, wrong size, or a chunk checksum differs.
        """
        import pandas as pd

        folder = Path(folder)
        meta_path, images_path, index_path = folder / META_FILE, folder / IMAGES_FILE, folder / INDEX_FILE
        for path in (meta_path, images_path, index_path):
            if not path.is_file():
                raise CacheCorruptError(f"image cache {folder}: {path.name} is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheCorruptError(f"image cache {folder}: unreadable {META_FILE}: {exc}") from exc
        if meta.get("version") != CACHE_FORMAT_VERSION:
            raise CacheCorruptError(
                f"image cache {folder}: format version {meta.get('version')!r}, "
                f"expected {CACHE_FORMAT_VERSION}"
            )
        shape = tuple(meta["shape"])
        expected = int(np.prod(shape))
        actual = images_path.stat().st_size
        if actual != expected:
            raise CacheCorruptError(
                f"image cache {folder}: {IMAGES_FILE} has {actual} bytes, "
                f"expected {expected} for shape {list(shape)} (truncated?)"
            )
        if verify:
            digests = _chunk_digests(images_path, int(meta["chunk_bytes"]))
            bad = [i for i, (a, b) in enumerate(zip(digests, meta["chunk_sha256"], strict=False)) if a != b]
            if bad or len(digests) != len(meta["chunk_sha256"]):
                raise CacheCorruptError(
                    f"image cache {folder}: checksum mismatch in chunks {bad[:10]} "
                    f"of {len(meta['chunk_sha256'])}"
                )
        try:
            index = pd.read_parquet(index_path)
        except (OSError, ValueError) as exc:
            raise CacheCorruptError(f"image cache {folder}: unreadable {INDEX_FILE}: {exc}") from exc
        if len(index) != shape[0]:
            raise CacheCorruptError(
                f"image cache {folder}: {INDEX_FILE} has {len(index)} rows, images {shape[0]}"
            )
        return cls(folder=folder, meta=meta, index=index)

    @property
    def images(self) -> np.ndarray:
        """The N x S x S x 3 uint8 pixels, a read-only view of the mapped file (mapped on first use)."""
        if self._images is None:
            shape = tuple(self.meta["shape"])
            if shape[0] == 0:
                self._images = np.zeros(shape, dtype=np.uint8)
            else:
                with (self.folder / IMAGES_FILE).open("rb") as fh:
                    self._mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                self._images = np.frombuffer(self._mapping, dtype=np.uint8).reshape(shape)
        return self._images

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def dataset_hash(self) -> str:
        return str(self.meta["dataset_hash"])

    def __len__(self) -> int:
        return int(self.meta["shape"][0])

    def split_indices(self, split: str) -> np.ndarray:
        """Cache rows of a split ("train", "val", "test"; "all" for every row), ascending."""
        if split == "all":
            return np.arange(len(self), dtype=np.int64)
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        return np.flatnonzero(self.index["split"].to_numpy() == split).astype(np.int64)

    def label_indices(self, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Class indices (position in the sorted labels) of the given rows (all rows when None)."""
        values = self.index["label_index"].to_numpy(dtype=np.int64)
        return values if rows is None else values[np.asarray(rows, dtype=np.int64)]

    def gather(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """uint8 pixels of the given rows, in the given order (a copy; B x S x S x 3).

        Thread-safe (reads of a read-only memmap): tf.data calls it from several threads at once.
        """
        rows = np.asarray(rows, dtype=np.int64)
        shape = tuple(self.meta["shape"])
        out = np.empty((len(rows), *shape[1:]), dtype=np.uint8)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= shape[0]:
            raise DataError(f"image cache {self.folder}: rows must be in [0, {shape[0]}), "
                            f"got {int(rows.min())}..{int(rows.max())}")
        # Reading in ascending order keeps the file access sequential-ish.
        order = np.argsort(rows, kind="stable")
        out[order] = self.images[rows[order]]
        self._release_pages(rows)
        return out

    def _release_pages(self, rows: np.ndarray) -> None:
        """Unmap the pages just copied from this process (they stay in the kernel's page cache).

        Without this, every page an epoch reads stays resident in the process and counts in its
        RSS (750 MB at 5,000 x 224 px): reclaimable, but a memory limit or an OOM killer sees it.
        A fault maps more than the row: the kernel maps the neighbouring cached pages too (fault-around,
        whole large folios), so the released span is each row widened to `RELEASE_ALIGN_BYTES`
        boundaries; releasing only the rows left 142 of 718 MiB resident after an epoch.
        Safe while other threads read the same pages: a read-only shared mapping just faults them in again.
        """
        if self._mapping is None:
            return
        row_bytes = int(np.prod(self.meta["shape"][1:]))
        size = len(self._mapping)
        for start, end in _aligned_spans(np.sort(rows), row_bytes, RELEASE_ALIGN_BYTES, size):
            self._mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def iter_batches(self, rows: np.ndarray | Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches of the given rows, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), batch_size):
            yield self.gather(rows[start : start + batch_size])


def _aligned_spans(sorted_rows: np.ndarray, row_bytes: int, align: int, size: int) -> Iterator[tuple[int, int]]:
    """Byte spans covering the given rows, each widened to `align` boundaries, overlaps merged."""
    span: tuple[int, int] | None = None
    for row in sorted_rows.tolist():
        start = row * row_bytes // align * align
        end = min(size, -(-(row + 1) * row_bytes // align) * align)
        if span is not None and start <= span[1]:
            span = (span[0], max(span[1], end))
            continue
        if span is not None:
            yield span
        span = (start, end)
    if span is not None:
        yield span


def cache_folder(cache_root: Path | str, dataset_hash: str, image_size: int) -> Path:
    """Where the cache of a dataset at a size lives."""
    return Path(cache_root) / dataset_hash / str(int(image_size))


def read_dataset(dataset_dir: Path | str) -> tuple[dict[str, Any], pd.DataFrame]:
    """dataset.json and the ok rows of manifest.parquet (sorted by path), validated."""
    import pandas as pd

    dataset_dir = Path(dataset_dir)
    info_path, manifest_path = dataset_dir / DATASET_FILE, dataset_dir / MANIFEST_FILE
    for path in (info_path, manifest_path):
        if not path.is_file():
            raise DataError(f"dataset folder {dataset_dir}: {path.name} is missing")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    for key in ("dataset_hash", "labels"):
        if key not in info:
            raise DataError(f"{info_path}: key {key!r} is missing")
    manifest = pd.read_parquet(manifest_path)
    missing = {"path", "label", "sha256", "status", "split"} - set(manifest.columns)
    if missing:
        raise DataError(f"{manifest_path}: columns {sorted(missing)} are missing")
    ok = manifest[manifest["status"] == OK].sort_values("path", kind="stable").reset_index(drop=True)
    labels = list(info["labels"])
    if labels != sorted(labels):
        raise DataError(f"{info_path}: labels must be sorted, got {labels[:10]}")
    unknown = sorted(set(ok["label"]) - set(labels))
    if unknown:
        raise DataError(f"{manifest_path}: labels {unknown[:10]} are not in dataset.json's labels")
    return info, ok


def build_image_cache(
    dataset_dir: Path | str, image_size: int, cache_root: Path | str, *, workers: int | None = None
) -> ImageCache:
    """Return a verified decoded-image cache of a dataset at a size, building it if needed.

    Idempotent: an intact cache is reused; a corrupt or truncated one is rebuilt (with a
    warning). Splits are taken from the current manifest, so a re-split dataset reuses the
    pixels.

    Args:
        dataset_dir: Dataset folder (manifest.parquet + dataset.json).
        image_size: Square size in pixels every image is resized to (cv2.INTER_AREA).
        cache_root: Root folder of all image caches.
        workers: Decoding threads (default: the CPUs this process may use, up to 8; 1 decodes serially).
    """
    low, high = IMAGE_SIZE_RANGE
    if not low <= int(image_size) <= high:
        raise DataError(f"image_size must be in [{low}, {high}] pixels, got {image_size}")
    info, ok = read_dataset(dataset_dir)
    folder = cache_folder(cache_root, info["dataset_hash"], image_size)
    cache = _try_open(folder, ok)
    if cache is not None:
        return cache
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        # Another builder may have finished while we waited for the lock.
        cache = _try_open(folder, ok)
        if cache is not None:
            return cache
        _build(Path(dataset_dir), info, ok, int(image_size), folder, workers)
    cache = ImageCache.load(folder, verify=False)
    _attach_splits(cache, ok)
    return cache


def _try_open(folder: Path, ok: pd.DataFrame) -> ImageCache | None:
    if not folder.exists():
        return None
    try:
        cache = ImageCache.load(folder, verify=True)
        _attach_splits(cache, ok)
        return cache
    except CacheCorruptError as exc:
        log.warning("image cache %s is damaged and will be rebuilt: %s", folder, exc)
        return None


def _attach_splits(cache: ImageCache, ok: pd.DataFrame) -> None:
    """Take split and label from the current manifest (pixels depend only on path contents)."""
    paths = cache.index["path"]
    if len(ok) == len(paths) and (ok["path"].to_numpy() == paths.to_numpy()).all():
        current = ok  # the usual case, rows in the same (path) order: no index lookups (40 ms per 2,000 rows)
    else:
        current = ok.set_index("path")
        if len(current) != len(paths) or not paths.isin(current.index).all():
            raise CacheCorruptError(f"image cache {cache.folder}: its paths differ from the dataset's manifest")
        current = current.loc[paths]
    labels = cache.labels
    cache.index["split"] = current["split"].astype(str).to_numpy()
    label = current["label"].astype(str).to_numpy()
    if not (label == cache.index["label"].to_numpy()).all():
        raise CacheCorruptError(f"image cache {cache.folder}: labels differ from the dataset's manifest")
    cache.index["label_index"] = np.searchsorted(np.asarray(labels), label).astype(np.int64)


def _chunk_rows(image_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, image_bytes))


def _chunk_digests(path: Path, chunk_bytes: int) -> list[str]:
    """sha256 of each `chunk_bytes` block of a file, read with read(): a file someone else truncates
    meanwhile gives wrong digests (a rebuild), where a mapping would give the reader a SIGBUS."""
    digests = []
    with path.open("rb") as fh:
        while block := fh.read(chunk_bytes):
            digests.append(hashlib.sha256(block).hexdigest())
    return digests


class _WrittenChunkDigests:
    """`_chunk_digests` of the file this build is writing (nobody else has it yet), hashed while the
    decoding threads fill it: each chunk is hashed, from a read-only mapping of its page-cache
    pages (no copy), by the thread that waits for the decoders, as soon as its last row is written.
    Only the last chunk is left for after the decoding."""

    def __init__(self, fd: int, nbytes: int, chunk_bytes: int) -> None:
        os.ftruncate(fd, nbytes)  # the mapping needs the full length even where fallocate is missing
        self._mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mapping)
        self._nbytes, self._chunk_bytes = nbytes, chunk_bytes
        self.digests: list[str] = []

    def written_up_to(self, nbytes: int) -> None:
        """Hash every chunk that lies wholly inside the first `nbytes` bytes and is not hashed yet."""
        while True:
            start = len(self.digests) * self._chunk_bytes
            stop = min(start + self._chunk_bytes, self._nbytes)
            if start >= self._nbytes or stop > nbytes:
                return
            with self._view[start:stop] as chunk:
                self.digests.append(hashlib.sha256(chunk).hexdigest())

    def close(self) -> None:
        self._view.release()
        self._mapping.close()


def _default_workers() -> int:
    return min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _decode_into(fd: int, paths: Sequence[str], size: int, workers: int, rows_written: Callable[[int], None]) -> None:
    """Decode and resize every image (`ml.data.images.load_resized`) into rows of the open file `fd`.

    Each task decodes a block of `DECODE_BLOCK` rows into its own buffer and writes it with one
    pwrite: no page fault per written page of a shared mapping, no future or decoded image held
    per row. Threads, not processes: file reads, cv2.imdecode and cv2.resize release the GIL, so
    threads use every core without pickling pixels, and unlike a process pool they neither fork a
    TensorFlow process (deadlock-prone) nor need the caller's script to have an
    ``if __name__ == "__main__"`` guard (spawn re-imports it). OpenCV's own pool is off meanwhile
    so it does not compete for the cores. `rows_written(k)` is called, in this thread, each time
    the first k rows are all written.
    """
    from ml.data.images import load_resized

    n, row_bytes = len(paths), size * size * 3

    def decode_block(start: int) -> int:
        stop = min(start + DECODE_BLOCK, n)
        block = np.empty((stop - start, size, size, 3), dtype=np.uint8)
        for i in range(start, stop):
            load_resized(paths[i], size, out=block[i - start])
        _pwrite_all(fd, memoryview(block).cast("B"), start * row_bytes)
        return stop

    starts = range(0, n, DECODE_BLOCK)
    if workers <= 1 or n < PARALLEL_MIN_IMAGES:
        for start in starts:
            rows_written(decode_block(start))
        return
    with opencv_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        # In order: re-raises a block's error (a DataError naming the file) and reports each prefix.
        for stop in pool.map(decode_block, starts):
            rows_written(stop)


def _build(
    dataset_dir: Path, info: dict[str, Any], ok: pd.DataFrame, size: int, folder: Path, workers: int | None
) -> None:
    import pandas as pd

    started = time.monotonic()
    labels = list(info["labels"])
    n = len(ok)
    shape = (n, size, size, 3)
    tmp = temporary_sibling(folder)
    tmp.mkdir(parents=True)
    try:
        images_path = tmp / IMAGES_FILE
        jobs = [os.path.join(dataset_dir, p) for p in ok["path"]]
        row_bytes = size * size * 3
        chunk_bytes = _chunk_rows(row_bytes) * row_bytes
        workers = workers if workers is not None else _default_workers()
        images_path.touch()
        if n:
            _reserve_space(images_path, n * row_bytes, folder)
            fd = os.open(images_path, os.O_RDWR)
            try:
                hasher = _WrittenChunkDigests(fd, n * row_bytes, chunk_bytes)
                try:
                    _decode_into(fd, jobs, size, workers, lambda rows: hasher.written_up_to(rows * row_bytes))
                    digests = hasher.digests
                finally:
                    hasher.close()
            finally:
                os.close(fd)
            # No fsync: other readers see the page cache at once, and a cache the kernel had not yet
            # written back before a crash fails its checksums on the next open and is rebuilt.
        else:
            digests = []
        index = pd.DataFrame(
            {
                "row": np.arange(n, dtype=np.int64),
                "path": ok["path"].astype(str).to_numpy(),
                "sha256": ok["sha256"].astype(str).to_numpy(),
                "label": ok["label"].astype(str).to_numpy(),
                "label_index": np.searchsorted(np.asarray(labels), ok["label"].astype(str).to_numpy()).astype(
                    np.int64
                ),
                "split": ok["split"].astype(str).to_numpy(),
            }
        )
        index.to_parquet(tmp / INDEX_FILE, index=False)
        meta = {
            "version": CACHE_FORMAT_VERSION,
            "dataset_hash": info["dataset_hash"],
            "image_size": size,
            "shape": list(shape),
            "dtype": "uint8",
            "color_order": "RGB",
            "resize": "cv2.INTER_AREA, aspect ratio ignored",
            "decode": DECODE,
            "labels": labels,
            "chunk_bytes": chunk_bytes,
            "chunk_sha256": digests,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(tmp / META_FILE, meta, sort_keys=False)
        _publish(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "image cache %s: %d images at %dpx decoded in %.1fs (%.1f MB)",
        folder,
        n,
        size,
        time.monotonic() - started,
        n * size * size * 3 / 1e6,
    )


def _reserve_space(path: Path, nbytes: int, folder: Path) -> None:
    """Allocate the memmap's blocks up front: a page written to a full disk is a SIGBUS, not an error."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            return  # no fallocate on this filesystem: best effort only
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            errno.ENOSPC,
            f"no space left on device for the image cache {folder}: {nbytes} bytes of decoded "
            f"pixels needed, {free} free under {folder.parent}",
        ) from exc
    finally:
        os.close(fd)


def _publish(tmp: Path, folder: Path) -> None:
    """Move a finished cache into place; a damaged old one is moved aside first."""
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(folder, old)
    os.rename(tmp, folder)
    if old is not None:
        # Open memmaps of the old files stay valid after unlinking (POSIX).
        shutil.rmtree(old, ignore_errors=True)
