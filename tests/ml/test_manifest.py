from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ml.data import manifest as manifest_mod
from ml.data.manifest import COLUMNS, build_manifest, dataset_hash
from ml.data.near_duplicates import near_duplicate_pairs

RNG = np.random.default_rng(0)


def pattern(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height."""
    raw = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    struct.pack_into(">II", raw, 16, width, height)
    struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return pil_bytes(Image.fromarray(pattern(20, 60)), "JPEG", exif=exif)


CASES: dict[str, tuple[bytes, dict[str, object]]] = {
    "good.jpg": (
        jpeg(pattern()),
        {"status": "ok", "format": "jpeg", "channels": 3, "width": 48, "height": 40},
    ),
    "empty.jpg": (b"", {"status": "empty file", "format": "", "channels": 0}),
    "truncated.jpg": (jpeg(pattern(seed=1))[:1000], {"status": "truncated", "format": "jpeg", "width": 48}),
    "cut_in_header.jpg": (jpeg(pattern(seed=1))[:300], {"status": "undecodable", "format": "jpeg"}),
    "text.jpg": (b"hello, I am not a picture\n", {"status": "not an image", "format": ""}),
    "png_named.jpg": (png(pattern(seed=2)), {"status": "ok", "format": "png", "channels": 3}),
    "gray.jpg": (jpeg(pattern(seed=3)[..., 0]), {"status": "ok", "format": "jpeg", "channels": 1}),
    "rgba.png": (
        png(np.dstack([pattern(seed=4), np.full((40, 48), 128, np.uint8)])),
        {"status": "ok", "format": "png", "channels": 4},
    ),
    "deep16.png": (
        png(pattern(seed=5)[..., 0].astype(np.uint16) * 257),
        {"status": "ok", "format": "png", "channels": 1},
    ),
    "cmyk.jpg": (
        pil_bytes(Image.fromarray(pattern(seed=6)).convert("CMYK"), "JPEG"),
        {"status": "ok", "format": "jpeg", "channels": 4},
    ),
    "rotated.jpg": (exif_rotated_jpeg(), {"status": "ok", "format": "jpeg", "width": 20, "height": 60}),
    "bomb.png": (png_bomb(5000, 4000), {"status": "too many pixels", "format": "png", "width": 5000}),
    # past Pillow's own limit (2 x 89 Mpx) the header is refused before its size is known
    "huge_bomb.png": (png_bomb(30000, 30000), {"status": "too many pixels", "format": "png", "width": 0}),
    "garbage_header.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, {"status": "undecodable", "format": "png"}),
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    for name, (data, _) in CASES.items():
        (root / "images" / name).write_bytes(data)
    items = [(root / "images" / name, "label") for name in CASES]
    return root, build_manifest(items, root, max_pixels=10_000_000, workers=1)


@pytest.mark.parametrize("name", list(CASES))
def test_each_file_gets_the_right_status(bad_corpus: tuple[Path, object], name: str) -> None:
    _, frame = bad_corpus
    row = frame.set_index("path").loc[f"images/{name}"]

    for column, value in CASES[name][1].items():
        assert row[column] == value, (name, column)
    assert row["bytes"] == len(CASES[name][0])
    assert (len(row["phash"]) == 16) == (row["status"] == "ok")


def test_manifest_columns_and_types(bad_corpus: tuple[Path, object]) -> None:
    _, frame = bad_corpus

    assert tuple(frame.columns) == COLUMNS
    assert set(frame["split"]) == {""}
    assert str(frame["width"].dtype) == "int64"
    assert frame.loc[frame["path"] == "images/empty.jpg", "sha256"].item() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def write_images(root: Path, named: dict[str, bytes]) -> list[Path]:
    out = []
    for name, data in named.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        out.append(root / name)
    return out


def test_duplicates_and_label_conflicts(tmp_path: Path) -> None:
    a, b = jpeg(pattern(seed=10)), jpeg(pattern(seed=11))
    paths = write_images(tmp_path, {"x/a1.jpg": a, "x/a2.jpg": a, "x/a0.jpg": a, "x/b.jpg": b, "y/b.jpg": b})
    labels = ["x", "x", "x", "x", "y"]

    frame = build_manifest(list(zip(paths, labels, strict=True)), tmp_path, max_pixels=10**7, workers=1)

    status = dict(zip(frame["path"], frame["status"], strict=True))
    # the first copy by path is kept whatever the input order
    assert status == {
        "x/a1.jpg": "duplicate",
        "x/a2.jpg": "duplicate",
        "x/a0.jpg": "ok",
        "x/b.jpg": "label conflict",
        "y/b.jpg": "label conflict",
    }


def test_dataset_hash_ignores_names_and_order(tmp_path: Path) -> None:
    imgs = [jpeg(pattern(seed=s)) for s in range(4)]
    first = write_images(tmp_path / "one", {f"{i}.jpg": d for i, d in enumerate(imgs)})
    second = write_images(tmp_path / "two", {f"renamed_{9 - i}.jpg": d for i, d in enumerate(imgs)})
    labels = ["a", "a", "b", "b"]

    h1 = dataset_hash(
        build_manifest(list(zip(first, labels, strict=True)), tmp_path / "one", max_pixels=10**7)
    )
    h2 = dataset_hash(
        build_manifest(list(zip(second, labels, strict=True))[::-1], tmp_path / "two", max_pixels=10**7)
    )
    h3 = dataset_hash(
        build_manifest(
            list(zip(first, ["a", "b", "a", "b"], strict=True)), tmp_path / "one", max_pixels=10**7
        )
    )

    assert h1 == h2
    assert h1 != h3


def test_near_duplicates_found_by_phash(tmp_path: Path) -> None:
    base = pattern(64, 64, seed=20)
    brighter = np.clip(base.astype(int) + 12, 0, 255).astype(np.uint8)
    paths = write_images(
        tmp_path,
        {
            "a.jpg": jpeg(base),
            "b.png": png(brighter),
            "c.jpg": jpeg(pattern(64, 64, 21)),
            "d.jpg": jpeg(pattern(64, 64, 22)),
        },
    )
    frame = build_manifest([(p, "x") for p in paths], tmp_path, max_pixels=10**7, workers=1)

    assert near_duplicate_pairs(frame) == [(0, 1)]


def test_process_pool_gives_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_images(tmp_path, {f"{i}.jpg": jpeg(pattern(seed=30 + i)) for i in range(40)})
    items = [(p, "x") for p in paths]
    inline = build_manifest(items, tmp_path, max_pixels=10**7, workers=1)
    monkeypatch.setattr(manifest_mod, "POOL_MIN_IMAGES", 0)

    pooled = build_manifest(items, tmp_path, max_pixels=10**7, workers=2)

    assert pooled.equals(inline)


def test_image_outside_dataset_dir_is_an_error(tmp_path: Path) -> None:
    from ml.errors import DataError

    with pytest.raises(DataError, match="not inside the dataset folder"):
        build_manifest([(Path("/etc/hostname"), "x")], tmp_path, max_pixels=10)


# --------------------------------------------------------------------------- bytes read per image


def test_file_over_max_bytes_is_quarantined_unread(tmp_path: Path) -> None:
    paths = write_images(tmp_path, {"big.jpg": jpeg(pattern(seed=40)), "small.jpg": jpeg(pattern(16, 16, seed=41))})
    cap = paths[1].stat().st_size + 1

    frame = build_manifest([(p, "x") for p in paths], tmp_path, max_pixels=10**7, max_bytes=cap, workers=1)

    big, small = frame.to_dict("records")
    assert big["status"] == f"too many bytes ({paths[0].stat().st_size} > {cap})"
    assert big["sha256"] == "" and big["bytes"] == paths[0].stat().st_size  # sized by stat, never hashed
    assert small["status"] == "ok"


def test_a_file_that_holds_more_than_its_size_says_is_cut_at_the_cap() -> None:
    # /proc files stat as 0 bytes and then read as more: the stat alone would let them through.
    row = manifest_mod.inspect_image("/proc/self/maps", max_pixels=10**7, max_bytes=100)

    assert row["status"] == "too many bytes (more than 100)"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    rows: list[dict] = []
    reader = threading.Thread(target=lambda: rows.append(manifest_mod.inspect_image(str(fifo), 10**7)), daemon=True)

    reader.start()
    reader.join(timeout=10)

    if reader.is_alive():  # unblock the stuck reader before failing
        with open(fifo, "wb"):
            pass
    assert not reader.is_alive(), "inspect_image blocked on a FIFO"
    assert rows[0]["status"] == "not a regular file"
