"""Drift between a run's dataset and production's: class set, class balance, image sizes."""

from __future__ import annotations

import pytest

from ml.data.drift import compare_profiles, dataset_profile


def _profile(counts: dict[str, int], median: float = 100.0) -> dict:
    size = {"p10": median * 0.8, "median": median, "p90": median * 1.2}
    return {"dataset_hash": "h", "n_ok": sum(counts.values()), "counts": counts, "width": size, "height": size}


def test_same_data_has_no_findings():
    profile = _profile({"cat": 50, "dog": 50})

    drift = compare_profiles(profile, profile)

    assert drift["findings"] == []
    assert drift["class_distribution_tvd"] == 0
    assert not drift["label_set_changed"]


def test_new_and_removed_classes_are_reported():
    drift = compare_profiles(_profile({"cat": 50, "fox": 50}), _profile({"cat": 50, "dog": 50}))

    assert drift["added_classes"] == ["fox"]
    assert drift["removed_classes"] == ["dog"]
    assert drift["label_set_changed"]
    assert any("new classes" in f for f in drift["findings"])


@pytest.mark.parametrize(("current", "warns"), [({"cat": 55, "dog": 45}, False), ({"cat": 80, "dog": 20}, True)])
def test_class_balance_shift_warns_past_threshold(current, warns):
    drift = compare_profiles(_profile(current), _profile({"cat": 50, "dog": 50}))

    assert drift["class_distribution_tvd"] == pytest.approx(abs(current["cat"] / 100 - 0.5))
    assert any("distribution moved" in f for f in drift["findings"]) is warns


def test_image_size_change_is_reported():
    drift = compare_profiles(_profile({"cat": 1, "dog": 1}, median=400), _profile({"cat": 1, "dog": 1}, median=200))

    assert any("median image width changed from 200 to 400" in f for f in drift["findings"])


def test_profile_of_a_dataset_folder(tiny_dataset):
    profile = dataset_profile(tiny_dataset)

    assert sum(profile["counts"].values()) == profile["n_ok"]
    assert profile["width"]["median"] > 0
