"""Tiny dataset folders for the model, cache and training tests (built here, not by ingest)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLASS_COLOURS = {"blue_square": (30, 60, 220), "green_bar": (40, 200, 60), "red_disc": (220, 40, 40)}


def make_dataset(root: Path, *, per_class: int = 12, seed: int = 0) -> Path:
    """Write a 3-class JPEG dataset folder with manifest.parquet and dataset.json.

    Each class has a distinct colour and shape; per class 2 images go to val, 2 to test,
    the rest to train. One extra quarantined row points at a non-image file.
    """
    import cv2

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, colour in sorted(CLASS_COLOURS.items()):
        for i in range(per_class):
            h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            centre, radius = (w // 2, h // 2), min(h, w) // 3
            if "disc" in label:
                cv2.circle(img, centre, radius, colour, -1)
            elif "square" in label:
                cv2.rectangle(img, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), colour, -1)
            else:
                cv2.rectangle(img, (w // 2 - 3, 2), (w // 2 + 3, h - 2), colour, -1)
            rel = f"images/{label}_{i:03d}.jpg"
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            assert ok
            data = buf.tobytes()
            (root / rel).write_bytes(data)
            split = "val" if i < 2 else "test" if i < 4 else "train"
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": w,
                    "height": h,
                    "channels": 3,
                    "format": "jpeg",
                    "bytes": len(data),
                    "phash": "0" * 16,
                    "status": "ok",
                    "split": split,
                }
            )
    bad = b"not an image"
    (root / "images" / "broken.jpg").write_bytes(bad)
    rows.append(
        {
            "path": "images/broken.jpg",
            "label": "red_disc",
            "sha256": hashlib.sha256(bad).hexdigest(),
            "width": 0,
            "height": 0,
            "channels": 0,
            "format": "",
            "bytes": len(bad),
            "phash": "",
            "status": "undecodable",
            "split": "",
        }
    )
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(root / "manifest.parquet", index=False)
    ok = manifest[manifest["status"] == "ok"]
    lines = sorted(f"{s}\t{lbl}\n" for s, lbl in zip(ok["sha256"], ok["label"], strict=True))
    labels = sorted(CLASS_COLOURS)
    info = {
        "dataset_hash": hashlib.sha256("".join(lines).encode()).hexdigest(),
        "source": "test",
        "layout": "folders",
        "labels": labels,
        "counts": ok["label"].value_counts().to_dict(),
        "n_images": len(manifest),
        "n_ok": len(ok),
        "n_quarantined": len(manifest) - len(ok),
        "created_at": "2024-01-01T00:00:00Z",
        "extra": {},
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 JPEGs (8 train / 2 val / 2 test each) plus one quarantined file; read-only."""
    return make_dataset(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture()
def fresh_dataset(tmp_path: Path) -> Path:
    """A private copy of the tiny dataset (tests that modify it)."""
    return make_dataset(tmp_path / "dataset")
