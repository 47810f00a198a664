"""Tests of ml.evaluation.leaderboard: ordering, budgets, text/JSON/HTML rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml.errors import ConfigError, DataError
from ml.evaluation.leaderboard import (
    apply_budgets,
    best_candidate,
    build_leaderboard,
    format_leaderboard_table,
    to_jsonable,
    write_leaderboard,
)


def _entry(name: str, accuracy: float | None, log_loss: float | None, status: str = "ok", **extra) -> dict:
    return {"candidate": name, "accuracy": accuracy, "top5_accuracy": None if accuracy is None else 0.9,
            "log_loss": log_loss, "macro_f1": accuracy, "ece": 0.05, "train_wall_time_s": 12.5,
            "peak_rss_mb": 900.0, "params": 2_257_984, "model_bytes": 9_400_000, "latency_ms": 14.2,
            "status": status, **extra}


@pytest.fixture
def entries() -> list[dict]:
    return [
        _entry("scratch_small", 0.146, 3.9),
        _entry("transfer_inception_v3", 0.582, 1.4),
        _entry("broken", None, None, status="failed", error="OOM"),
        _entry("transfer_mobilenet_v2", 0.676, 1.2),
    ]


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("accuracy", ["transfer_mobilenet_v2", "transfer_inception_v3", "scratch_small", "broken"]),
        ("log_loss", ["transfer_mobilenet_v2", "transfer_inception_v3", "scratch_small", "broken"]),
    ],
)
def test_orders_best_first_failed_last(entries: list[dict], metric: str, expected: list[str]) -> None:
    rows = build_leaderboard(entries, metric=metric)

    assert [r["candidate"] for r in rows] == expected
    assert [r["rank"] for r in rows] == [1, 2, 3, None]


def test_log_loss_is_ranked_ascending_even_when_accuracy_disagrees() -> None:
    entries = [_entry("accurate_but_overconfident", 0.70, 2.5), _entry("calibrated", 0.65, 1.1)]

    by_accuracy = build_leaderboard(entries, metric="accuracy")
    by_log_loss = build_leaderboard(entries, metric="log_loss")

    assert by_accuracy[0]["candidate"] == "accurate_but_overconfident"
    assert by_log_loss[0]["candidate"] == "calibrated"


def test_ties_keep_input_order() -> None:
    entries = [_entry("b_first", 0.5, 1.0), _entry("a_second", 0.5, 1.0), _entry("c_third", 0.5, 1.0)]

    rows = build_leaderboard(entries)

    assert [r["candidate"] for r in rows] == ["b_first", "a_second", "c_third"]


def test_failed_with_a_score_still_goes_last_and_input_is_not_mutated() -> None:
    entries = [_entry("failed_late", 0.9, 0.5, status="failed"), _entry("ok", 0.4, 2.0)]

    rows = build_leaderboard(entries)

    assert [r["candidate"] for r in rows] == ["ok", "failed_late"]
    assert "rank" not in entries[0]


@pytest.mark.parametrize(
    ("entries", "error", "message"),
    [
        ([_entry("a", 0.5, 1.0), _entry("a", 0.6, 1.0)], DataError, "appears twice"),
        ([{"accuracy": 0.5}], DataError, "no 'candidate'"),
    ],
)
def test_bad_entries_raise(entries: list[dict], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_leaderboard(entries)


def test_unknown_metric_raises_with_allowed_list(entries: list[dict]) -> None:
    with pytest.raises(ConfigError, match="allowed: .*accuracy"):
        build_leaderboard(entries, metric="speed")


def test_apply_budgets_marks_only_ok_rows_over_budget(entries: list[dict]) -> None:
    rows = build_leaderboard(entries)
    rows[1]["model_bytes"] = 95_000_000  # transfer_inception_v3: 95 MB
    rows[2]["latency_ms"] = 120.0  # scratch_small

    marked = apply_budgets(rows, max_model_mb=20, max_latency_ms=50)

    status = {r["candidate"]: r["status"] for r in marked}
    assert status == {"transfer_mobilenet_v2": "ok", "transfer_inception_v3": "over budget",
                      "scratch_small": "over budget", "broken": "failed"}
    assert "95.0 MB > budget 20 MB" in marked[1]["budget_reasons"][0]
    assert "latency 120.0 ms" in marked[2]["budget_reasons"][0]
    assert [r["candidate"] for r in marked] == [r["candidate"] for r in rows]
    assert best_candidate(marked)["candidate"] == "transfer_mobilenet_v2"


def test_best_candidate_skips_over_budget_rows(entries: list[dict]) -> None:
    rows = apply_budgets(build_leaderboard(entries), max_model_mb=5)

    assert all(r["status"] in ("over budget", "failed") for r in rows)
    assert best_candidate(rows) is None


@pytest.mark.parametrize("budget", [0, -1, float("nan"), "20"])
def test_apply_budgets_rejects_nonpositive_budgets(budget) -> None:
    with pytest.raises(ConfigError, match="max_model_mb"):
        apply_budgets([], max_model_mb=budget)


def test_text_table_has_every_candidate_and_marks_production(entries: list[dict]) -> None:
    rows = build_leaderboard(entries)

    table = format_leaderboard_table(rows, production={"version": "v7", "metrics": {"accuracy": 0.61}})

    lines = table.splitlines()
    for entry in entries:
        assert sum(entry["candidate"] in line for line in lines) == 1
    prod_line = next(line for line in lines if "production v7" in line)
    assert prod_line.lstrip().startswith("*")
    assert "61.0" in prod_line
    assert "67.6" in next(line for line in lines if "transfer_mobilenet_v2" in line)
    assert "2.3M" in table and "9.4" in table  # params and MB are humanised
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_text_table_without_rows() -> None:
    assert "(no candidates)" in format_leaderboard_table([])


def test_write_leaderboard_json_and_escaped_html(tmp_path, entries: list[dict]) -> None:
    entries.append(_entry("<script>alert(1)</script>", 0.3, 2.0, params=np.int64(5)))
    rows = build_leaderboard(entries)

    paths = write_leaderboard(rows, tmp_path / "lb", production={"version": "v1", "accuracy": 0.5})

    data = json.loads(paths["json"].read_text())
    assert [r["candidate"] for r in data["rows"]] == [r["candidate"] for r in rows]
    assert data["production"]["version"] == "v1"
    page = paths["html"].read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http" not in page  # self-contained: no external assets
    assert "production v1" in page


def test_to_jsonable_handles_numpy_nan_and_paths(tmp_path) -> None:
    value = {"a": np.float32(0.5), "b": float("nan"), "c": np.arange(3), "d": tmp_path, 1: (np.bool_(True),)}

    assert to_jsonable(value) == {"a": 0.5, "b": None, "c": [0, 1, 2], "d": str(tmp_path), "1": [True]}


def test_fine_tuned_row_shows_its_parent_and_both_stay_eligible() -> None:
    from ml.evaluation.leaderboard import best_candidate, build_leaderboard, format_leaderboard_table

    rows = build_leaderboard([
        {"candidate": "finetune_mobilenet", "accuracy": 0.850, "parent": "transfer_mobilenet"},
        {"candidate": "transfer_mobilenet", "accuracy": 0.854},
        {"candidate": "scratch_small", "accuracy": 0.71},
    ])
    by_name = {row["candidate"]: row for row in rows}

    assert by_name["finetune_mobilenet"]["vs_parent_points"] == pytest.approx(-0.4)
    assert by_name["finetune_mobilenet"]["worse_than_parent"] is True
    assert "vs_parent_points" not in by_name["transfer_mobilenet"]
    assert best_candidate(rows)["candidate"] == "transfer_mobilenet"  # the parent can win the gate
    table = format_leaderboard_table(rows)
    assert "vs parent" in table.splitlines()[0] and "-0.4" in table


def test_search_trials_show_their_settings_and_eliminated_ones_never_reach_the_gate() -> None:
    from ml.evaluation.leaderboard import STATUS_ELIMINATED, leaderboard_html_table, mark_eliminated

    def trial(name: str, accuracy: float, rung: int) -> dict:
        return _entry(name, accuracy, 1.0, search={"trial": name, "base": "scratch_small", "rung": rung, "rungs": 2,
                                                    "params": {"learning_rate": 0.003, "dropout": 0.2}})

    rows = mark_eliminated(build_leaderboard([trial("scratch_small__t01", 0.9, 1), trial("scratch_small__t02", 0.7, 2),
                                              _entry("scratch_tiny", 0.5, 1.2)]))

    assert [(r["candidate"], r["rank"], r["status"]) for r in rows] == [
        ("scratch_small__t01", 1, STATUS_ELIMINATED), ("scratch_small__t02", 2, "ok"), ("scratch_tiny", 3, "ok")]
    assert best_candidate(rows)["candidate"] == "scratch_small__t02"
    table = format_leaderboard_table(rows)
    assert "rung 1/2: dropout=0.2 learning_rate=0.003" in table and "rung 2/2:" in table
    assert "stopped after rung 1 of 2" in leaderboard_html_table(rows)
    # Without trials there is no search column.
    assert "search" not in format_leaderboard_table(build_leaderboard([_entry("scratch_tiny", 0.5, 1.2)]))
