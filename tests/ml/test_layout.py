"""The store layout: run ids map to reversible, collision-free segments; names are checked where read."""

from __future__ import annotations

import pytest

from ml.errors import UnknownArchitectureError, UnsafeNameError
from ml.registry import layout

AIRFLOW_RUN_IDS = [
    "manual__2026-11-23T17:05:01.123456+00:00",
    "scheduled__2026-11-23T00:00:00+00:00",
    "asset_triggered__2026-11-23T17:05:01.123456+00:00",
    "manual__2026-11-23T17_05_01.123456_00_00",  # what the old lossy mapping made of the first one
    "cli:run~1",
    "perro español",
    ".hidden",
    "a/../../b",
]


@pytest.mark.parametrize("run_id", AIRFLOW_RUN_IDS)
def test_run_segment_round_trips_and_is_key_safe(run_id: str) -> None:
    segment = layout.run_segment(run_id)

    assert layout.run_id_from_segment(segment) == run_id
    assert "/" not in segment and not segment.startswith(".") and segment.isascii()


def test_distinct_run_ids_never_share_a_segment() -> None:
    lossy_twins = ["manual__2026-11-23T17:05:01+00:00", "manual__2026-11-23T17_05_01_00_00",
                   "manual__2026-11-23T17:05:01_00:00", "manual__2026-11-23T17~3a05~3a01+00:00"]

    segments = [layout.run_segment(r) for r in lossy_twins]

    assert len(set(segments)) == len(lossy_twins)


def test_old_style_folders_decode_to_themselves() -> None:
    assert layout.run_id_from_segment("manual__20261123T170501Z") == "manual__20261123T170501Z"


@pytest.mark.parametrize("segment", ["", "..", ".", ".x", "a/b", "a~zz", "a~3A", "a~3", "~2e~2e", "a b", "~ff"])
def test_run_id_from_segment_refuses_what_run_segment_never_writes(segment: str) -> None:
    with pytest.raises(UnsafeNameError, match="run segment"):
        layout.run_id_from_segment(segment)


@pytest.mark.parametrize("run_id", ["", "x" * 251, "a\nb", "a\x00b"])
def test_run_ids_are_bounded_and_printable(run_id: str) -> None:
    with pytest.raises(UnsafeNameError, match="invalid run id"):
        layout.run_segment(run_id)


@pytest.mark.parametrize("rel", ["../x", "a/../../b", "/etc/passwd", "a//b", ".hidden", "a/.git/x", "", "a\\b",
                                 "/".join(["d"] * 9) + "/f"])
def test_relative_paths_inside_folders_refuse_escapes(rel: str) -> None:
    with pytest.raises(UnsafeNameError):
        layout.check_relative_path(rel, "file")


def test_relative_paths_accept_plain_nested_files() -> None:
    assert str(layout.check_relative_path("tensorboard/train/events.out", "file")) == "tensorboard/train/events.out"


def test_candidate_names_must_be_registry_names() -> None:
    assert layout.check_candidate("scratch_small") == "scratch_small"
    with pytest.raises(UnsafeNameError):
        layout.check_candidate("scratch_a/../../../victim")
    with pytest.raises(UnknownArchitectureError, match="known"):
        layout.check_candidate("scratch_nope")


def test_keys_are_built_from_checked_names() -> None:
    run = "manual__2026-11-23T17:05:01+00:00"

    assert layout.candidate_prefix("m", run, "scratch_small") == f"m/runs/{layout.run_segment(run)}/scratch_small/"
    assert layout.version_prefix("m", "20261123T170501Z-abc123") == "m/versions/20261123T170501Z-abc123/"
    with pytest.raises(UnsafeNameError):
        layout.version_prefix("m", "../production")
    with pytest.raises(UnsafeNameError):
        layout.pointer_key("../other-model")
