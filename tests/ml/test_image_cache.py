"""The decoded-image cache: round trip, reuse, rebuild after damage, concurrent builders."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.data.image_cache import CacheCorruptError, ImageCache, build_image_cache, cache_folder
from ml.data.images import load_resized
from ml.errors import DataError

SIZE = 32


def test_round_trip_matches_decode_and_resize(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1)

    manifest = pd.read_parquet(tiny_dataset / "manifest.parquet")
    ok = manifest[manifest["status"] == "ok"]
    assert len(cache) == len(ok) == 36
    assert cache.images.shape == (36, SIZE, SIZE, 3) and cache.images.dtype == np.uint8
    assert cache.labels == sorted(ok["label"].unique())
    row = 5
    path = cache.index.loc[row, "path"]
    expected = load_resized(tiny_dataset / path, SIZE)
    np.testing.assert_array_equal(cache.gather([row])[0], expected)
    label = ok.set_index("path").loc[path, "label"]
    assert cache.labels[cache.label_indices([row])[0]] == label
    assert "images/broken.jpg" not in set(cache.index["path"])


def test_splits_and_gather_order(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1)

    sizes = {s: len(cache.split_indices(s)) for s in ("train", "val", "test")}
    rows = np.array([7, 2, 30])
    batch = cache.gather(rows)

    assert sizes == {"train": 24, "val": 6, "test": 6}
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(batch[i], cache.images[r])
    with pytest.raises(DataError, match="split must be one of"):
        cache.split_indices("holdout")


def test_second_build_reuses_the_cache(tiny_dataset: Path, tmp_path: Path) -> None:
    first = build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1)
    mtime = (first.folder / "images.u8").stat().st_mtime_ns

    second = ImageCache.open(tiny_dataset, SIZE, tmp_path, workers=1)

    assert second.folder == first.folder
    assert (second.folder / "images.u8").stat().st_mtime_ns == mtime
    info = json.loads((tiny_dataset / "dataset.json").read_text())
    assert first.folder == cache_folder(tmp_path, info["dataset_hash"], SIZE)


@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "missing_meta"])
def test_damaged_cache_is_rebuilt(
    tiny_dataset: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1)
    good = np.array(cache.images)
    images = cache.folder / "images.u8"
    if damage == "bit_flip":
        data = bytearray(images.read_bytes())
        data[len(data) // 2] ^= 0x10
        images.write_bytes(bytes(data))
    elif damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    else:
        (cache.folder / "meta.json").unlink()
    with pytest.raises(CacheCorruptError):
        ImageCache.load(cache.folder)

    with caplog.at_level(logging.WARNING, logger="ml.data.image_cache"):
        rebuilt = build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1)

    assert "will be rebuilt" in caplog.text
    np.testing.assert_array_equal(np.array(rebuilt.images), good)
    ImageCache.load(rebuilt.folder)  # verifies again


def test_parallel_decode_equals_serial(
    fresh_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ml.data.image_cache as image_cache

    monkeypatch.setattr(image_cache, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(image_cache, "DECODE_BLOCK", 5)  # several blocks, one partial
    serial = build_image_cache(fresh_dataset, SIZE, tmp_path / "a", workers=1)

    parallel = build_image_cache(fresh_dataset, SIZE, tmp_path / "b", workers=2)

    np.testing.assert_array_equal(np.array(parallel.images), np.array(serial.images))


@pytest.mark.parametrize("workers", [1, 2])
def test_chunks_hashed_during_decoding_match_the_written_file(
    fresh_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    import ml.data.image_cache as image_cache

    row_bytes = SIZE * SIZE * 3
    monkeypatch.setattr(image_cache, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(image_cache, "DECODE_BLOCK", 5)
    monkeypatch.setattr(image_cache, "CHUNK_BYTES", 7 * row_bytes)  # chunks that straddle blocks
    cache = build_image_cache(fresh_dataset, SIZE, tmp_path / "cache", workers=workers)

    meta = json.loads((cache.folder / image_cache.META_FILE).read_text())
    expected = image_cache._chunk_digests(cache.folder / image_cache.IMAGES_FILE, 7 * row_bytes)
    assert len(expected) == -(-len(cache) // 7) > 3
    assert meta["chunk_sha256"] == expected
    ImageCache.load(cache.folder)  # verifies every chunk


def test_short_writes_are_completed(fresh_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import ml.data.image_cache as image_cache

    expected = np.array(build_image_cache(fresh_dataset, SIZE, tmp_path / "a", workers=1).images)
    real_pwrite = os.pwrite
    monkeypatch.setattr(image_cache.os, "pwrite", lambda fd, data, offset: real_pwrite(fd, data[:1000], offset))

    partial = build_image_cache(fresh_dataset, SIZE, tmp_path / "b", workers=1)

    np.testing.assert_array_equal(np.array(partial.images), expected)


def test_concurrent_builders_agree(tiny_dataset: Path, tmp_path: Path) -> None:
    results: list[ImageCache] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    assert len({r.folder for r in results}) == 1
    ImageCache.load(results[0].folder)
    leftovers = [p.name for p in results[0].folder.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_resplit_dataset_reuses_pixels(fresh_dataset: Path, tmp_path: Path) -> None:
    first = build_image_cache(fresh_dataset, SIZE, tmp_path, workers=1)
    manifest = pd.read_parquet(fresh_dataset / "manifest.parquet")
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    manifest.to_parquet(fresh_dataset / "manifest.parquet", index=False)

    second = build_image_cache(fresh_dataset, SIZE, tmp_path, workers=1)

    assert len(first.split_indices("val")) == 6
    assert len(second.split_indices("val")) == 0
    assert len(second.split_indices("train")) == 30


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="dataset.json is missing"):
        build_image_cache(tmp_path / "ds", SIZE, tmp_path / "cache")


@pytest.mark.parametrize("size", [7, 2049, 0])
def test_image_size_outside_the_range_is_refused_before_reading(size: int, tmp_path: Path) -> None:
    # tmp_path holds no dataset: the size is checked first, so the message is about the size.
    with pytest.raises(DataError, match=rf"image_size must be in \[8, 2048\] pixels, got {size}"):
        build_image_cache(tmp_path, size, tmp_path / "cache")


@pytest.mark.parametrize("size", [8, 2048])
def test_image_size_at_the_bounds_is_allowed(size: int, tmp_path: Path) -> None:
    # Allowed sizes get past the check and fail only on the missing dataset.
    with pytest.raises(DataError, match="dataset.json is missing"):
        build_image_cache(tmp_path, size, tmp_path / "cache")


def test_the_lock_training_imports_from_here_is_ml_io_one() -> None:
    import ml.io
    from ml.data.image_cache import exclusive_lock

    assert exclusive_lock is ml.io.exclusive_lock


def test_gather_reads_any_rows_in_the_given_order(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = build_image_cache(tiny_dataset, SIZE, tmp_path, workers=1)
    reference = np.fromfile(cache.folder / "images.u8", dtype=np.uint8).reshape(cache.meta["shape"])
    rows = np.array([30, 2, 3, 4, 2, 35, 0, 17, 18, 19, 1])  # unsorted, duplicates, runs, both ends

    np.testing.assert_array_equal(cache.gather(rows), reference[rows])
    assert cache.gather([]).shape == (0, SIZE, SIZE, 3)
    with pytest.raises(DataError, match=r"rows must be in \[0, 36\), got 0\.\.36"):
        cache.gather([0, 36])


def _resident_file_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to read RssFile")
def test_gathered_pages_do_not_stay_resident_in_the_process(tiny_dataset: Path, tmp_path: Path) -> None:
    size = 640  # 36 images x 1.2 MB: a 44 MB file, far above the test process's noise
    cache = build_image_cache(tiny_dataset, size, tmp_path, workers=1)
    file_mib = (cache.folder / "images.u8").stat().st_size / 2**20
    before = _resident_file_mib()

    for start in range(0, len(cache), 4):  # a whole epoch, as tf.data gathers it
        cache.gather(np.arange(start, min(start + 4, len(cache))))

    grown = _resident_file_mib() - before
    assert grown < 0.25 * file_mib, f"{grown:.1f} MiB of the {file_mib:.1f} MiB cache stayed resident"


def _resident_kib_of(path: Path) -> int:
    """RSS of this process's mappings of `path` (from /proc/self/smaps), KiB."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc to read a mapping's RSS")
def test_rows_gathered_in_random_order_leave_no_neighbouring_pages_mapped(tiny_dataset: Path, tmp_path: Path) -> None:
    # Small rows (75 KiB) read one at a time out of order, as a shuffled epoch does: a fault maps the
    # neighbouring cached pages too, which releasing only the rows themselves left behind.
    cache = build_image_cache(tiny_dataset, 160, tmp_path, workers=1)
    images = cache.folder / "images.u8"
    images.read_bytes()  # the whole file in the page cache, as after the cache build
    for row in [*range(0, len(cache), 3), *range(1, len(cache), 3), *range(2, len(cache), 3)]:
        cache.gather([row])
    resident = _resident_kib_of(images)
    assert resident == 0, f"{resident} KiB of the {images.stat().st_size // 1024} KiB cache file still mapped"
