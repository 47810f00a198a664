"""make_sample_dataset(class_names=...): same images, labels as given (hostile ones included)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ml.config import DataConfig
from ml.data.layouts import list_labelled_images
from ml.data.sample import class_names, make_sample_dataset
from ml.errors import ConfigError
from tests.ml.test_sample import tree_digest

HOSTILE = ["<script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "x_{$^$}", "{{7*7}}",
           "perro español", "a,b;\"c\"\\d/e"]


def _labels(root: Path) -> list[tuple[str, str]]:
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return [(row["id"], row["breed"]) for row in csv.DictReader(fh)]


def test_without_class_names_output_is_unchanged(tmp_path: Path) -> None:
    make_sample_dataset(tmp_path / "a", classes=3, per_class=4, size=24, seed=7)
    make_sample_dataset(tmp_path / "b", classes=3, per_class=4, size=24, seed=7, class_names=class_names(3))
    make_sample_dataset(tmp_path / "c", per_class=2, size=16, seed=7)
    make_sample_dataset(tmp_path / "d", classes=4, per_class=2, size=16, seed=7)

    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "c") == tree_digest(tmp_path / "d")  # classes=None means 4


def test_hostile_class_names_keep_the_images_and_round_trip_through_the_layout(tmp_path: Path) -> None:
    plain = make_sample_dataset(tmp_path / "plain", per_class=3, size=24, seed=4, classes=len(HOSTILE))
    info = make_sample_dataset(tmp_path / "hostile", per_class=3, size=24, seed=4, class_names=HOSTILE)

    assert info["classes"] == HOSTILE
    for folder in ("train", "test"):
        assert tree_digest(tmp_path / "plain" / folder) == tree_digest(tmp_path / "hostile" / folder)
    rename = dict(zip(plain["classes"], HOSTILE, strict=True))
    assert [(i, rename[b]) for i, b in _labels(tmp_path / "plain")] == _labels(tmp_path / "hostile")
    items, problems = list_labelled_images(tmp_path / "hostile", DataConfig())
    assert problems == []
    assert sorted({label for _, label in items}) == sorted(HOSTILE)
    header = next(csv.reader((tmp_path / "hostile" / "sample_submission.csv").open(encoding="utf-8")))
    assert header == ["id", *HOSTILE]


def test_folder_layout_with_unicode_names(tmp_path: Path) -> None:
    info = make_sample_dataset(tmp_path, per_class=2, size=16, layout="folders",
                               class_names=["perro español", "x_{$^$}"])

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(info["classes"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"class_names": ["a", "a", "b"]}, r"repeats \['a'\]"),
    ({"class_names": ["a"]}, "2 to 24 names, got 1"),
    ({"class_names": ["a", ""]}, "is empty"),
    ({"class_names": ["a", " b"]}, "leading/trailing whitespace"),
    ({"class_names": ["a", "b"], "classes": 3}, "2 names but classes=3"),
    ({"class_names": "ab"}, "list of strings"),
    ({"class_names": ["a", 2]}, "list of strings"),
    ({"class_names": ["a", "b/c"], "layout": "folders"}, "cannot be a folder name"),
    ({"class_names": ["a", ".."], "layout": "folders"}, "cannot be a folder name"),
])
def test_bad_class_names(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_sample_dataset(tmp_path, per_class=1, size=16, **kwargs)
