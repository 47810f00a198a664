"""One decode + resize for cache, serving and golden vectors: reduced JPEG decode when it is exact enough."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ml.data import images
from ml.data.image_cache import build_image_cache
from ml.data.images import DECODE, decode_resize, jpeg_dimensions, load_rgb, reduction_factor, resize_square
from ml.errors import DataError

SMALL = 16  # tiny_dataset's images are 36-59 px: every one is >= 2x this, so all decode reduced


def _jpeg(height: int, width: int, *, seed: int = 0, progressive: bool = False) -> bytes:
    import cv2

    # Smooth noise: detail at every scale, so reduced and full decodes really differ.
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(noise, (5, 5), 1.5)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, buf = cv2.imencode(".jpg", image, params)
    assert ok
    return buf.tobytes()


def _full_then_area(data: bytes, size: int) -> np.ndarray:
    return resize_square(images.decode_rgb(data), size)


def _reduced_then_area(data: bytes, size: int, factor: int) -> np.ndarray:
    import cv2

    flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("width", "height", "size", "factor"),
    [
        (224, 224, 96, 2),  # the default pipeline: 224 -> 112 -> 96
        (224, 224, 112, 2),  # exactly 2x
        (223, 500, 112, 1),  # the shorter side decides, whichever it is
        (500, 300, 96, 2),  # 300 < 4 * 96
        (800, 400, 96, 4),
        (1600, 1200, 96, 8),
        (10000, 10000, 96, 8),  # 8 is libjpeg's largest DCT reduction
        (96, 96, 96, 1),
        (50, 50, 96, 1),  # upscaling: never reduced
    ],
)
def test_reduction_factor_is_the_largest_that_keeps_both_sides_above_the_target(
    width: int, height: int, size: int, factor: int
) -> None:
    assert reduction_factor(width, height, size) == factor


def test_jpeg_dimensions_read_from_the_frame_header() -> None:
    import cv2

    baseline, progressive = _jpeg(40, 70), _jpeg(33, 90, progressive=True)
    # An APP1 (EXIF-like) segment of 5,000 bytes in front of the frame header is skipped by its length.
    payload = b"Exif\x00\x00" + bytes(4994)
    with_app1 = baseline[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + baseline[2:]
    ok, png = cv2.imencode(".png", np.zeros((8, 9, 3), np.uint8))

    assert jpeg_dimensions(baseline) == (70, 40)
    assert jpeg_dimensions(progressive) == (90, 33)
    assert jpeg_dimensions(with_app1) == (70, 40)
    assert cv2.imdecode(np.frombuffer(with_app1, np.uint8), cv2.IMREAD_COLOR).shape == (40, 70, 3)
    assert jpeg_dimensions(png.tobytes()) is None
    assert jpeg_dimensions(baseline[:20]) is None  # cut before the frame header
    assert jpeg_dimensions(b"") is None


@pytest.mark.parametrize(("height", "width", "size", "factor"), [(224, 224, 96, 2), (400, 420, 96, 4)])
def test_large_jpegs_are_decoded_reduced_then_area_resized(height: int, width: int, size: int, factor: int) -> None:
    data = _jpeg(height, width)

    out = decode_resize(data, size)

    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reduced_then_area(data, size, factor))
    # Not the full decode: the sampling grids differ (so every path must share this function).
    assert not np.array_equal(out, _full_then_area(data, size))
    assert np.abs(out.astype(int) - _full_then_area(data, size)).mean() < 8


def test_small_jpegs_and_other_formats_are_decoded_in_full() -> None:
    import cv2

    small = _jpeg(150, 150)  # < 2 x 96
    ok, png = cv2.imencode(".png", cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (300, 300, 3),
                                                                                      dtype=np.uint8), (5, 5), 1))

    np.testing.assert_array_equal(decode_resize(small, 96), _full_then_area(small, 96))
    np.testing.assert_array_equal(decode_resize(png.tobytes(), 96), _full_then_area(png.tobytes(), 96))


def test_a_header_promising_more_pixels_than_decoded_falls_back_to_a_full_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _jpeg(100, 100)
    monkeypatch.setattr(images, "jpeg_dimensions", lambda _: (10_000, 10_000))  # reduced 8x: 13 px < 40

    np.testing.assert_array_equal(decode_resize(data, 40), _full_then_area(data, 40))


def test_decoding_into_a_given_array_writes_the_same_pixels_there() -> None:
    data = _jpeg(300, 240)
    expected = decode_resize(data, 96)
    block = np.zeros((3, 96, 96, 3), dtype=np.uint8)
    strided = np.zeros((96, 96, 3, 2), dtype=np.uint8)[..., 0]  # not contiguous: OpenCV cannot write there

    returned = decode_resize(data, 96, out=block[1])
    decode_resize(data, 96, out=strided)

    np.testing.assert_array_equal(block[1], expected)
    assert returned.base is block or returned is block[1] or np.shares_memory(returned, block)
    assert not block[0].any() and not block[2].any()
    np.testing.assert_array_equal(strided, expected)
    with pytest.raises(ValueError, match=r"out must be a \(96, 96, 3\) uint8 array"):
        decode_resize(data, 96, out=np.zeros((64, 64, 3), dtype=np.uint8))


def test_undecodable_bytes_name_the_source() -> None:
    with pytest.raises(DataError, match=r"^upload\.jpg: not a decodable image"):
        decode_resize(b"\xff\xd8 not really a jpeg", 32, source="upload.jpg")
    with pytest.raises(DataError, match=r"^upload\.jpg: empty file"):
        decode_resize(b"", 32, source="upload.jpg")


def test_cache_predictor_and_golden_inputs_see_identical_pixels(tiny_dataset: Path, tmp_path: Path) -> None:
    from ml.registry.exports import golden_images
    from ml.serving.predictor import Predictor

    cache = build_image_cache(tiny_dataset, SMALL, tmp_path, workers=1)
    paths = [tiny_dataset / p for p in cache.index["path"]]
    predictor = Predictor(model=None, labels=["a", "b", "c"], image_size=SMALL)

    from_files = predictor.prepare(paths)
    from_bytes = predictor.prepare([p.read_bytes() for p in paths[:3]])
    golden = golden_images(tiny_dataset, SMALL, tmp_path)
    test_rows = cache.split_indices("test")

    np.testing.assert_array_equal(from_files, cache.gather(np.arange(len(cache))).astype(np.float32))
    np.testing.assert_array_equal(from_bytes, from_files[:3])
    assert all(any(np.array_equal(g, cache.gather([r])[0]) for r in test_rows) for g in golden)
    # ... and they are the reduced decodes, not what a full decode + resize would give.
    full = np.stack([resize_square(load_rgb(p), SMALL) for p in paths]).astype(np.float32)
    assert not np.array_equal(from_files, full)


def test_cache_meta_records_the_decode(tiny_dataset: Path, tmp_path: Path) -> None:
    cache = build_image_cache(tiny_dataset, SMALL, tmp_path, workers=1)

    meta = json.loads((cache.folder / "meta.json").read_text())

    assert meta["decode"] == DECODE
    assert DECODE["function"] == "ml.data.images.decode_resize"


def test_opencv_threads_are_restored_after_the_block() -> None:
    import cv2

    before = cv2.getNumThreads()
    with images.opencv_threads(1):
        inside = cv2.getNumThreads()
    assert inside == 1 and cv2.getNumThreads() == before
