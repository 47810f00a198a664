"""A hostile corpus: what a stranger's dataset can throw at ingest, and what it must get back.

Every case ends in the right exception (a DataError, so the DAG fails it at once instead of
retrying) or a quarantine, with a message naming the file and the rule; nothing is written
outside the destination (the tmp tree is walked before and after); and where memory is the
attack, the work runs in a child process whose peak RSS (VmHWM) must stay under 3 GB -- and
under a tighter bound that only holds when the protection works.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import unicodedata
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.config import DataConfig, PipelineConfig
from ml.data.ingest import ingest, load_dataset
from ml.data.sample import make_sample_dataset
from ml.errors import ConfigError, DataError, SourceError, UnsafeArchiveError

REPO = Path(__file__).resolve().parents[2]
MAX_RSS_MB = 3 * 1024  # the product's promise: peak RSS under 3 GB on hostile data


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> set[str]:
    """Every path under `root` (files and folders, links not followed)."""
    out = set()
    for folder, dirs, files in os.walk(root):
        out.update(os.path.join(folder, name) for name in dirs + files)
    return out


def assert_nothing_left(root: Path, before: set[str], work: Path) -> None:
    """Only the (empty) datasets folder may have appeared under `root`."""
    new = snapshot(root) - before
    assert new <= {str(work), str(work / "datasets")}, sorted(new)[:5]
    assert not (work / "datasets").exists() or list((work / "datasets").iterdir()) == []


def run_child(code: str, timeout: float = 300) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it must print one JSON object as its last line.

    ``peak_mb()`` (VmHWM, see ml.training.fit.peak_rss_mb) and ``BASE_MB`` (VmHWM after the
    imports) are defined for it.
    """
    prelude = textwrap.dedent(
        """
        import json, sys, time
        import cv2, numpy as np, pandas as pd
        from ml.training.fit import peak_rss_mb as peak_mb
        BASE_MB = peak_mb()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def jpeg(seed: int, size: int = 40) -> bytes:
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC))[1].tobytes()


def folder_source(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"class{c}" / f"{i}.jpg").write_bytes(jpeg(100 * c + i))
    return root


def make_zip(path: Path, entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def crafted_zip(path: Path, n_entries: int) -> Path:
    """A zip64 whose central directory lists `n_entries` records, all pointing at one empty file.

    ~54 bytes per record on disk, ~400 bytes each once zipfile has built its ZipInfo objects.
    """
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    head = struct.pack("<4sHHHHHHIII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0)
    tail = struct.pack("<HHHHHII", 8, 0, 0, 0, 0, 0, 0)
    records = b"".join(head + tail + b"%08d" % i for i in range(n_entries))
    zip64_end = struct.pack(
        "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n_entries, n_entries, len(records), len(local)
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, len(local) + len(records), 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(local + records + zip64_end + locator + end)
    return path


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A real greyscale PNG of width x height black pixels, written row by row (~0.1% of its pixels in size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def jpeg_header_bomb(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header (SOF0) claims width x height."""
    raw = bytearray(jpeg(7, size=16))
    sof = raw.index(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, height, width)
    path.write_bytes(bytes(raw))
    return path


# --------------------------------------------------------------------------- zip archives


NAME_CASES = {
    "traversal": ("cats/../../{u}.jpg", "'..' would escape the destination"),
    "deep traversal": ("cats/" + "../" * 12 + "{u}.jpg", "'..' would escape the destination"),
    "absolute": ("/tmp/{u}.jpg", "absolute path is not allowed"),
    "drive letter": ("C:/{u}.jpg", "drive letter is not allowed"),
    "backslashes": ("cats\\..\\..\\{u}.jpg", "backslash in name"),
    "16,000 folders deep": ("a/" * 16_000 + "{u}.jpg", "name is longer than the limit of 1024 bytes"),
    "41 folders deep": ("d/" * 40 + "{u}.jpg", "41 levels deep, more than the limit of 32"),
    "300-byte file name": ("cats/{u}" + "n" * 264 + ".jpg", "is 300 bytes \\(UTF-8\\), more than the limit of 255"),
    "long unicode name": ("cats/{u}" + "狗" * 80 + ".jpg", "is 276 bytes \\(UTF-8\\), more than the limit of 255"),
    "newline": ("cats/{u}\nfake log line.jpg", "control character U\\+000A"),
    "terminal escape": ("cats/{u}\x1b]0;pwned\x07.jpg", "control character U\\+001B"),
    "bidi override": ("cats/{u}\u202egpj.exe", "control character U\\+202E"),
}


@pytest.mark.parametrize("case", list(NAME_CASES))
def test_hostile_zip_entry_names(tmp_path: Path, case: str) -> None:
    u = uuid.uuid4().hex
    name, rule = NAME_CASES[case]
    name = name.replace("{u}", u)
    archive = make_zip(tmp_path / "evil.zip", [("cats/a.jpg", jpeg(1)), ("dogs/b.jpg", jpeg(2)), (name, b"payload")])
    before = snapshot(tmp_path)
    started = time.monotonic()

    with pytest.raises(UnsafeArchiveError, match=rule) as err:
        ingest(str(archive), tmp_path / "work", DataConfig())

    assert time.monotonic() - started < 5  # the 16,000-deep name used to cost seconds of quadratic checks
    assert repr(name[:80]) in str(err.value) and len(str(err.value)) < 500
    assert_nothing_left(tmp_path, before, tmp_path / "work")
    assert not list(tmp_path.parent.rglob(f"*{u}*")) and not Path(f"/tmp/{u}.jpg").exists()


def test_nul_in_an_entry_name(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "nul.zip", [("cats/a.jpg", jpeg(1)), ("cats/b.jpgX../../x", b"payload")])
    archive.write_bytes(archive.read_bytes().replace(b"b.jpgX", b"b.jpg\x00"))
    before = snapshot(tmp_path)

    with pytest.raises(UnsafeArchiveError, match=r"'cats/b.jpg\\x00../../x': NUL byte in name is not allowed"):
        ingest(str(archive), tmp_path / "work", DataConfig())
    assert_nothing_left(tmp_path, before, tmp_path / "work")


def test_names_equal_after_unicode_normalisation(tmp_path: Path) -> None:
    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    archive = make_zip(tmp_path / "nfc.zip", [(f"{nfc}/1.jpg", jpeg(1)), (f"{nfd}/1.jpg", jpeg(2))])
    before = snapshot(tmp_path)

    with pytest.raises(UnsafeArchiveError, match="appears twice in the archive .*NFC"):
        ingest(str(archive), tmp_path / "work", DataConfig())
    assert_nothing_left(tmp_path, before, tmp_path / "work")


def test_a_million_entries_are_refused_before_they_are_loaded(tmp_path: Path) -> None:
    archive = crafted_zip(tmp_path / "many.zip", 1_000_000)  # 54 MB; zipfile alone would take ~400 MB and 10 s

    result = run_child(f"""
        from ml.config import DataConfig
        from ml.data.ingest import ingest
        started = time.monotonic()
        try:
            ingest({str(archive)!r}, {str(tmp_path / "work")!r}, DataConfig())
            message = ""
        except Exception as exc:
            message = f"{{type(exc).__name__}}: {{exc}}"
        print(json.dumps({{"message": message, "peak": peak_mb(), "base": BASE_MB,
                           "seconds": time.monotonic() - started}}))
    """)

    assert result["message"].startswith("UnsafeArchiveError: many.zip: 1000000 entries, more than the limit of 500000")
    assert "data.max_archive_entries" in result["message"]
    assert result["peak"] < MAX_RSS_MB
    assert result["peak"] - result["base"] < 150, result  # the central directory was never loaded
    assert result["seconds"] < 5, result


def test_zip_bombs_declared_and_lying(tmp_path: Path) -> None:
    declared = make_zip(tmp_path / "declared.zip", [("cats/a.jpg", jpeg(1)), ("cats/zeros.jpg", bytes(64 * 1024**2))])
    lying = make_zip(tmp_path / "lying.zip", [("cats/liar.jpg", bytes(8 * 1024**2)), ("cats/a.jpg", jpeg(1))])
    raw = bytearray(lying.read_bytes())  # claim 1,000 bytes for 8 MiB of zeros, in both headers
    struct.pack_into("<I", raw, 22, 1000)  # the first local header starts the file
    struct.pack_into("<I", raw, raw.index(b"PK\x01\x02") + 24, 1000)
    lying.write_bytes(bytes(raw))
    before = snapshot(tmp_path)

    with pytest.raises(UnsafeArchiveError, match=r"'cats/zeros.jpg': compression ratio \d+ exceeds the limit of 200"):
        ingest(str(declared), tmp_path / "work", DataConfig())
    with pytest.raises(UnsafeArchiveError, match=r"'cats/liar.jpg': (more data than the 1000 bytes|data does not)"):
        ingest(str(lying), tmp_path / "work", DataConfig())
    assert_nothing_left(tmp_path, before, tmp_path / "work")


def test_too_many_entries_in_a_small_zip(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "many.zip", [(f"cats/{i}.jpg", b"x") for i in range(30)])
    before = snapshot(tmp_path)

    with pytest.raises(UnsafeArchiveError, match=r"30 entries, more than the limit of 20 \(data.max_archive_entries"):
        ingest(str(archive), tmp_path / "work", DataConfig(max_archive_entries=20))
    assert_nothing_left(tmp_path, before, tmp_path / "work")


# --------------------------------------------------------------------------- labels


def test_a_huge_labels_csv_is_cut_at_the_row_limit(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "train").mkdir(parents=True)
    (root / "train" / "0.jpg").write_bytes(jpeg(0))
    with open(root / "labels.csv", "w") as fh:  # 5 M rows, 53 MB: ~1.5 GB as Python rows, and then some
        fh.write("id,breed\n")
        for start in range(0, 5_000_000, 100_000):
            fh.write("".join(f"{i},pug\n" for i in range(start, start + 100_000)))

    result = run_child(f"""
        from ml.config import DataConfig
        from ml.data.ingest import ingest
        try:
            ingest({str(root)!r}, {str(tmp_path / "work")!r}, DataConfig())
            message = ""
        except Exception as exc:
            message = f"{{type(exc).__name__}}: {{exc}}"
        print(json.dumps({{"message": message, "peak": peak_mb(), "base": BASE_MB}}))
    """)

    assert result["message"].startswith("DataError: ")
    assert "labels.csv has more than data.max_label_rows=1000000 rows" in result["message"]
    assert result["peak"] < MAX_RSS_MB
    assert result["peak"] - result["base"] < 800, result


def test_a_labels_csv_over_its_byte_limit(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "train").mkdir(parents=True)
    (root / "train" / "0.jpg").write_bytes(jpeg(0))
    with open(root / "labels.csv", "wb") as fh:
        fh.write(b"id,breed\n")
        fh.truncate(300 * 1024**2)  # sparse: 300 MiB on paper, nothing on disk

    with pytest.raises(DataError, match=r"labels.csv is 314572800 bytes, more than data.max_labels_file_bytes="):
        ingest(str(root), tmp_path / "work", DataConfig())


def test_hostile_labels_are_problems_and_the_rest_is_ingested(tmp_path: Path) -> None:
    root = tmp_path / "src"
    make_sample_dataset(root, classes=2, per_class=6, size=32, seed=3)
    first = sorted((root / "train").iterdir())[0]
    bad = {"long": "x" * 5000, "nul": "pu\x00g", "esc": "\x1b[2J\x1b[31mred", "rtl": "\u202ekcab"}
    with open(root / "labels.csv", "a", newline="") as fh:
        for image_id, label in bad.items():
            (root / "train" / f"{image_id}.jpg").write_bytes(first.read_bytes())
            fh.write(f'{image_id},"{label}"\n')

    out = ingest(str(root), tmp_path / "work", DataConfig(min_images_per_class=1))

    meta, manifest = load_dataset(Path(out["dataset_dir"]))
    assert len(meta["labels"]) == 2 and all(len(label) < 40 for label in meta["labels"])
    problems = "\n".join(meta["extra"]["problems"])
    assert "id 'long' has a label 'xxxx" in problems
    assert "is 5000 characters long, more than data.max_label_chars=200" in problems
    for image_id, code in (("nul", "U+0000"), ("esc", "U+001B"), ("rtl", "U+202E")):
        assert f"id {image_id!r} has a label" in problems and code in problems
    assert all(label in meta["labels"] for label in manifest["label"])


# --------------------------------------------------------------------------- classes


def test_thousands_of_classes_are_refused_at_ingest(tmp_path: Path) -> None:
    for c in range(1001):
        (tmp_path / "src" / f"class{c:04d}").mkdir(parents=True)
        (tmp_path / "src" / f"class{c:04d}" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    before = snapshot(tmp_path)

    with pytest.raises(DataError, match=r"has 1001 classes, more than data.max_classes=1000 \(e.g. 'class0000'"):
        ingest(str(tmp_path / "src"), tmp_path / "work", DataConfig())
    assert_nothing_left(tmp_path, before, tmp_path / "work")


def test_evaluating_fifteen_hundred_classes_keeps_metrics_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate_candidate with K = 1,500: no K x K in metrics.json, plot and CSV still made.

    The model and its predictions are stand-ins (training 1,500 classes is not the point here).
    """
    import ml.serving.predictor
    import ml.training.predict
    from ml.evaluation import scoring
    from ml.registry import layout, runs

    k, n = 1500, 3000
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, k, size=n)
    probs = rng.dirichlet(np.ones(k), size=n).astype("float32")
    probs[np.arange(n), y_true] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    labels = [f"class_{i:04d}" for i in range(k)]

    class TinyPredictor:
        image_size = 8
        batch_sizes: list[int] = []

        def predict_proba(self, images: Any) -> Any:
            self.batch_sizes.append(len(images))
            return np.zeros((len(images), k), np.float32)

    config = PipelineConfig.from_dict({"work_dir": str(tmp_path / "work")})
    cand_dir = runs.local_run_dir(config, "run1") / "scratch_small"
    cand_dir.mkdir(parents=True)
    (cand_dir / layout.CANDIDATE_MARKER).write_text("{}")
    (cand_dir / "model.keras").write_bytes(b"stand-in")
    monkeypatch.setattr(ml.training.predict, "predict_split", lambda *a, **kw: (y_true, probs, labels))
    monkeypatch.setattr(ml.serving.predictor, "load_local", lambda folder: TinyPredictor())

    metrics = scoring.evaluate_candidate(tmp_path, "scratch_small", config, None, "run1")

    assert "confusion" not in metrics and "1500 classes > 200" in metrics["confusion_omitted"]
    # latency_ms is the serving predictor's, one image at a time (warm-up + timed calls).
    assert TinyPredictor.batch_sizes and set(TinyPredictor.batch_sizes) == {1}
    assert (cand_dir / "metrics.json").stat().st_size < 1_000_000
    assert (cand_dir / "confusion.png").stat().st_size > 1000
    assert len((cand_dir / "confusion.csv").read_text().splitlines()) == k + 1
    card_metrics = scoring.with_confusion(metrics, cand_dir, k)  # what the model card is given
    assert np.asarray(card_metrics["confusion"]).shape == (k, k)
    assert np.asarray(card_metrics["confusion"]).sum() == n


# --------------------------------------------------------------------------- images


def test_a_huge_image_file_is_quarantined_unread(tmp_path: Path) -> None:
    root = folder_source(tmp_path / "src")
    huge = root / "class0" / "huge.jpg"
    with open(huge, "wb") as fh:  # 3.5 GiB, sparse: reading it would cost 3.5 GB of RSS
        fh.write(b"\xff\xd8\xff\xe0")
        fh.truncate(int(3.5 * 1024**3))

    result = run_child(f"""
        from ml.config import DataConfig
        from ml.data.ingest import ingest, load_dataset
        out = ingest({str(root)!r}, {str(tmp_path / "work")!r}, DataConfig(min_images_per_class=1))
        manifest = load_dataset(out["dataset_dir"])[1]
        row = manifest[manifest["path"].str.endswith("huge.jpg")].iloc[0]
        print(json.dumps({{"status": row["status"], "n_ok": out["n_ok"], "peak": peak_mb(), "base": BASE_MB}}))
    """)

    assert result["status"] == f"too many bytes ({int(3.5 * 1024**3)} > {50 * 1024**2})"
    assert result["n_ok"] == 8
    assert result["peak"] < MAX_RSS_MB
    assert result["peak"] - result["base"] < 500, result


def test_decompression_bombs_are_quarantined_from_their_headers(tmp_path: Path) -> None:
    root = folder_source(tmp_path / "src")
    png_bomb(root / "class0" / "bomb.png", 12_000, 12_000)  # 144 Mpx for real: ~430 MB decoded as RGB
    jpeg_header_bomb(root / "class1" / "bomb.jpg", 65_000, 65_000)  # 4.2 Gpx claimed by a 600-byte file

    result = run_child(f"""
        from ml.config import DataConfig
        from ml.data.ingest import ingest, load_dataset
        out = ingest({str(root)!r}, {str(tmp_path / "work")!r}, DataConfig(min_images_per_class=1))
        manifest = load_dataset(out["dataset_dir"])[1].set_index("path")
        print(json.dumps({{"png": manifest.loc["images/class0/bomb.png", "status"],
                           "jpeg": manifest.loc["images/class1/bomb.jpg", "status"],
                           "peak": peak_mb(), "base": BASE_MB}}))
    """)

    assert result["png"] == "too many pixels" and result["jpeg"] == "too many pixels"
    assert result["peak"] < MAX_RSS_MB
    assert result["peak"] - result["base"] < 300, result


# --------------------------------------------------------------------------- near-duplicates


def test_eight_thousand_look_alikes_group_in_bounded_memory() -> None:
    # The reviewer's case: every image within 6 bits of every other, 32 M pairs, 5.3 GB before.
    result = run_child("""
        from ml.data.near_duplicates import near_duplicate_groups, near_duplicate_pairs
        from ml.data.quality import _leaks, _per_class, _statistics
        from ml.data.splits import assign_splits
        rng = np.random.default_rng(0)
        n, base = 8000, 0x0123456789ABCDEF
        hashes = np.full(n, base, dtype=np.uint64)
        for step in range(3):
            bits = rng.integers(0, 64, size=n).astype(np.uint64)
            hashes = np.where(rng.random(n) < 0.7, hashes ^ (np.uint64(1) << bits), hashes)
        manifest = pd.DataFrame({
            "path": [f"images/{i}.jpg" for i in range(n)], "label": ["a", "b"] * (n // 2),
            "sha256": [f"{i:064x}" for i in range(n)], "width": 64, "height": 64, "channels": 3, "format": "jpeg",
            "bytes": 1000, "phash": [f"{int(h):016x}" for h in hashes], "status": "ok", "split": "",
        })
        started = time.monotonic()
        out = assign_splits(manifest, val_percent=15.0, test_percent=15.0, seed=1)
        near = near_duplicate_groups(out)
        stats = _statistics(out, _per_class(out), near, _leaks(out, near))
        examples = near_duplicate_pairs(out, limit=100)
        print(json.dumps({"splits": sorted(set(out["split"])), "groups": near.n_groups, "grouped": near.n_images,
                          "leaks": stats["near_duplicates_across_train_test"], "examples": len(examples),
                          "seconds": time.monotonic() - started, "peak": peak_mb(), "base": BASE_MB}))
    """)

    assert result["groups"] == 1 and result["grouped"] == 8000
    assert len(result["splits"]) == 1 and result["leaks"] == 0
    assert result["examples"] == 100
    assert result["peak"] < MAX_RSS_MB
    assert result["peak"] - result["base"] < 300, result
    assert result["seconds"] < 30, result


# --------------------------------------------------------------------------- s3:// sources (real SeaweedFS)


def put_objects(store: Any, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        store.put_bytes(key, data)


def no_downloads(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "download_file", lambda *a, **k: pytest.fail("downloaded before refusing"))


def test_s3_prefix_with_too_many_objects(store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_objects(store, {f"raw/cats/{i:02d}.jpg": b"x" for i in range(25)})
    listed: list[str] = []
    real = store.iter_objects

    def counting(prefix: str, **kwargs: Any) -> Any:
        for item in real(prefix, **kwargs):
            listed.append(item["key"])
            yield item

    monkeypatch.setattr(store, "iter_objects", counting)
    no_downloads(store, monkeypatch)
    before = snapshot(tmp_path)

    with pytest.raises(SourceError, match=rf"s3://{store.bucket}/raw/ holds more than 20 objects \(data.max_archive"):
        ingest(f"s3://{store.bucket}/raw", tmp_path / "work", DataConfig(max_archive_entries=20), store=store)

    assert len(listed) == 21  # counted while listing, not after
    assert_nothing_left(tmp_path, before, tmp_path / "work")


def test_s3_prefix_with_too_many_bytes(store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put_objects(store, {f"raw/cats/{i}.jpg": bytes(1000) for i in range(5)})
    no_downloads(store, monkeypatch)
    before = snapshot(tmp_path)

    with pytest.raises(SourceError, match=r"total 3000 bytes, more than the limit of 2500 \(data.max_archive_bytes"):
        ingest(f"s3://{store.bucket}/raw", tmp_path / "work", DataConfig(max_archive_bytes=2500), store=store)
    assert_nothing_left(tmp_path, before, tmp_path / "work")


S3_KEY_CASES = {
    "newline": (["raw/cats/a\nb.jpg"], "control character U\\+000A"),
    "terminal escape": (["raw/cats/\x1b[31mred.jpg"], "control character U\\+001B"),
    "bidi override": (["raw/cats/\u202egpj.exe"], "control character U\\+202E"),
    "41 folders deep": (["raw/" + "d/" * 40 + "x.jpg"], "41 levels deep, more than the limit of 32"),
    "NFC twins": (["raw/caf\u00e9/1.jpg", "raw/" + unicodedata.normalize("NFD", "caf\u00e9") + "/1.jpg"], "NFC"),
}


@pytest.mark.parametrize("case", list(S3_KEY_CASES))
def test_s3_hostile_keys(store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    keys, rule = S3_KEY_CASES[case]
    put_objects(store, {"raw/cats/ok.jpg": jpeg(1), **{key: b"payload" for key in keys}})
    no_downloads(store, monkeypatch)
    before = snapshot(tmp_path)

    with pytest.raises(SourceError, match=rule) as err:
        ingest(f"s3://{store.bucket}/raw", tmp_path / "work", DataConfig(), store=store)

    assert f"s3://{store.bucket}/raw/" in str(err.value)
    assert_nothing_left(tmp_path, before, tmp_path / "work")


def test_s3_object_larger_than_listed_stops_streaming(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_objects(store, {"raw/cats/a.jpg": jpeg(1), "raw/dogs/b.jpg": jpeg(2)})
    real = store.iter_objects

    def listing_then_swap(prefix: str, **kwargs: Any) -> Any:
        yield from real(prefix, **kwargs)
        store.put_bytes("raw/dogs/b.jpg", bytes(5 * 1024**2))  # grows after it was listed

    monkeypatch.setattr(store, "iter_objects", listing_then_swap)
    before = snapshot(tmp_path)

    with pytest.raises(SourceError, match=r"'raw/dogs/b.jpg' in s3://.* changed while it was being ingested: listed "):
        ingest(f"s3://{store.bucket}/raw", tmp_path / "work", DataConfig(), store=store)
    assert_nothing_left(tmp_path, before, tmp_path / "work")  # no .part file either


# --------------------------------------------------------------------------- paths the filesystem refuses


def deep_work_dir(tmp_path: Path, length: int) -> Path:
    work = tmp_path
    while len(str(work)) < length - 250:
        work = work / ("w" * 200)
    work = work / ("w" * (length - len(str(work)) - 1))
    work.mkdir(parents=True)
    return work


def test_a_work_folder_too_deep_for_the_names_is_a_data_error(tmp_path: Path) -> None:
    source = folder_source(tmp_path / "src")
    (source / "class0" / ("n" * 250 + ".jpg")).write_bytes(jpeg(9))
    work = deep_work_dir(tmp_path / "deep", 3800)  # + /datasets/.tmp-x/images/class0/<254 bytes> > 4,095
    archive = make_zip(tmp_path / "src.zip", [("class0/" + "n" * 250 + ".jpg", jpeg(9)), ("class1/a.jpg", jpeg(8))])
    before = snapshot(tmp_path)

    with pytest.raises(DataError, match=r"cannot be created or read under .*ENAMETOOLONG.*data.max_name_bytes") as err:
        ingest(str(source), work, DataConfig())
    assert not isinstance(err.value, OSError)
    with pytest.raises(UnsafeArchiveError, match=r"cannot be created under .*ENAMETOOLONG"):
        ingest(str(archive), work, DataConfig())
    assert_nothing_left(tmp_path, before, work)


# --------------------------------------------------------------------------- every limit is a validated setting


@pytest.mark.parametrize(
    ("key", "bad", "allowed"),
    [
        ("max_classes", 1, "an integer >= data.min_classes \\(2\\)"),
        ("max_classes", "many", "an integer >= data.min_classes \\(2\\)"),
        ("max_image_bytes", 0, "an integer >= 1"),
        ("max_image_bytes", 1.5, "an integer >= 1"),
        ("max_label_chars", 0, "an integer in \\[1, 100000\\]"),
        ("max_label_rows", -1, "an integer >= 1"),
        ("max_labels_file_bytes", True, "an integer >= 1"),
        ("max_name_bytes", 5000, "an integer in \\[1, 4095\\]"),
        ("max_name_depth", 0, "an integer in \\[1, 2048\\]"),
        ("max_name_part_bytes", 256, "an integer in \\[1, 255\\]"),
        ("max_archive_entries", 0, "an integer >= 1"),
        ("max_archive_bytes", 0, "an integer >= 1"),
        ("max_image_pixels", 0, "an integer >= 1"),
    ],
)
def test_limits_are_validated_settings(key: str, bad: Any, allowed: str) -> None:
    with pytest.raises(ConfigError, match=rf"data.{key} must be {allowed}, got {bad!r}"):
        PipelineConfig.from_dict({"data": {key: bad}})


def test_limits_can_be_raised_and_lowered() -> None:
    config = PipelineConfig.from_dict({"data": {"max_classes": 5000, "max_image_bytes": 1024, "max_name_depth": 8}})

    assert (config.data.max_classes, config.data.max_image_bytes, config.data.max_name_depth) == (5000, 1024, 8)
    assert DataConfig().max_classes == 1000 and DataConfig().max_image_bytes == 50 * 1024**2
