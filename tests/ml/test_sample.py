from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from ml.config import DataConfig
from ml.data.images import load_rgb
from ml.data.layouts import detect_layout, find_unlabelled, list_labelled_images
from ml.data.sample import MAX_CLASSES, class_names, make_sample_dataset
from ml.errors import ConfigError


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            digest.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()


def test_kaggle_layout_is_readable_by_layouts(tmp_path: Path) -> None:
    info = make_sample_dataset(tmp_path, classes=3, per_class=5, size=32, seed=1)

    items, problems = list_labelled_images(tmp_path, DataConfig())
    header = next(csv.reader((tmp_path / "sample_submission.csv").open()))

    assert info["layout"] == "kaggle" and info["n_images"] == 15 and info["dest"] == str(tmp_path)
    assert detect_layout(tmp_path, DataConfig()) == "kaggle"
    assert problems == []
    assert sorted({label for _, label in items}) == sorted(info["classes"])
    assert all(len(p.stem) == 32 and int(p.stem, 16) >= 0 for p, _ in items)
    assert header == ["id", *info["classes"]]
    assert len(find_unlabelled(tmp_path, DataConfig())) == 2
    assert load_rgb(items[0][0]).shape == (32, 32, 3)


def test_folders_layout(tmp_path: Path) -> None:
    info = make_sample_dataset(tmp_path, classes=2, per_class=3, size=16, layout="folders")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(info["classes"])
    assert sorted(p.name for p in (tmp_path / info["classes"][0]).iterdir()) == [
        "0000.jpg",
        "0001.jpg",
        "0002.jpg",
    ]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    make_sample_dataset(tmp_path / "a", classes=2, per_class=4, size=24, seed=5)
    make_sample_dataset(tmp_path / "b", classes=2, per_class=4, size=24, seed=5)
    make_sample_dataset(tmp_path / "c", classes=2, per_class=4, size=24, seed=6)

    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")


def test_class_names_are_unique_breed_like_names() -> None:
    names = class_names(MAX_CLASSES)

    assert MAX_CLASSES >= 20
    assert len(set(names)) == MAX_CLASSES
    assert names[:4] == ["striped_circle", "dotted_square", "checkered_triangle", "solid_star"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes must be >= 2"),
        ({"per_class": 0}, "per_class must be >= 1"),
        ({"size": 8}, "size must be >= 16"),
        ({"layout": "zip"}, "layout must be one of"),
        ({"classes": MAX_CLASSES + 1}, "classes must be in"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_sample_dataset(tmp_path, **kwargs)


def test_colour_alone_does_not_give_the_class(tmp_path: Path) -> None:
    # Nearest class-mean colour must stay near chance: classes differ in shape and texture only.
    make_sample_dataset(tmp_path, classes=4, per_class=40, size=32, seed=3, layout="folders")
    feats, labels = [], []
    for k, folder in enumerate(sorted(p for p in tmp_path.iterdir())):
        for f in sorted(folder.iterdir()):
            feats.append(load_rgb(f).reshape(-1, 3).mean(axis=0))
            labels.append(k)
    x, y = np.array(feats), np.array(labels)
    train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    centroids = np.stack([x[train & (y == k)].mean(axis=0) for k in range(4)])
    predicted = np.argmin(((x[test][:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)

    assert (predicted == y[test]).mean() < 0.45
